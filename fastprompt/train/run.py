"""A training run folder: train into it, resume it, load it back for evaluation and export.

Layout of ``RUN_DIR``::

    config.json        the TrainConfig (written first; a resumed run must match it)
    checkpoint.pt      prompt, optimiser state and history after the last finished epoch
    prompt.safetensors the learned context ("ctx") with its config, class names and model
                       in the metadata: all that export and evaluation need
    metrics.json       every epoch's loss, time and train accuracy (clean and noisy labels),
                       zero-shot and final test accuracy, seed, versions

Every file is written to a temporary name and renamed into place, so an interrupted run leaves
the previous epoch's files whole.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass

import torch
from torch import Tensor

import fastprompt
from fastprompt import _backend
from fastprompt._io import atomic_write, write_json_atomic
from fastprompt.data.cache import FeatureCache, model_weights_hash
from fastprompt.train.config import TrainConfig
from fastprompt.train.loop import (Targets, accuracy, logit_scale, make_targets, train_epoch)

CHECKPOINT = "checkpoint.pt"
PROMPT = "prompt.safetensors"
METRICS = "metrics.json"
CONFIG = "config.json"
_FORMAT = "fastprompt-run-1"


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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _prompted_model(model, tokenizer, classnames, config: TrainConfig):
    from fastprompt.models import PromptedTextModel
    return PromptedTextModel(model, tokenizer, list(classnames), n_ctx=config.n_ctx,
                             ctx_init=config.ctx_init, class_specific=config.class_specific,
                             class_token_position=config.class_token_position)


def _save_checkpoint(path: str, ctx: Tensor, optimizer, epoch: int, history: list,
                     identity: dict) -> None:
    state = {"format": _FORMAT, "epoch": epoch, "ctx": ctx.detach().cpu(),
             "optimizer": optimizer.state_dict(), "history": history, "identity": identity}
    atomic_write(path, lambda f: torch.save(state, f))


def _load_checkpoint(path: str, identity: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"resume: checkpoint {path!r} is damaged or not a fastprompt "
                         f"checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"resume: {path!r} is not a fastprompt checkpoint")
    if state.get("identity") != identity:
        theirs = state.get("identity") or {}
        diff = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
        raise ValueError(f"resume: checkpoint {path!r} belongs to a different run "
                         f"(differs in {', '.join(diff)}); use a new --out folder")
    return state


def _write_prompt(path: str, ctx: Tensor, config: TrainConfig, classnames, identity: dict) -> None:
    from safetensors.torch import save
    metadata = {"format": _FORMAT, "config": json.dumps(config.to_dict()),
                "classnames": json.dumps(list(classnames)), "model_weights": identity["model_weights"],
                "fastprompt_version": fastprompt.__version__}
    data = save({"ctx": ctx.detach().float().cpu().contiguous()}, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def train_run(config: TrainConfig, cache: FeatureCache, model, tokenizer, out_dir, *,
              resume: bool = False, progress: bool | None = None,
              device: str | torch.device | None = None) -> dict:
    """Train ``config`` on ``cache`` into ``out_dir`` and return the metrics (also written to
    ``out_dir/metrics.json``).

    ``model`` is the frozen open_clip model the cache was built with. With ``resume=True`` an
    existing checkpoint in ``out_dir`` is continued (it must come from the same config, cache and
    model); without it, a folder that already holds a checkpoint is refused rather than
    overwritten.
    """
    from tqdm.auto import tqdm

    from fastprompt.models import count_parameters, zeroshot_text_features

    if config.method == "softcpt":  # SoftCPT hook: several tasks, its own run
        raise ValueError("config: method 'softcpt' trains several tasks: use "
                         "fastprompt.train.train_softcpt_run")
    out_dir = os.fspath(out_dir)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(cache.classnames) < 2:
        raise ValueError("cache: needs at least two classes to train a classifier")
    identity = {"config": config.to_dict(), "cache": cache.fingerprint,
                "model_weights": model_weights_hash(model)}
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    state = None
    if os.path.exists(ckpt_path):
        if not resume:
            raise ValueError(f"out: {out_dir!r} already holds a training run; pass --resume to "
                             "continue it or choose another folder")
        state = _load_checkpoint(ckpt_path, identity)
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, CONFIG), config.to_dict())

    model = model.to(device)
    torch.manual_seed(config.seed)  # the random context initialisation
    prompted = _prompted_model(model, tokenizer, cache.classnames, config).to(device)
    ctx = prompted.prompt_learner.ctx
    optimizer = torch.optim.SGD([ctx], lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    history: list = []
    if state is not None:
        with torch.no_grad():
            ctx.copy_(state["ctx"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])

    zeroshot = zeroshot_text_features(model, tokenizer, cache.classnames).to(device)
    targets = make_targets(config, cache, zeroshot) if config.targets in ("csl", "isl") else Targets()
    targets = Targets(*(t.to(device) if t is not None else None
                        for t in (targets.class_wise, targets.instance_wise)))
    scale = float(logit_scale(model))

    first = len(history)
    # One bar per run, counting images over all epochs (progress=False hides it).
    with tqdm(total=config.epochs * cache.num_train_images,
              initial=first * cache.num_train_images, desc=f"train {config.describe()}",
              unit="img", disable=(progress is False), dynamic_ncols=True) as bar:
        for epoch in range(first, config.epochs):
            start = time.perf_counter()
            result = train_epoch(prompted, model, cache, config, targets, optimizer, epoch,
                                 zeroshot if config.prograd else None, device, bar=bar)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            result["seconds"] = time.perf_counter() - start
            with torch.no_grad():
                text = prompted().float()
            # Train accuracy on the first augmented view of each image, clean and noisy labels.
            m = cache.num_train_images
            first_view = cache.train_features[:m]
            result["train_acc_noisy"] = accuracy(first_view, cache.train_labels[:m], text)
            result["train_acc_clean"] = accuracy(first_view, cache.train_clean_labels[:m], text)
            result["epoch"] = epoch + 1
            history.append(result)
            _save_checkpoint(ckpt_path, ctx, optimizer, epoch + 1, history, identity)
            bar.set_postfix(epoch=epoch + 1, loss=f"{result['loss']:.4f}",
                            acc=f"{result['train_acc_noisy']:.3f}")

    with torch.no_grad():
        text = prompted().float()
    _write_prompt(os.path.join(out_dir, PROMPT), ctx, config, cache.classnames, identity)
    train_seconds = [h["seconds"] for h in history]
    metrics = {
        "method": config.describe(),
        "config": config.to_dict(),
        "seed": config.seed,
        "epochs": history,
        "epoch_seconds_median": sorted(train_seconds)[len(train_seconds) // 2],
        "zeroshot_test_acc": accuracy(cache.test_features, cache.test_labels, zeroshot),
        "test_acc": accuracy(cache.test_features, cache.test_labels, text),
        "val_acc": accuracy(cache.val_features, cache.val_labels, text),
        "trainable_parameters": count_parameters(prompted),
        "logit_scale": scale,
        "num_classes": cache.num_classes,
        "num_train_images": cache.num_train_images,
        "views": cache.views,
        "cache": {"path": os.path.abspath(cache.path), "fingerprint": cache.fingerprint},
        "device": _device_name(device),
        "versions": versions(),
        "backend": _backend.resolve(device),
    }
    write_json_atomic(os.path.join(out_dir, METRICS), metrics)
    return metrics


@dataclass
class Run:
    """A finished run, loaded for evaluation or export (``fastprompt.export.export_run``)."""
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


def read_prompt(run_dir) -> tuple[Tensor, TrainConfig, list, dict]:
    """``(ctx, config, classnames, metadata)`` from ``run_dir/prompt.safetensors``."""
    from safetensors import safe_open
    path = os.path.join(os.fspath(run_dir), PROMPT)
    if not os.path.isfile(path):
        raise ValueError(f"run: {os.fspath(run_dir)!r} has no trained prompt ({PROMPT} missing; "
                         "did training finish?)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            ctx = f.get_tensor("ctx")
        if metadata.get("format") != _FORMAT:
            raise ValueError("not written by fastprompt")
        config = TrainConfig.from_dict(json.loads(metadata["config"]))
        classnames = json.loads(metadata["classnames"])
    except Exception as e:
        raise ValueError(f"run: {path!r} is damaged or not a fastprompt prompt file ({e})") from e
    return ctx, config, classnames, metadata


def load_run(run_dir, device: str | torch.device = "cpu", task: str | None = None) -> Run:
    """Rebuild a trained run: the open_clip model (from the config's model name and pretrained
    file), the learned prompt, and its C x E class text features. A SoftCPT run needs ``task``,
    the name of the task whose classifier to rebuild."""
    from fastprompt.models import create_model
    # --- SoftCPT hook (fastprompt/train/softcpt.py) ---
    from fastprompt.train.softcpt import is_softcpt_run, load_softcpt_run
    if task is not None or is_softcpt_run(run_dir):
        return load_softcpt_run(run_dir, task=task, device=device)
    # ---
    ctx, config, classnames, metadata = read_prompt(run_dir)
    model, _, preprocess_val, tokenizer = create_model(config.model, config.pretrained, device)
    if metadata.get("model_weights") != model_weights_hash(model):
        raise ValueError(f"run: the weights of model {config.model!r} "
                         f"(pretrained={config.pretrained!r}) differ from those the prompt in "
                         f"{os.fspath(run_dir)!r} was trained with")
    prompted = _prompted_model(model, tokenizer, classnames, config).to(device)
    if tuple(prompted.prompt_learner.ctx.shape) != tuple(ctx.shape):
        raise ValueError(f"run: prompt shape {tuple(ctx.shape)} does not match the config")
    with torch.no_grad():
        prompted.prompt_learner.ctx.copy_(ctx)
        text = prompted().float()
    method = {k: v for k, v in config.to_dict().items()
              if k in ("method", "targets", "smoothing", "alternate", "alternate_period",
                       "csl_temperature", "prograd", "lam", "temperature", "n_ctx", "ctx_init",
                       "class_specific", "class_token_position")}
    method["name"] = config.describe()
    return Run(os.fspath(run_dir), config, model, tokenizer, config.model, classnames, text,
               float(logit_scale(model)), method, preprocess_val)


def evaluate_run(run_dir, cache: FeatureCache, device: str | torch.device = "cpu") -> dict:
    """Test (and validation) accuracy of a trained run on a feature cache of the same classes."""
    run = load_run(run_dir, device)
    if list(cache.classnames) != list(run.class_names):
        raise ValueError(f"cache: its classes {cache.classnames[:5]}... differ from the run's "
                         f"{run.class_names[:5]}...")
    return {"test_acc": accuracy(cache.test_features, cache.test_labels, run.text_features),
            "val_acc": accuracy(cache.val_features, cache.val_labels, run.text_features),
            "num_test_images": int(cache.test_features.shape[0])}
