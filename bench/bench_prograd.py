"""Benchmark ProGrad: the fused losses, the batched backward and the multi-tensor projection,
each against the way the official ProGrad code does it.

    python bench/bench_prograd.py                     # all three parts
    python bench/bench_prograd.py --parts losses projection --repeats 5

1. losses: ``fastprompt.prograd_losses`` (one fused pass for CE and the distillation loss) vs the
   official code's separate ``F.cross_entropy`` and ``ProGradLoss`` on shared logits, forward and
   forward+backward (text features require grad).
2. backward: a CoOp step through an open_clip text transformer (width 512, 12 layers, 77 tokens,
   random weights, C=100 prompts, 16 learned context tokens): ``fastprompt.prograd_backward``
   with its per-device default, forced to one batched backward (``batched=True``,
   ``is_grads_batched``) and forced to two passes (``batched=False``), vs the official two
   backward passes with ``retain_graph`` (``fastprompt.reference.prograd_backward``); the same
   forward and fused losses on every side, sides interleaved.
3. projection: ``fastprompt.project_conflicting_`` (one multi-tensor kernel) vs the official
   per-parameter Python loop, over the parameter shapes of that text transformer.

Writes bench/results/prograd-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt import _backend, reference  # noqa: E402


PEAKS_ONLY = False  # set in the --peaks-only child: build the steps, time nothing


def interleaved_times(steps, device, min_run_time):
    """``common.interleaved_times``; nothing is timed in the ``--peaks-only`` child."""
    if PEAKS_ONLY:
        return {name: {"median_ms": float("nan")} for name in steps}
    return common.interleaved_times(steps, device, min_run_time)


# Peak memory is measured in a separate process (``--peaks-only``, started by this one), each
# step after one warm-up call: common.peak_memory_bytes fixes glibc's mmap threshold for the rest
# of its process, and timings taken after that page-fault every large buffer afresh (measured after
# other timings in one process, the high-water mark also picks up heap growth that is not the
# step's). Each part returns its rows, its (providers, steps) pairs and a function that renders
# its markdown once the peaks are in.


def measure_peaks(pending, device, argv):
    if device.type == "cuda":  # the CUDA allocator's peak is exact in this process
        for providers, steps in pending:
            for name, step in steps.items():
                providers[name]["peak_bytes"] = common.peak_memory_bytes(step, device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "peaks.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--peaks-only", path],
                       check=True)
        with open(path) as f:
            peaks = json.load(f)
    for k, (providers, steps) in enumerate(pending):
        for name in steps:
            providers[name]["peak_bytes"] = peaks[f"{k}|{name}"]


# --- the official code's way --------------------------------------------------------------------

def official_losses(x, t, t0, labels, s, temperature=1.0, double_softmax=False):
    """Logits once, then cross-entropy and ProGradLoss's soft-target KL, as the official code."""
    x = x / x.norm(dim=-1, keepdim=True)
    logits = s * x @ (t / t.norm(dim=-1, keepdim=True)).t()
    with torch.no_grad():
        zs_logits = s * x @ (t0 / t0.norm(dim=-1, keepdim=True)).t()
    xe = F.cross_entropy(torch.softmax(logits, -1) if double_softmax else logits, labels)
    teacher = F.softmax(zs_logits / temperature, dim=-1)
    kl = (-teacher * F.log_softmax(logits / temperature, -1) * temperature * temperature).sum(1).mean()
    return xe, kl


def official_projection(grads, refs, lam):
    """The official per-parameter loop (normalised vectors, a Python ``if`` per tensor)."""
    for i, (a, b) in enumerate(zip(grads, refs)):
        b_unit = b / torch.linalg.norm(b)
        a_unit = a / torch.linalg.norm(a)
        if torch.dot(a_unit.flatten(), b_unit.flatten()) < 0:
            grads[i] = a - lam * torch.dot(a.flatten(), b_unit.flatten()) * b_unit


# --- part 1: losses ----------------------------------------------------------------------------------

