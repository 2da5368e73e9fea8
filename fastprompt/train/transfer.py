"""A trained run's context applied to other class names: the text side of cross-dataset transfer,
base-to-new evaluation and exports with another vocabulary.

Each learner says how (``Learner.text_features_for``): a CoOp-style run's learned context (one
shared ``n_ctx x W`` block) goes in front of each new name exactly as it went in front of the
trained ones; a SoftCPT run's context for a task is the one its meta network generates from that
task's name. A class-specific context (``--class-specific``) belongs to the classes it was
trained for and cannot be moved to other names.
"""
from __future__ import annotations

import os

import torch

from fastprompt._checks import check_class_name, check_class_names
from fastprompt.train.files import read_prompt_file
from fastprompt.train.learner import TrainedClassifier, learner_class
from fastprompt.train.runs import load_run


def check_classnames(classnames, where: str = "classnames") -> list[str]:
    """Class names checked as every class name is (``fastprompt._checks.check_class_names``:
    Unicode NFC, no control or format characters, non-empty, distinct), at least two."""
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)):
        raise TypeError(f"{where}: expected a list of class names, got {type(classnames).__name__}")
    names = check_class_names(list(classnames), where)
    if len(names) < 2:
        raise ValueError(f"{where}: a classifier needs at least 2 class names, got {len(names)}")
    return names


def read_classnames_file(path) -> list[str]:
    """Class names from a text file, one per line (a UTF-8 byte-order mark, surrounding spaces
    and blank lines dropped), each checked as every class name is; a bad one is named by its
    line number."""
    where = f"--classnames: {path}"
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e})") from None
    # Split on newlines only: any other line break inside a line is refused by the check.
    names = [check_class_name(line.removesuffix("\r"), where, f"line {n}")
             for n, line in enumerate(lines, start=1)
             if line.removesuffix("\r").strip().lstrip("\ufeff").strip()]
    return check_classnames(names, where)


def with_classnames(run: TrainedClassifier, classnames, device: str | torch.device = "cpu", *,
                    where: str = "classnames") -> TrainedClassifier:
    """``run`` (from ``load_run``) as a classifier over ``classnames``: its learned context in
    front of each of them, through the frozen text encoder. The run's own names give the run
    back unchanged (class-specific contexts included); other names need a shared context.
    ``where`` names the class names in errors (where they came from)."""
    names = check_classnames(classnames, where)
    if names == list(run.class_names):
        return run
    prompt = read_prompt_file(run.run_dir)
    try:
        return learner_class(prompt.learner).for_classnames(prompt, run, names, device)
    except ValueError as e:  # the prompt learner calls them "classnames": say where they are from
        message = str(e)
        if where == "classnames" or not message.startswith("classnames: "):
            raise
        raise ValueError(f"{where}: {message.removeprefix('classnames: ')}") from None


def load_run_with_classnames(run_dir, classnames, *, task: str | None = None,
                             device: str | torch.device = "cpu") -> TrainedClassifier:
    """``load_run(run_dir, task=task)`` as a classifier over ``classnames``."""
    return with_classnames(load_run(os.fspath(run_dir), device, task), classnames, device)
