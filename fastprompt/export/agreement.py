"""Reduced-precision exports and how far they agree with the float32 export they came from.

``quantize_int8`` applies onnxruntime's dynamic quantisation to the image tower's weight products
(MatMul/Gemm with a constant weight; the baked class head stays float32), per tensor and per
output channel, and keeps the variant that agrees better. ``measure_agreement`` runs the float32
and the reduced model on the same inputs (the run's own test images when the caller has them,
else seeded random inputs) and reports top-1 agreement, |Δprob|, accuracy when labels are known,
and the speed of both on this machine; ``AgreementReport.check`` refuses an export below the
threshold.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from fastprompt._checks import CheckFailed
from fastprompt.serve import CPU, ImagePreprocessor, cpu_description, create_session
from fastprompt.serve.metadata import ModelInfo

AGREEMENT_FILE = "agreement.json"
DEFAULT_MIN_AGREEMENT = 0.99
# Random verification inputs when the caller has no test images: enough for a 1.6% resolution.
RANDOM_INPUTS = 64
CHUNK = 32
SPEED_BATCH_SIZES = (1, 8)
SPEED_SECONDS = 0.5  # per model and batch size, after one warm-up call


class AgreementError(CheckFailed):
    """The reduced-precision model agrees with the float32 export less than required; ``report``
    has the numbers."""

    def __init__(self, message: str, report: "AgreementReport"):
        super().__init__(message)
        self.report = report


@dataclass
class EvaluationSet:
    """Inputs to compare the exports on: preprocessed arrays (N x 3 x H x W images, or N x D
    features for a head-only model) or image file paths, with their labels when known."""

    inputs: object
    labels: object = None
    source: str = "caller's inputs"

    def __post_init__(self):
        n = len(self.inputs)
        if n == 0:
            raise ValueError("evaluation: no inputs")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (n,):
                raise ValueError(f"evaluation: {len(self.labels)} labels for {n} inputs")


@dataclass
class AgreementReport:
    """The reduced export against the float32 one (written as ``agreement.json``)."""

    precision: str
    variant: str
    inputs: str
    num_inputs: int
    provider: str
    min_agreement: float
    top1_agreement: float | None = None
    max_abs_diff_probs: float | None = None
    mean_abs_diff_probs: float | None = None
    accuracy_float32: float | None = None
    accuracy_reduced: float | None = None
    size_bytes: dict = field(default_factory=dict)
    speed: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.top1_agreement is not None

    @property
    def passed(self) -> bool:
        return not self.measured or self.top1_agreement >= self.min_agreement

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2, allow_nan=False) + "\n"

    def summary(self) -> str:
        if not self.measured:
            return f"{self.precision}: agreement with float32 not measured ({self.note})"
        lines = [f"{self.precision} ({self.variant}) vs float32 on {self.num_inputs} {self.inputs}, "
                 f"{self.provider}: top-1 agreement {self.top1_agreement:.4f} (minimum "
                 f"{self.min_agreement:g}), max |dprob| {self.max_abs_diff_probs:.2e}, mean "
                 f"|dprob| {self.mean_abs_diff_probs:.2e} -> "
                 f"{'passed' if self.passed else 'REFUSED'}"]
        if self.accuracy_float32 is not None:
            lines.append(f"accuracy: float32 {self.accuracy_float32:.4f}, {self.precision} "
                         f"{self.accuracy_reduced:.4f}")
        for row in self.speed:
            lines.append(f"speed at batch {row['batch']}: float32 {row['float32_images_per_s']:.1f} "
                         f"img/s, {self.precision} {row['reduced_images_per_s']:.1f} img/s "
                         f"({row['speedup']:.2f}x)")
        if self.size_bytes:
            lines.append(f"size: float32 {self.size_bytes['float32'] / 2**20:.1f} MiB, "
                         f"{self.precision} {self.size_bytes['reduced'] / 2**20:.1f} MiB")
        return "\n".join(lines)

    def check(self) -> None:
        if not self.passed:
            raise AgreementError(
                f"export: the {self.precision} model agrees with the float32 export on "
                f"{self.top1_agreement:.2%} of top-1 predictions, below --min-agreement "
                f"{self.min_agreement:g}; nothing was written\n{self.summary()}", self)


def check_min_agreement(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"min_agreement: expected a number in [0, 1], got {value!r}")
    return float(value)


def head_nodes(proto: onnx.ModelProto, head: str = "classifier") -> list[str]:
    """Names of the nodes that read the baked class matrix (kept in float everywhere)."""
    return [n.name for n in proto.graph.node if head in n.input]


def quantize_int8(fp32_path: str, out_path: str, *, per_channel: bool, exclude: list[str]) -> None:
    """Dynamic int8 quantisation of the weight products of ``fp32_path`` into ``out_path``."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger for every call
    try:
        quantize_dynamic(fp32_path, out_path, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def _input_chunks(evaluation: EvaluationSet | None, info: ModelInfo, per_item, seed: int):
    """Yield ``(inputs, labels)`` chunks of float32 model input."""
    if evaluation is None:
        rng = np.random.default_rng(seed)
        for start in range(0, RANDOM_INPUTS, CHUNK):
            n = min(CHUNK, RANDOM_INPUTS - start)
            yield rng.standard_normal((n, *per_item), dtype=np.float32), None
        return
    inputs, labels = evaluation.inputs, evaluation.labels
    paths = not isinstance(inputs, np.ndarray) and len(inputs) and isinstance(inputs[0], (str, os.PathLike))
    pre = ImagePreprocessor(info) if paths else None
    for start in range(0, len(inputs), CHUNK):
        chunk = inputs[start:start + CHUNK]
        x = pre(chunk) if pre is not None else np.ascontiguousarray(chunk, dtype=np.float32)
        if x.shape[1:] != tuple(per_item):
            raise ValueError(f"evaluation: inputs of shape {x.shape[1:]}, the model takes "
                             f"{tuple(per_item)}")
        yield x, None if labels is None else labels[start:start + CHUNK]


def _compare(reference, reduced, evaluation, info, per_item, seed) -> dict:
    agree = total = correct_ref = correct_red = 0
    max_diff, sum_diff = 0.0, 0.0
    for x, y in _input_chunks(evaluation, info, per_item, seed):
        p_ref = reference.run(["probs"], {info.input_name: x})[0].astype(np.float64)
        p_red = reduced.run(["probs"], {info.input_name: x})[0].astype(np.float64)
        top_ref, top_red = p_ref.argmax(1), p_red.argmax(1)
        diff = np.abs(p_red - p_ref)
        agree += int((top_ref == top_red).sum())
        total += len(x)
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.mean(axis=1).sum())
        if y is not None:
            correct_ref += int((top_ref == y).sum())
            correct_red += int((top_red == y).sum())
    labelled = evaluation is not None and evaluation.labels is not None
    return {"top1_agreement": agree / total, "max_abs_diff_probs": max_diff,
            "mean_abs_diff_probs": sum_diff / total,
            "accuracy_float32": correct_ref / total if labelled else None,
            "accuracy_reduced": correct_red / total if labelled else None}


