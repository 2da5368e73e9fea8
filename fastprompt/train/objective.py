"""The training objective every learner shares: the fused loss with its plug-ins.

For one label space (one feature cache's classes) and the class text features a learner
produced, the loss is cross-entropy or DSPT's double softmax (``config.loss``) on the epoch's
targets (ATLaS: one-hot labels in its hard epochs, else label smoothing, the class-wise table
or the instance-wise table), and with ProGrad also the distillation term towards the zero-shot
classifier, both from one fused op (``fastprompt.prograd_losses``).

DePT (``Koorye/DePT: trainers/elp_coop.py``, ``--dept``) adds a head of its own: FiLM (a
per-channel scale and bias, from 1 and 0) on the image features and on each sample's class text
features, both into one linear layer over the training classes; the loss is
``(1 - w) · loss_similarity + w · CE(head([FiLM_t(t_y); FiLM_x(x)]), [y; y])`` with
``w = dept_weight`` (0.7), and the head's parameters learn at ``dept_lr_scale`` (6.5) times the
rate. At test the training classes' logits are ``(1 - w) · s·x̂ᵀt̂ + w · head(FiLM_x(x))``: an
affine map of the raw image features added to the similarity (``DePTHead.fused_affine``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastprompt
from fastprompt.data.cache import FeatureCache
from fastprompt.data.soft_labels import class_soft_labels, file_backed_table, instance_soft_labels
from fastprompt.train.config import TrainConfig
from fastprompt.train.epoch import FusedHead
from fastprompt.train.nlprompt import NLPromptSelection


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


def loss_options(config: TrainConfig, targets: Targets, epoch: int) -> dict:
    """Keyword arguments of the loss op for this epoch's targets (hard in ATLaS's hard epochs).
    For instance-wise targets ``soft_labels`` is the host table, whose rows each batch gathers
    (``Objective.batch_options``)."""
    options = {"double_softmax": config.double_softmax}
    if config.loss in ("gce", "mae"):
        options.update(loss=config.loss, q=config.gce_q)
    if not config.soft_epoch(epoch):
        return options
    options["smoothing"] = config.smoothing
    if config.targets == "csl":
        options["soft_labels"] = targets.class_wise
    elif config.targets == "isl":
        options["soft_labels"] = targets.instance_wise
    return options


def fused_losses(images: Tensor, text: Tensor, labels: Tensor, scale: Tensor,
                 config: TrainConfig, options: dict, zeroshot: Tensor | None):
    """A batch's ``(loss, kl_loss)`` (the KL term None without ProGrad) from its image features
    and the class text features, with the batch's loss ``options``."""
    images = images.to(text.dtype)
    if config.prograd:
        return fastprompt.prograd_losses(images, text, zeroshot.to(text.dtype), labels, scale,
                                         temperature=config.temperature, **options)
    return fastprompt.clip_cross_entropy(images, text, labels, scale, **options), None


class FiLM(nn.Module):
    """DePT's per-channel ``scale · x + bias``, from the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale.to(x.dtype) * x + self.bias.to(x.dtype)


class DePTHead(nn.Module):
    """DePT's linear head over C training classes, under the official module names
    (``film_lp_img``, ``film_lp_text``, ``linear_probe_proj``). The linear layer's initial
    weights come from the global generator."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.film_lp_img = FiLM(dim)
        self.film_lp_text = FiLM(dim)
        self.linear_probe_proj = nn.Linear(dim, num_classes)

    def loss(self, class_text: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        """The head's cross-entropy on the text features of each sample's class
        (``class_text``, N x E) and on the image features (N x E), both labelled ``labels``."""
        features = torch.cat([self.film_lp_text(class_text.float()),
                              self.film_lp_img(images.float())])
        return F.cross_entropy(self.linear_probe_proj(features), torch.cat([labels, labels]))

    @torch.no_grad()
    def fused(self, weight: float, scale: float) -> FusedHead:
        """The test-time classifier of the training classes: ``(1 - w)`` times the similarity
        plus ``w · head(FiLM_x(x)) = x A + c`` (A = w (W diag(s_x))ᵀ, c = w (W β_x + b))."""
        w, b = self.linear_probe_proj.weight.double(), self.linear_probe_proj.bias.double()
        film_scale, film_bias = self.film_lp_img.scale.double(), self.film_lp_img.bias.double()
        return FusedHead(float(scale), 1.0 - weight,
                         (weight * w * film_scale).T.float().contiguous().cpu(),
                         (weight * (w @ film_bias + b)).float().contiguous().cpu())


def dept_head(tensors: dict[str, Tensor], prefix: str = "") -> DePTHead:
    """The ``DePTHead`` held in ``tensors`` under ``prefix`` (a prompt file's)."""
    weight = tensors[f"{prefix}linear_probe_proj.weight"]
    head = DePTHead(weight.shape[1], weight.shape[0])
    head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                          and k[len(prefix):].split(".")[0] in ("film_lp_img", "film_lp_text",
                                                                "linear_probe_proj")})
    return head


