"""The one training loop, for every learner: ``fit(learner, out_dir)``.

It holds the run folder's lock, resumes a checkpoint (only of the same run), trains epoch by
epoch through ``learner.train_epoch``, checkpoints after every epoch, stops with
``NonFiniteTrainingError`` when the loss or the trained tensors turn non-finite (the last good
checkpoint stays), then writes the prompt file and metrics.json (files: ``fastprompt.train.files``).

Under several ranks (``torchrun``) every rank runs it: the ranks first check they hold the same
run; rank 0 alone takes the lock, reads the checkpoint, writes files and shows progress, and
sends the others the state to resume from; every rank trains and computes the metrics.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import time

import open_clip
import torch

import fastprompt
from fastprompt import _backend
from fastprompt._hashing import tensor_checksum
from fastprompt._io import progress_bar
from fastprompt.train import distributed
from fastprompt.train.epoch import logit_scale
from fastprompt.train.files import (CHECKPOINT, PROMPT, load_checkpoint, refuse_existing_run,
                                    run_lock, save_checkpoint, write_config, write_metrics,
                                    write_prompt)
from fastprompt.train.learner import Learner


class NonFiniteTrainingError(ValueError):
    """The loss or the trained tensors became NaN or infinite; the last good epoch is kept."""


def versions() -> dict:
    out = {"fastprompt": fastprompt.__version__, "torch": torch.__version__,
           "open_clip": open_clip.__version__, "python": platform.python_version()}
    try:  # triton is not installed everywhere (macOS, Windows, some CPU-only setups)
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _check_finite(learner: Learner, result: dict, epoch: int, run_dir: str) -> None:
    bad = [k for k in ("loss", "kl_loss") if k in result and not math.isfinite(result[k])]
    bad += [k for k, v in learner.trainable().items() if not bool(torch.isfinite(v).all())]
    if bad:
        kept = (f"{CHECKPOINT} keeps epoch {epoch}" if epoch else "nothing was saved")
        raise NonFiniteTrainingError(
            f"training: {', '.join(bad)} became NaN or infinite in epoch {epoch + 1} of the run "
            f"in {run_dir!r}; {kept}. Lower --lr, or check the data and the features")


def _prepare(run_dir: str, learner: Learner, identity: dict, resume: bool,
             stack: contextlib.ExitStack) -> dict | None:
    """Create and lock ``run_dir`` (the lock held by ``stack``), read the checkpoint to resume
    (only with ``resume``, only of the same identity) and write the config; returns the
    checkpoint's state or None."""
    os.makedirs(run_dir, exist_ok=True)
    stack.enter_context(run_lock(run_dir))
    state = None
    if refuse_existing_run(run_dir, resume, learner.name):
        state = load_checkpoint(os.path.join(run_dir, CHECKPOINT), learner.name, identity)
    write_config(run_dir, learner.config)
    return state


def run_metrics(learner: Learner, history: list) -> dict:
    """The metrics every run reports besides its accuracies."""
    config, device = learner.config, learner.device
    seconds = sorted(h["seconds"] for h in history)
    return {"method": config.describe(), "config": config.to_dict(), "seed": config.seed,
            "epochs": history, "epoch_seconds_median": seconds[len(seconds) // 2],
            "device": device_name(device), "ranks": distributed.world_size(),
            "versions": versions(), "backend": _backend.resolve(device)}


def fit(learner: Learner, out_dir, *, resume: bool = False, progress: bool | None = None,
        text_chunk_auto: bool = False, data: dict | None = None, desc: str | None = None) -> dict:
    """Train ``learner`` for ``learner.config.epochs`` epochs into the run folder ``out_dir``
    and return the metrics (also written to ``out_dir/metrics.json``).

    ``resume``: continue the checkpoint in ``out_dir`` (it must be of the same identity);
    without it a folder holding a checkpoint is refused (callers check this with
    ``files.refuse_existing_run`` before they build the learner, so that bad input costs
    nothing). ``text_chunk_auto``: the learner's K was chosen automatically (recorded).
    ``data``: where the cache's images came from, recorded as given. ``desc``: the progress
    bar's label."""
    out_dir = os.fspath(out_dir)
    config, device = learner.config, learner.device
    identity = learner.identity()
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    writer = distributed.is_writer()
    if distributed.world_size() > 1:
        # The identity's model_weights hashes the image tower only; each rank also encodes
        # classes with its own text tower, so the whole model must agree.
        distributed.check_same_on_all_ranks(
            "model weights, data and config",
            {**identity, "model_state": tensor_checksum(learner.model.state_dict())})
    with contextlib.ExitStack() as stack:
        state = distributed.from_rank_zero(
            lambda: _prepare(out_dir, learner, identity, resume, stack))
        history: list = []
        if state is not None:
            learner.load_trainable(state["params"])
            learner.optimizer.load_state_dict(state["optimizer"])
            learner.load_training_state(state.get("state") or {})
            history = list(state["history"])
        images = learner.images_per_epoch
        first = len(history)
        # One bar per run, counting images over all epochs (progress=False hides it).
        with progress_bar(config.epochs * images, desc or f"train {config.describe()}",
                          progress if writer else False, initial=first * images) as bar:
            for epoch in range(first, config.epochs):
                start = time.perf_counter()
                result = learner.train_epoch(epoch=epoch, bar=bar)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result["seconds"] = time.perf_counter() - start
                _check_finite(learner, result, epoch, out_dir)
                result.update(learner.train_accuracy())
                result["epoch"] = epoch + 1
                history.append(result)
                if writer:
                    save_checkpoint(ckpt_path, learner.name, learner.trainable(),
                                    learner.optimizer, epoch + 1, history, identity,
                                    learner.training_state())
                bar.set_postfix(epoch=epoch + 1, loss=f"{result['loss']:.4f}",
                                acc=f"{result['train_acc_noisy']:.3f}")
        if writer:
            write_prompt(os.path.join(out_dir, PROMPT), learner.name, learner.trainable(),
                         config, identity["model_weights"], **learner.prompt_fields())
        metrics = {**run_metrics(learner, history), **learner.final_metrics(),
                   "logit_scale": float(logit_scale(learner.model)),
                   "text_chunk": learner.text_chunk, "text_chunk_auto": text_chunk_auto,
                   **({"data": data} if data is not None else {})}
        if writer:
            write_metrics(out_dir, metrics)
    return metrics
