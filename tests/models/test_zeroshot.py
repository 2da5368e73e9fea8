"""zeroshot_text_features against CLIP's recipe written out with open_clip's encode_text."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastprompt.models import zeroshot_text_features
from testlib import assert_close_to_truth


def test_matches_normalised_template_mean(tiny_text):
    model, tokenizer = tiny_text
    classnames = ["tabby cat", "golden retriever", "st. bernard", "ice cream", "b52"]
    templates = ("a photo of a {}.", "a blurry photo of the {}, seen from far away in bad light.")
    model.text_projection.requires_grad_(True)  # no_grad must hold even for a trainable model
    try:
        features = zeroshot_text_features(model, tokenizer, classnames, templates, batch_size=2)
    finally:
        model.text_projection.requires_grad_(False)
    with torch.no_grad():
        per_template = torch.stack([
            F.normalize(model.encode_text(tokenizer([t.format(c) for c in classnames])).double(), dim=-1)
            for t in templates])
    truth = F.normalize(per_template.mean(dim=0), dim=-1)
    assert not features.requires_grad
    assert features.shape == (len(classnames), model.text_projection.shape[1])
    assert_close_to_truth(features, truth, 1e-5, 1e-5, "zero-shot features")
    single = zeroshot_text_features(model, tokenizer, classnames)
    assert_close_to_truth(single, F.normalize(per_template[0], dim=-1), 1e-5, 1e-5, "one template")


def test_bad_arguments(tiny_text):
    model, tokenizer = tiny_text
    with pytest.raises(ValueError, match="^classnames:"):
        zeroshot_text_features(model, tokenizer, [])
    with pytest.raises(ValueError, match="^templates:"):
        zeroshot_text_features(model, tokenizer, ["cat"], templates=("a photo",))
    with pytest.raises(ValueError, match="^templates:"):
        zeroshot_text_features(model, tokenizer, ["cat"], templates="a {}")
    with pytest.raises(ValueError, match="^batch_size:"):
        zeroshot_text_features(model, tokenizer, ["cat"], batch_size=0)
