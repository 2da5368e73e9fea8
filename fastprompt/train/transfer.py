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

from fastprompt.train.files import read_prompt_file
from fastprompt.train.learner import TrainedClassifier, learner_class
from fastprompt.train.runs import load_run


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


def with_classnames(run: TrainedClassifier, classnames,
                    device: str | torch.device = "cpu") -> TrainedClassifier:
    """``run`` (from ``load_run``) as a classifier over ``classnames``: its learned context in
    front of each of them, through the frozen text encoder. The run's own names give the run
    back unchanged (class-specific contexts included); other names need a shared context."""
    names = check_classnames(classnames)
    if names == list(run.class_names):
        return run
    prompt = read_prompt_file(run.run_dir)
    return learner_class(prompt.learner).for_classnames(prompt, run, names, device)


def load_run_with_classnames(run_dir, classnames, *, task: str | None = None,
                             device: str | torch.device = "cpu") -> TrainedClassifier:
    """``load_run(run_dir, task=task)`` as a classifier over ``classnames``."""
    return with_classnames(load_run(os.fspath(run_dir), device, task), classnames, device)
