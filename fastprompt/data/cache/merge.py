"""The merge: a plan's checked chunk files streamed into the cache file, one piece of a few MB at a
time, whatever the size of the cache (:func:`write_merged_cache`; the lock and the wait for the
chunk files are :func:`~fastprompt.data.cache.merge_cache_chunks`'s, in ``build.py``)."""
from __future__ import annotations

import json
import os

import torch
from torch import Tensor

from fastprompt._io import atomic_write
from fastprompt.data.cache.chunks import ChunkFile, open_chunk, remove_chunk_files
from fastprompt.data.cache.load import FeatureCache, load_cache
from fastprompt.data.cache.plan import CachePlan
from fastprompt.data.cache.spec import CACHE_FORMAT
from fastprompt.data.cache.stream import (PIECE_BYTES, TensorSource, raw_bytes,
                                          streaming_checksum, write_streaming)


def repeated_source(name: str, values: Tensor, times: int) -> TensorSource:
    """``values`` (int64) ``times`` over, one after the other."""
    return TensorSource(name, torch.int64, (times * values.shape[0],),
                        lambda: [raw_bytes(values)] * times)


def paths_source(name: str, paths: list[str]) -> TensorSource:
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


def cache_sources(plan: CachePlan, files: dict[int, ChunkFile], dim: int) -> list[TensorSource]:
    """Every tensor of the cache file (see :mod:`fastprompt.data.cache`), read from the chunk
    files or made from the plan piece by piece."""
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
        sources.append(paths_source(f"{split}_paths", [p for p, _ in plan.images(split)]))
    m, k = len(plan.train), plan.views
    clean = torch.tensor([y for _, y in plan.train], dtype=torch.int64)
    sources += [
        repeated_source("train_labels", torch.tensor(plan.noisy_labels, dtype=torch.int64), k),
        repeated_source("train_clean_labels", clean, k),
        repeated_source("train_sample_index", torch.arange(m, dtype=torch.int64), k),
        TensorSource("train_view_index", torch.int64, (k * m,),
                     lambda: (raw_bytes(torch.full((m,), v, dtype=torch.int64))
                              for v in range(k))),
        repeated_source("test_labels", torch.tensor([y for _, y in plan.test],
                                                    dtype=torch.int64), 1),
        repeated_source("val_labels", torch.tensor([y for _, y in plan.val],
                                                   dtype=torch.int64), 1),
    ]
    return sources


def write_merged_cache(plan: CachePlan) -> FeatureCache:
    """Write the cache file from the (checked) chunk files, one piece at a time: the checksum
    in one pass over them, the file in a second; then remove the chunk files. The caller holds
    the cache's lock and has seen every chunk file valid. Returns the loaded cache."""
    files = {}
    for c in plan.chunks:
        try:
            files[c.index] = open_chunk(plan, c)
        except (OSError, ValueError) as e:
            raise ValueError(f"feature cache {plan.path!r}: chunk file "
                             f"{plan.chunk_path(c.index)!r} cannot be merged ({e}); run the "
                             "build again") from None
    dims = sorted({f.shape[2] for f in files.values()})
    if len(dims) > 1:
        raise ValueError(f"feature cache {plan.path!r}: the chunk files hold features of "
                         f"different dimensions {dims}; delete {plan.chunk_dir!r} and rebuild")
    sources = cache_sources(plan, files, dims[0] if dims else 0)
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
    remove_chunk_files(plan)
    return load_cache(plan.path, plan.fingerprint, verify=False)
