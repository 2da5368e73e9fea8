"""ONNX export of a prompt-tuned classifier with its text side baked in.

After training the text side is fixed: the class embeddings (the text encoder run once over the
learned prompts) are normalised, multiplied by the logit scale and stored in the graph as one
constant D x C matrix. The graph is then the image tower, an L2 normalisation and a matmul:
``logits = normalize(visual(image)) @ (s · T̂ᵀ)``, ``probs = softmax(logits)``. No text encoder,
no prompt learner, no fused kernels.

Export verifies itself before anything is put in place: the file is written to a staging folder
next to the target, checked with ``onnx.checker``, run by onnxruntime on random inputs at several
batch sizes and compared with the torch module it came from; only then is it renamed into place.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastprompt
from fastprompt._validation import check_tensor
from fastprompt._io import remove_if_present, write_text_atomic
from fastprompt.export import triton
from fastprompt.export.agreement import (AGREEMENT_FILE, DEFAULT_MIN_AGREEMENT, AgreementReport,
                                         EvaluationSet, check_min_agreement, head_nodes,
                                         measure_agreement, quantize_int8)
from fastprompt.serve.metadata import PREFIX, ModelInfo
from fastprompt.serve import CPU, create_session, default_providers

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
# Protobuf cannot serialise a message over 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Batch 1 alone would not reveal a graph whose batch dimension was fixed while exporting.
VERIFY_BATCH_SIZES = (1, 3)
# fp32 gates: probabilities absolutely; logits relative to the scale (i.e. in cosine units).
FP32_PROBS_ATOL = 1e-4
FP32_COSINE_ATOL = 1e-4
# Kept in fp32 by the fp16 conversion: reductions and normalisations lose too much in fp16.
FP16_FP32_OPS = ("LayerNormalization", "Softmax", "ReduceL2")


class ExportVerificationError(RuntimeError):
    """onnxruntime's output disagrees with torch beyond the tolerance; ``report`` has the numbers
    (None where there is no ``ExportReport``: the ensemble's image encoder)."""

    def __init__(self, message: str, report: "ExportReport | None" = None):
        super().__init__(message)
        self.report = report


class BakedClassifier(nn.Module):
    """``input -> (logits, probs)`` with a constant head ``classifier`` (D x C, already scaled).

    ``visual`` is the image tower; None makes a head-only graph whose input is image features.
    """

    def __init__(self, visual: nn.Module | None, classifier: torch.Tensor):
        super().__init__()
        self.visual = visual
        self.register_buffer("classifier", classifier)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = inputs if self.visual is None else self.visual(inputs)
        if isinstance(features, (tuple, list)):  # towers built with output_tokens=True
            features = features[0]
        logits = F.normalize(features, dim=-1) @ self.classifier
        return logits, logits.softmax(dim=-1)


def bake_classifier(class_embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · normalize(class_embeddings)ᵀ`` as float32 D x C, computed in float64."""
    t = class_embeddings.detach().to("cpu", torch.float64)
    return (scale * F.normalize(t, dim=-1)).T.contiguous().float()


@dataclass
class ExportReport:
    """What ``export_onnx`` wrote and how well onnxruntime matched torch."""

    path: str
    triton_model_dir: str
    model_name: str
    num_classes: int
    embed_dim: int
    input_kind: str
    precision: str
    opset: int
    ir_version: int
    size_bytes: int
    external_data: bool
    link_mode: str
    verified: bool
    verify_note: str = ""
    provider: str | None = None
    seed: int | None = None
    batch_sizes: tuple[int, ...] = ()
    tolerance: dict[str, float] = field(default_factory=dict)
    max_abs_diff_probs: float | None = None
    max_abs_diff_logits: float | None = None
    min_cosine_logits: float | None = None
    top1_agreement: float | None = None
    agreement: AgreementReport | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"exported {self.path} ({self.size_bytes / 2**20:.1f} MiB, "
                 f"{'external data, ' if self.external_data else ''}{self.precision}, "
                 f"input {self.input_kind}, {self.num_classes} classes, opset {self.opset}, "
                 f"IR {self.ir_version}) in {self.seconds:.1f} s",
                 f"triton model repository: {self.triton_model_dir} (model file: {self.link_mode})"]
        if self.max_abs_diff_probs is not None:
            tol = ", ".join(f"{k} {v:g}" for k, v in self.tolerance.items())
            lines.append(f"parity vs torch on {self.provider}, batch sizes {list(self.batch_sizes)}, "
                         f"seed {self.seed}: max |dprobs| {self.max_abs_diff_probs:.2e}, "
                         f"max |dlogits| {self.max_abs_diff_logits:.2e}, min cosine "
                         f"{self.min_cosine_logits:.6f}, top-1 agreement {self.top1_agreement:.3f} "
                         f"(tolerance: {tol}) -> {'passed' if self.verified else 'FAILED'}")
        if self.verify_note:
            lines.append(f"verification: {self.verify_note}")
        if self.agreement is not None:
            lines.append(self.agreement.summary())
        return "\n".join(lines)


def export_onnx(model: nn.Module | None, class_embeddings: torch.Tensor, class_names: list[str],
                out_dir: str | os.PathLike, *, scale: float, model_name: str,
                method: dict | None = None, head_only: bool = False, fp16: bool = False,
                int8: bool = False, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                evaluation: EvaluationSet | None = None,
                triton_name: str = "fastprompt_classifier", triton_max_batch_size: int = 64,
                triton_gpu: bool | None = None, triton_instances: int | None = None,
                triton_tensorrt: bool = False,
                triton_queue_delay_us: int = triton.DEFAULT_QUEUE_DELAY_US,
                verify: bool = True, opset: int | None = None,
                seed: int | None = None) -> ExportReport:
    """Export ``model``'s image tower with a baked classifier to ``out_dir/model.onnx``.

    Args:
        model: the open_clip model (its ``visual`` tower and preprocess config are used). May be
            None with ``head_only=True`` (the graph then carries no preprocessing metadata).
        class_embeddings: C x E text features from the learned prompts, not normalised.
        class_names: C names, stored in the metadata and the Triton labels file.
        out_dir: created if missing; becomes the export folder and a Triton model repository.
        scale: the logit multiplier ``exp(logit_scale)`` (not its log).
        model_name: the open_clip model name, recorded in the metadata.
        method: the training method and its settings (JSON-serialisable), recorded.
        head_only: export ``image_features`` (N x E) -> logits, probs instead of images.
        fp16: fp16 weights and compute (inputs and outputs stay float32) for GPU serving.
        int8: dynamic int8 quantisation of the image tower's weight products (CPU serving); the
            class head stays float32.
        min_agreement: an fp16 or int8 export whose top-1 agreement with the float32 export falls
            below this is refused (``AgreementError``, nothing written).
        evaluation: inputs for that comparison (``EvaluationSet``: the run's test images or
            features, with labels for accuracy); None: seeded random inputs.
        triton_name: folder and model name in the Triton repository.
        triton_max_batch_size: ``max_batch_size`` of the Triton config.
        triton_gpu: KIND_GPU instances (None: when ``fp16``); else KIND_CPU.
        triton_instances: instances per device (None: 2 per GPU, 1 on the CPU).
        triton_tensorrt: ask Triton's onnxruntime backend for its TensorRT accelerator (GPU).
        triton_queue_delay_us: how long Triton may hold a request to form a larger batch.
        verify: run onnxruntime against torch before putting the file in place.
        opset: ONNX opset (None: the exporter's default).
        seed: seed of the random verification inputs (None: drawn, and reported).

    Returns an ``ExportReport``. Raises ``ExportVerificationError`` if the float32 graph disagrees
    with torch beyond the tolerance and ``AgreementError`` (a subclass) if the reduced model
    agrees too little; either way any earlier export in ``out_dir`` is left untouched.
    """
    start = time.perf_counter()
    for name, value in (("head_only", head_only), ("fp16", fp16), ("int8", int8),
                        ("verify", verify), ("triton_tensorrt", triton_tensorrt)):
        _check_flag(name, value)
    if fp16 and int8:
        raise ValueError("fp16, int8: pick one reduced precision")
    if int8 and head_only:
        raise ValueError("int8: a head-only model holds nothing to quantise (the class head "
                         "stays float32); export it in float32")
    min_agreement = check_min_agreement(min_agreement)
    if evaluation is not None and not isinstance(evaluation, EvaluationSet):
        raise TypeError(f"evaluation: expected an EvaluationSet or None, got "
                        f"{type(evaluation).__name__}")
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name: expected a non-empty str, got {model_name!r}")
    triton_settings = triton.TritonSettings.create(
        name=triton_name, max_batch_size=triton_max_batch_size,
        gpu=fp16 if triton_gpu is None else triton_gpu, instances=triton_instances,
        tensorrt=triton_tensorrt, queue_delay_us=triton_queue_delay_us,
        precision="float16" if fp16 else "int8" if int8 else "float32")
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not 18 <= opset <= newest):
        raise ValueError(f"opset: expected an int from 18 (the dynamo exporter's minimum) to "
                         f"{newest} (the newest this onnx knows) or None, got {opset!r}")
    method = _check_method(method)
    scale = _check_scale(scale)
    _check_class_embeddings(class_embeddings)
    class_names = _check_class_names(class_names, class_embeddings.shape[0])
    if model is None and not head_only:
        raise ValueError("model: None; only a head-only export (head_only=True) needs no model")
    if model is not None and not isinstance(getattr(model, "visual", None), nn.Module):
        raise TypeError(f"model: expected an open_clip model with a `visual` image tower, got "
                        f"{type(model).__name__}")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")

    embed_dim = class_embeddings.shape[1]
    preprocess = _preprocess_fields(model) if model is not None else {}
    info = ModelInfo(class_names=class_names, scale=scale,
                     input_kind="features" if head_only else "image", embed_dim=embed_dim,
                     model_name=model_name, precision="float32", method=method,
                     fastprompt_version=fastprompt.__version__, **preprocess)
    reduced_info = replace(info, precision=triton_settings.precision)
    module = BakedClassifier(None if head_only else _plain_fp32_cpu(model.visual),
                             bake_classifier(class_embeddings, scale)).eval()
    per_item = (embed_dim,) if head_only else (3, *info.image_size)
    if not head_only:
        _check_tower_output(module, per_item, embed_dim)
    elif model is not None and getattr(model.visual, "output_dim", embed_dim) != embed_dim:
        raise ValueError(f"class_embeddings: feature size {embed_dim} does not match the image "
                         f"tower's output size {model.visual.output_dim}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir} exists and is not a folder")
    triton.check_not_linked(out_dir, triton_settings.name)  # before any work, nothing written

    proto = _to_onnx(module, per_item, info.input_name, opset)
    _set_metadata(proto, info)
    proto.producer_name, proto.producer_version = "fastprompt", fastprompt.__version__
    proto.doc_string = (f"fastprompt classifier: {model_name}, {len(class_names)} classes, "
                        f"{info.input_name} -> logits, probs")
    external = sum(t.ByteSize() for t in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if int8 and external:
        raise ValueError("int8: models over 2 GB (external weights) are not quantised here; "
                         "export them in float32 or fp16")

    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".export-")
    try:
        fp32_dir = os.path.join(staging, "float32")
        os.mkdir(fp32_dir)
        fp32_path = _save(proto, os.path.join(fp32_dir, MODEL_FILE), external)
        report = ExportReport(
            path=os.path.join(out_dir, MODEL_FILE), triton_model_dir=os.path.join(out_dir, triton_name),
            model_name=model_name, num_classes=len(class_names), embed_dim=embed_dim,
            input_kind=info.input_kind, precision=reduced_info.precision,
            opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            ir_version=proto.ir_version, external_data=external, link_mode="", verified=False,
            size_bytes=_folder_bytes(fp32_dir))
        if verify:
            _verify(fp32_path, info, module, per_item, seed, report)
        else:
            report.verify_note = "skipped (verify=False)"

        if fp16 or int8:
            final_dir = os.path.join(staging, "reduced")
            os.mkdir(final_dir)
            report.agreement = _reduce(proto, fp32_path, final_dir, reduced_info, external,
                                       evaluation, seed, min_agreement)
            report.size_bytes = _folder_bytes(final_dir)
            graph = onnx.load(os.path.join(final_dir, MODEL_FILE), load_external_data=False).graph
        else:
            final_dir, graph = fp32_dir, proto.graph

        # Into place: the data file before the model that points at it.
        final_data = os.path.join(out_dir, DATA_FILE)
        if external:
            os.replace(os.path.join(final_dir, DATA_FILE), final_data)
        os.replace(os.path.join(final_dir, MODEL_FILE), report.path)
        if not external:
            remove_if_present(final_data)  # left over from an earlier export over 2 GB
        agreement_path = os.path.join(out_dir, AGREEMENT_FILE)
        if report.agreement is not None:
            write_text_atomic(agreement_path, report.agreement.to_json())
        else:
            remove_if_present(agreement_path)  # an earlier reduced export's report
        io_graph = onnx.helper.make_graph([], "io", _graph_inputs(graph), list(graph.output))
        report.link_mode = triton.write_model_repository(
            out_dir, triton_settings, report.path, final_data if external else None, io_graph,
            class_names)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # leave no empty folder behind a refused export
            try:
                os.rmdir(out_dir)
            except OSError:
                pass
        raise
    shutil.rmtree(staging, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return report


def _set_metadata(proto: onnx.ModelProto, info: ModelInfo) -> None:
    """Set fastprompt's ``metadata_props`` (replacing ours, keeping any the exporter wrote)."""
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in kept + list(info.to_props().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _save(proto: onnx.ModelProto, path: str, external: bool) -> str:
    """Write and check ``proto``; weights in ``DATA_FILE`` beside it when ``external``."""
    if external:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, path)
    return _check(path)


def _check(path: str) -> str:
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:  # the checker's own exception types
        raise RuntimeError(f"export: onnx.checker rejects the exported graph: {e}") from e
    return path


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _reduce(proto: onnx.ModelProto, fp32_path: str, out: str, info: ModelInfo, external: bool,
            evaluation: EvaluationSet | None, seed: int, min_agreement: float) -> AgreementReport:
    """The fp16 or int8 model in ``out/model.onnx``, compared with the float32 one; raises
    ``AgreementError`` below ``min_agreement``."""
    reduced = copy.deepcopy(proto)
    _set_metadata(reduced, info)
    if info.precision == "float16":
        candidates = {"fp16": _save(_to_fp16(reduced, large=external),
                                    os.path.join(out, "fp16.onnx"), external)}
        providers = default_providers()  # fp16 is for the GPU: measured there when there is one
    else:
        # Per output channel usually keeps more accuracy; per tensor is sometimes as good and
        # faster. Both are measured and the better one kept.
        source = _save(reduced, os.path.join(out, "source.onnx"), False)
        candidates = {}
        for variant, per_channel in (("per-tensor", False), ("per-channel", True)):
            path = os.path.join(out, f"{variant}.onnx")
            quantize_int8(source, path, per_channel=per_channel, exclude=head_nodes(reduced))
            candidates[variant] = _check(path)
        os.remove(source)
        providers = [CPU]  # onnxruntime's dynamic-quantisation kernels are CPU kernels
    best, report = measure_agreement(fp32_path, candidates, info, providers=providers,
                                     evaluation=evaluation, seed=seed, min_agreement=min_agreement)
    if not report.measured:
        warnings.warn(f"export: {report.summary()}", stacklevel=3)
    report.check()
    os.replace(candidates[best], os.path.join(out, MODEL_FILE))
    for path in candidates.values():
        remove_if_present(path)
    return report


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale: expected a float or a one-element tensor, got shape "
                             f"{tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be finite and > 0 (the multiplier exp(logit_scale), not "
                         f"its log), got {scale}")
    return float(scale)


def _check_method(method) -> dict:
    if method is None:
        return {}
    if not isinstance(method, dict):
        raise TypeError(f"method: expected a dict of settings or None, got {type(method).__name__}")
    try:
        json.dumps(method, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"method: settings must be JSON-serialisable ({e})") from None
    return method


def _check_class_embeddings(class_embeddings) -> None:
    check_tensor("class_embeddings", class_embeddings, ndim=2, floating=True)
    c, e = class_embeddings.shape
    if c == 0 or e == 0:
        raise ValueError(f"class_embeddings: empty (shape {tuple(class_embeddings.shape)})")
    t = class_embeddings.detach()
    if not torch.isfinite(t).all():
        raise ValueError("class_embeddings: contains NaN or infinite values")
    if not (t != 0).any(dim=1).all():
        raise ValueError("class_embeddings: a row has zero norm and cannot be normalised")


def _check_class_names(class_names, num_classes: int) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, (list, tuple)):
        raise TypeError(f"class_names: expected a list of str, got {type(class_names).__name__}")
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names: {len(names)} names for {num_classes} class_embeddings rows")
    seen = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names: entry {i} ({name!r}) is not a non-empty str")
        if "\n" in name or "\r" in name:
            raise ValueError(f"class_names: entry {i} ({name!r}) contains a line break (the "
                             "labels file holds one name per line)")
        if name in seen:
            raise ValueError(f"class_names: {name!r} appears twice")
        seen.add(name)
    return names


def _check_tower_output(module: BakedClassifier, per_item: tuple[int, ...], embed_dim: int) -> None:
    with torch.no_grad():
        features = module.visual(torch.zeros(1, *per_item))
    if isinstance(features, (tuple, list)):
        features = features[0]
    if features.dim() != 2 or features.shape[1] != embed_dim:
        raise ValueError(f"class_embeddings: feature size {embed_dim} does not match the image "
                         f"tower's output shape {tuple(features.shape)}")


# ---------------------------------------------------------------------------------------------
# Building, converting and checking the graph


def _preprocess_fields(model: nn.Module) -> dict:
    import open_clip
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return {"image_size": tuple(int(s) for s in size), "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"]), "interpolation": cfg.get("interpolation", "bicubic"),
            "resize_mode": cfg.get("resize_mode", "shortest"), "fill_color": cfg.get("fill_color", 0)}


