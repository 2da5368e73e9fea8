"""Triton kernels of ``fastprompt::project_conflicting_`` (the CUDA path; CPU tensors under
``TRITON_INTERPRET=1``): every (g, h) pair in one pass of two launches, no host synchronisation.

The pairs are laid end to end in one flat buffer (the tensors themselves when there is a single
contiguous pair) and cut into fixed-size chunks, each inside one tensor; a cached table maps
chunk -> tensor. Launch 1 writes each chunk's partial ``<g,h>`` and ``‖h‖²``; launch 2 has every
chunk sum its tensor's partials (the same order in every chunk, so deterministic and without
atomics), apply the sign test, and update its chunk of g. (Pointer tables, as torch's
``_foreach`` kernels use, would skip the copies, but the interpreter cannot dereference a
pointer loaded from memory.)
"""
from __future__ import annotations

import functools
import torch
import triton
import triton.language as tl

from fastprompt.kernels.launch import INTERPRET, next_pow2_between, on_input_device

__all__ = ["project_conflicting_"]


@triton.jit
def _pair_partials_kernel(g_ptr, h_ptr, chunk_tensor_ptr, chunk_start_ptr, tensor_end_ptr,
                          partial_dot_ptr, partial_sq_ptr,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + chunk)
    offs = tl.load(chunk_start_ptr + chunk) + tl.arange(0, BLOCK)
    mask = offs < tl.load(tensor_end_ptr + tensor)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(partial_dot_ptr + chunk, tl.sum(g * h, axis=0))
    tl.store(partial_sq_ptr + chunk, tl.sum(h * h, axis=0))


@triton.jit
def _pair_project_kernel(g_ptr, h_ptr, chunk_tensor_ptr, chunk_start_ptr, tensor_end_ptr,
                         tensor_first_chunk_ptr, partial_dot_ptr, partial_sq_ptr, lam,
                         max_chunks_per_tensor,
                         ACC: tl.constexpr, BLOCK: tl.constexpr, REDUCE_BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + chunk)
    first = tl.load(tensor_first_chunk_ptr + tensor)
    last = tl.load(tensor_first_chunk_ptr + tensor + 1)
    dot = tl.zeros((REDUCE_BLOCK,), dtype=ACC)
    sq = tl.zeros((REDUCE_BLOCK,), dtype=ACC)
    for i in range(0, max_chunks_per_tensor, REDUCE_BLOCK):
        idx = first + i + tl.arange(0, REDUCE_BLOCK)
        dot += tl.load(partial_dot_ptr + idx, mask=idx < last, other=0.0)
        sq += tl.load(partial_sq_ptr + idx, mask=idx < last, other=0.0)
    d = tl.sum(dot, axis=0)
    hh = tl.sum(sq, axis=0)
    # d < 0 implies ‖h‖ > 0; the guard only keeps the untaken branch finite.
    coef = tl.where(d < 0, lam * d / tl.where(hh > 0, hh, 1.0), 0.0)
    offs = tl.load(chunk_start_ptr + chunk) + tl.arange(0, BLOCK)
    # Only conflicting tensors are touched (an end of 0 masks every lane); the others stay bit
    # for bit.
    mask = offs < tl.where(d < 0, tl.load(tensor_end_ptr + tensor), 0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(g_ptr + offs, (g - coef * h).to(g_ptr.dtype.element_ty), mask=mask)


# Elements per chunk (under the interpreter: few, large chunks).
PROJECTION_BLOCK = 16384 if INTERPRET else 2048


@functools.lru_cache(maxsize=64)
def _chunk_tables(numels: tuple[int, ...], block: int, device: torch.device):
    """Per chunk: its tensor and start offset; per tensor: end offset and first chunk. Built on
    the host from shapes alone and cached, so a training step uploads nothing."""
    chunk_tensor, chunk_start, tensor_end, tensor_first_chunk = [], [], [], [0]
    offset = 0
    for i, numel in enumerate(numels):
        starts = range(offset, offset + numel, block)
        chunk_tensor += [i] * len(starts)
        chunk_start += list(starts)
        offset += numel
        tensor_end.append(offset)
        tensor_first_chunk.append(len(chunk_start))
    max_chunks = max(b - a for a, b in zip(tensor_first_chunk, tensor_first_chunk[1:]))

    def as_tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    return (as_tensor(chunk_tensor), as_tensor(chunk_start), as_tensor(tensor_end),
            as_tensor(tensor_first_chunk), max_chunks)


@on_input_device
def project_conflicting_(grads: list[torch.Tensor], ref_grads: list[torch.Tensor],
                         lam: float) -> None:
    """For each pair ``(g, h)``: if ``<g,h> < 0``, ``g <- g - lam <g,h>/‖h‖² h`` in place
    (docs/kernels.md). Reductions in float32 (float64 for float64 tensors)."""
    pairs = [(g, h) for g, h in zip(grads, ref_grads) if g.numel() > 0]
    if not pairs:
        return
    dtypes = {g.dtype for g, _ in pairs}
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    flat_dtype = dtypes.pop() if len(dtypes) == 1 else acc
    in_place = len(pairs) == 1 and pairs[0][0].is_contiguous() and pairs[0][1].is_contiguous()
    if in_place:
        flat_g, flat_h = pairs[0][0].view(-1), pairs[0][1].view(-1)
    else:
        flat_g = torch.cat([g.reshape(-1).to(flat_dtype) for g, _ in pairs])
        flat_h = torch.cat([h.reshape(-1).to(flat_dtype) for _, h in pairs])

    block = PROJECTION_BLOCK
    numels = tuple(g.numel() for g, _ in pairs)
    chunk_tensor, chunk_start, tensor_end, tensor_first_chunk, max_chunks = _chunk_tables(
        numels, block, flat_g.device)
    num_chunks = chunk_tensor.numel()
    partial_dot = torch.empty(num_chunks, dtype=acc, device=flat_g.device)
    partial_sq = torch.empty(num_chunks, dtype=acc, device=flat_g.device)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    _pair_partials_kernel[(num_chunks,)](
        flat_g, flat_h, chunk_tensor, chunk_start, tensor_end, partial_dot, partial_sq,
        ACC=acc_tl, BLOCK=block)
    _pair_project_kernel[(num_chunks,)](
        flat_g, flat_h, chunk_tensor, chunk_start, tensor_end, tensor_first_chunk, partial_dot,
        partial_sq, float(lam), max_chunks, ACC=acc_tl, BLOCK=block,
        REDUCE_BLOCK=next_pow2_between(max_chunks, 16, 1024))
    if not in_place:
        torch._foreach_copy_([g for g, _ in pairs],
                             [part.view_as(g) for part, (g, _) in zip(flat_g.split(numels), pairs)])
