"""Benchmark fastprompt.clip_cross_entropy (fused backend) against the plain-torch reference, eager
and under torch.compile: forward and forward+backward, median time and peak memory.

    python bench/bench_clip_cross_entropy.py                 # the issue's grid (CPU skips N=65536)
    python bench/bench_clip_cross_entropy.py --n 256 --c 1000 --d 512 --double-softmax

Image features are frozen (cached features, as in training); text features and nothing else
require grad. Writes bench/results/clip_cross_entropy-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

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


def providers(double_softmax):
    def fused(x, t, y, s):
        return fastprompt.clip_cross_entropy(x, t, y, s, double_softmax=double_softmax)

    def eager(x, t, y, s):
        return reference.clip_cross_entropy_unchecked(x, t, y, s, double_softmax, 0.0, None, None, True, "mean")

    compiled = torch.compile(eager, dynamic=False)
    return {"fused": fused, "reference": eager, "reference_compiled": compiled}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[32, 256, 4096, 65536])
    p.add_argument("--c", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--d", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--double-softmax", action="store_true", help="only DSPT (default: both losses)")
    p.add_argument("--modes", nargs="+", default=["forward", "forward_backward"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-cpu-n", type=int, default=4096, help="skip larger N on CPU (eager is minutes)")
    p.add_argument("--min-run-time", type=float, default=0.5)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | backend {env['backend']} "
          f"| threads {env['threads']}", flush=True)

    rows, table = [], []
    losses = [True] if args.double_softmax else [False, True]
    for dts, ds, n, c, d in itertools.product(dtypes, losses, args.n, args.c, args.d):
        if device.type == "cpu" and n > args.max_cpu_n:
            continue
        dtype = DTYPES[dts]
        x, t, y, s = make_case(n, c, d, dtype, device)
        fns = providers(ds)
        if args.no_compile:
            fns.pop("reference_compiled")
        for mode in args.modes:
            point = {"n": n, "c": c, "d": d, "dtype": dts, "double_softmax": ds, "mode": mode}
            res = {}
            for name, fn in fns.items():
                step = run_point(fn, x, t, y, s, mode)
                step()  # warm-up (and compilation)
                res[name] = {**common.time_ms(step, device, args.min_run_time),
                             "peak_bytes": common.peak_memory_bytes(step, device)}
            fused, eager = res["fused"], res["reference"]
            point.update(providers=res,
                         speedup_vs_eager=eager["median_ms"] / fused["median_ms"],
                         memory_ratio_vs_eager=fused["peak_bytes"] / max(eager["peak_bytes"], 1),
                         fused_tflops=flops(n, c, d, mode, ds) / fused["median_ms"] / 1e9)
            if "reference_compiled" in res:
                point["speedup_vs_compiled"] = res["reference_compiled"]["median_ms"] / fused["median_ms"]
            rows.append(point)
            line = [n, c, d, dts, "dspt" if ds else "ce", mode, f"{fused['median_ms']:.3f}",
                    f"{eager['median_ms']:.3f}",
                    f"{res['reference_compiled']['median_ms']:.3f}" if "reference_compiled" in res else "-",
                    f"{point['speedup_vs_eager']:.2f}x",
                    f"{point.get('speedup_vs_compiled', float('nan')):.2f}x",
                    f"{fused['peak_bytes'] / 2**20:.1f}", f"{eager['peak_bytes'] / 2**20:.1f}",
                    f"{point['fused_tflops']:.3f}"]
            table.append(line)
            print(" | ".join(str(v) for v in line), flush=True)
    header = ["N", "C", "D", "dtype", "loss", "mode", "fused ms", "eager ms", "compiled ms",
              "vs eager", "vs compiled", "fused MiB", "eager MiB", "fused TFLOP/s"]
    md = (f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; backend "
          f"{env['backend']}; threads {env['threads']}; {env['timestamp']}\n\n"
          + common.markdown_table(header, table))
    path = common.write_results("clip_cross_entropy", env, rows, md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
