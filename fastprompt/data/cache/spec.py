"""What a feature cache is built from: :class:`CacheSpec`, the one record of a build's
arguments, checked once when it is made, and the fingerprint it gives (:func:`cache_fingerprint`).

Every entry point of the cache (plan, encode, build, load-or-build, noisy variants) takes a spec;
:func:`as_spec` turns the argument lists of fastprompt 0.1 (``model, model_name,
preprocess_train, preprocess_val, splits, views=..., ...``) into one, so those calls still work.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import torch
from torchvision.transforms import RandomHorizontalFlip, v2

from fastprompt import __version__
from fastprompt._checks import check_int, check_seed
from fastprompt._hashing import new_digest
from fastprompt.data.folders import DatasetSplits, Sample
from fastprompt.data.sampling import (NOISE_TYPES, add_label_noise, add_label_noise_per_class,
                                      check_noise_rate, few_shot_subset)
from fastprompt.models.weights import model_weights_hash

CACHE_FORMAT = "fastprompt.feature_cache/1"
DEFAULT_VIEWS = 8
DEFAULT_BATCH_SIZE = 128
# Views per chunk file: 16 MiB of features at D = 512, a few seconds of a GPU's work.
DEFAULT_CHUNK_SIZE = 16384


def stable_repr(obj) -> str:
    """``repr(obj)`` without memory addresses (``<function f at 0x7f...>``), so a lambda in a
    transform does not make every run look different."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def has_flip(transform) -> bool:
    """Whether ``transform`` (or a step of its ``transforms``) is a random horizontal flip."""
    steps = getattr(transform, "transforms", [transform])
    return any(isinstance(t, (RandomHorizontalFlip, v2.RandomHorizontalFlip)) for t in steps)


def data_hash(classnames: list[str], parts: dict[str, list[tuple]]) -> str:
    """The fingerprint's ``data``: the class names and, per split, each image's path, size,
    mtime and labels (``ValueError`` naming an image that cannot be read)."""
    h = new_digest()
    h.update(json.dumps(classnames).encode())
    for split, rows in parts.items():
        h.update(f"\n[{split}]".encode())
        for path, *labels in rows:
            try:
                st = os.stat(path)
            except OSError as e:
                raise ValueError(f"splits: image file {path!r} ({split}) cannot be read: "
                                 f"{e.strerror}") from None
            h.update(f"{os.fsencode(path)!r}|{st.st_size}|{st.st_mtime_ns}|{labels}\n".encode())
    return h.hexdigest()


