"""ONNX export with the text side baked in (torch, onnx), and the Triton model repository.

Modules: ``graph`` (the baked torch module, its ONNX proto, fp16, metadata, files), ``verify``
(parity with torch), ``checks`` (argument checks), ``onnx_export`` (``export_onnx`` and its
report), ``agreement`` (int8/fp16 against float32), ``triton`` (the model repository and its
settings), ``ensemble`` (SoftCPT: one image encoder, a head per task). Serving what is exported
is ``fastprompt.serve`` (no torch).
"""
from fastprompt.export.agreement import AgreementError, AgreementReport, EvaluationSet
from fastprompt.export.ensemble import EnsembleReport, export_ensemble
from fastprompt.export.graph import BakedClassifier, bake_classifier
from fastprompt.export.onnx_export import ExportReport, export_onnx
from fastprompt.export.triton import TritonSettings
from fastprompt.export.verify import ExportVerificationError

__all__ = ["AgreementError", "AgreementReport", "BakedClassifier", "EnsembleReport",
           "EvaluationSet", "ExportReport", "ExportVerificationError", "TritonSettings",
           "bake_classifier", "export_ensemble", "export_onnx"]
