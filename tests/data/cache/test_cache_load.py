"""Loading a feature cache (fastprompt.data.cache.load): damaged files named, and caches
written by fastprompt 0.1.0 still load."""
import logging
import os

import pytest
import torch

from fastprompt.data import build_feature_cache, build_or_load_cache, load_cache, make_shapes_dataset
from fastprompt.data.cache import CACHE_FORMAT

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
def test_caches_of_fastprompt_0_1_0_load(name):
    """Files written by 0.1.0 (tests/fixtures/runs_v0_1_0) load, checksum verified."""
    path = os.path.join(FIXTURES, name)
    cache = load_cache(path)
    assert cache.fingerprint["format"] == CACHE_FORMAT
    assert cache.fingerprint["fastprompt_version"] == "0.1.0"
    assert cache.train_features.shape == (cache.views * cache.num_train_images, 64)
    assert torch.equal(cache.train_sample_index,
                       torch.arange(cache.num_train_images).repeat(cache.views))
    assert len(cache.test_paths) == cache.test_features.shape[0] > 0
