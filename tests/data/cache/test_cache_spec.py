"""What a feature cache is built from (fastprompt.data.cache.spec): one CacheSpec, checked when it
is made, whose fingerprint every entry point uses; the argument lists of 0.1 still accepted."""
import dataclasses

import pytest
import torch
from torchvision import transforms as T

from fastprompt.data import (add_label_noise, add_label_noise_per_class, build_feature_cache,
                             cache_fingerprint, few_shot_subset, load_cache, load_image_folder,
                             plan_feature_cache)
from fastprompt.data.cache import CacheSpec
from fastprompt.data.cache.spec import view_seed

NAME = "fastprompt-tiny"


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


def test_the_spec_checks_every_argument(shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    good = dict(model=model, model_name=NAME, preprocess_train=pre_train,
                preprocess_val=pre_val, splits=splits)
    cases = [
        (ValueError, "^chunk_size: expected an int >= 1", dict(chunk_size=0)),
        (TypeError, "^model_name: expected a non-empty str", dict(model_name="")),
        (TypeError, "^preprocess_val: expected a callable image transform", dict(preprocess_val=3)),
        (TypeError, "^seed: expected an int", dict(seed=True)),
        (TypeError, "^add_flip: expected a bool", dict(add_flip="yes")),
        (ValueError, r"^rate: must lie in \[0, 1\]", dict(noise_rate=1.5)),
        (TypeError, "^shots: expected an int >= 1", dict(shots=2.0)),
    ]
    for error, message, change in cases:
        with pytest.raises(error, match=message):
            CacheSpec(**{**good, **change})
    spec = CacheSpec(**good, views=2)
    with pytest.raises(ValueError, match="^views: expected an int >= 1"):
        dataclasses.replace(spec, views=0)            # a derived spec is checked again
    with pytest.raises(TypeError):
        CacheSpec(model, NAME, pre_train, pre_val, splits, 2)   # views by keyword only


def test_the_spec_resolves_the_subset_the_noise_and_the_flip(shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    spec = CacheSpec(model, NAME, pre_train, pre_val, splits, shots=2, noise_rate=0.5, seed=4)
    assert spec.train == few_shot_subset(splits.train, 2, seed=4, classnames=splits.classnames)
    assert spec.noisy_labels == add_label_noise([y for _, y in spec.train], 4, 0.5, seed=4)
    assert spec.flip_added
    assert not dataclasses.replace(spec, add_flip=False).flip_added
    flipping = T.Compose([pre_val, T.RandomHorizontalFlip()])
    assert not dataclasses.replace(spec, preprocess_train=flipping).flip_added
    assert "model_name='fastprompt-tiny'" in repr(spec) and "splits" not in repr(spec)


def test_the_spec_draws_per_class_noise_and_records_it(shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    kwargs = dict(shots=4, noise_per_class=2, noise_type="pairflip", seed=4)
    spec = CacheSpec(model, NAME, pre_train, pre_val, splits, **kwargs)
    assert spec.noisy_labels == add_label_noise_per_class(
        [y for _, y in spec.train], 4, 2, "pairflip", seed=4)
    fingerprint = spec.fingerprint()
    assert fingerprint["noise_per_class"] == 2 and fingerprint["noise_rate"] == 0.0
    assert cache_fingerprint(model, NAME, pre_train, pre_val, splits, **kwargs) == fingerprint
    assert dataclasses.replace(spec, noise_per_class=1).fingerprint() != fingerprint


# The fingerprint's keys as fastprompt 0.2.0 wrote them before per-class noise existed.
FINGERPRINT_KEYS = ["data", "fastprompt_version", "format", "image_size", "model_name",
                    "model_weights", "noise_rate", "noise_type", "num_classes",
                    "num_test_images", "num_train_images", "num_val_images", "seed", "shots",
                    "transforms", "views"]


def test_without_per_class_noise_the_fingerprint_is_unchanged(cached_shapes):
    """A spec without per-class noise (None, or 0: no noise) gives the fingerprint it gave
    before the field existed, so every cache built then is still valid and not rebuilt."""
    shared = cached_shapes()
    fingerprint = shared.spec.fingerprint()
    assert sorted(fingerprint) == FINGERPRINT_KEYS
    for unset in (None, 0):
        assert dataclasses.replace(shared.spec, noise_per_class=unset).fingerprint() == fingerprint
    load_cache(shared.cache.path, dataclasses.replace(shared.spec, noise_per_class=0).fingerprint())


def test_per_class_noise_refusals(shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    good = dict(model=model, model_name=NAME, preprocess_train=pre_train,
                preprocess_val=pre_val, splits=splits)
    cases = [
        (ValueError, "^noise_per_class: expected an int >= 0, got -1", dict(noise_per_class=-1)),
        (TypeError, "^noise_per_class: expected an int >= 0", dict(noise_per_class=2.0)),
        (ValueError, "^noise_per_class: one label-noise protocol per cache, got "
         "noise_per_class=0 and noise_rate=0.25", dict(noise_per_class=0, noise_rate=0.25)),
        (TypeError, "^noise_rate: expected a number", dict(noise_per_class=1, noise_rate="0")),
        (ValueError, r"^noise_per_class: 3 noisy labels per class requested, but class .* "
         r"\(label 0\) has only 2 image\(s\)$", dict(shots=2, noise_per_class=3)),
        (ValueError, r"^noise_per_class: 6 noisy labels .* has only 5 image\(s\)$",
         dict(noise_per_class=6)),
    ]
    for error, message, change in cases:
        with pytest.raises(error, match=message):
            CacheSpec(**{**good, **change})


def test_both_call_forms_give_one_fingerprint_and_plan(tmp_path, shapes_root, tiny_clip):
    model, pre_train, pre_val, _ = tiny_clip
    splits = load_image_folder(shapes_root)
    kwargs = dict(views=3, shots=2, noise_rate=0.25, noise_type="pairflip", seed=9)
    spec = CacheSpec(model, NAME, pre_train, pre_val, splits, **kwargs, batch_size=5,
                     chunk_size=9)
    fingerprint = cache_fingerprint(model, NAME, pre_train, pre_val, splits, **kwargs)
    assert spec.fingerprint() == cache_fingerprint(spec) == fingerprint
    # How the work is cut is not what is cached.
    assert dataclasses.replace(spec, batch_size=1, chunk_size=1).fingerprint() == fingerprint
    assert dataclasses.replace(spec, seed=10).fingerprint()["seed"] == 10
    plan = plan_feature_cache(tmp_path / "c.st", spec)
    legacy = plan_feature_cache(tmp_path / "c.st", model, NAME, pre_train, pre_val, splits,
                                **kwargs, batch_size=5, chunk_size=9)
    by_keyword = plan_feature_cache(tmp_path / "c.st", model=model, model_name=NAME,
                                    preprocess_train=pre_train, preprocess_val=pre_val,
                                    splits=splits, **kwargs, batch_size=5, chunk_size=9)
    assert plan == legacy == by_keyword
    assert plan.fingerprint == fingerprint and plan.train == spec.train
    with pytest.raises(TypeError, match=r"^spec: a CacheSpec takes no further arguments .*views"):
        plan_feature_cache(tmp_path / "c.st", spec, views=2)
    with pytest.raises(TypeError, match="^spec: expected a CacheSpec"):
        build_feature_cache(tmp_path / "c.st", "spec")
    with pytest.raises(TypeError, match="^path: expected a path"):
        build_feature_cache(3, spec)


def test_view_seeds_are_fixed():
    """The seeds of the training views: changing them changes every cache's features."""
    assert view_seed(1, 0, 0) == 6228731691795408054
    assert view_seed(7, 12, 3) == 2729370138903241267
