"""The run folder, for every learner (CoOp-style prompts and SoftCPT alike): its files, the
locked, checkpointed and resumable epoch loop, and loading a finished run back.

Layout of ``RUN_DIR``::

    config.json        the TrainConfig (written first; a resumed run must match it)
    checkpoint.pt      the trained tensors, optimiser state and history after the last finished
                       epoch, the run's identity (config, cache fingerprints, model weights) and
                       a checksum of all of it
    prompt.safetensors the trained tensors with the config, the class names (SoftCPT: the tasks
                       and their class names), the model's weight hash, the format and a
                       checksum in the metadata: all that export and evaluation need
    metrics.json       every epoch's loss, time and train accuracy, zero-shot and final test
                       accuracy, seed, versions (strict JSON: ``null`` where there is no value)
    .lock              held while a process trains into the folder; names its pid

Every file is written to a temporary name and renamed into place, so an interrupted run leaves
the previous epoch's files whole. The prompt file's ``format`` picks its loader from a table
(``register_format``), so one ``load_run`` serves every learner.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

import fastprompt
from fastprompt._hashing import state_checksum, tensor_checksum
from fastprompt._io import atomic_write, exclusive_lock, progress_bar, read_json, write_json_atomic
from fastprompt.train import distributed
from fastprompt.train.config import TrainConfig

CHECKPOINT = "checkpoint.pt"
PROMPT = "prompt.safetensors"
METRICS = "metrics.json"
CONFIG = "config.json"
LOCK = ".lock"


class RunMismatchError(ValueError):
    """The checkpoint in a run folder belongs to another run (other config, data or model)."""


class NonFiniteTrainingError(ValueError):
    """The loss or the trained tensors became NaN or infinite; the last good epoch is kept."""


def versions() -> dict:
    import open_clip
    out = {"fastprompt": fastprompt.__version__, "torch": torch.__version__,
           "open_clip": open_clip.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_lock(run_dir: str):
    """The run folder's exclusive lock (``LockedError`` naming the holder's pid when taken)."""
    return exclusive_lock(os.path.join(run_dir, LOCK), f"run folder {run_dir!r}")


# ---------------------------------------------------------------------------------------------
# Checkpoint


def _comparable(identity: dict) -> dict:
    """``identity`` with its config in today's fields (checkpoints of 0.1.0 runs store the
    config as it was then)."""
    if isinstance(identity, dict) and isinstance(identity.get("config"), dict):
        try:
            config = TrainConfig.from_dict(identity["config"]).to_dict()
        except (ValueError, TypeError):
            return identity
        return {**identity, "config": config}
    return identity


def save_checkpoint(path: str, fmt: str, tensors: dict[str, Tensor], optimizer, epoch: int,
                    history: list, identity: dict) -> None:
    state = {"format": fmt, "epoch": epoch,
             "params": {k: v.detach().cpu() for k, v in tensors.items()},
             "optimizer": optimizer.state_dict(), "history": history, "identity": identity}
    state["checksum"] = state_checksum(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read_checkpoint(path: str, fmt: str) -> dict:
    """The checkpoint at ``path``, checked: readable, of format ``fmt``, checksum intact."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"resume: checkpoint {path!r} is damaged or not a fastprompt "
                         f"checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict) or not isinstance(state.get("format"), str):
        raise ValueError(f"resume: {path!r} is not a fastprompt checkpoint")
    if state["format"] != fmt:
        raise ValueError(f"resume: checkpoint {path!r} is a {state['format']!r} run, not "
                         f"{fmt!r}; use a new --out folder")
    if "params" not in state and "ctx" in state:  # CoOp checkpoints of 0.1.0
        state["params"] = {"ctx": state.pop("ctx")}
    if "checksum" in state and state["checksum"] != state_checksum(state):
        raise ValueError(f"resume: checkpoint {path!r} is damaged (checksum mismatch); delete "
                         "it to train from scratch, or restore it from a copy")
    return state


