"""Compile every Triton kernel for real GPUs without one: the launches the host code would make
for a set of shapes (the same block-size functions, ``INTERPRET`` off), compiled with
``triton.compile`` for a ``GPUTarget`` and the ptxas shipped in the triton wheel, with what ptxas
reports (registers, spills, shared memory) and whether tensor-core instructions were emitted.

Run in a process without ``TRITON_INTERPRET=1`` (the kernels' decorators pick interpreter or
compiler at import). Used by ``tests/ops/test_kernel_compile.py`` and
``bench/kernel_resources.py``.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import tempfile
from typing import Iterable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastprompt.kernels import clip_loss_backward, clip_loss_forward, project_conflicting, row_norms
from fastprompt.kernels.launch import INTERPRET, dot_precision

# Largest shared memory one block may use (opt-in), per architecture.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Register spills tolerated per thread: 32 bytes, eight 4-byte values, too few to hold any
# thread's share of a tile, so the tile loops stay in registers (the float32 ieee forward with
# ProGrad's second product spills a few scalars on sm_80). A tile that no longer fits spills
# hundreds of bytes: that is what this catches.
SPILL_BUDGET_BYTES = 32

_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.float64: "fp64"}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the host code would make it."""
    kernel: str
    what: str  # the shape and options it stands for
    function: str  # "<module>.<name>" under fastprompt.kernels (picklable, for worker processes)
    signature: tuple  # ((name, type), ...) for the non-constexpr arguments
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    num_stages: int


    @property
    def fn(self):
        module, name = self.function.split(".")
        return getattr(importlib.import_module(f"fastprompt.kernels.{module}"), name)


def _launch(kernel, what, fn, types: dict, constexprs: dict, options: dict) -> Launch:
    signature = tuple((name, types[name]) for name in fn.arg_names if name not in constexprs)
    function = f"{fn.fn.__module__.rsplit('.', 1)[1]}.{fn.fn.__name__}"
    return Launch(kernel, what, function, signature, tuple(sorted(constexprs.items())),
                  options.get("num_warps", 4), options.get("num_stages", 3))


def _split(cfg: dict):
    options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in options}, options


def forward_launches(n, c, d, dtype, prograd, precision=None):
    """The forward kernel with every feature on (table targets, DSPT, gradients): the heaviest
    specialisation of the loss (``prograd``: with the distillation term)."""
    x = "*" + _TYPE[dtype]
    blocks, options = _split(clip_loss_forward.forward_config(n, c, d, dtype, prograd))
    types = dict(x_ptr=x, t_ptr=x, t0_ptr=x, x_inv_norm_ptr="*fp32", t_inv_norm_ptr="*fp32",
                 t0_inv_norm_ptr="*fp32", scale_ptr="*fp32", labels_ptr="*i64",
                 table_row_ptr="*i64", table_ptr="*fp32", loss_ptr="*fp32", kl_ptr="*fp32",
                 grad_ptr=x, grad_kl_ptr=x, N="i32", C="i32", D="i32", R="i32",
                 smoothing="fp32", temperature="fp32")
    const = dict(blocks, TARGET=clip_loss_forward.TARGET_TABLE, DOUBLE_SOFTMAX=True,
                 NORMALIZE=True, HAS_KL=prograd, COMPUTE_GRAD=True, CAST_FP32=False,
                 PRECISION=precision or dot_precision(dtype), xt_ptr=None, xt0_ptr=None,
                 PRODUCTS_STORED=False)
    what = f"N={n} C={c} D={d} {_TYPE[dtype]}/{const['PRECISION']}" + (" prograd" if prograd else "")
    yield _launch("clip_loss_forward", what, clip_loss_forward.clip_loss_forward_kernel, types,
                  const, options)
    # The class matrices' row norms (with the scaled copy) and the image rows'.
    for m, scaled in ((c, True), (n, False)):
        yield _launch("row_norms", f"M={m} D={d} {_TYPE[dtype]}", row_norms._row_norms_kernel,
                      dict(x_ptr=x, inv_norm_ptr="*fp32", scaled_ptr=x, M="i32", D="i32"),
                      dict(WRITE_SCALED=scaled, **row_norms.row_norm_blocks(m, d)), {})


