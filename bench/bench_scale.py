"""Benchmark one CoOp training step against the number of classes C: the plain text backward
against the exact chunked one (``--text-chunk K``), step time and peak memory.

    python bench/bench_scale.py                                   # fastprompt-tiny, C = 100..10000
    python bench/bench_scale.py --model ViT-B-16 --classes 25 100 --chunk 25 --rounds 1 \
        --name scale-vitb16

A step is what ``fastprompt train`` runs per batch: the prompt learner and text encoder over all
C class prompts ("class 17." with a 16-token context), the fused loss over a batch of random
cached image features, backward into the context. The model's weights are its random draw (no
download; speed and memory do not depend on the values). The two backwards are timed in one
fresh process per C, interleaved (``common.interleaved_times``), so that load on a shared
machine hits them alike; each peak in a fresh process of its own. The peak is
``common.peak_memory_bytes`` (CPU: the resident high-water mark above the resident size before
the step), which must not see a heap already grown by earlier steps, and which changes the
allocator's settings, which must not tax the timings.
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
from fastprompt.train.chunked_text_backward import coop_chunked  # noqa: E402


def make_step(model_name: str, num_classes: int, chunk: int, batch: int, device):
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
    chunked = coop_chunked(prompted, chunk) if chunk else None

    def step():
        ctx.grad = None
        text = prompted() if chunked is None else chunked.features()
        loss = fastprompt.clip_cross_entropy(images, text, labels, 100.0)
        if chunked is None:
            loss.backward()
        else:
            chunked.backward(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, prompted.prompt_learner.prompt_length


def run_point(args) -> dict:
    """Peak memory of one backward (``--point-peak``), or the interleaved step times of both."""
    device = torch.device(args.device)
    if args.point_peak is not None:
        step, _ = make_step(args.model, args.point_classes, args.point_peak, args.batch, device)
        return {"peak_mib": common.peak_memory_bytes(step, device) / 2**20}
    steps, length = {}, None
    for chunk in (0, args.chunk):
        steps[chunk], length = make_step(args.model, args.point_classes, chunk, args.batch, device)
    times = common.interleaved_times(steps, device, min_run_time=0.0, rounds=args.rounds)
    return {"prompt_length": length,
            "step_ms": {chunk: t["median_ms"] for chunk, t in times.items()},
            "round_medians_ms": {chunk: t["round_medians_ms"] for chunk, t in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fastprompt-tiny")
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--chunk", type=int, default=100, help="K of the chunked backward")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds of the two backwards (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--name", default="scale", help="results file name")
    p.add_argument("--point-classes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--point-peak", type=int, metavar="K", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point_classes is not None:
        print(json.dumps(run_point(args)))
        return
    rows = []
    for c in args.classes:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
               "--rounds", str(args.rounds), "--device", args.device, "--chunk", str(args.chunk),
               "--point-classes", str(c)]

        def point(extra):
            out = subprocess.run(cmd + extra, check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        timed = point([])
        for chunk in (0, args.chunk):
            rows.append({"model": args.model, "classes": c, "chunk": chunk, "batch": args.batch,
                         "prompt_length": timed["prompt_length"],
                         "step_ms": timed["step_ms"][str(chunk)],
                         "round_medians_ms": timed["round_medians_ms"][str(chunk)],
                         **point(["--point-peak", str(chunk)])})
            print(rows[-1], flush=True)
    table = common.markdown_table(
        ["model", "C", "backward", "step ms", "peak MiB", "MiB per class"],
        [[r["model"], r["classes"], f"chunked K={r['chunk']}" if r["chunk"] else "plain",
          f"{r['step_ms']:.0f}", f"{r['peak_mib']:.1f}", f"{r['peak_mib'] / r['classes']:.3f}"]
         for r in rows])
    env = common.environment(torch.device(args.device))
    print(table)
    print(common.write_results(args.name, env, rows, table))


if __name__ == "__main__":
    main()
