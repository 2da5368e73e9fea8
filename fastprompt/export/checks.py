"""Argument checks of the export functions: each raises TypeError or ValueError naming the
argument, before anything is written."""
from __future__ import annotations

import json
import math

import onnx
import torch
import torch.nn as nn

from fastprompt._checks import check_class_name
from fastprompt._validation import check_tensor


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def check_scale(scale) -> float:
    """The logit multiplier as a float: finite and > 0 (a one-element tensor is accepted)."""
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


def check_method(method) -> dict:
    """The method settings to record: a JSON-serialisable dict ({} for None)."""
    if method is None:
        return {}
    if not isinstance(method, dict):
        raise TypeError(f"method: expected a dict of settings or None, got {type(method).__name__}")
    try:
        json.dumps(method, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"method: settings must be JSON-serialisable ({e})") from None
    return method


def check_model_name(model_name) -> None:
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name: expected a non-empty str, got {model_name!r}")


def check_opset(opset) -> None:
    """None, or an opset the dynamo exporter and this onnx both support."""
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not 18 <= opset <= newest):
        raise ValueError(f"opset: expected an int from 18 (the dynamo exporter's minimum) to "
                         f"{newest} (the newest this onnx knows) or None, got {opset!r}")


def check_image_model(model) -> None:
    """An open_clip model, or anything else with a ``visual`` image tower."""
    if not isinstance(getattr(model, "visual", None), nn.Module):
        raise TypeError(f"model: expected an open_clip model with a `visual` image tower, got "
                        f"{type(model).__name__}")


def check_class_embeddings(class_embeddings) -> None:
    """A C x E float tensor, finite, with no all-zero row."""
    check_tensor("class_embeddings", class_embeddings, ndim=2, floating=True)
    c, e = class_embeddings.shape
    if c == 0 or e == 0:
        raise ValueError(f"class_embeddings: empty (shape {tuple(class_embeddings.shape)})")
    t = class_embeddings.detach()
    if not torch.isfinite(t).all():
        raise ValueError("class_embeddings: contains NaN or infinite values")
    if not (t != 0).any(dim=1).all():
        raise ValueError("class_embeddings: a row has zero norm and cannot be normalised")


def check_affine(affine, embed_dim: int, num_classes: int) -> None:
    """None, or ``(A, c)``: finite float tensors of shapes (embed_dim, num_classes) and
    (num_classes,)."""
    if affine is None:
        return
    if not isinstance(affine, (tuple, list)) or len(affine) != 2:
        raise TypeError(f"affine: expected (weight, bias) or None, got {type(affine).__name__}")
    weight, bias = affine
    check_tensor("affine", weight, ndim=2, floating=True)
    check_tensor("affine", bias, ndim=1, floating=True)
    if tuple(weight.shape) != (embed_dim, num_classes) or tuple(bias.shape) != (num_classes,):
        raise ValueError(f"affine: expected shapes {(embed_dim, num_classes)} and "
                         f"{(num_classes,)}, got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ValueError("affine: contains NaN or infinite values")


def check_class_names(class_names, num_classes: int) -> list[str]:
    """``num_classes`` distinct non-empty names without line breaks, as a list."""
    if isinstance(class_names, str) or not isinstance(class_names, (list, tuple)):
        raise TypeError(f"class_names: expected a list of str, got {type(class_names).__name__}")
    names = list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"class_names: {len(names)} names for {num_classes} class_embeddings rows")
    seen = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class_names: entry {i} ({name!r}) is not a non-empty str")
        # As every source of class names: NFC, no control or format characters (labels.txt
        # holds one name per line; the names are shown on terminals).
        name = names[i] = check_class_name(name, "class_names", f"entry {i}")
        if name in seen:
            raise ValueError(f"class_names: {name!r} appears twice")
        seen.add(name)
    return names


def check_tower_output(visual: nn.Module, per_item: tuple[int, ...], embed_dim: int) -> None:
    """The image tower's output on one zero image is batch x ``embed_dim``, the size of the class
    embeddings."""
    with torch.no_grad():
        features = visual(torch.zeros(1, *per_item))
    if isinstance(features, (tuple, list)):
        features = features[0]
    if features.dim() != 2 or features.shape[1] != embed_dim:
        raise ValueError(f"class_embeddings: feature size {embed_dim} does not match the image "
                         f"tower's output shape {tuple(features.shape)}")
