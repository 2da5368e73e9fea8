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

Run folder (``train_softcpt_run``)::

    config.json        the TrainConfig (method "softcpt")
    checkpoint.pt      task context, meta network, optimiser state, history, run identity
    prompt.safetensors the trained tensors ("task_ctx", "meta_weight"), with the config, the task
                       names and class names and the model's weight hash in the metadata
    metrics.json       per epoch: loss (overall and per task), train accuracy per task;
                       per task and averaged: zero-shot, test and validation accuracy
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor

import fastprompt
from fastprompt import _backend
from fastprompt._io import atomic_write, write_json_atomic
from fastprompt.data.cache import FeatureCache, model_weights_hash
from fastprompt.train.config import TrainConfig
from fastprompt.train.loop import (_SHUFFLE_STREAM, _VIEW_STREAM, Targets, _autocast, accuracy,
                                   learning_rate, logit_scale, loss_options, make_targets)

CHECKPOINT = "checkpoint.pt"
PROMPT = "prompt.safetensors"
METRICS = "metrics.json"
CONFIG = "config.json"
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
        opts = dict(options[t])
        if opts.pop("sample_index", None) is not None:
            opts["sample_index"] = sample.to(device)
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
                        zeroshot: list[Tensor] | None, device: torch.device, bar=None) -> dict:
    """One epoch over every task's cached training set; returns the epoch's mean loss(es)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, epoch)
    task, sample, rows = multitask_epoch_order(config, tasks, epoch)
    scale = logit_scale(model).to(device)
    params = net.trainable_parameters()
    # Per task: its own soft-label tables. For ISL, "sample_index" only marks that the batch's
    # own indices into the task's table must be passed (multitask_loss does).
    options = [loss_options(config, targets[t], epoch, sample) for t in range(len(tasks))]
    # Sums stay on the device: no host synchronisation per step.
    total = torch.zeros((), device=device)
    total_kl = torch.zeros((), device=device)
    per_task_total = torch.zeros(len(tasks), device=device)
    for start in range(0, len(rows), config.batch_size):
        stop = min(start + config.batch_size, len(rows))
        n = stop - start
        groups = _group(task[start:stop], sample[start:stop], rows[start:stop])
        present = [t for t, _, _ in groups]
        with _autocast(device, config.amp):
            texts = net(present)
        optimizer.zero_grad(set_to_none=True)
        loss, kl, per_task = multitask_loss(texts, groups, tasks, config, options, zeroshot,
                                            scale, device)
        if config.prograd:
            fastprompt.prograd_backward(loss, kl, params, lam=config.lam)
            total_kl += kl.detach().float() * n
        else:
            loss.backward()
        optimizer.step()
        total += loss.detach().float() * n
        for t, s in per_task:
            per_task_total[t] += s
        if bar is not None:
            bar.update(n)
    seen = len(rows)
    counts = [t.cache.num_train_images for t in tasks]
    per_task_loss = (per_task_total.cpu() / torch.tensor(counts, dtype=torch.float32)).tolist()
    result = {"loss": float(total) / seen, "task_loss": per_task_loss,
              "lr": learning_rate(config, epoch), "soft_targets": config.soft_epoch(epoch)}
    if config.prograd:
        result["kl_loss"] = float(total_kl) / seen
    return result


# ---------------------------------------------------------------------------------------------
# Checkpoint and prompt file


def _save_checkpoint(path: str, net, optimizer, epoch: int, history: list, identity: dict) -> None:
    state = {"format": SOFTCPT_FORMAT, "epoch": epoch,
             "params": {k: v.detach().cpu() for k, v in net.trainable_state().items()},
             "optimizer": optimizer.state_dict(), "history": history, "identity": identity}
    atomic_write(path, lambda f: torch.save(state, f))


def _read_checkpoint(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"resume: checkpoint {path!r} is damaged or not a fastprompt "
                         f"checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != SOFTCPT_FORMAT:
        raise ValueError(f"resume: {path!r} is not a SoftCPT checkpoint")
    return state


def _load_checkpoint(path: str, identity: dict) -> dict:
    state = _read_checkpoint(path)
    if state.get("identity") != identity:
        theirs = state.get("identity") or {}
        diff = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
        raise ValueError(f"resume: checkpoint {path!r} belongs to a different run "
                         f"(differs in {', '.join(diff)}); use a new --out folder")
    return state


def _write_prompt(path: str, net, config: TrainConfig, tasks: list[Task], identity: dict) -> None:
    from safetensors.torch import save
    metadata = {"format": SOFTCPT_FORMAT, "config": json.dumps(config.to_dict()),
                "tasks": json.dumps([{"name": t.name, "classnames": list(t.cache.classnames)}
                                     for t in tasks]),
                "model_weights": identity["model_weights"],
                "fastprompt_version": fastprompt.__version__}
    data = save({k: v.detach().float().cpu().contiguous() for k, v in net.trainable_state().items()},
                metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def read_softcpt_prompt(run_dir) -> tuple[dict, TrainConfig, list[dict], dict]:
    """``(tensors, config, tasks, metadata)`` from a SoftCPT run's ``prompt.safetensors``;
    ``tasks`` is ``[{"name", "classnames"}]``."""
    from safetensors import safe_open
    path = os.path.join(os.fspath(run_dir), PROMPT)
    if not os.path.isfile(path):
        raise ValueError(f"run: {os.fspath(run_dir)!r} has no trained prompt ({PROMPT} missing; "
                         "did training finish?)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != SOFTCPT_FORMAT:
            raise ValueError("not a SoftCPT prompt")
        config = TrainConfig.from_dict(json.loads(metadata["config"]))
        tasks = json.loads(metadata["tasks"])
    except Exception as e:
        raise ValueError(f"run: {path!r} is damaged or not a SoftCPT prompt file ({e})") from e
    return tensors, config, tasks, metadata


def is_softcpt_run(run_dir) -> bool:
    """Whether ``run_dir`` holds a SoftCPT run (its prompt file, or else its config, says so)."""
    run_dir = os.fspath(run_dir)
    prompt = os.path.join(run_dir, PROMPT)
    try:
        if os.path.isfile(prompt):
            from safetensors import safe_open
            with safe_open(prompt, framework="pt") as f:
                return (f.metadata() or {}).get("format") == SOFTCPT_FORMAT
        with open(os.path.join(run_dir, CONFIG), encoding="utf-8") as f:
            return json.load(f).get("method") == "softcpt"
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# The run


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@torch.no_grad()
def _task_text_features(net) -> list[Tensor]:
    """Each task's class text features, one task per call (as ``load_softcpt_run`` computes
    them for export), float32."""
    return [net([t])[0].float() for t in range(net.num_tasks)]


def train_softcpt_run(config: TrainConfig, tasks: list[Task], model, tokenizer, out_dir, *,
                      resume: bool = False, progress: bool | None = None,
                      device: str | torch.device | None = None) -> dict:
    """Train SoftCPT on ``tasks`` into ``out_dir``; return the metrics (also in metrics.json).

    ``model`` is the frozen open_clip model every task's cache was built with. With
    ``resume=True`` a checkpoint in ``out_dir`` is continued (same config, tasks, caches and
    model); without it a folder holding a checkpoint is refused. Nothing is written before the
    inputs are checked.
    """
    from tqdm.auto import tqdm

    from fastprompt.models import zeroshot_text_features
    from fastprompt.models.softcpt import softcpt_parameter_count
    from fastprompt.train.run import versions

    if not isinstance(config, TrainConfig) or config.method != "softcpt":
        raise ValueError("config: expected a TrainConfig with method='softcpt'")
    tasks = _check_tasks(tasks)
    out_dir = os.fspath(out_dir)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = model_weights_hash(model)
    identity = {"config": config.to_dict(),
                "tasks": [{"name": t.name, "cache": t.cache.fingerprint} for t in tasks],
                "model_weights": weights}
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    state = None
    if os.path.exists(ckpt_path):
        if not resume:
            raise ValueError(f"out: {out_dir!r} already holds a training run; pass --resume to "
                             "continue it or choose another folder")
        state = _load_checkpoint(ckpt_path, identity)

    model = model.to(device)
    torch.manual_seed(config.seed)  # the task context's and meta network's initialisation
    net = softcpt_model(model, tokenizer, [t.name for t in tasks],
                        [t.cache.classnames for t in tasks], config).to(device)
    params = net.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    history: list = []
    if state is not None:
        net.load_trainable_state(state["params"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])

    zeroshot = [zeroshot_text_features(model, tokenizer, t.cache.classnames).to(device)
                for t in tasks]
    targets = []
    for t, z in zip(tasks, zeroshot):
        tg = make_targets(config, t.cache, z) if config.targets in ("csl", "isl") else Targets()
        targets.append(Targets(*(x.to(device) if x is not None else None
                                 for x in (tg.class_wise, tg.instance_wise))))
    scale = float(logit_scale(model))

    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, CONFIG), config.to_dict())
    images = sum(t.cache.num_train_images for t in tasks)
    first = len(history)
    with tqdm(total=config.epochs * images, initial=first * images,
              desc=f"train {config.describe()} ({len(tasks)} tasks)", unit="img",
              disable=(progress is False), dynamic_ncols=True) as bar:
        for epoch in range(first, config.epochs):
            start = time.perf_counter()
            result = train_softcpt_epoch(net, model, tasks, config, targets, optimizer, epoch,
                                         zeroshot if config.prograd else None, device, bar=bar)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result["seconds"] = time.perf_counter() - start
            with torch.no_grad():
                texts = net()
            noisy, clean = [], []
            for t, text in zip(tasks, texts):
                m = t.cache.num_train_images
                first_view = t.cache.train_features[:m]
                noisy.append(accuracy(first_view, t.cache.train_labels[:m], text.float()))
                clean.append(accuracy(first_view, t.cache.train_clean_labels[:m], text.float()))
            result["task_train_acc_noisy"] = noisy
            result["task_train_acc_clean"] = clean
            result["train_acc_noisy"] = sum(noisy) / len(noisy)
            result["train_acc_clean"] = sum(clean) / len(clean)
            result["epoch"] = epoch + 1
            history.append(result)
            _save_checkpoint(ckpt_path, net, optimizer, epoch + 1, history, identity)
            bar.set_postfix(epoch=epoch + 1, loss=f"{result['loss']:.4f}",
                            acc=f"{result['train_acc_noisy']:.3f}")

    texts = _task_text_features(net)
    _write_prompt(os.path.join(out_dir, PROMPT), net, config, tasks, identity)
    per_task = []
    for t, text, z in zip(tasks, texts, zeroshot):
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

    train_seconds = [h["seconds"] for h in history]
    counts = softcpt_parameter_count(net)
    metrics = {
        "method": config.describe(),
        "config": config.to_dict(),
        "seed": config.seed,
        "tasks": per_task,
        "test_acc": mean("test_acc"),              # averages over the tasks
        "zeroshot_test_acc": mean("zeroshot_test_acc"),
        "val_acc": mean("val_acc"),
        "epochs": history,
        "epoch_seconds_median": sorted(train_seconds)[len(train_seconds) // 2],
        "trainable_parameters": counts["total"],
        "parameters": counts,
        "logit_scale": scale,
        "num_tasks": len(tasks),
        "num_train_images": images,
        "device": _device_name(device),
        "versions": versions(),
        "backend": _backend.resolve(device),
    }
    write_json_atomic(os.path.join(out_dir, METRICS), metrics)
    return metrics


def load_softcpt_run(run_dir, task: str | None = None, device: str | torch.device = "cpu"):
    """One task of a finished SoftCPT run as a ``fastprompt.train.Run``: the open_clip model,
    that task's class names, and its class text features computed from the meta network's
    context for that task (what ``fastprompt export RUN OUT --task NAME`` bakes)."""
    from fastprompt.models import create_model
    from fastprompt.models.softcpt import normalize_task_name
    from fastprompt.train.run import Run
    run_dir = os.fspath(run_dir)
    if not is_softcpt_run(run_dir):
        raise ValueError(f"run: {run_dir!r} is not a SoftCPT run; --task applies to SoftCPT runs "
                         "(trained with --method softcpt) only")
    tensors, config, task_list, metadata = read_softcpt_prompt(run_dir)
    names = [t["name"] for t in task_list]
    if task is None:
        raise ValueError(f"run: {run_dir!r} is a SoftCPT run over {len(names)} tasks {names}; "
                         "pick one with --task NAME (task=NAME)")
    if not isinstance(task, str):
        raise TypeError(f"task: expected a task name, got {type(task).__name__}")
    key = normalize_task_name(task).lower()
    matches = [i for i, n in enumerate(names) if normalize_task_name(n).lower() == key]
    if not matches:
        raise ValueError(f"task: the run has no task {task!r}; its tasks: {names}")
    index = matches[0]
    model, _, preprocess_val, tokenizer = create_model(config.model, config.pretrained, device)
    if metadata.get("model_weights") != model_weights_hash(model):
        raise ValueError(f"run: the weights of model {config.model!r} "
                         f"(pretrained={config.pretrained!r}) differ from those the prompt in "
                         f"{run_dir!r} was trained with")
    # The initial draws are overwritten by the trained tensors: leave the caller's generator be.
    with torch.random.fork_rng(devices=[]):
        net = softcpt_model(model, tokenizer, names, [t["classnames"] for t in task_list],
                            config).to(device)
    net.load_trainable_state(tensors)
    with torch.no_grad():
        text = net([index])[0].float()
    method = {k: v for k, v in config.to_dict().items()
              if k in ("method", "targets", "smoothing", "alternate", "alternate_period",
                       "csl_temperature", "prograd", "lam", "temperature", "n_ctx",
                       "class_token_position", "n_task_ctx", "task_ctx", "softcpt_loss")}
    method["name"] = config.describe()
    method["task"] = names[index]
    method["tasks"] = names
    return Run(run_dir, config, model, tokenizer, config.model,
               list(task_list[index]["classnames"]), text, float(logit_scale(model)), method,
               preprocess_val)


# ---------------------------------------------------------------------------------------------
# Command line: `fastprompt train --method softcpt --tasks TASKS.json` (hooked in fastprompt/cli.py)


def add_softcpt_args(parser: argparse.ArgumentParser) -> None:
    """SoftCPT's options of ``fastprompt train``."""
    from fastprompt.train.config import TrainConfig
    d = TrainConfig()
    g = parser.add_argument_group("SoftCPT (--method softcpt: several tasks, one meta network)")
    g.add_argument("--tasks", metavar="TASKS.json",
                   help='tasks file: [{"name": ..., "data": DIR, "split_file": FILE?}, ...] '
                        "(or give --data once per task)")
    g.add_argument("--task-names", nargs="+", metavar="NAME",
                   help="task names for several --data folders (default: the folder names)")
    g.add_argument("--n-task-ctx", type=int, default=d.n_task_ctx,
                   help="learnable task context tokens before each task name (default: %(default)s)")
    g.add_argument("--task-ctx", choices=("shared", "per-task"), default="shared",
                   help="one task context for all tasks, or one per task (default: %(default)s)")
    g.add_argument("--softcpt-loss", choices=("coop", "dspt"), default=d.softcpt_loss,
                   help="the per-task loss: cross-entropy or DSPT's double softmax (default: %(default)s)")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "task"


