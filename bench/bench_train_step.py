"""One CoOp-style training step, eager against compiled (``fastprompt train --compile``).

    python bench/bench_train_step.py                                    # fastprompt-tiny, C=100
    python bench/bench_train_step.py --models ViT-B-16 --n 256 --methods coop   # the GPU target

Both sides run the training loop's own code on the same random-weight model (created offline
with ``fastprompt.models.create_model``), C class prompts with 16 context tokens, N random image
features, SGD with momentum and weight decay: eager is ``fastprompt.train.epoch.optimise_epoch``
(prompt learner, truncated text encoder, fused loss, ``backward``/``prograd_backward``,
``optimizer.step``), compiled is ``CompiledStep.run_epoch`` (the same step as one graph;
CUDA graphs on CUDA). Each timed call is an epoch of ``--steps`` steps on fixed inputs, with
the one host synchronisation per epoch that training has; reported per step. The first compiled
call (compilation) is timed on its own. Eager and compiled are timed interleaved in one process
(``common.interleaved_times``), so load from other processes hits both alike.

Writes bench/results/train_step-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from fastprompt import _backend  # noqa: E402
from fastprompt.models import PromptedTextModel, create_model  # noqa: E402
from fastprompt.train import TrainConfig  # noqa: E402
from fastprompt.train.compiled_step import CompiledStep  # noqa: E402
from fastprompt.train.epoch import autocast, optimise_epoch  # noqa: E402
from fastprompt.train.objective import Targets, fused_losses, loss_options  # noqa: E402

METHODS = {"coop": {}, "dspt+ls": dict(loss="dspt", targets="ls"), "coop+prograd": dict(prograd=True)}


def eager_losses(prompted, images, labels, scale, config, options, zeroshot, device):
    """The eager step's losses, as the training loop computes them for a CoOp prompt."""
    with autocast(device, config.amp):
        text = prompted()
    return fused_losses(images, text, labels, scale, config, options, zeroshot)


def bench_case(model_name: str, method: str, n: int, classes: int, steps: int, device,
               min_run_time: float) -> dict:
    model, _, _, tokenizer = create_model(model_name, None, device)
    config = TrainConfig(model=model_name, batch_size=n, **METHODS[method])
    classnames = [f"class {i}" for i in range(classes)]
    g = torch.Generator().manual_seed(0)
    dim = model.text_projection.shape[1]
    images = torch.randn(n, dim, generator=g).to(device)
    labels = torch.randint(classes, (n,), generator=g).to(device)
    zeroshot = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1).to(device)
    scale = model.logit_scale.detach().float().exp().to(device)
    epoch = config.warmup_epochs  # a soft epoch for soft targets; the schedule's second lr
    options = loss_options(config, Targets(), epoch)
    sides = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(config.seed)
        prompted = PromptedTextModel(model, tokenizer, classnames, n_ctx=config.n_ctx).to(device)
        params = [prompted.prompt_learner.ctx]
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
        kl_teacher = zeroshot if config.prograd else None
        if name == "eager":
            def run(prompted=prompted, optimizer=optimizer, params=params, kl_teacher=kl_teacher):
                return optimise_epoch(
                    config, optimizer, params, epoch, steps * n,
                    lambda start, stop: eager_losses(prompted, images, labels, scale, config,
                                                     options, kl_teacher, device), device)
        else:
            step = CompiledStep(prompted, params, optimizer, config, kl_teacher, device)

            def run(step=step):
                return step.run_epoch(epoch, steps * n, lambda start, stop: (images, labels, None),
                                      scale, options)
            start = time.perf_counter()
            run()
            compile_s = time.perf_counter() - start
        sides[name] = run
    prompt_length = prompted.prompt_learner.prompt_length
    cpu_before = os.times()
    load_before = os.getloadavg()[0]
    times = common.interleaved_times(sides, device, min_run_time)
    load_after = os.getloadavg()[0]
    eager_ms = times["eager"]["median_ms"] / steps
    compiled_ms = times["compiled"]["median_ms"] / steps
    return {"model": model_name, "method": method, "n": n, "classes": classes,
            "prompt_length": prompt_length, "steps_per_call": steps,
            "eager_step_ms": eager_ms, "compiled_step_ms": compiled_ms,
            "speedup": eager_ms / compiled_ms, "compile_s": compile_s,
            "eager_iqr_ms": times["eager"]["iqr_ms"] / steps,
            "compiled_iqr_ms": times["compiled"]["iqr_ms"] / steps,
            "load_average": [load_before, load_after],
            "process_cpu_s": os.times().user - cpu_before.user}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["fastprompt-tiny"])
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=["coop", "coop+prograd"])
    p.add_argument("--n", type=int, nargs="+", default=[32, 256], help="batch sizes")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="steps per timed call")
    p.add_argument("--min-run-time", type=float, default=3.0, help="seconds per case and side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--note", default="", help="a line about the machine (e.g. shared cores)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    rows = []
    for model_name in args.models:
        for method in args.methods:
            for n in args.n:
                row = bench_case(model_name, method, n, args.classes, args.steps, device,
                                 args.min_run_time)
                print(row, flush=True)
                rows.append(row)
    mode = "reduce-overhead (CUDA graphs)" if device.type == "cuda" else "inductor default"
    table = common.markdown_table(
        ["model", "method", "N", "C", "prompt tokens", "eager step ms", "compiled step ms",
         "speedup", "compile s", "load avg (1 min)"],
        [[r["model"], r["method"], r["n"], r["classes"], r["prompt_length"],
          f"{r['eager_step_ms']:.3f}", f"{r['compiled_step_ms']:.3f}", f"{r['speedup']:.2f}x",
          f"{r['compile_s']:.0f}", f"{r['load_average'][0]:.1f} / {r['load_average'][1]:.1f}"]
         for r in rows])
    text = (f"One training step, eager (optimise_epoch) vs compiled (train --compile, {mode}): "
            f"random-weight models, 16 context tokens, SGD with momentum, random image "
            f"features; {args.steps} steps per timed call, medians of interleaved rounds. 'compile s': "
            f"the first compiled call (cases after the first reuse inductor's on-disk cache "
            f"for the kernels they share).\n"
            f"Device: {env['device']} ({env['cpu_model']}, {env['threads']} threads); torch "
            f"{env['torch']}; loss backend {env['backend']}.\n"
            + (f"{args.note}\n" if args.note else "") + "\n" + table + "\n")
    print(text)
    print(common.write_results("train_step", env, rows, text))


if __name__ == "__main__":
    main()
