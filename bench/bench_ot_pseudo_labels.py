"""Benchmark NLPrompt's per-epoch optimal-transport step, ``fastprompt.ot_pseudo_labels``, at
the sizes a run meets: N = shots x C training images (16 shots) against C classes, with the
official scripts' regularisation (0.001) and ``train.py``'s (0.01); and POT's ``ot.sinkhorn``
(what the official code calls: its plain kernel, on the CPU in NumPy) on the same scores where
it is installed (``--pot``), with the share of rows whose labels agree.

    python bench/bench_ot_pseudo_labels.py --threads 2
    python bench/bench_ot_pseudo_labels.py --classes 100 1000 --shots 16 --pot

Scores as NLPrompt makes them: ``log_softmax(softmax(s · x̂ t̂ᵀ))`` of random unit features
(dimension 512, scale 100, the logit scale of a trained CLIP), with the class of each image's
features pulled towards its class's text feature so that the prediction is informative (as a
prompt's is after a few epochs). The time is the median of whole calls (the labels as the
training loop takes them). Writes bench/results/ot_pseudo_labels-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import fastprompt  # noqa: E402


def nlprompt_scores(n: int, c: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.nn.functional.normalize(torch.randn(c, 512, generator=g), dim=1)
    labels = torch.arange(n) % c
    x = torch.nn.functional.normalize(torch.randn(n, 512, generator=g) + 4 * text[labels], dim=1)
    logits = 100.0 * x @ text.T
    return torch.log_softmax(torch.softmax(logits, dim=1), dim=1).to(device)


def pot_labels(scores: torch.Tensor, reg: float):
    import numpy as np
    import ot
    n, c = scores.shape
    s = scores.double().cpu().numpy()
    return ot.sinkhorn(np.full(n, 1.0 / n), np.full(c, 1.0 / c), -s, reg, numItermax=1000,
                       stopThr=1e-6).argmax(1)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--regs", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-run-time", type=float, default=2.0)
    p.add_argument("--pot", action="store_true", help="also time POT's ot.sinkhorn (CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = common.environment(device)
    env["command"] = " ".join(["python", "bench/bench_ot_pseudo_labels.py",
                               *(sys.argv[1:] if argv is None else argv)])
    env["load_average"] = os.getloadavg()
    rows, table = [], []
    for c in args.classes:
        n = args.shots * c
        scores = nlprompt_scores(n, c, device)
        for reg in args.regs:
            labels = fastprompt.ot_pseudo_labels(scores, reg=reg)
            t = common.time_ms(lambda: fastprompt.ot_pseudo_labels(scores, reg=reg), device,
                               args.min_run_time)
            row = {"n": n, "c": c, "reg": reg, "fastprompt_ms": t["median_ms"],
                   "fastprompt_iqr_ms": t["iqr_ms"],
                   "prediction_agreement": float((labels == scores.argmax(1)).float().mean())}
            if args.pot:
                start = time.perf_counter()
                pot = pot_labels(scores, reg)
                row["pot_ms"] = (time.perf_counter() - start) * 1e3
                row["pot_finite"] = bool((pot >= 0).all())
                row["agreement_with_pot"] = float((labels.cpu().numpy() == pot).mean())
            rows.append(row)
            table.append([n, c, reg, f"{row['fastprompt_ms']:.1f}",
                          f"{row.get('pot_ms', float('nan')):.1f}",
                          f"{row.get('agreement_with_pot', float('nan')):.4f}",
                          f"{row['prediction_agreement']:.3f}"])
            print(table[-1], flush=True)
    md = (f"{env['command']} on {env['device']} ({env['threads']} threads), {env['timestamp']}\n\n"
          + common.markdown_table(["N", "C", "reg", "fastprompt ms", "POT ms",
                                   "labels = POT's", "labels = argmax"], table))
    print(md)
    print(common.write_results("ot_pseudo_labels", env, rows, md))
    return rows


if __name__ == "__main__":
    main()
