"""fastprompt: fast, robust prompt tuning of CLIP-like models, shipped as ONNX.

The ops are imported on first use (PEP 562): ``import fastprompt`` costs nothing, and
``fastprompt.serve`` runs where torch is not installed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "clip_cross_entropy": "fastprompt.ops.clip_cross_entropy",
    "prograd_backward": "fastprompt.ops.prograd_backward",
    "prograd_losses": "fastprompt.ops.prograd_losses",
    "project_conflicting_": "fastprompt.ops.project_conflicting",
    "set_validation": "fastprompt._validation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        # Sub-packages (fastprompt.serve, fastprompt.train, ...) load as usual on import.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
