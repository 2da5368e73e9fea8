"""SoftCPT training: one meta network and task context tuned jointly on several few-shot tasks,
over one feature cache per task.

Per step, a batch of ``batch_size`` cached training rows is drawn from the concatenation of all
tasks' training sets (so batches mix tasks, as the official code's joint data loader does). The
text side runs once for the tasks present in the batch (``SoftCPTModel``: one call for the task
prompts, one for all their class prompts); then each task's images are scored against its OWN
C_t class text features only, with the fused loss op and the run's options (DSPT, ATLaS
targets with that task's CSL/ISL table, ProGrad against that task's zero-shot classifier). The
batch loss is the sum of the task losses weighted by each task's share of the batch,
``sum_t (n_t / n) * mean loss_t`` — the official ``sum of per-task summed cross-entropies /
batch size``.

ProGrad: the task and distillation losses are combined over tasks with the same weights, and
the projection acts on the gradients of the combined losses, per parameter tensor (the task
context and the meta network's weight), in one batched backward. It is not projected task by
task: the parameters are shared by all tasks, so one update direction is tested for conflict.

Every random choice is a pure function of the seed and the epoch, and the learning rate of the
epoch, so a resumed run equals an uninterrupted one. With a single task the data order is
exactly CoOp's (``fastprompt.train.loop.epoch_order``).

The run folder is ``fastprompt.train.rundir``'s; SoftCPT's prompt file holds the trained
tensors ("task_ctx", "meta_weight") and the task names and class names, and its metrics.json
adds per epoch the loss and train accuracy per task, and per task and averaged the zero-shot,
test and validation accuracy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

import fastprompt
from fastprompt.data.cache import FeatureCache
from fastprompt.models.weights import model_weights_hash
from fastprompt.train import rundir
from fastprompt.train.config import TrainConfig
from fastprompt.train.loop import (_SHUFFLE_STREAM, _VIEW_STREAM, Targets, _autocast, accuracy,
                                   gather_soft_labels, logit_scale, loss_options, make_targets,
                                   optimise_epoch, with_batch_soft_labels)

SOFTCPT_FORMAT = "fastprompt-softcpt-1"
SOFTCPT_EPOCHS = 50  # the official SoftCPT schedule


@dataclass(frozen=True)
class Task:
    """A task to train on: its name and its feature cache (built with the run's model)."""
    name: str
    cache: FeatureCache


# ---------------------------------------------------------------------------------------------
# Model construction and checks


def softcpt_model(model, tokenizer, task_names, task_classnames, config: TrainConfig):
    """``SoftCPTModel`` for ``config`` (n_ctx, n_task_ctx, task_ctx, class token position)."""
    from fastprompt.models.softcpt import SoftCPTModel
    return SoftCPTModel(model, tokenizer, list(task_names), [list(c) for c in task_classnames],
                        n_ctx=config.n_ctx, n_task_ctx=config.n_task_ctx, task_ctx=config.task_ctx,
                        class_token_position=config.class_token_position)


def _check_tasks(tasks) -> list[Task]:
    from fastprompt.models.softcpt import normalize_task_name
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
# Data order and one epoch


def multitask_epoch_order(config: TrainConfig, tasks: list[Task], epoch: int
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """``(task, sample, row)``, one entry per training image of every task, in the epoch's
    shuffled order: the image's task index, its index in that task's cache, and the cached row
    of the augmented view it trains on (one random view per image and epoch).

    A pure function of (seed, epoch, the tasks' sizes and view counts). With one task it is
    ``fastprompt.train.epoch_order``.
    """
    sizes = [t.cache.num_train_images for t in tasks]
    g = torch.Generator().manual_seed(config.seed * _SHUFFLE_STREAM + epoch)
    perm = torch.randperm(sum(sizes), generator=g)
    g = torch.Generator().manual_seed(config.seed * _VIEW_STREAM + epoch)
    views = [torch.randint(t.cache.views, (m,), generator=g) for t, m in zip(tasks, sizes)]
    task_of = torch.repeat_interleave(torch.arange(len(tasks)), torch.tensor(sizes))
    offsets = torch.tensor([0, *sizes]).cumsum(0)[:-1]
    task = task_of[perm]
    sample = perm - offsets[task]
    view = torch.cat(views)[perm]
    # Row v·M + m holds view v of image m (see fastprompt.data.cache).
    row = view * torch.tensor(sizes)[task] + sample
    return task, sample, row


def _group(task: Tensor, sample: Tensor, row: Tensor):
    """``[(t, samples of task t, rows of task t)]`` for the tasks present, by task index."""
    out = []
    for t in torch.unique(task).tolist():
        mask = task == t
        out.append((t, sample[mask], row[mask]))
    return out


def multitask_loss(texts: list[Tensor], groups, tasks: list[Task], config: TrainConfig,
                   options: list[dict], zeroshot: list[Tensor] | None, scale: Tensor,
                   device: torch.device):
    """The batch loss from each present task's class text features (``texts[i]`` for the task
    of ``groups[i]``): ``(loss, kl_loss or None, per-task loss sums)``, weighted by each task's
    share of the batch. Task ``t``'s images meet only task ``t``'s classes."""
    n = sum(len(s) for _, s, _ in groups)
    loss = kl_loss = None
    per_task = []
    for text, (t, sample, rows) in zip(texts, groups):
        cache = tasks[t].cache
        images = cache.train_features[rows].to(device).to(text.dtype)
        labels = cache.train_labels[rows].to(device)
        opts = options[t]
        if "sample_index" in opts:  # the batch's rows of the task's host table
            opts = with_batch_soft_labels(opts, gather_soft_labels(opts["soft_labels"], sample,
                                                                   device))
        weight = len(sample) / n
        if config.prograd:
            task_loss, kl = fastprompt.prograd_losses(
                images, text, zeroshot[t].to(text.dtype), labels, scale,
                temperature=config.temperature, **opts)
            kl_loss = kl * weight if kl_loss is None else kl_loss + kl * weight
        else:
            task_loss = fastprompt.clip_cross_entropy(images, text, labels, scale, **opts)
        loss = task_loss * weight if loss is None else loss + task_loss * weight
        per_task.append((t, task_loss.detach().float() * len(sample)))
    return loss, kl_loss, per_task


def train_softcpt_epoch(net, model, tasks: list[Task], config: TrainConfig, targets: list[Targets],
                        optimizer: torch.optim.Optimizer, epoch: int,
                        zeroshot: list[Tensor] | None, device: torch.device, bar=None,
                        text_chunk: int = 0) -> dict:
    """One epoch over every task's cached training set; returns the epoch's mean loss(es) and
    each task's mean loss (``task_loss``). ``text_chunk`` K > 0: the exact two-pass text
    backward over the batch's tasks' class prompts, K at a time. Under a process group of several
    ranks those class prompts are sharded over them (``fastprompt.train.class_sharding``)."""
    from fastprompt.train.chunked_text_backward import softcpt_encoding
    from fastprompt.train.class_sharding import text_step
    from fastprompt.train.distributed import world_size
    task, sample, rows = multitask_epoch_order(config, tasks, epoch)
    scale = logit_scale(model).to(device)
    # Per task: its own soft-label tables. For ISL, "sample_index" only marks that the batch's
    # rows of the task's table must be gathered (multitask_loss does).
    options = [loss_options(config, targets[t], epoch, sample) for t in range(len(tasks))]
    per_task_total = torch.zeros(len(tasks), device=device)
    step = {}  # the batch's text side: ChunkedTextBackward or ShardedText
    stepped = bool(text_chunk) or world_size() > 1

    def batch_loss(start, stop):
        groups = _group(task[start:stop], sample[start:stop], rows[start:stop])
        present = [t for t, _, _ in groups]
        if stepped:
            encoding, sizes = softcpt_encoding(net, present)
            step["text"] = text_step(encoding, text_chunk, lambda: _autocast(device, config.amp))
            texts = list(step["text"].features().split(sizes))
        else:
            with _autocast(device, config.amp):
                texts = net(present)
        loss, kl, per_task = multitask_loss(texts, groups, tasks, config, options, zeroshot,
                                            scale, device)
        for t, s in per_task:
            per_task_total[t] += s
        return loss, kl

    result = optimise_epoch(config, optimizer, net.trainable_parameters(), epoch, len(rows),
                            batch_loss, device, bar,
                            (lambda loss, kl: step["text"].backward(loss, kl, lam=config.lam))
                            if stepped else None)
    counts = torch.tensor([t.cache.num_train_images for t in tasks], dtype=torch.float32)
    result["task_loss"] = (per_task_total.cpu() / counts).tolist()
    return result


# ---------------------------------------------------------------------------------------------
# The run


@torch.no_grad()
def _task_text_features(net) -> list[Tensor]:
    """Each task's class text features, one task per call (as ``load_softcpt_run`` computes
    them for export), float32."""
    return [net([t])[0].float() for t in range(net.num_tasks)]


class SoftCPTRun:
    """``rundir.Learner`` for SoftCPT's task context and meta network over several tasks."""
    format = SOFTCPT_FORMAT

    def __init__(self, config: TrainConfig, tasks: list[Task], model, tokenizer, device,
                 text_chunk: int = 0):
        from fastprompt.models import zeroshot_text_features
        from fastprompt.train.chunked_text_backward import softcpt_encoding
        from fastprompt.train.class_sharding import local_text_chunk
        self.config, self.tasks, self.model, self.device = config, tasks, model, device
        torch.manual_seed(config.seed)  # the task context's and meta network's initialisation
        self.net = softcpt_model(model, tokenizer, [t.name for t in tasks],
                                 [t.cache.classnames for t in tasks], config).to(device)
        # "auto": for a batch holding every task's classes, the most a step encodes.
        self.text_chunk = local_text_chunk(text_chunk,
                                           softcpt_encoding(self.net, list(range(len(tasks))))[0],
                                           device, lambda: _autocast(device, config.amp))
        self.optimizer = torch.optim.SGD(self.net.trainable_parameters(), lr=config.lr,
                                         momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.zeroshot = [zeroshot_text_features(model, tokenizer, t.cache.classnames).to(device)
                         for t in tasks]
        self.targets = []
        for t, z in zip(tasks, self.zeroshot):
            self.targets.append(make_targets(config, t.cache, z).to(device))
        self.images_per_epoch = sum(t.cache.num_train_images for t in tasks)

    def trainable_state(self) -> dict:
        return self.net.trainable_state()

    def load_trainable_state(self, state: dict) -> None:
        self.net.load_trainable_state(state)

    def train_epoch(self, epoch: int, bar) -> dict:
        return train_softcpt_epoch(self.net, self.model, self.tasks, self.config, self.targets,
                                   self.optimizer, epoch,
                                   self.zeroshot if self.config.prograd else None, self.device,
                                   bar=bar, text_chunk=self.text_chunk)

    @torch.no_grad()
    def train_accuracy(self) -> dict:
        noisy, clean = [], []
        for t, text in zip(self.tasks, self.net()):
            m = t.cache.num_train_images
            first_view = t.cache.train_features[:m]
            noisy.append(accuracy(first_view, t.cache.train_labels[:m], text.float()))
            clean.append(accuracy(first_view, t.cache.train_clean_labels[:m], text.float()))
        return {"task_train_acc_noisy": noisy, "task_train_acc_clean": clean,
                "train_acc_noisy": sum(noisy) / len(noisy),
                "train_acc_clean": sum(clean) / len(clean)}

    def prompt_fields(self) -> dict:
        return {"tasks": [{"name": t.name, "classnames": list(t.cache.classnames)}
                          for t in self.tasks]}


def train_softcpt_run(config: TrainConfig, tasks: list[Task], model, tokenizer, out_dir, *,
                      resume: bool = False, progress: bool | None = None,
                      device: str | torch.device | None = None, text_chunk: int = 0) -> dict:
    """Train SoftCPT on ``tasks`` into ``out_dir``; return the metrics (also in metrics.json).

    ``model`` is the frozen open_clip model every task's cache was built with. With
    ``resume=True`` a checkpoint in ``out_dir`` is continued (same config, tasks, caches and
    model); without it a folder holding a checkpoint is refused. Nothing is written before the
    inputs are checked. ``text_chunk`` as in ``fastprompt.train.train_run`` (not part of the
    run's identity), and so is training on several ranks: each batch's class prompts are
    sharded over them.
    """
    from fastprompt.models.softcpt import softcpt_parameter_count
    from fastprompt.train.chunked_text_backward import check_text_chunk

    if not isinstance(config, TrainConfig) or config.learner != "softcpt":
        raise ValueError("config: expected a TrainConfig with learner='softcpt'")
    tasks = _check_tasks(tasks)
    text_chunk = check_text_chunk(text_chunk)
    out_dir = os.fspath(out_dir)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    identity = {"config": config.to_dict(),
                "tasks": [{"name": t.name, "cache": t.cache.fingerprint} for t in tasks],
                "model_weights": model_weights_hash(model)}
    rundir.refuse_existing_run(out_dir, resume, SOFTCPT_FORMAT)  # before any work
    model = model.to(device)
    learner = SoftCPTRun(config, tasks, model, tokenizer, device, text_chunk)

    def finish(history: list) -> dict:
        per_task = []
        for t, text, z in zip(tasks, _task_text_features(learner.net), learner.zeroshot):
            c = t.cache
            per_task.append({
                "name": t.name, "num_classes": c.num_classes, "classnames": list(c.classnames),
                "num_train_images": c.num_train_images, "views": c.views,
                "zeroshot_test_acc": accuracy(c.test_features, c.test_labels, z),
                "test_acc": accuracy(c.test_features, c.test_labels, text),
                "val_acc": accuracy(c.val_features, c.val_labels, text),
                "num_test_images": int(c.test_features.shape[0]),
                "cache": {"path": os.path.abspath(c.path), "fingerprint": c.fingerprint},
            })

        def mean(key):
            values = [p[key] for p in per_task if p[key] == p[key]]  # NaN: no such images
            return sum(values) / len(values) if values else float("nan")

        counts = softcpt_parameter_count(learner.net)
        return {
            **rundir.run_metrics(config, history, device),
            "tasks": per_task,
            "test_acc": mean("test_acc"),              # averages over the tasks
            "zeroshot_test_acc": mean("zeroshot_test_acc"),
            "val_acc": mean("val_acc"),
            "trainable_parameters": counts["total"],
            "parameters": counts,
            "logit_scale": float(logit_scale(model)),
            "text_chunk": learner.text_chunk,
            "text_chunk_auto": text_chunk == "auto",
            "num_tasks": len(tasks),
            "num_train_images": learner.images_per_epoch,
        }

    return rundir.train_epochs(out_dir, config, learner, identity, resume=resume,
                               progress=progress, device=device,
                               desc=f"train {config.describe()} ({len(tasks)} tasks)",
                               finish=finish)


def _load(prompt: rundir.PromptFile, run_dir: str, model, preprocess_val, tokenizer, device,
          tasks: list[str]) -> list[rundir.Run]:
    config, task_list = prompt.config, prompt.field("tasks")
    names = [t["name"] for t in task_list]
    # The initial draws are overwritten by the trained tensors: leave the caller's generator be.
    with torch.random.fork_rng(devices=[]):
        net = softcpt_model(model, tokenizer, names, [t["classnames"] for t in task_list],
                            config).to(device)
    net.load_trainable_state(prompt.tensors)
    runs = []
    for name in tasks:
        index = names.index(name)
        with torch.no_grad():
            text = net([index])[0].float()
        method = {**rundir.method_summary(config), "task": name, "tasks": names}
        runs.append(rundir.Run(run_dir, config, model, tokenizer, config.model,
                               list(task_list[index]["classnames"]), text,
                               float(logit_scale(model)), method, preprocess_val, task=name))
    return runs


def load_softcpt_run(run_dir, task: str | None = None, device: str | torch.device = "cpu"):
    """One task of a finished SoftCPT run as a ``fastprompt.train.Run``: the open_clip model,
    that task's class names, and its class text features computed from the meta network's
    context for that task (what ``fastprompt export RUN OUT --task NAME`` bakes)."""
    if rundir.read_prompt_file(run_dir).format != SOFTCPT_FORMAT:
        raise ValueError(f"run: {os.fspath(run_dir)!r} is not a SoftCPT run; --task applies to "
                         "SoftCPT runs (trained with --method softcpt) only")
    return rundir.load_run(run_dir, device, task)


rundir.register_format(rundir.RunFormat(
    SOFTCPT_FORMAT, tasks=lambda prompt: [t["name"] for t in prompt.field("tasks")], load=_load))
