"""SoftCPT (Ding et al., "Prompt Tuning with Soft Context Sharing"): one meta network and task
context tuned jointly on several few-shot tasks, over one feature cache per task.

Per step, a batch of ``batch_size`` cached training rows is drawn from the concatenation of all
tasks' training sets (so batches mix tasks, as the official code's joint data loader does). The
text side runs once for the tasks present in the batch (their generated contexts, then all their
class prompts in one text-encoder call); then each task's images are scored against its OWN C_t
class text features only, with the shared objective (DSPT, ATLaS targets with that task's
CSL/ISL table, ProGrad against that task's zero-shot classifier). The batch loss is the sum of
the task losses weighted by each task's share of the batch, ``sum_t (n_t / n) * mean loss_t``
— the official ``sum of per-task summed cross-entropies / batch size``.

ProGrad: the task and distillation losses are combined over tasks with the same weights, and
the projection acts on the gradients of the combined losses, per parameter tensor (the task
context and the meta network's weight), in one batched backward. It is not projected task by
task: the parameters are shared by all tasks, so one update direction is tested for conflict.

Every random choice is a pure function of the seed and the epoch, and the learning rate of the
epoch, so a resumed run equals an uninterrupted one. With a single task the data order is
exactly CoOp's (``fastprompt.train.epoch.epoch_order``).

The prompt file holds the trained tensors ("task_ctx", "meta_weight") and the task names and
class names; metrics.json adds per epoch the loss and train accuracy per task, and per task and
averaged the zero-shot, test and validation accuracy.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.data.cache import FeatureCache
from fastprompt.models import PromptedTextModel, zeroshot_text_features
from fastprompt.models.softcpt import SoftCPTModel, normalize_task_name, softcpt_parameter_count
from fastprompt.models.weights import model_weights_hash
from fastprompt.train.class_sharding import local_text_chunk
from fastprompt.train.config import TrainConfig
from fastprompt.train.epoch import (SHUFFLE_STREAM, VIEW_STREAM, autocast, logit_scale,
                                    view_rows)
from fastprompt.train.files import PromptFile, read_prompt_file, refuse_existing_run
from fastprompt.train.fit import fit
from fastprompt.train.learner import (EpochOrder, Learner, TrainedClassifier, cache_record,
                                      classifier_metrics, method_summary, register,
                                      resolve_device, train_accuracy)
from fastprompt.train.objective import Objective
from fastprompt.train.runs import load_run
from fastprompt.train.text_backward import TextEncoding, check_text_chunk

SOFTCPT_EPOCHS = 50  # the official SoftCPT schedule


@dataclass(frozen=True)
class Task:
    """A task to train on: its name and its feature cache (built with the run's model)."""
    name: str
    cache: FeatureCache


def softcpt_model(model, tokenizer, task_names, task_classnames,
                  config: TrainConfig) -> SoftCPTModel:
    """``SoftCPTModel`` for ``config`` (n_ctx, n_task_ctx, task_ctx, class token position)."""
    return SoftCPTModel(model, tokenizer, list(task_names), [list(c) for c in task_classnames],
                        n_ctx=config.n_ctx, n_task_ctx=config.n_task_ctx, task_ctx=config.task_ctx,
                        class_token_position=config.class_token_position)


def softcpt_encoding(net: SoftCPTModel, tasks: list[int]) -> tuple[TextEncoding, list[int]]:
    """``TextEncoding`` of a ``SoftCPTModel`` over the class prompts of ``tasks`` (their classes
    concatenated in that order), and each task's class count to split the features by. Prompts
    are padded to the longest of these tasks', as ``SoftCPTModel.forward`` pads them."""
    learners = [net.class_prompts[t] for t in tasks]
    sizes = [lr.n_cls for lr in learners]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    length = max(lr.prompt_length for lr in learners)

    def encode(ctx, a, b):
        embeds, tokens = [], []
        for i, lr in enumerate(learners):
            lo, hi = max(a, offsets[i]), min(b, offsets[i + 1])
            if lo >= hi:
                continue
            rows = slice(lo - offsets[i], hi - offsets[i])
            e, k = lr(ctx[i], classes=rows), lr.tokenized_prompts[rows]
            embeds.append(torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])))
            tokens.append(torch.nn.functional.pad(k, (0, length - k.shape[1])))
        return net.text_encoder(torch.cat(embeds), torch.cat(tokens))

    return (TextEncoding(lambda: net.contexts(tasks), encode, offsets[-1],
                         net.trainable_parameters()), sizes)


