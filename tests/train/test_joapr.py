"""JoAPR (``--joapr``) against a plain-torch (float64) re-implementation of its official trainer
(``yunncheng/JoAPR: trainers/joapr.py``: ``eval_train``'s split with sklearn's
``GaussianMixture``, ``forward_backward``'s refined and sharpened targets, mixup, soft
cross-entropy and uniform-prior penalty, ``forward_backward_x``'s warm-up), with the mixup on
the cached features; every learner takes it; runs resume to the uninterrupted result."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastprompt.cli import main
from fastprompt.train import (CoCoOpLearner, CoOpLearner, KgCoOpLearner, TrainConfig, load_run,
                              train_run, train_softcpt_run)
from fastprompt.train.epoch import epoch_order, view_rows
from fastprompt.train.joapr import fit_two_gaussians, mixup_draw
from testlib import assert_close_to_truth

mixture = pytest.importorskip("sklearn.mixture")

GMM = dict(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4)  # the official settings


# -- the official trainer, re-implemented ---------------------------------------------------


def best_two_means(x: np.ndarray) -> np.ndarray:
    """The 0/1 partition of least within-cluster squares, by trying every cut of the sorted
    values."""
    order = np.argsort(x)
    xs = x[order]
    sse = [((xs[:k] - xs[:k].mean()) ** 2).sum() + ((xs[k:] - xs[k:].mean()) ** 2).sum()
           for k in range(1, len(xs))]
    labels = np.zeros(len(x), dtype=int)
    labels[order[int(np.argmin(sse)) + 1:]] = 1
    return labels


def official_mixture(x: np.ndarray):
    """sklearn's GaussianMixture with the official settings, started from the responsibilities
    of the optimal two-means partition (the official code starts from a random k-means run,
    which on clear two-cluster data reaches that partition)."""
    resp = np.eye(2)[best_two_means(x)]
    nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
    means = resp.T @ x / nk
    var = (resp * (x[:, None] - means) ** 2).sum(0) / nk + GMM["reg_covar"]
    gmm = mixture.GaussianMixture(**GMM, weights_init=nk / len(x), means_init=means[:, None],
                                  precisions_init=(1 / var)[:, None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=10 may stop before convergence, as officially
        gmm.fit(x[:, None])
    return gmm


def official_split(history: list, previous_threshold: float):
    """``eval_train``'s split from the normalised losses of the main epochs so far: the clean
    component's posterior, the kept images and the new noise-rate threshold."""
    loss = torch.stack(history[-5:]).mean(0).numpy()
    gmm = official_mixture(loss)
    prob = gmm.predict_proba(loss[:, None])
    mean, std = gmm.means_.reshape(-1), gmm.covariances_.reshape(-1)  # "std": the variances
    clean, noise = mean.argmin(), mean.argmax()
    a = std[noise] ** 2 - std[clean] ** 2
    b = 2 * ((mean[noise] * std[clean] ** 2) - (mean[clean] * std[noise] ** 2))
    c = ((mean[clean] * std[noise]) ** 2 - (mean[noise] * std[clean]) ** 2
         + 2 * ((std[noise] * std[clean]) ** 2) * np.log(2 * std[clean] / std[noise] + 1e-8))
    with np.errstate(invalid="ignore"):
        thres = (-b + np.sqrt(b ** 2 - 4 * a * c)) / (2 * a + 1e-10)
    pred_1 = loss < thres
    prob = prob[:, clean]
    n = len(prob)
    noise_rate = (n - np.count_nonzero(prob > previous_threshold)) / n
    pred_2 = prob > noise_rate
    return torch.from_numpy(prob), torch.from_numpy(pred_1 | pred_2), noise_rate


def sharpen(p, t):
    p = p ** t
    return p / p.sum(1, keepdim=True)


def similarity_logits(learner, rows, text):
    t = F.normalize(text.double(), dim=-1)
    x = F.normalize(learner.cache.train_features[rows].double(), dim=-1)
    return learner.scale.double() * x @ t.T


