"""The files of a run folder, for every learner, and their format versions.

Layout of ``RUN_DIR``::

    config.json        the TrainConfig with its ``format_version`` (written first; a resumed run
                       must match it)
    checkpoint.pt      the trained tensors, optimiser state and history after the last finished
                       epoch, the run's identity (config, data fingerprints, model weights) and a
                       checksum of all of it
    prompt.safetensors the trained tensors under the official code's names, with the learner,
                       the config, the class names (SoftCPT: the tasks and their class names),
                       the model's weight hash, the format version and a checksum in the
                       metadata: all that export and evaluation need
    metrics.json       every epoch's loss, time and train accuracy, zero-shot and final test
                       accuracy, seed, versions (strict JSON: ``null`` where there is no value)
    .lock              held while a process trains into the folder; names its pid

Every file is written to a temporary name and renamed into place, so an interrupted run leaves
the previous epoch's files whole.

A run imported from an official (Dassl) checkpoint (``fastprompt.train.dassl``) has the same
files but no ``checkpoint.pt``; its metrics.json records ``imported_from`` and no epochs, and
training into its folder is refused.

Format versions. Version 2 (fastprompt 0.2) names the learner in the checkpoint and prompt file
(``learner``) and writes ``format_version`` into all three files. Version 1 (fastprompt 0.1) told
the learner by the file's format name (``fastprompt-run-1``: a CoOp-style prompt,
``fastprompt-softcpt-1``: SoftCPT) and its configs may still use 0.1.0's ``method`` /
``softcpt_loss`` fields; such runs load, evaluate, export and resume as they are.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

import fastprompt
from fastprompt._hashing import state_checksum, tensor_checksum
from fastprompt._io import atomic_write, exclusive_lock, read_json, write_json_atomic
from fastprompt.data.cache import RECORD_ONLY_KEYS
from fastprompt.train.config import LEARNERS, TrainConfig

CHECKPOINT = "checkpoint.pt"
PROMPT = "prompt.safetensors"
METRICS = "metrics.json"
CONFIG = "config.json"
LOCK = ".lock"
RUN_FILES = (CONFIG, CHECKPOINT, PROMPT, METRICS, LOCK)

FORMAT_VERSION = 2
CHECKPOINT_FORMAT = "fastprompt.checkpoint"
PROMPT_FORMAT = "fastprompt.prompt"
# Version 1's format names, and the learner each one meant.
V1_FORMATS = {"fastprompt-run-1": "coop", "fastprompt-softcpt-1": "softcpt"}


class RunMismatchError(ValueError):
    """The checkpoint in a run folder belongs to another run (other config, data or model)."""


def run_lock(run_dir: str):
    """The run folder's exclusive lock (``LockedError`` naming the holder's pid when taken)."""
    return exclusive_lock(os.path.join(run_dir, LOCK), f"run folder {run_dir!r}")


def _format_of(fmt, version, learner) -> tuple[int, str] | None:
    """``(format version, learner)`` of a file's header fields, or None when they are not
    fastprompt's."""
    if fmt in V1_FORMATS:
        return 1, V1_FORMATS[fmt]
    if fmt in (CHECKPOINT_FORMAT, PROMPT_FORMAT) and learner in LEARNERS:
        try:
            version = int(version)
        except (TypeError, ValueError):
            return None
        return version, learner
    return None


def _check_version(version: int, path: str) -> None:
    if version > FORMAT_VERSION:
        raise ValueError(f"run: {path!r} was written by a newer fastprompt (run format "
                         f"{version}; this is {fastprompt.__version__}, format {FORMAT_VERSION}); "
                         "upgrade fastprompt")


# ---------------------------------------------------------------------------------------------
# config.json


def write_config(run_dir: str, config: TrainConfig) -> None:
    write_json_atomic(os.path.join(run_dir, CONFIG),
                      {"format_version": FORMAT_VERSION, **config.to_dict()})


# ---------------------------------------------------------------------------------------------
# Checkpoint


def _without_record_only(obj):
    """``obj`` without the cache fingerprints' record-only entries (``same_fingerprint``), at
    any depth: the version that built a cache does not make another run."""
    if isinstance(obj, dict):
        return {k: _without_record_only(v) for k, v in obj.items() if k not in RECORD_ONLY_KEYS}
    if isinstance(obj, list):
        return [_without_record_only(v) for v in obj]
    return obj


def _comparable(identity: dict, version: int) -> dict:
    """``identity`` as runs are compared: its config in today's fields (a version 1 checkpoint
    may store the config as 0.1.0 wrote it), its caches' fingerprints without their
    record-only entries."""
    if isinstance(identity, dict) and isinstance(identity.get("config"), dict):
        try:
            config = TrainConfig.from_dict(identity["config"], format_version=version).to_dict()
        except (ValueError, TypeError):
            config = identity["config"]
        identity = {**identity, "config": config}
    return _without_record_only(identity)


