"""The memory layout of the loss ops' N x C logit-gradient outputs: contiguous rows, or (the fused
CUDA schedule) rows padded to a multiple of ``ROW_ALIGNMENT`` elements, of which the op returns
a view of the first C columns. The forward kernels, the ops' fake implementations and ProGrad's
combined buffer allocate them here, so all agree on the strides (torch.compile checks them).
"""
from __future__ import annotations

import torch

# The fused schedule pads each row of its N x C logit-gradient buffers to a multiple of this many
# elements (C = 1000 -> 1008): with 16-element aligned rows the half-precision loads of the
# backward vectorise to 16 bytes, and so do the forward's stores of whole tiles.
ROW_ALIGNMENT = 16


def padded_columns(c: int) -> int:
    """``c`` rounded up to a multiple of ``ROW_ALIGNMENT``: the fused schedule's row stride."""
    return -(-c // ROW_ALIGNMENT) * ROW_ALIGNMENT


def logit_gradient_buffer(like: torch.Tensor, n: int, c: int, padded: bool) -> torch.Tensor:
    """An N x C tensor in ``like``'s dtype and device; ``padded``: a view of the first C
    columns of an N x ``padded_columns(c)`` allocation (the row stride the backward reads)."""
    if not padded:
        return like.new_empty((n, c))
    return like.new_empty((n, padded_columns(c)))[:, :c]


def with_padded_rows(g: torch.Tensor) -> torch.Tensor:
    """``g`` (N x C) in rows padded with zeros to ``padded_columns(C)``: a view of the first C
    columns, as the fused forward writes its gradients (out of place, so vmap can batch it)."""
    c = g.shape[-1]
    return torch.nn.functional.pad(g, (0, padded_columns(c) - c))[..., :c]
