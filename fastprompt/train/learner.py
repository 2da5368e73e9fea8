"""The ``Learner`` interface: what a prompt learner tells the shared training machinery.

The loop (``fastprompt.train.fit``), the losses and plug-ins (``fastprompt.train.objective``),
chunking and class sharding (``text_backward``, ``class_sharding``), resume, evaluation and
export are the same for every learner; a learner says only what differs:

* **what it trains**, under the names the method's official code uses (``trainable``): the
  checkpoint and ``prompt.safetensors`` hold exactly these tensors;
* **the data of an epoch** (``epoch_order``): which cached rows each batch trains on;
* **the text side of a step** (``text_encoding``): the prompts a batch needs, as a
  ``TextEncoding`` that any range of them can be encoded from, so that the loop can run them
  at once, K at a time (``--text-chunk``) or sharded over ranks. The rows are the C classes for
  CoOp, the classes of the batch's tasks for SoftCPT, or B x C per-image prompts for a learner
  whose prompts depend on the image;
* **its losses** (``batch_losses``): the shared ``Objective`` over those features, plus any
  extra term of its own (``extra_loss``);
* **what it saves and loads** (``identity``, ``prompt_fields``, ``load_classifiers``): a
  finished run loads back as ``TrainedClassifier`` records;
* **what export needs**: a ``TrainedClassifier`` with fixed class text features (a fixed head),
  or with a ``head`` module that computes the logits from image features (the text tower in the
  graph, for prompts that depend on the image).

A new learner is one module: a ``Learner`` subclass registered with ``@register`` under its
``TrainConfig.learner`` name (docs/design.md has a worked example).
"""
from __future__ import annotations

import abc
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt.data.cache import FeatureCache
from fastprompt.train import epoch as epoch_module
from fastprompt.train.epoch import FusedHead, accuracy
from fastprompt.train.config import LEARNERS, TrainConfig
from fastprompt.train.files import PromptFile
from fastprompt.train.text_backward import TextEncoding


