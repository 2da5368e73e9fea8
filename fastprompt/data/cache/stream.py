"""Writing and reading safetensors files piece by piece, so a file larger than memory can be
assembled from parts (the feature cache's merge of its chunk files).

The format: an 8-byte little-endian header length, a JSON header (``__metadata__``: a string to
string map; per tensor ``dtype``, ``shape`` and ``data_offsets`` [begin, end) into the data
block), padded with spaces to a multiple of 8 bytes, then the data block. Tensors are laid out as
``safetensors.torch.save_file`` lays them out (by dtype size, largest first, then by name), which
keeps every tensor aligned to its element size.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from fastprompt._hashing import tensor_hash_prefix

_DTYPES = {torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}
# save_file's order: the dtypes by size, largest first.
_DTYPE_ORDER = {torch.int64: 0, torch.float16: 1, torch.uint8: 2}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
PIECE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TensorSource:
    """One tensor of a file being written: its bytes come from ``pieces()`` (an iterator of
    buffers, each used before the next is asked for), ``nbytes`` in all."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterable]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data


def file_pieces(path: str, offset: int, length: int) -> Iterator[memoryview]:
    """``length`` bytes of ``path`` from ``offset``, in pieces of at most ``PIECE_BYTES`` (one
    reused buffer: a piece is valid until the next is asked for)."""
    buf = bytearray(min(length, PIECE_BYTES))
    view = memoryview(buf)
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(view[:min(length, len(buf))])
            if not n:
                raise ValueError(f"{path!r} ends before its data does (truncated)")
            length -= n
            yield view[:n]


def read_header(path: str) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file; ``ValueError`` when it is not one."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        if n > _MAX_HEADER:
            raise ValueError(f"header length {n} is not plausible")
        text = f.read(n)
    if len(text) != n:
        raise ValueError("header truncated")
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def file_sources(path: str) -> list[TensorSource]:
    """A source per tensor of the safetensors file ``path``, reading its bytes from the file
    (``ValueError`` when a tensor's dtype is not one fastprompt writes)."""
    header, data_start = read_header(path)
    by_name = {v: k for k, v in _DTYPES.items()}
    sources = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in by_name:
            raise ValueError(f"{name}: dtype {info.get('dtype')!r} is not one of {sorted(by_name)}")
        begin, end = info["data_offsets"]
        sources.append(TensorSource(
            name, by_name[info["dtype"]], tuple(info["shape"]),
            lambda begin=begin, end=end: file_pieces(path, data_start + begin, end - begin)))
    return sources


def streaming_checksum(sources: Iterable[TensorSource], extra: str = "") -> str:
    """``fastprompt._hashing.tensor_checksum`` of the tensors the sources hold, reading each once."""
    h = hashlib.blake2b(digest_size=16)
    for s in sorted(sources, key=lambda s: s.name):
        h.update(tensor_hash_prefix(s.name, s.dtype, s.shape))
        for piece in s.pieces():
            h.update(piece)
    h.update(extra.encode("utf-8"))
    return h.hexdigest()


def write_streaming(f, sources: Iterable[TensorSource], metadata: dict[str, str]) -> None:
    """Write a safetensors file of ``sources`` with ``metadata`` to the binary file ``f``,
    holding one piece at a time."""
    ordered = sorted(sources, key=lambda s: (_DTYPE_ORDER[s.dtype], s.name))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for s in ordered:
        header[s.name] = {"dtype": _DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for s in ordered:
        written = 0
        for piece in s.pieces():
            f.write(piece)
            written += len(piece)
        if written != s.nbytes:  # a source that lies would leave a file no reader accepts
            raise RuntimeError(f"{s.name}: {written} bytes written, {s.nbytes} expected")