def load_checkpoint(path: str, fmt: str, identity: dict) -> dict:
    """``read_checkpoint``, refusing (``RunMismatchError``) one from another run."""
    state = read_checkpoint(path, fmt)
    ours, theirs = _comparable(identity), _comparable(state.get("identity") or {})
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise RunMismatchError(f"resume: checkpoint {path!r} belongs to a different run "
                               f"(differs in {', '.join(diff)}); use a new --out folder")
    return state


def refuse_existing_run(run_dir: str, resume: bool, fmt: str) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume; without ``resume`` one is refused, and
    one of another format or damaged is refused either way (before anything is written)."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return False
    if not resume:
        raise ValueError(f"out: {run_dir!r} already holds a training run; pass --resume to "
                         "continue it or choose another folder")
    read_checkpoint(path, fmt)
    return True


# ---------------------------------------------------------------------------------------------
# Prompt file


def _prompt_checksum(tensors: dict[str, Tensor], metadata: dict) -> str:
    rest = json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True)
    return tensor_checksum(tensors, rest)


def write_prompt(path: str, fmt: str, tensors: dict[str, Tensor], config: TrainConfig,
                 model_weights: str, **fields) -> None:
    """Write the trained tensors with ``format``, ``config``, ``model_weights`` and ``fields``
    (each JSON-encoded) and a checksum of all of it in the metadata."""
    from safetensors.torch import save
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": fmt, "config": json.dumps(config.to_dict()),
                "model_weights": model_weights, "fastprompt_version": fastprompt.__version__,
                **{k: json.dumps(v) for k, v in fields.items()}}
    metadata["checksum"] = _prompt_checksum(tensors, metadata)
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


@dataclass
class PromptFile:
    """A run's ``prompt.safetensors``, read and checked."""
    path: str
    format: str
    tensors: dict
    config: TrainConfig
    metadata: dict

    def field(self, name: str):
        return json.loads(self.metadata[name])


