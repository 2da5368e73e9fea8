"""Reading a cache file: :class:`FeatureCache` (tensors memory-mapped), :func:`load_cache` with
its checks of the file's layout and checksum, and the checks of a cache against the model it is
used with (:func:`check_cache_weights`, :func:`load_cache_for`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fastprompt._hashing import tensor_checksum
from fastprompt.data.cache.spec import CACHE_FORMAT, check_path, same_fingerprint
from fastprompt.models.weights import model_weights_hash

INDEX_KEYS = ("train_labels", "train_clean_labels", "train_sample_index", "train_view_index",
              "test_labels", "val_labels")
FEATURE_KEYS = ("train_features", "test_features", "val_features")
PATH_KEYS = ("train_paths", "test_paths", "val_paths")


@dataclass(frozen=True)
class FeatureCache:
    """Cached image features, labels and indices (tensors memory-mapped from ``path``).

    See :mod:`fastprompt.data.cache` for the layout. ``train_labels`` are the labels to train on
    (noisy when label noise was asked for); ``train_clean_labels`` the true ones.
    """
    path: str
    fingerprint: dict
    classnames: list[str]
    train_features: Tensor
    train_labels: Tensor
    train_clean_labels: Tensor
    train_sample_index: Tensor
    train_view_index: Tensor
    test_features: Tensor
    test_labels: Tensor
    val_features: Tensor
    val_labels: Tensor
    train_paths: list[str]
    test_paths: list[str]
    val_paths: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def num_train_images(self) -> int:
        """``M``: training images (rows of an instance-wise soft-label table)."""
        return len(self.train_paths)

    @property
    def views(self) -> int:
        """``K``: augmented views per training image."""
        return int(self.fingerprint["views"])

    @property
    def feature_dim(self) -> int:
        return int(self.train_features.shape[1])


def paths_from(t: Tensor, count: int) -> list[str]:
    """The ``count`` paths of a ``*_paths`` tensor (``os.fsencode``-d, NUL-separated)."""
    if count == 0:
        return []
    return [os.fsdecode(p) for p in t.numpy().tobytes().split(b"\0")]


def fingerprint_difference(cached: dict, expected: dict) -> str:
    """The keys on which two fingerprints differ, with both values, for an error message."""
    keys = sorted(set(cached) | set(expected))
    diffs = [f"{k}: cached {cached.get(k)!r}, expected {expected.get(k)!r}"
             for k in keys if cached.get(k) != expected.get(k)]
    return "; ".join(diffs)


def corrupt(path: str, why: str) -> ValueError:
    """The error of a cache file that cannot be read as one."""
    return ValueError(f"path: feature cache {path!r} is truncated or corrupt ({why}); delete it "
                      "and rebuild")


def load_cache(path, expected_fingerprint: dict | None = None, *,
               verify: bool = True) -> FeatureCache:
    """Open a cache file written by :func:`~fastprompt.data.cache.build_feature_cache`; tensors
    are memory-mapped.

    With ``expected_fingerprint`` (from :func:`~fastprompt.data.cache.cache_fingerprint`), a
    cache built from a different model, data, view count, ... is refused with a ``ValueError``
    listing what differs. A truncated or damaged file raises ``ValueError`` naming it;
    ``verify`` also checks the content checksum (reads the whole file once). A missing file
    raises ``FileNotFoundError``.

    The tensors map the file: it must not be rewritten in place while they are in use. fastprompt
    never does (a rebuild writes a new file and renames it over the old one, so existing
    mappings keep the old contents).
    """
    check_path(path)
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no feature cache at {path!r}")
    if expected_fingerprint is not None and not isinstance(expected_fingerprint, dict):
        raise TypeError(f"expected_fingerprint: expected a dict, got "
                        f"{type(expected_fingerprint).__name__}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fastprompt.format") != CACHE_FORMAT:
                raise corrupt(path, f"format {meta.get('fastprompt.format')!r}, expected "
                                    f"{CACHE_FORMAT!r}")
            fingerprint = json.loads(meta["fastprompt.fingerprint"])
            classnames = json.loads(meta["fastprompt.classnames"])
            checksum = meta["fastprompt.checksum"]
            if (expected_fingerprint is not None
                    and not same_fingerprint(fingerprint, expected_fingerprint)):
                raise ValueError(f"path: feature cache {path!r} was built from different inputs "
                                 f"({fingerprint_difference(fingerprint, expected_fingerprint)})"
                                 "; rebuild it (build_or_load_cache does so)")
            names = set(f.keys())
            expected_names = set(FEATURE_KEYS) | set(INDEX_KEYS) | set(PATH_KEYS)
            if names != expected_names:
                raise corrupt(path, f"tensors {sorted(names ^ expected_names)} missing or "
                                    "unexpected")
            tensors = {k: f.get_tensor(k) for k in sorted(names)}
    except SafetensorError as e:
        raise corrupt(path, str(e)) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise corrupt(path, f"bad metadata: {type(e).__name__}: {e}") from None

    check_layout(path, tensors, fingerprint, classnames)
    if verify and tensor_checksum(tensors) != checksum:
        raise corrupt(path, "content checksum mismatch")
    return FeatureCache(
        path=path, fingerprint=fingerprint, classnames=classnames,
        train_paths=paths_from(tensors["train_paths"], fingerprint["num_train_images"]),
        test_paths=paths_from(tensors["test_paths"], fingerprint["num_test_images"]),
        val_paths=paths_from(tensors["val_paths"], fingerprint["num_val_images"]),
        **{k: tensors[k] for k in FEATURE_KEYS + INDEX_KEYS})


def check_layout(path: str, t: dict[str, Tensor], fp: dict, classnames) -> None:
    """The tensors of a cache file against its fingerprint: shapes, dtypes, class names
    (``ValueError`` saying the file is corrupt otherwise)."""
    try:
        m, k = int(fp["num_train_images"]), int(fp["views"])
        n_test, n_val = int(fp["num_test_images"]), int(fp["num_val_images"])
    except (KeyError, TypeError, ValueError) as e:
        raise corrupt(path, f"bad fingerprint: {e}") from None
    rows = {"train": k * m, "test": n_test, "val": n_val}
    for split, n in rows.items():
        feats = t[f"{split}_features"]
        if feats.dtype != torch.float16 or feats.dim() != 2 or feats.shape[0] != n:
            raise corrupt(path, f"{split}_features has shape {tuple(feats.shape)} "
                                f"{feats.dtype}, expected ({n}, D) float16")
    dims = {t[f"{s}_features"].shape[1] for s in rows if rows[s]}
    if len(dims) > 1:
        raise corrupt(path, f"feature dimensions differ between splits: {sorted(dims)}")
    for key in INDEX_KEYS:
        n = rows[key.split("_")[0]]
        if t[key].dtype != torch.int64 or tuple(t[key].shape) != (n,):
            raise corrupt(path, f"{key} has shape {tuple(t[key].shape)} {t[key].dtype}, "
                                f"expected ({n},) int64")
    if not isinstance(classnames, list) or len(classnames) != fp.get("num_classes"):
        raise corrupt(path, "class names do not match the fingerprint")
    for key in PATH_KEYS:
        if t[key].dtype != torch.uint8 or t[key].dim() != 1:
            raise corrupt(path, f"{key} is not a 1-D uint8 tensor")


# ----------------------------------------------------------------------------------------------
# A cache against the model it is used with. The messages name the command line's flags
# (--cache, --rebuild-cache, ...): the command line is where these files are named.


def check_cache_weights(path, model: torch.nn.Module, rebuild: bool) -> None:
    """Refuse an existing cache file built with other weights than ``model``'s (unless
    ``rebuild``), before :func:`~fastprompt.data.cache.build_or_load_cache` would silently
    rebuild it over. A missing or damaged file passes (it is built, or rebuilt with a warning
    that says why)."""
    if rebuild or not os.path.isfile(path):
        return
    try:
        cached = load_cache(path, verify=False).fingerprint.get("model_weights")
    except ValueError:
        return  # damaged: rebuilt, with a warning that says why
    if cached != model_weights_hash(model):
        raise ValueError(f"--cache: {path} was built with other model weights than "
                         "--model/--pretrained give; pass --rebuild-cache to rebuild it, or "
                         "another --cache file")


def load_cache_for(path, model: torch.nn.Module, model_name: str) -> FeatureCache:
    """The cache file ``path`` (checksum verified), refused unless it was built with the model
    ``model_name`` and ``model``'s weights: a cache named alone, to train on without data."""
    cache = load_cache(path)
    if cache.fingerprint.get("model_name") != model_name:
        raise ValueError(f"--cache: {path} was built with model "
                         f"{cache.fingerprint.get('model_name')!r}, not {model_name!r}")
    if cache.fingerprint.get("model_weights") != model_weights_hash(model):
        raise ValueError(f"--cache: {path} was built with other weights of {model_name!r} than "
                         "--pretrained gives; rebuild it with --data DIR --rebuild-cache")
    return cache
