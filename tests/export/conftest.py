"""Fixtures for the export tests: the tiny random CLIP, its class embeddings, one float32 export
of it shared by the tests that only read it, and image files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exportlib import CLASS_NAMES, METHOD, SCALE, random_image


@pytest.fixture(scope="session")
def tiny(tiny_clip):
    """(model, preprocess_val) of the root conftest's ``tiny_clip``."""
    return tiny_clip[0], tiny_clip[2]


@pytest.fixture(scope="session")
def class_embeddings():
    """Unnormalised C x 64 text features (rows of different norms, as a text tower gives)."""
    g = torch.Generator().manual_seed(1234)
    t = torch.randn(len(CLASS_NAMES), 64, generator=g)
    return t * torch.linspace(0.3, 5.0, len(CLASS_NAMES))[:, None]


@pytest.fixture(scope="session")
def tiny_export(tiny, class_embeddings, tmp_path_factory):
    """An fp32 export of the tiny model; ``(out_dir, report)``. Tests must not modify it."""
    from fastprompt.export import TritonSettings, export_onnx
    out = tmp_path_factory.mktemp("tiny_export")
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, out, scale=SCALE,
                         model_name="fastprompt-tiny", method=METHOD,
                         triton=TritonSettings(name="tiny_clf"))
    return out, report


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, session_seed):
    """Five images of odd sizes and modes (RGB, grayscale, RGBA, palette), as PNG and JPEG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(session_seed)
    paths = []
    for i, (size, mode, ext) in enumerate([((50, 80), "RGB", "png"), ((97, 31), "L", "png"),
                                           ((64, 64), "RGBA", "png"), ((120, 90), "RGB", "jpg"),
                                           ((33, 65), "P", "png")]):
        paths.append(folder / f"img{i}.{ext}")
        random_image(rng, *size, mode).save(paths[-1])
    return paths
