"""Loading finished runs back: ``load_run`` / ``load_runs`` give ``TrainedClassifier`` records,
whatever the learner (the prompt file names it; its ``Learner`` class loads it)."""
from __future__ import annotations

import dataclasses
import os

import torch

from fastprompt.models import create_model
from fastprompt.models.softcpt import normalize_task_name
from fastprompt.models.weights import model_weights_hash
from fastprompt.train.files import PromptFile, read_metrics, read_prompt_file
from fastprompt.train.learner import TrainedClassifier, learner_class
from fastprompt.train.objective import dept_head


def _model_for(prompt: PromptFile, run_dir: str, device, image_tower: bool):
    config = prompt.config
    model, _, preprocess_val, tokenizer = create_model(config.model, config.pretrained, device,
                                                       image_tower=image_tower)
    if prompt.metadata.get("model_weights") != model_weights_hash(model):
        raise ValueError(f"run: the weights of model {config.model!r} "
                         f"(pretrained={config.pretrained!r}) differ from those the prompt in "
                         f"{run_dir!r} was trained with")
    return model, preprocess_val, tokenizer


def _select_tasks(run_dir: str, names: list[str] | None, task: str | None) -> list[str] | None:
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


def _with_dept_heads(prompt: PromptFile, classifiers: list[TrainedClassifier],
                     names: list[str] | None) -> list[TrainedClassifier]:
    """The classifiers of a ``--dept`` run with their heads (SoftCPT: each task's, under
    ``tasks.<index>.``); others as they are."""
    config = prompt.config
    if not config.dept:
        return classifiers
    out = []
    for clf in classifiers:
        prefix = "" if clf.task is None else f"tasks.{names.index(clf.task)}."
        head = dept_head(prompt.tensors, prefix).fused(config.dept_weight, clf.scale)
        out.append(dataclasses.replace(clf, fused=head))
    return out


def _load(run_dir: str, prompt: PromptFile, device, task: str | None,
          image_tower: bool = True) -> list[TrainedClassifier]:
    cls = learner_class(prompt.learner)
    names = cls.task_names(prompt)
    tasks = _select_tasks(run_dir, names, task)
    model, preprocess_val, tokenizer = _model_for(prompt, run_dir, device, image_tower)
    classifiers = cls.load_classifiers(prompt, run_dir, model, preprocess_val, tokenizer, device,
                                       tasks)
    return _with_dept_heads(prompt, classifiers, names)


def load_runs(run_dir, device: str | torch.device = "cpu", task: str | None = None, *,
              image_tower: bool = True) -> list[TrainedClassifier]:
    """Every classifier of a finished run (SoftCPT: one per task, or the one ``task`` names).
    ``image_tower=False``: for work on cached features only (``create_model``'s argument)."""
    run_dir = os.fspath(run_dir)
    return _load(run_dir, read_prompt_file(run_dir), device, task, image_tower)


def load_run(run_dir, device: str | torch.device = "cpu", task: str | None = None
             ) -> TrainedClassifier:
    """Rebuild one classifier of a trained run: the open_clip model (from the config's model
    name and pretrained file), the learned prompt, and its C x E class text features. A SoftCPT
    run over several tasks needs ``task``, the name of the task whose classifier to rebuild."""
    run_dir = os.fspath(run_dir)
    prompt = read_prompt_file(run_dir)
    names = learner_class(prompt.learner).task_names(prompt)
    if task is None and names is not None and len(names) > 1:
        raise ValueError(f"run: {run_dir!r} is a SoftCPT run over {len(names)} tasks {names}; "
                         "pick one with --task NAME (task=NAME)")
    return _load(run_dir, prompt, device, task)[0]


def run_caches(run_dir) -> dict[str | None, str]:
    """The feature cache each classifier of a run was trained on, from its ``metrics.json``:
    ``{task name (None for a single classifier): cache path}``."""
    metrics = read_metrics(run_dir, missing="pass --cache FILE")
    if "imported_from" in metrics:  # fastprompt import-dassl
        raise ValueError(f"run: {os.fspath(run_dir)!r} was imported from a Dassl checkpoint "
                         "and has no feature cache of its own; pass --cache FILE (a cache of "
                         "its classes) or --data DIR")
    try:
        if "tasks" in metrics:
            return {t["name"]: t["cache"]["path"] for t in metrics["tasks"]}
        return {None: metrics["cache"]["path"]}
    except (KeyError, TypeError) as e:
        raise ValueError(f"run: {os.path.join(os.fspath(run_dir), 'metrics.json')!r} does not "
                         f"name the run's feature cache (missing {e}); pass --cache FILE") from e
