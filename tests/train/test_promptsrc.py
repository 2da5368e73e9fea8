"""PromptSRC trained online (``fastprompt.train.promptsrc``): one step's loss and gradients
against the official semantics written out in plain torch (float64), the GPA weights and the
averaged prompts against a hand computation, a CLI run that resumes to the uninterrupted result
and exports, the defaults and the refusals."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastprompt.models import TINY_MODEL
from fastprompt.train import OnlineData, PromptSRCLearner, TrainConfig
from fastprompt.train.epoch import logit_scale
from fastprompt.train.files import CHECKPOINT, read_prompt_file
from fastprompt.train.online import OnlineLearner, epoch_image_order, train_online_run
from fastprompt.train.promptsrc import TEMPLATES, gpa_weights

# Valid depths for the 2-layer tiny model (the official 9 exceeds it).
SMALL = {"prompt_depth_text": 2, "prompt_depth_vision": 2}
FLAGS = ["--prompt-depth-text", "2", "--prompt-depth-vision", "2"]


@pytest.fixture(scope="module")
def small(shapes_data, tiny_clip):
    """A 3-class shapes set with 2 training images per class, and the tiny model."""
    root, splits = shapes_data(3, images_per_class=2, test_images_per_class=1)
    return splits, tiny_clip


def online_data(small, model=None, **kw) -> OnlineData:
    splits, (model0, pt, pv, _) = small
    return OnlineData(model or model0, TINY_MODEL, pt, pv, splits, **kw)


def official_gauss(epochs, mean, std):
    """The official trainer's weights: the density at epochs 1..N, divided by its sum."""
    g = np.array([(1 / (std * np.sqrt(2 * np.pi))) * np.exp(-0.5 * ((a - mean) / std) ** 2)
                  for a in range(1, epochs + 1)])
    return g / sum(g)


def reference_terms(model, tok, classnames, x, text, features, scale, cfg):
    """The official PromptSRC terms written out: the frozen text features are the mean over the
    60 templates of ``encode_text`` (unnormalised), then normalised; the frozen image features
    are ``encode_image`` of the same images; L1 means; KL(zero-shot || prompted) summed and
    divided by B x C."""
    with torch.no_grad():
        per_template = [model.encode_text(tok([t.format(c) for c in classnames]))
                        for t in TEMPLATES]
        t0 = torch.stack(per_template, 1).mean(1)
        t0 = t0 / t0.norm(dim=-1, keepdim=True)
        f0 = model.encode_image(x)
        f0 = f0 / f0.norm(dim=-1, keepdim=True)
        z0 = scale * f0 @ t0.t()
    f = features / features.norm(dim=-1, keepdim=True)
    t = text / text.norm(dim=-1, keepdim=True)
    z = scale * f @ t.t()
    text_term = cfg.text_loss_weight * (t - t0).abs().mean()
    image_term = cfg.image_loss_weight * (f - f0).abs().mean()
    p0 = z0.softmax(1)
    kl = (p0 * (p0.log() - z.log_softmax(1))).sum() / z.numel()
    return z, text_term, image_term, kl


@pytest.mark.parametrize("loss", ["ce", "gce"])
def test_one_step_matches_plain_torch(small, monkeypatch, loss):
    """One epoch of one batch through ``train_epoch`` in float64: the recorded loss and its
    terms, and every prompt's gradient, are those of the hand-written loss on the prompt
    module's features of the same images; the update is SGD's first step (GPA over one epoch
    is the prompts themselves)."""
    monkeypatch.setenv("FASTPROMPT_BACKEND", "reference")
    dtype = torch.float64
    _, (model, _, _, tok) = small
    model64 = copy.deepcopy(model).to(dtype)
    data = online_data(small, model64)
    m = data.num_train_images
    cfg = TrainConfig.for_learner("promptsrc", epochs=1, batch_size=m, loss=loss, **SMALL)
    learner = PromptSRCLearner(cfg, data, model64, tok, torch.device("cpu"))
    prompts = learner.prompts
    before = {k: v.detach().clone() for k, v in learner.trainable().items()}
    assert set(before) == {"ctx", "text_VPT_shallow.1", "VPT", "vision_VPT_shallow.1"}
    assert before["ctx"].shape[0] == 4 and before["VPT"].shape[0] == 4

    images = data.epoch_images(0)
    x = torch.stack([images[i][0] for i in range(m)]).to(dtype)
    labels = data.train_labels[epoch_image_order(cfg.seed, 0, m)]
    text, features = prompts(x)
    scale = logit_scale(model64).to(dtype)
    z, text_term, image_term, kl = reference_terms(model64, tok, data.classnames, x, text,
                                                   features, scale, cfg)
    if loss == "ce":
        base = F.cross_entropy(z, labels)
    else:
        p = z.softmax(-1).gather(1, labels[:, None])[:, 0]
        base = ((1 - p ** 0.5) / 0.5).mean()
    want = base + text_term + image_term + kl
    assert min(float(text_term.detach()), float(image_term.detach()), float(kl.detach())) > 0
    grads = torch.autograd.grad(want, list(learner.trainable().values()))

    with torch.no_grad():
        hooked, none = learner.batch_losses(prompts.text_features(),
                                            learner.epoch_order(0).batch(0, m))
    assert none is None and float(hooked) == pytest.approx(float(want.detach()), rel=1e-9)
    record = learner.train_epoch(epoch=0, bar=None)
    assert record["loss"] == pytest.approx(float(want.detach()), rel=1e-6)  # summed in float32
    for key, term in (("text_loss", text_term), ("image_loss", image_term), ("kl_logits", kl)):
        assert record[key] == pytest.approx(float(term.detach()), rel=1e-9), key
    lr = cfg.warmup_lr
    for (key, p), g in zip(learner.trainable().items(), grads):
        assert g.abs().max() > 0, key
        torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12, msg=key)
        expected = before[key] - lr * (g + cfg.weight_decay * before[key])
        torch.testing.assert_close(p.detach() - before[key], expected - before[key],
                                   rtol=1e-9, atol=1e-18, msg=key)


