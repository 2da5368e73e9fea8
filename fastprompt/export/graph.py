"""The exported graph: the torch module with the text side baked in, its ONNX proto, the fp16
conversion, fastprompt's metadata, and writing and checking the file.

After training the text side is fixed: the class embeddings (the text encoder run once over the
learned prompts) are normalised, multiplied by the logit scale and stored in the graph as one
constant D x C matrix. The graph is then the image tower, an L2 normalisation and a matmul:
``logits = normalize(visual(image)) @ (s · T̂ᵀ)``, ``probs = softmax(logits)``. No text encoder,
no prompt learner, no fused kernels.
"""
from __future__ import annotations

import copy

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

import fastprompt
from fastprompt.serve.metadata import PREFIX, ModelInfo

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
# Protobuf cannot serialise a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Kept in fp32 by the fp16 conversion: reductions and normalisations lose too much in fp16.
FP16_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceL2")


class BakedClassifier(nn.Module):
    """``input -> (logits, probs)`` with a constant head ``classifier`` (D x C, already scaled)
    and, with ``affine`` ``(A, c)`` (D x C, C), an affine map of the raw features added to the
    logits (DePT's head of the training classes): ``normalize(f) @ classifier + f @ A + c``.
    A ``text_head`` module (image features -> similarity logits, the text tower inside: CoCoOp)
    replaces ``normalize(f) @ classifier``, weighted by ``text_head_weight``.

    ``visual`` is the image tower; None makes a head-only graph whose input is image features.
    """

    def __init__(self, visual: nn.Module | None, classifier: torch.Tensor,
                 affine: tuple[torch.Tensor, torch.Tensor] | None = None,
                 text_head: nn.Module | None = None, text_head_weight: float = 1.0):
        super().__init__()
        self.visual = visual
        self.text_head, self.text_head_weight = text_head, float(text_head_weight)
        self.register_buffer("classifier", classifier)
        self.affine = affine is not None
        if affine is not None:
            self.register_buffer("affine_weight", affine[0].detach().float().cpu().contiguous())
            self.register_buffer("affine_bias", affine[1].detach().float().cpu().contiguous())

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = inputs if self.visual is None else self.visual(inputs)
        if isinstance(features, (tuple, list)):  # towers built with output_tokens=True
            features = features[0]
        if self.text_head is not None:
            logits = self.text_head(features)
            if self.text_head_weight != 1.0:
                logits = self.text_head_weight * logits
        else:
            logits = F.normalize(features, dim=-1) @ self.classifier
        if self.affine:
            logits = logits + features @ self.affine_weight + self.affine_bias
        return logits, logits.softmax(dim=-1)


def bake_classifier(class_embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · normalize(class_embeddings)ᵀ`` as float32 D x C, computed in float64."""
    t = class_embeddings.detach().to("cpu", torch.float64)
    return (scale * F.normalize(t, dim=-1)).T.contiguous().float()


def preprocess_fields(model: nn.Module) -> dict:
    """The ``ModelInfo`` preprocessing fields of an open_clip model (its preprocess config)."""
    # Here, not at the top: open_clip takes seconds to import, and a head-only export of a
    # model-less classifier (model None) never gets here.
    import open_clip
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return {"image_size": tuple(int(s) for s in size), "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]), "interpolation": cfg.get("interpolation", "bicubic"),
            "resize_mode": cfg.get("resize_mode", "shortest"), "fill_color": cfg.get("fill_color", 0)}


def plain_fp32_cpu(visual: nn.Module) -> nn.Module:
    """The tower as float32 on the CPU in eval mode; copied only when the caller's differs, so
    exporting never changes the caller's model."""
    params = list(visual.parameters()) + list(visual.buffers())
    if visual.training or any(p.device.type != "cpu" or
                              (p.is_floating_point() and p.dtype != torch.float32) for p in params):
        visual = copy.deepcopy(visual).to("cpu", torch.float32).eval()
    return visual


def to_onnx(module: nn.Module, per_item: tuple[int, ...], input_name: str,
            opset: int | None, output_names=("logits", "probs")) -> onnx.ModelProto:
    """``module`` (one input, batch x ``per_item``) as an ONNX proto with a dynamic batch."""
    # An example batch of 2 with a named dimension: with batch 1 the exporter specialises the
    # batch to 1 and the graph fails at any other size.
    example = torch.randn(2, *per_item)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example,), None, input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    return program.model_proto


def set_producer(proto: onnx.ModelProto, doc_string: str) -> None:
    """Name fastprompt (and its version) as the producer, with a one-line description."""
    proto.producer_name, proto.producer_version = "fastprompt", fastprompt.__version__
    proto.doc_string = doc_string


def to_fp16(proto: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    """fp16 weights and compute, float32 inputs and outputs; the class head and
    ``FP16_FP32_OPS`` stay float32. ``large``: the model has external data (no shape inference)."""
    # The head (normalised features times the scaled class matrix) stays fp32: logits reach the
    # scale (~100), where fp16 spacing is 0.06 and would show directly in the probabilities.
    head = [n.name for n in proto.graph.node if "classifier" in n.input]
    converted = convert_float_to_float16(
        proto, keep_io_types=True, disable_shape_infer=large,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(FP16_FP32_OPS), node_block_list=head)
    # The converter appends its input casts at the end of the node list and leaves value_info
    # entries with their old element types; the checker rejects both.
    OnnxModel.graph_topological_sort(converted.graph, is_deterministic=True)
    del converted.graph.value_info[:]
    return converted


def set_metadata(proto: onnx.ModelProto, info: ModelInfo) -> None:
    """Set fastprompt's ``metadata_props`` (replacing ours, keeping any the exporter wrote)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in kept + list(info.to_props().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def needs_external_data(proto: onnx.ModelProto) -> bool:
    """Whether the weights must go to ``DATA_FILE`` (over ``EXTERNAL_DATA_THRESHOLD``)."""
    return sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD


def save_checked(proto: onnx.ModelProto, path: str, external: bool) -> str:
    """Write ``proto`` to ``path`` and check the file; weights in ``DATA_FILE`` beside it when
    ``external``. Returns ``path``."""
    if external:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, path)
    return check_file(path)


def check_file(path: str) -> str:
    """``onnx.checker`` on the file at ``path`` (full check); RuntimeError if it rejects it."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:  # the checker's own exception types
        raise RuntimeError(f"export: onnx.checker rejects the exported graph: {e}") from e
    return path


def graph_inputs(graph: onnx.GraphProto) -> list:
    """The graph's real inputs (initializers listed as inputs left out)."""
    initializers = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in initializers]


def io_graph(graph: onnx.GraphProto) -> onnx.GraphProto:
    """A node-less graph with ``graph``'s inputs and outputs: all the Triton config needs."""
    return onnx.helper.make_graph([], "io", graph_inputs(graph), list(graph.output))
