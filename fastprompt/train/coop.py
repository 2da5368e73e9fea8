"""CoOp (Zhou et al., ``KaiyangZhou/CoOp: trainers/coop.py``): a learned context ``ctx``
(n_ctx x W, or C x n_ctx x W class-specific) in front of each class name, through the frozen
text tower; with any loss and plug-in (DSPT, ATLaS, ProGrad) on one feature cache.

The prompt file holds ``ctx`` (the name the official prompt learner's state dict uses) and, in
its metadata, the class names.
"""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.data.cache import FeatureCache
from fastprompt.models import PromptedTextModel, zeroshot_text_features
from fastprompt.models.weights import model_weights_hash
from fastprompt.train.class_sharding import local_text_chunk, sharded_text_features
from fastprompt.train.compiled_step import CompiledStep
from fastprompt.train.config import TrainConfig
from fastprompt.train.distributed import world_size
from fastprompt.train.epoch import autocast, epoch_order, logit_scale, view_rows
from fastprompt.train.files import PromptFile, read_prompt_file, refuse_existing_run
from fastprompt.train.fit import fit
from fastprompt.train.learner import (EpochOrder, Learner, TrainedClassifier, cache_record,
                                      classifier_metrics, learner_class, method_summary,
                                      register, resolve_device, train_accuracy)
from fastprompt.train.objective import Objective
from fastprompt.train.text_backward import TextEncoding, check_text_chunk


def prompted_model(model, tokenizer, classnames, config: TrainConfig,
                   where: str = "classnames") -> PromptedTextModel:
    """CoOp's prompted text side for ``config`` (n_ctx, ctx_init, class-specific context, class
    token position) over ``classnames``; ``where`` names them in errors (where they came from)."""
    return PromptedTextModel(model, tokenizer, list(classnames), n_ctx=config.n_ctx,
                             ctx_init=config.ctx_init, class_specific=config.class_specific,
                             class_token_position=config.class_token_position, where=where)


@torch.no_grad()
def context_text_features(classifier: TrainedClassifier, classnames, config: TrainConfig,
                          ctx: Tensor, device) -> Tensor:
    """Text features (float32) of ``classnames`` with the shared context ``ctx`` (n_ctx x W) in
    front of each, as ``config``'s prompts place it."""
    with torch.random.fork_rng(devices=[]):  # the prompt learner draws an unused initial context
        prompted = prompted_model(classifier.model, classifier.tokenizer, classnames,
                                  dataclasses.replace(config, class_specific=False,
                                                      ctx_init=None)).to(device)
    return prompted(ctx.to(device, prompted.prompt_learner.ctx.dtype)).float()


def coop_encoding(prompted: PromptedTextModel) -> TextEncoding:
    """``TextEncoding`` of a ``PromptedTextModel`` (shared or class-specific context): rows are
    its C classes."""
    learner = prompted.prompt_learner

    def encode(ctx, a, b):
        rows = slice(a, b)
        return prompted.text_encoder(learner(ctx, classes=rows), learner.tokenized_prompts[rows])

    return TextEncoding(lambda: learner.ctx, encode, learner.n_cls, [learner.ctx])


class CachedBatch(NamedTuple):
    """A batch of one cache's training rows: their images (``samples``, which index the
    instance-wise soft labels), their cached rows (one augmented view each), the epoch's loss
    options and the batch's index in the epoch (``step``: what a per-step random draw, JoAPR's
    mixup, is a function of)."""
    samples: Tensor
    rows: Tensor
    options: dict
    step: int = 0


