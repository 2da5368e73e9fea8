"""Serving an exported classifier with onnxruntime: ``OnnxClassifier``.

Needs onnxruntime, numpy and Pillow only (``pip install fastprompt[serve]``): no torch, no
open_clip, no onnx, and nothing of ``fastprompt.export`` (which sits above serving and imports
it). Images are preprocessed from the model's own metadata exactly as training preprocessed them
(open_clip's evaluation transform on the RGB image; see ``ImagePreprocessor``).

Modules: ``metadata`` (what an exported model says about itself, ``ModelInfo``, and the reader of
it), ``session`` (providers, session options, the CPU description, ``create_session``),
``preprocess`` (``ImagePreprocessor``), ``images`` (opening images, ``list_images``,
``read_image_list``), ``classifier`` (``OnnxClassifier``).
"""
from __future__ import annotations

from fastprompt._io import IMAGE_EXTENSIONS
from fastprompt.serve.classifier import OnnxClassifier
from fastprompt.serve.images import list_images, read_image_list
from fastprompt.serve.metadata import ModelInfo, read_metadata_props
from fastprompt.serve.preprocess import ImagePreprocessor
from fastprompt.serve.session import (CPU, CUDA, ISA_FLAGS, available_cpus, cpu_description,
                                      create_session, default_providers, resolve_model_path,
                                      session_options)

# IMAGE_EXTENSIONS, ISA_FLAGS, ModelInfo and read_metadata_props are importable from here as they
# were from the single module, but (as then) not part of ``import *``.
__all__ = ["CPU", "CUDA", "ImagePreprocessor", "OnnxClassifier", "available_cpus",
           "cpu_description", "create_session", "default_providers", "list_images",
           "read_image_list", "resolve_model_path", "session_options"]
