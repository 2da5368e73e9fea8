"""CoCoOp against a plain-torch re-implementation of its official trainer (``KaiyangZhou/CoOp:
trainers/cocoop.py``: per image, ``ctx + meta_net(x̂)`` in front of every class name, the text
tower per image, ``logit_scale · x̂ · t̂ᵀ``, cross-entropy), batched here; chunked equals plain
for B x C prompts beyond one chunk; a run trains, resumes, evaluates per image, applies to other
class names and exports with the text tower in the graph."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastprompt.pipeline import export_run
from fastprompt.protocols.evaluation import evaluate_run
from fastprompt.serve import OnnxClassifier
from fastprompt.train import CoCoOpLearner, TrainConfig, load_run, train_run
from fastprompt.train.text_backward import ChunkedTextBackward
from fastprompt.train.transfer import with_classnames
from testlib import assert_close_to_truth


def official_loss(learner, images, labels):
    """The official CustomCLIP.forward, one image at a time, float64 after the text tower."""
    model, tok, n_ctx = learner.model, learner.tokenizer, learner.config.n_ctx
    prefix = " ".join(["X"] * n_ctx)
    tokens = tok([f"{prefix} {c}." for c in learner.cache.classnames])
    embeds = model.token_embedding(tokens)
    x = F.normalize(images.float(), dim=-1)
    bias = learner.meta_net(x)
    logits = []
    for x_i, b_i in zip(x, bias):
        ctx_i = (learner.ctx + b_i).unsqueeze(0).expand(len(tokens), -1, -1)
        prompts = torch.cat([embeds[:, :1], ctx_i, embeds[:, 1 + n_ctx:]], dim=1)
        t = model.positional_embedding + prompts
        t = model.transformer(t, attn_mask=model.attn_mask)
        t = model.ln_final(t[torch.arange(len(tokens)), tokens.argmax(-1)]) @ model.text_projection
        logits.append(learner.scale.double() * x_i.double() @ F.normalize(t.double(), dim=-1).T)
    return F.cross_entropy(torch.stack(logits), labels)


def test_loss_and_gradients_match_the_official_trainer(cached_shapes, seed):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("cocoop", batch_size=5, seed=seed % 1000)
    assert (config.n_ctx, config.ctx_init, config.epochs, config.batch_size) == (
        4, "a photo of a", 10, 5)
    learner = CoCoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                            torch.device("cpu"))
    assert sorted(learner.trainable()) == ["ctx", "meta_net.linear1.bias",
                                           "meta_net.linear1.weight", "meta_net.linear2.bias",
                                           "meta_net.linear2.weight"]
    batch = learner.epoch_order(0).batch(0, 5)
    encoding = learner.text_encoding(batch)
    assert encoding.num_classes == 5 * 3
    loss, kl = learner.batch_losses(encoding.encode(encoding.source(), 0, 15), batch)
    assert kl is None
    images = shapes.cache.train_features[batch.rows]
    expected = official_loss(learner, images, shapes.cache.train_labels[batch.rows])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    params = [learner.ctx, learner.meta_net.linear2.weight, learner.meta_net.linear1.bias]
    for p, got, want in zip(["ctx", "linear2.weight", "linear1.bias"],
                            torch.autograd.grad(loss, params, retain_graph=True),
                            torch.autograd.grad(expected, params)):
        assert_close_to_truth(got, want, 1e-4, 1e-4, p)


def test_chunked_equals_plain_beyond_one_chunk(cached_shapes):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("cocoop", batch_size=4, loss="dspt", targets="ls")
    learner = CoCoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                            torch.device("cpu"))
    params = list(learner.trainable().values())
    batch = learner.epoch_order(1).batch(0, 4)
    encoding = learner.text_encoding(batch)
    loss, _ = learner.batch_losses(encoding.encode(encoding.source(), 0, 12), batch)
    plain = torch.autograd.grad(loss, params)
    chunked = ChunkedTextBackward(learner.text_encoding(batch), 5)  # 5 + 5 + 2 rows
    loss2, _ = learner.batch_losses(chunked.features(), batch)
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=1e-7)
    for name, a, b in zip(learner.trainable(), chunked.parameter_gradients([loss2])[0], plain):
        assert_close_to_truth(a, b, 1e-4, 1e-4, name)


def test_a_run_resumes_evaluates_transfers_and_exports(cached_shapes, tmp_path,
                                                       interrupt_at_epoch, monkeypatch):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("cocoop", epochs=3, batch_size=8)
    args = (config, shapes.cache, shapes.model, shapes.tokenizer)
    whole = train_run(*args, tmp_path / "whole", progress=False)
    interrupt_at_epoch(CoCoOpLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(*args, tmp_path / "cut", progress=False, text_chunk=4)
    monkeypatch.undo()
    resumed = train_run(*args, tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(resumed["epochs"], whole["epochs"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    clf = load_run(tmp_path / "whole")
    assert clf.head is not None
    x = shapes.cache.test_features
    assert evaluate_run(tmp_path / "whole", shapes.cache)["test_acc"] == whole["test_acc"]
    # Other class names: the same meta network conditions each image's prompts for them.
    names = list(reversed(shapes.cache.classnames))
    other = with_classnames(clf, names)
    torch.testing.assert_close(other.logits(x), clf.logits(x).flip(1), rtol=1e-5, atol=1e-5)
    # Export: the text tower in the graph, checked against torch; probs within 1e-4.
    report = export_run(tmp_path / "whole", tmp_path / "onnx", head_only=True, seed=0)
    assert report.verified
    probs = OnnxClassifier(tmp_path / "onnx").predict_proba(x.float().numpy())
    np.testing.assert_allclose(probs, clf.logits(x).softmax(-1).numpy(), atol=1e-4)
