"""Benchmark fastprompt.clip_cross_entropy (fused backend) against the plain-torch reference, eager
and under torch.compile: forward and forward+backward, median time and peak memory.

    python bench/bench_clip_cross_entropy.py                 # the issue's grid (CPU skips N=65536)
    python bench/bench_clip_cross_entropy.py --max-cpu-n 65536 --max-cpu-logits 7000000
                                                             # CPU: N=65536 too, except C=1000
    python bench/bench_clip_cross_entropy.py --n 256 --c 1000 --d 512 --double-softmax
    python bench/bench_clip_cross_entropy.py --n 256 4096 --c 1000 --d 512 --loss ce gce nlprompt \
        --modes forward_backward --name clip_cross_entropy-gce      # GCE/MAE against eager

Image features are frozen (cached features, as in training); text features and nothing else
require grad. Writes bench/results/clip_cross_entropy-<device>.{json,md}.

Timing: the providers of a point are interleaved in rounds (median of the rounds' medians), so
that load drifting on a shared machine hits them alike, with the run's thread count (on CPU,
``torch.utils.benchmark.Timer`` would otherwise use one thread). Peak memory is measured in a
separate process (``--peaks-only``, started by this one): ``common.peak_memory_bytes`` fixes
glibc's mmap threshold for the rest of its process (so the resident high-water mark sees every
temporary), and under that setting every large allocation is a fresh mmap whose pages fault in on
first touch (about 7 ms for one 16 MB buffer here), which would tax timings taken after it by how
many buffers a provider allocates rather than by what it computes; measured after other points'
timings in one process, the high-water mark also picks up heap growth that is not the op's.
``--fresh-pages`` times in the fixed-threshold regime on purpose. The torch.compile baseline's
peak is not measured (it would compile every point a second time).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt import _backend, reference  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_case(n, c, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device, dtype)
    t = torch.randn(c, d, generator=g).to(device, dtype).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    return x, t, labels, torch.tensor(100.0, device=device)


# --loss: the task loss as (loss, q); "nlprompt": one call, cross-entropy on even rows and MAE on
# odd rows (GCE with one exponent per row).
LOSSES = {"ce": ("ce", 0.0), "gce": ("gce", 0.5), "mae": ("mae", 1.0), "nlprompt": ("gce", "rows")}


def providers(double_softmax, loss="ce", n=None, device=None):
    name, q = LOSSES[loss]
    if q == "rows":
        q = (torch.arange(n, device=device) % 2).float()
    q_rows = q if torch.is_tensor(q) else None
    q_value = 0.0 if torch.is_tensor(q) else q

    def fused(x, t, y, s):
        return fastprompt.clip_cross_entropy(x, t, y, s, double_softmax=double_softmax,
                                             loss=name, q=q if name == "gce" else 0.5)

    def eager(x, t, y, s):
        return reference.clip_cross_entropy_unchecked(x, t, y, s, double_softmax, 0.0, None, None,
                                                      True, "mean", q_value, q_rows)

    compiled = torch.compile(eager, dynamic=False)
    return {"fused": fused, "reference": eager, "reference_compiled": compiled}


PRODUCTS = "products"


def products_step(x, t, mode):
    """The matrix products the fused schedule cannot avoid, as plain torch matmuls of the same
    shapes and dtype: the logits X Tᵀ, plus Gᵀ X (an N x C operand) for the text gradient. Their
    time is the floor the fused op is measured against, their TFLOP/s the device's matmul rate
    at this shape. Timed beside the providers; no peak memory (it is not a way to the loss)."""
    t_rows = t.detach()

    def step():
        with torch.no_grad():
            z = x @ t_rows.T
            if mode != "forward":
                z.T @ x
    return step


def run_point(fn, x, t, y, s, mode):
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(x, t, y, s)
    else:
        def step():
            t.grad = None
            fn(x, t, y, s).backward()
    return step


def flops(n, c, d, mode, double_softmax):
    """Matmul FLOPs of the fused schedule (2·N·C·D per product): logits, plus Gᵀ X̂ for the text grad."""
    return 2 * n * c * d * (1 if mode == "forward" else 2)


def _grid(args, dtypes, device):
    softmaxes = [True] if args.double_softmax else [False, True]
    return [(dts, ds, loss, n, c, d)
            for dts, ds, loss, n, c, d in itertools.product(dtypes, softmaxes, args.loss, args.n,
                                                            args.c, args.d)
            if not (device.type == "cpu" and (n > args.max_cpu_n or (
                args.max_cpu_logits is not None and n * c > args.max_cpu_logits)))]


def _key(point, provider):
    return "|".join(str(point[k]) for k in ("dtype", "double_softmax", "loss", "n", "c", "d",
                                             "mode")) + "|" + provider


def _peaks_only(args):
    """The child process: peak memory of the fused and eager providers at every point, each
    after one warm-up call, with the fixed mmap threshold from the start."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    out = {}
    for dts, ds, loss, n, c, d in _grid(args, dtypes, device):
        x, t, y, s = make_case(n, c, d, DTYPES[dts], device)
        fns = providers(ds, loss, n, device)
        fns.pop("reference_compiled")
        for mode in args.modes:
            point = {"n": n, "c": c, "d": d, "dtype": dts, "double_softmax": ds, "loss": loss,
                     "mode": mode}
            for name, fn in fns.items():
                out[_key(point, name)] = common.peak_memory_bytes(run_point(fn, x, t, y, s, mode),
                                                                  device)
    with open(args.peaks_only, "w") as f:
        json.dump(out, f)


