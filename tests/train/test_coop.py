"""The training loop: every method combination trains, resume is exact, runs load back, bad
configs and damaged checkpoints are refused."""
import itertools
import json
import os

import pytest
import torch

from fastprompt.train import TrainConfig, epoch_order, learning_rate, load_run, read_prompt, train_run
from fastprompt.train import CoOpLearner


@pytest.fixture(scope="module")
def setup(cached_shapes):
    """The tiny model (its weights also as a file, so runs can be rebuilt), a 4-class shapes
    set and its cache (shared: read-only)."""
    shared = cached_shapes(4, images_per_class=6, test_images_per_class=3, data_seed=5, views=3,
                           noise_rate=0.25, seed=2)
    return shared.model, shared.tokenizer, shared.cache, shared.weights


def config(weights, **kw):
    base = dict(model="fastprompt-tiny", pretrained=weights, epochs=3, batch_size=8, n_ctx=4)
    base.update(kw)
    return TrainConfig(**base)


COMBINATIONS = [dict(loss=m, targets=t, alternate=a, prograd=p)
                for m, t, a, p in itertools.product(("ce", "dspt"), ("hard", "ls", "csl", "isl"),
                                                    (False, True), (False, True))
                if not (t == "hard" and a)]


@pytest.mark.parametrize("combo", COMBINATIONS, ids=lambda c: TrainConfig(**c).describe())
def test_every_combination_trains(setup, tmp_path, combo):
    model, tok, cache, weights = setup
    cfg = config(weights, epochs=2, **combo)
    metrics = train_run(cfg, cache, model, tok, tmp_path / "run", progress=False)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert torch.isfinite(torch.tensor(e["loss"])) and e["loss"] > 0
        assert 0 <= e["train_acc_clean"] <= 1 and 0 <= e["train_acc_noisy"] <= 1
        assert ("kl_loss" in e) == combo["prograd"]
    # ATLaS alternation with K=2: epoch 1 hard, epoch 2 soft; without it, soft throughout.
    soft = [e["soft_targets"] for e in metrics["epochs"]]
    if combo["targets"] == "hard":
        assert soft == [False, False]
    elif combo["alternate"]:
        assert soft == [False, True]
    else:
        assert soft == [True, True]
    ctx, saved_cfg, classnames, _ = read_prompt(tmp_path / "run")
    assert saved_cfg == cfg and classnames == cache.classnames
    from fastprompt.models import PromptedTextModel
    torch.manual_seed(cfg.seed)  # train_run's initialisation of the context
    initial = PromptedTextModel(model, tok, cache.classnames, n_ctx=4).prompt_learner.ctx.detach()
    assert ctx.shape == initial.shape and not torch.equal(ctx, initial)
    assert torch.isfinite(ctx).all()
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["test_acc"] == metrics["test_acc"] and on_disk["seed"] == cfg.seed
    assert {"torch", "open_clip", "fastprompt"} <= set(on_disk["versions"])


def test_training_learns(setup, tmp_path):
    """On the cached shapes, class-specific prompts fit the training set well above chance."""
    model, tok, cache, weights = setup
    metrics = train_run(config(weights, epochs=30, class_specific=True, lr=0.002), cache, model,
                        tok, tmp_path / "run", progress=False)
    losses = [e["loss"] for e in metrics["epochs"]]
    assert losses[-1] < 0.9 * losses[0]
    assert metrics["epochs"][-1]["train_acc_clean"] > 1 / cache.num_classes + 0.15


@pytest.mark.parametrize("combo", [dict(), dict(loss="dspt", targets="isl", alternate=True,
                                                 prograd=True)], ids=["coop", "dspt+isl+prograd"])
