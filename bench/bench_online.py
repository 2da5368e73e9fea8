"""Training-step throughput of the online learners (MaPLe, IVLP: the image tower in the loop)
against a step written the way the official trainer runs the same math, and the bytes autograd
keeps for backward with and without the image tower's gradient checkpointing.

    python bench/bench_online.py                              # fastprompt-tiny and ViT-B-16
    python bench/bench_online.py --models fastprompt-tiny --learners maple --repeats 3
    python bench/bench_online.py --models ViT-B-16 --batch 4 --classes 10 --threads 2

One step is the forward of both prompted towers over a batch of random preprocessed images
(B x 3 x H x W, the model's image size), the loss, the backward and an SGD step (momentum 0.9,
weight decay 5e-4, the learner's rate). Both sides train the same prompt tensors (the official
side starts from a copy of fastprompt's) on the same images and labels:

* official-style (``muzairkhattak/multimodal-prompt-learning: trainers/maple.py``,
  ``trainers/independentVL.py``, ``CustomCLIP.forward``): the full 77-token class prompts through
  the text tower, both features normalised, eager ``F.cross_entropy(logit_scale · x̂ t̂ᵀ, y)``;
* fastprompt: the learner's own prompt module (``build_prompts``: the text tower over the needed
  positions only) and its loss (``fused_losses`` with the run's ``loss_options``: the fused
  ``fastprompt.clip_cross_entropy``);
* fastprompt + ckpt: the same with ``model.visual.transformer.grad_checkpointing = True``, which
  ``PromptVisionEncoder`` honours block by block (the row says ``image_grad_checkpointing:
  "unsupported"`` and leaves the column out where a tower has no such flag).

Random weights (nothing is downloaded). The sides run in one process, interleaved, ``--repeats``
times after a warm-up step each, each time ``--steps`` steps; medians are reported as images per
second. Memory: the bytes of the storages autograd saves for backward in one fastprompt step (a
saved-tensors hook; the non-reentrant checkpoint saves each block's input through it), plain and
with the image tower checkpointed, and the official-style step's. Float32 everywhere; on
``--device cuda`` the same float32 steps are timed (bf16 autocast columns and CUDA peak memory
wait). Writes bench/results/online-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from fastprompt.models import IVLPPrompts, MaPLePrompts, create_model  # noqa: E402
from fastprompt.models import zeroshot_text_features  # noqa: E402
from fastprompt.train import TrainConfig  # noqa: E402
from fastprompt.train.epoch import logit_scale  # noqa: E402
from fastprompt.train.learner import learner_class  # noqa: E402
from fastprompt.train.objective import fused_losses, loss_options, make_targets  # noqa: E402

CLASSNAMES = ("red car", "tabby cat", "airliner", "golden retriever", "desert fox", "oak",
              "stone bridge", "tulip", "barn owl", "river", "sports car", "rose", "jet", "barn")


def classnames(n: int) -> list[str]:
    return [CLASSNAMES[i % len(CLASSNAMES)] + ("" if i < len(CLASSNAMES) else f" {i}")
            for i in range(n)]


def learner_config(name: str, model_name: str, model, batch: int) -> TrainConfig:
    """The learner's official defaults, its depths capped at the towers' layer counts."""
    text = len(model.transformer.resblocks)
    image = len(model.visual.transformer.resblocks)
    fields = {"batch_size": batch, "amp": False, "optimizer": "sgd"}
    if name == "maple":
        fields["prompt_depth"] = min(9, text, image)
    elif name == "ivlp":
        fields.update(prompt_depth_text=min(12, text), prompt_depth_vision=min(12, image))
    return TrainConfig.for_learner(name, model=model_name, **fields)


def official_prompts(name: str, config: TrainConfig, model, tokenizer, names):
    """The same prompt module over full-length (77-token) text prompts, as the official code."""
    c = config
    if name == "maple":
        return MaPLePrompts(model, tokenizer, names, n_ctx=c.n_ctx, depth=c.prompt_depth,
                            ctx_init=c.ctx_init, truncate=False)
    return IVLPPrompts(model, tokenizer, names, n_ctx_text=c.n_ctx, n_ctx_vision=c.n_ctx_vision,
                       depth_text=c.prompt_depth_text, depth_vision=c.prompt_depth_vision,
                       ctx_init=c.ctx_init, truncate=False)


def sgd(config: TrainConfig, prompts) -> torch.optim.Optimizer:
    return torch.optim.SGD(prompts.parameters(), lr=config.lr, momentum=0.9,
                           weight_decay=config.weight_decay)


def saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def bench_learner(name: str, model_name: str, model, tokenizer, args, device) -> dict:
    config = learner_config(name, model_name, model, args.batch)
    names = classnames(args.classes)
    torch.manual_seed(config.seed)
    ours = learner_class(name).build_prompts(config, model, tokenizer, names).to(device)
    official = official_prompts(name, config, model, tokenizer, names).to(device)
    official.load_state_dict(ours.state_dict())
    scale = logit_scale(model).to(device)
    targets = make_targets(config, None, zeroshot_text_features(model, tokenizer, names).to(device))
    options = loss_options(config, targets, 0)
    g = torch.Generator().manual_seed(7)
    size = tuple(model.visual.image_size) if isinstance(model.visual.image_size, (tuple, list)) \
        else (model.visual.image_size,) * 2
    images = torch.randn(args.batch, 3, *size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    transformer = model.visual.transformer
    checkpointing = hasattr(transformer, "grad_checkpointing")

    def ours_loss():
        text, features = ours(images)
        return fused_losses(features, text, labels, scale, config, options, None)[0]

    def official_loss():  # CustomCLIP.forward in training
        text, features = official(images)
        x, t = F.normalize(features, dim=-1), F.normalize(text, dim=-1)
        return F.cross_entropy(scale * x @ t.t(), labels)

    def stepper(loss_fn, optimizer, ckpt: bool):
        def step():
            if checkpointing:
                transformer.grad_checkpointing = ckpt
            for _ in range(args.steps):
                loss = loss_fn()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if checkpointing:
                transformer.grad_checkpointing = False
        return step

    sides = {"official": stepper(official_loss, sgd(config, official), False),
             "fastprompt": stepper(ours_loss, sgd(config, ours), False)}
    if checkpointing:
        sides["fastprompt_ckpt"] = stepper(ours_loss, sgd(config, ours), True)
    times = {side: [] for side in sides}
    for fn in sides.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for side, fn in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
    row = {"model": model_name, "learner": name, "classes": args.classes, "batch": args.batch,
           "image_size": list(size), "steps_per_repeat": args.steps,
           "trainable_parameters": sum(p.numel() for p in ours.parameters()),
           "image_grad_checkpointing": "supported" if checkpointing else "unsupported"}
    for side, v in times.items():
        row[f"{side}_step_s"] = statistics.median(v) / args.steps
        row[f"{side}_images_per_s"] = args.batch / row[f"{side}_step_s"]
    row["speedup"] = row["official_step_s"] / row["fastprompt_step_s"]

    def memory(loss_fn, ckpt):
        if checkpointing:
            transformer.grad_checkpointing = ckpt
        try:
            return saved_bytes(loss_fn)
        finally:
            if checkpointing:
                transformer.grad_checkpointing = False

    row["saved_bytes_official"] = memory(official_loss, False)
    row["saved_bytes_fastprompt"] = memory(ours_loss, False)
    row["saved_bytes_fastprompt_ckpt"] = memory(ours_loss, True) if checkpointing else None
    ckpt = (f", + ckpt {row['fastprompt_ckpt_images_per_s']:.1f}" if checkpointing else "")
    print(f"{model_name} {name}: official-style {row['official_images_per_s']:.1f}, fastprompt "
          f"{row['fastprompt_images_per_s']:.1f}{ckpt} images/s ({row['speedup']:.2f}x); saved "
          f"MiB official {row['saved_bytes_official'] / 2**20:.1f}, fastprompt "
          f"{row['saved_bytes_fastprompt'] / 2**20:.1f}"
          + (f", + ckpt {row['saved_bytes_fastprompt_ckpt'] / 2**20:.1f}" if checkpointing
             else ""), flush=True)
    return row


def markdown(rows: list[dict], env: dict, command: str) -> str:
    where = env["cpu_model"] if env["device_type"] == "cpu" else env["device"]
    lines = [f"Online learners, one training step (both towers forward, loss, backward, SGD), "
             f"official-style vs fastprompt, on {where} ({env['threads']} threads), torch "
             f"{env['torch']}, {env['timestamp']}; `{command}`.", "",
             "| model | learner | classes | batch | official-style img/s | fastprompt img/s | "
             "speed-up | fastprompt + image ckpt img/s | saved MiB official / fastprompt / "
             "+ ckpt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        supported = r["image_grad_checkpointing"] == "supported"
        ckpt = f"{r['fastprompt_ckpt_images_per_s']:.1f}" if supported else "unsupported"
        ckpt_mib = (f"{r['saved_bytes_fastprompt_ckpt'] / 2**20:.1f}" if supported
                    else "unsupported")
        lines.append(f"| {r['model']} | {r['learner']} | {r['classes']} | {r['batch']} | "
                     f"{r['official_images_per_s']:.1f} | {r['fastprompt_images_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {ckpt} | {r['saved_bytes_official'] / 2**20:.1f} / "
                     f"{r['saved_bytes_fastprompt'] / 2**20:.1f} / {ckpt_mib} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-16"])
    p.add_argument("--learners", nargs="+", default=["maple", "ivlp"], choices=["maple", "ivlp"])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for model_name in args.models:
        model, _, _, tokenizer = create_model(model_name, None, device)
        model.requires_grad_(False)
        for name in args.learners:
            rows.append(bench_learner(name, model_name, model, tokenizer, args, device))
    env = common.environment(device)
    command = "python bench/bench_online.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env["command"] = command
    print(common.write_results("online", env, rows, markdown(rows, env, command)))
    return rows


if __name__ == "__main__":
    main()