def view_seed(seed: int, image: int, view: int) -> int:
    """The seed of torch's generator while view ``view`` of training image ``image`` is drawn."""
    h = hashlib.blake2b(f"fastprompt.view:{seed}:{image}:{view}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


@dataclass(frozen=True, eq=False)
class CacheSpec:
    """Everything a feature cache is built from, checked when the spec is made.

    ``model`` (an open_clip model; its image tower encodes), ``model_name`` (recorded in the
    fingerprint), ``preprocess_train`` (the training views' transform), ``preprocess_val`` (the
    test and validation images' one), ``splits``; then, by keyword: ``views`` per training
    image, ``shots`` per class (all images when None), label noise (``noise_type`` with either
    ``noise_rate``, each label corrupted with that probability, or ``noise_per_class``, exactly
    that many per class: :func:`~fastprompt.data.add_label_noise_per_class`), ``seed`` (of the
    few-shot draw, the noise and the views), ``add_flip`` (a random horizontal flip after
    ``preprocess_train`` when it has none), ``batch_size`` (views per encoder batch, rounded
    down to whole images) and ``chunk_size`` (views per chunk file, rounded down to whole
    encoder batches). ``batch_size`` and ``chunk_size`` decide how the work is cut, not the
    features: they are not part of the fingerprint.

    Made once, the spec also holds what the arguments resolve to: ``train`` (the few-shot
    subset of ``splits.train``), ``noisy_labels`` (its training labels) and ``flip_added``.
    Two specs describe the same cache exactly when their :meth:`fingerprint` is equal (a spec
    is compared by identity; derive one from another with ``dataclasses.replace``).
    """
    model: torch.nn.Module = field(repr=False)
    model_name: str
    preprocess_train: Callable
    preprocess_val: Callable
    splits: DatasetSplits = field(repr=False)
    _: KW_ONLY
    views: int = DEFAULT_VIEWS
    shots: int | None = None
    noise_rate: float = 0.0
    noise_type: str = "symmetric"
    noise_per_class: int | None = None
    seed: int = 1
    add_flip: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE
    chunk_size: int = DEFAULT_CHUNK_SIZE
    train: list[Sample] = field(init=False, repr=False)
    noisy_labels: list[int] = field(init=False, repr=False)
    flip_added: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        check_int("chunk_size", self.chunk_size, 1)
        if not isinstance(self.splits, DatasetSplits):
            raise TypeError(f"splits: expected a DatasetSplits, got {type(self.splits).__name__}")
        if not isinstance(self.model, torch.nn.Module) or not hasattr(self.model, "encode_image"):
            raise TypeError(f"model: expected an open_clip model with encode_image, got "
                            f"{type(self.model).__name__}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise TypeError(f"model_name: expected a non-empty str, got {self.model_name!r}")
        for name in ("preprocess_train", "preprocess_val"):
            t = getattr(self, name)
            if not callable(t):
                raise TypeError(f"{name}: expected a callable image transform, got "
                                f"{type(t).__name__}")
        check_int("views", self.views, 1)
        check_seed(self.seed)
        if self.noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type: must be one of {NOISE_TYPES}, got {self.noise_type!r}")
        if not isinstance(self.add_flip, bool):
            raise TypeError(f"add_flip: expected a bool, got {type(self.add_flip).__name__}")
        splits = self.splits
        # few_shot_subset checks shots, add_label_noise the noise rate.
        train = list(splits.train) if self.shots is None else few_shot_subset(
            splits.train, self.shots, seed=self.seed, classnames=splits.classnames)
        labels = [y for _, y in train]
        if self.noise_per_class is None:
            noisy = add_label_noise(labels, splits.num_classes, self.noise_rate, self.noise_type,
                                    seed=self.seed)
        else:
            check_int("noise_per_class", self.noise_per_class, 0)
            if check_noise_rate(self.noise_rate) != 0:
                raise ValueError(f"noise_per_class: one label-noise protocol per cache, got "
                                 f"noise_per_class={self.noise_per_class} and noise_rate="
                                 f"{self.noise_rate}; set noise_rate to 0 or noise_per_class to "
                                 "None")
            try:
                noisy = add_label_noise_per_class(labels, splits.num_classes,
                                                  self.noise_per_class, self.noise_type,
                                                  seed=self.seed, classnames=splits.classnames)
            except ValueError as e:  # a class with fewer images: name the spec's field
                if not str(e).startswith("per_class: "):
                    raise
                raise ValueError(f"noise_{e}") from None
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "noisy_labels", noisy)
        object.__setattr__(self, "flip_added",
                           self.add_flip and not has_flip(self.preprocess_train))

    def fingerprint(self) -> dict:
        """The fingerprint a cache built from this spec records (a JSON-able dict; computed
        anew each time: it reads the model's weights hash and every image file's size and
        mtime). See :func:`cache_fingerprint` for its keys."""
        image_size = getattr(getattr(self.model, "visual", None), "image_size", None)
        transforms = new_digest()
        transforms.update(f"{stable_repr(self.preprocess_train)}|"
                          f"{stable_repr(self.preprocess_val)}|"
                          f"flip_added={self.flip_added}".encode())
        splits = self.splits
        fingerprint = {
            "format": CACHE_FORMAT,
            "fastprompt_version": __version__,
            "model_name": self.model_name,
            "model_weights": model_weights_hash(self.model),
            "image_size": list(image_size) if isinstance(image_size, (tuple, list))
            else image_size,
            "transforms": transforms.hexdigest(),
            "views": self.views,
            "num_classes": splits.num_classes,
            "num_train_images": len(self.train),
            "num_test_images": len(splits.test),
            "num_val_images": len(splits.val),
            "shots": self.shots,
            "seed": self.seed,
            "noise_rate": float(self.noise_rate),
            "noise_type": self.noise_type,
            "data": data_hash(splits.classnames, {
                "train": [(p, y, n) for (p, y), n in zip(self.train, self.noisy_labels)],
                "test": list(splits.test), "val": list(splits.val)}),
        }
        if self.noise_per_class:
            # Only when set (0 is no noise, as None): every other cache keeps the fingerprint
            # it had before the per-class protocol existed, and is not rebuilt.
            fingerprint["noise_per_class"] = self.noise_per_class
        return fingerprint


def as_spec(spec, args: tuple = (), kwargs: dict | None = None) -> CacheSpec:
    """``spec`` when it is a :class:`CacheSpec` (and nothing else is given); else the spec of
    the 0.1 argument list ``spec, *args, **kwargs`` (``model, model_name, preprocess_train,
    preprocess_val, splits, views=..., ...``; ``spec`` None when the model came by keyword)."""
    kwargs = kwargs or {}
    if isinstance(spec, CacheSpec):
        if args or kwargs:
            given = ", ".join([*(type(a).__name__ for a in args), *kwargs])
            raise TypeError(f"spec: a CacheSpec takes no further arguments (got {given}); "
                            "change it with dataclasses.replace(spec, ...)")
        return spec
    if spec is None:
        return CacheSpec(*args, **kwargs)
    if not args and not kwargs:
        raise TypeError(f"spec: expected a CacheSpec (or the model and the other arguments of "
                        f"one), got {type(spec).__name__}")
    return CacheSpec(spec, *args, **kwargs)


def cache_fingerprint(spec: CacheSpec | torch.nn.Module | None = None, *args,
                      **spec_args) -> dict:
    """The fingerprint a cache built from ``spec`` records (a JSON-able dict); also callable as
    in 0.1, ``cache_fingerprint(model, model_name, preprocess_train, preprocess_val, splits,
    views=..., shots=..., noise_rate=..., noise_type=..., noise_per_class=..., seed=...,
    add_flip=...)``.

    Keys: ``format``, ``fastprompt_version``, ``model_name``, ``model_weights``
    (:func:`~fastprompt.models.weights.model_weights_hash`), ``image_size``, ``transforms``
    (hash of both transforms' reprs and whether a flip is added), ``views``, ``num_classes``,
    ``num_{train,test,val}_images``, ``shots``, ``seed``, ``noise_rate``, ``noise_type``,
    ``noise_per_class`` (only when it is set and not 0), and ``data``: a hash of the class
    names and, per split, every image's path, size, mtime and labels (clean and noisy). Two
    caches are interchangeable exactly when their fingerprints are equal but for
    ``fastprompt_version``, which records the version that built the cache
    (``same_fingerprint``): a new version of fastprompt reuses the caches of an older one (the
    cache ``format`` changes when the layout does).
    """
    return as_spec(spec, args, spec_args).fingerprint()


# Fingerprint entries that record how a cache was made without making it another cache.
RECORD_ONLY_KEYS = ("fastprompt_version",)


def same_fingerprint(a: dict, b: dict) -> bool:
    """Whether caches of fingerprints ``a`` and ``b`` are interchangeable."""
    return ({k: v for k, v in a.items() if k not in RECORD_ONLY_KEYS}
            == {k: v for k, v in b.items() if k not in RECORD_ONLY_KEYS})


def check_path(path) -> None:
    """A cache file's path: a str or os.PathLike (TypeError otherwise)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")


def check_run_options(num_workers, progress) -> None:
    """How a build runs, which never changes what it writes: DataLoader workers and the
    progress display (True, False or None)."""
    check_int("num_workers", num_workers, 0)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool or None, got {type(progress).__name__}")
