"""The plan of a cache build (:class:`CachePlan`): the file, its fingerprint, the images of each
split and the chunks they are cut into; which process encodes which chunks
(:func:`torchrun_rank`); and where the files of a cache go.

A chunk is whole encoder batches of one split, so a chunk boundary is a batch boundary and the
features do not depend on how the chunks are spread over processes.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fastprompt._checks import slug
from fastprompt.data.cache.spec import CacheSpec, as_spec, check_path
from fastprompt.data.folders import Sample


def split_views(split: str, views: int) -> int:
    """Views per image of a split: the training images have ``views``, the others one."""
    return views if split == "train" else 1


def images_per_batch(batch_size: int, views: int) -> int:
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
        return split_views(split, self.views)

    def encoder_batch(self, split: str) -> int:
        return images_per_batch(self.batch_size, self.split_views(split))


def chunk_layout(sizes: dict[str, int], views: int, batch_size: int,
                 chunk_size: int) -> tuple[CacheChunk, ...]:
    """The chunks of splits of ``sizes`` images: per split, runs of whole encoder batches of
    about ``chunk_size`` views (at least one batch)."""
    chunks = []
    for split, n in sizes.items():
        k = split_views(split, views)
        per_batch = images_per_batch(batch_size, k)
        # Whole encoder batches, so a chunk's batches are the ones a single pass would run.
        per_chunk = per_batch * max(1, chunk_size // (per_batch * k))
        for start in range(0, n, per_chunk):
            chunks.append(CacheChunk(len(chunks), split, start, min(start + per_chunk, n)))
    return tuple(chunks)


def plan_feature_cache(path, spec: CacheSpec | torch.nn.Module | None = None, *args,
                       **spec_args) -> CachePlan:
    """The plan of building the cache ``path`` from ``spec``: its fingerprint and its chunks,
    to be encoded by :func:`~fastprompt.data.cache.encode_cache_chunks` (in any processes, on
    any machines sharing the folder) and merged by
    :func:`~fastprompt.data.cache.merge_cache_chunks`. Also callable as in 0.1, with the
    spec's arguments in its place (``model, model_name, preprocess_train, preprocess_val,
    splits, views=..., ..., batch_size=..., chunk_size=...``).

    ``spec.chunk_size``: views per chunk, rounded down to whole encoder batches of
    ``spec.batch_size`` views (at least one batch). Chunks never depend on how many processes
    encode them, so the features are the same bit for bit however the work is spread, and a
    chunk file written by an interrupted build is reused by the next one with the same
    arguments.
    """
    check_path(path)
    spec = as_spec(spec, args, spec_args)
    splits = spec.splits
    sizes = {"train": len(spec.train), "test": len(splits.test), "val": len(splits.val)}
    return CachePlan(
        path=os.path.abspath(os.fspath(path)), fingerprint=spec.fingerprint(),
        classnames=list(splits.classnames), train=spec.train, noisy_labels=spec.noisy_labels,
        test=list(splits.test), val=list(splits.val), preprocess_train=spec.preprocess_train,
        preprocess_val=spec.preprocess_val, add_flip=spec.flip_added,
        batch_size=spec.batch_size,
        chunks=chunk_layout(sizes, spec.views, spec.batch_size, spec.chunk_size))


def torchrun_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process as ``torchrun`` set them (``RANK``,
    ``WORLD_SIZE``); ``(0, 1)`` outside such a launch. Rank r of W encodes chunks r, r + W, ...
    of a plan."""
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


def task_cache_path(out_dir, index: int, name: str) -> str:
    """The cache file of task ``index`` (from 0) named ``name`` of a SoftCPT run in
    ``out_dir``: ``OUT/features/NN-<slug of the name>.safetensors``."""
    part = slug(name, lower=True, max_length=40, default="task")
    return os.path.join(out_dir, "features", f"{index:02d}-{part}.safetensors")
