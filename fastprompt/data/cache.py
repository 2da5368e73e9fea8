"""The feature cache: the frozen image encoder runs once over a data set, and training reads the
features from one memory-mapped file.

Training images get ``views`` augmented views each (``preprocess_train``, plus a horizontal flip
when that transform has none, as CoOp trains), seeded per (image, view) so a rebuild is
bit-identical; test and validation images get one plain view (``preprocess_val``).

File format: one safetensors file (chosen over ``torch.save``: no pickle, the header — and with
it the fingerprint — is read without touching the data, and ``safe_open`` memory-maps the tensors,
so loading costs nothing until rows are used). Tensors, with ``M`` training images, ``K`` views,
``T`` test and ``V`` validation images, ``D`` the feature dimension:

=======================  ==============  =====================================================
``train_features``       (K*M, D) fp16   ``encode_image`` output, not normalised. Row
                                         ``v*M + m`` is view ``v`` of training image ``m``
                                         (view-major: one view of every image is a contiguous
                                         block).
``train_labels``         (K*M,) int64    the (possibly noisy) training label of the row's image
``train_clean_labels``   (K*M,) int64    its true label, for reporting
``train_sample_index``   (K*M,) int64    ``m``: the source image (indexes instance-wise soft
                                         labels, one row per image)
``train_view_index``     (K*M,) int64    ``v``
``test_features``        (T, D) fp16     one ``preprocess_val`` view per test image
``test_labels``          (T,) int64      clean labels
``val_features``         (V, D) fp16     as test (V may be 0)
``val_labels``           (V,) int64
``{train,test,val}_paths``  uint8        the image paths, ``os.fsencode``-d, NUL-separated
=======================  ==============  =====================================================

Metadata (strings): ``fastprompt.format`` (:data:`CACHE_FORMAT`), ``fastprompt.fingerprint``
(JSON, see :func:`cache_fingerprint`), ``fastprompt.classnames`` (JSON list) and
``fastprompt.checksum`` (BLAKE2b of every tensor's name, dtype, shape and bytes). Features are
stored as float16 (half the disk and page-cache footprint; CLIP features are O(1), far inside
float16's range, and a non-finite value fails the build).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from fastprompt._io import (atomic_path, exclusive_lock, progress_bar, tensor_checksum,
                            update_tensor_hash, write_json_atomic)
from fastprompt.data.folders import DatasetSplits, Sample, _check_seed
from fastprompt.data.sampling import NOISE_TYPES, add_label_noise, few_shot_subset

CACHE_FORMAT = "fastprompt.feature_cache/1"
DEFAULT_VIEWS = 8
logger = logging.getLogger("fastprompt.data")

_INDEX_KEYS = ("train_labels", "train_clean_labels", "train_sample_index", "train_view_index",
               "test_labels", "val_labels")
_FEATURE_KEYS = ("train_features", "test_features", "val_features")
_PATH_KEYS = ("train_paths", "test_paths", "val_paths")


@dataclass(frozen=True)
class FeatureCache:
    """Cached image features, labels and indices (tensors memory-mapped from ``path``).

    See the module docstring for the layout. ``train_labels`` are the labels to train on
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


# ----------------------------------------------------------------------------------------------
# Fingerprint


def _digest() -> "hashlib.blake2b":
    return hashlib.blake2b(digest_size=16)


WEIGHTS_SOURCE_ATTR = "_fastprompt_weights_source"
# Set on a model created without its image tower: the full model's hash, computed before.
WEIGHTS_HASH_ATTR = "_fastprompt_weights_hash"


def _hash_memo_path() -> str:
    base = os.environ.get("FASTPROMPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastprompt")
    return os.path.join(base, "weights-hashes.json")


def _read_memo() -> dict:
    try:
        with open(_hash_memo_path(), encoding="utf-8") as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def remembered_weights_hash(model: torch.nn.Module) -> str | None:
    """``model_weights_hash(model)`` when it is known without hashing: set on a model created
    without its image tower, or remembered for the file the model was loaded from; else None."""
    digest = getattr(model, WEIGHTS_HASH_ATTR, None)
    if digest is not None:
        return digest
    source = getattr(model, WEIGHTS_SOURCE_ATTR, None)
    if source is None:
        return None
    known = _read_memo().get(json.dumps(source))
    return known if isinstance(known, str) else None


