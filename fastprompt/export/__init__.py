"""ONNX export with the text side baked in, and onnxruntime serving."""
from fastprompt.export.metadata import ModelInfo, read_metadata_props
from fastprompt.export.onnx_export import (
    BakedClassifier,
    ExportReport,
    ExportVerificationError,
    bake_classifier,
    export_onnx,
)
from fastprompt.export.serve import OnnxClassifier

__all__ = ["BakedClassifier", "ExportReport", "ExportVerificationError", "ModelInfo", "OnnxClassifier",
           "bake_classifier", "export_onnx", "read_metadata_props"]
