"""Official checkpoints in and out: the prompt-learner files that the papers' own code (CoOp,
CoCoOp, ProGrad, KgCoOp, TCP: all built on Dassl) writes and loads, read into ordinary run
folders (``import_dassl``) and written from them (``export_dassl``).

The file. Dassl's ``save_model`` writes ``OUTPUT/prompt_learner/model.pth.tar-N`` (and, for the
best validation epoch, ``model-best.pth.tar``) with ``torch.save`` of ``{"state_dict", "epoch",
"optimizer", "scheduler", "val_result"}``. ``state_dict`` is the prompt learner's: the trained
tensors under the official names (``ctx``: n_ctx x W, or C x n_ctx x W class-specific; TCP and
CoCoOp also ``meta_net.linear{1,2}.{weight,bias}``), in CLIP's dtype (float16 under the default
``PREC fp16``, float32 under ``fp32``/``amp``), plus two buffers the official ``load_model``
deletes before loading, ``token_prefix`` (the start token's embedding, C x 1 x W) and
``token_suffix`` (the embeddings of positions 1 + n_ctx onward of ``"X X .. X <name>."``
tokenised to 77 positions: the class name, the period, the end token, padding). KgCoOp's prompt
learner also holds ``bias_vectors`` and ``meta_net.linear1.*``, which its forward never uses.
``epoch`` is the epochs trained; ``optimizer`` and ``scheduler`` are the state of Dassl's
optimiser and scheduler objects, which are read here only as inert stand-ins
(``fastprompt.train.safe_unpickle``: nothing named in the file is imported or run).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field

import open_clip
import torch
from open_clip.transformer import QuickGELU
from torch import Tensor

from fastprompt._io import atomic_write
from fastprompt.models import PromptTextEncoder, create_model
from fastprompt.models.weights import model_weights_hash
from fastprompt.train.config import LEARNERS, TrainConfig
from fastprompt.train.epoch import logit_scale
from fastprompt.train.files import (PROMPT, RUN_FILES, read_prompt_file, write_config,
                                    write_metrics, write_prompt)
from fastprompt.train.fit import versions
from fastprompt.train.learner import learner_class
from fastprompt.train.runs import load_runs
from fastprompt.train.safe_unpickle import read_torch_file
from fastprompt.train.transfer import check_classnames

PROMPT_LEARNER = "prompt_learner"
BEST = "model-best.pth.tar"
_NUMBERED = re.compile(r"model\.pth\.tar-(\d+)")
# The buffers Dassl's prompt learners save and their load_model deletes.
PROMPT_BUFFERS = ("token_prefix", "token_suffix")
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}
# open_clip names of OpenAI's CLIP backbones -> the official code's MODEL.BACKBONE.NAME.
BACKBONES = {"RN50": "RN50", "RN101": "RN101", "RN50x4": "RN50x4", "RN50x16": "RN50x16",
             "RN50x64": "RN50x64", "ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16",
             "ViT-L-14": "ViT-L/14", "ViT-L-14-336": "ViT-L/14@336px"}


@dataclass(frozen=True)
class OfficialLearner:
    """An official prompt learner: its ``--learner`` name, the fastprompt learner that runs it,
    the official trainer (``TRAINER.NAME``) and config section, the meta network it trains
    (``"tcp"``, ``"cocoop"`` or None), tensors its prompt learner holds but never uses, and
    whether it can express class-specific contexts and class token positions other than
    ``end``."""
    name: str
    learner: str
    trainer: str
    section: str = "COOP"
    prograd: bool = False
    meta_net: str | None = None
    unused: tuple[str, ...] = ()
    class_specific: bool = True
    positions: bool = True


OFFICIAL = {o.name: o for o in (
    OfficialLearner("coop", "coop", "CoOp"),
    OfficialLearner("prograd", "coop", "ProGrad", prograd=True),
    OfficialLearner("kgcoop", "kgcoop", "KgCoOp", positions=False,
                    unused=("bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias")),
    OfficialLearner("tcp", "tcp", "TCP", meta_net="tcp", class_specific=False, positions=False),
    OfficialLearner("cocoop", "cocoop", "CoCoOp", section="COCOOP", meta_net="cocoop",
                    class_specific=False, positions=False),
)}


def official_learners() -> dict[str, OfficialLearner]:
    """The official learners whose fastprompt learner is registered, by ``--learner`` name."""
    return {k: o for k, o in OFFICIAL.items() if o.learner in LEARNERS}


def _official(name: str) -> OfficialLearner:
    known = official_learners()
    if name not in known:
        raise ValueError(f"learner: {name!r} is not an official learner this fastprompt reads; "
                         f"known: {sorted(known)}")
    return known[name]


def meta_net_shapes(kind: str | None, embed_dim: int, width: int, n_ctx: int) -> dict:
    """The official meta network's tensor shapes: TCP's ``E -> E // 4 -> n_ctx · W`` (class-aware
    tokens), CoCoOp's ``E -> E // 16 -> W`` (the per-image shift); {} for none."""
    if kind is None:
        return {}
    hidden, out = ((embed_dim // 4, n_ctx * width) if kind == "tcp"
                   else (max(1, embed_dim // 16), width))
    return {"meta_net.linear1.weight": (hidden, embed_dim), "meta_net.linear1.bias": (hidden,),
            "meta_net.linear2.weight": (out, hidden), "meta_net.linear2.bias": (out,)}


# ---------------------------------------------------------------------------------------------
# Reading


def find_checkpoint(path) -> str:
    """The checkpoint file ``path`` names: the file itself, or in an output folder (or its
    ``prompt_learner/``) the ``model.pth.tar-N`` of the largest N, else ``model-best.pth.tar``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint: {path!r} is neither a file nor a folder")
    folder = os.path.join(path, PROMPT_LEARNER)
    folder = folder if os.path.isdir(folder) else path
    numbered = [(int(m.group(1)), name) for name in os.listdir(folder)
                if (m := _NUMBERED.fullmatch(name)) and os.path.isfile(os.path.join(folder, name))]
    if numbered:
        return os.path.join(folder, max(numbered)[1])
    if os.path.isfile(os.path.join(folder, BEST)):
        return os.path.join(folder, BEST)
    raise ValueError(f"checkpoint: {folder!r} holds no Dassl checkpoint (model.pth.tar-N or "
                     f"{BEST})")


@dataclass
class DasslCheckpoint:
    """A Dassl checkpoint, read: the state dict's tensors (by name, as saved), the epoch, the
    validation result where it is a number, and the names of entries that are not tensors."""
    path: str
    tensors: dict
    epoch: int
    val_result: float | None = None
    other: list = field(default_factory=list)


def read_dassl_checkpoint(path) -> DasslCheckpoint:
    """The Dassl checkpoint at ``path`` (``find_checkpoint``), read without running anything
    from it; ValueError naming the file when it is damaged or not a Dassl checkpoint."""
    path = find_checkpoint(path)
    state = read_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ValueError(f"checkpoint: {path!r} is not a Dassl checkpoint (no 'state_dict')")
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"checkpoint: {path!r} is not a Dassl checkpoint (its 'epoch' is "
                         f"{epoch!r}, not a count of epochs)")
    tensors, other = {}, []
    for key, value in state["state_dict"].items():
        key = key[len("module."):] if isinstance(key, str) and key.startswith("module.") else key
        if isinstance(value, Tensor):
            tensors[str(key)] = value
        else:
            other.append(str(key))
    val = state.get("val_result")
    val = float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else None
    return DasslCheckpoint(path, tensors, epoch, val, other)


def _embed_dim(encoder: PromptTextEncoder) -> int:
    proj = encoder.text_projection
    return int(proj.shape[1] if isinstance(proj, Tensor) else proj.out_features)


def _checked_tensors(ckpt: DasslCheckpoint, official: OfficialLearner,
                     encoder: PromptTextEncoder, classnames: list) -> tuple[dict, list]:
    """``(trained tensors in float32, ignored names)`` of ``ckpt`` for ``official``, each
    checked against the model (text width W, embedding size E) and the class names."""
    where, state = f"checkpoint: {ckpt.path!r}", ckpt.tensors
    ctx = state.get("ctx")
    if ctx is None:
        held = sorted(state)[:8]
        raise ValueError(f"{where} is not a prompt learner's state (no 'ctx' tensor; it holds "
                         f"{held or 'no tensors'}{' ...' if len(state) > 8 else ''})")
    width, n_cls = encoder.width, len(classnames)
    if not ctx.is_floating_point() or ctx.dim() not in (2, 3) or ctx.shape[-2] < 1:
        raise ValueError(f"{where}: 'ctx' has shape {tuple(ctx.shape)} ({ctx.dtype}); a context "
                         "is n_ctx x W, or C x n_ctx x W class-specific, of floats")
    if ctx.shape[-1] != width:
        raise ValueError(f"{where}: 'ctx' has width {ctx.shape[-1]}, but the model's text width is "
                         f"{width}: it was trained with another CLIP backbone (--model)")
    if ctx.dim() == 3:
        if not official.class_specific:
            raise ValueError(f"{where}: 'ctx' is class-specific {tuple(ctx.shape)}, which the "
                             f"official {official.trainer} cannot train")
        if ctx.shape[0] != n_cls:
            raise ValueError(f"{where}: 'ctx' holds class-specific contexts for {ctx.shape[0]} "
                             f"classes, but --classnames names {n_cls}")
    n_ctx = int(ctx.shape[-2])
    expected = {"ctx": tuple(ctx.shape),
                **meta_net_shapes(official.meta_net, _embed_dim(encoder), width, n_ctx)}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{where} lacks {missing}: not a {official.trainer} prompt learner")
    ignored = [k for k in state if k in PROMPT_BUFFERS or k in official.unused]
    unexpected = sorted(set(state) - set(expected) - set(ignored))
    if unexpected:
        raise ValueError(f"{where} also holds {unexpected[:6]}, which a {official.trainer} "
                         "prompt learner does not: pass the --learner it was trained with")
    tensors = {}
    for key, shape in expected.items():
        value = state[key]
        if tuple(value.shape) != shape or not value.is_floating_point():
            raise ValueError(f"{where}: {key!r} has shape {tuple(value.shape)} ({value.dtype}), "
                             f"expected {shape} of floats for this model and n_ctx {n_ctx}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {key!r} holds NaN or infinite values")
        tensors[key] = value.float()
    return tensors, sorted(ignored)


# ---------------------------------------------------------------------------------------------
# The official prompt layout


def official_prompt_buffers(model, tokenizer, classnames, n_ctx: int) -> tuple[Tensor, Tensor]:
    """``(token_prefix, token_suffix)`` as the official prompt learner builds them, float32:
    the token embeddings of ``"X X .. X <name>."`` (n_ctx placeholders) over the full context
    length; the prefix is position 0 (C x 1 x W), the suffix positions 1 + n_ctx onward."""
    encoder = PromptTextEncoder(model)
    texts = [" ".join(["X"] * n_ctx + [name]) + "." for name in classnames]
    tokens = tokenizer(texts, context_length=encoder.context_length)
    with torch.no_grad():
        embeds = encoder.token_embedding(tokens.to(encoder.token_embedding.weight.device))
    embeds = embeds.float().cpu()
    return embeds[:, :1].contiguous(), embeds[:, 1 + n_ctx:].contiguous()


def check_official_layout(model, tokenizer, model_name: str) -> list[str]:
    """Refuse (ValueError) a model whose text side the official code cannot hold: anything but
    an open_clip ``CLIP`` with CLIP's tokenizer, 77 positions, its vocabulary, a causal mask and
    pooling at the end token. Returns notes on what else differs from OpenAI's CLIP."""
    encoder = PromptTextEncoder(model)
    problems = []
    if not isinstance(model, open_clip.CLIP):
        problems.append(f"a {type(model).__name__}, not CLIP")
    if encoder.context_length != CONTEXT_LENGTH:
        problems.append(f"{encoder.context_length} text positions, not {CONTEXT_LENGTH}")
    if encoder.token_embedding.num_embeddings != VOCAB_SIZE:
        problems.append(f"a vocabulary of {encoder.token_embedding.num_embeddings}, not "
                        f"{VOCAB_SIZE}")
    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer):
        problems.append(f"the tokenizer {type(tokenizer).__name__}, not CLIP's")
    if encoder.pool_type != "argmax" or not encoder.causal:
        problems.append("a text tower not pooled at the end token under a causal mask")
    if not isinstance(encoder.text_projection, Tensor):
        problems.append("a text projection that is not a matrix")
    if problems:
        raise ValueError(f"--dassl: the official code builds OpenAI's CLIP, and model "
                         f"{model_name!r} has {'; '.join(problems)}")
    notes = []
    backbone = BACKBONES.get(model_name.removesuffix("-quickgelu"))
    if backbone is None:
        notes.append(f"{model_name} is not one of OpenAI's CLIP backbones, which the official "
                     f"code builds ({', '.join(BACKBONES.values())}); the file fits a prompt "
                     f"learner of text width {encoder.width}")
    if not any(isinstance(m, QuickGELU) for m in encoder.transformer.modules()):
        notes.append(f"{model_name} uses GELU where OpenAI's CLIP uses QuickGELU: the official "
                     "code computes other text features from the same context (OpenAI's "
                     "weights belong in a -quickgelu model)")
    return notes


def _suffix_check(theirs_suffix: Tensor | None, ours: Tensor,
                  classnames: list) -> str:
    """How the checkpoint's ``token_suffix`` (its class names' tokens) compares with the
    prompts built here: ``matches``, ``absent`` or what differs."""
    if theirs_suffix is None:
        return "absent"
    if tuple(theirs_suffix.shape) != tuple(ours.shape):
        return (f"differs: shape {tuple(theirs_suffix.shape)} in the checkpoint, "
                f"{tuple(ours.shape)} for these {len(classnames)} class names")
    theirs = theirs_suffix.float()
    rounded = ours.to(theirs_suffix.dtype).float()
    close = torch.isclose(theirs, rounded, rtol=1e-3, atol=1e-3).flatten(1).all(1)
    bad = [name for name, ok in zip(classnames, close.tolist()) if not ok]
    if not bad:
        return "matches"
    return f"differs for {len(bad)} of {len(classnames)} classes (first: {bad[0]!r})"


# ---------------------------------------------------------------------------------------------
# Import


def _fresh_folder(out_dir: str) -> None:
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out: {out_dir!r} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        held = sorted(set(os.listdir(out_dir)) & set(RUN_FILES))
        raise ValueError(f"out: {out_dir!r} is not empty"
                         + (f" (it holds {', '.join(held)})" if held else "")
                         + "; choose a new folder")


def _place(tmp: str, out_dir: str) -> None:
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked): the rename takes its place
    os.rename(tmp, out_dir)


def import_dassl(checkpoint, learner: str, classnames, out_dir, *,
                 model: str = "fastprompt-tiny", pretrained: str | None = None,
                 device: str | torch.device = "cpu", class_token_position: str = "end",
                 kg_template: str | None = None, tcp_layer: int | None = None) -> dict:
    """Read the Dassl checkpoint ``checkpoint`` (a file, or an output folder: its latest
    ``prompt_learner/model.pth.tar-N``) of the official ``learner`` (coop, prograd, kgcoop,
    tcp, cocoop: ``official_learners()``) trained on ``classnames`` with the CLIP ``model`` /
    ``pretrained`` into a new run folder ``out_dir``, and return its metrics.

    The run holds the trained tensors in float32, the config (the learner's official defaults,
    the context size read from the checkpoint, ``epochs`` its epoch), the class names as the
    official code writes them into its prompts (underscores as spaces) and the model's weights
    hash: ``load_run``, evaluation on other data and export work on it as on a trained run. Its
    metrics.json records ``imported_from`` (path, epoch, learner, dtype, what was ignored, and
    whether the checkpoint's ``token_suffix`` matches these class names) and no training
    history; it has no feature cache of its own. ``class_token_position`` (CoOp, ProGrad) and
    ``kg_template`` (KgCoOp, TCP: the official ``CUSTOM_TEMPLATES`` entry of the data set, which
    TCP's meta network reads) are what the official config set; ``tcp_layer`` (TCP) the text
    layer its tokens enter (None: the official 8th).
    """
    official = _official(learner)
    if class_token_position != "end" and not official.positions:
        raise ValueError(f"class_token_position: the official {official.trainer} puts the class "
                         "name at the end of its prompts")
    names = check_classnames([n.replace("_", " ") if isinstance(n, str) else n
                              for n in classnames], "classnames")
    out_dir = os.fspath(out_dir)
    _fresh_folder(out_dir)
    ckpt = read_dassl_checkpoint(checkpoint)
    clip, _, _, tokenizer = create_model(model, pretrained, device, image_tower=False)
    encoder = PromptTextEncoder(clip)
    tensors, ignored = _checked_tensors(ckpt, official, encoder, names)
    ctx = tensors["ctx"]
    fields = {k: v for k, v in (("kg_template", kg_template), ("tcp_layer", tcp_layer))
              if v is not None}
    config = TrainConfig.for_learner(
        official.learner, n_ctx=int(ctx.shape[-2]), ctx_init=None, model=model,
        pretrained=pretrained, class_specific=ctx.dim() == 3,
        class_token_position=class_token_position, prograd=official.prograd,
        epochs=ckpt.epoch, **fields)
    suffix = _suffix_check(ckpt.tensors.get("token_suffix"),
                           official_prompt_buffers(clip, tokenizer, names, config.n_ctx)[1], names)
    weights = model_weights_hash(clip)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.import-",
                           dir=parent)
    try:
        write_config(tmp, config)
        write_prompt(os.path.join(tmp, PROMPT), official.learner, tensors, config, weights,
                     classnames=names)
        # Loading it back checks what the shapes alone do not (every prompt fits the context).
        learner_class(official.learner).load_classifiers(read_prompt_file(tmp), out_dir, clip,
                                                         None, tokenizer, device, None)
        metrics = {"method": config.describe(), "config": config.to_dict(), "seed": config.seed,
                   "epochs": [],
                   "imported_from": {"path": os.path.abspath(ckpt.path), "epoch": ckpt.epoch,
                                     "learner": official.name, "trainer": official.trainer,
                                     "dtype": str(ckpt.tensors["ctx"].dtype).removeprefix("torch."),
                                     "val_result": ckpt.val_result, "ignored": ignored,
                                     "token_suffix": suffix},
                   "num_classes": len(names),
                   "trainable_parameters": sum(t.numel() for t in tensors.values()),
                   "logit_scale": float(logit_scale(clip)), "versions": versions()}
        write_metrics(tmp, metrics)
        _place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class DasslExport:
    """What ``export_dassl`` wrote, and how to load it in the official code."""
    path: str
    trainer: str
    epoch: int
    shapes: dict
    dtype: str
    settings: dict
    notes: list

    def summary(self) -> str:
        tensors = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in self.shapes.items())
        settings = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        out_dir = os.path.dirname(os.path.dirname(self.path))
        return (f"wrote {self.path}: a {self.trainer} prompt learner ({tensors}; {self.dtype}), "
                f"epoch {self.epoch}. In the official code: {settings}; --eval-only "
                f"--model-dir {out_dir} --load-epoch {self.epoch}")