def model_weights_hash(model: torch.nn.Module) -> str:
    """BLAKE2b of the image tower's state (every tensor's name, dtype, shape and bytes).

    Only ``model.visual`` (the whole model when it has none) is hashed: it alone determines the
    image features. About a second per GB of weights, on CPU; so for a model that
    ``fastprompt.models.create_model`` loaded from a file, the hash is remembered (in
    ``$FASTPROMPT_CACHE_DIR`` or ``~/.cache/fastprompt``) by the file's path, size and
    modification time, the model name and the precision, and computed again only when one of
    those changes. (Such a model is frozen; changing its weights in place is not noticed.)
    """
    known = remembered_weights_hash(model)
    if known is not None:
        return known
    source = getattr(model, WEIGHTS_SOURCE_ATTR, None)
    key = json.dumps(source) if source is not None else None
    tower = getattr(model, "visual", model)
    h = _digest()
    for name, t in sorted(tower.state_dict().items()):
        update_tensor_hash(h, name, t)
    digest = h.hexdigest()
    if key is not None:
        memo = _read_memo()
        memo[key] = digest
        try:  # a memo only: an unwritable cache folder costs the next call a second, no more
            write_json_atomic(_hash_memo_path(), memo)
        except OSError:
            pass
    return digest


def _stable_repr(obj) -> str:
    # Drop memory addresses ("<function f at 0x7f...>") so a lambda in a transform does not make
    # every run look different.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _has_flip(transform) -> bool:
    from torchvision.transforms import RandomHorizontalFlip
    from torchvision.transforms import v2
    steps = getattr(transform, "transforms", [transform])
    return any(isinstance(t, (RandomHorizontalFlip, v2.RandomHorizontalFlip)) for t in steps)


def _data_hash(classnames: list[str], parts: dict[str, list[tuple]]) -> str:
    h = _digest()
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


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")


@dataclass(frozen=True)
class _Plan:
    """What will be cached: the training subset with its noisy labels, and the fingerprint."""
    train: list[Sample]
    noisy_labels: list[int]
    fingerprint: dict
    add_flip: bool


def _plan(model, model_name, preprocess_train, preprocess_val, splits, *, views, shots,
          noise_rate, noise_type, seed, add_flip) -> _Plan:
    from fastprompt import __version__
    if not isinstance(splits, DatasetSplits):
        raise TypeError(f"splits: expected a DatasetSplits, got {type(splits).__name__}")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "encode_image"):
        raise TypeError(f"model: expected an open_clip model with encode_image, got "
                        f"{type(model).__name__}")
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name: expected a non-empty str, got {model_name!r}")
    for name, t in (("preprocess_train", preprocess_train), ("preprocess_val", preprocess_val)):
        if not callable(t):
            raise TypeError(f"{name}: expected a callable image transform, got {type(t).__name__}")
    _check_int("views", views, 1)
    _check_seed(seed)
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type: must be one of {NOISE_TYPES}, got {noise_type!r}")
    if not isinstance(add_flip, bool):
        raise TypeError(f"add_flip: expected a bool, got {type(add_flip).__name__}")

    train = list(splits.train) if shots is None else few_shot_subset(
        splits.train, shots, seed=seed, classnames=splits.classnames)
    clean = [y for _, y in train]
    noisy = add_label_noise(clean, splits.num_classes, noise_rate, noise_type, seed=seed)
    flip = add_flip and not _has_flip(preprocess_train)
    image_size = getattr(getattr(model, "visual", None), "image_size", None)
    transforms = _digest()
    transforms.update(f"{_stable_repr(preprocess_train)}|{_stable_repr(preprocess_val)}|"
                      f"flip_added={flip}".encode())
    fingerprint = {
        "format": CACHE_FORMAT,
        "fastprompt_version": __version__,
        "model_name": model_name,
        "model_weights": model_weights_hash(model),
        "image_size": list(image_size) if isinstance(image_size, (tuple, list)) else image_size,
        "transforms": transforms.hexdigest(),
        "views": views,
        "num_classes": splits.num_classes,
        "num_train_images": len(train),
        "num_test_images": len(splits.test),
        "num_val_images": len(splits.val),
        "shots": shots,
        "seed": seed,
        "noise_rate": float(noise_rate),
        "noise_type": noise_type,
        "data": _data_hash(splits.classnames, {
            "train": [(p, y, n) for (p, y), n in zip(train, noisy)],
            "test": list(splits.test), "val": list(splits.val)}),
    }
    return _Plan(train, noisy, fingerprint, flip)


