"""Building a feature cache (fastprompt.data.cache.build, encode): contents against a direct
encoder run, views and flips, reproducibility, fingerprint mismatches rebuilt, undecodable
images. Uses fastprompt-tiny (64x64 images, D = 64)."""
import copy
import logging
import os
import sys

import pytest
import torch
from PIL import Image

from fastprompt.data import (DatasetSplits, add_label_noise, build_feature_cache,
                             build_or_load_cache, cache_fingerprint, load_cache,
                             load_image_folder, make_shapes_dataset)
from fastprompt.data.cache import CacheSpec

NAME = "fastprompt-tiny"


def _seed():
    return int.from_bytes(os.urandom(2), "little")


def _encode(model, tensors):
    with torch.no_grad():
        return model.encode_image(torch.stack(tensors)).float()


def _label_of(path, classnames):
    return classnames.index(os.path.basename(os.path.dirname(path)).replace("_", " "))


def _close(actual, truth, what):
    scale = truth.abs().max().item()
    torch.testing.assert_close(actual.float(), truth, rtol=2e-3, atol=2e-3 * scale,
                               msg=lambda m: f"{what}: {m}")


def test_layout_labels_and_features(tmp_path, shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    seed, views = _seed(), 3
    path = tmp_path / "cache.safetensors"
    spec = CacheSpec(model, NAME, pre_train, pre_val, splits, views=views, shots=3,
                     noise_rate=0.5, noise_type="pairflip", seed=seed)
    cache = build_feature_cache(path, spec, progress=False)
    m, c = 12, 4
    assert cache.num_train_images == m and cache.views == views and cache.feature_dim == 64
    assert cache.classnames == splits.classnames
    assert cache.train_features.shape == (views * m, 64)
    assert cache.train_features.dtype == torch.float16
    assert cache.test_features.shape == (8, 64) and cache.val_features.shape == (0, 64)
    # Row v*M + m is view v of image m.
    assert torch.equal(cache.train_sample_index, torch.arange(m).repeat(views))
    assert torch.equal(cache.train_view_index, torch.arange(views).repeat_interleave(m))
    # Few-shot: 3 distinct training images per class; labels read off the folder names.
    train_set = {p for p, _ in splits.train}
    assert len(set(cache.train_paths)) == m and set(cache.train_paths) <= train_set
    clean = [_label_of(p, cache.classnames) for p in cache.train_paths]
    assert sorted(clean) == sorted(list(range(c)) * 3)
    assert cache.train_clean_labels.tolist() == clean * views
    noisy = add_label_noise(clean, c, 0.5, "pairflip", seed=seed)
    assert cache.train_labels.tolist() == noisy * views
    assert cache.test_paths == [p for p, _ in splits.test]
    assert cache.test_labels.tolist() == [_label_of(p, cache.classnames) for p in cache.test_paths]
    # Test features are the encoder on preprocess_val, one view each.
    truth = _encode(model, [pre_val(Image.open(p).convert("RGB")) for p in cache.test_paths])
    _close(cache.test_features, truth, "test_features")
    # Augmented views differ from one another.
    per_image = cache.train_features.float().reshape(views, m, -1)
    assert (per_image[0] - per_image[1]).abs().max() > 1e-3
    assert cache.fingerprint == cache_fingerprint(model, NAME, pre_train, pre_val, splits,
                                                  views=views, shots=3, noise_rate=0.5,
                                                  noise_type="pairflip", seed=seed)
    assert os.listdir(tmp_path) == ["cache.safetensors"]  # the temporary file was renamed
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as f:  # the tensors are memory-mapped, not read in
            assert str(path) in f.read()


def test_views_are_the_transform_plus_an_optional_flip(tmp_path, shapes_root, tiny_clip):
    model, _, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    images = [Image.open(p).convert("RGB") for p, _ in splits.train[:6]]
    small = DatasetSplits(splits.classnames, splits.train[:6], splits.test[:1])
    plain = _encode(model, [pre_val(im) for im in images])
    flipped = _encode(model, [pre_val(im).flip(-1) for im in images])
    # A deterministic "train" transform: every view is the plain image or its mirror.
    cache = build_feature_cache(tmp_path / "f.safetensors", model, NAME, pre_val, pre_val, small,
                                views=8, seed=_seed(), progress=False)
    rows = cache.train_features.float()
    idx = cache.train_sample_index
    err_plain = (rows - plain[idx]).abs().amax(dim=1)
    err_flip = (rows - flipped[idx]).abs().amax(dim=1)
    tol = 2e-3 * plain.abs().max()
    assert bool(((err_plain <= tol) | (err_flip <= tol)).all())
    assert bool((err_plain <= tol).any()) and bool((err_flip <= tol).any())
    no_flip = build_feature_cache(tmp_path / "n.safetensors", model, NAME, pre_val, pre_val, small,
                                  views=2, add_flip=False, progress=False)
    _close(no_flip.train_features, plain[no_flip.train_sample_index], "add_flip=False")


def test_reproducible_whatever_the_workers(tmp_path, shapes_root, tiny_clip, capsys):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    seed = _seed()
    kwargs = dict(views=2, shots=2, seed=seed, batch_size=6)
    rng_before = torch.get_rng_state()
    a = build_feature_cache(tmp_path / "a.st", model, NAME, pre_train, pre_val, splits,
                            progress=True, **kwargs)
    assert "caching features" in capsys.readouterr().err
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator is untouched
    b = build_feature_cache(tmp_path / "b.st", model, NAME, pre_train, pre_val, splits,
                            num_workers=2, progress=False, **kwargs)
    assert torch.equal(a.train_features, b.train_features)
    assert torch.equal(a.test_features, b.test_features)
    other = build_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits,
                                progress=False, **{**kwargs, "seed": seed + 1})
    assert not torch.equal(a.train_features, other.train_features)