def _peaks_in_child(argv, device, pending):
    if device.type == "cuda":  # the CUDA allocator's peak is exact in this process
        return {_key(point, name): common.peak_memory_bytes(step, device)
                for point, steps in pending for name, step in steps.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peaks.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--peaks-only", path],
                       check=True)
        with open(path) as f:
            return json.load(f)


def _line(point, peaks):
    res = point["providers"]
    fused, eager = res["fused"], res["reference"]
    compiled = res.get("reference_compiled")
    products = res[PRODUCTS]

    def mib(r):
        return f"{r['peak_bytes'] / 2**20:.1f}" if peaks and r and r.get("peak_bytes") is not None \
            else "-"
    loss = point.get("loss", "ce")
    label = ("dspt" if point["double_softmax"] else "ce") if loss == "ce" else (
        ("dspt+" if point["double_softmax"] else "") + loss)
    return [point["n"], point["c"], point["d"], point["dtype"], label, point["mode"],
            f"{fused['median_ms']:.3f}", f"{eager['median_ms']:.3f}",
            f"{compiled['median_ms']:.3f}" if compiled else "-",
            f"{point['speedup_vs_eager']:.2f}x",
            f"{point.get('speedup_vs_compiled', float('nan')):.2f}x",
            mib(fused), mib(eager), mib(compiled),
            f"{point['memory_ratio_vs_eager']:.2f}" if peaks else "-",
            f"{point['fused_tflops']:.3f}", f"{products['median_ms']:.3f}",
            f"{point['products_tflops']:.3f}", f"{point['products_fraction']:.2f}"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[32, 256, 4096, 65536])
    p.add_argument("--c", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--d", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--double-softmax", action="store_true", help="only DSPT (default: both losses)")
    p.add_argument("--loss", nargs="+", default=["ce"], choices=list(LOSSES),
                   help="task losses (each with and without DSPT): ce, gce (q = 0.5), mae, "
                        "nlprompt (per-row: half cross-entropy, half MAE)")
    p.add_argument("--modes", nargs="+", default=["forward", "forward_backward"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-cpu-n", type=int, default=4096, help="skip larger N on CPU (eager is minutes)")
    p.add_argument("--max-cpu-logits", type=int, default=None,
                   help="also skip CPU points with more than this many logits (N x C)")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="seconds of timing per provider and point, split over the rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per point")
    p.add_argument("--fresh-pages", action="store_true",
                   help="time with glibc's mmap threshold fixed at 64 kB (every large buffer "
                        "page-faulted afresh), the regime the peak-memory measurement needs")
    p.add_argument("--name", default="clip_cross_entropy",
                   help="results file stem: bench/results/<name>-<device>.{json,md}")
    p.add_argument("--peaks-only", metavar="JSON", default=None,
                   help="internal: only measure peak memory (fused, eager) and write it here")
    args = p.parse_args(argv)
    if args.peaks_only:
        return _peaks_only(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    env["load_average_start"] = os.getloadavg()
    env["command"] = "python bench/bench_clip_cross_entropy.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | backend {env['backend']} "
          f"| threads {env['threads']}", flush=True)

    if args.fresh_pages and device.type == "cpu":
        common._fix_malloc()
    grid = _grid(args, dtypes, device)
    env["fresh_pages"] = bool(args.fresh_pages)
    env["rounds"] = args.rounds
    pending = []  # (point, {provider: step}), timed; peak memory measured after every timing
    for dts, ds, loss, n, c, d in grid:
        dtype = DTYPES[dts]
        x, t, y, s = make_case(n, c, d, dtype, device)
        # Every point compiles the same function anew: without a reset, dynamo's recompile limit
        # (8) is reached after a few points and the "compiled" baseline silently runs eagerly.
        torch._dynamo.reset()
        fns = providers(ds, loss, n, device)
        if args.no_compile:
            fns.pop("reference_compiled")
        for mode in args.modes:
            point = {"n": n, "c": c, "d": d, "dtype": dts, "double_softmax": ds, "loss": loss,
                     "mode": mode}
            steps = {name: run_point(fn, x, t, y, s, mode) for name, fn in fns.items()}
            res = common.interleaved_times({**steps, PRODUCTS: products_step(x, t, mode)}, device,
                                    args.min_run_time, args.rounds)
            fused, eager = res["fused"], res["reference"]
            work = flops(n, c, d, mode, ds)
            point.update(providers=res, speedup_vs_eager=eager["median_ms"] / fused["median_ms"],
                         fused_tflops=work / fused["median_ms"] / 1e9,
                         products_tflops=work / res[PRODUCTS]["median_ms"] / 1e9,
                         products_fraction=res[PRODUCTS]["median_ms"] / fused["median_ms"])
            if "reference_compiled" in res:
                point["speedup_vs_compiled"] = res["reference_compiled"]["median_ms"] / fused["median_ms"]
            print(" | ".join(str(v) for v in _line(point, peaks=False)), flush=True)
            pending.append((point, steps))
    env["load_average_end"] = os.getloadavg()
    peaks = _peaks_in_child(argv if argv is not None else sys.argv[1:], device, pending)
    rows, table = [], []
    for point, steps in pending:
        for name in steps:
            point["providers"][name]["peak_bytes"] = peaks.get(_key(point, name))
        prov = point["providers"]
        point["memory_ratio_vs_eager"] = (prov["fused"]["peak_bytes"]
                                          / max(prov["reference"]["peak_bytes"], 1))
        rows.append(point)
        table.append(_line(point, peaks=True))
    header = ["N", "C", "D", "dtype", "loss", "mode", "fused ms", "eager ms", "compiled ms",
              "vs eager", "vs compiled", "fused MiB", "eager MiB", "compiled MiB",
              "fused/eager memory", "fused TFLOP/s", "products ms", "products TFLOP/s",
              "products / fused"]
    md = (f"Device: {env['device']} ({env['cpu_model']}); torch {env['torch']}; triton "
          f"{env['triton']}; backend {env['backend']}; threads {env['threads']}; "
          f"{env['timestamp']}; load average {env['load_average_start'][0]:.2f} at the start, "
          f"{env['load_average_end'][0]:.2f} at the end; command `{env['command']}`; median of "
          f"{args.rounds} interleaved rounds"
          f"{'; fresh pages (mmap threshold fixed)' if args.fresh_pages else ''}. "
          "TFLOP/s count the schedule's unavoidable products (2·N·C·D each: the logits, plus Gᵀ X "
          "for the text gradient); 'products' times exactly those as plain torch matmuls of the "
          "same shapes and dtype (the floor; its TFLOP/s are the device's matmul rate there), "
          "'products / fused' is the fraction of the fused op's time they would take.\n\n"
          + common.markdown_table(header, table))
    path = common.write_results(args.name, env, rows, md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