def check_tasks(tasks) -> list[Task]:
    """``tasks`` as a list of ``Task`` with distinct names, at least two classes and some
    training images each, and caches of one model; ValueError/TypeError naming ``tasks``."""
    if isinstance(tasks, Task) or not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError("tasks: expected a non-empty list of Task(name, cache)")
    seen = {}
    for t in tasks:
        if not isinstance(t, Task):
            raise TypeError(f"tasks: expected Task(name, cache) items, got {type(t).__name__}")
        if not isinstance(t.cache, FeatureCache):
            raise TypeError(f"tasks: task {t.name!r}: cache must be a FeatureCache")
        key = normalize_task_name(t.name).lower() if isinstance(t.name, str) else ""
        if not key:
            raise ValueError(f"tasks: every task needs a non-empty name, got {t.name!r}")
        if key in seen:
            raise ValueError(f"tasks: duplicate task name {t.name!r} (same as {seen[key]!r})")
        seen[key] = t.name
        if t.cache.num_classes < 2:
            raise ValueError(f"tasks: task {t.name!r} has {t.cache.num_classes} class; a task "
                             "needs at least two")
        if t.cache.num_train_images == 0:
            raise ValueError(f"tasks: task {t.name!r} has no training images")
    dims = {t.cache.feature_dim for t in tasks}
    if len(dims) != 1:
        raise ValueError(f"tasks: the caches have different feature sizes {sorted(dims)}; build "
                         "every task's cache with the same model")
    models = {t.cache.fingerprint.get("model_weights") for t in tasks}
    if len(models) > 1:
        raise ValueError("tasks: the caches were built with different model weights; build every "
                         "task's cache with the run's model")
    return list(tasks)


# ---------------------------------------------------------------------------------------------
# Data order and losses


