"""Helpers for the export tests: the float64 truth and row cosines."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

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
