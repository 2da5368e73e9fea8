"""Benchmark fastprompt.logits_cross_entropy (fused backend) against the plain-torch reference,
eager and under torch.compile: forward and forward+backward, median time and peak memory, over a
grid of N, C, dtype and loss (cross-entropy, DSPT, GCE with q = 0.5, and NLPrompt's per-row
choice: half the rows cross-entropy, half MAE).

    python bench/bench_logits_cross_entropy.py --threads 2          # the default grid
    python bench/bench_logits_cross_entropy.py --n 4096 --c 1000 --loss gce --modes forward_backward

The logits are a leaf that requires grad (a CoCoOp-style step differentiates through them);
hard labels, or ATLaS's targets with ε = 0.2 (``--targets classwise|instancewise``). The fused
op runs with its value checks on, as shipped (the soft-label table's are a pass over the
table); the eager baseline is the reference without checks. Writes
bench/results/<name>-<device>.{json,md}.

Timing as in bench_clip_cross_entropy.py: the providers of a point interleaved in rounds (median
of the rounds' medians) with the run's thread count; peak memory in a child process
(``--peaks-only``), after the timings, for the fused and eager providers.
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
# loss name -> (double_softmax, loss, q); "nlprompt": q = 0 (cross-entropy) on even rows, 1 (MAE)
# on odd rows.
LOSSES = {"ce": (False, "ce", 0.5), "dspt": (True, "ce", 0.5), "gce": (False, "gce", 0.5),
          "dspt-gce": (True, "gce", 0.5), "nlprompt": (False, "gce", "rows")}


def make_case(n, c, dtype, device, targets, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (4 * torch.randn(n, c, generator=g)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, c, (n,), generator=g).to(device)
    kw = {}
    if targets == "classwise":
        kw = dict(smoothing=0.2, soft_labels=torch.softmax(torch.randn(c, c, generator=g), 1))
    elif targets == "instancewise":
        kw = dict(smoothing=0.2, sample_index=torch.arange(n),
                  soft_labels=torch.softmax(torch.randn(n, c, generator=g), 1))
    return z, labels, {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}


def providers(loss_name, n, device):
    double_softmax, loss, q = LOSSES[loss_name]
    if q == "rows":
        q = (torch.arange(n, device=device) % 2).float()
    q_value = 0.0 if loss == "ce" else q

    def fused(z, y, kw):
        return fastprompt.logits_cross_entropy(z, y, double_softmax=double_softmax, loss=loss,
                                               q=q, **kw)

    def eager(z, y, kw):
        return reference.logits_cross_entropy_unchecked(
            z, y, double_softmax, kw.get("smoothing", 0.0), kw.get("soft_labels"),
            kw.get("sample_index"), "mean", 0.0 if torch.is_tensor(q_value) else q_value,
            q_value if torch.is_tensor(q_value) else None)

    compiled = torch.compile(eager, dynamic=False)
    return {"fused": fused, "reference": eager, "reference_compiled": compiled}


def run_point(fn, z, y, kw, mode):
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(z, y, kw)
    else:
        def step():
            z.grad = None
            fn(z, y, kw).backward()
    return step


def _grid(args, dtypes):
    return list(itertools.product(dtypes, args.loss, args.n, args.c))


def _key(point, provider):
    return "|".join(str(point[k]) for k in ("dtype", "loss", "n", "c", "mode")) + "|" + provider


def _peaks_only(args):
    """The child process: peak memory of the fused and eager providers at every point."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    for dts, loss, n, c in _grid(args, args.dtype or _default_dtypes(device)):
        z, y, kw = make_case(n, c, DTYPES[dts], device, args.targets)
        fns = providers(loss, n, device)
        fns.pop("reference_compiled")
        for mode in args.modes:
            point = {"n": n, "c": c, "dtype": dts, "loss": loss, "mode": mode}
            for name, fn in fns.items():
                out[_key(point, name)] = common.peak_memory_bytes(run_point(fn, z, y, kw, mode),
                                                                  device)
    with open(args.peaks_only, "w") as f:
        json.dump(out, f)


def _default_dtypes(device):
    return ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]


def _peaks(argv, device, pending):
    if device.type == "cuda":
        return {_key(point, name): common.peak_memory_bytes(step, device)
                for point, steps in pending for name, step in steps.items()
                if name != "reference_compiled"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peaks.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--peaks-only", path],
                       check=True)
        with open(path) as f:
            return json.load(f)


