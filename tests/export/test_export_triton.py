"""Triton repositories beyond the default: GPU instances, the TensorRT accelerator for fp16, and
the SoftCPT ensemble (one shared image encoder, a head and an ensemble per task), each config
parsed with Triton's ModelConfig protobuf and checked against the graphs it names."""
from __future__ import annotations

import os
import types

import numpy as np
import onnxruntime as ort
import pytest
import torch

from exportlib import check_io, check_triton_repository, parse_model_config
from fastprompt import pipeline
from fastprompt.export import TritonSettings, export_onnx
from fastprompt.export.ensemble import ENCODER, export_ensemble
from onnxlib import CLASS_NAMES, SCALE, truth


def accelerator(config):
    (acc,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    return acc.name, dict(acc.parameters)


def test_gpu_instances_and_tensorrt(class_embeddings, tmp_path):
    export_onnx(None, class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE, model_name="m",
                head_only=True, triton=TritonSettings(gpu=True, instances=3, tensorrt=True,
                                                      max_batch_size=48, queue_delay_us=250))
    config = check_triton_repository(tmp_path, "fastprompt_classifier", tmp_path / "model.onnx",
                                     CLASS_NAMES, "image_features", gpu=True, instances=3)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32, 48]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    name, params = accelerator(config)
    assert name == "tensorrt" and params["precision_mode"] == "FP32"


def test_fp16_defaults_to_gpu_instances_with_fp16_tensorrt(tiny, class_embeddings, tmp_path):
    export_onnx(tiny[0], class_embeddings, CLASS_NAMES, tmp_path, scale=SCALE,
                model_name="fastprompt-tiny", fp16=True, min_agreement=0.0,
                triton=TritonSettings(tensorrt=True))
    config = check_triton_repository(tmp_path, "fastprompt_classifier", tmp_path / "model.onnx",
                                     CLASS_NAMES, "image", gpu=True, instances=2)
    assert accelerator(config) == ("tensorrt", {"precision_mode": "FP16",
                                                "max_workspace_size_bytes": "1073741824"})


TASKS = {"Pets & co": ["cat", "dog", "hamster"], "cars": ["sedan", "SUV", "truck", "van", "bus"]}


@pytest.fixture(scope="module")
def ensemble(tiny, tmp_path_factory, session_seed):
    g = torch.Generator().manual_seed(session_seed)
    tasks = {task: (torch.randn(len(names), 64, generator=g), names) for task, names in TASKS.items()}
    out = tmp_path_factory.mktemp("ensemble")
    report = export_ensemble(tiny[0], tasks, out, scale=SCALE, model_name="fastprompt-tiny",
                             method={"name": "softcpt"}, triton=TritonSettings(max_batch_size=16))
    return out, tasks, report


def test_ensemble_layout_and_configs_are_consistent(ensemble):
    out, tasks, report = ensemble
    names = {task: name for task, (name, _) in report.tasks.items()}
    assert names == {"Pets & co": "Pets___co", "cars": "cars"}
    expected = {ENCODER} | set(names.values()) | {n + "_head" for n in names.values()}
    assert set(os.listdir(out)) == expected  # no staging leftovers, nothing else
    assert report.encoder_max_abs_diff is not None and report.encoder_max_abs_diff < 1e-3

    def session(model):
        return ort.InferenceSession(str(out / model / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])

    configs = {m: parse_model_config(out / m / "config.pbtxt") for m in expected}
    for model in expected - set(names.values()):  # the ONNX models: configs match their graphs
        s = session(model)
        check_io(configs[model].input, s.get_inputs())
        check_io(configs[model].output, s.get_outputs())
        assert configs[model].backend == "onnxruntime"
    # The image tower is stored once: each head holds only its class matrix.
    encoder_bytes = os.path.getsize(out / ENCODER / "1" / "model.onnx")
    for task, name in names.items():
        assert os.path.getsize(out / f"{name}_head" / "1" / "model.onnx") < encoder_bytes / 10
        ens = configs[name]
        assert ens.platform == "ensemble" and ens.max_batch_size == 16
        assert os.path.isdir(out / name / "1")
        encoder, head = ens.ensemble_scheduling.step
        assert (encoder.model_name, head.model_name) == (ENCODER, f"{name}_head")
        # Every step's inputs come from the ensemble's inputs or an earlier step's outputs, named
        # as the step model's config names them; the ensemble outputs come from the head.
        assert set(encoder.input_map) == {i.name for i in configs[ENCODER].input}
        assert set(encoder.input_map.values()) == {i.name for i in ens.input}
        assert set(encoder.output_map) == {o.name for o in configs[ENCODER].output}
        assert set(head.input_map) == {i.name for i in configs[f"{name}_head"].input}
        assert set(head.input_map.values()) <= set(encoder.output_map.values())
        assert set(head.output_map.values()) == {o.name for o in ens.output}
        # Types and dims agree along the chain.
        assert list(ens.input[0].dims) == list(configs[ENCODER].input[0].dims)
        assert list(configs[ENCODER].output[0].dims) == list(configs[f"{name}_head"].input[0].dims)
        assert [list(o.dims) for o in ens.output] == [[len(TASKS[task])]] * 2
        for model in (name, f"{name}_head"):
            assert (out / model / "labels.txt").read_text().splitlines() == TASKS[task]


