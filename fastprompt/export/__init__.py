"""ONNX export with the text side baked in (torch, onnx), and the Triton model repository.

Modules: ``graph`` (the baked torch module, its ONNX proto, fp16, metadata, files), ``verify``
(parity with torch), ``checks`` (argument checks), ``onnx_export`` (``export_onnx`` and its
report), ``agreement`` (int8/fp16 against float32), ``triton`` (the model repository and its
settings), ``ensemble`` (SoftCPT: one image encoder, a head per task).

Names are imported on first use (PEP 562): ``fastprompt.export.ModelInfo`` (which lives in
``fastprompt.serve.metadata``) and ``OnnxClassifier`` load without torch.
"""
from __future__ import annotations

from fastprompt import _lazy_attributes

_LAZY = {
    "BakedClassifier": "fastprompt.export.graph",
    "ExportReport": "fastprompt.export.onnx_export",
    "ExportVerificationError": "fastprompt.export.verify",
    "bake_classifier": "fastprompt.export.graph",
    "export_onnx": "fastprompt.export.onnx_export",
    "AgreementError": "fastprompt.export.agreement",
    "AgreementReport": "fastprompt.export.agreement",
    "EvaluationSet": "fastprompt.export.agreement",
    "TritonSettings": "fastprompt.export.triton",
    "EnsembleReport": "fastprompt.export.ensemble",
    "export_ensemble": "fastprompt.export.ensemble",
    "ModelInfo": "fastprompt.serve.metadata",
    "read_metadata_props": "fastprompt.serve.metadata",
    "OnnxClassifier": "fastprompt.serve",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = _lazy_attributes(__name__, globals(), _LAZY)
