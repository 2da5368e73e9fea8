"""The Learner interface: the worked example of docs/design.md (a CoOp learner with one more
loss term), run as written, trains through the shared loop with every plug-in, resumes, and
loads back; its loss and gradient equal a plain-torch re-implementation written here."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

from fastprompt.models import zeroshot_text_features
from fastprompt.train import LEARNERS, TrainConfig, fit, load_run
from fastprompt.train.learner import learner_class, method_summary
from testlib import assert_close_to_truth

DESIGN = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "docs", "design.md")


@pytest.fixture(scope="module")
def example_learner():
    """The class the worked example defines, by running its code block."""
    with open(DESIGN, encoding="utf-8") as f:
        text = f.read()
    start = text.index("A worked example")
    code = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    namespace = {}
    exec(compile(code, DESIGN, "exec"), namespace)
    return namespace["CloseToCLIP"]


def test_the_example_registers_under_its_name(example_learner):
    assert LEARNERS["close_to_clip"] is example_learner is learner_class("close_to_clip")
    config = TrainConfig(learner="close_to_clip", loss="dspt", epochs=1)
    assert config.describe() == "close_to_clip(dspt)"
    assert method_summary(config)["class_specific"] is False  # CoOp's method keys


@pytest.mark.parametrize("loss, prograd", [("ce", False), ("dspt", True)])
def test_its_loss_and_gradient_match_plain_torch(example_learner, cached_shapes, loss, prograd):
    shapes = cached_shapes(3)
    config = TrainConfig(learner="close_to_clip", loss=loss, prograd=prograd, n_ctx=2,
                         batch_size=5, epochs=1, seed=3)
    learner = example_learner(config, shapes.cache, shapes.model, shapes.tokenizer,
                              torch.device("cpu"))
    order = learner.epoch_order(0)
    batch = order.batch(0, 5)
    encoding = learner.text_encoding(batch)
    text = encoding.encode(encoding.source(), 0, encoding.num_classes)
    got, kl = learner.batch_losses(text, batch)
    assert (kl is not None) == prograd
    (grad,) = torch.autograd.grad(got, learner.ctx)

    # Plain torch: the loss in float64 on the same (float32) prompted text features.
    cache = shapes.cache
    t = learner.prompted().double()
    x = F.normalize(cache.train_features[batch.rows].double(), dim=-1)
    y = cache.train_labels[batch.rows]
    logits = learner.scale.double() * x @ F.normalize(t, dim=-1).T
    p = logits.softmax(-1)
    task = F.nll_loss((p if loss == "dspt" else logits).log_softmax(-1), y)
    clip = zeroshot_text_features(shapes.model, shapes.tokenizer, cache.classnames).double()
    expected = task + 8.0 * (1 - F.cosine_similarity(t, clip, dim=-1).mean())
    (expected_grad,) = torch.autograd.grad(expected, learner.ctx)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert_close_to_truth(grad, expected_grad, 1e-4, 1e-4, "grad ctx")


def test_it_trains_resumes_and_loads_back(example_learner, cached_shapes, tmp_path,
                                          interrupt_at_epoch, monkeypatch):
    shapes = cached_shapes(3)
    config = TrainConfig(learner="close_to_clip", targets="csl", alternate=True, n_ctx=2,
                         batch_size=8, epochs=3)

    def learner():
        return example_learner(config, shapes.cache, shapes.model, shapes.tokenizer,
                               torch.device("cpu"), text_chunk=2)

    whole = fit(learner(), tmp_path / "whole", progress=False)
    interrupt_at_epoch(example_learner, 2)
    with pytest.raises(KeyboardInterrupt):
        fit(learner(), tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    resumed = fit(learner(), tmp_path / "resumed", resume=True, progress=False)
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in whole["epochs"]]
    loaded = load_run(tmp_path / "resumed")
    assert loaded.method["learner"] == "close_to_clip"
    assert torch.equal(loaded.text_features, load_run(tmp_path / "whole").text_features)
    assert whole["test_acc"] == resumed["test_acc"]
