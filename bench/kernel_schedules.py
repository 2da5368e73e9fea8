"""What the Triton kernels compile to on real GPUs, without one: registers, spills, shared memory,
tensor-core and async-copy instructions per kernel and launch configuration.

Every kernel is compiled offline for ``GPUTarget("cuda", arch, 32)`` with the ptxas shipped in
the triton wheel, at exactly the configurations the host code launches: the ops' CUDA entry
points run on meta tensors (shapes, dtypes and strides, no data, no GPU) with ``JITFunction.run``
replaced by a recorder, and each recorded launch is bound by triton's own binder, as
``JITFunction.run`` specialises it (argument types, 16-byte divisibility, integers equal to 1).
Launches that differ only in how their integer sizes specialise (divisible by 16, equal to 1)
are compiled once, at the least specialised of them (``schedule_key``): block sizes, warps,
stages, dtypes, pointer alignment and every constexpr option stay distinct.

    python bench/kernel_schedules.py                                 # N=65536 C=1000 D=512 bf16
    python bench/kernel_schedules.py --n 256 --c 1000 --d 512 --dtype float32-tf32 --arch 80
    python bench/kernel_schedules.py --grid ci --json out.json --jobs 2   # the test's matrix
    python bench/kernel_schedules.py --grid losses --jobs 2    # GCE/MAE and the logits ops only

``--grid ci`` is the matrix of tests/kernels/test_compile_for_gpu.py (``--grid full``: more;
``--grid losses``: only its GCE and logits-op part, ``LOSS_SCENARIOS``). Needs TRITON_INTERPRET
unset (the interpreter replaces compilation). Registers, spills and stack come from the cubin
(``cuobjdump``: spill bytes are the widths of its STL/LDL instructions), shared memory from
triton's metadata; both work from triton's cache, so a second run is quick. ``grid y``: the
largest second grid dimension among the launches of a row (the fused forward's class ranges, the
products' slices of their reduction; 1 for one-dimensional grids).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("kernel_schedules: unset TRITON_INTERPRET (the interpreter does not compile)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# Largest dynamic shared memory one block may use: A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"float32-ieee": torch.float32, "float32-tf32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("cublas", "fused")
GRID_N, GRID_C, GRID_D = (1, 33, 256, 65536), (1, 7, 1000, 21843), (20, 512, 768, 1024)
OPTION_CHANGES = (dict(target="hard"), dict(target="uniform"), dict(target="classwise"),
                  dict(double_softmax=False), dict(normalize=False), dict(grad=False))
# The kernel variants of the robust losses and the logits ops, one representative shape each
# (part of --grid ci): (schedule, op, N, C, D, dtype, options). GCE with one exponent per row
# ("gce-rows") or one for all ("gce"), under the double softmax (the training step's options)
# and over softmax(z) with soft and hard targets; N=256 takes the fused forward's split passes
# (1-3), N=65536 and the cuBLAS row pass its single pass (0). The logits ops have no schedule
# (their backward is a torch product).
LOSS_SCENARIOS = (
    ("fused", "clip", 256, 1000, 512, "bfloat16", dict(loss="gce-rows")),
    ("fused", "clip", 256, 1000, 512, "bfloat16", dict(loss="gce", double_softmax=False)),
    ("fused", "clip", 65536, 1000, 512, "bfloat16", dict(loss="gce", double_softmax=False,
                                                           target="uniform")),
    ("fused", "clip", 65536, 1000, 512, "float32-ieee", dict(loss="gce", target="hard")),
    ("fused", "prograd", 256, 1000, 512, "bfloat16", dict(loss="gce-rows")),
    ("cublas", "clip", 4096, 1000, 512, "bfloat16", dict(loss="gce-rows")),
    ("cublas", "clip", 4096, 1000, 512, "float32-ieee", dict(loss="gce", double_softmax=False,
                                                           target="hard")),
    ("cublas", "prograd", 4096, 1000, 512, "bfloat16", dict(loss="gce", double_softmax=False)),
    ("-", "logits", 4096, 1000, 0, "bfloat16", dict(loss="gce-rows")),
    ("-", "logits", 4096, 1000, 0, "float32-ieee", dict(double_softmax=False, target="hard")),
    ("-", "logits", 4096, 1000, 0, "float16", dict(loss="gce", double_softmax=False,
                                                  target="uniform")),
    ("-", "logits-prograd", 4096, 1000, 0, "bfloat16", dict(loss="gce")),
)


# --- what the host code launches -------------------------------------------------------------

@contextlib.contextmanager
def recorded_launches():
    """Replace ``JITFunction.run`` by a recorder for the duration: yields the list of
    ``(kernel, args, kwargs, grid)`` launched."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, dict(kwargs), tuple(grid)))

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def float32_precision(name: str):
    """torch's float32 matmul precision for the duration ("ieee" or "tf32")."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest" if name == "ieee" else "high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def loss_inputs(n, c, d, dtype, target, with_zeroshot):
    meta = torch.device("meta")
    x = torch.empty(n, d, dtype=dtype, device=meta)
    t = torch.empty(c, d, dtype=dtype, device=meta)
    t0 = torch.empty(c, d, dtype=dtype, device=meta) if with_zeroshot else None
    labels = torch.empty(n, dtype=torch.int64, device=meta)
    scale = torch.empty((), dtype=torch.float32, device=meta)
    table = sample_index = None
    smoothing = 0.0 if target == "hard" else 0.2
    if target == "classwise":
        table = torch.empty(c, c, dtype=torch.float32, device=meta)
    if target == "instancewise":
        table = torch.empty(n + 3, c, dtype=torch.float32, device=meta)
        sample_index = torch.empty(n, dtype=torch.int64, device=meta)
    return x, t, t0, labels, scale, table, sample_index, smoothing


@contextlib.contextmanager
def cuda_schedule(name: str):
    """``FASTPROMPT_CUDA_SCHEDULE`` for the duration."""
    before = os.environ.get("FASTPROMPT_CUDA_SCHEDULE")
    os.environ["FASTPROMPT_CUDA_SCHEDULE"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTPROMPT_CUDA_SCHEDULE"]
        else:
            os.environ["FASTPROMPT_CUDA_SCHEDULE"] = before


def loss_exponents(loss: str, n: int):
    """``(q, q_rows)`` of the ops for ``loss``: "ce", "gce" (q = 0.5) or "gce-rows" (one per
    row, a meta tensor)."""
    if loss == "gce-rows":
        return 0.0, torch.empty(n, dtype=torch.float32, device="meta")
    return (0.5 if loss == "gce" else 0.0), None


def logits_launches(op, n, c, dtype_name, target="instancewise", double_softmax=True,
                    grad=True, loss="ce"):
    """The launches of one forward of the logits ops ("logits" or "logits-prograd")."""
    from fastprompt.kernels import logits_loss

    dtype = DTYPES[dtype_name]
    x, _, _, labels, _, table, sample_index, smoothing = loss_inputs(n, c, 1, dtype, target,
                                                                     False)
    logits = torch.empty(n, c, dtype=dtype, device="meta")
    q, q_rows = loss_exponents(loss, n)
    with recorded_launches() as launches:
        if op == "logits-prograd":
            logits_loss.logits_prograd_losses_forward(
                logits, torch.empty_like(logits), labels, table, sample_index, smoothing,
                double_softmax, 2.0, grad, q, q_rows)
        else:
            logits_loss.logits_cross_entropy_forward(logits, labels, table, sample_index,
                                                     smoothing, double_softmax, grad, q, q_rows)
    return launches


def loss_step_launches(schedule, op, n, c, d, dtype_name, target="instancewise",
                       double_softmax=True, normalize=True, grad=True, loss="ce"):
    """The launches of one forward (and, with ``grad``, one backward) of ``op`` ("clip" or
    "prograd") through the ops' CUDA entry points under ``schedule``; ``loss``: "ce", "gce" or
    "gce-rows" (``loss_exponents``). The logits ops ("logits", "logits-prograd"):
    ``logits_launches``."""
    from fastprompt.kernels import loss_entry_points

    if op.startswith("logits"):
        return logits_launches(op, n, c, dtype_name, target, double_softmax, grad, loss)
    dtype = DTYPES[dtype_name]
    x, t, t0, labels, s, table, sample_index, smoothing = loss_inputs(
        n, c, d, dtype, target, op == "prograd")
    q, q_rows = loss_exponents(loss, n)
    with (float32_precision(dtype_name.split("-")[-1]), cuda_schedule(schedule),
          recorded_launches() as launches):
        if op == "prograd":
            _, _, grad_logits, _ = loss_entry_points.prograd_losses_forward(
                x, t, t0, labels, s, table, sample_index, smoothing, double_softmax, 2.0, grad,
                q, q_rows)
        else:
            _, grad_logits = loss_entry_points.clip_cross_entropy_forward(
                x, t, labels, s, table, sample_index, smoothing, double_softmax, normalize, grad,
                q, q_rows)
        if grad:
            grad_rows = torch.empty(n, dtype=torch.float32, device=x.device)
            loss_entry_points.clip_cross_entropy_backward(
                grad_rows, grad_logits, x, t, s, normalize or op == "prograd", True, True, True)
    return launches


def projection_launches(dtype_name, numels):
    """``project_conflicting_`` over tensors of the given sizes (a prompt's parameters)."""
    from fastprompt.kernels.project_conflicting import project_conflicting_

    dtype = DTYPES[dtype_name]
    grads = [torch.empty(k, dtype=dtype, device="meta") for k in numels]
    refs = [torch.empty(k, dtype=dtype, device="meta") for k in numels]
    with recorded_launches() as launches:
        project_conflicting_(grads, refs, 1.0)
    return launches


def scenarios(grid: str = "", n=65536, c=1000, d=512, dtype_names=("bfloat16",)):
    """``(label, launches thunk)`` pairs: one shape (``grid=""``) or a grid.

    ``grid="ci"`` (the test's): the training step of both ops (DSPT with an instance-wise table:
    every sweep and every table load) under both schedules at every shape of GRID_* in float32
    (IEEE, torch's default) and bfloat16, and in TF32 and float16 (whose block sizes are IEEE's
    and bfloat16's) at the smallest and largest shapes; the projection over a few tensor sets.
    ``grid="full"`` adds every shape in every dtype and each other option of the ops once (the
    rest as in the training step) at N=256 C=1000 D=512 in float32 and bfloat16. Both add
    ``LOSS_SCENARIOS``, which ``grid="losses"`` alone gives."""
    ops = ("clip", "prograd")
    if grid in ("ci", "full", "losses"):
        for sch, op, n_, c_, d_, dt, options in LOSS_SCENARIOS:
            label = (f"{sch} {op} N={n_} C={c_} D={d_} {dt} "
                     + " ".join(f"{k}={v}" for k, v in options.items()))
            yield label, lambda a=(sch, op, n_, c_, d_, dt, options): loss_step_launches(
                *a[:6], **a[6])
        if grid == "losses":
            return
    if not grid:
        for sch, dt, op in itertools.product(SCHEDULES, dtype_names, ops):
            yield (f"{sch} {op} N={n} C={c} D={d} {dt}",
                   lambda a=(sch, op, n, c, d, dt): loss_step_launches(*a))
        for dt in dtype_names:
            yield f"projection {dt}", lambda dt=dt: projection_launches(dt, (16 * 512, 4 * 512 + 7))
        return
    full = grid == "full"
    shapes = list(itertools.product(GRID_N, GRID_C, GRID_D))
    sweep = [(dt, shape) for dt in DTYPES for shape in shapes
             if full or dt in ("float32-ieee", "bfloat16") or shape in (shapes[0], shapes[-1])]
    for sch, op, (dt, (n, c, d)) in itertools.product(SCHEDULES, ops, sweep):
        yield (f"{sch} {op} N={n} C={c} D={d} {dt}",
               lambda a=(sch, op, n, c, d, dt): loss_step_launches(*a))
    option_dtypes = ("float32-ieee", "bfloat16") if full else ()
    for sch, dt, op, change in itertools.product(SCHEDULES, option_dtypes, ops, OPTION_CHANGES):
        if op == "prograd" and "normalize" in change:
            continue  # ProGrad always normalises
        label = (f"{sch} {op} N=256 C=1000 D=512 {dt} "
                 + " ".join(f"{k}={v}" for k, v in change.items()))
        yield label, lambda a=(sch, op, dt, change): loss_step_launches(
            a[0], a[1], 256, 1000, 512, a[2], **a[3])
    for dt in ("float32-ieee", "bfloat16", "float16"):
        for numels in ((1,), (16 * 512,), (77 * 512, 512, 3)):
            yield f"projection {numels} {dt}", lambda a=(dt, numels): projection_launches(*a)


# --- binding and compiling as JITFunction.run does -------------------------------------------

def bind(fn, args, kwargs, backend):
    """``(signature, constexprs, attrs, options)`` of a launch, from triton's own binder."""
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return signature, constexprs, attrs, options


def describe_config(fn, constexprs, options):
    names = fn.arg_names
    consts = {names[k[0]]: getattr(v, "value", v) for k, v in constexprs.items() if len(k) == 1}
    shown = {k: v for k, v in consts.items() if k.isupper() and k != "CAST_FP32"}
    shown.update(warps=options.num_warps, stages=options.num_stages)
    return " ".join(f"{k}={v}" for k, v in shown.items())


def is_int_argument(fn, path, value) -> bool:
    return len(path) == 1 and not fn.params[path[0]].is_constexpr and isinstance(value, int)


def schedule_key(arch, fn, signature, constexprs, attrs, options):
    """What decides the schedule of a launch: the kernel, pointer types and alignment, the
    constexpr options and block sizes, warps and stages; not the 16-divisibility or unit value of
    the integer sizes (``N``, ``C``, ``D``), which only simplify masks and vectorise loads.
    Launches sharing a key are compiled once, at the least specialised of them."""
    pointers = tuple((k, v) for k, v in signature.items() if v.startswith("*"))
    pointer_attrs = tuple((k, repr(v)) for k, v in sorted(attrs.items())
                          if signature[fn.arg_names[k[0]]].startswith("*"))
    consts = tuple((k, repr(v)) for k, v in sorted(constexprs.items())
                   if not is_int_argument(fn, k, getattr(v, "value", v)))
    return (arch, fn.__name__, pointers, pointer_attrs, consts, options.hash())


def specialisation_rank(fn, constexprs, attrs) -> int:
    """How specialised a launch is: integer sizes fixed to 1 or known divisible by 16."""
    ones = sum(is_int_argument(fn, k, getattr(v, "value", v)) for k, v in constexprs.items())
    return ones + sum(1 for v in attrs.values() if v)


def launch_identity(fn, args, kwargs):
    """Equal for launches that bind alike (the chunks of one call): what binding looks at."""
    def part(a):
        if isinstance(a, torch.Tensor):
            return (a.dtype, a.data_ptr() % 16)
        return a if isinstance(a, (int, float, str, bool, type(None))) else repr(a)
    return (fn, tuple(part(a) for a in args),
            tuple(sorted((k, part(v)) for k, v in kwargs.items())))


def collect_jobs(arches, scenario_list):
    """One job per schedule key over every scenario and arch (the least specialised launch)."""
    launches = {}
    for label, thunk in scenario_list:
        for fn, args, kwargs, grid in thunk():
            entry = launches.setdefault(launch_identity(fn, args, kwargs),
                                        (fn, args, kwargs, [], [1]))
            if label not in entry[3]:
                entry[3].append(label)
            entry[4][0] = max(entry[4][0], grid[1] if len(grid) > 1 else 1)
    jobs, index = [], {}
    for arch in arches:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for fn, args, kwargs, labels, (grid_y,) in launches.values():
            signature, constexprs, attrs, options = bind(fn, args, kwargs, backend)
            key = schedule_key(arch, fn, signature, constexprs, attrs, options)
            job = dict(arch=arch, kernel=fn.__name__, fn=fn, signature=signature,
                       constexprs=constexprs, attrs=attrs, options=options,
                       config=describe_config(fn, constexprs, options), used_by=list(labels),
                       grid_y=grid_y, rank=specialisation_rank(fn, constexprs, attrs))
            if key not in index:
                index[key] = len(jobs)
                jobs.append(job)
                continue
            kept = jobs[index[key]]
            used_by = kept["used_by"] + [x for x in labels if x not in kept["used_by"]]
            grid_y = max(kept["grid_y"], grid_y)
            if job["rank"] < kept["rank"]:
                jobs[index[key]] = job
            jobs[index[key]].update(used_by=used_by, grid_y=grid_y)
    return jobs


_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # bytes per STL/LDL


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack and spill bytes (the widths of the STL/LDL instructions, as ptxas -v
    counts them) of a cubin, from the cuobjdump shipped with triton."""
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    stores = loads = 0
    for m in re.finditer(r"\b(STL|LDL)(?:\.([A-Z0-9]+))?\b", sass):
        width = _WIDTH.get(m.group(2), 4)
        if m.group(1) == "STL":
            stores += width
        else:
            loads += width
    return dict(registers=regs, stack=stack, spill_stores=stores, spill_loads=loads)


_JOBS: list = []


def compile_job(i: int) -> dict:
    job = _JOBS[i]
    target = GPUTarget("cuda", job["arch"], 32)
    row = dict(arch=job["arch"], kernel=job["kernel"], config=job["config"],
               used_by=job["used_by"], grid_y=job["grid_y"])
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(job["fn"], job["signature"], job["constexprs"],
                                          job["attrs"]),
                                target=target, options=job["options"].__dict__)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the report
        row.update(error=f"{type(exc).__name__}: {str(exc)[-2000:]}",
                   seconds=time.perf_counter() - start)
        return row
    ptx = kernel.asm["ptx"]
    row.update(cubin_resources(kernel.asm["cubin"]))
    row.update(shared=int(kernel.metadata.shared), shared_limit=SHARED_LIMIT[job["arch"]],
               mma="wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else ""),
               cp_async="tma" if "cp.async.bulk.tensor" in ptx else (
                   "cp.async" if "cp.async" in ptx else ""),
               seconds=time.perf_counter() - start, error=None)
    return row


def compile_all(jobs, n_jobs: int) -> list[dict]:
    global _JOBS
    _JOBS = jobs
    if n_jobs <= 1:
        return [compile_job(i) for i in range(len(jobs))]
    # fork: the workers inherit the jobs (kernels and bound arguments) instead of pickling them.
    with concurrent.futures.ProcessPoolExecutor(
            n_jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(compile_job, range(len(jobs))))


def render(rows) -> str:
    head = ("| arch | kernel | config | launched for (first of) | grid y | regs | spill st/ld B | "
            "stack B | shared B | mma | async copy | compile s |")
    lines = [head, "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: (r["arch"], r["kernel"], r["config"])):
        first = f"{r['used_by'][0]} ({len(r['used_by'])})"
        if r["error"]:
            lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | {first} | "
                         f"{r['grid_y']} | ERROR: {r['error'].splitlines()[0][:120]} "
                         "| | | | | | |")
            continue
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | {first} | {r['grid_y']} | "
            f"{r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['shared']} | "
            f"{r['mma'] or '-'} | {r['cp_async'] or '-'} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--c", type=int, default=1000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dtype", choices=tuple(DTYPES), action="append")
    p.add_argument("--arch", type=int, choices=tuple(SHARED_LIMIT), action="append")
    p.add_argument("--grid", choices=("ci", "full", "losses"),
                   help="a matrix of shapes, dtypes and options instead of one shape")
    p.add_argument("--jobs", type=int, default=1, help="compile processes")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--markdown", help="write the table here, under a title naming the shape")
    args = p.parse_args(argv)
    arches = tuple(args.arch or ((80, 90) if args.grid else (90,)))
    start = time.perf_counter()
    jobs = collect_jobs(arches, list(scenarios(args.grid, args.n, args.c, args.d,
                                               tuple(args.dtype or ("bfloat16",)))))
    rows = compile_all(jobs, args.jobs)
    wall = time.perf_counter() - start
    header = (f"triton {triton.__version__}, torch {torch.__version__}, targets "
              + ", ".join(f'GPUTarget("cuda", {a}, 32)' for a in arches)
              + f"; {len(rows)} distinct compiles in {wall:.0f} s wall ({args.jobs} processes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, wall_seconds=wall, rows=rows), f, indent=1)
    table = render(rows)
    if args.markdown:
        what = (f"--grid {args.grid}" if args.grid else
                f"N={args.n} C={args.c} D={args.d} {', '.join(args.dtype or ['bfloat16'])}")
        with open(args.markdown, "w") as f:
            f.write(f"# Compiled Triton kernels, {what}\n\n"
                    "`python bench/kernel_schedules.py` (offline compiles, no GPU): one row per "
                    "distinct compile of both CUDA schedules' training steps (both ops, forward "
                    "and backward) and the projection. Spill bytes: STL/LDL widths in the "
                    "cubin; shared: dynamic shared memory per block; compile seconds include "
                    "triton cache hits.\n\n"
                    f"{header}\n\n{table}\n")
    print(header)
    print(table)
    return rows


if __name__ == "__main__":
    main()