def _plain_fp32_cpu(visual: nn.Module) -> nn.Module:
    """The tower as float32 on the CPU in eval mode; copied only when the caller's differs, so
    exporting never changes the caller's model."""
    params = list(visual.parameters()) + list(visual.buffers())
    if visual.training or any(p.device.type != "cpu" or
                              (p.is_floating_point() and p.dtype != torch.float32) for p in params):
        visual = copy.deepcopy(visual).to("cpu", torch.float32).eval()
    return visual


def _to_onnx(module: nn.Module, per_item: tuple[int, ...], input_name: str,
             opset: int | None, output_names=("logits", "probs")) -> onnx.ModelProto:
    # An example batch of 2 with a named dimension: with batch 1 the exporter specialises the
    # batch to 1 and the graph fails at any other size.
    example = torch.randn(2, *per_item)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example,), None, input_names=[input_name], output_names=list(output_names),
            dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    return program.model_proto


def _to_fp16(proto: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel
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


def _graph_inputs(graph: onnx.GraphProto) -> list:
    initializers = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in initializers]


def _verify(path: str, info: ModelInfo, module: BakedClassifier, per_item: tuple[int, ...],
            seed: int, report: ExportReport) -> None:
    """Run the float32 graph with onnxruntime on random inputs and compare with ``module``; fill
    ``report``, raise ``ExportVerificationError`` past the gate. Checked on the CPU, the strict
    reference (the CUDA provider uses TF32 by default)."""
    session = create_session(path, info, [CPU])
    report.provider = session.get_providers()[0]
    generator = torch.Generator().manual_seed(seed)
    ref_logits, ref_probs, got_logits, got_probs = [], [], [], []
    for b in VERIFY_BATCH_SIZES:
        x = torch.randn(b, *per_item, generator=generator)
        with torch.no_grad():
            logits, probs = module(x)
        out = session.run(["logits", "probs"], {info.input_name: x.numpy()})
        for dst, value in zip((ref_logits, ref_probs, got_logits, got_probs),
                              (logits, probs, *map(torch.from_numpy, out))):
            dst.append(value.double())
    ref_logits, ref_probs = torch.cat(ref_logits), torch.cat(ref_probs)
    got_logits, got_probs = torch.cat(got_logits), torch.cat(got_probs)

    report.seed, report.batch_sizes = seed, VERIFY_BATCH_SIZES
    report.max_abs_diff_probs = (got_probs - ref_probs).abs().max().item()
    report.max_abs_diff_logits = (got_logits - ref_logits).abs().max().item()
    report.min_cosine_logits = F.cosine_similarity(got_logits, ref_logits, dim=1).min().item()
    report.top1_agreement = (got_logits.argmax(1) == ref_logits.argmax(1)).double().mean().item()
    logits_atol = FP32_COSINE_ATOL * info.scale
    report.tolerance = {"probs atol": FP32_PROBS_ATOL, "logits atol": logits_atol}
    report.verified = (report.max_abs_diff_probs <= FP32_PROBS_ATOL
                       and report.max_abs_diff_logits <= logits_atol)
    if not report.verified:
        raise ExportVerificationError(
            "export: onnxruntime disagrees with torch beyond the tolerance; nothing was written\n"
            + report.summary(), report)
