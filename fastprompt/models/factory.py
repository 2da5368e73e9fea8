"""Model loading through open_clip, with fastprompt's own configs registered.

``fastprompt-tiny`` is a small random-initialised CLIP (2 layers per tower, width <= 96) for the
demo and the tests; without a checkpoint file its weights are a fixed function of
``TINY_MODEL_SEED`` (the same in every process, so its runs can be rebuilt for export). Real use
names an open_clip model and a local checkpoint file. Nothing is
ever downloaded: pretrained tags, ``hf-hub:`` names and Hugging Face text towers or tokenizers
are refused.
"""
from __future__ import annotations

import contextlib
import logging
import os
import traceback
import warnings

import open_clip
import torch
from torch import nn

from fastprompt.models.weights import (WEIGHTS_HASH_ATTR, WEIGHTS_SOURCE_ATTR, model_weights_hash,
                                       remembered_weights_hash)

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
TINY_MODEL = "fastprompt-tiny"
TINY_MODEL_SEED = 0
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")
_registered = False


def register_configs() -> None:
    """Make fastprompt's model configs (``fastprompt-tiny``) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def check_model_name(name, what: str = "name") -> dict:
    """The open_clip config of ``name``, a model fastprompt can create offline: a built-in or
    registered name (``hf-hub:`` and ``local-dir:`` schemas would fetch configs) without a
    Hugging Face text tower or tokenizer. TypeError or ValueError naming ``what``."""
    if not isinstance(name, str):
        raise TypeError(f"{what}: expected a str, got {type(name).__name__}")
    register_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"{what}: unknown open_clip model {name!r} (see open_clip.list_models())")
    config = open_clip.get_model_config(name)
    text_cfg = config.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key):
            raise ValueError(f"{what}: {name!r} uses the Hugging Face {key[3:-5]} "
                             f"{text_cfg[key]!r}, which open_clip would download; fastprompt "
                             "works offline with open_clip's own text tower and tokenizer")
    return config


def check_device(name, what: str = "device") -> str:
    """``name`` (None: ``cuda`` when torch sees a GPU, else ``cpu``), checked: ``cpu``, or
    ``cuda``/``cuda:N`` of a GPU this machine has. ValueError naming ``what`` otherwise."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str):
        raise ValueError(f"{what}: expected a device name (cpu, cuda, cuda:N), got "
                         f"{type(name).__name__} {name!r:.40}")
    try:
        checked = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{what}: {name!r} is not a device (cpu, cuda, cuda:N)") from e
    if checked.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name!r} asked for, but torch sees no CUDA GPU")
        if checked.index is not None and checked.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {name!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif checked.type != "cpu":
        raise ValueError(f"{what}: {name!r} is not supported (cpu or cuda)")
    return name


def _warn_quickgelu(name: str, config: dict, pretrained: str) -> None:
    # open_clip infers QuickGELU from a pretrained tag, never from a file; OpenAI's weights were
    # trained with it, and loading them into a GELU model works silently but scores worse. The
    # file name is the only cheap hint.
    if not config.get("quick_gelu", False) and "openai" in os.path.basename(pretrained).lower():
        warnings.warn(f"pretrained: {pretrained!r} looks like OpenAI weights, which were trained "
                      f"with QuickGELU, but {name!r} uses GELU; use {name + '-quickgelu'!r} if "
                      "open_clip has it", stacklevel=3)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class SkippedImageTower(nn.Module):
    """Stands in for ``model.visual`` in a model created with ``image_tower=False``: holds no
    weights and refuses to encode images."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this model was created without its image tower "
                           "(create_model(..., image_tower=False)), for work on cached image "
                           "features only; create it with image_tower=True to encode images")


_INIT_FUNCTIONS = tuple(n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_"))


@contextlib.contextmanager
def _without_random_init():
    """Make ``torch.nn.init``'s in-place initialisers no-ops while a model whose every weight is
    about to be loaded from a file is built: drawing a ViT-B's random weights costs seconds and
    the draws are overwritten (the strict load refuses a file that misses any of them)."""
    saved = {n: getattr(nn.init, n) for n in _INIT_FUNCTIONS}
    try:
        for n in _INIT_FUNCTIONS:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu", *,
                 precision: str = "fp32", weights_only: bool = True, image_tower: bool = True):
    """``(model, preprocess_train, preprocess_val, tokenizer)`` for an open_clip model.

    The model is in eval mode with every parameter frozen (``requires_grad=False``).

    Args:
        name: an open_clip model name (``open_clip.list_models()``) or ``fastprompt-tiny``.
        pretrained: a local checkpoint file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``) holding
            a state dict of exactly this model, loaded strictly; None for random weights
            (``fastprompt-tiny``: drawn from ``TINY_MODEL_SEED``, the caller's random state
            untouched; other models: from the global random state).
            Nothing is downloaded. A missing, damaged or mismatched file raises ValueError naming
            it. For OpenAI's weights use a ``-quickgelu`` name: a file does not tell open_clip
            (a warning fires when the file name says "openai" and the model uses GELU).
        device: where the model goes.
        precision: open_clip's precision (``fp32``, ``fp16``, ``bf16``, ``pure_fp16``, ``pure_bf16``).
        weights_only: passed to ``torch.load``; OpenAI's own TorchScript ``.pt`` archives need
            False, which runs code from the file: only for a file you trust.
        image_tower: False for work on cached image features only (training from a cache,
            evaluating on caches): ``model.visual`` is then a ``SkippedImageTower`` and the image
            tower's weights are never held; ``model_weights_hash(model)`` still gives the full
            model's hash (remembered from an earlier load of the same file, or computed once
            here).
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS}, got {precision!r}")
    config = check_model_name(name)
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained: expected a file path or None, got {type(pretrained).__name__}")
        pretrained = os.fspath(pretrained)
        if not os.path.isfile(pretrained):
            raise ValueError(f"pretrained: {pretrained!r} is not a file (fastprompt loads local "
                             "checkpoints only; nothing is downloaded)")
        _warn_quickgelu(name, config, pretrained)
    # The file is loaded below, not by open_clip, so that its errors can name it: silence
    # open_clip's "initialized randomly" warning, which would then be false.
    quiet = _DropMessage("initialized randomly") if pretrained is not None else None
    root = logging.getLogger()
    if quiet is not None:
        root.addFilter(quiet)
    seeded = pretrained is None and name == TINY_MODEL
    try:
        # fork_rng: the caller's random state is untouched (open_clip draws a few small weights
        # with torch.randn directly, with or without a file).
        with torch.random.fork_rng(devices=[], enabled=seeded or pretrained is not None), (
                _without_random_init() if pretrained is not None else contextlib.nullcontext()):
            if seeded:
                torch.manual_seed(TINY_MODEL_SEED)
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=None, precision=precision, device=device)
    finally:
        if quiet is not None:
            root.removeFilter(quiet)
    if pretrained is not None:
        # Lets model_weights_hash remember this file's hash by its size and mtime.
        stat = os.stat(pretrained)
        setattr(model, WEIGHTS_SOURCE_ATTR, [name, precision, os.path.realpath(pretrained),
                                             stat.st_size, stat.st_mtime_ns])
    if not image_tower:
        # The hash covers the image tower: known from an earlier load of this file, or computed
        # (once; then remembered) from the full model before the tower is dropped.
        digest = remembered_weights_hash(model)
        if digest is not None:
            model.visual = SkippedImageTower()
        if pretrained is not None:
            _load_checkpoint(model, pretrained, weights_only=weights_only)
        if digest is None:
            digest = model_weights_hash(model)
            model.visual = SkippedImageTower()
        setattr(model, WEIGHTS_HASH_ATTR, digest)
    elif pretrained is not None:
        _load_checkpoint(model, pretrained, weights_only=weights_only)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(name)