def read_prompt_file(run_dir) -> PromptFile:
    from safetensors import safe_open
    path = os.path.join(os.fspath(run_dir), PROMPT)
    if not os.path.isfile(path):
        raise ValueError(f"run: {os.fspath(run_dir)!r} has no trained prompt ({PROMPT} missing; "
                         "did training finish?)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        fmt = metadata.get("format")
        if fmt not in _FORMATS:
            raise ValueError("not written by fastprompt")
        config = TrainConfig.from_dict(json.loads(metadata["config"]))
    except Exception as e:
        raise ValueError(f"run: {path!r} is damaged or not a fastprompt prompt file "
                         f"({str(e)[:200]})") from e
    if "checksum" in metadata and metadata["checksum"] != _prompt_checksum(tensors, metadata):
        raise ValueError(f"run: {path!r} is damaged (checksum mismatch); retrain, or restore "
                         "it from a copy")
    return PromptFile(path, fmt, tensors, config, metadata)


# ---------------------------------------------------------------------------------------------
# The epoch loop


class Learner(Protocol):
    """What ``train_epochs`` needs from a learner (CoOp's prompt, SoftCPT's meta network)."""
    format: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    images_per_epoch: int

    def trainable_state(self) -> dict[str, Tensor]: ...
    def load_trainable_state(self, state: dict[str, Tensor]) -> None: ...
    def train_epoch(self, epoch: int, bar) -> dict: ...
    def train_accuracy(self) -> dict: ...
    def prompt_fields(self) -> dict: ...


def _check_finite(learner: Learner, result: dict, epoch: int, run_dir: str) -> None:
    bad = [k for k in ("loss", "kl_loss") if k in result and not math.isfinite(result[k])]
    bad += [k for k, v in learner.trainable_state().items() if not bool(torch.isfinite(v).all())]
    if bad:
        kept = (f"{CHECKPOINT} keeps epoch {epoch}" if epoch else "nothing was saved")
        raise NonFiniteTrainingError(
            f"training: {', '.join(bad)} became NaN or infinite in epoch {epoch + 1} of the run "
            f"in {run_dir!r}; {kept}. Lower --lr, or check the data and the features")


def _prepare(run_dir: str, config: TrainConfig, learner: Learner, identity: dict, resume: bool,
             stack: contextlib.ExitStack) -> dict | None:
    """Create and lock ``run_dir`` (the lock held by ``stack``), read the checkpoint to resume
    (only with ``resume``, only of the same identity) and write the config; returns the
    checkpoint's state or None."""
    os.makedirs(run_dir, exist_ok=True)
    stack.enter_context(run_lock(run_dir))
    state = None
    if refuse_existing_run(run_dir, resume, learner.format):
        state = load_checkpoint(os.path.join(run_dir, CHECKPOINT), learner.format, identity)
    write_json_atomic(os.path.join(run_dir, CONFIG), config.to_dict())
    return state


def train_epochs(run_dir: str, config: TrainConfig, learner: Learner, identity: dict, *,
                 resume: bool, progress: bool | None, device: torch.device, desc: str,
                 finish: Callable[[list], dict]) -> dict:
    """Train ``learner`` for ``config.epochs`` epochs into ``run_dir``, holding its lock: resume
    a checkpoint there (only with ``resume``, only of the same identity), checkpoint after every
    epoch, stop with ``NonFiniteTrainingError`` (keeping the last good checkpoint) when the loss
    or the tensors turn non-finite, then write the prompt file (the learner's tensors and
    ``prompt_fields``) and ``finish(history)``'s metrics. Returns the metrics.

    Under several ranks every rank runs this: they first check that they hold the same
    identity (model weights' hashes, data, config); rank 0 alone takes the lock, reads the
    checkpoint and writes files and the progress bar, and sends the others the state to resume
    from; every rank trains and computes the metrics."""
    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    writer = distributed.is_writer()
    if distributed.world_size() > 1:
        # The identity's model_weights hashes the image tower only; each rank also encodes
        # classes with its own text tower, so the whole model must agree.
        distributed.check_same_on_all_ranks(
            "model weights, data and config",
            {**identity, "model_state": tensor_checksum(learner.model.state_dict())})
    with contextlib.ExitStack() as stack:
        state = distributed.from_rank_zero(
            lambda: _prepare(run_dir, config, learner, identity, resume, stack))
        history: list = []
        if state is not None:
            learner.load_trainable_state(state["params"])
            learner.optimizer.load_state_dict(state["optimizer"])
            history = list(state["history"])
        images = learner.images_per_epoch
        first = len(history)
        # One bar per run, counting images over all epochs (progress=False hides it).
        with progress_bar(config.epochs * images, desc, progress if writer else False,
                          initial=first * images) as bar:
            for epoch in range(first, config.epochs):
                start = time.perf_counter()
                result = learner.train_epoch(epoch=epoch, bar=bar)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result["seconds"] = time.perf_counter() - start
                _check_finite(learner, result, epoch, run_dir)
                result.update(learner.train_accuracy())
                result["epoch"] = epoch + 1
                history.append(result)
                if writer:
                    save_checkpoint(ckpt_path, learner.format, learner.trainable_state(),
                                    learner.optimizer, epoch + 1, history, identity)
                bar.set_postfix(epoch=epoch + 1, loss=f"{result['loss']:.4f}",
                                acc=f"{result['train_acc_noisy']:.3f}")
        if writer:
            write_prompt(os.path.join(run_dir, PROMPT), learner.format,
                         learner.trainable_state(), config, identity["model_weights"],
                         **learner.prompt_fields())
        metrics = finish(history)
        if writer:
            write_json_atomic(os.path.join(run_dir, METRICS), metrics)
    return metrics


def run_metrics(config: TrainConfig, history: list, device: torch.device) -> dict:
    """The metrics every run reports besides its accuracies."""
    from fastprompt import _backend
    seconds = sorted(h["seconds"] for h in history)
    return {"method": config.describe(), "config": config.to_dict(), "seed": config.seed,
            "epochs": history, "epoch_seconds_median": seconds[len(seconds) // 2],
            "device": device_name(device), "ranks": distributed.world_size(),
            "versions": versions(),
            "backend": _backend.resolve(device)}


# ---------------------------------------------------------------------------------------------
# Loading a finished run: one loader per prompt-file format


@dataclass
class Run:
    """A finished run, loaded for evaluation or export (``fastprompt.pipeline.export_run``):
    one classifier (SoftCPT: one task's)."""
    run_dir: str
    config: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    model_name: str
    class_names: list
    text_features: Tensor        # C x E, unnormalised, as encode_text returns them
    scale: float
    method: dict
    preprocess_val: object = None
    task: str | None = None      # SoftCPT: the task this classifier is for


@dataclass(frozen=True)
class RunFormat:
    """How to read one prompt-file format back: ``tasks(prompt)`` (task names, or None for a
    single classifier) and ``load(prompt, model, preprocess_val, tokenizer, device, tasks)``
    (one ``Run`` per requested task; ``tasks`` None for a single classifier)."""
    name: str
    tasks: Callable
    load: Callable


_FORMATS: dict[str, RunFormat] = {}


def register_format(fmt: RunFormat) -> None:
    _FORMATS[fmt.name] = fmt


# The settings an export records about how its classifier was trained (``Run.method``).
_METHOD_KEYS = ("learner", "loss", "targets", "smoothing", "alternate", "alternate_period",
                "csl_temperature", "prograd", "lam", "temperature", "n_ctx",
                "class_token_position")
_LEARNER_METHOD_KEYS = {"coop": ("ctx_init", "class_specific"),
                        "softcpt": ("n_task_ctx", "task_ctx")}


def method_summary(config: TrainConfig) -> dict:
    """``Run.method``: the config's ``--method`` name, its training settings and ``name``
    (``config.describe()``)."""
    d = config.to_dict()
    keys = _METHOD_KEYS + _LEARNER_METHOD_KEYS[config.learner]
    return {"method": config.method, **{k: d[k] for k in keys}, "name": config.describe()}


def _model_for(prompt: PromptFile, run_dir: str, device, image_tower: bool):
    from fastprompt.models.weights import model_weights_hash
    from fastprompt.models import create_model
    config = prompt.config
    model, _, preprocess_val, tokenizer = create_model(config.model, config.pretrained, device,
                                                       image_tower=image_tower)
    if prompt.metadata.get("model_weights") != model_weights_hash(model):
        raise ValueError(f"run: the weights of model {config.model!r} "
                         f"(pretrained={config.pretrained!r}) differ from those the prompt in "
                         f"{run_dir!r} was trained with")
    return model, preprocess_val, tokenizer


def _select_tasks(run_dir: str, names: list[str] | None, task: str | None) -> list[str] | None:
    from fastprompt.models.softcpt import normalize_task_name
    if names is None:
        if task is not None:
            raise ValueError(f"task: {run_dir!r} is not a SoftCPT run; --task applies to SoftCPT "
                             "runs (trained with --method softcpt) only")
        return None
    if task is None:
        return list(names)
    if not isinstance(task, str):
        raise TypeError(f"task: expected a task name, got {type(task).__name__}")
    key = normalize_task_name(task).lower()
    matches = [n for n in names if normalize_task_name(n).lower() == key]
    if not matches:
        raise ValueError(f"task: the run has no task {task!r}; its tasks: {names}")
    return matches[:1]


def _load(run_dir: str, prompt: PromptFile, device, task: str | None,
          image_tower: bool = True) -> list[Run]:
    fmt = _FORMATS[prompt.format]
    tasks = _select_tasks(run_dir, fmt.tasks(prompt), task)
    model, preprocess_val, tokenizer = _model_for(prompt, run_dir, device, image_tower)
    return fmt.load(prompt, run_dir, model, preprocess_val, tokenizer, device, tasks)


def load_runs(run_dir, device: str | torch.device = "cpu", task: str | None = None, *,
              image_tower: bool = True) -> list[Run]:
    """Every classifier of a finished run (SoftCPT: one per task, or the one ``task`` names).
    ``image_tower=False``: for work on cached features only (``create_model``'s argument)."""
    run_dir = os.fspath(run_dir)
    return _load(run_dir, read_prompt_file(run_dir), device, task, image_tower)


def load_run(run_dir, device: str | torch.device = "cpu", task: str | None = None) -> Run:
    """Rebuild one classifier of a trained run: the open_clip model (from the config's model
    name and pretrained file), the learned prompt, and its C x E class text features. A SoftCPT
    run over several tasks needs ``task``, the name of the task whose classifier to rebuild."""
    run_dir = os.fspath(run_dir)
    prompt = read_prompt_file(run_dir)
    names = _FORMATS[prompt.format].tasks(prompt)
    if task is None and names is not None and len(names) > 1:
        raise ValueError(f"run: {run_dir!r} is a SoftCPT run over {len(names)} tasks {names}; "
                         "pick one with --task NAME (task=NAME)")
    return _load(run_dir, prompt, device, task)[0]


def run_caches(run_dir) -> dict[str | None, str]:
    """The feature cache each classifier of a run was trained on, from its ``metrics.json``:
    ``{task name (None for a single classifier): cache path}``."""
    path = os.path.join(os.fspath(run_dir), METRICS)
    if not os.path.isfile(path):
        raise ValueError(f"run: {os.fspath(run_dir)!r} has no {METRICS}; pass --cache FILE")
    metrics = read_json(path, "run")
    try:
        if "tasks" in metrics:
            return {t["name"]: t["cache"]["path"] for t in metrics["tasks"]}
        return {None: metrics["cache"]["path"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"run: {path!r} does not name the run's feature cache (missing "
                         f"{e}); pass --cache FILE") from e


def evaluate_run(run_dir, cache=None, device: str | torch.device = "cpu",
                 task: str | None = None) -> dict:
    """Test (and validation) accuracy of a trained run on feature caches of the same classes.

    ``cache``: a ``FeatureCache`` (or a path); None takes the caches the run was trained on
    (from its metrics.json). A SoftCPT run is evaluated on every task, or on ``task``; a given
    cache needs ``task`` unless the run has one task. Returns ``test_acc``, ``val_acc`` and
    ``num_test_images``; for SoftCPT also ``tasks``, one such record per task (the top-level
    accuracies are their average)."""
    from fastprompt.data import FeatureCache, load_cache
    from fastprompt.train.loop import accuracy
    runs = load_runs(run_dir, device, task, image_tower=False)
    softcpt = runs[0].task is not None
    if cache is not None and softcpt and len(runs) > 1:
        raise ValueError(f"task: {os.fspath(run_dir)!r} is a SoftCPT run over "
                         f"{len(runs)} tasks; with --cache name the task it belongs to (--task)")
    paths = run_caches(run_dir) if cache is None else None
    results = []
    for run in runs:
        c = cache if cache is not None else paths.get(run.task)
        if c is None:
            raise ValueError(f"run: metrics.json names no cache for task {run.task!r}; pass "
                             "--cache FILE")
        if not isinstance(c, FeatureCache):
            c = load_cache(c)
        if list(c.classnames) != list(run.class_names):
            raise ValueError(f"cache: its classes {c.classnames[:5]}... differ from the run's "
                             f"{run.class_names[:5]}...")
        result = {"test_acc": accuracy(c.test_features, c.test_labels, run.text_features),
                  "val_acc": accuracy(c.val_features, c.val_labels, run.text_features),
                  "num_test_images": int(c.test_features.shape[0])}
        results.append(result if run.task is None else {"name": run.task, **result})
    if not softcpt:
        return results[0]

    def mean(key):
        values = [r[key] for r in results if math.isfinite(r[key])]
        return sum(values) / len(values) if values else float("nan")
    return {"tasks": results, "test_acc": mean("test_acc"), "val_acc": mean("val_acc"),
            "num_test_images": sum(r["num_test_images"] for r in results)}
