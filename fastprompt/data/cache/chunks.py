"""Chunk files: one safetensors file per chunk of a plan, ``features`` (views, images, D) float16,
with the build's fingerprint, the chunk's place and a checksum in the metadata (format
:data:`CHUNK_FORMAT`). Written once, atomically; checked before use; removed after the merge."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from fastprompt._hashing import tensor_checksum
from fastprompt._io import atomic_path, remove_if_present, remove_stale_temporaries
from fastprompt.data.cache.plan import CacheChunk, CachePlan
from fastprompt.data.cache.stream import TensorSource, file_pieces, read_header, streaming_checksum

CHUNK_FORMAT = "fastprompt.feature_cache_chunk/1"
# A chunk file's name (CachePlan.chunk_path), and that of its temporaries while written.
CHUNK_NAME = re.compile(r"(?P<file>\d{6}\.safetensors)|\.(?P<of>\d{6}\.safetensors)\..+\.tmp")


def chunk_metadata(plan: CachePlan, chunk: CacheChunk) -> dict[str, str]:
    """The metadata a chunk file of ``plan`` must carry (all but its checksum)."""
    layout = {"index": chunk.index, "num_chunks": len(plan.chunks), "split": chunk.split,
              "start": chunk.start, "stop": chunk.stop, "views": plan.split_views(chunk.split),
              "encoder_batch": plan.encoder_batch(chunk.split)}
    return {"fastprompt.format": CHUNK_FORMAT,
            "fastprompt.fingerprint": json.dumps(plan.fingerprint, sort_keys=True),
            "fastprompt.chunk": json.dumps(layout, sort_keys=True)}


class ChunkFile(NamedTuple):
    """A chunk file whose header was checked: where its features start, their shape, and the
    checksum its metadata records."""
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


def open_chunk(plan: CachePlan, chunk: CacheChunk) -> ChunkFile:
    """The chunk's file, its header checked against the plan; ``ValueError`` saying why not
    (``FileNotFoundError`` when there is none)."""
    path = plan.chunk_path(chunk.index)
    header, data_start = read_header(path)
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    expected = chunk_metadata(plan, chunk)
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
    return ChunkFile(path, data_start, tuple(shape), str(meta.get("fastprompt.checksum")))


def chunk_problem(plan: CachePlan, chunk: CacheChunk) -> str | None:
    """Why the chunk's file cannot be used (None when it can): missing, from another build or
    layout, truncated, or its content does not match its checksum (reads the whole file)."""
    try:
        f = open_chunk(plan, chunk)
        if streaming_checksum([f.source()]) != f.checksum:
            return "content checksum mismatch"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return str(e)
    return None


def file_key(path: str):
    """What changes when a file is replaced or rewritten (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def write_chunk(plan: CachePlan, chunk: CacheChunk, features: Tensor) -> None:
    """Write the chunk's file (atomically: a killed process leaves whole files only)."""
    path = plan.chunk_path(chunk.index)
    tensors = {"features": features}
    metadata = {**chunk_metadata(plan, chunk), "fastprompt.checksum": tensor_checksum(tensors)}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # a full disk or a file size limit, in safetensors' words
            raise OSError(f"cannot write the feature cache {path!r}: {e}") from e


def remove_chunk_files(plan: CachePlan) -> None:
    """Remove the plan's chunk files (and their temporaries), then those of other layouts (a
    build interrupted with another chunk size leaves files the plan does not name), then the
    folder when empty. Called once the cache is merged, holding the cache's lock."""
    for c in plan.chunks:
        remove_if_present(plan.chunk_path(c.index))
        remove_stale_temporaries(plan.chunk_path(c.index))
    try:
        names = os.listdir(plan.chunk_dir)
    except OSError:
        names = []
    for name in names:
        match = CHUNK_NAME.fullmatch(name)
        if match is None:
            continue  # not a chunk file: left alone
        final = os.path.join(plan.chunk_dir, match["file"] or match["of"])
        if match["file"]:
            remove_if_present(final)
        remove_stale_temporaries(final)  # only those no live writer holds
    try:
        os.rmdir(plan.chunk_dir)
    except OSError:
        pass  # other files, or a writer still at work: left alone
