"""``train_run(compile=True)`` / ``fastprompt train --compile``: the whole CoOp-style step compiled
as one graph (``fullgraph=True``: any graph break raises), trained to the eager loop's prompt.

Tolerance: the compiled step reorders float32 reductions (text encoder, loss, update) and applies
SGD's update with the learning rate as a tensor, so it agrees with the eager loop to float32
rounding, not bitwise. Measured, the prompts differ by about 1e-6 of how far training moved
them; ``assert_same_training`` allows 1e-4 of it. The runs use a large weight decay and
learning rate so that a missing or wrong term of the update (decay, momentum, learning rate)
moves the prompt by far more than that.

Most cases capture with the ``aot_eager`` backend: the same dynamo graph and AOT autograd as
inductor, without its minute of C++ compilation per graph on a small CPU;
``test_inductor_step_matches_eager`` runs the backend ``--compile`` uses on CPU.
"""
import json

import pytest
import torch

from fastprompt.cli import main
from fastprompt.train import TrainConfig, read_prompt, train_run
from fastprompt.train import compiled_step
from fastprompt.train.compiled_step import check_sgd, compile_mode, sgd_update_
from fastprompt.train import CoOpLearner


@pytest.fixture(scope="module")
def setup(cached_shapes):
    """The tiny model (its weights also as a file), a 4-class shapes set and its cache (shared:
    read-only; 24 training images: batches of 10 end in a short one of 4)."""
    shared = cached_shapes(4, images_per_class=6, test_images_per_class=3, data_seed=5, views=3,
                           noise_rate=0.25, seed=2)
    return shared.model, shared.tokenizer, shared.cache, shared.weights


# train_run's default device, and so the mode metrics.json records.
MODE = compile_mode(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture
def capture_only(monkeypatch):
    monkeypatch.setattr(compiled_step, "BACKEND", "aot_eager")


def config(weights, **kw):
    base = dict(model="fastprompt-tiny", pretrained=weights, epochs=2, batch_size=10, n_ctx=4,
                lr=0.05, weight_decay=0.05)
    base.update(kw)
    return TrainConfig(**base)


def initial_context(model, tok, cache, cfg):
    from fastprompt.models import PromptedTextModel
    torch.manual_seed(cfg.seed)  # train_run's initialisation
    return PromptedTextModel(model, tok, cache.classnames, n_ctx=cfg.n_ctx).prompt_learner.ctx.detach()


def assert_same_training(eager_dir, compiled_dir, initial, eager_metrics, compiled_metrics):
    eager, compiled = read_prompt(eager_dir)[0], read_prompt(compiled_dir)[0]
    moved = (eager - initial).abs().max().item()
    assert moved > 1e-2  # training moved the prompt: the comparison below means something
    diff = (compiled - eager).abs().max().item()
    assert diff <= 1e-4 * moved, f"compiled prompt off by {diff:.3g} (training moved it {moved:.3g})"
    for e, c in zip(eager_metrics["epochs"], compiled_metrics["epochs"], strict=True):
        assert c.keys() == e.keys()
        for key in ("loss", "kl_loss"):
            if key in e:
                assert c[key] == pytest.approx(e[key], rel=1e-5), key
        assert (c["lr"], c["soft_targets"]) == (e["lr"], e["soft_targets"])


COMBOS = [dict(), dict(loss="dspt", targets="ls"), dict(loss="dspt", targets="csl"),
          dict(loss="dspt", targets="isl", alternate=True), dict(prograd=True),
          dict(loss="dspt", targets="csl", prograd=True)]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: TrainConfig(**c).describe())
def test_compiled_run_matches_eager(setup, tmp_path, capture_only, combo):
    model, tok, cache, weights = setup
    cfg = config(weights, **combo)
    eager = train_run(cfg, cache, model, tok, tmp_path / "eager", progress=False)
    compiled = train_run(cfg, cache, model, tok, tmp_path / "compiled", progress=False,
                         compile=True)
    assert compiled["compile"] == MODE and eager["compile"] is None
    assert json.loads((tmp_path / "compiled" / "metrics.json").read_text())["compile"] == MODE
    assert_same_training(tmp_path / "eager", tmp_path / "compiled",
                         initial_context(model, tok, cache, cfg), eager, compiled)


