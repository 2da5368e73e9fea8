"""ATLaS soft labels, computed offline from zero-shot text features and cached image features.

ATLaS ("Alternating Training-based Label Smoothing Enhances Prompt Generalization", Chen et al.,
2025) smooths towards class-wise (CSL, C x C) or instance-wise (ISL, M x C) soft labels instead
of the uniform distribution. It has no public code, and its exact constructions (temperature,
treatment of a class's similarity to itself, view averaging) are not published in what could be
consulted here; the choices below follow the paper's description and are options with
documented defaults. Every row sums to 1, so the tables feed ``fastprompt.clip_cross_entropy``'s
``soft_labels`` directly: CSL indexed by label, ISL by ``sample_index``. The zero-shot text
features come from ``fastprompt.models.zeroshot_text_features``.
"""
from __future__ import annotations

import tempfile

import numpy as np
import torch
from torch import Tensor

from fastprompt._validation import check_tensor

DEFAULT_CSL_TEMPERATURE = 0.01
DEFAULT_ISL_SCALE = 100.0
_CHUNK_ROWS = 4096


def _normalized(name: str, x: Tensor) -> Tensor:
    x = x.float()
    norms = x.norm(dim=-1, keepdim=True)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if (norms == 0).any():
        raise ValueError(f"{name}: a row has zero norm and cannot be normalised")
    return x / norms


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name}: must be positive and finite, got {value}")
    return float(value)


def class_soft_labels(text_features: Tensor, *, temperature: float = DEFAULT_CSL_TEMPERATURE,
                      include_self: bool = False) -> Tensor:
    """Class-wise soft labels (CSL): a C x C float32 table, rows summing to 1.

    ``CSL[i, j] = softmax_j(cos(t_i, t_j) / temperature)`` over the classes' zero-shot text
    features ``t`` (e.g. ``fastprompt.models.zeroshot_text_features``). By default a class's similarity to
    itself is left out (``CSL[i, i] = 0``, the softmax runs over the other C - 1 classes):
    cos(t_i, t_i) = 1 tops every row, and at CLIP-like temperatures it would take nearly all
    the mass, leaving no inter-class signal; the one-hot part of the smoothed target already
    carries the true class. ``include_self=True`` keeps it.

    Defaults (not published by ATLaS): ``temperature`` 0.01, i.e. CLIP's logit scale of 100,
    the same sharpness as the zero-shot predictions behind :func:`instance_soft_labels`.
    """
    check_tensor("text_features", text_features, ndim=2, floating=True)
    temperature = _check_positive("temperature", temperature)
    if not isinstance(include_self, bool):
        raise TypeError(f"include_self: expected a bool, got {type(include_self).__name__}")
    c = text_features.shape[0]
    if c < 2:
        raise ValueError(f"text_features: class-wise soft labels need at least 2 classes, got {c}")
    t = _normalized("text_features", text_features).double()
    logits = (t @ t.T) / temperature
    if not include_self:
        logits.fill_diagonal_(float("-inf"))
    return torch.softmax(logits, dim=1).float()


def file_backed_table(rows: int, cols: int, folder: str | None = None) -> Tensor:
    """A ``rows`` x ``cols`` float32 CPU tensor (zeros) mapped from an unlinked temporary file
    in ``folder`` (the system's temporary folder when None or not writable).

    For instance-wise tables too large to keep in memory (ImageNet: 1.28M x 1000 x 4 bytes =
    5.1 GB): the kernel pages rows in and out as they are used. The file has no name, so it
    disappears with the last reference to the tensor, even when the process is killed.
    """
    if rows * cols == 0:
        return torch.zeros(rows, cols)
    try:
        f = tempfile.TemporaryFile(dir=folder, prefix=".fastprompt-table-")
    except OSError:
        f = tempfile.TemporaryFile(prefix=".fastprompt-table-")
    with f:  # the mapping keeps its own handle on the file
        array = np.memmap(f, dtype=np.float32, mode="w+", shape=(rows, cols))
    return torch.from_numpy(array)


