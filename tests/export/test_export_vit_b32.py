"""ViT-B-32 with random weights (nothing downloaded): float32 export, parity with open_clip's own
``encode_image`` at dynamic batch sizes 1, 3, 7 and 8, and the Triton config. About 15 s on two
idle cores, most of it in torch.onnx."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastprompt.export import export_onnx
from fastprompt.serve import OnnxClassifier


@pytest.fixture(scope="module")
def vit_b32():
    from fastprompt.models.factory import create_model
    return create_model("ViT-B-32")[0]


def test_vit_b32_export_parity(vit_b32, tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"class {i}" for i in range(11)]
    text = torch.randn(len(names), 512, generator=g)
    scale = vit_b32.logit_scale.exp().item()  # 1/0.07, open_clip's initial value
    report = export_onnx(vit_b32, text, names, tmp_path, scale=scale, model_name="ViT-B-32",
                         method={"name": "coop"}, seed=seed)
    assert report.verified and report.max_abs_diff_probs <= 1e-4, report.summary()

    clf = OnnxClassifier(tmp_path / "model.onnx", batch_size=8)
    assert clf.info.image_size == (224, 224)
    t_hat = text / text.norm(dim=1, keepdim=True)
    for b in (1, 3, 7, 8):
        x = torch.randn(b, 3, 224, 224, generator=g)
        with torch.no_grad():  # open_clip's path, independent of fastprompt's export module
            logits_ref = scale * vit_b32.encode_image(x, normalize=True) @ t_hat.T
        probs_ref = logits_ref.softmax(dim=1)
        logits, probs = clf.run(x.numpy())
        assert probs.shape == (b, len(names))
        assert np.abs(probs - probs_ref.numpy()).max() <= 1e-4, (b, seed)
        assert np.abs(logits - logits_ref.numpy()).max() <= 1e-4 * scale, (b, seed)
    config = (tmp_path / "fastprompt_classifier" / "config.pbtxt").read_text()
    assert "dims: [ 3, 224, 224 ]" in config and "dims: [ 11 ]" in config
