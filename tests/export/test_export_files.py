"""Files the export writes, as another user or a hostile folder sees them: no writing through
symbolic links into the model folders it creates (issue 14, item 17), and Triton files readable
by a server running as another user (item 8)."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from fastprompt.export import export_onnx
from fastprompt.export.ensemble import export_ensemble
from onnxlib import CLASS_NAMES, SCALE


@pytest.mark.parametrize("link", ["fastprompt_classifier", "fastprompt_classifier/1"])
def test_export_refuses_a_linked_model_folder(class_embeddings, tmp_path, link):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=rf"out_dir: .*{link} is a symbolic link"):
        export_onnx(None, class_embeddings, CLASS_NAMES, out, scale=SCALE, model_name="m",
                    head_only=True)
    assert os.listdir(elsewhere) == []  # nothing written where the link points
    assert not (out / "model.onnx").exists()  # refused before anything was written


def test_ensemble_refuses_a_linked_model_folder(tiny, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "cars_head").symlink_to(elsewhere, target_is_directory=True)
    tasks = {"cars": (torch.randn(3, 64), ["a", "b", "c"])}
    with pytest.raises(ValueError, match=r"out_dir: .*cars_head is a symbolic link"):
        export_ensemble(tiny[0], tasks, out, scale=SCALE, model_name="fastprompt-tiny")
    assert os.listdir(elsewhere) == [] and sorted(os.listdir(out)) == ["cars_head"]


def test_triton_files_are_readable_by_other_users(class_embeddings, tmp_path):
    old = os.umask(0o022)
    try:
        export_onnx(None, class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE, model_name="m",
                    head_only=True)
    finally:
        os.umask(old)
    repo = tmp_path / "fastprompt_classifier"
    for path in (repo / "config.pbtxt", repo / "labels.txt", repo / "1" / "model.onnx",
                 tmp_path / "model.onnx"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