def test_ensemble_chain_computes_each_task_classifier(tiny, ensemble, seed):
    out, tasks, report = ensemble
    encoder = ort.InferenceSession(str(out / ENCODER / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    (features,) = encoder.run(["image_features"], {"image": x.numpy()})
    for task, (name, _) in report.tasks.items():
        head = ort.InferenceSession(str(out / f"{name}_head" / "1" / "model.onnx"),
                                    providers=["CPUExecutionProvider"])
        logits, probs = head.run(["logits", "probs"], {"image_features": features})
        logits_true, probs_true = truth(tiny[0].visual, tasks[task][0], SCALE, x)
        assert np.abs(probs - probs_true.numpy()).max() <= 1e-4
        assert np.abs(logits - logits_true.numpy()).max() <= 1e-4 * SCALE


def test_cli_triton_ensemble(cli, tiny, tmp_path, monkeypatch, capsys, seed):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"tasks": [{"name": "Pets & co"}, {"name": "cars"}]}')
    g = torch.Generator().manual_seed(seed)
    features = {task: torch.randn(len(names), 64, generator=g) for task, names in TASKS.items()}
    calls = []

    def load_softcpt_run(path, task):
        calls.append(task)
        return types.SimpleNamespace(fused=None, head=None, model=tiny[0], model_name="fastprompt-tiny", scale=SCALE,
                                     class_names=TASKS[task], text_features=features[task],
                                     method={"name": "softcpt", "task": task})

    monkeypatch.setattr(pipeline, "load_softcpt_run", load_softcpt_run)
    out = tmp_path / "repo"
    assert cli(["export", str(run_dir), str(out), "--triton-ensemble"]) == 0
    assert calls == ["Pets & co", "cars"]
    assert "ensemble cars = image_encoder -> cars_head" in capsys.readouterr().out
    assert parse_model_config(out / "cars" / "config.pbtxt").platform == "ensemble"
    assert cli(["export", str(run_dir), str(out), "--triton-ensemble", "--int8"]) == 2
    assert "--triton-ensemble: exports every task in float32" in capsys.readouterr().err


def test_cli_triton_flags_become_the_settings(cli, class_embeddings, tiny, tmp_path, monkeypatch,
                                              capsys):
    run = types.SimpleNamespace(fused=None, head=None, model=tiny[0], model_name="fastprompt-tiny", class_names=CLASS_NAMES,
                                text_features=class_embeddings, scale=SCALE, method={},
                                run_dir=str(tmp_path / "run"))
    monkeypatch.setattr(pipeline, "load_run", lambda run_dir: run)  # fastprompt.train.load_run
    out = tmp_path / "export"
    assert cli(["export", run.run_dir, str(out), "--head-only", "--triton-name", "clf",
                "--triton-gpu", "--triton-instances", "3", "--triton-tensorrt",
                "--triton-max-batch-size", "48", "--triton-queue-delay-us", "250"]) == 0
    config = check_triton_repository(out, "clf", out / "model.onnx", CLASS_NAMES, "image_features",
                                     gpu=True, instances=3)
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32, 48]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert accelerator(config)[0] == "tensorrt"
    capsys.readouterr()
    for flags, message in [(["--triton-instances", "0"], "triton_instances: expected an int >= 1"),
                           (["--triton-name", "../x"], "triton_name: '../x' must be"),
                           (["--triton-tensorrt"], "triton_tensorrt: TensorRT runs on GPU")]:
        assert cli(["export", run.run_dir, str(tmp_path / "bad"), "--head-only", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastprompt export: error: ") and message in err, err
        assert not (tmp_path / "bad").exists()
