"""int8 and fp16 exports: the agreement report against the float32 export (recomputed here
independently), the quantised graph's structure, refusal below --min-agreement leaving nothing
behind, and the CLI flags."""
from __future__ import annotations

import json
import shutil
import types

import numpy as np
import onnx
import pytest

from fastprompt import pipeline
from fastprompt.export import (AgreementError, EvaluationSet, TritonSettings, agreement, export_onnx,
                               onnx_export)
from fastprompt.serve import OnnxClassifier
from onnxlib import CLASS_NAMES, SCALE


def evaluation_inputs(seed, n=40):
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64), dtype=np.float32)


# The tiny model has random weights and close logits: int8 (and now and then fp16) flips some of
# its top-1 answers on random inputs, so the tests that check the numbers accept any agreement
# (min_agreement=0).
@pytest.fixture(scope="module")
def int8_export(tiny, class_embeddings, tiny_export, tmp_path_factory, session_seed):
    seed = session_seed
    x = evaluation_inputs(seed)
    fp32 = OnnxClassifier(tiny_export[0]).predict_proba(x)
    # Labels: the float32 answer on the first half, another class on the second, so the float32
    # accuracy is known exactly (0.5).
    labels = fp32.argmax(1)
    labels[len(x) // 2:] = (labels[len(x) // 2:] + 1) % len(CLASS_NAMES)
    out = tmp_path_factory.mktemp("int8")
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, out, scale=SCALE,
                         model_name="fastprompt-tiny", int8=True, seed=seed, min_agreement=0.0,
                         evaluation=EvaluationSet(x, labels, "test inputs"))
    return out, report, x, labels, fp32


def test_int8_report_matches_an_independent_comparison(int8_export):
    out, report, x, labels, fp32 = int8_export
    clf = OnnxClassifier(out)
    assert clf.info.precision == "int8" and report.precision == "int8"
    q = clf.predict_proba(x)
    a = report.agreement
    assert a.measured and a.passed and a.num_inputs == len(x) and a.inputs == "test inputs"
    assert a.top1_agreement == pytest.approx((q.argmax(1) == fp32.argmax(1)).mean(), abs=1e-12)
    assert a.max_abs_diff_probs == pytest.approx(np.abs(q - fp32).max(), abs=1e-6)
    assert a.mean_abs_diff_probs == pytest.approx(np.abs(q - fp32).mean(), abs=1e-6)
    assert a.accuracy_float32 == 0.5
    assert a.accuracy_reduced == pytest.approx((q.argmax(1) == labels).mean(), abs=1e-12)
    assert {c["variant"] for c in a.candidates} == {"per-tensor", "per-channel"}
    assert a.variant in ("per-tensor", "per-channel")
    assert [r["batch"] for r in a.speed] == list(agreement.SPEED_BATCH_SIZES)
    assert all(r["float32_ms"] > 0 and r["reduced_ms"] > 0 for r in a.speed)
    assert a.size_bytes["reduced"] < a.size_bytes["float32"]
    on_disk = json.loads((out / "agreement.json").read_text())
    assert on_disk["top1_agreement"] == a.top1_agreement and on_disk["passed"] is True
    assert on_disk["machine"]["model"] and on_disk["machine"]["available_cpus"] >= 1


def test_int8_graph_quantises_the_tower_and_keeps_the_head_float(int8_export):
    model = onnx.load(str(int8_export[0] / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops
    init = {t.name: t for t in model.graph.initializer}
    heads = [n for n in model.graph.node if "classifier" in n.input]
    assert [n.op_type for n in heads] == ["MatMul"]
    assert init["classifier"].data_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)


def test_fp16_writes_an_agreement_report(tiny, class_embeddings, tmp_path, seed):
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                         model_name="fastprompt-tiny", fp16=True, seed=seed,
                         min_agreement=0.0)
    a = json.loads((tmp_path / "agreement.json").read_text())
    # onnxruntime 1.32's CPU provider runs the fp16 graph, so it is measured here.
    assert a["precision"] == "float16" and a["provider"] == "CPUExecutionProvider"
    assert a["num_inputs"] == agreement.RANDOM_INPUTS and a["passed"]
    assert a["top1_agreement"] == report.agreement.top1_agreement >= 0.9
    assert a["max_abs_diff_probs"] <= 2e-2
    # A float32 export into the same folder removes the stale report.
    export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                model_name="fastprompt-tiny")
    assert not (tmp_path / "agreement.json").exists()


