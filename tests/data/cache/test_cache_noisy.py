"""Label-noise variants of a cache (fastprompt.data.cache.noisy): derived from the clean cache
without encoding, they are the caches a build with that noise writes."""
import dataclasses
import os

import pytest
import torch

from fastprompt.data import build_or_load_cache, load_cache
from fastprompt.data.cache import noisy_variant


def test_a_variant_is_the_cache_a_build_with_that_noise_writes(cached_shapes, tmp_path):
    clean = cached_shapes()
    built = cached_shapes(noise_rate=0.5, noise_type="pairflip")
    spec = dataclasses.replace(clean.spec, noise_rate=0.5, noise_type="pairflip")
    derived = noisy_variant(clean.cache, tmp_path / "noisy.st", spec)
    assert derived.fingerprint == built.cache.fingerprint
    for key in ("train_features", "train_labels", "train_clean_labels", "test_features"):
        assert torch.equal(getattr(derived, key), getattr(built.cache, key)), key
    with open(built.cache.path, "rb") as a, open(derived.path, "rb") as b:
        assert a.read() == b.read()
    load_cache(derived.path)  # checksum intact

    # The 0.1 call form: the views, shots and seed are the clean cache's.
    legacy = noisy_variant(clean.cache, tmp_path / "legacy.st", clean.model, "fastprompt-tiny",
                           clean.preprocess_train, clean.preprocess_val, clean.splits,
                           noise_rate=0.5, noise_type="pairflip")
    assert legacy.fingerprint == derived.fingerprint
    stamp = os.stat(derived.path).st_mtime_ns
    assert noisy_variant(clean.cache, derived.path, spec).path == derived.path
    assert build_or_load_cache(derived.path, spec).fingerprint == derived.fingerprint
    assert os.stat(derived.path).st_mtime_ns == stamp   # loaded, not written again


def test_variants_of_the_wrong_cache_are_refused(cached_shapes, tmp_path):
    clean = cached_shapes()
    noisy = cached_shapes(noise_rate=0.5, noise_type="pairflip")
    with pytest.raises(ValueError, match="^clean: .* holds noisy labels"):
        noisy_variant(noisy.cache, tmp_path / "n.st", noisy.spec)
    with pytest.raises(ValueError, match="^clean: .* was not built from these model"):
        noisy_variant(clean.cache, tmp_path / "n.st",
                      dataclasses.replace(clean.spec, views=3, noise_rate=0.5))
    with pytest.raises(TypeError, match="noise_rate"):
        noisy_variant(clean.cache, tmp_path / "n.st", clean.model, "fastprompt-tiny",
                      clean.preprocess_train, clean.preprocess_val, clean.splits)
    assert os.listdir(tmp_path) == []
