"""``fastprompt export`` on a run folder (``fastprompt.train.load_run`` stood in for): its report,
the model it writes and its exit code for a run that cannot be loaded."""
from __future__ import annotations

import types

from fastprompt import pipeline
from fastprompt.serve import OnnxClassifier
from onnxlib import CLASS_NAMES, METHOD, SCALE


def test_cli_export_from_run(cli, class_embeddings, tiny, tmp_path, monkeypatch, capsys):
    # fastprompt.train.load_run is written elsewhere; stand in for it with the documented fields.
    run = types.SimpleNamespace(fused=None, head=None, model=tiny[0], model_name="fastprompt-tiny", class_names=CLASS_NAMES,
                                text_features=class_embeddings, scale=SCALE, method=METHOD,
                                run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(pipeline, "load_run", lambda run_dir: run)
    out = tmp_path / "export"
    assert cli(["export", run.run_dir, str(out), "--head-only", "--triton-name", "clf"]) == 0
    stdout = capsys.readouterr().out
    assert "tolerance: probs atol 0.0001" in stdout and "passed" in stdout
    clf = OnnxClassifier(out / "clf" / "1" / "model.onnx")
    assert clf.info.input_kind == "features" and clf.info.method == METHOD
    assert clf.info.image_size == (64, 64)  # the run's model supplied the preprocessing

    def missing_run(run_dir):
        raise ValueError(f"run_dir: {run_dir} has no checkpoint")

    monkeypatch.setattr(pipeline, "load_run", missing_run)
    assert cli(["export", "nowhere", str(out)]) == 2
    assert "run_dir: nowhere has no checkpoint" in capsys.readouterr().err
