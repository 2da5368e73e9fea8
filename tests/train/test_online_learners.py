"""MaPLe and IVLP trained online (``fastprompt.train.online``): one step's loss, gradients and
update against plain torch in float64, the seeded epoch images, whole runs through the command
line that resume to the uninterrupted result, and the refusals."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastprompt.data.cache.encode import open_rgb
from fastprompt.data.sampling import add_label_noise
from fastprompt.models import TINY_MODEL
from fastprompt.train import IVLPLearner, MaPLeLearner, OnlineData, TrainConfig, load_run
from fastprompt.train.epoch import logit_scale
from fastprompt.train.files import read_prompt_file
from fastprompt.train.online import (EpochImages, epoch_image_order, image_loader,
                                     train_online_run)

# Valid depths for the 2-layer tiny model (the official 9 / 12 exceed it).
SMALL = {"maple": {"prompt_depth": 2},
         "ivlp": {"prompt_depth_text": 2, "prompt_depth_vision": 2}}
LEARNER = {"maple": MaPLeLearner, "ivlp": IVLPLearner}
FLAGS = {"maple": ["--prompt-depth", "2"],
         "ivlp": ["--prompt-depth-text", "2", "--prompt-depth-vision", "2"]}


@pytest.fixture(scope="module")
def small(shapes_data, tiny_clip):
    """A 3-class shapes set with 2 training images per class, and the tiny model."""
    root, splits = shapes_data(3, images_per_class=2, test_images_per_class=1)
    return splits, tiny_clip


def online_data(small, model=None, **kw) -> OnlineData:
    splits, (model0, pt, pv, _) = small
    return OnlineData(model or model0, TINY_MODEL, pt, pv, splits, **kw)


def reference_loss(text, image, labels, scale, loss):
    """The CLIP loss written out: scaled cosine logits, then CE or GCE (q = 0.5)."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    p = logits.softmax(-1).gather(1, labels[:, None])[:, 0]
    return ((1 - p ** 0.5) / 0.5).mean()


@pytest.mark.parametrize("name", ["maple", "ivlp"])
@pytest.mark.parametrize("loss, dtype", [("ce", torch.float64), ("gce", torch.float64),
                                         ("ce", torch.float32)])
def test_one_step_matches_plain_torch(small, monkeypatch, name, loss, dtype):
    """A whole epoch of one batch through ``train_epoch`` (the loader, the augmentation, the
    fused loss, SGD's first step): its loss is the hand-written loss of the prompt module's
    features of the same images (the model-level module is tested on its own in
    tests/models/test_prompted_towers.py), and the update is ``-lr (g + wd p)`` of its
    gradients. float64 runs the loss op's reference backend (its fused kernels take no
    float64); float32 the default one, to float32 rounding."""
    if dtype == torch.float64:
        monkeypatch.setenv("FASTPROMPT_BACKEND", "reference")
    tight = dtype == torch.float64
    _, (model, _, _, tok) = small
    model64 = copy.deepcopy(model).to(dtype)
    data = online_data(small, model64)
    m = data.num_train_images
    cfg = TrainConfig.for_learner(name, epochs=1, batch_size=m, loss=loss, **SMALL[name])
    learner = LEARNER[name](cfg, data, model64, tok, torch.device("cpu"))
    prompts = learner.prompts
    before = {k: v.detach().clone() for k, v in learner.trainable().items()}
    assert all(v.dtype == dtype for v in before.values())

    # The reference: the same images and labels, in the epoch's order, by hand.
    images = data.epoch_images(0)
    x = torch.stack([images[i][0] for i in range(m)]).to(dtype)
    labels = data.train_labels[epoch_image_order(cfg.seed, 0, m)]
    text, features = prompts(x)
    scale = logit_scale(model64).to(dtype)  # CLIP's multiplier, held in float32 as trained
    want = reference_loss(text, features, labels, scale, loss)
    grads = torch.autograd.grad(want, list(learner.trainable().values()))

    # The Learner hooks give the same loss from the epoch's order.
    with torch.no_grad():
        hooked, kl = learner.batch_losses(prompts.text_features(),
                                          learner.epoch_order(0).batch(0, m))
    assert kl is None and float(hooked) == pytest.approx(float(want.detach()), rel=1e-9 if tight else 1e-5)
    record = learner.train_epoch(epoch=0, bar=None)
    # The epoch's record sums its losses in float32.
    assert record["loss"] == pytest.approx(float(want.detach()), rel=1e-6 if tight else 1e-5)
    lr = cfg.warmup_lr  # epoch 0 is the warm-up epoch
    for (key, p), g in zip(learner.trainable().items(), grads):
        assert g.abs().max() > 0, key  # every prompt reaches the loss
        # The step's gradient stays on the parameter after the epoch.
        torch.testing.assert_close(p.grad, g, rtol=1e-9 if tight else 2e-3,
                                   atol=1e-12 if tight else 1e-5 * float(g.abs().max()), msg=key)
        if tight:  # SGD's first step, momentum buffer = gradient
            expected = before[key] - lr * (g + cfg.weight_decay * before[key])
            torch.testing.assert_close(p.detach() - before[key], expected - before[key],
                                       rtol=1e-9, atol=1e-18, msg=key)


