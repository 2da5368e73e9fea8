"""KgCoOp against a plain-torch re-implementation of its official trainer (``htyao89/KgCoOp:
trainers/kgcoop.py``: ``F.cross_entropy(logits, label) + w * (1 - mean cos(t, t_clip))`` with
``t_clip`` the frozen encoder's features of the hand-made template), composed with DSPT, ATLaS
and ProGrad; chunked and plain text backward agree; a run trains, resumes, loads and exports."""
import pytest
import torch
import torch.nn.functional as F

import fastprompt
from fastprompt.train import KgCoOpLearner, TrainConfig, load_run, train_run
from fastprompt.train.text_backward import ChunkedTextBackward
from testlib import assert_close_to_truth

TEMPLATE = "a blurry photo of a {}."


def official_loss(learner, batch, text, weight, template, double_softmax):
    """The official loss in float64 from the learner's text features ``text`` (C x E)."""
    cache = learner.cache
    clip = torch.cat([learner.model.encode_text(learner.tokenizer([template.format(c)]))
                      for c in cache.classnames]).double()
    t = F.normalize(text.double(), dim=-1)
    x = F.normalize(cache.train_features[batch.rows].double(), dim=-1)
    logits = learner.scale.double() * x @ t.T
    if double_softmax:
        logits = logits.softmax(-1)
    ce = F.cross_entropy(logits, cache.train_labels[batch.rows])
    score = 1.0 - F.cosine_similarity(t, F.normalize(clip, dim=-1), dim=1, eps=1e-7).mean()
    return ce + weight * score


@pytest.mark.parametrize("loss", ["ce", "dspt"])
def test_loss_and_gradient_match_the_official_trainer(cached_shapes, loss, seed):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("kgcoop", loss=loss, kg_weight=3.5, kg_template=TEMPLATE,
                                     batch_size=6, seed=seed % 1000)
    assert (config.n_ctx, config.ctx_init, config.epochs) == (4, "a photo of a", 100)
    learner = KgCoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                            torch.device("cpu"))
    batch = learner.epoch_order(0).batch(0, 6)
    text = learner.step_text_features()
    got, kl = learner.batch_losses(text, batch)
    assert kl is None
    expected = official_loss(learner, batch, text, 3.5, TEMPLATE, loss == "dspt")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, learner.ctx, retain_graph=True)
    (want,) = torch.autograd.grad(expected, learner.ctx)
    assert_close_to_truth(grad, want, 1e-4, 1e-4, "grad ctx")


def test_chunked_backward_equals_plain_with_prograd_and_soft_targets(cached_shapes):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("kgcoop", prograd=True, targets="csl", batch_size=6)
    learner = KgCoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                            torch.device("cpu"))
    batch = learner.epoch_order(0).batch(0, 6)
    learner.ctx.grad = None
    loss, kl = learner.batch_losses(learner.step_text_features(), batch)
    fastprompt.prograd_backward(loss, kl, [learner.ctx])
    plain = learner.ctx.grad.clone()
    learner.ctx.grad = None
    chunked = ChunkedTextBackward(learner.text_encoding(batch), 2)
    loss2, kl2 = learner.batch_losses(chunked.features(), batch)
    chunked.backward(loss2, kl2)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)
    assert_close_to_truth(learner.ctx.grad, plain, 1e-4, 1e-4, "grad ctx")


def test_a_run_trains_resumes_loads_and_records_the_distance(cached_shapes, tmp_path,
                                                            interrupt_at_epoch, monkeypatch):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("kgcoop", epochs=3, batch_size=8, loss="dspt")
    args = (config, shapes.cache, shapes.model, shapes.tokenizer)
    whole = train_run(*args, tmp_path / "whole", progress=False)
    interrupt_at_epoch(KgCoOpLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(*args, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = train_run(*args, tmp_path / "cut", resume=True, progress=False)
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in whole["epochs"]]
    assert whole["method"] == "kgcoop(dspt)" and 0.0 <= whole["knowledge_distance"] <= 2.0
    clf = load_run(tmp_path / "cut")
    assert clf.method["learner"] == "kgcoop" and clf.method["kg_weight"] == 8.0
    assert torch.equal(clf.text_features, load_run(tmp_path / "whole").text_features)