def test_frozen_text_features_average_before_normalising(small):
    """The templates' features are averaged unnormalised (the official order), which is not
    CLIP's zero-shot classifier (normalised per template first)."""
    from fastprompt.models import zeroshot_text_features
    from fastprompt.train.promptsrc import frozen_text_features
    _, (model, _, _, tok) = small
    names = ["circle", "square", "triangle"]
    got = frozen_text_features(model, tok, names)
    with torch.no_grad():
        raw = torch.stack([model.encode_text(tok([t.format(c) for c in names]))
                           for t in TEMPLATES]).mean(0)
    torch.testing.assert_close(got, F.normalize(raw, dim=-1), rtol=1e-5, atol=1e-6)
    clip_style = zeroshot_text_features(model, tok, names, TEMPLATES)
    assert not torch.allclose(got, clip_style, atol=1e-7)
    assert len(TEMPLATES) == 60 and len(set(TEMPLATES)) == 60
    assert TEMPLATES[0] == "a photo of a {}." and TEMPLATES[-1] == "itap of the {}."


@pytest.mark.parametrize("epochs, mean, std", [(20, 15, 1), (50, 30, 30), (50, 45, 5),
                                               (20, 6, 10), (3, 2, 1)])
def test_gpa_weights_are_the_official_normalised_gaussian(epochs, mean, std):
    got = gpa_weights(epochs, mean, std)
    np.testing.assert_allclose(got, official_gauss(epochs, mean, std), rtol=1e-12, atol=0)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-15)
    # Far from the mean the density underflows; the normalised weights stay defined.
    far = gpa_weights(2, 1000.0, 1.0)
    assert far[1] == pytest.approx(1.0) and far[0] == 0.0
    with pytest.raises(ValueError, match="gpa_std"):
        gpa_weights(3, 2.0, 0.0)


def test_gpa_averages_each_epochs_prompts(small, tmp_path, monkeypatch):
    """The prompt file holds Σ_e w_e · (the prompts after epoch e), w the official weights;
    the last checkpoint holds the same prompts and the sum."""
    _, (model, _, _, tok) = small
    data = online_data(small)
    snapshots = []
    real = OnlineLearner.train_epoch

    def spy(self, *, epoch, bar):
        result = real(self, epoch=epoch, bar=bar)
        snapshots.append({k: v.detach().double().clone() for k, v in self.trainable().items()})
        return result

    monkeypatch.setattr(OnlineLearner, "train_epoch", spy)
    cfg = TrainConfig.for_learner("promptsrc", epochs=3, lr=0.05, warmup_epochs=0,
                                  gpa_mean=2.0, gpa_std=1.0, **SMALL)
    metrics = train_online_run(cfg, data, model, tok, tmp_path / "run", progress=False)
    assert len(snapshots) == 3
    w = official_gauss(3, 2.0, 1.0)
    prompt = read_prompt_file(tmp_path / "run")
    for key, value in prompt.tensors.items():
        want = sum(float(w[e]) * snapshots[e][key] for e in range(3))
        torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-7, msg=key)
        assert not torch.allclose(value.double(), snapshots[-1][key])  # not the last epoch's
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    for key, value in prompt.tensors.items():
        assert torch.equal(state["params"][key], value)
        torch.testing.assert_close(state["state"][f"gpa_sum.{key}"],
                                   sum(float(w[e]) * snapshots[e][key] for e in range(3)),
                                   rtol=1e-12, atol=1e-15)
    assert all(math.isfinite(e[k]) for e in metrics["epochs"]
               for k in ("loss", "text_loss", "image_loss", "kl_logits"))
    assert metrics["method"] == "promptsrc" and 0 <= metrics["test_acc"] <= 1


