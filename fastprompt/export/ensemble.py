"""A Triton ensemble for multi-task (SoftCPT) classifiers: one image encoder shared by every task,
one head-only classifier per task, and one ensemble per task that chains the two.

    OUT/image_encoder/config.pbtxt, 1/model.onnx     image -> image_features (the tower, once)
    OUT/<task>_head/config.pbtxt, labels.txt, 1/model.onnx     image_features -> logits, probs
    OUT/<task>/config.pbtxt, labels.txt, 1/          ensemble: image -> logits, probs

Clients send images to ``<task>``; Triton runs the encoder once per batch of requests to that
task and the task's small head after it. T tasks cost one copy of the image tower, not T.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace

import onnx
import torch
import torch.nn as nn

from fastprompt.export.checks import check_image_model
from fastprompt.export.graph import (MODEL_FILE, io_graph, plain_fp32_cpu, preprocess_fields,
                                     save_checked, set_producer, to_onnx)
from fastprompt.export.onnx_export import export_onnx
from fastprompt.export.triton import (DEFAULT_MODEL_NAME, TritonSettings, check_not_linked,
                                      settings_or_default, write_ensemble, write_model_repository)
from fastprompt.export.verify import encoder_parity

ENCODER = "image_encoder"
FEATURES = "image_features"


class ImageEncoder(nn.Module):
    """The image tower alone: ``image -> image_features`` (not normalised; each head normalises)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.visual(image)
        return features[0] if isinstance(features, (tuple, list)) else features


@dataclass
class EnsembleReport:
    """What ``export_ensemble`` wrote."""

    out_dir: str
    encoder_max_abs_diff: float | None
    tasks: dict  # task name -> (ensemble model name, head ExportReport)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"triton ensemble repository {self.out_dir}: {ENCODER} (shared image encoder"
                 + (f", max |dfeatures| vs torch {self.encoder_max_abs_diff:.2e}"
                    if self.encoder_max_abs_diff is not None else ", not verified") + ")"]
        for task, (name, head) in self.tasks.items():
            lines.append(f"  task {task!r}: ensemble {name} = {ENCODER} -> {name}_head "
                         f"({head.num_classes} classes)")
        lines.append(f"in {self.seconds:.1f} s")
        return "\n".join(lines)


def model_name_for(task: str, taken: set[str]) -> str:
    """A Triton model name for ``task``: its letters, digits, '.', '-', '_' (others become '_')."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", task).strip("._-") or "task"
    name, n = base, 2
    while {name, name + "_head"} & (taken | {ENCODER}):
        name, n = f"{base}_{n}", n + 1
    taken.update({name, name + "_head"})
    return name


def export_ensemble(model: nn.Module, tasks: dict[str, tuple[torch.Tensor, list[str]]],
                    out_dir: str | os.PathLike, *, scale: float, model_name: str,
                    method: dict | None = None, triton: TritonSettings | None = None,
                    verify: bool = True, opset: int | None = None,
                    seed: int | None = None) -> EnsembleReport:
    """Write the ensemble repository for ``tasks`` (task name -> (C x E class embeddings, C class
    names)) into ``out_dir``. Every model is built and checked in a staging folder first; the
    folders it replaces are swapped only when all of them are ready.

    ``triton``: batch size, instances and queue delay of every model (``TritonSettings``; None:
    the defaults, CPU instances). The ensemble names its models itself and runs them in float32
    without TensorRT, so ``name`` and ``tensorrt`` keep their defaults."""
    start = time.perf_counter()
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError("tasks: expected a non-empty dict of task name -> (class embeddings, "
                         "class names)")
    check_image_model(model)
    settings = settings_or_default(triton)
    if settings.name != DEFAULT_MODEL_NAME:
        raise ValueError(f"triton_name: the ensemble names its models itself ({ENCODER}, "
                         f"<task>_head, <task>), got {settings.name!r}")
    if settings.tensorrt:
        raise ValueError("triton_tensorrt: the ensemble's models run without TensorRT")
    encoder_settings = replace(settings, name=ENCODER).for_model("float32")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    names, taken = {}, set()
    for task in tasks:
        names[task] = model_name_for(task, taken)
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir} exists and is not a folder")
    for name in [ENCODER, *names.values(), *(n + "_head" for n in names.values())]:
        check_not_linked(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".ensemble-")
    try:
        repo = os.path.join(staging, "repo")
        os.mkdir(repo)
        head_reports = {}
        for task, (embeddings, class_names) in tasks.items():
            name = names[task]
            work = os.path.join(staging, "heads", name)
            head_reports[task] = (name, export_onnx(
                model, embeddings, class_names, work, scale=scale, model_name=model_name,
                method={**(method or {}), "task": task}, head_only=True,
                triton=replace(settings, name=f"{name}_head"), verify=verify, opset=opset,
                seed=seed))
            os.replace(os.path.join(work, f"{name}_head"), os.path.join(repo, f"{name}_head"))
        encoder, diff = _export_encoder(model, os.path.join(staging, "encoder"), opset, seed, verify)
        encoder_graph = io_graph(onnx.load(encoder).graph)
        write_model_repository(repo, encoder_settings, encoder, None, encoder_graph, None)
        for task, (name, head) in head_reports.items():
            head_graph = io_graph(onnx.load(os.path.join(repo, f"{name}_head", "1",
                                                         MODEL_FILE)).graph)
            write_ensemble(repo, name, settings.max_batch_size, ENCODER, f"{name}_head",
                           encoder_graph, head_graph, tasks[task][1])
        for folder in sorted(os.listdir(repo)):  # swap each model folder into place
            _replace_folder(os.path.join(repo, folder), os.path.join(out_dir, folder), staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return EnsembleReport(out_dir, diff, head_reports, time.perf_counter() - start)


def _export_encoder(model: nn.Module, folder: str, opset, seed: int, verify: bool):
    """The shared image encoder in ``folder/model.onnx``, checked against torch unless not
    ``verify``; returns its path and the largest feature difference (None unverified)."""
    os.makedirs(folder)
    module = ImageEncoder(plain_fp32_cpu(model.visual)).eval()
    per_item = (3, *preprocess_fields(model)["image_size"])
    proto = to_onnx(module, per_item, "image", opset, output_names=(FEATURES,))
    set_producer(proto, "fastprompt image encoder: image -> image_features (not normalised)")
    path = save_checked(proto, os.path.join(folder, MODEL_FILE), external=False)
    if not verify:
        return path, None
    return path, encoder_parity(path, module, per_item, seed, input_name="image",
                                output_name=FEATURES)


def _replace_folder(src: str, dst: str, staging: str) -> None:
    """Put folder ``src`` at ``dst``, moving an existing ``dst`` aside first (into ``staging``,
    removed with it), so a reader sees the old folder or the new one."""
    if os.path.lexists(dst):
        if os.path.islink(dst) or not os.path.isdir(dst):
            raise ValueError(f"out_dir: {dst} exists and is not a model folder; not replacing it")
        os.replace(dst, os.path.join(staging, "old-" + os.path.basename(dst)))
    os.replace(src, dst)