def multitask_epoch_order(config: TrainConfig, tasks: list[Task], epoch: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """``(task, sample, row)``, one entry per training image of every task, in the epoch's
    shuffled order: the image's task index, its index in that task's cache, and the cached row
    of the augmented view it trains on (one random view per image and epoch).

    A pure function of (seed, epoch, the tasks' sizes and view counts). With one task it is
    ``fastprompt.train.epoch_order``.
    """
    sizes = [t.cache.num_train_images for t in tasks]
    g = torch.Generator().manual_seed(config.seed * SHUFFLE_STREAM + epoch)
    perm = torch.randperm(sum(sizes), generator=g)
    g = torch.Generator().manual_seed(config.seed * VIEW_STREAM + epoch)
    views = [torch.randint(t.cache.views, (m,), generator=g) for t, m in zip(tasks, sizes)]
    task_of = torch.repeat_interleave(torch.arange(len(tasks)), torch.tensor(sizes))
    offsets = torch.tensor([0, *sizes]).cumsum(0)[:-1]
    task = task_of[perm]
    sample = perm - offsets[task]
    view = torch.cat(views)[perm]
    # Row v·M + m holds view v of image m (see fastprompt.data.cache).
    row = view * torch.tensor(sizes)[task] + sample
    return task, sample, row


def group_by_task(task: Tensor, sample: Tensor, row: Tensor):
    """``[(t, samples of task t, rows of task t)]`` for the tasks present, by task index."""
    out = []
    for t in torch.unique(task).tolist():
        mask = task == t
        out.append((t, sample[mask], row[mask]))
    return out


def multitask_loss(texts: list[Tensor], groups, objectives: list[Objective],
                   options: list[dict], scale: Tensor):
    """The batch loss from each present task's class text features (``texts[i]`` for the task
    of ``groups[i]``): ``(loss, kl_loss or None, per-task loss sums)``, weighted by each task's
    share of the batch. Task ``t``'s images meet only task ``t``'s classes."""
    n = sum(len(s) for _, s, _ in groups)
    loss = kl_loss = None
    per_task = []
    for text, (t, sample, rows) in zip(texts, groups):
        task_loss, kl = objectives[t].losses(text, rows, sample, options[t], scale)
        weight = len(sample) / n
        if kl is not None:
            kl_loss = kl * weight if kl_loss is None else kl_loss + kl * weight
        loss = task_loss * weight if loss is None else loss + task_loss * weight
        per_task.append((t, task_loss.detach().float() * len(sample)))
    return loss, kl_loss, per_task


def task_mean(records: list[dict], key: str) -> float:
    """The average of ``key`` over the tasks' records, leaving out NaN (a task without such
    images); NaN when no task has a value."""
    values = [r[key] for r in records if not math.isnan(r[key])]
    return sum(values) / len(values) if values else float("nan")


class TaskBatch(NamedTuple):
    """A batch's rows grouped by task (``group_by_task``), the epoch's options per task, and
    the epoch's per-task loss sums (on the device), which the batch's losses add to."""
    groups: list
    options: list
    task_totals: Tensor


class MultitaskOrder(EpochOrder):
    """An epoch over every task's cache; sums each task's loss for the epoch's record."""

    def __init__(self, order: tuple[Tensor, Tensor, Tensor], options: list[dict],
                 tasks: list[Task], device: torch.device, records: list[dict] | None = None):
        self.task, self.sample, self.rows = order
        self.options, self.tasks = options, tasks
        self.records = records or [{} for _ in tasks]
        self.per_task_total = torch.zeros(len(tasks), device=device)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, start: int, stop: int) -> TaskBatch:
        return TaskBatch(group_by_task(self.task[start:stop], self.sample[start:stop],
                                       self.rows[start:stop]), self.options, self.per_task_total)

    def summary(self) -> dict:
        counts = torch.tensor([t.cache.num_train_images for t in self.tasks],
                              dtype=torch.float32)
        out = {"task_loss": (self.per_task_total.cpu() / counts).tolist()}
        # A label-noise method's split, per task and averaged over the tasks.
        for key in self.records[0]:
            out[f"task_{key}"] = [r[key] for r in self.records]
            out[key] = task_mean(self.records, key)
        return out


