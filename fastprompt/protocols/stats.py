"""The statistics of the protocols' tables: mean ± standard deviation over seeds, and CoCoOp's
harmonic mean of base and new accuracy."""
from __future__ import annotations

import math


def harmonic_mean(base: float, new: float) -> float:
    """H = 2·B·N / (B + N), the base-to-new summary (0 when both are 0; NaN if either is)."""
    if math.isnan(base) or math.isnan(new):
        return float("nan")
    return 2.0 * base * new / (base + new) if base + new > 0 else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value), NaNs and Nones left
    out (NaN, NaN for no value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_number(x: float) -> str:
    """A rate or shot count as tables and folder names write it (``0.25``, ``1e-05``)."""
    return f"{x:g}"