class Objective:
    """The loss over one cache's classes: its soft-label tables (computed once, offline), its
    zero-shot classifier (``zeroshot``, C x E unit rows, on ``device``), with DePT its head
    (``dept``; its tensors are ``trainable()``), and with a label-noise method its per-epoch
    split of the training images (``selection``: NLPrompt's)."""

    def __init__(self, config: TrainConfig, cache: FeatureCache, zeroshot: Tensor,
                 device: torch.device):
        self.config, self.cache, self.zeroshot, self.device = config, cache, zeroshot, device
        self.targets = make_targets(config, cache, zeroshot).to(device)
        self.dept = (DePTHead(cache.feature_dim, cache.num_classes).to(device)
                     if config.dept else None)
        self.selection = NLPromptSelection(config, cache, device) if config.nlprompt else None

    def trainable(self) -> dict[str, nn.Parameter]:
        """The objective's own trained tensors (DePT's head), by their official names."""
        return dict(self.dept.named_parameters()) if self.dept is not None else {}

    def fused_head(self, scale) -> FusedHead | None:
        """The test-time head of the training classes (DePT's), or None: the similarity."""
        return (self.dept.fused(self.config.dept_weight, float(scale))
                if self.dept is not None else None)

    def epoch_options(self, epoch: int, logits=None) -> tuple[dict, dict]:
        """The loss options of epoch ``epoch`` and what the epoch records about them. A
        label-noise method's split needs ``logits()``: the current classifier's logits (M x C)
        of each training image's view this epoch, by image (``view_rows``), taken without
        grad; it is called only then."""
        options = loss_options(self.config, self.targets, epoch)
        if self.selection is None:
            return options, {}
        with torch.no_grad():
            return self.selection.epoch_options(options, logits)

    def instance_wise(self, options: dict) -> bool:
        """Whether ``options`` (of ``epoch_options``) take each batch's rows of the ISL table."""
        return self.config.targets == "isl" and "soft_labels" in options

    def batch_rows(self, options: dict, samples: Tensor) -> Tensor | None:
        """The ISL rows of a batch of training images (``samples``), on the device; None when
        the epoch's targets need none."""
        if not self.instance_wise(options):
            return None
        return gather_soft_labels(options["soft_labels"], samples, self.device)

    def batch_options(self, options: dict, samples: Tensor) -> dict:
        options = with_batch_soft_labels(options, self.batch_rows(options, samples))
        if self.selection is not None:
            options = self.selection.batch_options(options, samples)
        return options

    def losses(self, text: Tensor, rows: Tensor, samples: Tensor, options: dict, scale: Tensor):
        """``(loss, kl_loss or None)`` of the cached training ``rows`` (their images ``samples``)
        against ``text`` (C x E) with the epoch's ``options``."""
        cache = self.cache
        images = cache.train_features[rows].to(self.device)
        labels = cache.train_labels[rows].to(self.device)
        loss, kl = fused_losses(images, text, labels, scale, self.config,
                                self.batch_options(options, samples),
                                self.zeroshot if self.config.prograd else None)
        return self._with_dept(loss, kl, text[labels], images, labels)

    def logit_losses(self, logits: Tensor, rows: Tensor, samples: Tensor, options: dict,
                     zeroshot_logits: Tensor | None, class_text: Tensor | None = None):
        """``(loss, kl_loss or None)`` of the cached training ``rows`` from their logits (N x C,
        e.g. CoCoOp's per-image ones) with the fused loss on given logits; ProGrad's teacher
        is ``zeroshot_logits`` (N x C), DePT's text features of each row's class
        ``class_text`` (N x E)."""
        cache = self.cache
        labels = cache.train_labels[rows].to(self.device)
        options = self.batch_options(options, samples)
        if self.config.prograd:
            loss, kl = fastprompt.logits_prograd_losses(
                logits, zeroshot_logits.to(logits.dtype), labels,
                temperature=self.config.temperature, **options)
        else:
            loss, kl = fastprompt.logits_cross_entropy(logits, labels, **options), None
        images = cache.train_features[rows].to(self.device) if self.dept is not None else None
        return self._with_dept(loss, kl, class_text, images, labels)

    def _with_dept(self, loss: Tensor, kl, class_text, images, labels):
        """DePT's mix of the similarity loss and its head's (none without DePT)."""
        if self.dept is None:
            return loss, kl
        w = self.config.dept_weight
        return (1 - w) * loss + w * self.dept.loss(class_text, images, labels), kl