def test_epoch_images_are_a_pure_function_of_seed_and_epoch(small):
    data = online_data(small, seed=4)
    m = data.num_train_images

    def epoch(e, workers=0):
        batches = list(image_loader(data.epoch_images(e), 4, workers, torch.device("cpu")))
        return tuple(torch.cat([b[i] for b in batches]) for i in range(3))

    torch.manual_seed(0)
    a = epoch(1)
    torch.manual_seed(123)  # the global generator does not matter
    assert all(torch.equal(u, v) for u, v in zip(a, epoch(1)))
    assert all(torch.equal(u, v) for u, v in zip(a, epoch(1, workers=2)))  # nor the workers
    b = epoch(2)
    assert not torch.equal(a[0], b[0])
    order = epoch_image_order(4, 1, m)
    assert torch.equal(a[1], data.train_labels[order])
    assert torch.equal(a[2], data.clean_labels[order])
    # An image's augmentation depends on (seed, image, epoch), not on where the epoch puts it.
    items = EpochImages(data.train_paths, data.train_labels, data.clean_labels,
                        data.spec.preprocess_train, 4, 1, True)
    first = int(order[0])
    other = EpochImages(data.train_paths, data.train_labels, data.clean_labels,
                        data.spec.preprocess_train, 4, 1, True)
    other.order = torch.roll(order, 1)
    assert torch.equal(items[0][0], other[1][0]) and int(other.order[1]) == first


def test_labels_and_noise_are_the_caches(small):
    splits, _ = small
    data = online_data(small, noise_rate=0.5, seed=3)
    labels = [y for _, y in splits.train]
    assert data.train_labels.tolist() == add_label_noise(labels, 3, 0.5, "symmetric", seed=3)
    assert data.clean_labels.tolist() == labels
    assert data.train_labels.tolist() != labels
    assert data.fingerprint["noise_rate"] == 0.5


@pytest.mark.parametrize("name", ["maple", "ivlp"])
def test_cli_run_resumes_to_the_uninterrupted_result(cli, cli_world, tmp_path, name,
                                                      interrupt_at_epoch, monkeypatch, capsys):
    args = ["train", "--learner", name, "--pretrained", str(cli_world / "tiny.safetensors"),
            "--data", str(cli_world / "shapes"), "--epochs", "2", "--lr", "0.05",
            "--noise-rate", "0.25", "--no-progress", *FLAGS[name]]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert cli([*args, "--out", str(full)]) == 0
    interrupt_at_epoch(LEARNER[name], 1)
    assert cli([*args, "--out", str(cut)]) == 130
    assert not (cut / "prompt.safetensors").exists()
    monkeypatch.undo()
    assert cli([*args, "--out", str(cut), "--resume"]) == 0
    a, b = read_prompt_file(full), read_prompt_file(cut)
    assert a.learner == name and a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((cut / "metrics.json").read_text())
    assert [e["loss"] for e in ma["epochs"]] == [e["loss"] for e in mb["epochs"]]
    assert ma["test_acc"] == mb["test_acc"] and 0 <= ma["test_acc"] <= 1
    assert ma["method"] == name and ma["num_classes"] == 3
    assert math.isfinite(ma["epochs"][1]["train_acc_noisy"])
    # The prompts trained (away from their seeded initial draw), under the official names.
    official = {"maple": {"ctx", "proj.weight", "compound_prompts_text.0"},
                "ivlp": {"ctx", "VPT", "text_VPT_shallow.1", "vision_VPT_shallow.1"}}[name]
    assert official <= set(a.tensors)
    # Export bakes the prompts into the image tower (tested below); a head-only export, eval and
    # load_run refuse by name: the prompts live inside the image tower.
    capsys.readouterr()
    assert cli(["export", str(full), str(tmp_path / "onnx"), "--no-verify"]) == 0
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert cli(["export", str(full), str(tmp_path / "head"), "--head-only"]) != 0
    assert f"head_only: a '{name}' run" in capsys.readouterr().err
    assert cli(["eval", str(full), "--data", str(cli_world / "shapes")]) != 0
    assert f"'{name}' run" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"'{name}' run"):
        load_run(full)


