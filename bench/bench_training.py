"""End-to-end training benchmark: fastprompt's pipeline (feature cache + train_run) against a
CoOp-style loop written the way the official CoOp code does it, on the same model, data, method,
seed and initial context.

    python bench/bench_training.py                                  # fastprompt-tiny and ViT-B-32
    python bench/bench_training.py --models fastprompt-tiny --epochs 10 --method dspt

Baseline ("official-style", written out in this file as CoOp's ``trainers/coop.py`` does it):
a ``torch.utils.data.DataLoader`` over the training images, decoded and augmented every epoch
(``preprocess_train``: random resized crop, plus a random horizontal flip), the frozen image
encoder run on every step under ``no_grad``, CoOp's prompt learner (``[SOS] + ctx + suffix``
concatenated over the full 77-token context) and text encoder (positional embedding, transformer
over all 77 positions, ``ln_final`` over all positions, then the end-of-text row times the
projection), ``logits = logit_scale.exp() * x̂ @ t̂ᵀ``, ``F.cross_entropy`` (``--method dspt``:
``F.cross_entropy(F.softmax(logits))``, separate ops), SGD (lr 0.002, momentum 0.9, weight decay
5e-4) with CoOp's cosine schedule and one constant warm-up epoch at 1e-5, batch 32, eager fp32.
At the end the test images are encoded (``preprocess_val``) and classified, as CoOp tests.

fastprompt: ``build_or_load_cache`` (``--views`` augmented views per training image, one plain
view per test image; timed on its own), then ``train_run`` for the same epoch count, over the
cached features, truncated text encoder and fused loss.

Both sides: same random-weight model (nothing is downloaded), same generated shapes data set,
same batch size, seed and initial context (checked), full cosine schedule over ``--epochs``.
The data order and augmentations differ in kind (a fresh crop per epoch against one of K cached
views) but not in amount. Reported: median epoch time of each (all epochs of the run: the first
one included in the list, the median is robust to it), speedup, test accuracy of both after the
same epochs, cache build time, and the projected total for a whole run at CoOp's default epoch
count for the shot count (baseline: E x epoch + test encoding; fastprompt: cache build + set-up +
E x epoch with its per-epoch bookkeeping). With random weights, accuracies are near chance for
both: they show that both sides train the same thing, not what the method reaches.

Writes bench/results/training-<device>.{json,md}. Run it under
``flock /tmp/fastprompt-bench.lock`` so benchmarks do not share the cores.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fastprompt  # noqa: E402
from fastprompt import _backend  # noqa: E402
from fastprompt.data import build_or_load_cache, make_shapes_dataset  # noqa: E402
from fastprompt.models import PromptedTextModel, create_model  # noqa: E402
from fastprompt.train import TrainConfig, coop_epochs, learning_rate, train_run  # noqa: E402

# Per-model defaults: (classes, shots, test images per class, measured epochs, image size).
# ViT-B-32 is sized so that the whole case stays within about ten minutes on two CPU cores.
DEFAULTS = {
    "fastprompt-tiny": dict(classes=10, shots=16, test=16, epochs=10),
    "ViT-B-32": dict(classes=10, shots=8, test=8, epochs=5),
}
FALLBACK = dict(classes=10, shots=8, test=8, epochs=5)


# ---------------------------------------------------------------------------------------------
# The official-style baseline (CoOp's trainers/coop.py, on open_clip's batch-first text tower)


class ImageList(torch.utils.data.Dataset):
    """Dassl's DatasetWrapper: read the image, convert to RGB, apply the transform."""

    def __init__(self, samples, transform):
        self.samples, self.transform = list(samples), transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = Image.open(path).convert("RGB")
        return self.transform(img), label


class CoOpPromptLearner(nn.Module):
    """CoOp's generic-context, class-token-at-the-end prompt learner: the C prompts
    ``"X X ... X <name>."`` are tokenised to the full context length and embedded once; the
    learned context replaces the X embeddings by concatenation, ``[prefix, ctx, suffix]``."""

    def __init__(self, model, tokenizer, classnames, n_ctx: int):
        super().__init__()
        width = model.token_embedding.weight.shape[1]
        # CoOp: nn.init.normal_(ctx_vectors, std=0.02) from the global generator.
        ctx = torch.empty(n_ctx, width, dtype=model.token_embedding.weight.dtype)
        nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        prefix = " ".join(["X"] * n_ctx)
        prompts = [prefix + " " + name + "." for name in classnames]
        tokenized = tokenizer(prompts)  # C x 77
        with torch.no_grad():
            embedding = model.token_embedding(tokenized.to(model.token_embedding.weight.device))
        self.register_buffer("token_prefix", embedding[:, :1, :])          # SOS
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:, :])  # CLS, EOS, padding
        self.register_buffer("tokenized_prompts", tokenized)
        self.n_cls, self.n_ctx = len(classnames), n_ctx

    def forward(self):
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)