@register
class SoftCPTLearner(Learner):
    """SoftCPT's task context and meta network over several tasks."""
    name = "softcpt"
    method_keys = ("n_task_ctx", "task_ctx")
    defaults = {"epochs": SOFTCPT_EPOCHS}

    def __init__(self, config: TrainConfig, tasks: list[Task], model, tokenizer,
                 device: torch.device, text_chunk: int | str = 0):
        self.config, self.tasks, self.model, self.device = config, tasks, model, device
        torch.manual_seed(config.seed)  # the task context's and meta network's initialisation
        self.net = softcpt_model(model, tokenizer, [t.name for t in tasks],
                                 [t.cache.classnames for t in tasks], config).to(device)
        # "auto": for a batch holding every task's classes, the most a step encodes.
        self.text_chunk = local_text_chunk(text_chunk,
                                           softcpt_encoding(self.net, list(range(len(tasks))))[0],
                                           device, lambda: autocast(device, config.amp))
        self.zeroshot = [zeroshot_text_features(model, tokenizer, t.cache.classnames).to(device)
                         for t in tasks]
        self.objectives = [Objective(config, t.cache, z, device)
                           for t, z in zip(tasks, self.zeroshot)]
        self.optimizer = self.make_optimizer()
        self.scale = logit_scale(model).to(device)
        self.images_per_epoch = sum(t.cache.num_train_images for t in tasks)

    # -- what is trained, saved and loaded

    def _objective_tensors(self) -> dict:
        """Each task's objective's tensors (DePT's heads), under ``tasks.<index>.``."""
        return {f"tasks.{i}.{k}": v for i, o in enumerate(self.objectives)
                for k, v in o.trainable().items()}

    def trainable(self) -> dict:
        return {"task_ctx": self.net.task_prompt.ctx, "meta_weight": self.net.meta_net.weight,
                **self._objective_tensors()}

    def lr_scales(self) -> dict:
        return dict.fromkeys(self._objective_tensors(), self.config.dept_lr_scale)

    def load_trainable(self, state: dict) -> None:
        self.net.load_trainable_state(state)
        heads = self._objective_tensors()
        with torch.no_grad():
            for key, param in heads.items():
                param.copy_(state[key])

    def identity(self) -> dict:
        return {"config": self.config.to_dict(),
                "tasks": [{"name": t.name, "cache": t.cache.fingerprint} for t in self.tasks],
                "model_weights": model_weights_hash(self.model)}

    def prompt_fields(self) -> dict:
        return {"tasks": [{"name": t.name, "classnames": list(t.cache.classnames)}
                          for t in self.tasks]}

    @classmethod
    def task_names(cls, prompt: PromptFile) -> list[str]:
        return [t["name"] for t in prompt.field("tasks")]

    @classmethod
    def _net(cls, prompt: PromptFile, model, tokenizer, device) -> SoftCPTModel:
        task_list = prompt.field("tasks")
        # The initial draws are overwritten by the trained tensors: leave the caller's generator be.
        with torch.random.fork_rng(devices=[]):
            net = softcpt_model(model, tokenizer, [t["name"] for t in task_list],
                                [t["classnames"] for t in task_list], prompt.config).to(device)
        net.load_trainable_state(prompt.tensors)
        return net

    @classmethod
    def load_classifiers(cls, prompt, run_dir, model, preprocess_val, tokenizer, device,
                         tasks) -> list[TrainedClassifier]:
        config, task_list = prompt.config, prompt.field("tasks")
        names = [t["name"] for t in task_list]
        net = cls._net(prompt, model, tokenizer, device)
        out = []
        for name in tasks:
            index = names.index(name)
            with torch.no_grad():
                text = net([index])[0].float()
            method = {**method_summary(config), "task": name, "tasks": names}
            out.append(TrainedClassifier(run_dir, config, model, tokenizer, config.model,
                                         list(task_list[index]["classnames"]), text,
                                         float(logit_scale(model)), method, preprocess_val,
                                         task=name))
        return out

    @classmethod
    @torch.no_grad()
    def text_features_for(cls, prompt, classifier, classnames, device) -> Tensor:
        """The context the meta network makes for the classifier's task, in front of each of
        ``classnames``."""
        net = cls._net(prompt, classifier.model, classifier.tokenizer, device)
        ctx = net.contexts([classifier.task])[0]
        with torch.random.fork_rng(devices=[]):  # the unused initial context draw
            prompted = PromptedTextModel(classifier.model, classifier.tokenizer, list(classnames),
                                         n_ctx=prompt.config.n_ctx,
                                         class_token_position=prompt.config.class_token_position
                                         ).to(device)
        return prompted(ctx.to(prompted.prompt_learner.ctx.dtype)).float()

    # -- one epoch

    def epoch_order(self, epoch: int) -> MultitaskOrder:
        order = multitask_epoch_order(self.config, self.tasks, epoch)
        task, sample, row = order
        options, records = [], []
        for t, objective in enumerate(self.objectives):
            mine = task == t
            rows = view_rows(sample[mine], row[mine])
            o, record = objective.epoch_options(
                epoch, lambda t=t, rows=rows: self.task_logits(t, rows))
            options.append(o)
            records.append(record)
        return MultitaskOrder(order, options, self.tasks, self.device, records)

    def text_encoding(self, batch: TaskBatch) -> TextEncoding:
        return softcpt_encoding(self.net, [t for t, _, _ in batch.groups])[0]

    def batch_losses(self, text: Tensor, batch: TaskBatch):
        sizes = [self.net.class_prompts[t].n_cls for t, _, _ in batch.groups]
        loss, kl, per_task = multitask_loss(list(text.split(sizes)), batch.groups,
                                            self.objectives, batch.options, self.scale)
        for t, s in per_task:
            batch.task_totals[t] += s
        extra = self.extra_loss(text, batch)
        return (loss if extra is None else loss + extra), kl

    # -- metrics

    @torch.no_grad()
    def task_text_features(self) -> list[Tensor]:
        """Each task's class text features, one task per call (as ``load_classifiers`` computes
        them for export), float32."""
        return [self.net([t])[0].float() for t in range(self.net.num_tasks)]

    @torch.no_grad()
    def task_logits(self, task: int, rows: Tensor) -> Tensor:
        """Task ``task``'s current similarity logits (N x C_t, float32) of its cached training
        ``rows`` (what NLPrompt's transport scores)."""
        text = F.normalize(self.net([task])[0].float(), dim=-1)
        x = self.tasks[task].cache.train_features[rows].to(self.device).float()
        return self.scale * F.normalize(x, dim=-1) @ text.t()

    @torch.no_grad()
    def train_accuracy(self) -> dict:
        noisy, clean = zip(*(train_accuracy(t.cache, text.float(), o.fused_head(self.scale))
                             for t, text, o in zip(self.tasks, self.net(), self.objectives)))
        return {"task_train_acc_noisy": list(noisy), "task_train_acc_clean": list(clean),
                "train_acc_noisy": sum(noisy) / len(noisy),
                "train_acc_clean": sum(clean) / len(clean)}

    def final_metrics(self) -> dict:
        per_task = []
        for t, text, z, o in zip(self.tasks, self.task_text_features(), self.zeroshot,
                                 self.objectives):
            c = t.cache
            per_task.append({
                "name": t.name, "num_classes": c.num_classes, "classnames": list(c.classnames),
                "num_train_images": c.num_train_images, "views": c.views,
                **classifier_metrics(c, text, z, o.fused_head(self.scale)),
                "num_test_images": int(c.test_features.shape[0]), "cache": cache_record(c),
            })

        counts = softcpt_parameter_count(self.net)
        return {"tasks": per_task, "test_acc": task_mean(per_task, "test_acc"),
                "zeroshot_test_acc": task_mean(per_task, "zeroshot_test_acc"),
                "val_acc": task_mean(per_task, "val_acc"),
                "trainable_parameters": counts["total"], "parameters": counts,
                "num_tasks": len(self.tasks), "num_train_images": self.images_per_epoch}