def cmd_train_softcpt(args) -> int:
    """``fastprompt train --method softcpt``: read and check every task, then cache each task's
    features under ``OUT/features/`` and train. Bad input writes nothing."""
    from fastprompt.cli import training as cli
    from fastprompt.data import build_or_load_cache
    from fastprompt.data.tasks import load_task_datasets, read_tasks_file, task_specs_from_folders
    if args.method != "softcpt":
        raise ValueError(f"--tasks: training several tasks is SoftCPT's; add --method softcpt "
                         f"(got --method {args.method})")
    folders = getattr(args, "data_all", None) or ([args.data] if args.data else [])
    if args.tasks and folders:
        raise ValueError("--tasks: give the tasks either in a tasks file or as --data folders, "
                         "not both")
    if args.cache:
        raise ValueError("--cache: SoftCPT keeps one feature cache per task in OUT/features/")
    if args.split_file:
        raise ValueError("--split-file: with SoftCPT, name each task's split file in the tasks "
                         "file (\"split_file\")")
    if args.tasks:
        if args.task_names:
            raise ValueError("--task-names: the tasks file names its tasks")
        specs = read_tasks_file(args.tasks)
    elif folders:
        specs = task_specs_from_folders(folders, args.task_names)
    else:
        raise ValueError("--tasks: SoftCPT needs tasks: --tasks TASKS.json, or --data once per task")
    splits = load_task_datasets(specs, test_fraction=args.test_fraction, seed=args.seed)
    config = cli._config_from(args)
    config = dataclasses.replace(
        config, epochs=args.epochs if args.epochs is not None else SOFTCPT_EPOCHS,
        n_task_ctx=args.n_task_ctx, task_ctx=args.task_ctx.replace("-", "_"),
        softcpt_loss=args.softcpt_loss)
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    if os.path.exists(ckpt_path):  # checked before any cache is written
        if not args.resume:
            raise ValueError(f"out: {args.out!r} already holds a training run; pass --resume to "
                             "continue it or choose another folder")
        _read_checkpoint(ckpt_path)  # a damaged or CoOp checkpoint is refused here already
    model, pt, pv, tokenizer, device = cli._load_model(args)
    tasks = []
    for i, (spec, split) in enumerate(zip(specs, splits)):
        path = os.path.join(args.out, "features", f"{i:02d}-{_slug(spec.name)}.safetensors")
        cache = build_or_load_cache(path, model, args.model, pt, pv, split, views=args.views,
                                    shots=args.shots, noise_rate=args.noise_rate,
                                    noise_type=args.noise_type, seed=args.seed,
                                    batch_size=args.batch_size_cache, num_workers=args.workers,
                                    progress=not args.no_progress)
        tasks.append(Task(spec.name, cache))
    metrics = train_softcpt_run(config, tasks, model, tokenizer, args.out, resume=args.resume,
                                device=device, progress=not args.no_progress)
    for t in metrics["tasks"]:
        print(f"  {t['name']}: test accuracy {t['test_acc']:.4f} (zero-shot "
              f"{t['zeroshot_test_acc']:.4f}), {t['num_classes']} classes")
    print(f"{metrics['method']} over {len(tasks)} tasks: average test accuracy "
          f"{metrics['test_acc']:.4f} (zero-shot {metrics['zeroshot_test_acc']:.4f}), "
          f"{metrics['trainable_parameters']} trained parameters, median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Demo section (called at the end of fastprompt.demo.run_demo)

DEMO_TASKS = 3
DEMO_CLASSES_PER_TASK = 4
DEMO_IMAGES_PER_CLASS = 16
DEMO_VIEWS = 4


def demo_multitask(out: str, model, preprocess_train, preprocess_val, tokenizer, weights: str, *,
                   epochs: int, progress: bool = True) -> dict:
    """Generate a few shapes tasks with disjoint classes, train SoftCPT on all of them and one
    CoOp prompt per task, and print test accuracy per task."""
    from fastprompt.data import build_or_load_cache
    from fastprompt.data.tasks import load_task_datasets, make_shapes_tasks, read_tasks_file
    from fastprompt.models import TINY_MODEL
    from fastprompt.train.run import train_run

    print(f"\nmulti-task (SoftCPT): {DEMO_TASKS} generated tasks of {DEMO_CLASSES_PER_TASK} "
          "disjoint shape classes each")
    root = os.path.join(out, "multitask")
    tasks_file = make_shapes_tasks(os.path.join(root, "data"), num_tasks=DEMO_TASKS,
                                   classes_per_task=DEMO_CLASSES_PER_TASK,
                                   images_per_class=DEMO_IMAGES_PER_CLASS,
                                   test_images_per_class=DEMO_IMAGES_PER_CLASS // 2, seed=3)
    specs = read_tasks_file(tasks_file)
    tasks = []
    for i, (spec, split) in enumerate(zip(specs, load_task_datasets(specs, seed=1))):
        cache = build_or_load_cache(os.path.join(root, f"features-{i}.safetensors"), model,
                                    TINY_MODEL, preprocess_train, preprocess_val, split,
                                    views=DEMO_VIEWS, seed=1, progress=progress)
        tasks.append(Task(spec.name, cache))
    base = dict(model=TINY_MODEL, pretrained=os.path.abspath(weights), epochs=epochs)

    def fresh(train, run_dir, *a):
        try:
            return train(*a, run_dir, resume=True, progress=progress)
        except ValueError as e:
            if "belongs to a different run" not in str(e):
                raise
            import shutil
            shutil.rmtree(run_dir)
            return train(*a, run_dir, progress=progress)

    soft = fresh(train_softcpt_run, os.path.join(root, "softcpt"),
                 TrainConfig(method="softcpt", **base), tasks, model, tokenizer)
    coop = [fresh(train_run, os.path.join(root, f"coop-{i}"), TrainConfig(**base), t.cache, model,
                  tokenizer) for i, t in enumerate(tasks)]

    rows = [(t["name"], str(t["num_classes"]), f"{t['zeroshot_test_acc']:.3f}",
             f"{c['test_acc']:.3f}", f"{t['test_acc']:.3f}")
            for t, c in zip(soft["tasks"], coop)]
    rows.append(("average", "", f"{soft['zeroshot_test_acc']:.3f}",
                 f"{sum(c['test_acc'] for c in coop) / len(coop):.3f}", f"{soft['test_acc']:.3f}"))
    header = ("task", "classes", "zero-shot", "CoOp (1 prompt/task)", "SoftCPT")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"{epochs} epochs each, batch 32; test accuracy per task:")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    coop_ms = sum(c["epoch_seconds_median"] for c in coop) * 1e3
    print(f"epoch time: SoftCPT over {len(tasks)} tasks {soft['epoch_seconds_median'] * 1e3:.1f} ms, "
          f"{len(tasks)} CoOp runs {coop_ms:.1f} ms in all; trained parameters: SoftCPT "
          f"{soft['trainable_parameters']} (meta network {soft['parameters']['meta_net']}, task "
          f"context {soft['parameters']['task_ctx']}), CoOp "
          f"{sum(c['trainable_parameters'] for c in coop)} ({len(coop)} x "
          f"{coop[0]['trainable_parameters']})")
    sys.stdout.flush()
    return {"softcpt": soft, "coop": coop}