def _load_checkpoint(model: nn.Module, path: str, *, weights_only: bool = True) -> None:
    """Load a local open_clip state-dict file into ``model`` strictly (a ``SkippedImageTower``
    takes the file's image-tower weights and drops them); ValueError naming the file when it is
    missing, damaged or belongs to another model."""
    if not os.path.isfile(path):
        raise ValueError(f"pretrained: {path!r} is not a file")
    skipped = isinstance(getattr(model, "visual", None), SkippedImageTower)
    try:
        keys = open_clip.load_checkpoint(model, path, strict=not skipped,
                                         weights_only=weights_only)
        if skipped and (keys.missing_keys or not keys.unexpected_keys or any(
                not k.startswith("visual.") for k in keys.unexpected_keys)):
            unexpected = [k for k in keys.unexpected_keys if not k.startswith("visual.")]
            raise RuntimeError(f"Error(s) in loading state_dict:\nmissing keys "
                               f"{keys.missing_keys[:10]}, unexpected keys {unexpected[:10]}"
                               + ("" if keys.unexpected_keys else ", no image tower"))
    except Exception as e:
        message = str(e)
        if _raised_while_reading(e):  # safetensors, pickle, zip or torch.load errors
            hint = ""
            if weights_only and "weights_only" in message:
                hint = (" (a TorchScript archive such as OpenAI's own .pt needs weights_only=False, "
                        "for a file you trust)")
            raise ValueError(f"pretrained: cannot read {path!r} as a state dict{hint} "
                             f"({type(e).__name__}: {message[:300]})") from e
        # load_state_dict's strict report, or open_clip's assertions while adapting the weights.
        detail = message.split("\n", 1)[-1].strip() if "\n" in message else message
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        raise ValueError(f"pretrained: {path!r} is not a checkpoint of this model "
                         f"({type(e).__name__}: {detail})") from e


def _raised_while_reading(error: BaseException) -> bool:
    """Whether ``error`` came from open_clip's file reader rather than from fitting the weights."""
    return any(frame.name == "load_state_dict" and frame.filename.endswith("factory.py")
               and "open_clip" in frame.filename
               for frame in traceback.extract_tb(error.__traceback__))
