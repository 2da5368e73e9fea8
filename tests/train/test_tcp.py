"""TCP against a plain-torch re-implementation of its official trainer (``htyao89/Textual-
based_Class-aware_prompt_tuning: trainers/tcp.py``): the meta network's class-aware tokens
replace the context's hidden states (prefix | tokens | suffix) before text layer ``tcp_layer``,
and the loss is ``CE + w (1 - mean cos(t, t_clip))``. A run trains, resumes, loads, applies to
other class names, and exports with parity."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastprompt.pipeline import export_run
from fastprompt.serve import OnnxClassifier
from fastprompt.train import TCPLearner, TrainConfig, load_run, train_run
from fastprompt.train.transfer import with_classnames
from fastprompt.train.text_backward import ChunkedTextBackward
from testlib import assert_close_to_truth


def official_text_features(learner, layer):
    """The official TextEncoder with ``resblocks([x, class_feature, weight, counter])``: the
    class-aware tokens from ``meta_net(text_features)`` written over positions 1..n_ctx before
    block ``layer``; full context length, float64."""
    model, tok, n_ctx = learner.model, learner.tokenizer, learner.config.n_ctx
    prefix = " ".join(["X"] * n_ctx)
    tokens = tok([f"{prefix} {c}." for c in learner.cache.classnames])
    x = model.token_embedding(tokens).double()
    x = torch.cat([x[:, :1], learner.ctx.double().expand(len(tokens), -1, -1),
                   x[:, 1 + n_ctx:]], dim=1)
    meta = copy.deepcopy(learner.meta_net).double()
    class_feature = meta(learner.clip_text.double()).reshape(len(tokens), n_ctx, -1)
    x = x + model.positional_embedding.double()
    blocks = copy.deepcopy(model.transformer).double()
    for i, block in enumerate(blocks.resblocks):
        if i == layer:
            x = torch.cat([x[:, :1], class_feature, x[:, 1 + n_ctx:]], dim=1)
        x = block(x, attn_mask=model.attn_mask.double())
    x = copy.deepcopy(model.ln_final).double()(x[torch.arange(len(tokens)), tokens.argmax(-1)])
    return x @ model.text_projection.double(), meta


def test_text_features_loss_and_gradients_match_the_official_trainer(cached_shapes, seed):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("tcp", tcp_layer=1, n_ctx=3, batch_size=6,
                                     seed=seed % 1000)
    assert (config.optimizer, config.epochs, config.ctx_init) == ("adam", 50, None)
    learner = TCPLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                         torch.device("cpu"))
    assert isinstance(learner.optimizer, torch.optim.Adam)
    assert sorted(learner.trainable()) == ["ctx", "meta_net.linear1.bias",
                                           "meta_net.linear1.weight", "meta_net.linear2.bias",
                                           "meta_net.linear2.weight"]
    text = learner.step_text_features()
    want_text, meta = official_text_features(learner, 1)
    torch.testing.assert_close(text.double(), want_text, rtol=1e-5, atol=1e-5)

    batch = learner.epoch_order(0).batch(0, 6)
    loss, _ = learner.batch_losses(text, batch)
    cache = shapes.cache
    t = F.normalize(want_text, dim=-1)
    x = F.normalize(cache.train_features[batch.rows].double(), dim=-1)
    ce = F.cross_entropy(learner.scale.double() * x @ t.T, cache.train_labels[batch.rows])
    score = 1.0 - F.cosine_similarity(t, learner.clip_text.double(), dim=1, eps=1e-7).mean()
    expected = ce + 8.0 * score
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, [learner.meta_net.linear2.weight, learner.ctx])
    want = torch.autograd.grad(expected, [meta.linear2.weight])[0]
    assert_close_to_truth(got[0], want, 1e-4, 1e-4, "grad meta_net.linear2.weight")
    assert got[1].abs().sum() > 0  # the context still counts before the layer


def test_chunked_backward_equals_plain(cached_shapes):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("tcp", tcp_layer=1, n_ctx=2, batch_size=6, prograd=True)
    learner = TCPLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                         torch.device("cpu"))
    params = list(learner.trainable().values())
    batch = learner.epoch_order(0).batch(0, 6)
    loss, kl = learner.batch_losses(learner.step_text_features(), batch)
    plain = torch.autograd.grad(loss, params)
    chunked = ChunkedTextBackward(learner.text_encoding(batch), 2)
    loss2, kl2 = learner.batch_losses(chunked.features(), batch)
    grads = chunked.parameter_gradients([loss2])[0]
    for name, a, b in zip(learner.trainable(), grads, plain):
        assert_close_to_truth(a, b, 1e-4, 1e-4, name)


def test_a_run_resumes_loads_transfers_and_exports(cached_shapes, tmp_path, interrupt_at_epoch,
                                                   monkeypatch):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("tcp", tcp_layer=1, n_ctx=2, epochs=3, batch_size=8)
    args = (config, shapes.cache, shapes.model, shapes.tokenizer)
    whole = train_run(*args, tmp_path / "whole", progress=False)
    interrupt_at_epoch(TCPLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(*args, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = train_run(*args, tmp_path / "cut", resume=True, progress=False)
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in whole["epochs"]]
    clf = load_run(tmp_path / "cut")
    assert torch.equal(clf.text_features, load_run(tmp_path / "whole").text_features)
    # Its own class names through text_features_for give its own features back.
    names = list(shapes.cache.classnames)
    again = with_classnames(clf, list(reversed(names)))
    torch.testing.assert_close(again.text_features, clf.text_features.flip(0), rtol=1e-5,
                               atol=1e-6)
    report = export_run(tmp_path / "cut", tmp_path / "onnx", head_only=True, seed=0)
    assert report.verified
    x = shapes.cache.test_features.float()
    probs = OnnxClassifier(tmp_path / "onnx").predict_proba(x.numpy())
    expected = (clf.scale * F.normalize(x, dim=-1) @ F.normalize(clf.text_features, dim=-1).T)
    np.testing.assert_allclose(probs, expected.softmax(-1).numpy(), atol=1e-5)


def test_a_layer_outside_the_tower_is_refused(cached_shapes):
    shapes = cached_shapes(3)
    config = TrainConfig.for_learner("tcp", tcp_layer=8)
    with pytest.raises(ValueError, match=r"tcp_layer: 8 is not a layer of this text tower"):
        TCPLearner(config, shapes.cache, shapes.model, shapes.tokenizer, torch.device("cpu"))
