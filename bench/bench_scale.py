"""Benchmark one CoOp training step against the number of classes C: the plain text backward,
the exact chunked one (``--text-chunk K``), and the classes sharded over 1, 2, ... ranks
(``torchrun``); step time and peak memory.

    python bench/bench_scale.py                                   # fastprompt-tiny, C = 100..10000
    python bench/bench_scale.py --classes 100 1000 --ranks 1 2    # CPU: gloo, one thread per rank
    python bench/bench_scale.py --device cuda --model ViT-B-16 --classes 1000 10000 \
        --ranks 1 2 4 8 --name scale-vitb16                       # GPUs: NCCL, one GPU per rank
    python bench/bench_scale.py --model ViT-B-16 --classes 25 100 --chunk 25 --rounds 1 \
        --name scale-vitb16

A step is what ``fastprompt train`` runs per batch: the prompt learner and text encoder over all
C class prompts ("class 17." with a 16-token context; on W ranks each rank its C/W, then the
all-gather, the loss on every rank and the gradients' all-reduce), the fused loss over a batch
of random cached image features, backward into the context. The model's weights are its random
draw (no download; speed and memory do not depend on the values). Each (C, ranks) point is one
fresh launch (``torchrun --standalone`` for W > 1) that times the two backwards interleaved, a
fixed number of steps per round (the ranks must step in lockstep), so that load on a shared
machine hits them alike; each peak in a fresh launch of its own: ``common.peak_memory_bytes``
(CPU: the resident high-water mark above the resident size before the step), which must not see
a heap already grown by earlier steps, and which changes the allocator's settings, which must not
tax the timings. With several ranks the peak is the largest rank's. On CPU every rank runs
``--threads`` threads (default one, so that W ranks use W cores).
Writes bench/results/<name>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt.models import PromptedTextModel, create_model  # noqa: E402
from fastprompt.train.coop import coop_encoding  # noqa: E402
from fastprompt.train.class_sharding import text_step  # noqa: E402
from fastprompt.train.distributed import torchrun_process_group, world  # noqa: E402


def make_step(model_name: str, num_classes: int, chunk: int, batch: int, device):
    """One training step as ``fastprompt train`` runs it (``fastprompt.train.epoch``): plain,
    chunked (``chunk`` K > 0) and/or sharded over the process group's ranks."""
    model, _, _, tokenizer = create_model(model_name, device=device)
    torch.manual_seed(0)
    prompted = PromptedTextModel(model, tokenizer, [f"class {c}" for c in range(num_classes)],
                                 n_ctx=16).to(device)
    g = torch.Generator().manual_seed(1)
    dim = prompted.text_encoder(prompted.prompt_learner()[:1],
                                prompted.prompt_learner.tokenized_prompts[:1]).shape[-1]
    images = torch.randn(batch, dim, generator=g).to(device)
    labels = torch.randint(num_classes, (batch,), generator=g).to(device)
    ctx = prompted.prompt_learner.ctx
    text = text_step(coop_encoding(prompted), chunk)

    def step():
        ctx.grad = None
        loss = fastprompt.clip_cross_entropy(images, prompted() if text is None else text.features(),
                                             labels, 100.0)
        if text is None:
            loss.backward()
        else:
            text.backward(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, prompted.prompt_learner.prompt_length


def lockstep_times(steps: dict, rounds: int, reps: int) -> dict:
    """``{name: {median_ms, round_medians_ms}}``: each step warmed up, then ``reps`` timed runs
    per round, the steps interleaved, in ``rounds`` rounds; the median of the rounds' medians. A
    fixed count, so that every rank runs the same steps (each one's collectives wait for all)."""
    per_round = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            per_round[name].append(sorted(times)[len(times) // 2])
    return {name: {"median_ms": sorted(m)[len(m) // 2], "round_medians_ms": sorted(m)}
            for name, m in per_round.items()}


def run_point(args) -> dict | None:
    """Peak memory of one backward (``--point-peak``), or the interleaved step times of both;
    on every rank of the launch, rank 0 returns the record (the others None)."""
    import torch.distributed as dist
    with torchrun_process_group(args.device) as name:
        device = torch.device(name)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        rank, ranks = world()
        if args.point_peak is not None:
            step, _ = make_step(args.model, args.point_classes, args.point_peak, args.batch,
                                device)
            peaks = [common.peak_memory_bytes(step, device) / 2**20]
            if ranks > 1:
                peaks = [None] * ranks
                dist.all_gather_object(peaks, common.peak_memory_bytes(step, device) / 2**20)
            return {"peak_mib": max(peaks)} if rank == 0 else None
        steps, length = {}, None
        for chunk in (0, args.chunk):
            steps[chunk], length = make_step(args.model, args.point_classes, chunk, args.batch,
                                             device)
        times = lockstep_times(steps, args.rounds, args.reps)
        if rank:
            return None
        return {"prompt_length": length, "threads_per_rank": torch.get_num_threads(),
                "step_ms": {chunk: t["median_ms"] for chunk, t in times.items()},
                "round_medians_ms": {chunk: t["round_medians_ms"] for chunk, t in times.items()}}


def results_table(rows: list[dict]) -> str:
    """The markdown table of ``rows``; per class: the peak over the largest rank's classes."""
    return common.markdown_table(
        ["model", "C", "ranks", "backward", "step ms", "peak MiB (largest rank)",
         "MiB per class of a rank"],
        [[r["model"], r["classes"], r["ranks"],
          f"chunked K={r['chunk']}" if r["chunk"] else "plain", f"{r['step_ms']:.0f}",
          f"{r['peak_mib']:.1f}", f"{r['peak_mib'] / -(-r['classes'] // r['ranks']):.3f}"]
         for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastprompt-tiny")
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1],
                   help="process counts to shard the classes over (torchrun; one GPU per rank "
                        "on CUDA)")
    p.add_argument("--chunk", type=int, default=100, help="K of the chunked backward")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds of the two backwards (median)")
    p.add_argument("--reps", type=int, default=1, help="timed steps per round and backward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per rank (default: %(default)s, so that W ranks use W cores)")
    p.add_argument("--name", default="scale", help="results file name")
    p.add_argument("--point-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--point-peak", type=int, metavar="K", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point_classes is not None:
        record = run_point(args)
        if record is not None:
            print(json.dumps(record))
        return
    if args.device.startswith("cuda") and max(args.ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks: {max(args.ranks)} ranks need as many GPUs; torch sees "
                         f"{torch.cuda.device_count()}")
    rows = []
    for c in args.classes:
        for ranks in args.ranks:
            launch = ([sys.executable] if ranks == 1 else
                      [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={ranks}"])
            cmd = launch + [__file__, "--model", args.model, "--batch", str(args.batch),
                            "--rounds", str(args.rounds), "--reps", str(args.reps),
                            "--threads", str(args.threads),
                            "--device", args.device.split(":")[0] if ranks > 1 else args.device,
                            "--chunk", str(args.chunk), "--point-classes", str(c)]

            def point(extra):
                out = subprocess.run(cmd + extra, check=True, capture_output=True,
                                     text=True).stdout
                return json.loads(out.strip().splitlines()[-1])

            timed = point([])
            for chunk in (0, args.chunk):
                rows.append({"model": args.model, "classes": c, "ranks": ranks, "chunk": chunk,
                             "batch": args.batch, "prompt_length": timed["prompt_length"],
                             "threads_per_rank": timed["threads_per_rank"],
                             "step_ms": timed["step_ms"][str(chunk)],
                             "round_medians_ms": timed["round_medians_ms"][str(chunk)],
                             **point(["--point-peak", str(chunk)])})
                print(rows[-1], flush=True)
    table = results_table(rows)
    env = common.environment(torch.device(args.device))
    env["command"] = "python bench/bench_scale.py " + " ".join(sys.argv[1:])
    print(table)
    print(common.write_results(args.name, env, rows, table))


if __name__ == "__main__":
    main()