def test_fingerprint_mismatch_refused_and_rebuilt(tmp_path, tiny_clip, caplog):
    model, pre_train, pre_val, _ = tiny_clip
    splits = make_shapes_dataset(tmp_path / "d", num_classes=2, images_per_class=2,
                                 test_images_per_class=1)
    path = tmp_path / "c.st"
    kw = dict(views=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="fastprompt.data"):
        first = build_or_load_cache(path, model, NAME, pre_train, pre_val, splits, **kw)
        inode = os.stat(path).st_ino
        again = build_or_load_cache(path, model, NAME, pre_train, pre_val, splits, **kw)
    assert os.stat(path).st_ino == inode and caplog.records == []  # loaded, not rebuilt
    assert torch.equal(first.train_features, again.train_features)

    def expect(fingerprint, *keys):
        with pytest.raises(ValueError, match=r"^path: feature cache .*c\.st.* different inputs"
                                             ) as info:
            load_cache(path, fingerprint)
        for key in keys:
            assert f"{key}: cached" in str(info.value)

    expect(cache_fingerprint(model, NAME, pre_train, pre_val, splits, views=3), "views")
    expect(cache_fingerprint(model, NAME, pre_train, pre_val, splits, views=2, noise_rate=0.5),
           "noise_rate")
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.visual.parameters()).view(-1)[0] += 1e-3
    expect(cache_fingerprint(changed, NAME, pre_train, pre_val, splits, views=2), "model_weights")
    image = splits.train[0][0]
    os.utime(image, ns=(0, os.stat(image).st_mtime_ns + 10**9))
    expect(cache_fingerprint(model, NAME, pre_train, pre_val, splits, views=2), "data")

    with caplog.at_level(logging.WARNING, logger="fastprompt.data"):
        rebuilt = build_or_load_cache(path, model, NAME, pre_train, pre_val, splits, views=3,
                                      progress=False)
    assert rebuilt.views == 3
    assert any("rebuilding" in r.getMessage() and "views" in r.getMessage()
               for r in caplog.records)


def test_undecodable_image_fails_the_build_naming_it(tmp_path, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = make_shapes_dataset(tmp_path / "d", num_classes=2, images_per_class=2,
                                 test_images_per_class=1)
    bad = splits.test[1][0]
    with open(bad, "wb") as f:  # damaged after listing: passes the listing, fails to decode
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ValueError, match=f"^splits: image file '{bad}' cannot be decoded"):
        build_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits, views=1,
                            progress=False)
    assert not os.path.exists(tmp_path / "c.st")


def test_a_fifo_is_refused_not_opened(tmp_path, within):
    """The cache build opens regular files only: a FIFO would block it forever (issue 23)."""
    from fastprompt.data.cache.encode import open_rgb
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"x\.png.* a FIFO, not a regular file"):
        within(30, open_rgb, str(fifo), fifos=[fifo])
