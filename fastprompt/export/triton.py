"""An NVIDIA Triton Inference Server model repository around an exported classifier.

Layout (the export folder is the repository root; Triton only looks at its sub-folders, so the
top-level ``model.onnx`` kept for direct use does not disturb it)::

    DIR/model.onnx                      the classifier
    DIR/<name>/config.pbtxt             onnxruntime backend, dynamic batching
    DIR/<name>/labels.txt               class names, one per line (label_filename of the outputs)
    DIR/<name>/1/model.onnx             hard link to DIR/model.onnx (a copy where links fail)
    [DIR/model.onnx.data, DIR/<name>/1/model.onnx.data   external weights, models over 2 GB]
"""
from __future__ import annotations

import os
import re

import onnx

from fastprompt._io import place_alias, remove_if_present, write_text_atomic

LABELS_FILE = "labels.txt"
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


def check_model_name(name: str) -> None:
    """Triton model names become folder names: keep them to portable characters."""
    if not isinstance(name, str):
        raise TypeError(f"triton_name: expected a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"triton_name: {name!r} must be letters, digits, '_', '.' or '-' and not "
                         "start with '.' or '-'")


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


def config_pbtxt(name: str, inputs, outputs, max_batch_size: int) -> str:
    """Text of ``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    def block(specs, label: bool) -> str:
        entries = []
        for tensor, dtype, dims in specs:
            lines = [f'    name: "{tensor}"', f"    data_type: {dtype}",
                     f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
            if label:
                lines.append(f'    label_filename: "{LABELS_FILE}"')
            entries.append("  {\n" + "\n".join(lines) + "\n  }")
        return "[\n" + ",\n".join(entries) + "\n]"

    return (f'name: "{name}"\n'
            'backend: "onnxruntime"\n'
            f"max_batch_size: {max_batch_size}\n"
            f"input {block(inputs, label=False)}\n"
            f"output {block(outputs, label=True)}\n"
            "dynamic_batching { }\n"
            "instance_group [ { count: 1, kind: KIND_AUTO } ]\n")


def write_model_repository(out_dir: str, name: str, model_path: str, data_path: str | None,
                           graph: onnx.GraphProto, class_names: list[str],
                           max_batch_size: int) -> str:
    """Write ``out_dir/<name>/`` for the exported model; returns how the model file was placed
    (``"hardlink"`` or ``"copy"``)."""
    model_dir = os.path.join(out_dir, name)
    version_dir = os.path.join(model_dir, "1")
    os.makedirs(version_dir, exist_ok=True)
    # External weights first, so a reader never sees a model whose data file is missing.
    data_alias = os.path.join(version_dir, os.path.basename(model_path) + ".data")
    if data_path is not None:
        place_alias(data_path, data_alias)
    mode = place_alias(model_path, os.path.join(version_dir, os.path.basename(model_path)))
    if data_path is None:
        remove_if_present(data_alias)  # left over from an earlier export over 2 GB
    write_text_atomic(os.path.join(model_dir, LABELS_FILE), "".join(c + "\n" for c in class_names))
    write_text_atomic(os.path.join(model_dir, "config.pbtxt"),
                      config_pbtxt(name, tensor_specs(graph.input), tensor_specs(graph.output),
                                   max_batch_size))
    return mode