def instance_soft_labels(image_features: Tensor, sample_index: Tensor, text_features: Tensor, *,
                         scale: float = DEFAULT_ISL_SCALE, num_samples: int | None = None,
                         out: Tensor | None = None) -> Tensor:
    """Instance-wise soft labels (ISL): an M x C float32 table, one row per training image.

    Row ``m`` is the zero-shot prediction for image ``m``: ``softmax_c(scale * cos(x, t_c))``
    for each cached view ``x`` of that image (the rows of ``image_features`` whose
    ``sample_index`` is ``m``), averaged over its views. The true class is not treated
    specially, so a mislabeled image's row points at what the image shows.

    ``scale``: the zero-shot logit multiplier; default 100, pretrained CLIP's
    ``logit_scale.exp()`` (pass ``model.logit_scale.exp().clamp(max=100).item()`` for a model
    trained otherwise). ``num_samples``: M (default ``sample_index.max() + 1``); every image
    must have at least one view. Not published by ATLaS: averaging probabilities over views.

    ``out``: an M x C float32 CPU tensor to write the table into (e.g.
    :func:`file_backed_table`), returned; the work runs in blocks of images, so the memory used
    besides ``out`` is that of a few thousand rows, whatever M.
    """
    check_tensor("image_features", image_features, ndim=2, floating=True)
    check_tensor("sample_index", sample_index, ndim=1, integer=True)
    check_tensor("text_features", text_features, ndim=2, floating=True)
    scale = _check_positive("scale", scale)
    r, d = image_features.shape
    if r == 0:
        raise ValueError("image_features: no rows")
    if text_features.shape[1] != d:
        raise ValueError(f"text_features: feature dimension {text_features.shape[1]} does not "
                         f"match image_features' {d}")
    if sample_index.shape[0] != r:
        raise ValueError(f"sample_index: expected {r} indices (one per image_features row), got "
                         f"{sample_index.shape[0]}")
    sample_index = sample_index.to(image_features.device)
    lo, hi = int(sample_index.min()), int(sample_index.max())
    if num_samples is None:
        num_samples = hi + 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    if lo < 0 or hi >= num_samples:
        raise ValueError(f"sample_index: values must lie in [0, {num_samples}), got "
                         f"[{lo}, {hi}]")
    counts = torch.bincount(sample_index, minlength=num_samples)
    if (counts == 0).any():
        missing = int((counts == 0).nonzero()[0])
        raise ValueError(f"sample_index: image {missing} has no rows in image_features (every "
                         f"one of the {num_samples} images needs at least one view)")
    c = text_features.shape[0]
    if out is None:
        out = torch.empty(num_samples, c)
    elif (not isinstance(out, Tensor) or out.dtype != torch.float32 or out.device.type != "cpu"
          or tuple(out.shape) != (num_samples, c)):
        raise ValueError(f"out: expected a ({num_samples}, {c}) float32 CPU tensor, got "
                         f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
                         f" {getattr(out, 'dtype', '')} {getattr(out, 'device', '')}")
    t = _normalized("text_features", text_features.to(image_features.device)).double()
    # Rows grouped by image (stably: each image's views in row order), then blocks of about
    # _CHUNK_ROWS rows of whole images: one block of the table is summed at a time.
    order = torch.argsort(sample_index, stable=True)
    ends = counts.cumsum(0)
    per_block = max(1, _CHUNK_ROWS * num_samples // r)
    for first in range(0, num_samples, per_block):
        last = min(first + per_block, num_samples)
        rows = order[int(ends[first - 1]) if first else 0:int(ends[last - 1])]
        x = _normalized("image_features", image_features[rows]).double()
        probs = torch.softmax(scale * (x @ t.T), dim=1)
        total = torch.zeros(last - first, c, dtype=torch.float64, device=image_features.device)
        total.index_add_(0, sample_index[rows] - first, probs)
        out[first:last] = (total / counts[first:last].unsqueeze(1).double()).float().cpu()
    return out