def official_learner_of(config: TrainConfig) -> OfficialLearner:
    """The official learner a run's config corresponds to; ValueError for one without."""
    if config.learner == "coop":
        return OFFICIAL["prograd" if config.prograd else "coop"]
    match = [o for o in official_learners().values() if o.learner == config.learner]
    if not match:
        raise ValueError(f"--dassl: a {config.learner!r} run has no official Dassl prompt "
                         f"learner to load it (supported: {sorted(official_learners())})")
    return match[0]


def export_dassl(run_dir, out_dir, *, precision: str = "fp16") -> DasslExport:
    """Write ``out_dir/prompt_learner/model.pth.tar-N`` (N: the run's epochs) from the run in
    ``run_dir``, as the official trainer's ``save_model`` writes it and its ``load_model``
    reads it: ``state_dict`` with the trained tensors under the official names plus
    ``token_prefix``/``token_suffix`` built as the official prompt learner builds them (for
    models with OpenAI CLIP's text layout; ``check_official_layout``), ``epoch`` N, and
    ``optimizer``, ``scheduler`` and ``val_result`` None (fastprompt's optimiser state is not
    Dassl's, and Dassl's scheduler is an object of its own classes: the file is for evaluation
    in the official code, not for resuming its training; Dassl writes None for the last
    epoch's ``val_result`` too). ``precision`` ``fp16`` (the official default, ``PREC fp16``,
    saves CLIP's half precision) or ``fp32`` (the run's tensors exactly, as ``PREC fp32`` and
    ``amp`` save them); the official ``load_state_dict`` casts either to its own precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"--dassl-precision: must be one of {tuple(PRECISIONS)}, got "
                         f"{precision!r}")
    prompt = read_prompt_file(run_dir)
    config = prompt.config
    official = official_learner_of(config)
    where = f"--dassl: {os.fspath(run_dir)!r}"
    if config.dept:
        raise ValueError(f"{where} was trained with --dept, whose head the official "
                         f"{official.trainer} has no place for")
    if config.class_specific and not official.class_specific:
        raise ValueError(f"{where} learned class-specific contexts, which the official "
                         f"{official.trainer} cannot hold")
    if config.class_token_position != "end" and not official.positions:
        raise ValueError(f"{where} puts the class name at the {config.class_token_position} "
                         f"of its prompts; the official {official.trainer} puts it at the end")
    run = load_runs(run_dir, image_tower=False)[0]
    notes = check_official_layout(run.model, run.tokenizer, config.model)
    encoder = PromptTextEncoder(run.model)
    expected = ["ctx", *meta_net_shapes(official.meta_net, _embed_dim(encoder), encoder.width,
                                        config.n_ctx)]
    extra = sorted(set(prompt.tensors) - set(expected))
    if extra:
        raise ValueError(f"{where} holds {extra[:6]}, which the official {official.trainer} "
                         "prompt learner does not")
    dtype = PRECISIONS[precision]
    prefix, suffix = official_prompt_buffers(run.model, run.tokenizer, run.class_names,
                                             config.n_ctx)
    state_dict = OrderedDict((k, prompt.tensors[k].to(dtype).contiguous()) for k in expected)
    state_dict["token_prefix"], state_dict["token_suffix"] = prefix.to(dtype), suffix.to(dtype)
    epoch = config.epochs
    path = os.path.join(os.fspath(out_dir), PROMPT_LEARNER, f"model.pth.tar-{epoch}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": None, "scheduler": None,
                "val_result": None}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    section = f"TRAINER.{official.section}"
    settings = {"TRAINER.NAME": official.trainer,
                "MODEL.BACKBONE.NAME": BACKBONES.get(config.model.removesuffix("-quickgelu"),
                                                     config.model),
                f"{section}.N_CTX": config.n_ctx, f"{section}.CTX_INIT": "''"}
    if official.class_specific:
        settings[f"{section}.CSC"] = config.class_specific
    if official.positions:
        settings[f"{section}.CLASS_TOKEN_POSITION"] = config.class_token_position
    return DasslExport(path, official.trainer, epoch,
                       {k: tuple(v.shape) for k, v in state_dict.items()
                        if k not in PROMPT_BUFFERS}, str(dtype).removeprefix("torch."),
                       settings, notes)

