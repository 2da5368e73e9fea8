"""The feature cache: contents against a direct encoder run, reproducibility, fingerprints,
rebuilds, and damaged files. Uses fastprompt-tiny (64x64 images, D = 64)."""
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
    cache = build_feature_cache(path, model, NAME, pre_train, pre_val, splits, views=views,
                                shots=3, noise_rate=0.5, noise_type="pairflip", seed=seed,
                                progress=False)
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


def _data_offset(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_damaged_files_are_named(tmp_path, tiny_clip, caplog):
    model, pre_train, pre_val, _ = tiny_clip
    splits = make_shapes_dataset(tmp_path / "d", num_classes=2, images_per_class=2,
                                 test_images_per_class=1)
    path = tmp_path / "c.st"
    good = build_feature_cache(path, model, NAME, pre_train, pre_val, splits, views=2,
                               progress=False).train_features.clone()
    content = path.read_bytes()  # the file is rewritten in place below: keep no mapping of it
    damaged = "^path: feature cache .*c\\.st.* truncated or corrupt"

    path.write_bytes(content[: len(content) - 37])
    with pytest.raises(ValueError, match=damaged):
        load_cache(path)
    start = _data_offset(path)
    flipped = bytearray(content)
    flipped[(start + len(content)) // 2] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=damaged + ".*checksum"):
        load_cache(path)
    assert load_cache(path, verify=False).train_features.shape == good.shape
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match=damaged):
        load_cache(path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=damaged + ".*format"):
        load_cache(path)
    with pytest.raises(FileNotFoundError, match="^path: no feature cache"):
        load_cache(tmp_path / "missing.st")

    path.write_bytes(content[:100])
    with caplog.at_level(logging.WARNING, logger="fastprompt.data"):
        rebuilt = build_or_load_cache(path, model, NAME, pre_train, pre_val, splits, views=2,
                                      progress=False)
    assert torch.equal(rebuilt.train_features, good)
    assert any("truncated or corrupt" in r.getMessage() for r in caplog.records)


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


def test_bad_arguments(tmp_path, shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    path = tmp_path / "c.st"
    with pytest.raises(ValueError, match="^views: expected an int >= 1"):
        build_feature_cache(path, model, NAME, pre_train, pre_val, splits, views=0)
    with pytest.raises(ValueError, match="^shots: 6 per class requested"):
        build_feature_cache(path, model, NAME, pre_train, pre_val, splits, shots=6)
    with pytest.raises(TypeError, match="^model: expected an open_clip model"):
        build_feature_cache(path, torch.nn.Linear(2, 2), NAME, pre_train, pre_val, splits)
    with pytest.raises(TypeError, match="^splits: expected a DatasetSplits"):
        build_feature_cache(path, model, NAME, pre_train, pre_val, splits.train)
    with pytest.raises(ValueError, match="^noise_type"):
        build_feature_cache(path, model, NAME, pre_train, pre_val, splits, noise_type="x")
    with pytest.raises(ValueError, match="^batch_size"):
        build_feature_cache(path, model, NAME, pre_train, pre_val, splits, batch_size=0)


def test_weights_hash_is_remembered_by_file_size_and_mtime(tmp_path, tiny_weights, monkeypatch):
    """A model loaded from a file is hashed once per (file, size, mtime, name, precision);
    a touched file is hashed again (issue 14, item 20)."""
    import shutil

    from fastprompt.models import create_model, model_weights_hash
    from fastprompt.models import weights as weights_module
    monkeypatch.setenv("FASTPROMPT_CACHE_DIR", str(tmp_path / "memo"))
    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_weights, weights)
    model = create_model("fastprompt-tiny", str(weights))[0]
    first = model_weights_hash(model)
    assert (tmp_path / "memo" / "weights-hashes.json").exists()
    calls = []
    real = weights_module.update_tensor_hash
    monkeypatch.setattr(weights_module, "update_tensor_hash",
                        lambda *a: (calls.append(1), real(*a)))
    again = create_model("fastprompt-tiny", str(weights))[0]
    assert model_weights_hash(again) == first and calls == []
    os.utime(weights, ns=(1, 1))
    touched = create_model("fastprompt-tiny", str(weights))[0]
    assert model_weights_hash(touched) == first and calls  # recomputed, same weights
    plain = create_model("fastprompt-tiny")[0]   # no file: always computed
    calls.clear()
    assert model_weights_hash(plain) == first and calls