@pytest.mark.parametrize("extra, message", [
    (["--prograd"], "prograd: not supported with --learner maple"),
    (["--dept"], "dept: not supported"),
    (["--nlprompt"], "nlprompt: not supported"),
    (["--joapr", "--epochs", "2"], "joapr: not supported"),
    (["--targets", "isl"], "targets: 'isl'"),
    (["--compile"], "--compile: not supported with --learner maple"),
    (["--text-chunk", "2"], "--text-chunk: not supported"),
    (["--cache", "x.safetensors"], "--cache: not supported"),
    (["--class-specific"], "class_specific: not supported"),
    ([], "prompt_depth: 9 exceeds the 2 layers"),  # the official depth, not clamped
])
def test_refusals_name_the_field(cli, cli_world, tmp_path, capsys, extra, message):
    depth = [] if not extra else ["--prompt-depth", "2"]
    code = cli(["train", "--learner", "maple", "--pretrained", str(cli_world / "tiny.safetensors"),
                "--data", str(cli_world / "shapes"), "--out", str(tmp_path / "run"),
                "--no-progress", *depth, *extra])
    assert code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_ivlp_depths_are_checked_per_tower(small):
    _, (model, _, _, tok) = small
    data = online_data(small)
    cfg = TrainConfig.for_learner("ivlp", prompt_depth_text=2, prompt_depth_vision=3)
    with pytest.raises(ValueError, match="prompt_depth_vision: 3 exceeds the 2 layers of "
                                         "fastprompt-tiny's image tower"):
        IVLPLearner(cfg, data, model, tok, torch.device("cpu"))


def test_official_defaults():
    maple = TrainConfig.for_learner("maple")
    assert (maple.n_ctx, maple.ctx_init, maple.prompt_depth, maple.epochs, maple.batch_size,
            maple.lr, maple.optimizer, maple.warmup_epochs, maple.warmup_lr) == (
        2, "a photo of a", 9, 5, 4, 0.0035, "sgd", 1, 1e-5)
    ivlp = TrainConfig.for_learner("ivlp")
    assert (ivlp.n_ctx, ivlp.n_ctx_vision, ivlp.prompt_depth_text, ivlp.prompt_depth_vision,
            ivlp.epochs, ivlp.batch_size, ivlp.lr) == (2, 2, 12, 12, 5, 4, 0.0035)
    with pytest.raises(ValueError, match="prompt_depth_vision: must be at least 0"):
        TrainConfig(prompt_depth_vision=-1)


def test_sweeps_and_cached_training_refuse_online_learners(cached_shapes):
    from fastprompt.protocols.sweep_grid import parse_method
    from fastprompt.train import train_run
    with pytest.raises(ValueError, match="maple trains online"):
        parse_method("maple", "methods[0]")
    shapes = cached_shapes(3)
    with pytest.raises(ValueError, match="train_online_run"):
        train_run(TrainConfig.for_learner("ivlp"), shapes.cache, shapes.model, shapes.tokenizer,
                  "unused", progress=False)


def test_dspt_and_atlas_targets_train_online(small, tmp_path):
    """The run's loss and targets reach the online step through the shared loss options: DSPT
    with ATLaS's class-wise soft labels, alternating (epoch 2 soft), and MAE."""
    _, (model, _, _, tok) = small
    data = online_data(small)
    for name, kw in (("dspt", {"loss": "dspt", "targets": "csl", "alternate": True}),
                     ("mae", {"loss": "mae", "targets": "ls"})):
        cfg = TrainConfig.for_learner("maple", epochs=2, lr=0.05, prompt_depth=2, **kw)
        metrics = train_online_run(cfg, data, model, tok, tmp_path / name, progress=False)
        assert [e["soft_targets"] for e in metrics["epochs"]] == (
            [False, True] if name == "dspt" else [True, True])
        assert all(math.isfinite(e["loss"]) for e in metrics["epochs"])
        assert metrics["method"] == f"maple({kw['loss']})+{kw['targets']}" + (
            "(alt)" if name == "dspt" else "")


@pytest.mark.parametrize("name", ["maple", "ivlp"])
def test_export_bakes_the_trained_prompts_into_the_image_tower(small, tmp_path, name):
    """The exported graph's logits on the test images are the trained prompts' (rebuilt here
    from the prompt file with the model-level module, in float64), not the plain tower's."""
    ort = pytest.importorskip("onnxruntime")
    from fastprompt.models import IVLPPrompts, MaPLePrompts
    from fastprompt.pipeline import export_run
    splits, (model, _, pv, tok) = small
    data = online_data(small)
    cfg = TrainConfig.for_learner(name, epochs=1, warmup_epochs=0, lr=0.5, **SMALL[name])
    train_online_run(cfg, data, model, tok, tmp_path / "run", progress=False)
    export_run(tmp_path / "run", tmp_path / "onnx")

    prompt = read_prompt_file(tmp_path / "run")
    model64 = copy.deepcopy(model).double()
    kw = ({"n_ctx": 2, "depth": 2} if name == "maple" else
          {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 2, "depth_vision": 2})
    build = MaPLePrompts if name == "maple" else IVLPPrompts
    prompts = build(model64, tok, prompt.field("classnames"), **kw)
    initial = {k: v.clone() for k, v in prompts.state_dict().items()}
    prompts.load_state_dict(prompt.tensors)
    assert any(not torch.allclose(initial[k].double(), prompts.state_dict()[k].double())
               for k in initial)  # training moved the prompts
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