def backward_launches(n, c, d, dtype, precision=None):
    """``Gᵀ X̂`` (with the upstream gradient folded in) and ``G T̂``, then their epilogues."""
    x = "*" + _TYPE[dtype]
    for m, k, weighted in ((c, n, True), (n, c, False)):
        blocks, options = _split(clip_loss_backward.matmul_config(m, k, d, dtype))
        const = dict(blocks, HAS_K_SCALE=weighted, HAS_K_INV_NORM=True, CAST_FP32=False,
                     PRECISION=precision or dot_precision(dtype))
        types = dict(g_ptr=x, f_ptr=x, k_scale_ptr="*fp32", k_scale_peak_ptr="*fp32",
                     k_inv_norm_ptr="*fp32", out_ptr="*fp32", M="i32", K="i32", D="i32",
                     stride_gm="i32", stride_gk="i32")
        yield _launch("grad_matmul", f"M={m} K={k} D={d} {_TYPE[dtype]}/{const['PRECISION']}",
                      clip_loss_backward._grad_matmul_kernel, types, const, options)
        yield _launch("grad_epilogue", f"M={m} D={d} {_TYPE[dtype]}",
                      clip_loss_backward._grad_epilogue_kernel,
                      dict(acc_ptr="*fp32", f_ptr=x, inv_norm_ptr="*fp32", m_scale_ptr="*fp32",
                           scale_ptr="*fp32", out_ptr=x, row_dot_ptr="*fp32", M="i32", D="i32"),
                      dict(NORMALIZE=True, HAS_M_SCALE=not weighted, WRITE_OUT=True,
                           WRITE_DOT=weighted, **clip_loss_backward.epilogue_blocks(m, d)), {})


def projection_launches(dtype):
    x = "*" + _TYPE[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    acc_tl = triton.language.float64 if dtype == torch.float64 else triton.language.float32
    tables = dict(chunk_tensor_ptr="*i64", chunk_start_ptr="*i64", tensor_end_ptr="*i64")
    yield _launch("pair_partials", _TYPE[dtype], project_conflicting._pair_partials_kernel,
                  dict(g_ptr=x, h_ptr=x, partial_dot_ptr="*" + acc, partial_sq_ptr="*" + acc,
                       **tables), dict(ACC=acc_tl, BLOCK=2048), {})
    yield _launch("pair_project", _TYPE[dtype], project_conflicting._pair_project_kernel,
                  dict(g_ptr=x, h_ptr=x, tensor_first_chunk_ptr="*i64",
                       partial_dot_ptr="*" + acc, partial_sq_ptr="*" + acc, lam="fp32",
                       max_chunks_per_tensor="i32", **tables),
                  # REDUCE_BLOCK: its largest value (tensors of 2 M elements and more)
                  dict(ACC=acc_tl, BLOCK=project_conflicting.PROJECTION_BLOCK, REDUCE_BLOCK=1024),
                  {})


def all_launches(shapes: Iterable[tuple[int, int, int]],
                 dtypes=(torch.float32, torch.bfloat16, torch.float16),
                 float32_precisions=("ieee", "tf32")) -> list[Launch]:
    """Every distinct launch for these (N, C, D) shapes: float32 with the given dot precisions,
    the half types, the loss with and without ProGrad's term, the backward, the projection."""
    seen, out = set(), []
    for n, c, d in shapes:
        for dtype in dtypes:
            precisions = float32_precisions if dtype == torch.float32 else (None,)
            for precision in precisions:
                for launch in (*forward_launches(n, c, d, dtype, False, precision),
                               *forward_launches(n, c, d, dtype, True, precision),
                               *backward_launches(n, c, d, dtype, precision)):
                    key = (launch.kernel, launch.signature, launch.constexprs, launch.num_warps,
                           launch.num_stages)
                    if key not in seen:
                        seen.add(key)
                        out.append(launch)
    for dtype in (*dtypes, torch.float64):
        out.extend(projection_launches(dtype))
    return out


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile for ``sm_<arch>``; returns registers, spill bytes, shared memory and whether the
    code uses tensor cores (mma / wgmma), as ptxas and the PTX tell."""
    if INTERPRET:
        raise RuntimeError("offline compilation needs TRITON_INTERPRET unset")
    compiled = triton.compile(
        ASTSource(launch.fn, dict(launch.signature), dict(launch.constexprs)),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        target = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        report = subprocess.run([_ptxas(), f"-arch={target}", "-v", "-o", os.devnull, f.name],
                                capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", report).group(1))
    return dict(kernel=launch.kernel, what=launch.what, arch=arch, registers=registers,
                spill_stores=spill_stores, spill_loads=spill_loads,
                shared=compiled.metadata.shared, num_warps=launch.num_warps,
                tensor_cores=bool(re.search(r"\b(wgmma|mma\.sync)", ptx)))


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch (empty when nothing)."""
    out = []
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared']} B over the sm_{row['arch']} limit")
    if max(row["spill_stores"], row["spill_loads"]) > SPILL_BUDGET_BYTES:
        out.append(f"spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    return out