def test_inductor_step_matches_eager(setup, tmp_path):
    """The CPU mode of ``--compile`` as shipped: inductor, CoOp with cross-entropy."""
    model, tok, cache, weights = setup
    cfg = config(weights, batch_size=8)
    eager = train_run(cfg, cache, model, tok, tmp_path / "eager", progress=False)
    compiled = train_run(cfg, cache, model, tok, tmp_path / "compiled", progress=False,
                         compile=True)
    assert_same_training(tmp_path / "eager", tmp_path / "compiled",
                         initial_context(model, tok, cache, cfg), eager, compiled)


def test_one_graph_per_batch_shape_and_target_kind(setup, tmp_path, capture_only):
    """Learning rates change every epoch (warm-up, then cosine) without recompiling: one graph
    per batch size and target kind, however many epochs; none from a second run."""
    model, tok, cache, weights = setup
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    train_run(config(weights, epochs=4, batch_size=8), cache, model, tok, tmp_path / "a",
              progress=False, compile=True)
    assert stats["unique_graphs"] - before == 1  # 24 images: three full batches per epoch
    torch._dynamo.reset()
    before = stats["unique_graphs"]
    metrics = train_run(config(weights, epochs=4, loss="dspt", targets="isl", alternate=True),
                        cache, model, tok, tmp_path / "b", progress=False, compile=True)
    assert len({e["lr"] for e in metrics["epochs"]}) == 4
    # Batches of 10 and 4, each in hard and soft epochs.
    assert stats["unique_graphs"] - before == 4


@pytest.mark.parametrize("first_compiled", [True, False], ids=["compiled-then-eager",
                                                                "eager-then-compiled"])
def test_resume_across_compile(setup, tmp_path, monkeypatch, capture_only, first_compiled):
    """``compile`` is not part of a run's identity: a run interrupted with it resumes without it
    (and the reverse) to the uninterrupted eager run's result."""
    model, tok, cache, weights = setup
    cfg = config(weights, epochs=3, prograd=True)
    full = train_run(cfg, cache, model, tok, tmp_path / "full", progress=False)
    real_epoch = CoOpLearner.train_epoch

    def interrupted(self, *, epoch, bar):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, epoch=epoch, bar=bar)

    monkeypatch.setattr(CoOpLearner, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, cache, model, tok, tmp_path / "cut", progress=False, compile=first_compiled)
    monkeypatch.undo()
    monkeypatch.setattr(compiled_step, "BACKEND", "aot_eager")
    resumed = train_run(cfg, cache, model, tok, tmp_path / "cut", resume=True, progress=False,
                        compile=not first_compiled)
    assert resumed["compile"] == (None if first_compiled else MODE)
    assert_same_training(tmp_path / "full", tmp_path / "cut",
                         initial_context(model, tok, cache, cfg), full, resumed)


def test_sgd_update_equals_torch_sgd(seed):
    """The compiled step's update is ``torch.optim.SGD``'s, first step (no momentum buffer yet)
    included, with the learning rate changing between steps."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(5, 7, generator=g)
    grads = [torch.randn(5, 7, generator=g) for _ in range(3)]
    theirs = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=0.05)
    ours, buf, lr = p0.clone(), torch.zeros_like(p0), torch.zeros(())
    for step, grad in enumerate(grads):
        opt.param_groups[0]["lr"] = lr_value = 0.1 / (step + 1)
        theirs.grad = grad.clone()
        opt.step()
        lr.fill_(lr_value)
        sgd_update_([ours], [grad.clone()], [buf], lr, 0.9, 0.05)
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(buf, opt.state[theirs]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_check_sgd_refuses_other_updates():
    p = torch.nn.Parameter(torch.zeros(3))
    assert check_sgd(torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-3)) == {
        "momentum": 0.9, "weight_decay": 1e-3}
    with pytest.raises(ValueError, match="compile: .*SGD.*Adam"):
        check_sgd(torch.optim.Adam([p]))
    with pytest.raises(ValueError, match="compile: SGD with nesterov"):
        check_sgd(torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True))


def test_cli_train_compile(setup, tmp_path, capture_only, capsys):
    model, tok, cache, weights = setup
    rc = main(["train", "--model", "fastprompt-tiny", "--pretrained", weights, "--cache",
               cache.path, "--epochs", "1", "--batch-size", "8", "--n-ctx", "4", "--compile",
               "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["compile"] == MODE


def test_cli_softcpt_refuses_compile(tmp_path, capsys):
    rc = main(["train", "--method", "softcpt", "--data", str(tmp_path), "--compile",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--compile: not supported with --method softcpt" in err
    assert not (tmp_path / "run").exists()
