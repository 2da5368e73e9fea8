"""The label-noise losses as learners' losses (``--loss gce|mae``: PTNL's GCE, NLPrompt's MAE)
and NLPrompt's per-epoch split (``--nlprompt``), against plain-torch re-implementations of the
official trainers (``CEWu/PTNL: trainers/loss.py``, ``qunovo/NLPrompt: trainers/nlprompt.py``
with ``utils.py``'s ``OT_PL``); every learner takes them; runs resume to the uninterrupted
result."""
import pytest
import torch
import torch.nn.functional as F

from fastprompt.train import (CoCoOpLearner, CoOpLearner, KgCoOpLearner, TrainConfig, load_run,
                              train_run, train_softcpt_run)
from testlib import assert_close_to_truth


def plain_gce(logits, labels, q, double_softmax=False):
    """PTNL's ``GeneralizedCrossEntropy``: mean of ``(1 - p_y^q) / q`` (q = 1: MAE)."""
    p = logits.softmax(-1)
    if double_softmax:
        p = p.softmax(-1)
    return ((1 - p.gather(1, labels[:, None]).squeeze(1) ** q) / q).mean()


def similarity_logits(learner, rows, text):
    t = F.normalize(text.double(), dim=-1)
    x = F.normalize(learner.cache.train_features[rows].double(), dim=-1)
    return learner.scale.double() * x @ t.T


@pytest.mark.parametrize("loss,q,double_softmax", [("gce", 0.5, False), ("gce", 0.7, False),
                                                    ("mae", 1.0, False)])
def test_gce_and_mae_match_ptnl_loss(cached_shapes, loss, q, double_softmax, seed):
    shapes = cached_shapes(3, noise_rate=0.25)
    config = TrainConfig(loss=loss, gce_q=q, batch_size=7, seed=seed % 1000)
    learner = CoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                          torch.device("cpu"))
    batch = learner.epoch_order(0).batch(0, 7)
    text = learner.step_text_features()
    got, kl = learner.batch_losses(text, batch)
    assert kl is None
    labels = shapes.cache.train_labels[batch.rows]
    want = plain_gce(similarity_logits(learner, batch.rows, text), labels, q, double_softmax)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, learner.ctx, retain_graph=True)
    (ref,) = torch.autograd.grad(want, learner.ctx)
    assert_close_to_truth(grad, ref, 1e-4, 1e-5, "grad ctx")


def test_gce_composes_with_every_learner_and_prograd(cached_shapes):
    shapes = cached_shapes(3, noise_rate=0.25)
    for cls, learner_name in ((KgCoOpLearner, "kgcoop"), (CoCoOpLearner, "cocoop")):
        config = TrainConfig.for_learner(learner_name, loss="gce", prograd=True, batch_size=4)
        learner = cls(config, shapes.cache, shapes.model, shapes.tokenizer, torch.device("cpu"))
        batch = learner.epoch_order(0).batch(0, 4)
        loss, kl = learner.batch_losses(learner.text_encoding(batch).encode(
            learner.text_encoding(batch).source(), 0,
            learner.text_encoding(batch).num_classes), batch)
        assert torch.isfinite(loss) and torch.isfinite(kl) and loss.requires_grad
        assert config.describe() == f"{learner_name}(gce)+prograd"


def test_config_names_and_refusals():
    assert TrainConfig(loss="gce").describe() == "gce"
    assert TrainConfig(loss="mae", nlprompt=False).method == "mae"
    assert TrainConfig(loss="dspt", nlprompt=True, dept=True).describe() == "dspt+dept+nlprompt"
    with pytest.raises(ValueError, match="gce_q"):
        TrainConfig(loss="gce", gce_q=0.0)
    with pytest.raises(ValueError, match="nlprompt.*not gce"):
        TrainConfig(loss="gce", nlprompt=True)
    with pytest.raises(ValueError, match="ot_reg"):
        TrainConfig(nlprompt=True, ot_reg=0.0)


# -- NLPrompt ----------------------------------------------------------------------------------


def plain_nlprompt_split(learner, epoch, reg):
    """The official split, re-implemented: each image's view this epoch, its probabilities
    under the current prompt, POT's Sinkhorn of cost ``-log_softmax(p)`` between uniform
    marginals, each row's argmax; kept where it equals the given label."""
    ot = pytest.importorskip("ot")
    cache = learner.cache
    m = cache.num_train_images
    order = learner.epoch_order(epoch)
    rows = torch.empty_like(order.rows)
    rows[order.samples] = order.rows
    with torch.no_grad():
        p = similarity_logits(learner, rows, learner.step_text_features()).softmax(-1)
    cost = -torch.log_softmax(p, dim=1)
    a = torch.full((m,), 1.0 / m, dtype=torch.float64)
    b = torch.full((p.shape[1],), 1.0 / p.shape[1], dtype=torch.float64)
    coupling = ot.sinkhorn(a, b, cost, reg=reg, method="sinkhorn_log", numItermax=1000,
                           stopThr=1e-6)
    return coupling.argmax(1) == cache.train_labels[:m]


