"""The training loop over cached image features: every method (CoOp, DSPT) with every plug-in
(ATLaS targets and alternation, ProGrad), on the fused ops.

Per step the prompt learner and the truncated text encoder run over all C class prompts, then the
fused loss over a batch of cached image features; image features are never recomputed. Every
random choice (context init, the epoch's shuffle, the epoch's augmented view of each image) is a
pure function of the seed and the epoch, and the learning rate a pure function of the epoch, so
``resume=True`` from the last epoch's checkpoint gives the same result as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

import fastprompt
from fastprompt.data.cache import FeatureCache
from fastprompt.train.config import TrainConfig

# Offsets that keep the per-purpose random streams of one seed apart.
_SHUFFLE_STREAM = 1_000_003
_VIEW_STREAM = 2_000_003


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
    g = torch.Generator().manual_seed(config.seed * _SHUFFLE_STREAM + epoch)
    sample = torch.randperm(m, generator=g)
    g = torch.Generator().manual_seed(config.seed * _VIEW_STREAM + epoch)
    view = torch.randint(cache.views, (m,), generator=g)
    # Row v·M + m holds view v of image m (see fastprompt.data.cache).
    return sample, view[sample] * m + sample


@dataclass
class Targets:
    """The soft-label tables a run may need: ATLaS CSL (C x C, on the device) and ISL (M x C,
    on the host, file-backed: each step gathers its batch's rows, see ``gather_soft_labels``)."""
    class_wise: Tensor | None = None
    instance_wise: Tensor | None = None

    def to(self, device: torch.device) -> "Targets":
        """The class-wise table on ``device``; the instance-wise one stays on the host."""
        return Targets(None if self.class_wise is None else self.class_wise.to(device),
                       self.instance_wise)


def make_targets(config: TrainConfig, cache: FeatureCache, zeroshot: Tensor) -> Targets:
    """Compute the ATLaS soft-label table the config asks for, offline, from the zero-shot text
    features (unit rows, C x E) and the cached training features. The instance-wise table goes
    to an unlinked temporary file in the cache's folder, which has room for data of the cache's
    size (the table is M x C float32: 5.1 GB for ImageNet), where a system temporary folder is
    often small or in memory; the file vanishes with the table, even if the run is killed."""
    from fastprompt.data.soft_labels import (class_soft_labels, file_backed_table,
                                             instance_soft_labels)
    if config.targets == "csl":
        return Targets(class_wise=class_soft_labels(zeroshot, temperature=config.csl_temperature))
    if config.targets == "isl":
        table = file_backed_table(cache.num_train_images, zeroshot.shape[0],
                                  os.path.dirname(cache.path))
        return Targets(instance_wise=instance_soft_labels(
            cache.train_features, cache.train_sample_index, zeroshot,
            num_samples=cache.num_train_images, out=table))
    return Targets()


def gather_soft_labels(table: Tensor, sample: Tensor, device: torch.device) -> Tensor:
    """Rows ``sample`` of a host instance-wise table, on ``device``: a step moves its batch's
    rows only, never the table."""
    return table[sample.cpu()].to(device)


def with_batch_soft_labels(options: dict, rows: Tensor | None) -> dict:
    """The loss options of a batch whose instance-wise targets are ``rows`` (its own rows of the
    table, from ``gather_soft_labels``; None: the options as they are)."""
    if rows is None:
        return options
    return {**options, "soft_labels": rows,
            "sample_index": torch.arange(rows.shape[0], device=rows.device)}


def loss_options(config: TrainConfig, targets: Targets, epoch: int, sample: Tensor) -> dict:
    """Keyword arguments of the loss op for this epoch's targets (hard in ATLaS's hard epochs)."""
    options = {"double_softmax": config.double_softmax}
    if not config.soft_epoch(epoch):
        return options
    options["smoothing"] = config.smoothing
    if config.targets == "csl":
        options["soft_labels"] = targets.class_wise
    elif config.targets == "isl":
        options["soft_labels"] = targets.instance_wise
        options["sample_index"] = sample
    return options


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logit_scale(model) -> Tensor:
    """CLIP's multiplier ``exp(logit_scale)``, clamped at 100 as open_clip does; frozen."""
    return model.logit_scale.detach().float().exp().clamp(max=100.0)


@torch.no_grad()
def accuracy(features: Tensor, labels: Tensor, text_features: Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy (in [0, 1]) of the classifier ``text_features`` on ``features``."""
    if features.shape[0] == 0:
        return float("nan")
    text = F.normalize(text_features.float(), dim=-1)
    correct = 0
    for i in range(0, features.shape[0], batch_size):
        x = features[i:i + batch_size].to(text.device, torch.float32)
        pred = (x @ text.t()).argmax(1).cpu()
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
        group["lr"] = lr
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
    """One epoch of optimiser steps over ``num_rows`` rows in batches of ``config.batch_size``,
    for any learner: ``batch_loss(start, stop)`` returns the batch's ``(loss, kl_loss)`` (the
    KL term None without ProGrad), which is backpropagated (ProGrad: projected onto ``params``)
    and stepped; ``backward(loss, kl_loss)``, when given, does the backward instead (the chunked
    text backward, the class-sharded one). Returns the epoch's mean loss(es), its learning rate and target kind."""
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


def batch_losses(prompted, images: Tensor, labels: Tensor, scale: Tensor, config: TrainConfig,
                 options: dict, zeroshot: Tensor | None, device: torch.device):
    """A batch's ``(loss, kl_loss)`` (the KL term None without ProGrad) for a CoOp-style prompt:
    the text side over all classes, then the fused loss with the epoch's ``options``."""
    with _autocast(device, config.amp):
        text = prompted()
    images = images.to(text.dtype)
    if config.prograd:
        return fastprompt.prograd_losses(images, text, zeroshot.to(text.dtype), labels, scale,
                                         temperature=config.temperature, **options)
    return fastprompt.clip_cross_entropy(images, text, labels, scale, **options), None


def train_epoch(prompted, model, cache: FeatureCache, config: TrainConfig, targets: Targets,
                optimizer: torch.optim.Optimizer, epoch: int, zeroshot: Tensor | None,
                device: torch.device, bar=None, compiled=None, text_chunk: int = 0) -> dict:
    """One epoch of a CoOp-style prompt over the cached training set; returns the epoch's mean
    loss(es). ``compiled``: a ``fastprompt.train.compiled_step.CompiledStep`` that runs each
    step instead of the eager one. ``text_chunk`` K > 0: the exact two-pass text backward, K
    classes at a time (``fastprompt.train.chunked_text_backward``). Under a process group of
    several ranks the classes are sharded over them (``fastprompt.train.class_sharding``)."""
    from fastprompt.train.chunked_text_backward import coop_encoding
    from fastprompt.train.class_sharding import text_step
    sample, rows = epoch_order(config, cache, epoch)
    scale = logit_scale(model).to(device)
    params = [p for p in prompted.parameters() if p.requires_grad]
    options = loss_options(config, targets, epoch, sample)
    sample_index_all = options.pop("sample_index", None)
    text = text_step(coop_encoding(prompted), text_chunk, lambda: _autocast(device, config.amp))

    def batch_inputs(start, stop):
        """``(images, labels, instance-wise target rows or None)`` of a batch, on the device."""
        labels = cache.train_labels[sample[start:stop]].to(device)
        images = cache.train_features[rows[start:stop]].to(device)
        targets_rows = (gather_soft_labels(options["soft_labels"], sample_index_all[start:stop],
                                           device) if sample_index_all is not None else None)
        return images, labels, targets_rows

    if compiled is not None:
        return compiled.run_epoch(epoch, len(rows), batch_inputs, scale, options, bar)

    def batch_loss(start, stop):
        images, labels, targets_rows = batch_inputs(start, stop)
        return batch_losses(prompted if text is None else text.features, images, labels,
                            scale, config, with_batch_soft_labels(options, targets_rows),
                            zeroshot, device)

    return optimise_epoch(config, optimizer, params, epoch, len(rows), batch_loss, device, bar,
                          None if text is None else partial(text.backward, lam=config.lam))
