"""Input checks shared by every backend and by the reference.

Each public op validates here once, so every backend raises the same ``ValueError``/``TypeError``
naming the offending argument. Shape, dtype and device checks are free and always run. Value
checks (finiteness, index ranges) need the data: at most one host synchronisation per call (one
batched ``.tolist()``), and none at all where they cannot or need not run: while
``torch.compile`` traces, while a CUDA graph is being captured, on meta or fake tensors, or when
switched off (``set_validation(False)`` or ``FASTPROMPT_VALIDATION=0``). Unchecked bad values
never fault: the kernels clamp every index they load (docs/kernels.md says what they give).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

_enabled: bool | None = None  # None: from FASTPROMPT_VALIDATION


def set_validation(enabled: bool) -> None:
    """Turn the ops' value checks (finite features, label and index ranges, soft-label rows) on
    or off for this process; overrides ``FASTPROMPT_VALIDATION``. Shape, dtype and device
    checks always run."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _enabled = enabled


def validation_enabled() -> bool:
    """Whether value checks run: ``set_validation``'s setting, else ``FASTPROMPT_VALIDATION``
    (``0``, ``false``, ``off`` or ``no`` turn them off; on by default)."""
    if _enabled is not None:
        return _enabled
    return os.environ.get("FASTPROMPT_VALIDATION", "1").strip().lower() not in ("0", "false", "off", "no")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def value_checks_wanted(x: torch.Tensor) -> bool:
    """Whether to run value checks on inputs like ``x``: enabled, eager, not capturing a CUDA
    graph, and real data (not meta or fake tensors)."""
    if not validation_enabled() or _is_compiling():
        return False
    if x.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(x):
        return False
    return not (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_tensor(name: str, x, *, ndim: int | None = None, floating: bool = False,
                 integer: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}")
    if integer and x.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor, got {x.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name}: on {x.device}, but {ref_name} is on {ref.device}")


def as_scale_tensor(scale, device: torch.device) -> torch.Tensor:
    """The logit multiplier as a 0-d tensor (keeps its autograd graph): float32, or float64 when
    given float64 (kept, so the float64 reference stays float64; fused kernels read it as a
    number and return its gradient in this dtype)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dim() > 1:
            raise ValueError(f"scale: expected a float or a 0-d tensor, got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"scale: expected a floating tensor, got {scale.dtype}")
        if scale.device != device:
            raise ValueError(f"scale: on {scale.device}, but image_features is on {device}")
        return scale.reshape(()).float() if scale.dtype != torch.float64 else scale.reshape(())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or a 0-d tensor, got {type(scale).__name__}")
    if not (float(scale) == float(scale)) or abs(float(scale)) == float("inf"):
        raise ValueError(f"scale: must be finite, got {scale}")
    # A fill kernel, not torch.tensor's host-to-device copy: no synchronisation, capturable.
    return torch.full((), float(scale), dtype=torch.float32, device=device)


def run_value_checks(checks: list[tuple[str, torch.Tensor]]) -> None:
    """Evaluate boolean 0-d tensors with one synchronisation; raise on the first false one."""
    if not checks or not value_checks_wanted(checks[0][1]):
        return
    flags = torch.stack([c.reshape(()) for _, c in checks]).tolist()
    for (message, _), ok in zip(checks, flags):
        if not ok:
            raise ValueError(message)


def feature_checks(name: str, x: torch.Tensor, normalize: bool) -> list[tuple[str, torch.Tensor]]:
    """``run_value_checks`` entries for a feature matrix: finite, and (with ``normalize``) no
    all-zero row. One reduction pass over ``x``: the per-row max of ``|x|`` is NaN or inf exactly
    when the row holds a NaN or an inf, and 0 exactly when the row is all zeros."""
    if normalize:
        peak = x.detach().abs().amax(dim=1)
        return [(f"{name}: contains NaN or infinite values", torch.isfinite(peak).all()),
                (f"{name}: a row has zero norm and cannot be normalised", (peak > 0).all())]
    return [(f"{name}: contains NaN or infinite values", torch.isfinite(x.detach().abs().amax()))]


def target_checks(rows_name: str, rows: torch.Tensor, c: int, labels, *, smoothing, soft_labels,
                  sample_index, kernel_checks_values: bool = False
                  ) -> list[tuple[str, torch.Tensor]]:
    """The free checks of the target arguments (raising at once) for ``rows`` (one per label:
    ``rows_name``, the image features or the logits) and ``c`` classes; returns their value
    checks as ``run_value_checks`` entries (labels and sample indices left out with
    ``kernel_checks_values``, see ``clip_cross_entropy_checks``)."""
    n = rows.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"labels: expected {n} labels (one per {rows_name} row), got {labels.shape[0]}")
    check_same_device(rows_name, rows, labels=labels, soft_labels=soft_labels,
                      sample_index=sample_index)
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise TypeError(f"smoothing: expected a float, got {type(smoothing).__name__}")
    if not 0.0 <= float(smoothing) <= 1.0:
        raise ValueError(f"smoothing: must lie in [0, 1], got {smoothing}")
    if soft_labels is not None:
        check_tensor("soft_labels", soft_labels, ndim=2, floating=True)
        if soft_labels.shape[1] != c:
            raise ValueError(f"soft_labels: expected {c} columns (one per class), got shape "
                             f"{tuple(soft_labels.shape)}")
        if sample_index is None and soft_labels.shape[0] != c:
            raise ValueError(f"soft_labels: a class-wise table must be {c} x {c}, got shape "
                             f"{tuple(soft_labels.shape)}; pass sample_index for an instance-wise table")
        if soft_labels.shape[0] == 0:
            raise ValueError("soft_labels: the table has no rows")
    if sample_index is not None:
        if soft_labels is None:
            raise ValueError("sample_index: given without soft_labels (an instance-wise table)")
        check_tensor("sample_index", sample_index, ndim=1, integer=True)
        if sample_index.shape[0] != n:
            raise ValueError(f"sample_index: expected {n} indices (one per {rows_name} row), got "
                             f"{sample_index.shape[0]}")
    if soft_labels is not None and soft_labels.requires_grad and torch.is_grad_enabled():
        raise ValueError("soft_labels: requires grad, but the soft-label table is a fixed target "
                         "and gets no gradient in any backend; pass soft_labels.detach()")
    if not value_checks_wanted(rows):
        return []
    checks = []
    if not kernel_checks_values:
        lo_hi = torch.aminmax(labels)
        checks.append((f"labels: values must lie in [0, {c})", (lo_hi.min >= 0) & (lo_hi.max < c)))
    if soft_labels is not None:
        table = soft_labels.detach()
        row_sums = table.double().sum(dim=1)
        checks += [
            # min >= 0 is false for NaN; an inf entry makes its row's sum inf.
            ("soft_labels: contains NaN, infinite or negative values",
             (table.amin() >= 0) & torch.isfinite(row_sums).all()),
            ("soft_labels: every row must sum to 1", ((row_sums - 1).abs() <= 1e-3).all()),
        ]
    if sample_index is not None and not kernel_checks_values:
        m = soft_labels.shape[0]
        lo_hi = torch.aminmax(sample_index)
        checks.append((f"sample_index: values must lie in [0, {m}) (rows of soft_labels)",
                       (lo_hi.min >= 0) & (lo_hi.max < m)))
    return checks


LOSSES = ("ce", "gce", "mae")
_Q_RANGE = "must lie in [0, 1] (0: cross-entropy, 1: MAE)"


class LossChoice(NamedTuple):
    """The task loss as the kernels take it: GCE's exponent ``q`` for every row (0 is
    cross-entropy, 1 is MAE), or one exponent per row in ``q_rows`` (then ``q`` is unused)."""
    q: float
    q_rows: Optional[torch.Tensor]


def check_loss_choice(loss, q, rows_name: str, rows: torch.Tensor) -> LossChoice:
    """The free checks of ``loss`` and ``q`` for ``rows`` (one loss per row); returns the
    ``LossChoice``. ``loss="ce"`` and ``"mae"`` ignore a float ``q``; a tensor ``q`` (one
    exponent per row, 0 for cross-entropy rows) needs ``loss="gce"``."""
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss: must be one of {LOSSES}, got {loss!r}")
    if isinstance(q, torch.Tensor):
        if loss != "gce":
            raise ValueError(f"q: one exponent per row (a tensor) needs loss='gce', got "
                             f"loss={loss!r}")
        check_tensor("q", q, ndim=1, floating=True)
        if q.shape[0] != rows.shape[0]:
            raise ValueError(f"q: expected {rows.shape[0]} values (one per {rows_name} row), got "
                             f"{q.shape[0]}")
        check_same_device(rows_name, rows, q=q)
        if q.requires_grad and torch.is_grad_enabled():
            raise ValueError("q: requires grad, but GCE's exponent is a fixed setting and gets no "
                             "gradient in any backend; pass q.detach()")
        return LossChoice(0.0, q)
    if loss != "gce":
        return LossChoice(0.0 if loss == "ce" else 1.0, None)
    if isinstance(q, bool) or not isinstance(q, (int, float)):
        raise TypeError(f"q: expected a float or a tensor of one value per row, got "
                        f"{type(q).__name__}")
    if not 0.0 <= float(q) <= 1.0:  # false for NaN too
        raise ValueError(f"q: {_Q_RANGE}, got {q}")
    return LossChoice(float(q), None)


def loss_choice_checks(choice: LossChoice, kernel_checks_values: bool = False
                       ) -> list[tuple[str, torch.Tensor]]:
    """``run_value_checks`` entries for per-row exponents: each in [0, 1] (left to the kernel
    with ``kernel_checks_values``)."""
    rows = choice.q_rows
    if rows is None or kernel_checks_values or not value_checks_wanted(rows):
        return []
    rows = rows.detach()
    return [(f"q: values {_Q_RANGE}", ((rows >= 0) & (rows <= 1)).all())]


def clip_cross_entropy_checks(image_features, text_features, labels, scale, *, smoothing,
                              soft_labels, sample_index, normalize, reduction,
                              kernel_checks_values: bool = False
                              ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The free checks of ``clip_cross_entropy``'s arguments (raising at once), then the value
    checks as ``run_value_checks`` entries, not yet synchronised; returns ``(scale as a 0-d
    tensor, entries)``, so that a caller with checks of its own syncs once for all.

    ``kernel_checks_values``: the kernel that will run checks the values itself, raising the same
    ValueError (the C++ CPU kernels do: the feature matrices in the pass that computes their row
    norms, the scale as they read it, the labels and sample indices as they gather the targets),
    so those checks are left out here: no extra read of N x D values, and no small reductions
    that cost more than the kernel at training batch sizes. The soft-label table is still
    checked here."""
    check_tensor("image_features", image_features, ndim=2, floating=True)
    check_tensor("text_features", text_features, ndim=2, floating=True)
    check_tensor("labels", labels, ndim=1, integer=True)
    n, d = image_features.shape
    c = text_features.shape[0]
    if n == 0:
        raise ValueError("image_features: empty batch (0 rows)")
    if c == 0:
        raise ValueError("text_features: no classes (0 rows)")
    if d == 0:
        raise ValueError("image_features: feature dimension is 0")
    if text_features.shape[1] != d:
        raise ValueError(f"text_features: feature dimension {text_features.shape[1]} does not match "
                         f"image_features' {d}")
    if text_features.dtype != image_features.dtype:
        raise TypeError(f"text_features: dtype {text_features.dtype} differs from image_features' "
                        f"{image_features.dtype}; cast one of them")
    check_same_device("image_features", image_features, text_features=text_features)
    target_entries = target_checks(
        "image_features", image_features, c, labels, smoothing=smoothing,
        soft_labels=soft_labels, sample_index=sample_index,
        kernel_checks_values=kernel_checks_values)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    s = as_scale_tensor(scale, image_features.device)
    if not value_checks_wanted(image_features):
        return s, []

    # Value checks: one small reduction per tensor, all read back by a single synchronisation.
    checks = []
    if not kernel_checks_values:
        checks += (feature_checks("image_features", image_features, normalize)
                   + feature_checks("text_features", text_features, normalize))
        checks.append(("scale: must be finite", torch.isfinite(s.detach())))
    return s, checks + target_entries