def bench_losses(device, shapes, dtype, min_run_time):
    rows, pending = [], []
    for n, c, d in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g).to(device, dtype)
        t = torch.randn(c, d, generator=g).to(device, dtype).requires_grad_()
        t0 = torch.randn(c, d, generator=g).to(device, dtype)
        labels = torch.randint(0, c, (n,), generator=g).to(device)
        s = torch.tensor(100.0, device=device)
        for ds in (False, True):
            # Every value bound now (default arguments): the steps run again after the loop,
            # when the peak memory is measured.
            args = (x, t, t0, labels, s)
            fns = {"fused": lambda a=args, ds=ds: fastprompt.prograd_losses(*a, double_softmax=ds),
                   "official": lambda a=args, ds=ds: official_losses(*a, double_softmax=ds)}
            for mode in ("forward", "forward_backward"):
                steps = {}
                for name, fn in fns.items():
                    if mode == "forward":
                        def step(fn=fn):
                            with torch.no_grad():
                                fn()
                    else:
                        def step(fn=fn, t=t):
                            t.grad = None
                            task, kl = fn()
                            (task + kl).backward()
                    steps[name] = step
                res = interleaved_times(steps, device, min_run_time)
                f, o = res["fused"], res["official"]
                point = {"part": "losses", "n": n, "c": c, "d": d, "dtype": str(dtype).split(".")[-1],
                         "loss": "dspt" if ds else "ce", "mode": mode, "providers": res,
                         "speedup": o["median_ms"] / f["median_ms"]}
                rows.append(point)
                pending.append((res, steps))
                print(f"{n}x{c}x{d} | {point['loss']} | {mode} | {f['median_ms']:.3f} | "
                      f"{o['median_ms']:.3f} | {point['speedup']:.2f}x", flush=True)

    return rows, pending


def render_losses(points):
    table = []
    for point in points:
        f, o = point["providers"]["fused"], point["providers"]["official"]
        table.append([f"{point['n']}x{point['c']}x{point['d']}", point["loss"], point["mode"],
                      f"{f['median_ms']:.3f}", f"{o['median_ms']:.3f}", f"{point['speedup']:.2f}x",
                      f"{f['peak_bytes'] / 2**20:.1f}", f"{o['peak_bytes'] / 2**20:.1f}"])
    header = ["N x C x D", "loss", "mode", "fused ms", "official ms", "speedup", "fused MiB",
              "official MiB"]
    return common.markdown_table(header, table)


# --- part 2: batched backward through a text transformer ------------------------------------------

class PromptedTextEncoder(torch.nn.Module):
    """CoOp's text side with random weights: learned context tokens spliced into fixed token
    embeddings, open_clip's causal text transformer, end-of-text pooling, projection."""

    def __init__(self, classes=100, length=77, width=512, layers=12, n_ctx=16, seed=0):
        super().__init__()
        from open_clip.transformer import Transformer

        gen = torch.Generator().manual_seed(seed)
        self.transformer = Transformer(width, layers, heads=width // 64).requires_grad_(False)
        self.ln_final = torch.nn.LayerNorm(width).requires_grad_(False)
        self.register_buffer("text_projection", torch.randn(width, width, generator=gen) / width**0.5)
        self.register_buffer("embeddings", 0.02 * torch.randn(classes, length, width, generator=gen))
        self.register_buffer("eot", torch.randint(n_ctx + 3, length, (classes,), generator=gen))
        self.register_buffer("attn_mask", torch.full((length, length), float("-inf")).triu_(1))
        self.ctx = torch.nn.Parameter(0.02 * torch.randn(n_ctx, width, generator=gen))
        self.n_ctx = n_ctx

    def forward(self):
        e = self.embeddings
        x = torch.cat([e[:, :1], self.ctx.expand(e.shape[0], -1, -1), e[:, 1 + self.n_ctx:]], dim=1)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return x[torch.arange(x.shape[0]), self.eot] @ self.text_projection


def bench_backward(device, layers, classes, batch, repeats):
    enc = PromptedTextEncoder(classes=classes, layers=layers).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 512, generator=g).to(device)
    t0 = torch.randn(classes, 512, generator=g).to(device)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    s = torch.tensor(100.0, device=device)
    params = [enc.ctx]

    def step(losses_fn, backward_fn):
        def run():
            enc.ctx.grad = None
            task, kl = losses_fn(enc(), x, t0, labels, s)
            backward_fn(task, kl, params)
        return run

    # The same fused losses on both sides: only the backward differs.
    losses = lambda t, x, t0, y, s: fastprompt.prograd_losses(x, t, t0, y, s)  # noqa: E731
    def forced(batched):
        return lambda task, kl, ps: fastprompt.prograd_backward(task, kl, ps, batched=batched)

    # The per-device default is one of the two forced modes; it is not timed twice.
    sides = {"batched": step(losses, forced(True)),
             "two_pass": step(losses, forced(False)),
             "two_backward": step(losses, reference.prograd_backward)}

    def forward_only():
        with torch.no_grad():
            fastprompt.prograd_losses(x, enc(), t0, labels, s)

    times = {name: [] for name in sides}
    times["forward_no_grad"] = []
    for fn in (*sides.values(), forward_only):
        if PEAKS_ONLY:
            break
        fn()  # warm-up
    for _ in range(0 if PEAKS_ONLY else repeats):  # interleaved, so drifting machine load hits both sides alike
        for name, fn in (*sides.items(), ("forward_no_grad", forward_only)):
            times[name].append(_time_once_ms(fn, device))
    res = {name: {"median_ms": statistics.median(v) if v else float("nan"), "times_ms": v}
           for name, v in times.items()}
    o = res["two_backward"]
    fwd = res["forward_no_grad"]["median_ms"]
    point = {"part": "backward", "width": 512, "layers": layers, "tokens": 77, "prompts": classes,
             "n_ctx": 16, "batch": batch, "repeats": repeats, "providers": res,
             "default_is_batched": device.type == "cuda"}
    default = "batched" if point["default_is_batched"] else "two_pass"
    for name in ("batched", "two_pass"):
        b = res[name]
        point[f"speedup_{name}"] = o["median_ms"] / b["median_ms"]
        point[f"backward_speedup_{name}"] = (o["median_ms"] - fwd) / (b["median_ms"] - fwd)
        print(f"{layers}x512, C={classes} | {name} | {b['median_ms']:.0f} | {o['median_ms']:.0f} | "
              f"{fwd:.0f} | {point[f'speedup_{name}']:.2f}x", flush=True)

    return [point], [(res, sides)]