def test_nlprompt_split_and_losses_match_the_official_trainer(cached_shapes, seed):
    shapes = cached_shapes(4, images_per_class=6, noise_rate=0.4, seed=2)
    config = TrainConfig(nlprompt=True, ot_reg=0.01, batch_size=9, seed=seed % 1000)
    learner = CoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                          torch.device("cpu"))
    order = learner.epoch_order(0)
    kept = order.options["q"] == 0
    assert torch.equal(kept, plain_nlprompt_split(learner, 0, 0.01))
    record = order.summary()
    m = shapes.cache.num_train_images
    assert record["nlprompt_kept"] == pytest.approx(float(kept.float().mean()))
    correct = shapes.cache.train_labels[:m] == shapes.cache.train_clean_labels[:m]
    if kept.any():
        assert record["nlprompt_kept_precision"] == pytest.approx(
            float((kept & correct).sum() / kept.sum()))
    # A batch: the kept rows' cross-entropy and the others' MAE, averaged over the batch.
    batch = order.batch(0, 9)
    text = learner.step_text_features()
    got, _ = learner.batch_losses(text, batch)
    logits = similarity_logits(learner, batch.rows, text)
    labels = shapes.cache.train_labels[batch.rows]
    per_row = torch.where(kept[batch.samples],
                          F.cross_entropy(logits, labels, reduction="none"),
                          1 - logits.softmax(-1).gather(1, labels[:, None]).squeeze(1))
    torch.testing.assert_close(got.double(), per_row.mean(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, learner.ctx, retain_graph=True)
    (ref,) = torch.autograd.grad(per_row.mean(), learner.ctx)
    assert_close_to_truth(grad, ref, 1e-4, 1e-5, "grad ctx")


def test_nlprompt_runs_on_every_learner_and_resumes(cached_shapes, tmp_path, interrupt_at_epoch,
                                                    monkeypatch):
    shapes = cached_shapes(3, noise_rate=0.34)
    config = TrainConfig(nlprompt=True, loss="dspt", epochs=3, batch_size=8)
    args = (config, shapes.cache, shapes.model, shapes.tokenizer)
    whole = train_run(*args, tmp_path / "whole", progress=False)
    interrupt_at_epoch(CoOpLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(*args, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = train_run(*args, tmp_path / "cut", resume=True, progress=False)
    assert resumed["epochs"] == [{**e, "seconds": r["seconds"]}
                                 for e, r in zip(whole["epochs"], resumed["epochs"])]
    assert whole["method"] == "dspt+nlprompt"
    for epoch in whole["epochs"]:
        assert 0.0 <= epoch["nlprompt_kept"] <= 1.0
        assert 0.0 <= epoch["nlprompt_pseudo_acc"] <= 1.0
    assert torch.equal(load_run(tmp_path / "cut").text_features,
                       load_run(tmp_path / "whole").text_features)
    cocoop = TrainConfig.for_learner("cocoop", nlprompt=True, epochs=1, batch_size=4)
    metrics = train_run(cocoop, shapes.cache, shapes.model, shapes.tokenizer, tmp_path / "cocoop",
                        progress=False)
    assert metrics["method"] == "cocoop+nlprompt" and "nlprompt_kept" in metrics["epochs"][0]


def test_nlprompt_refuses_the_compiled_step(cached_shapes):
    shapes = cached_shapes(3)
    with pytest.raises(ValueError, match="compile"):
        CoOpLearner(TrainConfig(nlprompt=True), shapes.cache, shapes.model, shapes.tokenizer,
                    torch.device("cpu"), compile=True)


def test_softcpt_splits_each_task_on_its_own_classes(cached_shapes_tasks, tmp_path):
    shared = cached_shapes_tasks(noise_rate=0.25, seed=2)
    tasks = list(shared.tasks[:2])
    config = TrainConfig(learner="softcpt", nlprompt=True, ot_reg=0.01, n_ctx=2, epochs=1,
                         batch_size=8)
    metrics = train_softcpt_run(config, tasks, shared.model, shared.tokenizer, tmp_path / "run",
                                progress=False)
    epoch = metrics["epochs"][0]
    assert len(epoch["task_nlprompt_kept"]) == 2
    assert epoch["nlprompt_kept"] == pytest.approx(sum(epoch["task_nlprompt_kept"]) / 2)
