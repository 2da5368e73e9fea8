"""``export_onnx``: a prompt-tuned classifier as ONNX with its text side baked in (the graph:
``fastprompt.export.graph``), plus its Triton model folder, and ``ExportReport``.

Export verifies itself before anything is put in place: the file is written to a staging folder
next to the target, checked with ``onnx.checker``, run by onnxruntime on random inputs at several
batch sizes and compared with the torch module it came from (``fastprompt.export.verify``); an
fp16 or int8 export is also compared with the float32 one (``fastprompt.export.agreement``).
Only then is it renamed into place.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace

import onnx
import torch
import torch.nn as nn

import fastprompt
from fastprompt._io import remove_if_present, write_text_atomic
from fastprompt.export.agreement import (AGREEMENT_FILE, DEFAULT_MIN_AGREEMENT, AgreementReport,
                                         EvaluationSet, check_min_agreement, head_nodes,
                                         measure_agreement, quantize_int8)
from fastprompt.export.checks import (check_affine, check_class_embeddings, check_class_names,
                                      check_flag,
                                      check_image_model, check_method, check_model_name,
                                      check_opset, check_scale, check_tower_output)
from fastprompt.export.graph import (DATA_FILE, MODEL_FILE, BakedClassifier, bake_classifier,
                                     check_file, io_graph, needs_external_data, plain_fp32_cpu,
                                     preprocess_fields, save_checked, set_metadata, set_producer,
                                     to_fp16, to_onnx)
from fastprompt.export.triton import (TritonSettings, check_not_linked, settings_or_default,
                                      write_model_repository)
from fastprompt.export.verify import ExportVerificationError, Parity, classifier_parity
from fastprompt.serve import CPU, default_providers
from fastprompt.serve.metadata import ModelInfo


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

    def record_parity(self, parity: Parity) -> None:
        """Take the numbers of the parity check against torch; ``verified`` is its verdict."""
        self.provider, self.seed, self.batch_sizes = parity.provider, parity.seed, parity.batch_sizes
        self.tolerance = dict(parity.tolerance)
        self.max_abs_diff_probs = parity.max_abs_diff_probs
        self.max_abs_diff_logits = parity.max_abs_diff_logits
        self.min_cosine_logits = parity.min_cosine_logits
        self.top1_agreement = parity.top1_agreement
        self.verified = parity.passed


def export_onnx(model: nn.Module | None, class_embeddings: torch.Tensor, class_names: list[str],
                out_dir: str | os.PathLike, *, scale: float, model_name: str,
                method: dict | None = None, head_only: bool = False, fp16: bool = False,
                int8: bool = False, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                evaluation: EvaluationSet | None = None, triton: TritonSettings | None = None,
                verify: bool = True, opset: int | None = None, seed: int | None = None,
                affine: tuple[torch.Tensor, torch.Tensor] | None = None,
                text_head: nn.Module | None = None, text_head_weight: float = 1.0
                ) -> ExportReport:
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
        triton: the Triton model folder's name and config (``TritonSettings``: name, batch
            size, GPU or CPU instances and how many, TensorRT, queue delay); None: the defaults
            (``fastprompt_classifier``; GPU instances for fp16, else CPU).
        verify: run onnxruntime against torch before putting the file in place.
        opset: ONNX opset (None: the exporter's default).
        seed: seed of the random verification inputs (None: drawn, and reported).
        affine: ``(A, c)``, E x C and C: an affine map of the raw image features added to the
            logits (DePT's head of the training classes, its weight folded in; ``scale`` then
            carries the similarity's weight too). None: the similarity alone.
        text_head: a module from image features (N x E) to the similarity logits (N x C) that
            replaces the baked class embeddings, the text tower inside the graph (prompts that
            depend on the image: CoCoOp); ``class_embeddings`` then only give the class count and
            feature size. ``text_head_weight`` multiplies its logits (with ``affine``: DePT).

    Returns an ``ExportReport``. Raises ``ExportVerificationError`` if the float32 graph disagrees
    with torch beyond the tolerance and ``AgreementError`` if the reduced model agrees too little
    (both RuntimeErrors, both carrying the numbers in ``report``); either way any earlier export
    in ``out_dir`` is left untouched.
    """
    start = time.perf_counter()
    for name, value in (("head_only", head_only), ("fp16", fp16), ("int8", int8),
                        ("verify", verify)):
        check_flag(name, value)
    if fp16 and int8:
        raise ValueError("fp16, int8: pick one reduced precision")
    if int8 and head_only:
        raise ValueError("int8: a head-only model holds nothing to quantise (the class head "
                         "stays float32); export it in float32")
    min_agreement = check_min_agreement(min_agreement)
    if evaluation is not None and not isinstance(evaluation, EvaluationSet):
        raise TypeError(f"evaluation: expected an EvaluationSet or None, got "
                        f"{type(evaluation).__name__}")
    check_model_name(model_name)
    triton_settings = settings_or_default(triton).for_model(
        "float16" if fp16 else "int8" if int8 else "float32")
    check_opset(opset)
    method = check_method(method)
    scale = check_scale(scale)
    check_class_embeddings(class_embeddings)
    class_names = check_class_names(class_names, class_embeddings.shape[0])
    check_affine(affine, class_embeddings.shape[1], class_embeddings.shape[0])
    if model is None and not head_only:
        raise ValueError("model: None; only a head-only export (head_only=True) needs no model")
    if model is not None:
        check_image_model(model)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")

    embed_dim = class_embeddings.shape[1]
    preprocess = preprocess_fields(model) if model is not None else {}
    info = ModelInfo(class_names=class_names, scale=scale,
                     input_kind="features" if head_only else "image", embed_dim=embed_dim,
                     model_name=model_name, precision="float32", method=method,
                     fastprompt_version=fastprompt.__version__, **preprocess)
    reduced_info = replace(info, precision=triton_settings.precision)
    module = BakedClassifier(None if head_only else plain_fp32_cpu(model.visual),
                             bake_classifier(class_embeddings, scale), affine,
                             text_head, text_head_weight).eval()
    per_item = (embed_dim,) if head_only else (3, *info.image_size)
    if not head_only:
        check_tower_output(module.visual, per_item, embed_dim)
    elif model is not None and getattr(model.visual, "output_dim", embed_dim) != embed_dim:
        raise ValueError(f"class_embeddings: feature size {embed_dim} does not match the image "
                         f"tower's output size {model.visual.output_dim}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir: {out_dir} exists and is not a folder")
    check_not_linked(out_dir, triton_settings.name)  # before any work, nothing written

    proto = to_onnx(module, per_item, info.input_name, opset)
    set_metadata(proto, info)
    set_producer(proto, f"fastprompt classifier: {model_name}, {len(class_names)} classes, "
                        f"{info.input_name} -> logits, probs")
    external = needs_external_data(proto)
    if int8 and external:
        raise ValueError("int8: models over 2 GB (external weights) are not quantised here; "
                         "export them in float32 or fp16")

    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".export-")
    try:
        fp32_dir = os.path.join(staging, "float32")
        os.mkdir(fp32_dir)
        fp32_path = save_checked(proto, os.path.join(fp32_dir, MODEL_FILE), external)
        report = ExportReport(
            path=os.path.join(out_dir, MODEL_FILE),
            triton_model_dir=os.path.join(out_dir, triton_settings.name),
            model_name=model_name, num_classes=len(class_names), embed_dim=embed_dim,
            input_kind=info.input_kind, precision=reduced_info.precision,
            opset=next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            ir_version=proto.ir_version, external_data=external, link_mode="", verified=False,
            size_bytes=_folder_bytes(fp32_dir))
        if verify:
            report.record_parity(classifier_parity(fp32_path, info, module, per_item, seed))
            if not report.verified:
                raise ExportVerificationError(
                    "export: onnxruntime disagrees with torch beyond the tolerance; nothing was "
                    "written\n" + report.summary(), report)
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
        report.link_mode = write_model_repository(
            out_dir, triton_settings, report.path, final_data if external else None,
            io_graph(graph), class_names)
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


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _reduce(proto: onnx.ModelProto, fp32_path: str, out: str, info: ModelInfo, external: bool,
            evaluation: EvaluationSet | None, seed: int, min_agreement: float) -> AgreementReport:
    """The fp16 or int8 model in ``out/model.onnx``, compared with the float32 one; raises
    ``AgreementError`` below ``min_agreement``."""
    reduced = copy.deepcopy(proto)
    set_metadata(reduced, info)
    if info.precision == "float16":
        candidates = {"fp16": save_checked(to_fp16(reduced, large=external),
                                           os.path.join(out, "fp16.onnx"), external)}
        providers = default_providers()  # fp16 is for the GPU: measured there when there is one
    else:
        # Per output channel usually keeps more accuracy; per tensor is sometimes as good and
        # faster. Both are measured and the better one kept.
        source = save_checked(reduced, os.path.join(out, "source.onnx"), False)
        candidates = {}
        for variant, per_channel in (("per-tensor", False), ("per-channel", True)):
            path = os.path.join(out, f"{variant}.onnx")
            quantize_int8(source, path, per_channel=per_channel, exclude=head_nodes(reduced))
            candidates[variant] = check_file(path)
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