def save_checkpoint(path: str, learner: str, tensors: dict[str, Tensor], optimizer, epoch: int,
                    history: list, identity: dict) -> None:
    state = {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "learner": learner,
             "epoch": epoch, "params": {k: v.detach().cpu() for k, v in tensors.items()},
             "optimizer": optimizer.state_dict(), "history": history, "identity": identity}
    state["checksum"] = state_checksum(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read_checkpoint(path: str, learner: str) -> dict:
    """The checkpoint at ``path``, checked: readable, of ``learner``, checksum intact; its
    ``format_version`` set (1 for fastprompt 0.1 checkpoints)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"resume: checkpoint {path!r} is damaged or not a fastprompt "
                         f"checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    found = (_format_of(state.get("format"), state.get("format_version"), state.get("learner"))
             if isinstance(state, dict) else None)
    if found is None:
        raise ValueError(f"resume: {path!r} is not a fastprompt checkpoint")
    version, theirs = found
    _check_version(version, path)
    if theirs != learner:
        raise ValueError(f"resume: checkpoint {path!r} is a {theirs!r} run, not {learner!r}; use "
                         "a new --out folder")
    if "params" not in state and "ctx" in state:  # CoOp checkpoints of 0.1.0
        state["params"] = {"ctx": state.pop("ctx")}
    if "checksum" in state and state["checksum"] != state_checksum(state):
        raise ValueError(f"resume: checkpoint {path!r} is damaged (checksum mismatch); delete "
                         "it to train from scratch, or restore it from a copy")
    state["format_version"] = version
    return state


def load_checkpoint(path: str, learner: str, identity: dict) -> dict:
    """``read_checkpoint``, refusing (``RunMismatchError``) one from another run."""
    state = read_checkpoint(path, learner)
    ours = _comparable(identity, FORMAT_VERSION)
    theirs = _comparable(state.get("identity") or {}, state["format_version"])
    if ours != theirs:
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        raise RunMismatchError(f"resume: checkpoint {path!r} belongs to a different run "
                               f"(differs in {', '.join(diff)}); use a new --out folder")
    return state


def refuse_existing_run(run_dir: str, resume: bool, learner: str) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume; without ``resume`` one is refused, and
    one of another learner or damaged is refused either way (before anything is written)."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        if os.path.isfile(os.path.join(run_dir, PROMPT)) and os.path.isfile(
                os.path.join(run_dir, METRICS)) and "imported_from" in read_metrics(run_dir):
            raise ValueError(f"out: {run_dir!r} holds a run imported from a Dassl checkpoint "
                             "(import-dassl); train into another folder")
        return False
    if not resume:
        raise ValueError(f"out: {run_dir!r} already holds a training run; pass --resume to "
                         "continue it or choose another folder")
    read_checkpoint(path, learner)
    return True


# ---------------------------------------------------------------------------------------------
# Prompt file


def _prompt_checksum(tensors: dict[str, Tensor], metadata: dict) -> str:
    rest = json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True)
    return tensor_checksum(tensors, rest)


def write_prompt(path: str, learner: str, tensors: dict[str, Tensor], config: TrainConfig,
                 model_weights: str, **fields) -> None:
    """Write the trained tensors with the format, ``learner``, ``config``, ``model_weights``
    and ``fields`` (each JSON-encoded) and a checksum of all of it in the metadata."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": PROMPT_FORMAT, "format_version": str(FORMAT_VERSION),
                "learner": learner, "config": json.dumps(config.to_dict()),
                "model_weights": model_weights, "fastprompt_version": fastprompt.__version__,
                **{k: json.dumps(v) for k, v in fields.items()}}
    metadata["checksum"] = _prompt_checksum(tensors, metadata)
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


@dataclass
class PromptFile:
    """A run's ``prompt.safetensors``, read and checked."""
    path: str
    learner: str
    format_version: int
    tensors: dict
    config: TrainConfig
    metadata: dict

    def field(self, name: str):
        return json.loads(self.metadata[name])


def read_prompt_file(run_dir) -> PromptFile:
    path = os.path.join(os.fspath(run_dir), PROMPT)
    if not os.path.isfile(path):
        raise ValueError(f"run: {os.fspath(run_dir)!r} has no trained prompt ({PROMPT} missing; "
                         "did training finish?)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        found = _format_of(metadata.get("format"), metadata.get("format_version"),
                           metadata.get("learner"))
        if found is None:
            raise ValueError("not written by fastprompt")
        version, learner = found
        _check_version(version, path)
        config = TrainConfig.from_dict(json.loads(metadata["config"]), format_version=version)
    except ValueError as e:
        if str(e).startswith("run: "):  # a newer format: said as it is
            raise
        raise ValueError(f"run: {path!r} is damaged or not a fastprompt prompt file "
                         f"({str(e)[:200]})") from e
    except Exception as e:
        raise ValueError(f"run: {path!r} is damaged or not a fastprompt prompt file "
                         f"({str(e)[:200]})") from e
    if "checksum" in metadata and metadata["checksum"] != _prompt_checksum(tensors, metadata):
        raise ValueError(f"run: {path!r} is damaged (checksum mismatch); retrain, or restore "
                         "it from a copy")
    return PromptFile(path, learner, version, tensors, config, metadata)


# ---------------------------------------------------------------------------------------------
# metrics.json


def write_metrics(run_dir: str, metrics: dict) -> None:
    write_json_atomic(os.path.join(run_dir, METRICS), metrics)


def read_metrics(run_dir, what: str = "run", *, missing: str = "did training finish?") -> dict:
    """The metrics.json of a run folder as a dict; ValueError naming ``what`` and the file when
    it is missing (``missing`` says what to do), unreadable or not a JSON object."""
    path = os.path.join(os.fspath(run_dir), METRICS)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {os.fspath(run_dir)!r} has no {METRICS} ({missing})")
    metrics = read_json(path, what)
    if not isinstance(metrics, dict):
        raise ValueError(f"{what}: {path!r} is not a metrics file (expected a JSON object)")
    return metrics
