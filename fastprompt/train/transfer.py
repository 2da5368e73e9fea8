"""A trained run's context applied to other class names: the text side of cross-dataset transfer,
base-to-new evaluation and exports with another vocabulary.

A CoOp-style run's learned context (one shared ``n_ctx x W`` block) goes in front of each new
name exactly as it went in front of the trained ones. A SoftCPT run's context for a task is the
one its meta network generates from that task's name. A class-specific context (``--class-
specific``) belongs to the classes it was trained for and cannot be moved to other names.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from fastprompt.train import rundir
from fastprompt.train.run import FORMAT as COOP_FORMAT
from fastprompt.train.run import _prompted_model
from fastprompt.train.softcpt import SOFTCPT_FORMAT, softcpt_model


def check_classnames(classnames, where: str = "classnames") -> list[str]:
    """Class names as a list of distinct, non-empty, single-line strings (at least two)."""
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        raise TypeError(f"{where}: expected a list of class names, got {type(classnames).__name__}")
    names = list(classnames)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"{where}: entry {i + 1} ({name!r}) is not a one-line class name")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: {duplicates} appear more than once")
    if len(names) < 2:
        raise ValueError(f"{where}: a classifier needs at least 2 class names, got {len(names)}")
    return names


def read_classnames_file(path) -> list[str]:
    """Class names from a text file, one per line (surrounding spaces and blank lines dropped)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--classnames: {path} is not UTF-8 text ({e})") from None
    return check_classnames([line.strip() for line in lines if line.strip()],
                            f"--classnames: {path}")


def _shared_context(prompt: rundir.PromptFile, run: rundir.Run, device) -> torch.Tensor:
    """The context a run puts in front of any class name (n_ctx x W)."""
    config = prompt.config
    if prompt.format == COOP_FORMAT:
        if config.class_specific:
            raise ValueError(f"run: {run.run_dir!r} learned one context per class "
                             "(--class-specific); such contexts belong to the trained classes "
                             "and cannot be applied to other class names (train with a shared "
                             "context)")
        return prompt.tensors["ctx"].to(device)
    if prompt.format == SOFTCPT_FORMAT:
        tasks = prompt.field("tasks")
        with torch.random.fork_rng(devices=[]):  # the initial draws are overwritten
            net = softcpt_model(run.model, run.tokenizer, [t["name"] for t in tasks],
                                [t["classnames"] for t in tasks], config).to(device)
        net.load_trainable_state(prompt.tensors)
        with torch.no_grad():
            return net.contexts([run.task])[0]
    raise ValueError(f"run: {run.run_dir!r} is a {prompt.format!r} run, whose context cannot be "
                     "applied to other class names")


def with_classnames(run: rundir.Run, classnames, device: str | torch.device = "cpu") -> rundir.Run:
    """``run`` (from ``load_run``) as a classifier over ``classnames``: its learned context in
    front of each of them, through the frozen text encoder. The run's own names give the run
    back unchanged (class-specific contexts included); other names need a shared context."""
    names = check_classnames(classnames)
    if names == list(run.class_names):
        return run
    prompt = rundir.read_prompt_file(run.run_dir)
    ctx = _shared_context(prompt, run, device)
    with torch.random.fork_rng(devices=[]):  # the prompt learner draws an unused initial context
        prompted = _prompted_model(run.model, run.tokenizer, names,
                                   dataclasses.replace(prompt.config, class_specific=False,
                                                       ctx_init=None)).to(device)
    with torch.no_grad():
        text = prompted(ctx.to(prompted.prompt_learner.ctx.dtype)).float()
    return dataclasses.replace(run, class_names=names, text_features=text,
                               method={**run.method, "classnames_transferred": True})


def load_run_with_classnames(run_dir, classnames, *, task: str | None = None,
                             device: str | torch.device = "cpu") -> rundir.Run:
    """``load_run(run_dir, task=task)`` as a classifier over ``classnames``."""
    return with_classnames(rundir.load_run(os.fspath(run_dir), device, task), classnames, device)
