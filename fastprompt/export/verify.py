"""Parity of an exported graph with the torch module it came from: onnxruntime and torch run on
the same seeded random inputs, at several batch sizes, and must agree within a tolerance before
the file is put in place. Checked on the CPU, the strict reference (the CUDA provider uses TF32
by default)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastprompt._checks import CheckFailed
from fastprompt.serve import CPU, create_session
from fastprompt.serve.metadata import ModelInfo

# Batch 1 alone would not reveal a graph whose batch dimension was fixed while exporting.
VERIFY_BATCH_SIZES = (1, 3)
# fp32 gates: probabilities absolutely; logits relative to the scale (i.e. in cosine units).
FP32_PROBS_ATOL = 1e-4
FP32_COSINE_ATOL = 1e-4
# Image encoder (no classifier head) parity: features relative to their largest magnitude.
FEATURES_RTOL = 1e-4


class ExportVerificationError(CheckFailed):
    """onnxruntime's output disagrees with torch beyond the tolerance; ``report`` has the numbers
    (an ``ExportReport``; None where there is none: the ensemble's image encoder)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class Parity:
    """A classifier graph against torch: the provider, seed and batch sizes it ran at, the
    tolerance, the differences, and whether they are within it (``passed``)."""

    provider: str
    seed: int
    batch_sizes: tuple[int, ...]
    tolerance: dict[str, float] = field(default_factory=dict)
    max_abs_diff_probs: float = 0.0
    max_abs_diff_logits: float = 0.0
    min_cosine_logits: float = 1.0
    top1_agreement: float = 1.0
    passed: bool = False


def classifier_parity(path: str, info: ModelInfo, module: nn.Module, per_item: tuple[int, ...],
                      seed: int) -> Parity:
    """Run the float32 classifier at ``path`` with onnxruntime on random inputs (batch x
    ``per_item``, seeded, at ``VERIFY_BATCH_SIZES``) and compare both outputs with ``module``'s."""
    session = create_session(path, info, [CPU])
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

    logits_atol = FP32_COSINE_ATOL * info.scale
    parity = Parity(
        provider=session.get_providers()[0], seed=seed, batch_sizes=VERIFY_BATCH_SIZES,
        tolerance={"probs atol": FP32_PROBS_ATOL, "logits atol": logits_atol},
        max_abs_diff_probs=(got_probs - ref_probs).abs().max().item(),
        max_abs_diff_logits=(got_logits - ref_logits).abs().max().item(),
        min_cosine_logits=F.cosine_similarity(got_logits, ref_logits, dim=1).min().item(),
        top1_agreement=(got_logits.argmax(1) == ref_logits.argmax(1)).double().mean().item())
    parity.passed = (parity.max_abs_diff_probs <= FP32_PROBS_ATOL
                     and parity.max_abs_diff_logits <= logits_atol)
    return parity


def encoder_parity(path: str, module: nn.Module, per_item: tuple[int, ...], seed: int, *,
                   input_name: str, output_name: str) -> float:
    """The largest difference between the image encoder graph at ``path`` and ``module`` on 3
    seeded random images; raises ``ExportVerificationError`` above ``FEATURES_RTOL`` of the
    features' largest magnitude."""
    session = ort.InferenceSession(path, providers=[CPU])
    x = torch.randn(3, *per_item, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = module(x).double().numpy()
    got = session.run([output_name], {input_name: x.numpy()})[0].astype(np.float64)
    diff = float(np.abs(got - ref).max())
    if diff > FEATURES_RTOL * float(np.abs(ref).max()):
        raise ExportVerificationError(
            f"export: the image encoder's onnxruntime features differ from torch by {diff:.2e} "
            f"(more than {FEATURES_RTOL:g} of their largest magnitude); nothing was written")
    return diff