def test_resume_equals_uninterrupted(setup, tmp_path, monkeypatch, interrupt_at_epoch,
                                    combo):
    model, tok, cache, weights = setup
    cfg = config(weights, epochs=4, **combo)
    full = train_run(cfg, cache, model, tok, tmp_path / "full", progress=False)

    interrupt_at_epoch(CoOpLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, cache, model, tok, tmp_path / "cut", progress=False)
    assert not (tmp_path / "cut" / "prompt.safetensors").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="out: .*already holds a training run"):
        train_run(cfg, cache, model, tok, tmp_path / "cut", progress=False)
    resumed = train_run(cfg, cache, model, tok, tmp_path / "cut", resume=True, progress=False)
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in full["epochs"]]
    a = read_prompt(tmp_path / "full")[0]
    b = read_prompt(tmp_path / "cut")[0]
    assert torch.equal(a, b)
    assert resumed["test_acc"] == full["test_acc"]


def test_resume_refuses_other_run_and_damaged_checkpoint(setup, tmp_path):
    model, tok, cache, weights = setup
    train_run(config(weights, epochs=1), cache, model, tok, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="resume: .*different run .*config"):
        train_run(config(weights, epochs=1, lr=0.01), cache, model, tok, tmp_path / "run",
                  resume=True, progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(ValueError, match="resume: checkpoint .*checkpoint.pt.* damaged"):
        train_run(config(weights, epochs=1), cache, model, tok, tmp_path / "run", resume=True,
                  progress=False)


def test_load_run_rebuilds_text_features(setup, tmp_path):
    model, tok, cache, weights = setup
    cfg = config(weights, epochs=2, ctx_init="a photo of a")
    train_run(cfg, cache, model, tok, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    assert run.class_names == cache.classnames and run.model_name == "fastprompt-tiny"
    assert run.text_features.shape == (cache.num_classes, 64)
    assert run.scale == pytest.approx(float(model.logit_scale.exp()), rel=1e-6)
    assert run.method["method"] == "coop" and run.method["name"] == "coop"
    assert run.method["learner"] == "coop" and run.method["loss"] == "ce"
    # The same features the trained prompt gives through the model in this process.
    from fastprompt.models import PromptedTextModel
    prompted = PromptedTextModel(model, tok, cache.classnames, n_ctx=4, ctx_init="a photo of a")
    with torch.no_grad():
        prompted.prompt_learner.ctx.copy_(read_prompt(tmp_path / "run")[0])
        torch.testing.assert_close(run.text_features, prompted().float())


def test_load_run_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="run: .*has no trained prompt"):
        load_run(tmp_path)
    (tmp_path / "prompt.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="run: .*prompt.safetensors.* damaged"):
        load_run(tmp_path)


def test_schedule_and_order_are_pure_functions(setup):
    _, _, cache, weights = setup
    cfg = config(weights, epochs=10, lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
    assert learning_rate(cfg, 0) == 1e-5
    assert learning_rate(cfg, 1) == pytest.approx(0.5 * 0.002 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item()))
    assert learning_rate(cfg, 9) < learning_rate(cfg, 5) < learning_rate(cfg, 1)
    s1, r1 = epoch_order(cfg, cache, 3)
    s2, r2 = epoch_order(cfg, cache, 3)
    s3, _ = epoch_order(cfg, cache, 4)
    assert torch.equal(s1, s2) and torch.equal(r1, r2) and not torch.equal(s1, s3)
    m = cache.num_train_images
    assert sorted(s1.tolist()) == list(range(m))
    assert torch.equal(r1 % m, s1)                       # each row is a view of its own image
    assert torch.equal(cache.train_sample_index[r1], s1)


@pytest.mark.parametrize("kw, match", [
    (dict(learner="clip"), "learner: must be one of"),
    (dict(loss="coop"), "loss: must be one of"),
    (dict(targets="soft"), "targets: must be one of"),
    (dict(alternate=True), "alternate: .*pick --targets"),
    (dict(smoothing=0.0), "smoothing: must lie in"),
    (dict(smoothing=1.5), "smoothing: must lie in"),
    (dict(lam=-1.0), "lam: must be non-negative"),
    (dict(temperature=0.0), "temperature: must be positive"),
    (dict(epochs=0), "epochs: must be at least 1"),
    (dict(n_ctx=0), "n_ctx: must be at least 1"),
    (dict(class_token_position="left"), "class_token_position: must be one of"),
])
def test_bad_config_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
