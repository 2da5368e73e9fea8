"""export_onnx: parity with a float64 truth at several batch sizes, metadata round trip, the Triton
model repository against the ONNX model, head-only, fp16, external data, atomic failure, bad
arguments."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch

import fastprompt
from exportlib import check_triton_repository
from fastprompt.export import ExportVerificationError, TritonSettings, export_onnx
from fastprompt.export import graph, verify
from fastprompt.serve import ModelInfo, OnnxClassifier
from fastprompt.serve.metadata import read_metadata_props
from onnxlib import CLASS_NAMES, METHOD, SCALE, cosine_rows, truth


def check_parity(clf, visual, class_embeddings, scale, per_item, batch_sizes, seed):
    g = torch.Generator().manual_seed(seed)
    for b in batch_sizes:
        x = torch.randn(b, *per_item, generator=g)
        logits_true, probs_true = truth(visual, class_embeddings, scale, x)
        logits, probs = clf.run(x)  # a tensor is accepted too
        assert probs.shape == logits.shape == (b, len(class_embeddings))
        assert np.abs(probs - probs_true.numpy()).max() <= 1e-4, (b, seed)
        assert np.abs(logits - logits_true.numpy()).max() <= 1e-4 * scale, (b, seed)


@pytest.mark.parametrize("batch_sizes", [(1, 3, 7, 8)])
def test_tiny_parity_dynamic_batch(tiny, class_embeddings, tiny_export, batch_sizes, seed):
    out, report = tiny_export
    assert report.verified and report.max_abs_diff_probs <= verify.FP32_PROBS_ATOL
    clf = OnnxClassifier(out / "model.onnx", batch_size=5)  # 7 and 8 also cross a chunk boundary
    check_parity(clf, tiny[0].visual, class_embeddings, SCALE, (3, 64, 64), batch_sizes, seed)


def test_graph_holds_no_text_encoder(tiny_export):
    model = onnx.load(str(tiny_export[0] / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "probs"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert not batch.HasField("dim_value")  # dynamic
    names = [t.name for t in model.graph.initializer]
    assert not any("token_embedding" in n or ("transformer" in n and not n.startswith("visual."))
                   for n in names)
    assert sum(t.ByteSize() for t in model.graph.initializer) < 3 * 2**20  # tiny tower only


def test_metadata_round_trip(tiny, tiny_export):
    out, _ = tiny_export
    path = str(out / "model.onnx")
    onnx.checker.check_model(path, full_check=True)
    cfg = open_clip.get_model_preprocess_cfg(tiny[0])
    # Two independent readers: onnxruntime and the onnx package.
    by_ort = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_modelmeta() \
        .custom_metadata_map
    by_onnx = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert by_ort == by_onnx == read_metadata_props(path)
    assert json.loads(by_onnx["fastprompt.class_names"]) == CLASS_NAMES
    assert float(by_onnx["fastprompt.scale"]) == SCALE
    assert json.loads(by_onnx["fastprompt.image_size"]) == [64, 64]
    assert json.loads(by_onnx["fastprompt.mean"]) == list(cfg["mean"])
    assert json.loads(by_onnx["fastprompt.std"]) == list(cfg["std"])
    assert by_onnx["fastprompt.model_name"] == "fastprompt-tiny"
    assert json.loads(by_onnx["fastprompt.method"]) == METHOD
    assert by_onnx["fastprompt.fastprompt_version"] == fastprompt.__version__
    info = ModelInfo.from_props(by_onnx, path)
    assert (info.class_names, info.scale, info.image_size, info.method, info.input_kind,
            info.precision, info.embed_dim) == (CLASS_NAMES, SCALE, (64, 64), METHOD, "image",
                                                "float32", 64)
    assert info.interpolation == cfg["interpolation"] and info.resize_mode == cfg["resize_mode"]


def test_triton_config_matches_onnx(tiny_export):
    out, report = tiny_export
    assert report.triton_model_dir == str(out / "tiny_clf") and report.link_mode == "hardlink"
    check_triton_repository(out, "tiny_clf", out / "model.onnx", CLASS_NAMES, "image")
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no staging leftovers


def test_head_only(class_embeddings, tmp_path, seed):
    report = export_onnx(None, class_embeddings, CLASS_NAMES, tmp_path,
                         scale=SCALE, model_name="fastprompt-tiny", head_only=True)
    assert report.verified and report.input_kind == "features"
    clf = OnnxClassifier(tmp_path)
    assert clf.info.input_name == "image_features" and clf.info.embed_dim == 64
    assert clf.info.image_size is None  # exported without its model: no preprocessing to record
    check_parity(clf, None, class_embeddings, SCALE, (64,), (1, 3, 7, 8), seed)
    check_triton_repository(tmp_path, "fastprompt_classifier", tmp_path / "model.onnx",
                            CLASS_NAMES, "image_features")
    with pytest.raises(TypeError, match="images: this is a head-only model"):
        clf.predict(["cat.jpg"])


def test_fp16(tiny, class_embeddings, tmp_path, seed):
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                         model_name="fastprompt-tiny", fp16=True, min_agreement=0.0)
    path = tmp_path / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    for v in list(model.graph.input) + list(model.graph.output):  # float32 at the boundary
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert report.precision == "float16" and report.agreement.precision == "float16"
    assert report.agreement.measured and report.agreement.passed  # fp16 runs on the CPU here
    try:
        clf = OnnxClassifier(path, ["CPUExecutionProvider"])
    except ValueError as e:
        pytest.skip(f"this onnxruntime's CPU provider cannot run the fp16 graph: {e}")
    assert clf.info.precision == "float16"
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, 64, 64, generator=g)
    logits_true, probs_true = truth(tiny[0].visual, class_embeddings, SCALE, x)
    logits, probs = clf.run(x)
    assert cosine_rows(logits, logits_true).min() >= 0.999
    # Top-1 may differ only where the truth's two best classes lie within fp16 rounding.
    top2 = logits_true.topk(2, dim=1).values
    disagree = logits.argmax(1) != logits_true.argmax(1).numpy()
    assert ((top2[:, 0] - top2[:, 1]).numpy()[disagree] < 0.1).all()
    assert np.abs(probs - probs_true.numpy()).max() <= 2e-2


def test_external_data(class_embeddings, tmp_path, monkeypatch, seed):
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    report = export_onnx(None, class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                         model_name="fastprompt-tiny", head_only=True)
    assert report.external_data
    data = tmp_path / "model.onnx.data"
    repo_data = tmp_path / "fastprompt_classifier" / "1" / "model.onnx.data"
    assert data.is_file() and os.path.samefile(data, repo_data)
    for path in (tmp_path / "model.onnx", tmp_path / "fastprompt_classifier" / "1" / "model.onnx"):
        check_parity(OnnxClassifier(path), None, class_embeddings, SCALE, (64,), (1, 3),
                     seed)
    # Exporting again under the limit removes the data files the earlier export left.
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 2**31)
    assert not export_onnx(None, class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                           model_name="fastprompt-tiny", head_only=True).external_data
    assert not data.exists() and not repo_data.exists()


def test_failed_verification_keeps_previous_export(class_embeddings, tiny_export, tmp_path,
                                                   monkeypatch):
    shutil.copytree(tiny_export[0], tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "model.onnx").read_bytes()
    monkeypatch.setattr(verify, "FP32_PROBS_ATOL", -1.0)  # nothing can pass
    with pytest.raises(ExportVerificationError, match="probs atol -1") as e:
        export_onnx(None, class_embeddings[:3], CLASS_NAMES[:3], tmp_path, scale=2.0,
                    model_name="m", head_only=True)
    assert not e.value.report.verified
    assert (tmp_path / "model.onnx").read_bytes() == before
    assert (tmp_path / "tiny_clf" / "1" / "model.onnx").read_bytes() == before
    assert not (tmp_path / "fastprompt_classifier").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_export_leaves_the_callers_model_alone(tiny):
    visual = tiny[0].visual
    assert graph.plain_fp32_cpu(visual) is visual  # eval, fp32, CPU: used as is
    visual.train()
    try:
        exported = graph.plain_fp32_cpu(visual)
        assert exported is not visual and not exported.training and visual.training
    finally:
        visual.eval()
    half = graph.plain_fp32_cpu(torch.nn.Linear(3, 2).half())
    assert half.weight.dtype == torch.float32


@pytest.mark.parametrize("change, match", [
    (dict(class_names=CLASS_NAMES[:-1]), r"class_names: 6 names for 7"),
    (dict(class_names=["a"] * 7), r"class_names: 'a' appears twice"),
    (dict(class_names=["a\nb"] + CLASS_NAMES[1:]), r"class_names: entry 0 .*line break"),
    (dict(class_names=CLASS_NAMES[:-1] + ["x\u202egnp.exe"]), r"class_names: entry 6 .*U\+202E"),
    (dict(class_names=CLASS_NAMES[:-1] + ["x\t"]), r"class_names: entry 6 .*control character"),
    (dict(class_names=["caf\u00e9", "cafe\u0301"] + CLASS_NAMES[2:]), r"'café' appears twice"),
    (dict(class_names="abcdefg"), r"class_names: expected a list"),
    (dict(scale=0.0), r"scale: must be finite and > 0"),
    (dict(scale=float("nan")), r"scale: must be finite"),
    (dict(scale=torch.ones(2)), r"scale: expected a float or a one-element tensor"),
    (dict(class_embeddings=torch.randn(7, 32)), r"class_embeddings: feature size 32 does not match"),
    (dict(class_embeddings=torch.zeros(7, 64)), r"class_embeddings: a row has zero norm"),
    (dict(class_embeddings=torch.full((7, 64), float("inf"))), r"class_embeddings: contains NaN"),
    (dict(class_embeddings=torch.ones(7, 64, dtype=torch.int64)), r"class_embeddings: expected a float"),
    (dict(method={"lr": object()}), r"method: settings must be JSON-serialisable"),
    (dict(method=["coop"]), r"method: expected a dict"),
    (dict(triton=dict(name="../evil")), r"triton_name: '../evil' must be"),
    (dict(triton="tiny_clf"), r"triton: expected TritonSettings or None, got str"),
    (dict(model=None), r"model: None; only a head-only export"),
    (dict(model=torch.nn.Linear(2, 2)), r"model: expected an open_clip model"),
    (dict(opset=9), r"opset: expected an int from 18"),
    (dict(opset=999), r"opset: expected an int from 18 .* got 999"),
    (dict(fp16=1), r"fp16: expected a bool"),
    (dict(fp16=True, int8=True), r"fp16, int8: pick one"),
    (dict(int8=True, head_only=True), r"int8: a head-only model holds nothing to quantise"),
    (dict(int8=True, min_agreement=1.5), r"min_agreement: expected a number in \[0, 1\]"),
    (dict(triton=dict(tensorrt=True)), r"triton_tensorrt: TensorRT runs on GPU instances"),
    (dict(int8=True, triton=dict(gpu=True, tensorrt=True)), r"triton_tensorrt: TensorRT cannot"),
    (dict(triton=dict(instances=0)), r"triton_instances: expected an int >= 1"),
    (dict(triton=dict(queue_delay_us=-1)), r"triton_queue_delay_us: expected an int >= 0"),
    (dict(triton=dict(max_batch_size=0)), r"triton_max_batch_size: expected an int >= 1"),
    (dict(triton=dict(gpu=1)), r"triton_gpu: expected a bool"),
    (dict(evaluation=[1, 2]), r"evaluation: expected an EvaluationSet"),
])
def test_bad_arguments(tiny, class_embeddings, tmp_path, change, match):
    kwargs = dict(model=tiny[0], class_embeddings=class_embeddings, class_names=CLASS_NAMES,
                  out_dir=tmp_path, scale=SCALE, model_name="fastprompt-tiny")
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        if isinstance(kwargs.get("triton"), dict):  # TritonSettings checks what it can when made
            kwargs["triton"] = TritonSettings(**kwargs["triton"])
        export_onnx(**kwargs)
    assert not (tmp_path / "model.onnx").exists()


def test_out_dir_is_a_file(class_embeddings, tmp_path):
    target = tmp_path / "model"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"out_dir: .*model exists and is not a folder"):
        export_onnx(None, class_embeddings, CLASS_NAMES, target, scale=SCALE, model_name="m",
                    head_only=True)
