"""One epoch of training over cached image features, for any learner.

Per step the learner's text side runs over the class prompts the batch needs (all C for CoOp,
the batch's tasks' classes for SoftCPT), then the fused loss over the batch's cached image
features; image features are never recomputed. With ``--text-chunk K`` the text side runs the
exact two-pass backward K prompts at a time, and under several ranks the prompts are sharded
over them (``fastprompt.train.class_sharding.text_step``).

Every random choice (the epoch's shuffle, the epoch's augmented view of each image) is a pure
function of the seed and the epoch, and the learning rate a pure function of the epoch, so a
resumed run gives the same result as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

import fastprompt
from fastprompt.data.cache import FeatureCache
from fastprompt.train.class_sharding import text_step
from fastprompt.train.config import TrainConfig
from fastprompt.train.distributed import world_size

# Offsets that keep the per-purpose random streams of one seed apart.
SHUFFLE_STREAM = 1_000_003
VIEW_STREAM = 2_000_003


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """CoOp's schedule (Dassl ``ConstantWarmupScheduler`` over cosine annealing with
    ``T_max = epochs``): ``warmup_lr`` for the first ``warmup_epochs`` epochs, then
    ``lr/2 · (1 + cos(π · epoch / epochs))``."""
    if epoch < config.warmup_epochs:
        return config.warmup_lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))


def epoch_order(config: TrainConfig, cache: FeatureCache, epoch: int) -> tuple[Tensor, Tensor]:
    """``(sample, row)``: the epoch's shuffled training images and, for each, the cached row of
    the augmented view it trains on (each image contributes one random view per epoch, as a
    data loader with random augmentation would)."""
    m = cache.num_train_images
    g = torch.Generator().manual_seed(config.seed * SHUFFLE_STREAM + epoch)
    sample = torch.randperm(m, generator=g)
    g = torch.Generator().manual_seed(config.seed * VIEW_STREAM + epoch)
    view = torch.randint(cache.views, (m,), generator=g)
    # Row v·M + m holds view v of image m (see fastprompt.data.cache).
    return sample, view[sample] * m + sample


def view_rows(sample: Tensor, row: Tensor) -> Tensor:
    """Each image's cached row of an epoch (``epoch_order``'s ``(sample, row)``), by image."""
    out = torch.empty_like(row)
    out[sample] = row
    return out


def autocast(device: torch.device, enabled: bool):
    """The text side's mixed precision: bf16 autocast on CUDA when ``enabled``, else none."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logit_scale(model) -> Tensor:
    """CLIP's multiplier ``exp(logit_scale)``, clamped at 100 as open_clip does; frozen."""
    return model.logit_scale.detach().float().exp().clamp(max=100.0)


class FusedHead(NamedTuple):
    """A classifier whose logits add an affine map of the raw image features to the scaled,
    weighted similarity (DePT's training classes): ``w_s · s · x̂ t̂ᵀ + x A + c``."""
    scale: float
    similarity_weight: float
    weight: Tensor   # A, E x C
    bias: Tensor     # c, C

    def logits(self, features: Tensor, text_features: Tensor) -> Tensor:
        x = features.float()
        text = F.normalize(text_features.float(), dim=-1).to(x.device)
        return self.combine(self.scale * F.normalize(x, dim=-1) @ text.t(), x)

    def combine(self, similarity: Tensor, features: Tensor) -> Tensor:
        """The fused logits from the (scaled) similarity logits and the image features."""
        x = features.float()
        return (self.similarity_weight * similarity.float() + x @ self.weight.to(x.device)
                + self.bias.to(x.device))


