"""Run folders to deployable artefacts: the glue between training runs (``fastprompt.train``)
and ONNX export (``fastprompt.export``), which itself knows nothing of run folders."""
from __future__ import annotations

import os

from fastprompt.export.onnx_export import ExportReport, export_onnx
from fastprompt.export.triton import TritonSettings
from fastprompt.train import load_run
from fastprompt.train.transfer import with_classnames


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, task: str | None = None,
               classnames: list[str] | None = None, triton: TritonSettings | None = None,
               **kwargs) -> ExportReport:
    """Export one classifier of a finished training run (``fastprompt.train.load_run``; SoftCPT:
    the one of ``task``) with ``fastprompt.export.export_onnx``; ``triton`` (``TritonSettings``,
    None: the defaults) and ``kwargs`` are its keyword options (head_only, fp16, int8, seed, ...).
    ``classnames``: classify among these names instead of the trained ones, with the run's
    learned context in front of each (``fastprompt.train.transfer``; refused for class-specific
    contexts). Returns its ``ExportReport``."""
    run = load_run(run_dir) if task is None else load_run(run_dir, task=task)
    if classnames is not None:
        run = with_classnames(run, classnames)
    return export_onnx(run.model, run.text_features, list(run.class_names), out_dir,
                       scale=float(run.scale), model_name=run.model_name, method=dict(run.method),
                       triton=triton, **kwargs)
