"""Serving exported classifiers: ``from fastprompt.serve import OnnxClassifier``."""
from fastprompt.export.serve import OnnxClassifier, default_providers  # noqa: F401

__all__ = ["OnnxClassifier", "default_providers"]
