"""Helpers shared by the export and serving tests (tests/export, tests/serve): the class names,
scale and method of the tiny classifier the root conftest exports, the float64 truth it must
match, row cosines and generated images. Not a test module; tests import it by name (tests/ is
on sys.path)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Odd characters on purpose: quotes, commas, unicode and a JSON-looking name survive the metadata.
CLASS_NAMES = ["golden retriever", 'say "cheese"', "crème brûlée", "a, b", "[1]", "猫", "x"]
SCALE = 37.5
METHOD = {"name": "dspt", "n_ctx": 4, "atlas": {"k": 3, "soft": "csl"}, "prograd": True}


def truth(visual, class_embeddings, scale, inputs):
    """float64 ``(logits, probs)`` computed independently of fastprompt's export module.

    ``visual`` None means ``inputs`` are image features already.
    """
    x = inputs.double()
    if visual is not None:
        with torch.no_grad():
            x = copy.deepcopy(visual).double()(x)
    t = class_embeddings.double()
    logits = scale * (x / x.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    return logits, torch.softmax(logits, dim=1)


def cosine_rows(a, b):
    return F.cosine_similarity(torch.as_tensor(a).double(), torch.as_tensor(b).double(), dim=1)


def random_image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    """Uniform noise as a PIL image of ``mode`` (RGB, RGBA, L, or P: a palette image)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(data.squeeze(-1) if channels == 1 else data)
    return image.convert("P") if mode == "P" else image