def test_cli_run_resumes_to_the_uninterrupted_result(cli, cli_world, tmp_path,
                                                      interrupt_at_epoch, monkeypatch, capsys):
    """Interrupted after epoch 1 of 3 and resumed: the same GPA prompts bit for bit, the same
    losses and accuracy; the run exports with its image prompts baked in."""
    args = ["train", "--learner", "promptsrc", "--pretrained",
            str(cli_world / "tiny.safetensors"), "--data", str(cli_world / "shapes"),
            "--epochs", "3", "--lr", "0.05", "--gpa-mean", "2", "--gpa-std", "1.5",
            "--noise-rate", "0.25", "--no-progress", *FLAGS]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli([*args, "--out", str(full)]) == 0
    interrupt_at_epoch(PromptSRCLearner, 1)
    assert cli([*args, "--out", str(cut)]) == 130
    assert not (cut / "prompt.safetensors").exists()
    monkeypatch.undo()
    assert cli([*args, "--out", str(cut), "--resume"]) == 0
    a, b = read_prompt_file(full), read_prompt_file(cut)
    assert a.learner == "promptsrc" and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert {"ctx", "VPT", "text_VPT_shallow.1", "vision_VPT_shallow.1"} <= set(a.tensors)
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((cut / "metrics.json").read_text())
    for key in ("loss", "text_loss", "image_loss", "kl_logits"):
        assert [e[key] for e in ma["epochs"]] == [e[key] for e in mb["epochs"]], key
    assert ma["test_acc"] == mb["test_acc"] and 0 <= ma["test_acc"] <= 1
    assert ma["config"]["gpa_mean"] == 2.0 and ma["config"]["gpa_std"] == 1.5
    assert ma["config"]["text_loss_weight"] == 25.0 and ma["config"]["n_ctx"] == 4
    capsys.readouterr()
    assert cli(["export", str(full), str(tmp_path / "onnx"), "--no-verify"]) == 0
    assert (tmp_path / "onnx" / "model.onnx").is_file()


@pytest.mark.parametrize("extra, message", [
    ([], "prompt_depth_text: 9 exceeds the 2 layers"),  # the official depth, not clamped
    (["--prompt-depth-text", "2"], "prompt_depth_vision: 9 exceeds the 2 layers"),
    ([*FLAGS, "--gpa-std", "0"], "gpa_std: must be positive"),
    ([*FLAGS, "--text-loss-weight", "-1"], "text_loss_weight: must be non-negative"),
    ([*FLAGS, "--image-loss-weight", "nan"], "image_loss_weight: must be a finite number"),
    ([*FLAGS, "--prograd"], "prograd: not supported with --learner promptsrc"),
    ([*FLAGS, "--cache", "x.safetensors"], "--cache: not supported with --learner promptsrc"),
    ([*FLAGS, "--targets", "isl"], "targets: 'isl'"),
])
def test_refusals_name_the_field(cli, cli_world, tmp_path, capsys, extra, message):
    code = cli(["train", "--learner", "promptsrc", "--pretrained",
                str(cli_world / "tiny.safetensors"), "--data", str(cli_world / "shapes"),
                "--out", str(tmp_path / "run"), "--no-progress", *extra])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_official_defaults():
    c = TrainConfig.for_learner("promptsrc")
    assert (c.n_ctx, c.n_ctx_vision, c.ctx_init, c.prompt_depth_text, c.prompt_depth_vision,
            c.epochs, c.batch_size, c.lr, c.optimizer, c.momentum, c.weight_decay,
            c.warmup_epochs, c.warmup_lr) == (4, 4, "a photo of a", 9, 9, 20, 4, 0.0025, "sgd",
                                              0.9, 5e-4, 1, 1e-5)
    assert (c.text_loss_weight, c.image_loss_weight, c.gpa_mean, c.gpa_std) == (25, 10, 15, 1)


def test_export_bakes_the_averaged_prompts_into_the_image_tower(small, tmp_path):
    """The exported graph's logits on the test images are those of the prompt file's (GPA)
    prompts, rebuilt with the model-level module in float64, not the plain tower's."""
    ort = pytest.importorskip("onnxruntime")
    from fastprompt.data.cache.encode import open_rgb
    from fastprompt.models import IVLPPrompts
    from fastprompt.pipeline import export_run
    splits, (model, _, pv, tok) = small
    data = online_data(small)
    cfg = TrainConfig.for_learner("promptsrc", epochs=2, warmup_epochs=0, lr=0.5, gpa_mean=1.5,
                                  **SMALL)
    train_online_run(cfg, data, model, tok, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "onnx")

    prompt = read_prompt_file(tmp_path / "run")
    model64 = copy.deepcopy(model).double()
    prompts = IVLPPrompts(model64, tok, prompt.field("classnames"), n_ctx_text=4,
                          n_ctx_vision=4, depth_text=2, depth_vision=2, ctx_init="a photo of a")
    prompts.load_state_dict(prompt.tensors)
    x = torch.stack([pv(open_rgb(p)) for p, _ in splits.test])
    scale = float(logit_scale(model))
    with torch.no_grad():
        text = F.normalize(prompts.text_features(), dim=-1)
        want = scale * F.normalize(prompts.image_features(x.double()), dim=-1) @ text.t()
        plain = scale * F.normalize(model64.encode_image(x.double()), dim=-1) @ text.t()
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {session.get_inputs()[0].name: x.numpy()})[0]
    got = torch.from_numpy(got).double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert (got - plain).abs().max() > 1e-2  # the baked prompts matter