def _median_ms(session, name: str, x: np.ndarray) -> float:
    feed = {name: x}
    session.run(["probs"], feed)  # warm-up: allocations, kernel selection
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < SPEED_SECONDS:
        t0 = time.perf_counter()
        session.run(["probs"], feed)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _speed(reference, reduced, info, per_item, seed) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for b in SPEED_BATCH_SIZES:
        x = rng.standard_normal((b, *per_item), dtype=np.float32)
        ms_ref, ms_red = _median_ms(reference, info.input_name, x), _median_ms(reduced, info.input_name, x)
        rows.append({"batch": b, "float32_ms": ms_ref, "reduced_ms": ms_red,
                     "float32_images_per_s": 1e3 * b / ms_ref,
                     "reduced_images_per_s": 1e3 * b / ms_red, "speedup": ms_ref / ms_red})
    return rows


def measure_agreement(fp32_path: str, reduced_paths: dict[str, str], info: ModelInfo, *,
                      providers, evaluation: EvaluationSet | None, seed: int,
                      min_agreement: float) -> tuple[str, AgreementReport]:
    """Compare each candidate in ``reduced_paths`` (variant name -> file) with the float32 model;
    returns the best candidate's name and its report (speed measured for that one only).

    ``providers``: where both run (int8: the CPU; fp16: the GPU when there is one). A provider
    that cannot load the reduced graph gives a report with ``note`` set and no numbers.
    """
    per_item = (info.embed_dim,) if info.input_kind == "features" else (3, *info.image_size)
    source = (f"random inputs (seed {seed})" if evaluation is None else evaluation.source)
    reference = create_session(fp32_path, _as(info, "float32"), providers)
    provider = reference.get_providers()[0]
    base = dict(precision=info.precision, inputs=source, provider=provider,
                num_inputs=RANDOM_INPUTS if evaluation is None else len(evaluation.inputs),
                min_agreement=min_agreement, machine=cpu_description() if provider == CPU else {})
    results = {}
    for variant, path in reduced_paths.items():
        try:
            session = create_session(path, info, providers)
        except ValueError as e:
            return variant, AgreementReport(variant=variant, note=f"{provider} cannot run the "
                                            f"{info.precision} graph ({e})", **base)
        results[variant] = (session, _compare(reference, session, evaluation, info, per_item, seed))
    # Best agreement first, then the smaller probability error.
    best = max(results, key=lambda v: (results[v][1]["top1_agreement"],
                                       -results[v][1]["mean_abs_diff_probs"]))
    session, numbers = results[best]
    report = AgreementReport(variant=best, **base, **numbers,
                             size_bytes={"float32": os.path.getsize(fp32_path),
                                         "reduced": os.path.getsize(reduced_paths[best])},
                             candidates=[{"variant": v, **r} for v, (_, r) in results.items()])
    report.speed = _speed(reference, session, info, per_item, seed)
    return best, report


def _as(info: ModelInfo, precision: str) -> ModelInfo:
    return replace(info, precision=precision)
