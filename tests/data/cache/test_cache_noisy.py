"""Label-noise variants of a cache (fastprompt.data.cache.noisy): derived from the clean cache
without encoding, they are the caches a build with that noise writes."""
import collections
import dataclasses
import os

import pytest
import torch

from fastprompt.data import build_feature_cache, build_or_load_cache, load_cache
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


def test_a_per_class_variant_is_the_cache_a_build_with_that_noise_writes(cached_shapes, tmp_path):
    clean = cached_shapes()
    spec = dataclasses.replace(clean.spec, noise_per_class=2)
    built = build_feature_cache(tmp_path / "built.st", spec, progress=False)
    derived = noisy_variant(clean.cache, tmp_path / "noisy.st", spec)
    assert derived.fingerprint == built.fingerprint
    assert derived.fingerprint["noise_per_class"] == 2
    with open(built.path, "rb") as a, open(derived.path, "rb") as b:
        assert a.read() == b.read()
    m = derived.num_train_images
    pairs = list(zip(derived.train_clean_labels[:m].tolist(), derived.train_labels[:m].tolist()))
    wrong = [(y, z) for y, z in pairs if y != z]
    assert collections.Counter(y for y, _ in wrong) == {c: 2 for c in range(4)}
    assert collections.Counter(z for _, z in wrong) == {c: 2 for c in range(4)}

    legacy = noisy_variant(clean.cache, tmp_path / "legacy.st", clean.model, "fastprompt-tiny",
                           clean.preprocess_train, clean.preprocess_val, clean.splits,
                           noise_per_class=2)
    assert legacy.fingerprint == derived.fingerprint
    with pytest.raises(ValueError, match=r"^clean: .* holds noisy labels \(2 per class\)"):
        noisy_variant(built, tmp_path / "n.st", spec)
    # A per-class variant is never taken for a rate variant, nor the other way round.
    rate = dataclasses.replace(clean.spec, noise_rate=0.5)
    with pytest.raises(ValueError, match="built from different inputs .*noise_per_class: "
                       "cached 2, expected None"):
        load_cache(derived.path, rate.fingerprint())