class CoOpTextEncoder(nn.Module):
    """CoOp's TextEncoder: all positions through the transformer and the final norm, then the
    end-of-text (argmax id) row times the projection."""

    def __init__(self, model):
        super().__init__()
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ValueError("baseline: CoOp's text encoder pools at the argmax token")
        self.transformer = model.transformer
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)  # open_clip 3.3: batch first
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection
        return x


class CoOpCustomCLIP(nn.Module):
    def __init__(self, model, tokenizer, classnames, n_ctx: int):
        super().__init__()
        self.prompt_learner = CoOpPromptLearner(model, tokenizer, classnames, n_ctx)
        self.image_encoder = model.visual
        self.text_encoder = CoOpTextEncoder(model)
        self.logit_scale = model.logit_scale

    def text_features(self):
        return self.text_encoder(self.prompt_learner(), self.prompt_learner.tokenized_prompts)

    def forward(self, image):
        with torch.no_grad():
            image_features = self.image_encoder(image)
        text_features = self.text_features()
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        logit_scale = self.logit_scale.exp()
        return logit_scale * image_features @ text_features.t()


def coop_lr(epoch: int, epochs: int, lr: float, warmup_epochs: int, warmup_lr: float) -> float:
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), stepped per epoch."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far, from /proc:
    their difference over a measurement is what other processes took from the cores."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    busy = sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # all but idle and iowait
    own = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    return busy / tick, own / tick


