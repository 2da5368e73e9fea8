"""fastprompt: fast, robust prompt tuning of CLIP-like models, shipped as ONNX.

The ops are imported on first use (PEP 562): ``import fastprompt`` costs nothing, and
``fastprompt.serve`` runs where torch is not installed.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

_LAZY = {
    "clip_cross_entropy": "fastprompt.ops.clip_cross_entropy",
    "logits_cross_entropy": "fastprompt.ops.logits_losses",
    "logits_prograd_losses": "fastprompt.ops.logits_losses",
    "prograd_backward": "fastprompt.ops.prograd_backward",
    "prograd_losses": "fastprompt.ops.prograd_losses",
    "project_conflicting_": "fastprompt.ops.project_conflicting",
    "ot_pseudo_labels": "fastprompt.ops.ot_pseudo_labels",
    "set_validation": "fastprompt._validation",
}

__all__ = ["__version__", *_LAZY]


def _lazy_attributes(module_name: str, module_globals: dict, table: dict[str, str]):
    """``(__getattr__, __dir__)`` for a module whose names in ``table`` (name -> the module that
    defines it) load on first access and are then cached in ``module_globals``."""
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        module_globals[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(module_globals) | set(table))

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_attributes(__name__, globals(), _LAZY)