@dataclass
class TrainedClassifier:
    """One classifier of a finished run, loaded for evaluation or export
    (``fastprompt.pipeline.export_run``); a SoftCPT run has one per task."""
    run_dir: str
    config: TrainConfig
    model: nn.Module
    tokenizer: object
    model_name: str
    class_names: list
    text_features: Tensor        # C x E, unnormalised, as encode_text returns them
    scale: float
    method: dict
    preprocess_val: object = None
    task: str | None = None      # SoftCPT: the task this classifier is for
    # DePT's training classes: the similarity, weighted, plus an affine map of the image
    # features; None: the similarity ``scale · x̂ T̂ᵀ`` alone.
    fused: FusedHead | None = None
    # A learner whose class prompts depend on the image gives the module that maps image
    # features (N x D) to logits (N x C), with ``for_export()``: the module an exported graph
    # holds (float32, CPU, every image in one pass); None: the fixed head above.
    head: nn.Module | None = None

    def with_class_names(self, class_names: list, text_features: Tensor) -> "TrainedClassifier":
        """The classifier over other class names: their text features, the similarity alone
        (a DePT head belongs to the trained classes)."""
        return dataclasses.replace(self, class_names=list(class_names),
                                   text_features=text_features, fused=None,
                                   method={**self.method, "classnames_transferred": True})

    @torch.no_grad()
    def logits(self, features: Tensor, batch_size: int = 4096) -> Tensor:
        """Logits (N x C, float32, on the CPU) of image features (N x E), as the exported
        classifier computes them."""
        out = []
        for i in range(0, features.shape[0], batch_size):
            x = features[i:i + batch_size].float().to(self.text_features.device)
            if self.head is not None:
                z = self.head(x).float()
                out.append((z if self.fused is None else self.fused.combine(z, x)).cpu())
            elif self.fused is not None:
                out.append(self.fused.logits(x, self.text_features).cpu())
            else:
                out.append((self.scale * F.normalize(x, dim=-1)
                            @ F.normalize(self.text_features.float(), dim=-1).t()).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    @torch.no_grad()
    def predictions(self, features: Tensor) -> Tensor:
        """The top-1 class of each image feature (N, int64, on the CPU)."""
        if self.head is not None or self.fused is not None:
            return self.logits(features).argmax(1)
        # The similarity's argmax needs neither the scale nor the image features' norms.
        text = F.normalize(self.text_features.float(), dim=-1)
        return (features.float().to(text.device) @ text.t()).argmax(1).cpu()

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        """Top-1 accuracy (in [0, 1]) on image features, as training reports it; NaN for
        none."""
        if self.head is None:
            return accuracy(features, labels, self.text_features, head=self.fused)
        if features.shape[0] == 0:
            return float("nan")
        return int((self.predictions(features) == labels).sum()) / features.shape[0]


class EpochOrder(abc.ABC):
    """The rows an epoch trains on, in order; ``batch(start, stop)`` is what the learner's
    ``text_encoding`` and ``batch_losses`` take for those rows."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def batch(self, start: int, stop: int) -> Any: ...

    def summary(self) -> dict:
        """What this epoch adds to its record in metrics.json, after it ran."""
        return {}


class Learner(abc.ABC):
    """A prompt learner over cached image features (see the module docstring).

    A subclass sets, in ``__init__``: ``config``, ``model`` (the frozen open_clip model),
    ``device``, ``optimizer`` (over ``trainable()``), ``text_chunk`` (0, or K classes per chunk)
    and ``images_per_epoch``.
    """
    name: ClassVar[str]
    # TrainConfig fields of this learner that an export records (``method_summary``).
    method_keys: ClassVar[tuple[str, ...]] = ()
    # TrainConfig fields as the method's official config sets them (``TrainConfig.for_learner``
    # and ``fastprompt train --learner`` start from these).
    defaults: ClassVar[dict] = {}
    config: TrainConfig
    model: nn.Module
    device: torch.device
    optimizer: torch.optim.Optimizer
    text_chunk: int
    images_per_epoch: int

    # -- what is trained, saved and loaded ---------------------------------------------------

    @abc.abstractmethod
    def trainable(self) -> dict[str, nn.Parameter]:
        """The trained tensors under the official code's names, in a fixed order."""

    def load_trainable(self, state: dict[str, Tensor]) -> None:
        """Copy tensors shaped as ``trainable()`` in (a checkpoint's, to resume)."""
        own = self.trainable()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"state: missing {missing}")
        with torch.no_grad():
            for key, param in own.items():
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ValueError(f"state: {key} has shape {tuple(state[key].shape)}, "
                                     f"expected {tuple(param.shape)}")
                param.copy_(state[key].to(param.device, param.dtype))

    def lr_scales(self) -> dict[str, float]:
        """Trained tensors whose learning rate is a multiple of the run's (by name; the others:
        1), e.g. DePT's head."""
        return {}

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The config's optimiser over ``trainable()``: SGD with momentum (CoOp's) or Adam, with
        the config's weight decay; one parameter group per learning-rate scale (``lr_scale``,
        which ``epoch.set_epoch_lr`` applies: the rate itself is set per epoch)."""
        c = self.config
        scales = self.lr_scales()
        groups: dict[float, list] = {}
        for name, param in self.trainable().items():
            groups.setdefault(scales.get(name, 1.0), []).append(param)
        param_groups = [{"params": params, "lr_scale": scale} for scale, params in groups.items()]
        if c.optimizer == "adam":
            return torch.optim.Adam(param_groups, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(param_groups, lr=c.lr, momentum=c.momentum,
                               weight_decay=c.weight_decay)

    @abc.abstractmethod
    def identity(self) -> dict:
        """What makes two runs the same run (config, data fingerprints, model weights): a
        checkpoint resumes only into a run of the same identity."""

    @abc.abstractmethod
    def prompt_fields(self) -> dict:
        """Metadata saved with the trained tensors (JSON-encodable), what loading needs."""

    @classmethod
    @abc.abstractmethod
    def task_names(cls, prompt: PromptFile) -> list[str] | None:
        """The run's task names (SoftCPT), or None for a run with one classifier."""

    @classmethod
    @abc.abstractmethod
    def load_classifiers(cls, prompt: PromptFile, run_dir: str, model: nn.Module,
                         preprocess_val, tokenizer, device,
                         tasks: list[str] | None) -> list[TrainedClassifier]:
        """The trained classifiers of ``prompt`` (one per requested task; ``tasks`` None for a
        run with one classifier), on ``model`` (checked to hold the run's weights)."""

    @classmethod
    def for_classnames(cls, prompt: PromptFile, classifier: TrainedClassifier,
                       classnames: list[str], device) -> TrainedClassifier:
        """``classifier`` over other class names (cross-dataset transfer, base-to-new,
        ``export --classnames``): by default their ``text_features_for``, the similarity alone."""
        return classifier.with_class_names(
            classnames, cls.text_features_for(prompt, classifier, classnames, device))

    @classmethod
    def text_features_for(cls, prompt: PromptFile, classifier: TrainedClassifier,
                          classnames: list[str], device) -> Tensor:
        """Class text features (C' x E, float32) of ``classnames`` from what ``classifier`` has
        learned, for classifying among other class names (cross-dataset transfer, base-to-new,
        ``export --classnames``); a learner whose prompts belong to its classes refuses."""
        raise ValueError(f"run: {classifier.run_dir!r} is a {cls.name!r} run, whose prompts "
                         "cannot be applied to other class names")

    # -- one epoch ---------------------------------------------------------------------------

    @abc.abstractmethod
    def epoch_order(self, epoch: int) -> EpochOrder:
        """The rows epoch ``epoch`` (0-based) trains on: a pure function of the seed and the
        epoch."""

    @abc.abstractmethod
    def text_encoding(self, batch) -> TextEncoding:
        """How the text features ``batch_losses`` takes are computed, any range of rows at a
        time."""

    @abc.abstractmethod
    def batch_losses(self, text: Tensor, batch) -> tuple[Tensor, Tensor | None]:
        """``(loss, kl_loss)`` of ``batch`` from its text features ``text`` (all rows of
        ``text_encoding(batch)``); the KL term (ProGrad's) None without ProGrad. The loss
        includes ``extra_loss``."""

    def extra_loss(self, text: Tensor, batch) -> Tensor | None:
        """A learner's own loss term added to the shared objective (e.g. KgCoOp's distance to
        the hand-made prompts' features); None: none."""
        return None

    def train_epoch(self, *, epoch: int, bar) -> dict:
        """One epoch of optimiser steps (``fastprompt.train.epoch.train_epoch``); returns its
        record (mean loss, learning rate, target kind, ...)."""
        return epoch_module.train_epoch(self, epoch, bar)

    # -- metrics -------------------------------------------------------------------------------

    @abc.abstractmethod
    def train_accuracy(self) -> dict:
        """Train accuracy after an epoch, on the noisy and the clean labels."""

    @abc.abstractmethod
    def final_metrics(self) -> dict:
        """The finished run's accuracies (test, validation, zero-shot), parameter counts and
        data sizes, for metrics.json."""


