"""An NVIDIA Triton Inference Server model repository around an exported classifier.

Layout (the export folder is the repository root; Triton only looks at its sub-folders, so the
top-level ``model.onnx`` kept for direct use does not disturb it)::

    DIR/model.onnx                      the classifier
    DIR/<name>/config.pbtxt             onnxruntime backend, dynamic batching, instances, warm-up
    DIR/<name>/labels.txt               class names, one per line (label_filename of the outputs)
    DIR/<name>/1/model.onnx             hard link to DIR/model.onnx (a copy where links fail)
    [DIR/model.onnx.data, DIR/<name>/1/model.onnx.data   external weights, models over 2 GB]

The config is written for throughput: Triton's dynamic batcher gathers concurrent requests into
the preferred batch sizes (waiting at most the queue delay), several instances per GPU overlap
copies with compute, and a warm-up request at each preferred size runs before the model is
marked ready, so the first clients do not pay for onnxruntime's first-run allocations.

A SoftCPT run over T tasks becomes one image encoder, T heads and T ensembles
(``write_ensemble``), so the image tower is stored and run once, not T times.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import onnx

from fastprompt._checks import check_int
from fastprompt._io import place_alias, remove_if_present, write_text_atomic
from fastprompt.serve.metadata import PRECISIONS

LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_NAME = "fastprompt_classifier"
DEFAULT_QUEUE_DELAY_US = 100
GPU_INSTANCES = 2  # two per GPU: one copies inputs while the other computes
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# ONNX element type -> Triton data type (the ones an exported classifier can have).
_TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
}


def check_model_name(name: str, what: str = "triton_name") -> None:
    """Triton model names become folder names: keep them to portable characters."""
    if not isinstance(name, str):
        raise TypeError(f"{what}: expected a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what}: {name!r} must be letters, digits, '_', '.' or '-' and not "
                         "start with '.' or '-'")


@dataclass(frozen=True)
class TritonSettings:
    """The Triton model configuration of an export: what ``config.pbtxt`` says beyond the
    graph's inputs and outputs. Checked when made; errors name the setting as the export's
    ``--triton-*`` options do (``triton_instances: ...``).

    Args:
        name: folder and model name in the Triton repository.
        max_batch_size: ``max_batch_size`` of the config.
        gpu: KIND_GPU instances; None: GPU for an fp16 export, else KIND_CPU.
        instances: instances per device; None: 2 per GPU, 1 on the CPU.
        tensorrt: ask Triton's onnxruntime backend for its TensorRT accelerator (GPU instances).
        queue_delay_us: how long Triton may hold a request to form a larger batch.
        precision: the exported model's precision; the export sets it (``for_model``), and with
            it ``gpu`` and ``instances`` when they are None.
    """

    name: str = DEFAULT_MODEL_NAME
    max_batch_size: int = 64
    gpu: bool | None = None
    instances: int | None = None
    tensorrt: bool = False
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    precision: str = "float32"

    def __post_init__(self):
        check_model_name(self.name)
        check_int("triton_max_batch_size", self.max_batch_size, 1)
        check_int("triton_queue_delay_us", self.queue_delay_us, 0)
        if self.gpu is not None and not isinstance(self.gpu, bool):
            raise TypeError(f"triton_gpu: expected a bool, got {type(self.gpu).__name__}")
        if self.instances is not None:
            check_int("triton_instances", self.instances, 1)
        if not isinstance(self.tensorrt, bool):
            raise TypeError(f"triton_tensorrt: expected a bool, got {type(self.tensorrt).__name__}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.tensorrt and self.gpu is False:
            raise ValueError("triton_tensorrt: TensorRT runs on GPU instances; export with fp16 "
                             "or ask for GPU instances (--triton-gpu)")
        if self.tensorrt and self.precision == "int8":
            raise ValueError("triton_tensorrt: TensorRT cannot run onnxruntime's dynamic int8 "
                             "operators; use it with an fp16 or float32 export")

    def for_model(self, precision: str) -> "TritonSettings":
        """These settings for an exported model of ``precision``: ``gpu`` (None: fp16 models
        on the GPU) and ``instances`` (None: 2 per GPU, 1 on the CPU) filled in, and checked."""
        gpu = precision == "float16" if self.gpu is None else self.gpu
        instances = (GPU_INSTANCES if gpu else 1) if self.instances is None else self.instances
        return replace(self, gpu=gpu, instances=instances, precision=precision)

    def preferred_batch_sizes(self) -> list[int]:
        """Powers of two from 4 up to ``max_batch_size``, and ``max_batch_size`` itself."""
        sizes = [b for b in (4, 8, 16, 32, 64, 128, 256) if b < self.max_batch_size]
        return sizes[-3:] + [self.max_batch_size]


def settings_or_default(triton) -> TritonSettings:
    """``triton`` as an export function takes it: ``TritonSettings``, or None for the defaults."""
    if triton is None:
        return TritonSettings()
    if not isinstance(triton, TritonSettings):
        raise TypeError(f"triton: expected TritonSettings or None, got {type(triton).__name__}")
    return triton


def tensor_specs(values) -> list[tuple[str, str, list[int]]]:
    """``(name, triton type, dims without the batch dimension)`` for graph inputs or outputs.

    Symbolic or unknown dimensions after the batch become -1 (variable), as Triton expects.
    """
    specs = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _TRITON_TYPES:
            raise ValueError(f"model: tensor {v.name!r} has ONNX element type {t.elem_type}, "
                             "which the Triton config writer does not map")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim[1:]]
        specs.append((v.name, _TRITON_TYPES[t.elem_type], dims))
    return specs


def _dims(dims) -> str:
    return f"[ {', '.join(str(d) for d in dims)} ]"


def _tensors(specs, label: bool) -> str:
    entries = []
    for tensor, dtype, dims in specs:
        lines = [f'    name: "{tensor}"', f"    data_type: {dtype}", f"    dims: {_dims(dims)}"]
        if label:
            lines.append(f'    label_filename: "{LABELS_FILE}"')
        entries.append("  {\n" + "\n".join(lines) + "\n  }")
    return "[\n" + ",\n".join(entries) + "\n]"


def config_pbtxt(settings: TritonSettings, inputs, outputs, *, labels: bool = True) -> str:
    """Text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``) for an ONNX
    model served by the onnxruntime backend. ``labels``: the outputs carry ``labels.txt``."""
    s = settings
    warmup = []
    for b in sorted({1, *s.preferred_batch_sizes()}):
        feeds = "\n".join(
            f'    inputs {{\n      key: "{name}"\n      value {{\n        data_type: {dtype}\n'
            f"        dims: {_dims(dims)}\n        random_data: true\n      }}\n    }}"
            for name, dtype, dims in inputs)
        warmup.append(f'  {{\n    name: "random_batch_{b}"\n    batch_size: {b}\n{feeds}\n  }}')
    text = (f'name: "{s.name}"\n'
            'backend: "onnxruntime"\n'
            f"max_batch_size: {s.max_batch_size}\n"
            f"input {_tensors(inputs, label=False)}\n"
            f"output {_tensors(outputs, label=labels)}\n"
            "dynamic_batching {\n"
            f"  preferred_batch_size: {_dims(s.preferred_batch_sizes())}\n"
            f"  max_queue_delay_microseconds: {s.queue_delay_us}\n"
            "}\n"
            f"instance_group [ {{ count: {s.instances}, kind: {'KIND_GPU' if s.gpu else 'KIND_CPU'} }} ]\n"
            f"model_warmup [\n{(','+chr(10)).join(warmup)}\n]\n")
    if s.tensorrt:
        mode = "FP16" if s.precision == "float16" else "FP32"
        text += ("optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
                 '      name : "tensorrt"\n'
                 f'      parameters {{ key: "precision_mode" value: "{mode}" }}\n'
                 '      parameters { key: "max_workspace_size_bytes" value: "1073741824" }\n'
                 "    } ]\n  }\n}\n")
    return text


def check_not_linked(out_dir: str, name: str) -> None:
    """Refuse model folders ``out_dir/<name>`` and ``out_dir/<name>/1`` that are symbolic links:
    the export creates those folders and would otherwise write wherever a link points."""
    for path in (os.path.join(out_dir, name), os.path.join(out_dir, name, "1")):
        if os.path.islink(path):
            raise ValueError(f"out_dir: {path} is a symbolic link (to {os.readlink(path)}); the "
                             "export does not write through links into the folders it creates: "
                             "remove the link or export elsewhere")


def write_model_repository(out_dir: str, settings: TritonSettings, model_path: str,
                           data_path: str | None, graph: onnx.GraphProto,
                           class_names: list[str] | None) -> str:
    """Write ``out_dir/<name>/`` for the exported model; returns how the model file was placed
    (``"hardlink"`` or ``"copy"``). ``class_names`` None: outputs without a labels file."""
    check_not_linked(out_dir, settings.name)
    model_dir = os.path.join(out_dir, settings.name)
    version_dir = os.path.join(model_dir, "1")
    os.makedirs(version_dir, exist_ok=True)
    # External weights first, so a reader never sees a model whose data file is missing.
    data_alias = os.path.join(version_dir, os.path.basename(model_path) + ".data")
    if data_path is not None:
        place_alias(data_path, data_alias)
    mode = place_alias(model_path, os.path.join(version_dir, os.path.basename(model_path)))
    if data_path is None:
        remove_if_present(data_alias)  # left over from an earlier export over 2 GB
    if class_names is not None:
        write_text_atomic(os.path.join(model_dir, LABELS_FILE),
                          "".join(c + "\n" for c in class_names))
    write_text_atomic(os.path.join(model_dir, CONFIG_FILE),
                      config_pbtxt(settings, tensor_specs(graph.input), tensor_specs(graph.output),
                                   labels=class_names is not None))
    return mode


def ensemble_pbtxt(name: str, max_batch_size: int, encoder: str, head: str, image_spec,
                   feature_spec, output_specs) -> str:
    """An ensemble ``image -> encoder -> image_features -> head -> logits, probs``."""
    (image, image_type, image_dims), (features, _, _) = image_spec, feature_spec
    outputs = "\n".join(f'        output_map {{ key: "{o}" value: "{o}" }}' for o, _, _ in output_specs)
    return (f'name: "{name}"\n'
            'platform: "ensemble"\n'
            f"max_batch_size: {max_batch_size}\n"
            f"input {_tensors([image_spec], label=False)}\n"
            f"output {_tensors(output_specs, label=True)}\n"
            "ensemble_scheduling {\n  step [\n"
            f'    {{\n        model_name: "{encoder}"\n        model_version: -1\n'
            f'        input_map {{ key: "{image}" value: "{image}" }}\n'
            f'        output_map {{ key: "{features}" value: "{features}" }}\n    }},\n'
            f'    {{\n        model_name: "{head}"\n        model_version: -1\n'
            f'        input_map {{ key: "{features}" value: "{features}" }}\n'
            f"{outputs}\n    }}\n  ]\n}}\n")


def write_ensemble(out_dir: str, name: str, max_batch_size: int, encoder: str, head: str,
                   encoder_graph: onnx.GraphProto, head_graph: onnx.GraphProto,
                   class_names: list[str]) -> None:
    """``out_dir/<name>/``: the ensemble config, its labels and the empty version folder Triton
    requires of an ensemble."""
    model_dir = os.path.join(out_dir, name)
    os.makedirs(os.path.join(model_dir, "1"), exist_ok=True)
    (image_spec,), (feature_spec,) = tensor_specs(encoder_graph.input), tensor_specs(encoder_graph.output)
    write_text_atomic(os.path.join(model_dir, LABELS_FILE), "".join(c + "\n" for c in class_names))
    write_text_atomic(os.path.join(model_dir, CONFIG_FILE),
                      ensemble_pbtxt(name, max_batch_size, encoder, head, image_spec, feature_spec,
                                     tensor_specs(head_graph.output)))
