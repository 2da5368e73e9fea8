"""``fastprompt export --int8/--fp16`` on a real run folder: the agreement report is computed on
the run's own cached test images (or, head-only, test features) with their labels, and its float32
accuracy equals an independent recomputation with the float32 export."""
from __future__ import annotations

import json

import pytest

from fastprompt.cli import main
from fastprompt.data import load_cache
from fastprompt.serve import OnnxClassifier


@pytest.fixture(scope="module")
def trained_run(cli_args, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cache, run = root / "c.safetensors", root / "run"
    assert main(["cache", *cli_args, "--out", str(cache)]) == 0
    assert main(["train", *cli_args, "--cache", str(cache), "--out", str(run), "--epochs", "2",
                 "--n-ctx", "4", "--no-progress"]) == 0
    return run, cache


def test_int8_report_uses_the_runs_test_images(trained_run, tmp_path, capsys):
    run, cache_path = trained_run
    assert main(["export", str(run), str(tmp_path / "fp32")]) == 0
    assert main(["export", str(run), str(tmp_path / "int8"), "--int8", "--min-agreement", "0"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "int8" / "agreement.json").read_text())
    cache = load_cache(str(cache_path))
    assert report["inputs"] == f"test images of {cache_path}"
    assert report["num_inputs"] == len(cache.test_paths) == 6
    labels = cache.test_labels.numpy()
    fp32 = OnnxClassifier(tmp_path / "fp32").predict_proba(cache.test_paths)
    int8 = OnnxClassifier(tmp_path / "int8").predict_proba(cache.test_paths)
    assert report["accuracy_float32"] == pytest.approx((fp32.argmax(1) == labels).mean(), abs=1e-12)
    assert report["accuracy_reduced"] == pytest.approx((int8.argmax(1) == labels).mean(), abs=1e-12)
    assert report["top1_agreement"] == pytest.approx((fp32.argmax(1) == int8.argmax(1)).mean(),
                                                     abs=1e-12)


def test_fp16_head_only_report_uses_the_runs_test_features(trained_run, tmp_path, capsys):
    run, cache_path = trained_run
    out = tmp_path / "head"
    assert main(["export", str(run), str(out), "--head-only", "--fp16", "--min-agreement", "0",
                 "--agreement-limit", "4"]) == 0
    report = json.loads((out / "agreement.json").read_text())
    assert report["inputs"] == f"test features of {cache_path}" and report["num_inputs"] == 4
    assert report["accuracy_float32"] is not None and report["passed"] is True
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "x"), "--head-only", "--int8"]) == 2
    assert "int8: a head-only model holds nothing to quantise" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "x"), "--int8", "--agreement-limit", "-1"]) == 2
    assert "--agreement-limit: expected an int >= 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