def epoch_logits(learner, epoch):
    """The current prompt's logits of each training image's view this epoch, by image."""
    samples, rows = epoch_order(learner.config, learner.cache, epoch)
    with torch.no_grad():
        return similarity_logits(learner, view_rows(samples, rows), learner.step_text_features())


def normalised_losses(logits, labels):
    p = logits.softmax(-1)
    loss = F.cross_entropy(logits, labels, reduction="none") - (p * p.log()).sum(1)
    return (loss - loss.min()) / (loss.max() - loss.min())


def prior_penalty(logits):
    c = logits.shape[1]
    mean_p = logits.softmax(-1).mean(0)
    return (torch.full((c,), 1 / c, dtype=logits.dtype) * torch.log((1 / c) / mean_p)).sum()


# -- the mixture ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_low,n_high", [(60, 20), (25, 40)])
def test_mixture_agrees_with_sklearn_on_a_bimodal_set(seed, n_low, n_high):
    g = torch.Generator().manual_seed(seed % 2**31)
    x = torch.cat([0.25 * torch.rand(n_low, generator=g), 0.6 + 0.4 * torch.rand(n_high, generator=g)])
    x = x[torch.randperm(len(x), generator=g)].double()
    ours = fit_two_gaussians(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = mixture.GaussianMixture(**GMM, random_state=seed % 2**31).fit(x.numpy()[:, None])
    ours_order, theirs_order = ours.means.argsort(), np.argsort(theirs.means_.reshape(-1))
    posterior = theirs.predict_proba(x.numpy()[:, None])[:, theirs_order]
    # The split (the clean component's posterior above one half) agrees, so do the parameters.
    assert torch.equal(ours.posterior[:, ours_order[0]] > 0.5,
                       torch.from_numpy(posterior[:, 0] > 0.5))
    torch.testing.assert_close(ours.means[ours_order],
                               torch.from_numpy(theirs.means_.reshape(-1)[theirs_order]),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.variances[ours_order],
                               torch.from_numpy(theirs.covariances_.reshape(-1)[theirs_order]),
                               rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.posterior[:, ours_order], torch.from_numpy(posterior),
                               rtol=1e-6, atol=1e-9)
    assert (x[ours.posterior[:, ours_order[0]] > 0.5] < 0.5).all()


# -- one epoch's split and targets, one batch's loss -----------------------------------------


@pytest.fixture
def noisy_learner(cached_shapes):
    def make(loss="ce", **fields):
        shapes = cached_shapes(3, noise_rate=0.34)
        config = TrainConfig(joapr=True, loss=loss, batch_size=5, epochs=4, **fields)
        return CoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                           torch.device("cpu"))
    return make


