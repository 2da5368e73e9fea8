"""DePT as a plug-in (``--dept``) against a plain-torch re-implementation of its official code
(``Koorye/DePT: trainers/elp_coop.py``): ``(1 - w) CE(similarity) + w CE(linear_probe_proj(
[FiLM_t(t_y); FiLM_x(x)]), [y; y])``, the head learning at 6.5 times the rate; at test the
training classes fuse ``(1 - w) similarity + w head(FiLM_x(x))`` in evaluation and export, and
other class names use the similarity alone."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastprompt.pipeline import export_run
from fastprompt.protocols.evaluation import evaluate_run
from fastprompt.serve import OnnxClassifier
from fastprompt.train import CoOpLearner, TrainConfig, load_run, train_run, train_softcpt_run
from fastprompt.train.epoch import set_epoch_lr
from fastprompt.train.files import read_prompt_file
from fastprompt.train.transfer import with_classnames
from testlib import assert_close_to_truth

HEAD = ["film_lp_img.bias", "film_lp_img.scale", "film_lp_text.bias", "film_lp_text.scale",
        "linear_probe_proj.bias", "linear_probe_proj.weight"]


def learner_with_head(shapes, **fields):
    config = TrainConfig(dept=True, n_ctx=2, batch_size=6, **fields)
    learner = CoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                          torch.device("cpu"))
    with torch.no_grad():  # a head away from its initial identity FiLM
        g = torch.Generator().manual_seed(5)
        for p in learner.objective.dept.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return learner


def test_loss_and_gradients_match_the_official_code(cached_shapes):
    shapes = cached_shapes(3)
    learner = learner_with_head(shapes, dept_weight=0.7)
    assert sorted(learner.trainable()) == sorted(["ctx", *HEAD])
    batch = learner.epoch_order(0).batch(0, 6)
    text = learner.step_text_features()
    loss, _ = learner.batch_losses(text, batch)

    head = learner.objective.dept
    cache = shapes.cache
    t, x = text.double(), cache.train_features[batch.rows].double()
    y = cache.train_labels[batch.rows]
    sim = learner.scale.double() * F.normalize(x, dim=-1) @ F.normalize(t, dim=-1).T

    def film(module, v):
        return module.scale.double() * v + module.bias.double()

    feats = torch.cat([film(head.film_lp_text, t[y]), film(head.film_lp_img, x)])
    linear = feats @ head.linear_probe_proj.weight.double().T + head.linear_probe_proj.bias.double()
    expected = 0.3 * F.cross_entropy(sim, y) + 0.7 * F.cross_entropy(linear, torch.cat([y, y]))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    params = [learner.ctx, head.linear_probe_proj.weight, head.film_lp_img.scale]
    for name, got, want in zip(["ctx", "linear_probe_proj.weight", "film_lp_img.scale"],
                               torch.autograd.grad(loss, params, retain_graph=True),
                               torch.autograd.grad(expected, params)):
        assert_close_to_truth(got, want, 1e-4, 1e-4, name)


def test_the_head_learns_at_its_scaled_rate(cached_shapes):
    learner = learner_with_head(cached_shapes(3), lr=0.002, dept_lr_scale=6.5)
    set_epoch_lr(learner.config, learner.optimizer, 3)
    rates = sorted(group["lr"] for group in learner.optimizer.param_groups)
    assert len(rates) == 2 and rates[1] == pytest.approx(6.5 * rates[0])


def test_a_run_evaluates_and_exports_the_fused_head(cached_shapes, tmp_path):
    shapes = cached_shapes(3)
    config = TrainConfig(dept=True, n_ctx=2, epochs=2, batch_size=8)
    metrics = train_run(config, shapes.cache, shapes.model, shapes.tokenizer, tmp_path / "run",
                        progress=False)
    assert sorted(read_prompt_file(tmp_path / "run").tensors) == sorted(["ctx", *HEAD])
    clf = load_run(tmp_path / "run")
    assert clf.fused is not None and clf.fused.similarity_weight == pytest.approx(0.3)
    x, labels = shapes.cache.test_features.float(), shapes.cache.test_labels
    fused = clf.fused.logits(x, clf.text_features)
    assert metrics["test_acc"] == int((fused.argmax(1) == labels).sum()) / len(labels)
    assert evaluate_run(tmp_path / "run", shapes.cache)["test_acc"] == metrics["test_acc"]

    report = export_run(tmp_path / "run", tmp_path / "onnx", head_only=True, seed=0)
    assert report.verified
    probs = OnnxClassifier(tmp_path / "onnx").predict_proba(x.numpy())
    np.testing.assert_allclose(probs, fused.softmax(-1).numpy(), atol=1e-5)

    names = list(reversed(shapes.cache.classnames))
    other = with_classnames(clf, names)
    assert other.fused is None  # other class names: the similarity alone


def test_softcpt_gets_a_head_per_task(cached_shapes_tasks, tmp_path):
    shared = cached_shapes_tasks()
    tasks = list(shared.tasks[:2])
    config = TrainConfig(learner="softcpt", dept=True, n_ctx=2, epochs=1, batch_size=8)
    train_softcpt_run(config, tasks, shared.model, shared.tokenizer, tmp_path / "run",
                      progress=False)
    names = read_prompt_file(tmp_path / "run").tensors
    assert {f"tasks.{i}.{k}" for i in range(2) for k in HEAD} <= set(names)


def test_compile_is_refused_with_dept(cached_shapes, tmp_path):
    shapes = cached_shapes(3)
    config = TrainConfig(dept=True, epochs=1)
    with pytest.raises(ValueError, match="compile: .*DePT"):
        train_run(config, shapes.cache, shapes.model, shapes.tokenizer, tmp_path / "r",
                  compile=True, progress=False)