@torch.no_grad()
def accuracy(features: Tensor, labels: Tensor, text_features: Tensor, batch_size: int = 4096,
             head: FusedHead | None = None) -> float:
    """Top-1 accuracy (in [0, 1]) of the classifier ``text_features`` (with ``head``: its
    fused logits) on ``features``."""
    if features.shape[0] == 0:
        return float("nan")
    text = F.normalize(text_features.float(), dim=-1)
    correct = 0
    for i in range(0, features.shape[0], batch_size):
        x = features[i:i + batch_size].to(text.device, torch.float32)
        logits = x @ text.t() if head is None else head.logits(x, text)
        pred = logits.argmax(1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / features.shape[0]


def epoch_batches(num_rows: int, batch_size: int):
    """``(start, stop)`` of each batch of an epoch over ``num_rows`` rows (the last may be short)."""
    for start in range(0, num_rows, batch_size):
        yield start, min(start + batch_size, num_rows)


def set_epoch_lr(config: TrainConfig, optimizer: torch.optim.Optimizer, epoch: int) -> float:
    """Set the epoch's learning rate on every parameter group; returns it."""
    lr = learning_rate(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def epoch_result(config: TrainConfig, epoch: int, lr: float, num_rows: int, total: Tensor,
                 total_kl: Tensor) -> dict:
    """An epoch's record from the on-device loss sums (one host synchronisation, here)."""
    result = {"loss": float(total) / num_rows, "lr": lr, "soft_targets": config.soft_epoch(epoch)}
    if config.prograd:
        result["kl_loss"] = float(total_kl) / num_rows
    return result


def optimise_epoch(config: TrainConfig, optimizer: torch.optim.Optimizer, params, epoch: int,
                   num_rows: int, batch_loss, device: torch.device, bar=None,
                   backward=None) -> dict:
    """One epoch of optimiser steps over ``num_rows`` rows in batches of ``config.batch_size``:
    ``batch_loss(start, stop)`` returns the batch's ``(loss, kl_loss)`` (the KL term None
    without ProGrad), which is backpropagated (ProGrad: projected onto ``params``) and stepped;
    ``backward(loss, kl_loss)``, when given, does the backward instead (the chunked text
    backward, the class-sharded one). Returns the epoch's mean loss(es), its learning rate
    and target kind."""
    lr = set_epoch_lr(config, optimizer, epoch)
    # Sums stay on the device: no host synchronisation per step.
    total = torch.zeros((), device=device)
    total_kl = torch.zeros((), device=device)
    for start, stop in epoch_batches(num_rows, config.batch_size):
        n = stop - start
        optimizer.zero_grad(set_to_none=True)
        loss, kl = batch_loss(start, stop)
        if backward is not None:
            backward(loss, kl)
        elif config.prograd:
            fastprompt.prograd_backward(loss, kl, params, lam=config.lam)
        else:
            loss.backward()
        if config.prograd:
            total_kl += kl.detach().float() * n
        optimizer.step()
        total += loss.detach().float() * n
        if bar is not None:
            bar.update(n)
    return epoch_result(config, epoch, lr, num_rows, total, total_kl)


def train_epoch(learner, epoch: int, bar=None) -> dict:
    """One epoch of ``learner`` (a ``fastprompt.train.learner.Learner``): its epoch's order,
    then per batch its text side (plain, chunked by ``learner.text_chunk``, or sharded over the
    ranks), its losses, the backward and the optimiser's step. Returns the epoch's record."""
    config, device = learner.config, learner.device
    order = learner.epoch_order(epoch)
    stepped = bool(learner.text_chunk) or world_size() > 1
    step = {}  # the batch's ChunkedTextBackward or ShardedText

    def batch_loss(start, stop):
        batch = order.batch(start, stop)
        encoding = learner.text_encoding(batch)
        if stepped:
            step["text"] = text_step(encoding, learner.text_chunk,
                                     lambda: autocast(device, config.amp))
            text = step["text"].features()
        else:
            with autocast(device, config.amp):
                text = encoding.encode(encoding.source(), 0, encoding.num_classes)
        return learner.batch_losses(text, batch)

    def backward(loss, kl):
        step.pop("text").backward(loss, kl, lam=config.lam)

    result = optimise_epoch(config, learner.optimizer, list(learner.trainable().values()),
                            epoch, len(order), batch_loss, device, bar,
                            backward if stepped else None)
    result.update(order.summary())
    return result