class OtherLoad:
    """CPU seconds that other processes used while the block ran (0 on a quiet machine)."""

    def __enter__(self):
        self.start = _cpu_seconds()
        return self

    def __exit__(self, *exc):
        busy, own = _cpu_seconds()
        self.seconds = max((busy - self.start[0]) - (own - self.start[1]), 0.0)
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_baseline(model, tokenizer, splits, transform_train, transform_test, config: TrainConfig,
                 device, workers: int) -> dict:
    """Train CoOp-style for ``config.epochs`` epochs; per-epoch times with a phase breakdown,
    losses, test accuracy and test encoding time."""
    torch.manual_seed(config.seed)
    net = CoOpCustomCLIP(model, tokenizer, splits.classnames, config.n_ctx).to(device)
    init_ctx = net.prompt_learner.ctx.detach().cpu().clone()
    optimizer = torch.optim.SGD([net.prompt_learner.ctx], lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    loader = torch.utils.data.DataLoader(
        ImageList(splits.train, transform_train), batch_size=config.batch_size, shuffle=True,
        num_workers=workers, drop_last=False, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(config.seed))
    epochs = []
    for epoch in range(config.epochs):
        lr = coop_lr(epoch, config.epochs, config.lr, config.warmup_epochs, config.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        phases = dict(data=0.0, image_encoder=0.0, text_forward=0.0, loss_backward_step=0.0)
        losses, correct, seen = 0.0, 0, 0
        _sync(device)
        start = t = time.perf_counter()
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            _sync(device)
            now = time.perf_counter(); phases["data"] += now - t; t = now
            # The forward of CoOpCustomCLIP, split only to time its parts.
            with torch.no_grad():
                image_features = net.image_encoder(images)
            _sync(device)
            now = time.perf_counter(); phases["image_encoder"] += now - t; t = now
            text_features = net.text_features()
            _sync(device)
            now = time.perf_counter(); phases["text_forward"] += now - t; t = now
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            text_features = text_features / text_features.norm(dim=-1, keepdim=True)
            output = net.logit_scale.exp() * image_features @ text_features.t()
            if config.loss == "dspt":
                loss = F.cross_entropy(F.softmax(output, dim=-1), labels)
            else:
                loss = F.cross_entropy(output, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses += loss.item() * len(labels)  # Dassl's loss meter syncs every step
            correct += int((output.argmax(1) == labels).sum())
            seen += len(labels)
            _sync(device)
            now = time.perf_counter(); phases["loss_backward_step"] += now - t; t = now
        seconds = time.perf_counter() - start
        epochs.append({"epoch": epoch + 1, "seconds": seconds, "loss": losses / seen, "lr": lr,
                       "train_acc_augmented": correct / seen, "phases_seconds": phases})
        print(f"  baseline epoch {epoch + 1}/{config.epochs}: {seconds:.3f} s, loss "
              f"{losses / seen:.4f}", flush=True)

    # CoOp's test: encode the test images (preprocess_val), classify with the learned prompts.
    _sync(device)
    start = time.perf_counter()
    test_loader = torch.utils.data.DataLoader(ImageList(splits.test, transform_test),
                                              batch_size=100, shuffle=False, num_workers=workers)
    correct = total = 0
    with torch.no_grad():
        for images, labels in test_loader:
            output = net(images.to(device))
            correct += int((output.argmax(1).cpu() == labels).sum())
            total += len(labels)
    _sync(device)
    test_seconds = time.perf_counter() - start
    seconds = [e["seconds"] for e in epochs]
    return {"epochs": epochs, "epoch_seconds_median": statistics.median(seconds),
            "test_acc": correct / total, "test_seconds": test_seconds, "init_ctx": init_ctx,
            "net": net}


# ---------------------------------------------------------------------------------------------
# One case


def _with_flip(transform):
    """``transform`` followed by a random horizontal flip (CoOp's ``random_flip``); the feature
    cache adds the same flip to a training transform that has none."""
    from torchvision import transforms as T
    from fastprompt.data.cache.spec import has_flip
    return transform if has_flip(transform) else T.Compose([transform, T.RandomHorizontalFlip()])


def bench_model(name: str, args, device, workdir: str) -> dict:
    d = dict(DEFAULTS.get(name, FALLBACK))
    for key in ("classes", "shots", "test", "epochs"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    classes, shots, test_per_class, epochs = d["classes"], d["shots"], d["test"], d["epochs"]
    torch.manual_seed(0)  # the random weights
    model, preprocess_train, preprocess_val, tokenizer = create_model(name, device=device)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)

    root = os.path.join(workdir, f"data-{name}")
    splits = make_shapes_dataset(root, classes, shots, test_images_per_class=test_per_class,
                                 size=image_size, seed=0)
    config = TrainConfig(model=name, loss="dspt" if args.method == "dspt" else "ce",
                         epochs=epochs, n_ctx=args.n_ctx, batch_size=args.batch_size,
                         seed=args.seed)
    for e in range(epochs):  # the baseline writes the same schedule out; check that it agrees
        assert abs(coop_lr(e, epochs, config.lr, config.warmup_epochs, config.warmup_lr)
                   - learning_rate(config, e)) < 1e-12
    print(f"{name}: {classes} classes x {shots} shots, {test_per_class} test/class, "
          f"{image_size}px, {epochs} epochs, method {args.method}, views {args.views}", flush=True)

    # --- fastprompt: cache build (timed on its own), then train_run -------------------------
    other = {}
    _sync(device)
    start = time.perf_counter()
    with OtherLoad() as load:
        cache = build_or_load_cache(os.path.join(workdir, f"cache-{name}.safetensors"), model,
                                    name, preprocess_train, preprocess_val, splits,
                                    views=args.views, seed=args.seed, num_workers=args.workers,
                                    progress=False)
        _sync(device)
    cache_seconds = time.perf_counter() - start
    other["cache_build"] = load.seconds
    print(f"  cache build: {cache_seconds:.2f} s ({cache.train_features.shape[0]} train views, "
          f"{cache.test_features.shape[0]} test images)", flush=True)

    # A one-epoch run first: its wall time minus one epoch is the run's fixed set-up (weights
    # hash, zero-shot classifier, final evaluation), so that the projection does not scale it.
    # An untimed one-epoch run before that takes the first-call costs (imports, thread pools).
    one = TrainConfig(**{**config.to_dict(), "epochs": 1})
    train_run(one, cache, model, tokenizer, os.path.join(workdir, f"warmup-{name}"),
              progress=False, device=device)
    with OtherLoad() as load:
        _sync(device)
        start = time.perf_counter()
        train_run(one, cache, model, tokenizer, os.path.join(workdir, f"run1-{name}"),
                  progress=False, device=device)
        one_wall = time.perf_counter() - start
        start = time.perf_counter()
        metrics = train_run(config, cache, model, tokenizer, os.path.join(workdir, f"run-{name}"),
                            progress=False, device=device)
        fast_wall = time.perf_counter() - start
    other["fastprompt_train"] = load.seconds
    fast_seconds = [h["seconds"] for h in metrics["epochs"]]
    for h in metrics["epochs"]:
        print(f"  fastprompt epoch {h['epoch']}/{epochs}: {h['seconds']:.4f} s, loss "
              f"{h['loss']:.4f}", flush=True)
    # Per epoch, all in (training + train accuracy + checkpoint): (wall_E - wall_1) / (E - 1).
    fast_median = statistics.median(fast_seconds)
    per_epoch_all_in = ((fast_wall - one_wall) / (epochs - 1)) if epochs > 1 else fast_wall
    per_epoch_all_in = max(per_epoch_all_in, fast_median)  # timing noise on short runs
    setup = max(one_wall - per_epoch_all_in, 0.0)

    # Same initial context and same text features as fastprompt's (truncated) encoder.
    torch.manual_seed(config.seed)
    prompted = PromptedTextModel(model, tokenizer, splits.classnames, n_ctx=config.n_ctx).to(device)

    # --- baseline --------------------------------------------------------------------------
    with OtherLoad() as load:
        base = run_baseline(model, tokenizer, splits, _with_flip(preprocess_train), preprocess_val,
                            config, device, args.workers)
    other["baseline"] = load.seconds
    same_ctx = torch.equal(base["init_ctx"], prompted.prompt_learner.ctx.detach().cpu())
    with torch.no_grad():
        net = base["net"]
        net.prompt_learner.ctx.copy_(prompted.prompt_learner.ctx)
        text_diff = float((net.text_features() - prompted()).abs().max())
    del base["net"]

    default_epochs = coop_epochs(shots)
    base_median = base["epoch_seconds_median"]
    base_total = default_epochs * base_median + base["test_seconds"]
    fast_total = cache_seconds + setup + default_epochs * per_epoch_all_in
    phases = {k: statistics.median(e["phases_seconds"][k] for e in base["epochs"])
              for k in base["epochs"][0]["phases_seconds"]}
    row = {
        "model": name, "method": args.method, "classes": classes, "shots": shots,
        "train_images": len(splits.train), "test_images": len(splits.test),
        "image_size": image_size, "views": args.views, "batch_size": config.batch_size,
        "n_ctx": config.n_ctx, "epochs_measured": epochs, "seed": config.seed,
        "workers": args.workers,
        "steps_per_epoch": math.ceil(len(splits.train) / config.batch_size),
        "prompt_length_fastprompt": int(prompted.prompt_learner.prompt_length),
        "prompt_length_baseline": int(net.prompt_learner.tokenized_prompts.shape[1]),
        "same_initial_context": same_ctx,
        "text_features_max_abs_diff": text_diff,
        "baseline_epoch_seconds": [e["seconds"] for e in base["epochs"]],
        "baseline_epoch_median_s": base_median,
        "baseline_phase_median_s": phases,
        "baseline_losses": [e["loss"] for e in base["epochs"]],
        "baseline_test_acc": base["test_acc"],
        "baseline_test_encode_s": base["test_seconds"],
        "fastprompt_epoch_seconds": fast_seconds,
        "fastprompt_epoch_median_s": fast_median,
        "fastprompt_epoch_all_in_s": per_epoch_all_in,
        "fastprompt_setup_s": setup,
        "fastprompt_train_run_wall_s": fast_wall,
        "fastprompt_one_epoch_run_wall_s": one_wall,
        "fastprompt_losses": [h["loss"] for h in metrics["epochs"]],
        "fastprompt_test_acc": metrics["test_acc"],
        "fastprompt_zeroshot_test_acc": metrics["zeroshot_test_acc"],
        "chance_acc": 1.0 / classes,
        "cache_build_s": cache_seconds,
        "speedup_epoch": base_median / fast_median,
        "speedup_epoch_all_in": base_median / per_epoch_all_in,
        "coop_default_epochs": default_epochs,
        "projected_baseline_total_s": base_total,
        "projected_fastprompt_total_s": fast_total,
        "speedup_total": base_total / fast_total,
        "backend": _backend.resolve(device),
        # CPU seconds other processes took while each part ran: near 0 on a quiet machine.
        "other_processes_cpu_s": other,
    }
    print(f"  {name}: baseline {base_median:.3f} s/epoch, fastprompt {fast_median:.4f} s/epoch "
          f"({row['speedup_epoch']:.1f}x; all-in {row['speedup_epoch_all_in']:.1f}x); test acc "
          f"{base['test_acc']:.3f} vs {metrics['test_acc']:.3f}; cache {cache_seconds:.2f} s; "
          f"{default_epochs} epochs: {base_total:.0f} s vs {fast_total:.0f} s", flush=True)
    del model, cache
    return row


def render(rows: list[dict], env: dict, args) -> str:
    header = ["model", "data", "epochs", "baseline epoch s", "fastprompt epoch s",
              "speedup / epoch", "fastprompt epoch all-in s", "speedup all-in",
              "test acc baseline", "test acc fastprompt", "chance", "cache build s",
              "CoOp epochs", "total baseline s", "total fastprompt s", "speedup total"]
    out = []
    for r in rows:
        out.append([r["model"], f"{r['classes']} cls x {r['shots']} shots, {r['image_size']}px",
                    r["epochs_measured"], f"{r['baseline_epoch_median_s']:.3f}",
                    f"{r['fastprompt_epoch_median_s']:.4f}", f"{r['speedup_epoch']:.1f}x",
                    f"{r['fastprompt_epoch_all_in_s']:.4f}", f"{r['speedup_epoch_all_in']:.1f}x",
                    f"{r['baseline_test_acc']:.3f}", f"{r['fastprompt_test_acc']:.3f}",
                    f"{r['chance_acc']:.3f}", f"{r['cache_build_s']:.2f}",
                    r["coop_default_epochs"], f"{r['projected_baseline_total_s']:.0f}",
                    f"{r['projected_fastprompt_total_s']:.0f}", f"{r['speedup_total']:.1f}x"])
    device_line = (f"{env['device']} ({env['cpu_model']}, {env['threads']} threads)"
                   if env["device_type"] == "cpu" else env["device"])
    phase_lines = []
    for r in rows:
        p = r["baseline_phase_median_s"]
        phase_lines.append(
            f"- {r['model']}: baseline epoch phases (median s): data {p['data']:.3f}, image encoder "
            f"{p['image_encoder']:.3f}, text encoder forward (77 tokens) {p['text_forward']:.3f}, "
            f"loss + backward + step {p['loss_backward_step']:.3f}; prompt length "
            f"{r['prompt_length_baseline']} vs {r['prompt_length_fastprompt']} (fastprompt); "
            f"same initial context: {r['same_initial_context']}, text features max |diff| "
            f"{r['text_features_max_abs_diff']:.1e}; CPU s taken by other processes during "
            f"cache / fastprompt / baseline: "
            + " / ".join(f"{v:.1f}" for v in r["other_processes_cpu_s"].values()))
    return (
        f"End-to-end training, method {args.method}: CoOp-style loop as the official code writes "
        f"it (DataLoader + augmentation every epoch, image encoder every step, 77-token text "
        f"encoder, separate loss ops, eager fp32) vs fastprompt (feature cache with "
        f"{args.views} views, then train_run). Batch {args.batch_size}, n_ctx {args.n_ctx}, "
        f"seed {args.seed}, data-loader workers {args.workers}, random weights, generated "
        f"shapes data.\nDevice: {device_line}; torch {env['torch']}; loss backend "
        f"{rows[0]['backend'] if rows else '?'}.\n\n"
        + common.markdown_table(header, out) + "\n\n"
        "Epoch times are medians over the measured epochs (same process). 'all-in' adds "
        "train_run's per-epoch bookkeeping (train accuracy, checkpoint). Totals project a whole "
        "run at CoOp's default epoch count: baseline = epochs x epoch + test encoding; fastprompt "
        "= cache build + set-up + epochs x all-in epoch. Accuracies are after the measured "
        "epochs with a full cosine schedule over them; with random weights both are near chance "
        "and say only that both sides train, not what the method reaches.\n\n"
        + "\n".join(phase_lines))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-32"])
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs measured (and trained) per side (default: per model)")
    parser.add_argument("--shots", type=int, default=None, help="training images per class")
    parser.add_argument("--classes", type=int, default=None)
    parser.add_argument("--test", type=int, default=None, help="test images per class")
    parser.add_argument("--method", choices=("coop", "dspt"), default="coop")
    parser.add_argument("--views", type=int, default=8, help="cached views per training image")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers for the baseline and the cache build")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results")
    parser.add_argument("--workdir", default=None, help="data, cache and runs (default: a temp dir)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = common.environment(device)
    env["backend"] = _backend.resolve(device)
    import open_clip
    env["open_clip"] = open_clip.__version__
    env["fastprompt"] = fastprompt.__version__
    # Another busy process on the cores makes every parallel region wait for a descheduled
    # thread (tens of times slower for small ops): record the load so such a run shows.
    env["loadavg_start"] = os.getloadavg()
    if env["loadavg_start"][0] > 0.5:
        print(f"warning: load average {env['loadavg_start'][0]:.2f} at start; another process "
              "on the cores distorts the timings", file=sys.stderr, flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fastprompt-bench-training-")
    rows = []
    try:
        for name in args.models:
            rows.append(bench_model(name, args, device, workdir))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    env["loadavg_end"] = os.getloadavg()
    table = render(rows, env, args)
    print(table)
    if not args.no_write:
        env["settings"] = vars(args)
        suffix = "" if args.method == "coop" else f"-{args.method}"
        path = common.write_results("training" + suffix, env, rows, table)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
