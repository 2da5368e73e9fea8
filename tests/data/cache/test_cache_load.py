"""Loading a feature cache (fastprompt.data.cache.load): damaged files named, caches written by
fastprompt 0.1.0 still load, and a cache checked against the model it is used with (the
messages name the command line's flags, as the CLI shows them)."""
import copy
import logging
import os
import re

import pytest
import torch

from fastprompt.data import (build_feature_cache, build_or_load_cache, load_cache,
                             make_shapes_dataset)
from fastprompt.data.cache import (CACHE_FORMAT, check_cache_weights, load_cache_for,
                                   task_cache_path)

NAME = "fastprompt-tiny"
FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "fixtures",
                        "runs_v0_1_0")
OLD_CACHES = ("coop-features.safetensors", "softcpt-features-0.safetensors",
              "softcpt-features-1.safetensors")


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


@pytest.mark.parametrize("name", OLD_CACHES)
def test_caches_of_fastprompt_0_1_0_load(name, tiny_clip):
    """Files written by 0.1.0 (tests/fixtures/runs_v0_1_0) load, checksum verified, and match
    the default tiny model they were built with."""
    path = os.path.join(FIXTURES, name)
    cache = load_cache(path)
    assert cache.fingerprint["format"] == CACHE_FORMAT
    assert cache.fingerprint["fastprompt_version"] == "0.1.0"
    assert cache.train_features.shape == (cache.views * cache.num_train_images, 64)
    assert torch.equal(cache.train_sample_index,
                       torch.arange(cache.num_train_images).repeat(cache.views))
    assert len(cache.test_paths) == cache.test_features.shape[0] > 0
    assert load_cache_for(path, tiny_clip[0], NAME).fingerprint == cache.fingerprint
    check_cache_weights(path, tiny_clip[0], rebuild=False)


def test_a_cache_is_checked_against_its_model(tmp_path, cached_shapes):
    shared = cached_shapes()
    path, model = shared.cache.path, shared.model
    check_cache_weights(path, model, rebuild=False)
    assert load_cache_for(path, model, NAME).fingerprint == shared.cache.fingerprint
    with pytest.raises(ValueError, match=re.escape(
            f"--cache: {path} was built with model 'fastprompt-tiny', not 'ViT-B-32'")):
        load_cache_for(path, model, "ViT-B-32")

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.visual.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match=re.escape(
            f"--cache: {path} was built with other model weights than --model/--pretrained "
            "give; pass --rebuild-cache to rebuild it, or another --cache file")):
        check_cache_weights(path, other, rebuild=False)
    check_cache_weights(path, other, rebuild=True)           # to be rebuilt: no refusal
    with pytest.raises(ValueError, match=re.escape(
            f"--cache: {path} was built with other weights of 'fastprompt-tiny' than "
            "--pretrained gives; rebuild it with --data DIR --rebuild-cache")):
        load_cache_for(path, other, NAME)

    check_cache_weights(str(tmp_path / "missing.st"), other, rebuild=False)   # built anew
    (tmp_path / "damaged.st").write_bytes(b"\x00" * 5)
    check_cache_weights(str(tmp_path / "damaged.st"), other, rebuild=False)   # rebuilt, warned
    with pytest.raises(FileNotFoundError, match="^path: no feature cache"):
        load_cache_for(str(tmp_path / "missing.st"), model, NAME)


def test_task_cache_path():
    assert task_cache_path("out", 0, "Shapes A") == os.path.join(
        "out", "features", "00-shapes-a.safetensors")
    assert task_cache_path("out", 12, "?!") == os.path.join(
        "out", "features", "12-task.safetensors")
    long = task_cache_path("out", 3, "x" * 60)
    assert os.path.basename(long) == "03-" + "x" * 40 + ".safetensors"


def test_the_version_that_built_a_cache_does_not_make_another_cache(cached_shapes):
    """``fastprompt_version`` records who built the cache; a new version reuses the cache,
    while any other difference in the fingerprint still refuses it."""
    cache = cached_shapes().cache
    newer = {**cache.fingerprint, "fastprompt_version": "99.0.0"}
    assert load_cache(cache.path, newer).fingerprint == cache.fingerprint
    with pytest.raises(ValueError, match="built from different inputs.*views"):
        load_cache(cache.path, {**newer, "views": cache.views + 1})
