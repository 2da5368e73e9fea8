"""Checksums of tensors and of nested training state: BLAKE2b (128 bits, hex) over each tensor's
name, dtype, shape and bytes, so a damaged cache, checkpoint or prompt file is told apart from a
good one. Kept apart from ``fastprompt._io`` because it needs torch and serving does not."""
from __future__ import annotations

import hashlib

import torch


def new_digest() -> "hashlib.blake2b":
    """The hash every fastprompt checksum uses: BLAKE2b with a 16-byte digest."""
    return hashlib.blake2b(digest_size=16)


def tensor_hash_prefix(name: str, dtype: torch.dtype, shape) -> bytes:
    """What a tensor's hash feeds in before its bytes: its name, dtype and shape."""
    return f"{name}|{dtype}|{tuple(shape)}|".encode()


def update_tensor_hash(h, name: str, t: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, bytes) into the hash ``h``."""
    t = t.detach()
    h.update(tensor_hash_prefix(name, t.dtype, t.shape))
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def tensor_checksum(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """BLAKE2b (128 bits, hex) of the named tensors in name order, then ``extra``."""
    h = new_digest()
    for name in sorted(tensors):
        update_tensor_hash(h, name, tensors[name])
    h.update(extra.encode("utf-8"))
    return h.hexdigest()


def _hash_state(h, obj, key: str = "") -> None:
    """Feed nested dicts, lists, tensors and scalars into ``h`` in a fixed order."""
    if isinstance(obj, torch.Tensor):
        update_tensor_hash(h, key, obj)
    elif isinstance(obj, dict):
        h.update(f"{key}{{{len(obj)}".encode())
        for k in sorted(obj, key=str):
            _hash_state(h, obj[k], f"{key}/{k}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{key}[{len(obj)}".encode())
        for i, v in enumerate(obj):
            _hash_state(h, v, f"{key}/{i}")
    else:
        h.update(f"{key}={obj!r};".encode())


def state_checksum(state: dict, *, skip: str = "checksum") -> str:
    """Checksum of a nested state (a checkpoint's dict), leaving out its own ``skip`` entry."""
    h = new_digest()
    _hash_state(h, {k: v for k, v in state.items() if k != skip})
    return h.hexdigest()