def check_clip_cross_entropy_args(image_features, text_features, labels, scale, *,
                                  smoothing, soft_labels, sample_index, normalize,
                                  reduction, loss="ce", q=0.5,
                                  kernel_checks_values: bool = False
                                  ) -> tuple[torch.Tensor, LossChoice]:
    """Validate the arguments of ``clip_cross_entropy``; return ``(scale as a 0-d tensor, the
    loss choice)``."""
    s, checks = clip_cross_entropy_checks(
        image_features, text_features, labels, scale, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, normalize=normalize, reduction=reduction,
        kernel_checks_values=kernel_checks_values)
    choice = check_loss_choice(loss, q, "image_features", image_features)
    run_value_checks(checks + loss_choice_checks(choice, kernel_checks_values))
    return s, choice


def check_finite_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite Python number > 0 (>= 0 with ``allow_zero``), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    bound_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (value == value and abs(value) != float("inf") and bound_ok):
        raise ValueError(f"{name}: must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def check_prograd_losses_args(image_features, text_features, zeroshot_text_features, labels, scale,
                              *, temperature, smoothing, soft_labels, sample_index, loss="ce",
                              q=0.5, kernel_checks_values: bool = False
                              ) -> tuple[torch.Tensor, float, LossChoice]:
    """Validate the arguments of ``prograd_losses``; return ``(scale as a 0-d tensor, temperature,
    the task loss's choice)``. Every value check of both feature sets and the targets costs one
    host synchronisation (``kernel_checks_values``: as in ``clip_cross_entropy_checks``, all three
    matrices included)."""
    temperature = check_finite_positive("temperature", temperature)
    s, checks = clip_cross_entropy_checks(
        image_features, text_features, labels, scale, smoothing=smoothing, soft_labels=soft_labels,
        sample_index=sample_index, normalize=True, reduction="mean",
        kernel_checks_values=kernel_checks_values)
    check_tensor("zeroshot_text_features", zeroshot_text_features, ndim=2, floating=True)
    if zeroshot_text_features.shape != text_features.shape:
        raise ValueError(f"zeroshot_text_features: shape {tuple(zeroshot_text_features.shape)} differs "
                         f"from text_features' {tuple(text_features.shape)} (one row per class)")
    if zeroshot_text_features.dtype != image_features.dtype:
        raise TypeError(f"zeroshot_text_features: dtype {zeroshot_text_features.dtype} differs from "
                        f"image_features' {image_features.dtype}; cast one of them")
    check_same_device("image_features", image_features, zeroshot_text_features=zeroshot_text_features)
    choice = check_loss_choice(loss, q, "image_features", image_features)
    if value_checks_wanted(image_features) and not kernel_checks_values:
        checks += feature_checks("zeroshot_text_features", zeroshot_text_features, True)
    run_value_checks(checks + loss_choice_checks(choice, kernel_checks_values))
    return s, temperature, choice