def train_softcpt_run(config: TrainConfig, tasks: list[Task], model, tokenizer, out_dir, *,
                      resume: bool = False, progress: bool | None = None,
                      device: str | torch.device | None = None,
                      text_chunk: int | str = 0) -> dict:
    """Train SoftCPT on ``tasks`` into ``out_dir``; return the metrics (also in metrics.json).

    ``model`` is the frozen open_clip model every task's cache was built with. With
    ``resume=True`` a checkpoint in ``out_dir`` is continued (same config, tasks, caches and
    model); without it a folder holding a checkpoint is refused. Nothing is written before the
    inputs are checked. ``text_chunk`` as in ``fastprompt.train.train_run`` (not part of the
    run's identity), and so is training on several ranks: each batch's class prompts are
    sharded over them.
    """
    if not isinstance(config, TrainConfig) or config.learner != "softcpt":
        raise ValueError("config: expected a TrainConfig with learner='softcpt'")
    tasks = check_tasks(tasks)
    text_chunk = check_text_chunk(text_chunk)
    out_dir = os.fspath(out_dir)
    device = resolve_device(device)
    refuse_existing_run(out_dir, resume, SoftCPTLearner.name)  # before any work
    learner = SoftCPTLearner(config, tasks, model.to(device), tokenizer, device, text_chunk)
    return fit(learner, out_dir, resume=resume, progress=progress,
               text_chunk_auto=text_chunk == "auto",
               desc=f"train {config.describe()} ({len(tasks)} tasks)")


def load_softcpt_run(run_dir, task: str | None = None, device: str | torch.device = "cpu"):
    """One task of a finished SoftCPT run as a ``TrainedClassifier``: the open_clip model, that
    task's class names, and its class text features computed from the meta network's context
    for that task (what ``fastprompt export RUN OUT --task NAME`` bakes)."""
    if read_prompt_file(run_dir).learner != SoftCPTLearner.name:
        raise ValueError(f"run: {os.fspath(run_dir)!r} is not a SoftCPT run; --task applies to "
                         "SoftCPT runs (trained with --method softcpt) only")
    return load_run(run_dir, device, task)