def render_backward(points):
    lines = []
    for point in points:
        res = point["providers"]
        o, fwd = res["two_backward"], res["forward_no_grad"]["median_ms"]
        default = "batched" if point["default_is_batched"] else "two_pass"
        for name in ("batched", "two_pass"):
            b = res[name]
            label = f"{name} (default here)" if name == default else name
            lines.append([f"{point['layers']}x512, C={point['prompts']}, L=77", label,
                          f"{b['median_ms']:.0f}", f"{o['median_ms']:.0f}", f"{fwd:.0f}",
                          f"{point[f'speedup_{name}']:.2f}x",
                          f"{point[f'backward_speedup_{name}']:.2f}x",
                          f"{b['peak_bytes'] / 2**20:.0f}", f"{o['peak_bytes'] / 2**20:.0f}"])
    header = ["text transformer", "fastprompt.prograd_backward", "step ms",
              "official two-backward step ms", "no-grad forward ms", "step speedup",
              "speedup beyond the forward", "MiB", "official MiB"]
    return common.markdown_table(header, lines)


def _time_once_ms(fn, device):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median")
    from torch.utils.benchmark import Timer
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).timeit(1).median * 1e3


# --- part 3: projection ------------------------------------------------------------------------------

def bench_projection(device, layers, min_run_time):
    from open_clip.transformer import Transformer

    shapes = [p.shape for p in Transformer(512, layers, heads=8).parameters()]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(shape, generator=g).to(device) for shape in shapes]
    refs = [torch.randn(shape, generator=g).to(device) for shape in shapes]
    # λ = 0.5 keeps a conflicting pair conflicting (<g,h> halves), so every repetition does the
    # same work on both sides.
    lam = 0.5
    fns = {"fused": lambda: fastprompt.project_conflicting_(grads, refs, lam),
           "reference_loop": lambda: reference.project_conflicting_unchecked_(grads, refs, lam),
           "official_loop": lambda: official_projection(list(grads), refs, lam)}
    res = interleaved_times(fns, device, min_run_time)
    numel = sum(x.numel() for x in grads)
    point = {"part": "projection", "tensors": len(grads), "elements": numel, "providers": res,
             "speedup_vs_official": res["official_loop"]["median_ms"] / res["fused"]["median_ms"],
             "fused_gbps": 2 * 2 * numel * 4 / res["fused"]["median_ms"] / 1e6}
    print(f"projection: {res['fused']['median_ms']:.2f} ms fused, "
          f"{res['official_loop']['median_ms']:.2f} ms official", flush=True)
    return [point], [(res, fns)]


