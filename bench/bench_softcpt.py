"""Benchmark SoftCPT's training epoch over T tasks against T separate CoOp runs (one prompt per
task), both over cached image features, on the same model, data and batch size.

    python bench/bench_softcpt.py                                   # tiny and ViT-B-16, T = 2 4 8
    python bench/bench_softcpt.py --models ViT-B-16 --tasks 2 4 --classes 10 --shots 16

Per task: C classes with K training images each (random cached features, one view; random
class names of 1-3 words), so an epoch is ceil(T*K*C / B) SoftCPT steps against T * ceil(K*C/B)
CoOp steps. SoftCPT's steps mix tasks: each runs the task prompts of the tasks present and ALL
their class prompts through the text encoder (as the official code does), while a CoOp step
runs only its own task's C prompts; the table counts the text-encoder prompt rows per epoch.
Random weights (nothing is downloaded). Both sides run in the same process, interleaved,
``--repeats`` times after one warm-up epoch each; the median is reported (CUDA: synchronised
wall clock around the epoch). Writes bench/results/softcpt-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from fastprompt import _backend  # noqa: E402
from fastprompt.data.cache import FeatureCache  # noqa: E402
from fastprompt.models import create_model  # noqa: E402
from fastprompt.models.softcpt import softcpt_parameter_count  # noqa: E402
from fastprompt.train import Task, TrainConfig  # noqa: E402
from fastprompt.train import CoOpLearner, SoftCPTLearner  # noqa: E402

WORDS = ("red", "small", "river", "oak", "tabby", "cat", "airliner", "sports", "car", "rose",
         "golden", "retriever", "desert", "fox", "stone", "bridge", "tulip", "jet", "barn", "owl")
EPOCH = 5  # an epoch after the warm-up one (the learning rate plays no part in the time)


def synthetic_cache(t: int, classes: int, shots: int, dim: int, g: torch.Generator) -> FeatureCache:
    m = classes * shots
    names = []
    while len(names) < classes:
        k = int(torch.randint(1, 4, (), generator=g))
        name = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
        if name not in names:
            names.append(name)
    labels = torch.arange(m) % classes
    empty = torch.empty(0, dim, dtype=torch.float16)
    return FeatureCache(
        path=f"<synthetic task {t}>", fingerprint={"views": 1, "model_weights": "bench"},
        classnames=names, train_features=torch.randn(m, dim, generator=g).half(),
        train_labels=labels, train_clean_labels=labels, train_sample_index=torch.arange(m),
        train_view_index=torch.zeros(m, dtype=torch.int64), test_features=empty,
        test_labels=torch.empty(0, dtype=torch.int64), val_features=empty,
        val_labels=torch.empty(0, dtype=torch.int64), train_paths=[""] * m, test_paths=[],
        val_paths=[])


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_case(model_name, model, tokenizer, num_tasks, args, device) -> dict:
    g = torch.Generator().manual_seed(1000 + num_tasks)
    dim = int(model.text_projection.shape[1])
    caches = [synthetic_cache(t, args.classes, args.shots, dim, g) for t in range(num_tasks)]
    tasks = [Task(f"task {t}", c) for t, c in enumerate(caches)]
    base = dict(model=model_name, n_ctx=args.n_ctx, batch_size=args.batch_size, epochs=50,
                prograd=args.prograd, seed=1)
    soft_cfg = TrainConfig(learner="softcpt", **base)
    coop_cfg = TrainConfig(learner="coop", **base)

    soft = SoftCPTLearner(soft_cfg, tasks, model, tokenizer, device)
    coop = [CoOpLearner(coop_cfg, c, model, tokenizer, device) for c in caches]

    def soft_epoch():
        soft.train_epoch(epoch=EPOCH, bar=None)

    def coop_epochs():
        for learner in coop:
            learner.train_epoch(epoch=EPOCH, bar=None)

    soft_epoch(), coop_epochs()  # warm-up
    soft_s, coop_s = [], []
    for _ in range(args.repeats):
        soft_s.append(timed(soft_epoch, device))
        coop_s.append(timed(coop_epochs, device))
    images = num_tasks * args.classes * args.shots
    steps_soft = math.ceil(images / args.batch_size)
    steps_coop = num_tasks * math.ceil(args.classes * args.shots / args.batch_size)
    # Text-encoder rows per epoch (upper bound for SoftCPT: every task present in every batch).
    rows_soft = steps_soft * (num_tasks + num_tasks * args.classes)
    rows_coop = steps_coop * args.classes
    counts = softcpt_parameter_count(soft.net)
    soft_ms, coop_ms = statistics.median(soft_s) * 1e3, statistics.median(coop_s) * 1e3
    return {"model": model_name, "tasks": num_tasks, "classes_per_task": args.classes,
            "shots": args.shots, "batch_size": args.batch_size, "n_ctx": args.n_ctx,
            "prograd": args.prograd, "images_per_epoch": images,
            "softcpt_epoch_ms": soft_ms, "coop_T_runs_epoch_ms": coop_ms,
            "softcpt_over_coop": soft_ms / coop_ms,
            "softcpt_runs_ms": [s * 1e3 for s in soft_s], "coop_runs_ms": [s * 1e3 for s in coop_s],
            "softcpt_steps": steps_soft, "coop_steps": steps_coop,
            "softcpt_prompt_rows_max": rows_soft, "coop_prompt_rows": rows_coop,
            "softcpt_parameters": counts["total"], "coop_parameters": counts["coop_one_prompt_per_task"],
            "repeats": args.repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-16"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--shots", type=int, default=16, help="training images per class")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--prograd", action="store_true", help="time both sides with ProGrad")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model, _, _, tokenizer = create_model(name, device=device)
        for t in args.tasks:
            row = bench_case(name, model, tokenizer, t, args, device)
            rows.append(row)
            print(f"{name} T={t}: SoftCPT {row['softcpt_epoch_ms']:.1f} ms, {t} CoOp runs "
                  f"{row['coop_T_runs_epoch_ms']:.1f} ms ({row['softcpt_over_coop']:.2f}x)",
                  flush=True)
        del model
    header = ["model", "T tasks", "images/epoch", "SoftCPT epoch ms", "T CoOp epochs ms",
              "SoftCPT / CoOp", "steps (SoftCPT / CoOp)", "prompt rows (SoftCPT max / CoOp)",
              "params (SoftCPT / CoOp)"]
    table_rows = [[r["model"], r["tasks"], r["images_per_epoch"], f"{r['softcpt_epoch_ms']:.1f}",
                   f"{r['coop_T_runs_epoch_ms']:.1f}", f"{r['softcpt_over_coop']:.2f}x",
                   f"{r['softcpt_steps']} / {r['coop_steps']}",
                   f"{r['softcpt_prompt_rows_max']} / {r['coop_prompt_rows']}",
                   f"{r['softcpt_parameters']} / {r['coop_parameters']}"] for r in rows]
    device_line = (f"{env['device']} ({env['cpu_model']}, {env['threads']} threads)"
                   if device.type == "cpu" else env["device"])
    table = (f"SoftCPT epoch over T tasks vs T separate CoOp epochs: {args.classes} classes x "
             f"{args.shots} shots per task, batch {args.batch_size}, n_ctx {args.n_ctx}, "
             f"{'ProGrad, ' if args.prograd else ''}cached features, median of {args.repeats} "
             f"interleaved epochs.\nDevice: {device_line}; torch {env['torch']}; loss backend "
             f"{env['backend']}.\n\n" + common.markdown_table(header, table_rows))
    path = common.write_results("softcpt", env, rows, table)
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
