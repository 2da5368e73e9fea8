"""Run folders to deployable artefacts: the glue between training runs (``fastprompt.train``)
and ONNX export (``fastprompt.export``), which itself knows nothing of run folders."""
from __future__ import annotations

import os

import numpy as np

from fastprompt.data import load_cache
from fastprompt.export.agreement import EvaluationSet
from fastprompt.export.ensemble import EnsembleReport, export_ensemble
from fastprompt.export.onnx_export import ExportReport, export_onnx
from fastprompt.export.triton import TritonSettings
from fastprompt.train import load_run, load_softcpt_run
from fastprompt.train.files import PROMPT, read_metrics, read_prompt_file
from fastprompt.train.online import is_online, load_online_run
from fastprompt.train.transfer import with_classnames


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, task: str | None = None,
               classnames: list[str] | None = None, classnames_from: str = "classnames",
               triton: TritonSettings | None = None, **kwargs) -> ExportReport:
    """Export one classifier of a finished training run (``fastprompt.train.load_run``; SoftCPT:
    the one of ``task``) with ``fastprompt.export.export_onnx``; ``triton`` (``TritonSettings``,
    None: the defaults) and ``kwargs`` are its keyword options (head_only, fp16, int8, seed, ...).
    ``classnames``: classify among these names instead of the trained ones, with the run's
    learned context in front of each (``fastprompt.train.transfer``; refused for class-specific
    contexts); ``classnames_from`` names them in errors (e.g. the file they were read from).
    Returns its ``ExportReport``. A MaPLe, IVLP or PromptSRC run (trained online) exports its
    prompted image tower, the trained image prompts fixed in the graph, and its class text
    features."""
    # Without a prompt file, load_run says what is missing.
    has_prompt = os.path.isfile(os.path.join(run_dir, PROMPT))
    learner = read_prompt_file(run_dir).learner if has_prompt else None
    if learner is not None and is_online(learner):
        return _export_online_run(run_dir, out_dir, learner, task=task, classnames=classnames,
                                  triton=triton, **kwargs)
    run = load_run(run_dir) if task is None else load_run(run_dir, task=task)
    if classnames is not None:
        run = with_classnames(run, classnames, where=classnames_from)
    scale, affine, weight = float(run.scale), None, 1.0
    if run.fused is not None:  # DePT's training classes: the weighted similarity + the head
        weight, affine = run.fused.similarity_weight, (run.fused.weight, run.fused.bias)
        scale = run.fused.scale * weight
    text_head = None
    if run.head is not None:  # prompts that depend on the image: the text tower in the graph
        text_head = run.head.for_export()
    return export_onnx(run.model, run.text_features, list(run.class_names), out_dir,
                       scale=scale, model_name=run.model_name, method=dict(run.method),
                       triton=triton, affine=affine, text_head=text_head,
                       text_head_weight=weight, **kwargs)


def _export_online_run(run_dir, out_dir, learner: str, *, task, classnames, triton,
                       **kwargs) -> ExportReport:
    if task is not None:
        raise ValueError(f"task: a {learner!r} run has one classifier; drop --task")
    if kwargs.get("head_only"):
        raise ValueError(f"head_only: a {learner!r} run classifies the features of its prompted "
                         "image tower, which a head-only graph would take as input from "
                         "elsewhere; export it with the image tower (drop --head-only)")
    run = load_online_run(run_dir, classnames=classnames)
    return export_onnx(run["model"], run["text_features"], run["class_names"], out_dir,
                       scale=run["scale"], model_name=run["model_name"], method=run["method"],
                       triton=triton, **kwargs)


def export_run_ensemble(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        triton: TritonSettings | None = None, **kwargs) -> EnsembleReport:
    """Export every task of a finished SoftCPT run as one NVIDIA Triton ensemble repository
    (``fastprompt.export.export_ensemble``: one shared image encoder, one head per task);
    ``kwargs`` are its options (verify, opset, seed)."""
    names = [t["name"] for t in _metrics_or_empty(run_dir).get("tasks", [])]
    if not names:
        raise ValueError(f"--triton-ensemble: {os.fspath(run_dir)} is not a finished SoftCPT run "
                         "(its metrics.json lists no tasks)")
    runs = {name: load_softcpt_run(run_dir, task=name) for name in names}
    first = runs[names[0]]
    if first.fused is not None:
        raise ValueError("--triton-ensemble: a run trained with --dept has a head per task that "
                         "the ensemble's shared heads do not hold; export each task (--task)")
    return export_ensemble(
        first.model, {name: (run.text_features, list(run.class_names)) for name, run in runs.items()},
        out_dir, scale=float(first.scale), model_name=first.model_name,
        method={k: v for k, v in first.method.items() if k != "task"}, triton=triton, **kwargs)


def _metrics_or_empty(run_dir) -> dict:
    """The run's metrics.json, or {} where it has none (an unfinished run)."""
    if not os.path.isfile(os.path.join(os.fspath(run_dir), "metrics.json")):
        return {}
    return read_metrics(run_dir)


def agreement_set(run_dir, task: str | None, head_only: bool,
                  limit: int) -> tuple[EvaluationSet | None, str | None]:
    """The run's own test data for an ``--int8``/``--fp16`` export's agreement report: its
    feature cache's test images (or, head-only, test features) with their labels, at most
    ``limit`` of them spread evenly over the test set (0: all). ``(None, why)`` when the cache
    is gone or has no test split: the export then compares on random inputs."""
    metrics = _metrics_or_empty(run_dir)
    entry = metrics
    if task is not None:
        key = task.casefold()
        entry = next((t for t in metrics.get("tasks", [])
                      if str(t.get("name", "")).casefold() == key), {})
    path = (entry.get("cache") or {}).get("path")
    if not path or not os.path.isfile(path):
        return None, (f"the run's feature cache ({path or 'not recorded'}) is not here; the "
                      "agreement report uses random inputs")
    cache = load_cache(path)
    n = len(cache.test_labels)
    if n == 0:
        return None, f"{path} has no test split; the agreement report uses random inputs"
    rows = (np.arange(n) if limit == 0 or limit >= n
            else np.linspace(0, n - 1, limit).round().astype(int))
    labels = cache.test_labels.numpy()[rows]
    if head_only:
        inputs = cache.test_features.float().numpy()[rows]
        return EvaluationSet(inputs, labels, f"test features of {path}"), None
    paths = [cache.test_paths[i] for i in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        return None, (f"{len(missing)} of the cache's test images are gone (e.g. {missing[0]}); "
                      "the agreement report uses random inputs")
    return EvaluationSet(paths, labels, f"test images of {path}"), None
