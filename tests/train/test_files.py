"""Run folders written by fastprompt 0.1.0 (tests/fixtures/runs_v0_1_0: a CoOp-style DSPT run and
a SoftCPT run, from before ``learner``/``loss`` replaced ``method``/``softcpt_loss``) still load,
evaluate to their recorded accuracies, export, and resume."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastprompt.data import load_cache
from fastprompt.pipeline import export_run
from fastprompt.protocols.evaluation import evaluate_run
from fastprompt.train import TrainConfig, load_run, load_runs

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "runs_v0_1_0")


def fixture(name):
    return os.path.join(FIXTURES, name)


def metrics(name):
    with open(os.path.join(fixture(name), "metrics.json")) as f:
        return json.load(f)


def test_old_config_reads_as_learner_and_loss():
    with open(os.path.join(fixture("coop-run"), "config.json")) as f:
        coop = TrainConfig.from_dict(json.load(f))
    with open(os.path.join(fixture("softcpt-run"), "config.json")) as f:
        soft = TrainConfig.from_dict(json.load(f))
    assert (coop.learner, coop.loss, coop.method, coop.describe()) == ("coop", "dspt", "dspt", "dspt+ls")
    assert (soft.learner, soft.loss, soft.method, soft.describe()) == (
        "softcpt", "dspt", "softcpt", "softcpt(dspt)")
    with pytest.raises(ValueError, match="config: method must be one of"):
        TrainConfig.from_dict({"method": "clip"})


def test_old_coop_run_loads_evaluates_and_exports(tmp_path):
    run = load_run(fixture("coop-run"))
    assert run.class_names == load_cache(fixture("coop-features.safetensors")).classnames
    assert run.method["method"] == "dspt" and run.method["loss"] == "dspt"
    cache = load_cache(fixture("coop-features.safetensors"))
    result = evaluate_run(fixture("coop-run"), cache)
    assert result["test_acc"] == metrics("coop-run")["test_acc"]
    assert result["num_test_images"] == 6
    report = export_run(fixture("coop-run"), tmp_path / "onnx", head_only=True, seed=0)
    assert report.verified and report.num_classes == 3
    from fastprompt.serve import OnnxClassifier
    x = cache.test_features.float()
    probs = OnnxClassifier(tmp_path / "onnx").predict_proba(x.numpy())
    expected = (run.scale * F.normalize(x, dim=-1) @ F.normalize(run.text_features, dim=-1).T)
    np.testing.assert_allclose(probs, expected.softmax(-1).numpy(), atol=1e-5)


def test_old_softcpt_run_loads_evaluates_and_exports(tmp_path):
    recorded = metrics("softcpt-run")
    runs = load_runs(fixture("softcpt-run"))
    assert [r.task for r in runs] == [t["name"] for t in recorded["tasks"]]
    for i, (run, task) in enumerate(zip(runs, recorded["tasks"])):
        assert run.class_names == task["classnames"]
        cache = load_cache(fixture(f"softcpt-features-{i}.safetensors"))
        result = evaluate_run(fixture("softcpt-run"), cache, task=run.task)
        assert result["tasks"][0]["test_acc"] == task["test_acc"]
    report = export_run(fixture("softcpt-run"), tmp_path / "onnx", task=runs[1].task,
                        head_only=True, seed=0)
    assert report.verified and report.num_classes == 2


def test_old_coop_run_resumes(tmp_path, tiny_clip):
    """The old checkpoint, whose identity holds the old config fields, is the same run to
    today's code: resuming the finished run rewrites the same prompt and metrics."""
    from fastprompt.train import train_run
    run_dir = tmp_path / "run"
    shutil.copytree(fixture("coop-run"), run_dir)
    with open(run_dir / "config.json") as f:
        config = TrainConfig.from_dict(json.load(f))
    model, _, _, tok = tiny_clip
    cache = load_cache(fixture("coop-features.safetensors"))
    resumed = train_run(config, cache, model, tok, run_dir, resume=True, progress=False)
    old = metrics("coop-run")
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in old["epochs"]]
    assert resumed["test_acc"] == old["test_acc"]
    assert torch.equal(load_run(run_dir).text_features, load_run(fixture("coop-run")).text_features)


def test_a_run_resumes_into_a_cache_of_another_fastprompt_version():
    """A run's identity holds its cache's fingerprint; the version that built the cache is not
    part of what makes it the same run, every other entry is."""
    from fastprompt.train.files import RunMismatchError, load_checkpoint, read_checkpoint
    path = os.path.join(fixture("coop-run"), "checkpoint.pt")
    identity = read_checkpoint(path, "coop")["identity"]
    # What today's code computes for that run: the config in today's fields.
    identity = {**identity, "config": TrainConfig.from_dict(identity["config"]).to_dict()}
    rebuilt = {**identity, "cache": {**identity["cache"], "fastprompt_version": "0.2.0"}}
    assert load_checkpoint(path, "coop", rebuilt)["epoch"] == 2
    other = {**identity, "cache": {**identity["cache"], "views": 3}}
    with pytest.raises(RunMismatchError, match="differs in cache"):
        load_checkpoint(path, "coop", other)


def test_run_files_carry_their_format_version_and_learner(tmp_path, cached_shapes):
    """Version 2 files name their format version and learner; a file of a newer version is
    refused by name rather than misread."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fastprompt.train import train_run
    from fastprompt.train.files import FORMAT_VERSION, read_checkpoint, read_prompt_file
    shapes = cached_shapes(3)
    config = TrainConfig(epochs=1, batch_size=8, n_ctx=2)
    train_run(config, shapes.cache, shapes.model, shapes.tokenizer, tmp_path / "run",
              progress=False)
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["format_version"] == FORMAT_VERSION == 2
    prompt = read_prompt_file(tmp_path / "run")
    assert (prompt.learner, prompt.format_version) == ("coop", 2)
    state = read_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), "coop")
    assert (state["format"], state["format_version"], state["learner"]) == (
        "fastprompt.checkpoint", 2, "coop")
    with safe_open(prompt.path, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, prompt.path, metadata={**metadata, "format_version": "3"})
    with pytest.raises(ValueError, match=r"written by a newer fastprompt \(run format 3"):
        read_prompt_file(tmp_path / "run")