def render_projection(points):
    lines = []
    for point in points:
        res = point["providers"]
        lines.append([f"{point['tensors']} tensors, {point['elements'] / 1e6:.1f} M elements",
                      f"{res['fused']['median_ms']:.2f}", f"{res['official_loop']['median_ms']:.2f}",
                      f"{res['reference_loop']['median_ms']:.2f}",
                      f"{point['speedup_vs_official']:.2f}x", f"{point['fused_gbps']:.1f}"])
    header = ["parameters", "fused ms", "official loop ms", "reference loop ms",
              "speedup vs official", "fused GB/s (2 reads + 1 read/write pass)"]
    return common.markdown_table(header, lines)


SECTIONS = (
    ("losses", "## Fused losses vs the official separate CE + KL (float32)", render_losses),
    ("backward", "## prograd_backward (per-device default, batched, two-pass) vs the official two "
                 "backward passes", render_backward),
    ("projection", "## Multi-tensor projection vs the per-parameter loop", render_projection),
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["losses", "backward", "projection"],
                   choices=["losses", "backward", "projection"])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="image features per step")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved repetitions of the transformer step (default 3 CPU, 20 CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--name", default="prograd",
                   help="results file stem: bench/results/<name>-<device>.{json,md}")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the parts not run from the existing results file")
    p.add_argument("--peaks-only", metavar="JSON", default=None,
                   help="internal: only measure the peak memory of every step, write it here")
    args = p.parse_args(argv)
    global PEAKS_ONLY
    PEAKS_ONLY = args.peaks_only is not None

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    header = (f"Device: {env['device']} ({env['cpu_model']}); torch {env['torch']}; triton "
              f"{env['triton']}; backend {env['backend']}; threads {env['threads']} (timed with "
              f"that many); {env['timestamp']}; every timing taken before any peak-memory "
              "measurement")
    print(header, flush=True)
    rows, pending = [], []
    if "losses" in args.parts:
        shapes = ([(256, 100, 512), (4096, 1000, 512), (65536, 1000, 512)] if device.type == "cuda"
                  else [(256, 100, 512), (2048, 1000, 512)])
        r, todo = bench_losses(device, shapes, torch.float32, args.min_run_time)
        rows += r
        pending += todo
    if "backward" in args.parts:
        repeats = args.repeats or (20 if device.type == "cuda" else 3)
        r, todo = bench_backward(device, args.layers, args.prompts, args.batch, repeats)
        rows += r
        pending += todo
    if "projection" in args.parts:
        r, todo = bench_projection(device, args.layers, args.min_run_time)
        rows += r
        pending += todo
    if PEAKS_ONLY:
        common._fix_malloc()
        peaks = {f"{k}|{name}": common.peak_memory_bytes(step, device)
                 for k, (_, steps) in enumerate(pending) for name, step in steps.items()}
        with open(args.peaks_only, "w") as f:
            json.dump(peaks, f)
        return
    measure_peaks(pending, device, argv if argv is not None else sys.argv[1:])
    for row in rows:
        row["timestamp"] = env["timestamp"]
        row["machine"] = env["cpu_model"] if device.type == "cpu" else env["device"]
    if args.merge:  # keep the other parts' rows of the existing results file
        path = os.path.join(common.RESULTS_DIR, f"{args.name}-"
                            + ("cpu" if device.type == "cpu" else "cuda-" + env["device"].replace(" ", "_"))
                            + ".json")
        if os.path.exists(path):
            with open(path) as f:
                previous = json.load(f)
            old = previous["results"]
            for row in old:  # rows of an earlier run carry their own time and machine
                row.setdefault("timestamp", previous["environment"].get("timestamp", "earlier run"))
                row.setdefault("machine", previous["environment"].get(
                    "cpu_model" if device.type == "cpu" else "device", "unknown"))
            rows = [row for row in old if row["part"] not in args.parts] + rows
    sections = [header]
    for part, title, render in SECTIONS:
        points = [row for row in rows if row["part"] == part]
        if points:
            runs = sorted({f"{row['timestamp']} on {row['machine']}" for row in points})
            sections += [f"{title} (run {', '.join(runs)})", render(points)]
    md = "\n\n".join(sections)
    print("\n" + md)
    print(f"wrote {common.write_results(args.name, env, rows, md)}")


if __name__ == "__main__":
    main()