def cache_fingerprint(model: torch.nn.Module, model_name: str, preprocess_train: Callable,
                      preprocess_val: Callable, splits: DatasetSplits, *,
                      views: int = DEFAULT_VIEWS, shots: int | None = None,
                      noise_rate: float = 0.0, noise_type: str = "symmetric", seed: int = 1,
                      add_flip: bool = True) -> dict:
    """The fingerprint a cache built from these arguments records (a JSON-able dict).

    Keys: ``format``, ``fastprompt_version``, ``model_name``, ``model_weights``
    (:func:`model_weights_hash`), ``image_size``, ``transforms`` (hash of both transforms'
    reprs and whether a flip is added), ``views``, ``num_classes``, ``num_{train,test,val}_images``,
    ``shots``, ``seed``, ``noise_rate``, ``noise_type``, and ``data``: a hash of the class names
    and, per split, every image's path, size, mtime and labels (clean and noisy). Two caches
    are interchangeable exactly when their fingerprints are equal.
    """
    return _plan(model, model_name, preprocess_train, preprocess_val, splits, views=views,
                 shots=shots, noise_rate=noise_rate, noise_type=noise_type, seed=seed,
                 add_flip=add_flip).fingerprint


# ----------------------------------------------------------------------------------------------
# Encoding


def _view_seed(seed: int, image: int, view: int) -> int:
    h = hashlib.blake2b(f"fastprompt.view:{seed}:{image}:{view}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many exception types for bad files
        raise ValueError(f"splits: image file {path!r} cannot be decoded ({type(e).__name__}: "
                         f"{e})") from None


class _ImageViews(torch.utils.data.Dataset):
    """Item ``m``: a (views, C, H, W) stack of transformed views of image ``m``, and ``m``."""

    def __init__(self, paths: list[str], transform: Callable, transform_name: str, views: int,
                 seed: int | None, flip: bool):
        self.paths, self.transform, self.transform_name = paths, transform, transform_name
        self.views, self.seed, self.flip = views, seed, flip

    def __len__(self) -> int:
        return len(self.paths)

    def _apply(self, img) -> Tensor:
        x = self.transform(img)
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else \
                type(x).__name__
            raise TypeError(f"{self.transform_name}: expected a transform returning a C x H x W "
                            f"tensor, got {got}")
        # A flip after Normalize equals one before it (per-channel ops commute with it).
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x

    def __getitem__(self, m: int):
        img = _open_rgb(self.paths[m])
        if self.seed is None:
            return self._apply(img).unsqueeze(0), m
        out = []
        for v in range(self.views):
            # The transforms draw from torch's global generator: seed it per (image, view) and
            # leave the caller's generator state untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_view_seed(self.seed, m, v))
                out.append(self._apply(img))
        return torch.stack(out), m


def _encode(model, dataset: _ImageViews, *, batch_size: int, num_workers: int, bar,
            device: torch.device, dtype: torch.dtype) -> Tensor:
    """Features of every view, view-major: (views * len(dataset), D) float16."""
    n, k = len(dataset), dataset.views
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=max(1, batch_size // k), shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0))  # else it draws its base seed globally
    out = None
    for images, index in loader:
        b = images.shape[0]
        x = images.reshape(b * k, *images.shape[2:]).to(device, dtype, non_blocking=True)
        feats = model.encode_image(x).float().reshape(b, k, -1)
        if not torch.isfinite(feats).all():
            raise ValueError(f"model: image features of {dataset.paths[int(index[0])]!r} "
                             "(or its batch) are not finite")
        feats = feats.half().cpu()
        if not torch.isfinite(feats).all():
            raise ValueError("model: image features overflow float16 (|x| > 65504)")
        if out is None:
            out = torch.empty(k, n, feats.shape[-1], dtype=torch.float16)
        out[:, index] = feats.transpose(0, 1)
        if bar is not None:
            bar.update(b * k)
    if out is None:
        return torch.empty(0, 0, dtype=torch.float16)
    return out.reshape(k * n, -1)


def _paths_tensor(paths: list[str]) -> Tensor:
    blob = b"\0".join(os.fsencode(p) for p in paths)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else \
        torch.empty(0, dtype=torch.uint8)


def _paths_from(t: Tensor, count: int) -> list[str]:
    if count == 0:
        return []
    return [os.fsdecode(p) for p in t.numpy().tobytes().split(b"\0")]


def _atomic_save(path: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # a full disk or a file size limit, in safetensors' words
            raise OSError(f"cannot write the feature cache {path!r}: {e}") from e


def build_feature_cache(path, model: torch.nn.Module, model_name: str,
                        preprocess_train: Callable, preprocess_val: Callable,
                        splits: DatasetSplits, *, views: int = DEFAULT_VIEWS,
                        shots: int | None = None, noise_rate: float = 0.0,
                        noise_type: str = "symmetric", seed: int = 1, add_flip: bool = True,
                        batch_size: int = 128, num_workers: int = 0,
                        progress: bool | None = None) -> FeatureCache:
    """Encode a data set with the frozen image tower and write the cache file at ``path``.

    The training split is first reduced to ``shots`` images per class (all when None) and its
    labels corrupted at ``noise_rate`` (see :func:`~fastprompt.data.few_shot_subset` and
    :func:`~fastprompt.data.add_label_noise`; both seeded from ``seed``). Each training image
    then gets ``views`` views from ``preprocess_train`` — plus a random horizontal flip when
    ``add_flip`` and the transform has none — and each test/val image one from
    ``preprocess_val``. The model runs where its parameters are, in their dtype, under
    ``torch.inference_mode``, ``batch_size`` views at a time (rounded down to whole images);
    ``num_workers`` > 0 decodes in DataLoader workers (the result does not depend on it).
    ``progress``: a tqdm bar; None shows it when stderr is a terminal and prints progress
    lines otherwise; False shows nothing. A lock file beside ``path`` (``.NAME.lock``) keeps two
    processes from building the same cache at once (the second gets ``LockedError``).

    The file is written to a temporary name and renamed into place. Returns the loaded cache.
    Note that open_clip's training transform crops with scale (0.9, 1.0); CoOp crops with
    (0.08, 1.0): pass your own ``preprocess_train`` to match it.
    """
    _check_run_args(path, batch_size, num_workers, progress)
    plan = _plan(model, model_name, preprocess_train, preprocess_val, splits, views=views,
                 shots=shots, noise_rate=noise_rate, noise_type=noise_type, seed=seed,
                 add_flip=add_flip)
    with cache_lock(path):
        return _build(path, model, preprocess_train, preprocess_val, splits, plan,
                      batch_size=batch_size, num_workers=num_workers, progress=progress)


def cache_lock(path):
    """The exclusive lock of building the cache file ``path``."""
    path = os.path.abspath(os.fspath(path))
    lock = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")
    return exclusive_lock(lock, f"feature cache {path!r}", remove=True)


def _check_run_args(path, batch_size, num_workers, progress) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool or None, got {type(progress).__name__}")


def _build(path, model, preprocess_train, preprocess_val, splits: DatasetSplits, plan: _Plan, *,
           batch_size: int, num_workers: int, progress: bool | None) -> FeatureCache:
    views, seed = plan.fingerprint["views"], plan.fingerprint["seed"]
    path = os.path.abspath(os.fspath(path))
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    train_paths = [p for p, _ in plan.train]
    test_paths = [p for p, _ in splits.test]
    val_paths = [p for p, _ in splits.val]
    total = views * len(train_paths) + len(test_paths) + len(val_paths)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), progress_bar(total, "caching features", progress) as bar:
            enc = dict(batch_size=batch_size, num_workers=num_workers, bar=bar, device=device,
                       dtype=dtype)
            train_features = _encode(model, _ImageViews(train_paths, preprocess_train,
                                                        "preprocess_train", views, seed,
                                                        plan.add_flip), **enc)
            dim = train_features.shape[1]
            evals = []
            for paths in (test_paths, val_paths):
                plain = _ImageViews(paths, preprocess_val, "preprocess_val", 1, None, False)
                f = _encode(model, plain, **enc)
                evals.append(f if paths else torch.empty(0, dim, dtype=torch.float16))
    finally:
        model.train(was_training)

    m = len(train_paths)
    clean = torch.tensor([y for _, y in plan.train], dtype=torch.int64)
    tensors = {
        "train_features": train_features,
        "train_labels": torch.tensor(plan.noisy_labels, dtype=torch.int64).repeat(views),
        "train_clean_labels": clean.repeat(views),
        "train_sample_index": torch.arange(m, dtype=torch.int64).repeat(views),
        "train_view_index": torch.arange(views, dtype=torch.int64).repeat_interleave(m),
        "test_features": evals[0],
        "test_labels": torch.tensor([y for _, y in splits.test], dtype=torch.int64),
        "val_features": evals[1],
        "val_labels": torch.tensor([y for _, y in splits.val], dtype=torch.int64),
        "train_paths": _paths_tensor(train_paths),
        "test_paths": _paths_tensor(test_paths),
        "val_paths": _paths_tensor(val_paths),
    }
    metadata = {
        "fastprompt.format": CACHE_FORMAT,
        "fastprompt.fingerprint": json.dumps(plan.fingerprint, sort_keys=True),
        "fastprompt.classnames": json.dumps(list(splits.classnames)),
        "fastprompt.checksum": tensor_checksum(tensors),
    }
    _atomic_save(path, tensors, metadata)
    return load_cache(path, plan.fingerprint, verify=False)


# ----------------------------------------------------------------------------------------------
# Loading


def _fingerprint_difference(cached: dict, expected: dict) -> str:
    keys = sorted(set(cached) | set(expected))
    diffs = [f"{k}: cached {cached.get(k)!r}, expected {expected.get(k)!r}"
             for k in keys if cached.get(k) != expected.get(k)]
    return "; ".join(diffs)


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"path: feature cache {path!r} is truncated or corrupt ({why}); delete it "
                      "and rebuild")


def load_cache(path, expected_fingerprint: dict | None = None, *,
               verify: bool = True) -> FeatureCache:
    """Open a cache file written by :func:`build_feature_cache`; tensors are memory-mapped.

    With ``expected_fingerprint`` (from :func:`cache_fingerprint`), a cache built from a
    different model, data, view count, ... is refused with a ``ValueError`` listing what
    differs. A truncated or damaged file raises ``ValueError`` naming it; ``verify`` also checks
    the content checksum (reads the whole file once). A missing file raises
    ``FileNotFoundError``.

    The tensors map the file: it must not be rewritten in place while they are in use. fastprompt
    never does (a rebuild writes a new file and renames it over the old one, so existing
    mappings keep the old contents).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")
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
                raise _corrupt(path, f"format {meta.get('fastprompt.format')!r}, expected "
                                     f"{CACHE_FORMAT!r}")
            fingerprint = json.loads(meta["fastprompt.fingerprint"])
            classnames = json.loads(meta["fastprompt.classnames"])
            checksum = meta["fastprompt.checksum"]
            if expected_fingerprint is not None and fingerprint != expected_fingerprint:
                raise ValueError(f"path: feature cache {path!r} was built from different inputs "
                                 f"({_fingerprint_difference(fingerprint, expected_fingerprint)})"
                                 "; rebuild it (build_or_load_cache does so)")
            names = set(f.keys())
            expected_names = set(_FEATURE_KEYS) | set(_INDEX_KEYS) | set(_PATH_KEYS)
            if names != expected_names:
                raise _corrupt(path, f"tensors {sorted(names ^ expected_names)} missing or "
                                     "unexpected")
            tensors = {k: f.get_tensor(k) for k in sorted(names)}
    except SafetensorError as e:
        raise _corrupt(path, str(e)) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise _corrupt(path, f"bad metadata: {type(e).__name__}: {e}") from None

    _check_layout(path, tensors, fingerprint, classnames)
    if verify and tensor_checksum(tensors) != checksum:
        raise _corrupt(path, "content checksum mismatch")
    return FeatureCache(
        path=path, fingerprint=fingerprint, classnames=classnames,
        train_paths=_paths_from(tensors["train_paths"], fingerprint["num_train_images"]),
        test_paths=_paths_from(tensors["test_paths"], fingerprint["num_test_images"]),
        val_paths=_paths_from(tensors["val_paths"], fingerprint["num_val_images"]),
        **{k: tensors[k] for k in _FEATURE_KEYS + _INDEX_KEYS})


def _check_layout(path: str, t: dict[str, Tensor], fp: dict, classnames) -> None:
    try:
        m, k = int(fp["num_train_images"]), int(fp["views"])
        n_test, n_val = int(fp["num_test_images"]), int(fp["num_val_images"])
    except (KeyError, TypeError, ValueError) as e:
        raise _corrupt(path, f"bad fingerprint: {e}") from None
    rows = {"train": k * m, "test": n_test, "val": n_val}
    for split, n in rows.items():
        feats = t[f"{split}_features"]
        if feats.dtype != torch.float16 or feats.dim() != 2 or feats.shape[0] != n:
            raise _corrupt(path, f"{split}_features has shape {tuple(feats.shape)} "
                                 f"{feats.dtype}, expected ({n}, D) float16")
    dims = {t[f"{s}_features"].shape[1] for s in rows if rows[s]}
    if len(dims) > 1:
        raise _corrupt(path, f"feature dimensions differ between splits: {sorted(dims)}")
    for key in _INDEX_KEYS:
        n = rows[key.split("_")[0]]
        if t[key].dtype != torch.int64 or tuple(t[key].shape) != (n,):
            raise _corrupt(path, f"{key} has shape {tuple(t[key].shape)} {t[key].dtype}, "
                                 f"expected ({n},) int64")
    if not isinstance(classnames, list) or len(classnames) != fp.get("num_classes"):
        raise _corrupt(path, "class names do not match the fingerprint")
    for key in _PATH_KEYS:
        if t[key].dtype != torch.uint8 or t[key].dim() != 1:
            raise _corrupt(path, f"{key} is not a 1-D uint8 tensor")


def build_or_load_cache(path, model: torch.nn.Module, model_name: str,
                        preprocess_train: Callable, preprocess_val: Callable,
                        splits: DatasetSplits, *, views: int = DEFAULT_VIEWS,
                        shots: int | None = None, noise_rate: float = 0.0,
                        noise_type: str = "symmetric", seed: int = 1, add_flip: bool = True,
                        batch_size: int = 128, num_workers: int = 0,
                        progress: bool | None = None, verify: bool = True) -> FeatureCache:
    """Load the cache at ``path`` if it was built from these exact inputs, else (re)build it.

    Arguments as :func:`build_feature_cache`. A stale, truncated or damaged cache is rebuilt,
    and a warning on the ``fastprompt.data`` logger says why.
    """
    _check_run_args(path, batch_size, num_workers, progress)
    plan = _plan(model, model_name, preprocess_train, preprocess_val, splits, views=views,
                 shots=shots, noise_rate=noise_rate, noise_type=noise_type, seed=seed,
                 add_flip=add_flip)
    if os.path.isfile(os.fspath(path)):  # a valid cache needs no lock (it may be read-only)
        try:
            return load_cache(path, plan.fingerprint, verify=verify)
        except ValueError as e:
            reason = e
    else:
        reason = None
    with cache_lock(path):
        if reason is not None:
            logger.warning("fastprompt: rebuilding the feature cache: %s", reason)
        return _build(path, model, preprocess_train, preprocess_val, splits, plan,
                      batch_size=batch_size, num_workers=num_workers, progress=progress)