def _line(point):
    res = point["providers"]
    compiled = res.get("reference_compiled")

    def mib(name):
        peak = res.get(name, {}).get("peak_bytes")
        return "-" if peak is None else f"{peak / 2**20:.1f}"
    return [point["n"], point["c"], point["dtype"], point["loss"], point["mode"],
            f"{res['fused']['median_ms']:.3f}", f"{res['reference']['median_ms']:.3f}",
            f"{compiled['median_ms']:.3f}" if compiled else "-",
            f"{point['speedup_vs_eager']:.2f}x",
            f"{point['speedup_vs_compiled']:.2f}x" if compiled else "-",
            mib("fused"), mib("reference")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--c", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES))
    p.add_argument("--loss", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--targets", default="hard", choices=("hard", "classwise", "instancewise"))
    p.add_argument("--modes", nargs="+", default=["forward", "forward_backward"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="seconds of timing per provider and point, split over the rounds")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per point")
    p.add_argument("--name", default="logits_cross_entropy",
                   help="results file stem: bench/results/<name>-<device>.{json,md}")
    p.add_argument("--peaks-only", metavar="JSON", default=None,
                   help="internal: only measure peak memory (fused, eager) and write it here")
    args = p.parse_args(argv)
    if args.peaks_only:
        return _peaks_only(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    env["load_average_start"] = os.getloadavg()
    env["command"] = "python bench/bench_logits_cross_entropy.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    env["targets"] = args.targets + ("" if args.targets == "hard" else ", smoothing 0.2")
    print(f"# {env['device']} | torch {env['torch']} | backend {env['backend']} | threads "
          f"{env['threads']} | load {env['load_average_start']}", flush=True)
    pending = []
    for dts, loss, n, c in _grid(args, args.dtype or _default_dtypes(device)):
        z, y, kw = make_case(n, c, DTYPES[dts], device, args.targets)
        torch._dynamo.reset()  # each point compiles anew (dynamo's recompile limit)
        fns = providers(loss, n, device)
        if args.no_compile:
            fns.pop("reference_compiled")
        for mode in args.modes:
            point = {"n": n, "c": c, "dtype": dts, "loss": loss, "mode": mode}
            steps = {name: run_point(fn, z, y, kw, mode) for name, fn in fns.items()}
            res = common.interleaved_times(steps, device, args.min_run_time, args.rounds)
            point.update(providers=res,
                         speedup_vs_eager=res["reference"]["median_ms"] / res["fused"]["median_ms"])
            if "reference_compiled" in res:
                point["speedup_vs_compiled"] = (res["reference_compiled"]["median_ms"]
                                                / res["fused"]["median_ms"])
            print(" | ".join(str(v) for v in _line(point)), flush=True)
            pending.append((point, steps))
    env["load_average_end"] = os.getloadavg()
    peaks = _peaks(argv if argv is not None else sys.argv[1:], device, pending)
    rows, table = [], []
    for point, steps in pending:
        for name in steps:
            point["providers"][name]["peak_bytes"] = peaks.get(_key(point, name))
        rows.append(point)
        table.append(_line(point))
    header = ["N", "C", "dtype", "loss", "mode", "fused ms", "eager ms", "compiled ms",
              "vs eager", "vs compiled", "fused MiB", "eager MiB"]
    md = (f"Device: {env['device']} ({env['cpu_model']}); torch {env['torch']}; triton "
          f"{env.get('triton')}; backend {env['backend']}; threads {env['threads']}; "
          f"{env['timestamp']}; load average {env['load_average_start'][0]:.2f} at the start, "
          f"{env['load_average_end'][0]:.2f} at the end; median of {args.rounds} interleaved "
          f"rounds; targets {env['targets']}. Command: `{env['command']}`. Losses: ce, dspt "
          "(double softmax), gce (q = 0.5), dspt-gce, nlprompt (per-row q: half the rows "
          "cross-entropy, half MAE, one call). MiB: peak memory above the inputs (fused and "
          "eager; the compiled baseline's is not measured).\n\n"
          + common.markdown_table(header, table))
    path = common.write_results(args.name, env, rows, md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