def register(cls: type[Learner]) -> type[Learner]:
    """Class decorator: make ``cls`` the learner of its ``name``, which ``TrainConfig.learner``
    and the run files then accept."""
    LEARNERS[cls.name] = cls
    return cls


def learner_class(name: str) -> type[Learner]:
    try:
        return LEARNERS[name]
    except KeyError:
        raise ValueError(f"learner: no learner {name!r}; known: {sorted(LEARNERS)}") from None


# The settings an export records about how its classifier was trained (``method_summary``),
# besides each learner's own ``method_keys``.
_METHOD_KEYS = ("learner", "loss", "targets", "smoothing", "alternate", "alternate_period",
                "csl_temperature", "prograd", "lam", "temperature", "n_ctx",
                "class_token_position")


def method_summary(config: TrainConfig) -> dict:
    """``TrainedClassifier.method``: the config's ``--method`` name, its training settings and
    ``name`` (``config.describe()``)."""
    d = config.to_dict()
    keys = _METHOD_KEYS + learner_class(config.learner).method_keys
    return {"method": config.method, **{k: d[k] for k in keys}, "name": config.describe()}


def classifier_metrics(cache: FeatureCache, text: Tensor, zeroshot: Tensor,
                       head: FusedHead | None = None) -> dict:
    """Zero-shot, test and validation accuracy of the classifier ``text`` (with ``head``, its
    fused logits) on ``cache``."""
    return {"zeroshot_test_acc": accuracy(cache.test_features, cache.test_labels, zeroshot),
            "test_acc": accuracy(cache.test_features, cache.test_labels, text, head=head),
            "val_acc": accuracy(cache.val_features, cache.val_labels, text, head=head)}


def train_accuracy(cache: FeatureCache, text: Tensor,
                   head: FusedHead | None = None) -> tuple[float, float]:
    """Train accuracy on the first augmented view of each image: noisy and clean labels."""
    m = cache.num_train_images
    first_view = cache.train_features[:m]
    return (accuracy(first_view, cache.train_labels[:m], text, head=head),
            accuracy(first_view, cache.train_clean_labels[:m], text, head=head))


def resolve_device(device) -> torch.device:
    """``device``, or CUDA when present, else the CPU."""
    return torch.device(device if device is not None else
                        ("cuda" if torch.cuda.is_available() else "cpu"))


def cache_record(cache) -> dict:
    """How metrics.json names a feature cache."""
    return {"path": os.path.abspath(cache.path), "fingerprint": cache.fingerprint}