class CacheOrder(EpochOrder):
    """An epoch over one cache (``fastprompt.train.epoch.epoch_order``) in batches of
    ``batch_size``."""

    def __init__(self, samples: Tensor, rows: Tensor, options: dict, record: dict | None = None,
                 batch_size: int = 1):
        self.samples, self.rows, self.options = samples, rows, options
        self.record = record or {}
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, start: int, stop: int) -> CachedBatch:
        return CachedBatch(self.samples[start:stop], self.rows[start:stop], self.options,
                           start // self.batch_size)

    def summary(self) -> dict:
        return self.record


@register
class CoOpLearner(Learner):
    """CoOp's context on one cache. ``compile``: run each step compiled as one graph
    (``fastprompt.train.compiled_step``).

    The base of the learners whose prompts extend CoOp's (KgCoOp, TCP, ...): a subclass adds
    its own modules in ``setup`` (called after the context is drawn and before the optimiser is
    built) and names them in ``trainable``."""
    name = "coop"
    method_keys = ("ctx_init", "class_specific")

    def __init__(self, config: TrainConfig, cache: FeatureCache, model, tokenizer,
                 device: torch.device, *, compile: bool = False, text_chunk: int | str = 0):
        if compile and config.nlprompt:
            raise ValueError("compile: the compiled step takes one loss for every row; "
                             "NLPrompt's changes per image and epoch (drop --compile)")
        if compile and config.joapr:
            raise ValueError("compile: the compiled step takes one loss setup for the whole "
                             "epoch; JoAPR's targets, mixup and penalty change per image and "
                             "step (drop --compile)")
        self.config, self.cache, self.model, self.device = config, cache, model, device
        self.tokenizer = tokenizer
        torch.manual_seed(config.seed)  # the random context initialisation
        self.prompted = prompted_model(model, tokenizer, cache.classnames, config,
                                       f"classnames of {cache.path}").to(device)
        self.ctx = self.prompted.prompt_learner.ctx
        self.encoding = coop_encoding(self.prompted)
        self.setup()
        self.text_chunk = local_text_chunk(text_chunk, self.encoding, device,
                                           lambda: autocast(device, config.amp))
        self.zeroshot = zeroshot_text_features(model, tokenizer, cache.classnames).to(device)
        self.objective = Objective(config, cache, self.zeroshot, device)
        self.optimizer = self.make_optimizer()
        self.scale = logit_scale(model).to(device)
        self.images_per_epoch = cache.num_train_images
        self.compiled = (CompiledStep(self.step_text_features, list(self.trainable().values()),
                                      self.optimizer, config,
                                      self.zeroshot if config.prograd else None, device,
                                      extra_loss=lambda text: self.extra_loss(text, None))
                         if compile else None)

    def setup(self) -> None:
        """A subclass's own modules (drawn from the seeded generator after the context) and,
        where its text side differs from CoOp's, its ``self.encoding``."""

    # -- what is trained, saved and loaded

    def trainable(self) -> dict:
        return {"ctx": self.ctx, **self.objective.trainable()}

    def training_state(self) -> dict:
        return self.objective.state()

    def load_training_state(self, state: dict) -> None:
        self.objective.load_state(state)

    def lr_scales(self) -> dict:
        return dict.fromkeys(self.objective.trainable(), self.config.dept_lr_scale)

    def identity(self) -> dict:
        return {"config": self.config.to_dict(), "cache": self.cache.fingerprint,
                "model_weights": model_weights_hash(self.model)}

    def prompt_fields(self) -> dict:
        return {"classnames": list(self.cache.classnames)}

    @classmethod
    def task_names(cls, prompt: PromptFile) -> None:
        return None

    @classmethod
    def load_classifiers(cls, prompt, run_dir, model, preprocess_val, tokenizer, device,
                         tasks) -> list[TrainedClassifier]:
        config, ctx = prompt.config, prompt.tensors["ctx"]
        classnames = prompt.field("classnames")
        with torch.random.fork_rng(devices=[]):  # the initial draw is overwritten
            prompted = prompted_model(model, tokenizer, classnames, config).to(device)
        if tuple(prompted.prompt_learner.ctx.shape) != tuple(ctx.shape):
            raise ValueError(f"run: prompt shape {tuple(ctx.shape)} does not match the config")
        with torch.no_grad():
            prompted.prompt_learner.ctx.copy_(ctx)
            text = prompted().float()
        return [TrainedClassifier(run_dir, config, model, tokenizer, config.model, classnames,
                                  text, float(logit_scale(model)), method_summary(config),
                                  preprocess_val)]

    @classmethod
    def text_features_for(cls, prompt, classifier, classnames, device) -> Tensor:
        """The learned (shared) context in front of each of ``classnames``."""
        if prompt.config.class_specific:
            raise ValueError(f"run: {classifier.run_dir!r} learned one context per class "
                             "(--class-specific); such contexts belong to the trained classes "
                             "and cannot be applied to other class names (train with a shared "
                             "context)")
        return context_text_features(classifier, classnames, prompt.config,
                                     prompt.tensors["ctx"], device)

    # -- one epoch

    def epoch_order(self, epoch: int) -> CacheOrder:
        samples, rows = epoch_order(self.config, self.cache, epoch)
        options, record = self.objective.epoch_options(
            epoch, lambda: self.logits(self.cache.train_features[view_rows(samples, rows)]))
        return CacheOrder(samples, rows, options, record, self.config.batch_size)

    def text_encoding(self, batch) -> TextEncoding:
        return self.encoding

    def step_text_features(self) -> Tensor:
        """All C class text features with grad: the text side of a step (what the compiled step
        runs)."""
        return self.encoding.encode(self.encoding.source(), 0, self.encoding.num_classes)

    def batch_losses(self, text: Tensor, batch: CachedBatch):
        loss, kl = self.objective.losses(text, batch.rows, batch.samples, batch.options,
                                         self.scale, batch.step)
        extra = self.extra_loss(text, batch)
        return (loss if extra is None else loss + extra), kl

    def train_epoch(self, *, epoch: int, bar) -> dict:
        if self.compiled is None:
            return super().train_epoch(epoch=epoch, bar=bar)
        order = self.epoch_order(epoch)
        cache, device = self.cache, self.device

        def batch_inputs(start, stop):
            """``(images, labels, instance-wise target rows or None)`` of a batch, on the
            device."""
            batch = order.batch(start, stop)
            return (cache.train_features[batch.rows].to(device),
                    cache.train_labels[batch.rows].to(device),
                    self.objective.batch_rows(order.options, batch.samples))

        options = dict(order.options)
        if self.objective.instance_wise(options):
            options.pop("soft_labels")  # each batch's rows come in as an input of the step
        return self.compiled.run_epoch(epoch, len(order), batch_inputs, self.scale, options, bar)

    # -- metrics

    @torch.no_grad()
    def text_features(self) -> Tensor:
        """All C class text features, float32 (under several ranks each encodes its slice:
        every rank calls this, as every rank computes the epoch's metrics)."""
        if world_size() > 1:
            return sharded_text_features(self.encoding).float()
        return self.step_text_features().float()

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """The current classifier's similarity logits (N x C, float32, on the device) of image
        features (what NLPrompt's transport scores)."""
        text = F.normalize(self.text_features(), dim=-1)
        return self.scale * F.normalize(features.to(self.device).float(), dim=-1) @ text.t()

    def train_accuracy(self) -> dict:
        noisy, clean = train_accuracy(self.cache, self.text_features(),
                                      self.objective.fused_head(self.scale))
        return {"train_acc_noisy": noisy, "train_acc_clean": clean}

    def final_metrics(self) -> dict:
        cache = self.cache
        return {"compile": self.compiled.mode if self.compiled is not None else None,
                **classifier_metrics(cache, self.text_features(), self.zeroshot,
                                     self.objective.fused_head(self.scale)),
                "trainable_parameters": sum(p.numel() for p in self.trainable().values()),
                "num_classes": cache.num_classes, "num_train_images": cache.num_train_images,
                "views": cache.views, "cache": cache_record(cache)}


def train_run(config: TrainConfig, cache: FeatureCache, model, tokenizer, out_dir, *,
              resume: bool = False, progress: bool | None = None,
              device: str | torch.device | None = None, data: dict | None = None,
              compile: bool = False, text_chunk: int | str = 0) -> dict:
    """Train ``config``'s learner (CoOp, or one built on it: KgCoOp, TCP, ...) on ``cache`` into
    ``out_dir`` and return the metrics (also written to ``out_dir/metrics.json``; ``data``,
    where the cache's images came from, is recorded there as given:
    ``fastprompt.data.source.DataSource.to_dict``).

    ``model`` is the frozen open_clip model the cache was built with. With ``resume=True`` an
    existing checkpoint in ``out_dir`` is continued (it must come from the same config, cache and
    model); without it, a folder that already holds a checkpoint is refused rather than
    overwritten.

    ``compile=True`` runs each training step compiled as one graph
    (``fastprompt.train.compiled_step``; CUDA graphs on CUDA): the same training to float32
    rounding, faster where Python overhead dominates. Not part of the run's identity (a run
    resumes with or without it); ``metrics["compile"]`` records the mode (None without).
    ``text_chunk`` K > 0 runs the text backward K classes at a time (exact, memory bounded by K
    prompts; ``fastprompt.train.text_backward``); ``"auto"`` measures the activations per class
    prompt and takes the plain backward when all classes fit in half the device's free memory,
    else the largest K that does (``metrics["text_chunk"]``). Not part of the run's identity
    either, so a run may resume with another K. The two do not combine.

    Under a ``torch.distributed`` process group of several ranks (``torchrun``), every rank calls
    this with the same arguments: the classes are sharded over the ranks
    (``fastprompt.train.class_sharding``; ``compile`` is refused), rank 0 alone writes
    ``out_dir``, and every rank returns the metrics. The number of ranks is not part of the
    run's identity: a run resumes on any number of them.
    """
    cls = learner_class(config.learner)
    if not issubclass(cls, CoOpLearner):
        raise ValueError(f"config: learner {config.learner!r} does not train on one cache (SoftCPT "
                         "trains several tasks: use fastprompt.train.train_softcpt_run; MaPLe "
                         "and IVLP train online on images: fastprompt.train.train_online_run)")
    text_chunk = check_text_chunk(text_chunk)
    if compile and text_chunk:  # "auto" too: it may choose chunks
        raise ValueError("text_chunk: the chunked text backward does not run inside the compiled "
                         "step; drop compile (--compile) or text_chunk (--text-chunk)")
    if compile and config.dept:
        raise ValueError("compile: the compiled step runs the prompt's own loss; DePT's head is "
                         "not part of it: drop --compile or --dept")
    if compile and world_size() > 1:
        # The compiled step is one graph over all C classes, for small C where Python overhead
        # dominates; sharding is for large C, where the text encoder dominates.
        raise ValueError(f"compile: the compiled step (--compile) runs all classes in one "
                         f"process; it does not combine with class sharding over "
                         f"{world_size()} ranks (torchrun): drop --compile, or run one process")
    if len(cache.classnames) < 2:
        raise ValueError("cache: needs at least two classes to train a classifier")
    out_dir = os.fspath(out_dir)
    device = resolve_device(device)
    refuse_existing_run(out_dir, resume, cls.name)  # before any work
    learner = cls(config, cache, model.to(device), tokenizer, device, compile=compile,
                  text_chunk=text_chunk)
    return fit(learner, out_dir, resume=resume, progress=progress,
               text_chunk_auto=text_chunk == "auto", data=data)


def read_prompt(run_dir) -> tuple[Tensor, TrainConfig, list, dict]:
    """``(ctx, config, classnames, metadata)`` from a CoOp run's prompt file."""
    prompt = read_prompt_file(run_dir)
    if prompt.learner != CoOpLearner.name:
        raise ValueError(f"run: {prompt.path!r} is a {prompt.learner!r} prompt, not a "
                         "CoOp-style one (use load_run)")
    return prompt.tensors["ctx"], prompt.config, prompt.field("classnames"), prompt.metadata
