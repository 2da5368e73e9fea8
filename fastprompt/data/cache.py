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

Building: :func:`plan_feature_cache` fixes the images, views and seeds and splits them into
chunks of whole encoder batches; :func:`encode_cache_chunks` writes each chunk's features to
its own file in ``<path>.chunks/`` (format :data:`CHUNK_FORMAT`: one tensor ``features``,
(views, images, D) float16, with the fingerprint, the chunk's place and a checksum); and
:func:`merge_cache_chunks` streams them into the cache file, then removes them. Any number of
processes may encode chunks (``torchrun`` ranks, a Ray cluster); a chunk file is written once,
atomically, so a killed build resumes from the ones it left.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from fastprompt._checks import check_int, check_seed
from fastprompt._hashing import new_digest, tensor_checksum
from fastprompt._io import (atomic_path, atomic_write, exclusive_lock, progress_bar,
                            remove_if_present, remove_stale_temporaries)
from fastprompt.data.folders import DatasetSplits, Sample
from fastprompt.data.safetensors_stream import (PIECE_BYTES, TensorSource, file_pieces, raw_bytes,
                                                read_header, streaming_checksum, write_streaming)
from fastprompt.data.sampling import NOISE_TYPES, add_label_noise, few_shot_subset
from fastprompt.models.weights import model_weights_hash

CACHE_FORMAT = "fastprompt.feature_cache/1"
CHUNK_FORMAT = "fastprompt.feature_cache_chunk/1"
DEFAULT_VIEWS = 8
# Views per chunk file: 16 MiB of features at D = 512, a few seconds of a GPU's work.
DEFAULT_CHUNK_SIZE = 16384
# How long a process waits for the others' chunk files (or rank 0's merge) without any arriving.
CHUNK_WAIT_SECONDS = 1800.0
_POLL_SECONDS = 0.5
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
    check_int("views", views, 1)
    check_seed(seed)
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
    transforms = new_digest()
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


def _encode_batch(model, images: Tensor, index: Tensor, paths: list[str], *,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
    """Features of a batch of (b, views, C, H, W) images: (b, views, D) float16 on the host."""
    b, k = images.shape[:2]
    x = images.reshape(b * k, *images.shape[2:]).to(device, dtype, non_blocking=True)
    feats = model.encode_image(x).float().reshape(b, k, -1)
    if not torch.isfinite(feats).all():
        raise ValueError(f"model: image features of {paths[int(index[0])]!r} (or its batch) are "
                         "not finite")
    feats = feats.half().cpu()
    if not torch.isfinite(feats).all():
        raise ValueError("model: image features overflow float16 (|x| > 65504)")
    return feats


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


# ----------------------------------------------------------------------------------------------
# The plan and its chunks


def _split_views(split: str, views: int) -> int:
    """Views per image of a split: the training images have ``views``, the others one."""
    return views if split == "train" else 1


def _images_per_batch(batch_size: int, views: int) -> int:
    """Images per encoder batch: ``batch_size`` views rounded down to whole images."""
    return max(1, batch_size // views)


class CacheChunk(NamedTuple):
    """Images ``start`` to ``stop`` (exclusive) of one split, with all their views: the unit of
    work of a build, encoded into a file of its own."""
    index: int
    split: str
    start: int
    stop: int


@dataclass(frozen=True)
class CachePlan:
    """Everything a cache build will do, fixed before any image is encoded: the file, its
    fingerprint, the images of each split with their labels, the transforms, and the chunks.

    Made by :func:`plan_feature_cache`; every process of a distributed build makes its own
    (the plan is a pure function of the arguments), so no process sends another anything.
    """
    path: str
    fingerprint: dict
    classnames: list[str]
    train: list[Sample]
    noisy_labels: list[int]
    test: list[Sample]
    val: list[Sample]
    preprocess_train: Callable
    preprocess_val: Callable
    add_flip: bool
    batch_size: int
    chunks: tuple[CacheChunk, ...]

    @property
    def views(self) -> int:
        return int(self.fingerprint["views"])

    @property
    def chunk_dir(self) -> str:
        """The folder of the chunk files: ``<cache file>.chunks``, removed after the merge."""
        return self.path + ".chunks"

    def chunk_path(self, index: int) -> str:
        return os.path.join(self.chunk_dir, f"{index:06d}.safetensors")

    def images(self, split: str) -> list[Sample]:
        return {"train": self.train, "test": self.test, "val": self.val}[split]

    def split_views(self, split: str) -> int:
        return _split_views(split, self.views)

    def encoder_batch(self, split: str) -> int:
        return _images_per_batch(self.batch_size, self.split_views(split))


def _chunk_layout(sizes: dict[str, int], views: int, batch_size: int,
                  chunk_size: int) -> tuple[CacheChunk, ...]:
    chunks = []
    for split, n in sizes.items():
        k = _split_views(split, views)
        per_batch = _images_per_batch(batch_size, k)
        # Whole encoder batches, so a chunk's batches are the ones a single pass would run.
        per_chunk = per_batch * max(1, chunk_size // (per_batch * k))
        for start in range(0, n, per_chunk):
            chunks.append(CacheChunk(len(chunks), split, start, min(start + per_chunk, n)))
    return tuple(chunks)


def plan_feature_cache(path, model: torch.nn.Module, model_name: str,
                       preprocess_train: Callable, preprocess_val: Callable,
                       splits: DatasetSplits, *, views: int = DEFAULT_VIEWS,
                       shots: int | None = None, noise_rate: float = 0.0,
                       noise_type: str = "symmetric", seed: int = 1, add_flip: bool = True,
                       batch_size: int = 128,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> CachePlan:
    """The plan of building the cache ``path`` (arguments as :func:`build_feature_cache`):
    its fingerprint and its chunks, to be encoded by :func:`encode_cache_chunks` (in any
    processes, on any machines sharing the folder) and merged by :func:`merge_cache_chunks`.

    ``chunk_size``: views per chunk, rounded down to whole encoder batches of ``batch_size``
    views (at least one batch). Chunks never depend on how many processes encode them, so the
    features are the same bit for bit however the work is spread, and a chunk file written by
    an interrupted build is reused by the next one with the same arguments.
    """
    _check_run_args(path, batch_size, 0, None)
    check_int("chunk_size", chunk_size, 1)
    p = _plan(model, model_name, preprocess_train, preprocess_val, splits, views=views,
              shots=shots, noise_rate=noise_rate, noise_type=noise_type, seed=seed,
              add_flip=add_flip)
    sizes = {"train": len(p.train), "test": len(splits.test), "val": len(splits.val)}
    return CachePlan(
        path=os.path.abspath(os.fspath(path)), fingerprint=p.fingerprint,
        classnames=list(splits.classnames), train=p.train, noisy_labels=p.noisy_labels,
        test=list(splits.test), val=list(splits.val), preprocess_train=preprocess_train,
        preprocess_val=preprocess_val, add_flip=p.add_flip, batch_size=batch_size,
        chunks=_chunk_layout(sizes, views, batch_size, chunk_size))


# ----------------------------------------------------------------------------------------------
# Chunk files: one safetensors file per chunk, ``features`` (views, images, D) float16, with the
# build's fingerprint, the chunk's place and a checksum in the metadata.


def _chunk_metadata(plan: CachePlan, chunk: CacheChunk) -> dict[str, str]:
    layout = {"index": chunk.index, "num_chunks": len(plan.chunks), "split": chunk.split,
              "start": chunk.start, "stop": chunk.stop, "views": plan.split_views(chunk.split),
              "encoder_batch": plan.encoder_batch(chunk.split)}
    return {"fastprompt.format": CHUNK_FORMAT,
            "fastprompt.fingerprint": json.dumps(plan.fingerprint, sort_keys=True),
            "fastprompt.chunk": json.dumps(layout, sort_keys=True)}


class _ChunkFile(NamedTuple):
    path: str
    data_start: int
    shape: tuple[int, int, int]
    checksum: str

    def view_source(self, view: int) -> Iterator[memoryview]:
        """The bytes of one view's features (images x D)."""
        _, n, d = self.shape
        per_view = n * d * 2
        return file_pieces(self.path, self.data_start + view * per_view, per_view)

    def source(self) -> TensorSource:
        nbytes = self.shape[0] * self.shape[1] * self.shape[2] * 2
        return TensorSource("features", torch.float16, self.shape,
                            lambda: file_pieces(self.path, self.data_start, nbytes))


def _open_chunk(plan: CachePlan, chunk: CacheChunk) -> _ChunkFile:
    """The chunk's file, its header checked against the plan; ``ValueError`` saying why not
    (``FileNotFoundError`` when there is none)."""
    path = plan.chunk_path(chunk.index)
    header, data_start = read_header(path)
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    expected = _chunk_metadata(plan, chunk)
    for key in ("fastprompt.format", "fastprompt.fingerprint", "fastprompt.chunk"):
        if meta.get(key) != expected[key]:
            raise ValueError(f"written by another build ({key} differs)")
    info = header.get("features")
    shape = info.get("shape") if isinstance(info, dict) else None
    k, n = plan.split_views(chunk.split), chunk.stop - chunk.start
    if (not isinstance(info, dict) or info.get("dtype") != "F16" or not isinstance(shape, list)
            or len(shape) != 3 or shape[:2] != [k, n] or not isinstance(shape[2], int)
            or shape[2] < 0):
        raise ValueError(f"features are not ({k}, {n}, D) float16")
    nbytes = k * n * shape[2] * 2
    if info.get("data_offsets") != [0, nbytes] or os.path.getsize(path) != data_start + nbytes:
        raise ValueError("truncated or has extra bytes")
    return _ChunkFile(path, data_start, tuple(shape), str(meta.get("fastprompt.checksum")))


def _chunk_problem(plan: CachePlan, chunk: CacheChunk) -> str | None:
    """Why the chunk's file cannot be used (None when it can): missing, from another build or
    layout, truncated, or its content does not match its checksum (reads the whole file)."""
    try:
        f = _open_chunk(plan, chunk)
        if streaming_checksum([f.source()]) != f.checksum:
            return "content checksum mismatch"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return str(e)
    return None


def _file_key(path: str):
    """What changes when a file is replaced or rewritten (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _write_chunk(plan: CachePlan, chunk: CacheChunk, features: Tensor) -> None:
    tensors = {"features": features}
    metadata = {**_chunk_metadata(plan, chunk), "fastprompt.checksum": tensor_checksum(tensors)}
    _atomic_save(plan.chunk_path(chunk.index), tensors, metadata)


def encode_cache_chunks(plan: CachePlan, chunks, model: torch.nn.Module, *,
                        num_workers: int = 0, progress: bool | None = None) -> list[int]:
    """Encode the chunks ``chunks`` (indices into ``plan.chunks``) of ``plan`` with ``model``
    and write each to its file (atomically: a killed process leaves whole chunk files only).
    A chunk whose file is already valid (same fingerprint and place, checksum intact) is
    skipped; a damaged or foreign one is encoded again. Returns the indices encoded.

    The model runs where its parameters are, in their dtype, under ``torch.inference_mode``.
    Any process may encode any chunks: spread ``range(len(plan.chunks))`` over the workers
    (e.g. worker r of W takes ``r::W``), then call :func:`merge_cache_chunks` once.
    """
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan: expected a CachePlan, got {type(plan).__name__}")
    _check_run_args(plan.path, plan.batch_size, num_workers, progress)
    ids = list(chunks)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(plan.chunks):
            raise ValueError(f"chunks: {i!r} is not a chunk index of the plan (0 to "
                             f"{len(plan.chunks) - 1})")
    return _encode_chunks(plan, ids, model, num_workers=num_workers, progress=progress,
                          verified={})


def _encode_chunks(plan: CachePlan, ids: list[int], model, *, num_workers: int,
                   progress: bool | None, verified: dict) -> list[int]:
    """As :func:`encode_cache_chunks`; records in ``verified`` the file key of every chunk file
    found valid or written."""
    todo = []
    for i in ids:
        problem = _chunk_problem(plan, plan.chunks[i])
        if problem is None:
            verified[i] = _file_key(plan.chunk_path(i))
        else:
            if problem != "missing":
                logger.warning("fastprompt: encoding cache chunk %d again: %s (%s)", i, problem,
                               plan.chunk_path(i))
            todo.append(plan.chunks[i])
    if not todo:
        return []

    def views(chunks):
        return sum((c.stop - c.start) * plan.split_views(c.split) for c in chunks)
    rank, world = torchrun_rank()
    desc = "caching features" + (f" (rank {rank} of {world})" if world > 1 else "")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        # A resumed build's bar starts at the views its valid chunk files already hold.
        with torch.inference_mode(), progress_bar(
                views(plan.chunks[i] for i in ids), desc, progress,
                initial=views(plan.chunks[i] for i in ids) - views(todo)) as bar:
            for split in ("train", "test", "val"):
                mine = [c for c in todo if c.split == split]
                if mine:
                    _encode_split(plan, split, mine, model, num_workers=num_workers,
                                  device=device, dtype=dtype, bar=bar, verified=verified)
    except BaseException:
        try:  # the chunk files written stay for the next build; an empty folder does not
            os.rmdir(plan.chunk_dir)
        except OSError:
            pass
        raise
    finally:
        model.train(was_training)
    return [c.index for c in todo]


def _encode_split(plan: CachePlan, split: str, chunks: list[CacheChunk], model, *,
                  num_workers: int, device, dtype, bar, verified: dict) -> None:
    paths = [p for p, _ in plan.images(split)]
    k = plan.split_views(split)
    if split == "train":
        dataset = _ImageViews(paths, plan.preprocess_train, "preprocess_train", k,
                              plan.fingerprint["seed"], plan.add_flip)
    else:
        dataset = _ImageViews(paths, plan.preprocess_val, "preprocess_val", 1, None, False)
    per = plan.encoder_batch(split)
    batches = [list(range(s, min(s + per, c.stop))) for c in chunks
               for s in range(c.start, c.stop, per)]
    # One loader over all the chunks: its workers start once, not once per chunk.
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0)))  # else it draws its base seed globally
    for c in chunks:
        out = None
        for s in range(c.start, c.stop, per):
            images, index = next(loader)
            feats = _encode_batch(model, images, index, paths, device=device, dtype=dtype)
            if out is None:
                out = torch.empty(k, c.stop - c.start, feats.shape[-1], dtype=torch.float16)
            out[:, s - c.start:s - c.start + feats.shape[0]] = feats.transpose(0, 1)
            bar.update(feats.shape[0] * k)
        _write_chunk(plan, c, out)
        verified[c.index] = _file_key(plan.chunk_path(c.index))


# ----------------------------------------------------------------------------------------------
# Waiting for the chunks, and the merge


def _wait_for_chunks(plan: CachePlan, verified: dict, timeout: float) -> None:
    """Return once every chunk has a valid file; each file is checked once (again when it is
    replaced). ``TimeoutError`` naming the missing chunks when ``timeout`` seconds pass without
    a new valid one."""
    rejected: dict = {}
    last_progress = time.monotonic()
    while True:
        missing = []
        for c in plan.chunks:
            key = _file_key(plan.chunk_path(c.index))
            if key is not None and verified.get(c.index) == key:
                continue
            if key is None or rejected.get(c.index) == key or _chunk_problem(plan, c):
                rejected[c.index] = key
                missing.append(c.index)
            else:
                verified[c.index] = key
                last_progress = time.monotonic()
        if not missing:
            return
        if time.monotonic() - last_progress >= timeout:
            shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
            raise TimeoutError(
                f"feature cache {plan.path!r}: {len(missing)} of {len(plan.chunks)} chunk files "
                f"missing or invalid in {plan.chunk_dir!r} after {timeout:g} s without a new "
                f"one (chunks {shown}); did a process stop? Run the build again, with any "
                "number of processes: the valid chunk files are kept")
        time.sleep(_POLL_SECONDS)


def _wait_for_merged(plan: CachePlan, timeout: float) -> FeatureCache:
    """Wait for the process merging the chunks to write the cache file (the chunk folder goes
    once it has); ``TimeoutError`` after ``timeout`` seconds without a change in that folder."""
    last_change, seen = time.monotonic(), None
    while True:
        if not os.path.isdir(plan.chunk_dir) and os.path.isfile(plan.path):
            try:
                return load_cache(plan.path, plan.fingerprint, verify=False)
            except ValueError:
                pass  # an older file not yet replaced
        try:
            now_seen = sorted(os.listdir(plan.chunk_dir))
        except OSError:
            now_seen = None
        if now_seen != seen:
            seen, last_change = now_seen, time.monotonic()
        elif time.monotonic() - last_change >= timeout:
            raise TimeoutError(f"feature cache {plan.path!r}: not written by the merging process "
                               f"(rank 0) within {timeout:g} s of the last change in "
                               f"{plan.chunk_dir!r}")
        time.sleep(_POLL_SECONDS)


def _repeated(name: str, values: Tensor, times: int) -> TensorSource:
    return TensorSource(name, torch.int64, (times * values.shape[0],),
                        lambda: [raw_bytes(values)] * times)


def _paths_source(name: str, paths: list[str]) -> TensorSource:
    """The paths, ``os.fsencode``-d and NUL-separated, as uint8."""
    nbytes = sum(len(os.fsencode(p)) for p in paths) + max(len(paths) - 1, 0)

    def pieces():
        buf = bytearray()
        for i, p in enumerate(paths):
            if i:
                buf += b"\0"
            buf += os.fsencode(p)
            if len(buf) >= PIECE_BYTES:
                yield bytes(buf)
                buf.clear()
        if buf:
            yield bytes(buf)
    return TensorSource(name, torch.uint8, (nbytes,), pieces)


def _cache_sources(plan: CachePlan, files: dict[int, _ChunkFile], dim: int) -> list[TensorSource]:
    """Every tensor of the cache file (see the module docstring), read from the chunk files or
    made from the plan piece by piece."""
    sources = []
    for split in ("train", "test", "val"):
        chunks = [files[c.index] for c in plan.chunks if c.split == split]
        k = plan.split_views(split)

        def pieces(chunks=chunks, k=k):
            for v in range(k):  # view-major: view v of every image, then view v + 1
                for f in chunks:
                    yield from f.view_source(v)
        sources.append(TensorSource(f"{split}_features", torch.float16,
                                    (k * len(plan.images(split)), dim), pieces))
        sources.append(_paths_source(f"{split}_paths", [p for p, _ in plan.images(split)]))
    m, k = len(plan.train), plan.views
    clean = torch.tensor([y for _, y in plan.train], dtype=torch.int64)
    sources += [
        _repeated("train_labels", torch.tensor(plan.noisy_labels, dtype=torch.int64), k),
        _repeated("train_clean_labels", clean, k),
        _repeated("train_sample_index", torch.arange(m, dtype=torch.int64), k),
        TensorSource("train_view_index", torch.int64, (k * m,),
                     lambda: (raw_bytes(torch.full((m,), v, dtype=torch.int64))
                              for v in range(k))),
        _repeated("test_labels", torch.tensor([y for _, y in plan.test], dtype=torch.int64), 1),
        _repeated("val_labels", torch.tensor([y for _, y in plan.val], dtype=torch.int64), 1),
    ]
    return sources


def _merge(plan: CachePlan) -> FeatureCache:
    """Write the cache file from the (checked) chunk files, one piece at a time: the checksum
    in one pass over them, the file in a second; then remove the chunk files."""
    files = {}
    for c in plan.chunks:
        try:
            files[c.index] = _open_chunk(plan, c)
        except (OSError, ValueError) as e:
            raise ValueError(f"feature cache {plan.path!r}: chunk file "
                             f"{plan.chunk_path(c.index)!r} cannot be merged ({e}); run the "
                             "build again") from None
    dims = sorted({f.shape[2] for f in files.values()})
    if len(dims) > 1:
        raise ValueError(f"feature cache {plan.path!r}: the chunk files hold features of "
                         f"different dimensions {dims}; delete {plan.chunk_dir!r} and rebuild")
    sources = _cache_sources(plan, files, dims[0] if dims else 0)
    metadata = {
        "fastprompt.format": CACHE_FORMAT,
        "fastprompt.fingerprint": json.dumps(plan.fingerprint, sort_keys=True),
        "fastprompt.classnames": json.dumps(plan.classnames),
        "fastprompt.checksum": streaming_checksum(sources),
    }
    try:
        atomic_write(plan.path, lambda f: write_streaming(f, sources, metadata))
    except OSError as e:  # a full disk or a file size limit
        raise OSError(e.errno, f"cannot write the feature cache {plan.path!r}: "
                               f"{e.strerror or e}") from e
    _remove_chunk_files(plan)
    return load_cache(plan.path, plan.fingerprint, verify=False)


def _remove_chunk_files(plan: CachePlan) -> None:
    for c in plan.chunks:
        remove_if_present(plan.chunk_path(c.index))
        remove_stale_temporaries(plan.chunk_path(c.index))
    try:
        os.rmdir(plan.chunk_dir)
    except OSError:
        pass  # files of another layout, or a writer still at work: left alone


def merge_cache_chunks(plan: CachePlan, *, timeout: float = 0.0) -> FeatureCache:
    """Write the cache file of ``plan`` from its chunk files (every one must be valid; waits up
    to ``timeout`` seconds for missing ones, counted from the last one that arrived), holding
    the cache's lock; the chunk files are removed afterwards. Memory stays bounded by a few
    pieces of a few MB, whatever the size of the cache. Returns the loaded cache."""
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan: expected a CachePlan, got {type(plan).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout: expected seconds >= 0, got {timeout!r}")
    with cache_lock(plan.path):
        _wait_for_chunks(plan, {}, float(timeout))
        return _merge(plan)


def torchrun_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process as ``torchrun`` set them (``RANK``,
    ``WORLD_SIZE``); ``(0, 1)`` outside such a launch."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    values = {}
    for name in ("RANK", "WORLD_SIZE"):
        try:
            values[name] = int(os.environ.get(name, ""))
        except ValueError:
            raise ValueError(f"{name}: environment variable is {os.environ.get(name)!r}, not an "
                             "int (set by torchrun)") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if not 0 <= rank < world:
        raise ValueError(f"RANK: {rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def build_feature_cache(path, model: torch.nn.Module, model_name: str,
                        preprocess_train: Callable, preprocess_val: Callable,
                        splits: DatasetSplits, *, views: int = DEFAULT_VIEWS,
                        shots: int | None = None, noise_rate: float = 0.0,
                        noise_type: str = "symmetric", seed: int = 1, add_flip: bool = True,
                        batch_size: int = 128, num_workers: int = 0,
                        progress: bool | None = None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> FeatureCache:
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

    The work is split into chunks of ``chunk_size`` views (see :func:`plan_feature_cache`),
    each written to its own file in ``<path>.chunks/``; a build that was killed resumes from
    the chunk files it left. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set), rank r of W
    encodes chunks r, r + W, ...; rank 0 (alone holding the lock) waits for the others' files
    and merges; every rank returns the cache. The merge streams the chunk files into the cache
    file and removes them. Returns the loaded cache.
    Note that open_clip's training transform crops with scale (0.9, 1.0); CoOp crops with
    (0.08, 1.0): pass your own ``preprocess_train`` to match it.
    """
    _check_run_args(path, batch_size, num_workers, progress)
    plan = plan_feature_cache(path, model, model_name, preprocess_train, preprocess_val, splits,
                              views=views, shots=shots, noise_rate=noise_rate,
                              noise_type=noise_type, seed=seed, add_flip=add_flip,
                              batch_size=batch_size, chunk_size=chunk_size)
    return _build(plan, model, num_workers=num_workers, progress=progress)


def cache_lock(path):
    """The exclusive lock of building the cache file ``path``."""
    path = os.path.abspath(os.fspath(path))
    lock = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".lock")
    return exclusive_lock(lock, f"feature cache {path!r}", remove=True)


def _check_run_args(path, batch_size, num_workers, progress) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path, got {type(path).__name__}")
    check_int("batch_size", batch_size, 1)
    check_int("num_workers", num_workers, 0)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress: expected a bool or None, got {type(progress).__name__}")


def _build(plan: CachePlan, model, *, num_workers: int, progress: bool | None,
           reason: Exception | None = None) -> FeatureCache:
    """Encode this process's share of the chunks; rank 0 then merges under the cache's lock,
    the other ranks wait for its file. ``reason``: why an existing file is rebuilt (logged)."""
    rank, world = torchrun_rank()
    mine = [c.index for c in plan.chunks][rank::world]
    if rank != 0:
        _encode_chunks(plan, mine, model, num_workers=num_workers, progress=progress,
                       verified={})
        return _wait_for_merged(plan, CHUNK_WAIT_SECONDS)
    with cache_lock(plan.path):
        if reason is not None:
            logger.warning("fastprompt: rebuilding the feature cache: %s", reason)
        verified: dict = {}
        _encode_chunks(plan, mine, model, num_workers=num_workers, progress=progress,
                       verified=verified)
        _wait_for_chunks(plan, verified, CHUNK_WAIT_SECONDS)
        return _merge(plan)


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
                        progress: bool | None = None, verify: bool = True,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> FeatureCache:
    """Load the cache at ``path`` if it was built from these exact inputs, else (re)build it.

    Arguments as :func:`build_feature_cache` (under ``torchrun`` too). A stale, truncated or
    damaged cache is rebuilt, and a warning on the ``fastprompt.data`` logger says why.
    """
    _check_run_args(path, batch_size, num_workers, progress)
    plan = plan_feature_cache(path, model, model_name, preprocess_train, preprocess_val, splits,
                              views=views, shots=shots, noise_rate=noise_rate,
                              noise_type=noise_type, seed=seed, add_flip=add_flip,
                              batch_size=batch_size, chunk_size=chunk_size)
    if os.path.isfile(os.fspath(path)):  # a valid cache needs no lock (it may be read-only)
        try:
            return load_cache(path, plan.fingerprint, verify=verify)
        except ValueError as e:
            reason = e
    else:
        reason = None
    return _build(plan, model, num_workers=num_workers, progress=progress, reason=reason)