def logits_checks(logits, labels, *, smoothing, soft_labels, sample_index, reduction,
                  kernel_checks_values: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The free checks of ``logits_cross_entropy``'s arguments but the loss choice (raising at
    once); returns the value checks as ``run_value_checks`` entries (the logits' finiteness,
    labels and sample indices left to the kernel with ``kernel_checks_values``)."""
    check_tensor("logits", logits, ndim=2, floating=True)
    check_tensor("labels", labels, ndim=1, integer=True)
    n, c = logits.shape
    if n == 0:
        raise ValueError("logits: empty batch (0 rows)")
    if c == 0:
        raise ValueError("logits: no classes (0 columns)")
    target_entries = target_checks("logits", logits, c, labels, smoothing=smoothing,
                                   soft_labels=soft_labels, sample_index=sample_index,
                                   kernel_checks_values=kernel_checks_values)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: must be one of {REDUCTIONS}, got {reduction!r}")
    if not value_checks_wanted(logits) or kernel_checks_values:
        return target_entries
    return [("logits: contains NaN or infinite values",
             torch.isfinite(logits.detach().abs().amax()))] + target_entries


def check_logits_cross_entropy_args(logits, labels, *, smoothing, soft_labels, sample_index,
                                    reduction, loss="ce", q=0.5,
                                    kernel_checks_values: bool = False) -> LossChoice:
    """Validate the arguments of ``logits_cross_entropy``; return the loss choice. The value
    checks cost one host synchronisation."""
    checks = logits_checks(logits, labels, smoothing=smoothing, soft_labels=soft_labels,
                           sample_index=sample_index, reduction=reduction,
                           kernel_checks_values=kernel_checks_values)
    choice = check_loss_choice(loss, q, "logits", logits)
    run_value_checks(checks + loss_choice_checks(choice, kernel_checks_values))
    return choice


def check_logits_prograd_losses_args(logits, zeroshot_logits, labels, *, temperature, smoothing,
                                     soft_labels, sample_index, loss="ce", q=0.5,
                                     kernel_checks_values: bool = False
                                     ) -> tuple[float, LossChoice]:
    """Validate the arguments of ``logits_prograd_losses``; return ``(temperature, the task
    loss's choice)``. The value checks of both logits tensors and the targets cost one host
    synchronisation."""
    temperature = check_finite_positive("temperature", temperature)
    checks = logits_checks(logits, labels, smoothing=smoothing, soft_labels=soft_labels,
                           sample_index=sample_index, reduction="mean",
                           kernel_checks_values=kernel_checks_values)
    check_tensor("zeroshot_logits", zeroshot_logits, ndim=2, floating=True)
    if zeroshot_logits.shape != logits.shape:
        raise ValueError(f"zeroshot_logits: shape {tuple(zeroshot_logits.shape)} differs from "
                         f"logits' {tuple(logits.shape)}")
    if zeroshot_logits.dtype != logits.dtype:
        raise TypeError(f"zeroshot_logits: dtype {zeroshot_logits.dtype} differs from logits' "
                        f"{logits.dtype}; cast one of them")
    check_same_device("logits", logits, zeroshot_logits=zeroshot_logits)
    choice = check_loss_choice(loss, q, "logits", logits)
    if value_checks_wanted(logits) and not kernel_checks_values:
        checks.append(("zeroshot_logits: contains NaN or infinite values",
                       torch.isfinite(zeroshot_logits.detach().abs().amax())))
    run_value_checks(checks + loss_choice_checks(choice, kernel_checks_values))
    return temperature, choice


def _check_tensor_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    for i, x in enumerate(tensors):
        check_tensor(f"{name}[{i}]", x, floating=True)
    return list(tensors)


def finiteness_checks(name: str, tensors: list[torch.Tensor],
                      indices: list[int] | None = None) -> list[tuple[str, torch.Tensor]]:
    """``run_value_checks`` entries saying which tensor of a list holds NaN or infinite values.

    One multi-tensor 2-norm covers the whole list (NaN and inf survive it), accumulated in float32
    (float64 for float64 tensors): much cheaper on CPU than the max-abs (inf) norm. A finite
    tensor whose float32 norm overflows (elements beyond ~1e19) is refused too, and said so; the
    projection's float32 sums would overflow on it as well. None and empty entries are skipped;
    messages name ``indices[k]`` (the list's positions by default).
    """
    if indices is None:
        indices = list(range(len(tensors)))
    indexed = [(i, x) for i, x in zip(indices, tensors) if x is not None and x.numel() > 0]
    if not indexed:
        return []
    peaks = {}
    for wide in (False, True):
        group = [(i, x) for i, x in indexed if (x.dtype == torch.float64) == wide]
        if group:
            norms = torch._foreach_norm([x.detach() for _, x in group], 2,
                                        dtype=torch.float64 if wide else torch.float32)
            peaks.update({i: p for (i, _), p in zip(group, norms)})
    return [(f"{name}[{i}]: contains NaN or infinite values (or values so large that its norm "
             "overflows)", torch.isfinite(peaks[i])) for i, _ in indexed]


def _memory_span(x: torch.Tensor) -> tuple[int, int]:
    """The byte range ``[start, end)`` a tensor's elements occupy in its storage's address space."""
    start = x.data_ptr()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride()))
    return start, start + (extent + 1) * x.element_size()


def check_no_overlap(written: list[tuple[str, torch.Tensor]],
                     read: list[tuple[str, torch.Tensor]]) -> None:
    """ValueError naming two tensors whose memory overlaps where one of them is ``written`` (the
    same tensor twice, or views sharing elements). Meta and fake tensors are skipped."""
    spans = []
    for order, (name, x, is_written) in enumerate([(n, x, True) for n, x in written]
                                                  + [(n, x, False) for n, x in read]):
        if x.numel() == 0 or x.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(x):
            continue
        spans.append((str(x.device), *_memory_span(x), order, name, is_written))
    spans.sort()
    holder = None  # among the spans so far on this device, the one that ends last
    for span in spans:
        device, start, end, order, name, is_written = span
        if holder is not None and holder[0] == device and start < holder[2] and (is_written or holder[5]):
            first, second = sorted((holder, span), key=lambda item: item[3])
            raise ValueError(f"{second[4]}: shares memory with {first[4]}; the projection writes "
                             "its grads in place and needs them apart from every other tensor")
        if holder is None or holder[0] != device or end > holder[2]:
            holder = span


def check_project_conflicting_args(grads, ref_grads, lam) -> float:
    """Validate the arguments of ``project_conflicting_`` (free checks; the finiteness checks are
    left to the projection); return ``lam`` as a float."""
    grads = _check_tensor_list("grads", grads)
    ref_grads = _check_tensor_list("ref_grads", ref_grads)
    if len(ref_grads) != len(grads):
        raise ValueError(f"ref_grads: expected {len(grads)} tensors (one per grads tensor), got "
                         f"{len(ref_grads)}")
    lam = check_finite_positive("lam", lam, allow_zero=True)
    for i, (g, h) in enumerate(zip(grads, ref_grads)):
        if h.shape != g.shape:
            raise ValueError(f"ref_grads[{i}]: shape {tuple(h.shape)} differs from grads[{i}]'s "
                             f"{tuple(g.shape)}")
        if h.dtype != g.dtype:
            raise ValueError(f"ref_grads[{i}]: dtype {h.dtype} differs from grads[{i}]'s {g.dtype}")
        # One device for all: the fused projection covers every tensor in one launch.
        check_same_device("grads[0]", grads[0], **{f"grads[{i}]": g, f"ref_grads[{i}]": h})
        if g.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"grads[{i}]: requires grad; the projection is not differentiable and "
                             "writes in place (pass .grad tensors, or call it under torch.no_grad())")
    check_no_overlap([(f"grads[{i}]", g) for i, g in enumerate(grads)],
                     [(f"ref_grads[{i}]", h) for i, h in enumerate(ref_grads)])
    return lam


def check_prograd_backward_args(task_loss, kl_loss, params, lam) -> tuple[list[torch.Tensor], float]:
    """Validate the arguments of ``prograd_backward``; return ``(params as a list, lam)``."""
    for name, loss in (("task_loss", task_loss), ("kl_loss", kl_loss)):
        check_tensor(name, loss, floating=True)
        if loss.numel() != 1:
            raise ValueError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"{name}: does not require grad (computed under no_grad, or from "
                             "inputs that do not require grad)")
    check_same_device("task_loss", task_loss, kl_loss=kl_loss)
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params: empty; pass the parameters to update")
    for i, p in enumerate(params):
        check_tensor(f"params[{i}]", p, floating=True)
        if not p.requires_grad:
            raise ValueError(f"params[{i}]: does not require grad")
        check_same_device("params[0]", params[0], **{f"params[{i}]": p})
    return params, check_finite_positive("lam", lam, allow_zero=True)