def perturb(learner, seed):
    """Stand-in for an epoch of training: move the context."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        learner.ctx.add_(0.5 * torch.randn(learner.ctx.shape, generator=g))


def test_split_and_targets_match_the_official_eval_train(noisy_learner, seed):
    learner = noisy_learner(joapr_warmup=1, joapr_temperature=3.0, seed=seed % 1000)
    cache, m = learner.cache, learner.cache.num_train_images
    labels = cache.train_labels[:m]
    assert learner.epoch_order(0).summary() == {}  # warm-up: no split
    history, previous = [], 0.5
    for epoch in (1, 2, 3):
        perturb(learner, seed % 1000 + epoch)
        logits = epoch_logits(learner, epoch)
        history.append(normalised_losses(logits, labels))
        prob, kept, previous = official_split(history, previous)
        p = logits.softmax(-1)
        w = prob if epoch == 1 else prob * p.gather(1, labels[:, None]).squeeze(1)
        w = w[:, None]
        refined = torch.where(kept[:, None], w * F.one_hot(labels, 3) + (1 - w) * p, p)
        order = learner.epoch_order(epoch)
        joapr = order.options["joapr"]
        assert torch.equal(joapr.kept, kept), epoch
        torch.testing.assert_close(joapr.targets.double(), sharpen(refined, 3.0), rtol=1e-5,
                                   atol=1e-6)
        record = order.summary()
        assert record["joapr_noise_rate"] == pytest.approx(previous)
        assert record["joapr_kept"] == pytest.approx(float(kept.double().mean()))
        correct = labels == cache.train_clean_labels[:m]
        if kept.any():
            assert record["joapr_kept_precision"] == pytest.approx(
                float((kept & correct).sum() / kept.sum()))
        # Computing an epoch again gives the same split (the history is kept by epoch).
        assert torch.equal(learner.epoch_order(epoch).options["joapr"].kept, kept)


@pytest.mark.parametrize("loss", ["ce", "dspt"])
def test_batch_loss_and_gradient_match_the_official_forward_backward(noisy_learner, loss, seed):
    # A wide Beta makes the mixup weight non-trivial (the official 0.001 draws λ ≈ 1).
    learner = noisy_learner(loss, joapr_warmup=0, joapr_mixup_beta=4.0,
                            joapr_prior_weight=0.7, seed=seed % 1000)
    order = learner.epoch_order(0)
    batch = order.batch(5, 10)
    assert batch.step == 1
    text = learner.step_text_features()
    got, kl = learner.batch_losses(text, batch)
    assert kl is None
    lam, perm = mixup_draw(learner.config.seed, 0, 1, 5, 4.0)
    assert 0.5 <= lam < 1.0
    x = F.normalize(learner.cache.train_features[batch.rows].double(), dim=-1)
    mixed_x = lam * x + (1 - lam) * x[perm]
    targets = order.options["joapr"].targets.double()[batch.samples]
    mixed_t = lam * targets + (1 - lam) * targets[perm]
    logits = learner.scale.double() * F.normalize(mixed_x, dim=-1) @ F.normalize(
        text.double(), dim=-1).T
    scores = logits.softmax(-1) if loss == "dspt" else logits
    want = (-(F.log_softmax(scores, dim=1) * mixed_t).sum(1).mean()
            + 0.7 * prior_penalty(logits))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, learner.ctx, retain_graph=True)
    (ref,) = torch.autograd.grad(want, learner.ctx)
    assert_close_to_truth(grad, ref, 1e-4, 1e-5, "grad ctx")


def test_warmup_batch_is_the_official_forward_backward_x(noisy_learner, seed):
    learner = noisy_learner(joapr_warmup=2, joapr_confidence_penalty=0.3, seed=seed % 1000)
    batch = learner.epoch_order(1).batch(0, 5)
    text = learner.step_text_features()
    got, _ = learner.batch_losses(text, batch)
    logits = similarity_logits(learner, batch.rows, text)
    p = logits.softmax(-1)
    want = (F.cross_entropy(logits, learner.cache.train_labels[batch.rows])
            + 0.3 * (p * p.log()).sum(1).mean())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, learner.ctx, retain_graph=True)
    (ref,) = torch.autograd.grad(want, learner.ctx)
    assert_close_to_truth(grad, ref, 1e-4, 1e-5, "grad ctx")


def test_mixup_draws_are_a_function_of_seed_epoch_and_step():
    assert mixup_draw(3, 1, 2, 8, 0.5)[0] == mixup_draw(3, 1, 2, 8, 0.5)[0]
    assert torch.equal(mixup_draw(3, 1, 2, 8, 0.5)[1], mixup_draw(3, 1, 2, 8, 0.5)[1])
    draws = {mixup_draw(3, e, s, 8, 0.5, t)[0] for e in (0, 1) for s in (0, 1) for t in (0, 1)}
    assert len(draws) == 8
    lam = [mixup_draw(1, 0, s, 4, 0.001)[0] for s in range(20)]  # the official Beta: λ ≈ 1
    assert all(0.999 < v <= 1.0 for v in lam)


# -- runs --------------------------------------------------------------------------------------


def test_warmup_without_penalty_trains_as_the_plain_learner(cached_shapes, tmp_path):
    shapes = cached_shapes(3, noise_rate=0.34)
    args = (shapes.cache, shapes.model, shapes.tokenizer)
    plain = train_run(TrainConfig(epochs=2, batch_size=8), *args, tmp_path / "plain",
                      progress=False)
    joapr = train_run(TrainConfig(epochs=2, batch_size=8, joapr=True, joapr_warmup=1,
                                  joapr_confidence_penalty=0.0), *args, tmp_path / "joapr",
                      progress=False)
    first = {k: v for k, v in joapr["epochs"][0].items() if k != "seconds"}
    assert first == {k: v for k, v in plain["epochs"][0].items() if k != "seconds"}
    assert "joapr_kept" not in first and "joapr_kept" in joapr["epochs"][1]
    assert joapr["method"] == "coop+joapr"


def test_a_run_resumes_to_the_uninterrupted_result(cached_shapes, tmp_path, interrupt_at_epoch,
                                                   monkeypatch):
    shapes = cached_shapes(3, noise_rate=0.34)
    config = TrainConfig(joapr=True, loss="dspt", epochs=4, batch_size=8, joapr_mixup_beta=1.0)
    args = (config, shapes.cache, shapes.model, shapes.tokenizer)
    whole = train_run(*args, tmp_path / "whole", progress=False)
    interrupt_at_epoch(CoOpLearner, 3)  # after epochs 1 and 2 split: their history carries over
    with pytest.raises(KeyboardInterrupt):
        train_run(*args, tmp_path / "cut", progress=False)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["state"]
    assert state["epochs"].tolist() == [1, 2] and state["losses"].shape == (2, 15)
    monkeypatch.undo()
    resumed = train_run(*args, tmp_path / "cut", resume=True, progress=False)
    assert resumed["epochs"] == [{**e, "seconds": r["seconds"]}
                                 for e, r in zip(whole["epochs"], resumed["epochs"])]
    assert torch.equal(load_run(tmp_path / "cut").text_features,
                       load_run(tmp_path / "whole").text_features)
    assert whole["method"] == "dspt+joapr"
    for epoch in whole["epochs"][1:]:
        for key in ("joapr_kept", "joapr_noise_rate", "joapr_kept_precision",
                    "joapr_kept_recall"):
            assert epoch[key] is None or 0.0 <= epoch[key] <= 1.0, (key, epoch[key])


def test_cocoop_mixes_the_features_its_prompts_are_conditioned_on(cached_shapes, tmp_path):
    shapes = cached_shapes(3, noise_rate=0.34)
    config = TrainConfig.for_learner("cocoop", joapr=True, joapr_warmup=0, joapr_mixup_beta=2.0,
                                     epochs=2, batch_size=4)
    learner = CoCoOpLearner(config, shapes.cache, shapes.model, shapes.tokenizer,
                            torch.device("cpu"))
    order = learner.epoch_order(0)
    batch = order.batch(4, 8)
    lam, perm = mixup_draw(config.seed, 0, 1, 4, 2.0)
    x = F.normalize(shapes.cache.train_features[batch.rows].float(), dim=-1)
    mixed = lam * x + (1 - lam) * x[perm]
    torch.testing.assert_close(learner._images(batch), mixed)
    encoding = learner.text_encoding(batch)
    got, _ = learner.batch_losses(encoding.encode(encoding.source(), 0, encoding.num_classes),
                                  batch)
    logits = learner.head()(mixed).double()  # the prompts of the mixed features
    targets = order.options["joapr"].targets.double()[batch.samples]
    mixed_t = lam * targets + (1 - lam) * targets[perm]
    want = (-(F.log_softmax(logits, 1) * mixed_t).sum(1).mean()
            + config.joapr_prior_weight * prior_penalty(logits))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    metrics = train_run(config, shapes.cache, shapes.model, shapes.tokenizer,
                        tmp_path / "cocoop", progress=False)
    assert metrics["method"] == "cocoop+joapr" and "joapr_kept" in metrics["epochs"][0]


def test_kgcoop_and_softcpt_train_with_it(cached_shapes, cached_shapes_tasks, tmp_path):
    shapes = cached_shapes(3, noise_rate=0.34)
    config = TrainConfig.for_learner("kgcoop", joapr=True, prograd=True, epochs=2, batch_size=8)
    metrics = train_run(config, shapes.cache, shapes.model, shapes.tokenizer,
                        tmp_path / "kgcoop", progress=False)
    assert metrics["method"] == "kgcoop+prograd+joapr" and "joapr_kept" in metrics["epochs"][1]
    tasks = list(cached_shapes_tasks(noise_rate=0.25, seed=2).tasks[:2])
    config = TrainConfig(learner="softcpt", joapr=True, n_ctx=2, epochs=2, batch_size=8)
    metrics = train_softcpt_run(config, tasks, shapes.model, shapes.tokenizer,
                                tmp_path / "softcpt", progress=False)
    split = metrics["epochs"][1]
    assert len(split["task_joapr_kept"]) == 2
    assert split["joapr_kept"] == pytest.approx(sum(split["task_joapr_kept"]) / 2)
    assert "task_joapr_kept" not in metrics["epochs"][0]  # warm-up


def test_config_refusals():
    assert TrainConfig(joapr=True).describe() == "coop+joapr"
    assert TrainConfig(joapr=True, loss="dspt", prograd=True).describe() == "dspt+prograd+joapr"
    for fields, match in [({"nlprompt": True}, "joapr: JoAPR and NLPrompt"),
                          ({"loss": "gce"}, "joapr: .*combine it with loss ce or dspt"),
                          ({"loss": "mae"}, "joapr: .*mae"),
                          ({"targets": "csl"}, "joapr: .*targets 'hard'"),
                          ({"dept": True}, "joapr: DePT"),
                          ({"joapr_warmup": 50}, "joapr_warmup: 50 warm-up epochs"),
                          ({"joapr_warmup": -1}, "joapr_warmup: must be non-negative"),
                          ({"joapr_prior_weight": -1.0}, "joapr_prior_weight"),
                          ({"joapr_mixup_beta": 0.0}, "joapr_mixup_beta: must be positive"),
                          ({"joapr_temperature": float("nan")}, "joapr_temperature")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(joapr=True, **fields)
    TrainConfig(joapr=False, joapr_warmup=80)  # only a JoAPR run needs epochs after warm-up


def test_compiled_step_is_refused(cached_shapes):
    shapes = cached_shapes(3)
    with pytest.raises(ValueError, match="compile: .*JoAPR"):
        CoOpLearner(TrainConfig(joapr=True), shapes.cache, shapes.model, shapes.tokenizer,
                    torch.device("cpu"), compile=True)


def test_cli_trains_joapr_on_a_noisy_folder(cli_args, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *cli_args, "--noise-rate", "0.34", "--out", str(run), "--epochs", "2",
                 "--n-ctx", "4", "--joapr", "--joapr-warmup", "1", "--joapr-prior-weight", "1.0",
                 "--joapr-confidence-penalty", "0.2", "--no-progress"]) == 0
    assert "coop+joapr: test accuracy" in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    config = metrics["config"]
    assert (config["joapr"], config["joapr_warmup"], config["joapr_prior_weight"],
            config["joapr_confidence_penalty"], config["joapr_mixup_beta"],
            config["joapr_temperature"]) == (True, 1, 1.0, 0.2, 0.001, 2.0)
    assert 0.0 <= metrics["epochs"][1]["joapr_kept"] <= 1.0
    assert main(["train", *cli_args, "--out", str(tmp_path / "r2"), "--joapr", "--nlprompt",
                 "--epochs", "2", "--no-progress"]) == 2
    assert "JoAPR and NLPrompt" in capsys.readouterr().err