def permuting_quantiser(monkeypatch):
    """A deliberately broken int8 quantisation: the class columns of the head come out rotated."""
    real = agreement.quantize_int8

    def broken(source, out_path, **kw):
        real(source, out_path, **kw)
        model = onnx.load(out_path)
        head = next(t for t in model.graph.initializer if t.name == "classifier")
        w = onnx.numpy_helper.to_array(head)
        head.CopyFrom(onnx.numpy_helper.from_array(np.roll(w, 1, axis=1), "classifier"))
        onnx.save(model, out_path)

    monkeypatch.setattr(agreement, "quantize_int8", broken)
    monkeypatch.setattr(onnx_export, "quantize_int8", broken)


def test_low_agreement_refuses_and_leaves_nothing(tiny, class_embeddings, tmp_path, monkeypatch, seed):
    permuting_quantiser(monkeypatch)
    fresh = tmp_path / "fresh"
    with pytest.raises(AgreementError, match=r"below --min-agreement 0.99; nothing was written") as e:
        export_onnx(tiny[0], class_embeddings, CLASS_NAMES, fresh, scale=SCALE,
                    model_name="fastprompt-tiny", int8=True, seed=seed)
    assert e.value.report.top1_agreement < 0.99
    assert not fresh.exists()  # the folder it would have created is gone too


def test_low_agreement_keeps_the_previous_export(tiny, class_embeddings, tiny_export, tmp_path,
                                                 monkeypatch):
    shutil.copytree(tiny_export[0], tmp_path, dirs_exist_ok=True)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    permuting_quantiser(monkeypatch)
    with pytest.raises(AgreementError):
        export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                    model_name="fastprompt-tiny", int8=True, triton=TritonSettings(name="tiny_clf"))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no agreement.json, no staging folder, nothing replaced


def test_min_agreement_zero_accepts_the_same_broken_model(tiny, class_embeddings, tmp_path,
                                                         monkeypatch):
    permuting_quantiser(monkeypatch)
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                         model_name="fastprompt-tiny", int8=True, min_agreement=0.0)
    assert report.agreement.passed and report.agreement.top1_agreement < 0.99


def test_evaluation_set_checks():
    with pytest.raises(ValueError, match="evaluation: 2 labels for 3 inputs"):
        EvaluationSet(np.zeros((3, 4), np.float32), [0, 1])
    with pytest.raises(ValueError, match="evaluation: no inputs"):
        EvaluationSet([], None)


def test_evaluation_from_image_files(tiny, class_embeddings, tmp_path, image_files):
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                         model_name="fastprompt-tiny", int8=True,
                         min_agreement=0.0,
                         evaluation=EvaluationSet([str(p) for p in image_files],
                                                  list(range(len(image_files))), "files"))
    fp32 = OnnxClassifier(tmp_path)  # the int8 model; its agreement on the files is recomputed
    assert report.agreement.num_inputs == len(image_files)
    assert 0.0 <= report.agreement.accuracy_reduced <= 1.0
    assert fp32.predict_proba([str(p) for p in image_files]).shape == (5, len(CLASS_NAMES))


def test_cli_int8_and_refusal(cli, tiny, class_embeddings, tmp_path, monkeypatch, capsys):
    run = types.SimpleNamespace(fused=None, head=None, model=tiny[0], model_name="fastprompt-tiny", class_names=CLASS_NAMES,
                                text_features=class_embeddings, scale=SCALE, method={"name": "coop"},
                                run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(pipeline, "load_run", lambda run_dir: run)  # fastprompt.train.load_run
    out = tmp_path / "export"
    assert cli(["export", run.run_dir, str(out), "--int8", "--min-agreement", "0"]) == 0
    captured = capsys.readouterr()
    assert "int8 (per-" in captured.out and "speed at batch 1" in captured.out
    assert "agreement report uses random inputs" in captured.err  # no metrics.json in this run
    assert json.loads((out / "agreement.json").read_text())["precision"] == "int8"

    permuting_quantiser(monkeypatch)
    refused = tmp_path / "refused"
    assert cli(["export", run.run_dir, str(refused), "--int8"]) == 1
    assert "below --min-agreement 0.99; nothing was written" in capsys.readouterr().err
    assert not refused.exists()
    with pytest.raises(SystemExit) as e:
        cli(["export", run.run_dir, str(refused), "--int8", "--min-agreement", "1.5"])
    assert e.value.code == 2
    assert "--min-agreement: expected a number in [0, 1], got '1.5'" in capsys.readouterr().err
    assert not refused.exists()
