"""Dassl checkpoints in and out (``fastprompt.train.dassl``, ``fastprompt.train.safe_unpickle``):
files written the way Dassl writes them (a scheduler object of a class not installed here)
import without running anything from them; what is not a prompt learner's state, or damaged, is
refused by name; a run's export loads the way the official ``load_model`` loads it, its buffers
are the official prompt learner's and its forward gives the run's text features; export then
import gives the run back."""
from __future__ import annotations

import json
import os
import subprocess
from collections import OrderedDict

import pytest
import torch

from dasslib import (SCHEDULER_MODULE, Reduces, official_buffers, official_text_features,
                     save_dassl_checkpoint)
from fastprompt.models import PromptedTextModel
from fastprompt.train import LEARNERS, TrainConfig, load_run, train_run
from fastprompt.train.dassl import (export_dassl, find_checkpoint, import_dassl,
                                    read_dassl_checkpoint)
from fastprompt.train.files import read_prompt_file, refuse_existing_run
from fastprompt.train.safe_unpickle import Opaque, read_torch_file

N_CTX = 4


@pytest.fixture(scope="module")
def world(cached_shapes):
    """The tiny model, its weights file and a 4-class cache."""
    return cached_shapes()


def coop_state(world, n_ctx=N_CTX, dtype=torch.float16, seed=0, classnames=None):
    """A CoOp prompt learner's state dict as the official code saves it."""
    names = classnames or list(world.cache.classnames)
    g = torch.Generator().manual_seed(seed)
    ctx = (0.02 * torch.randn(n_ctx, world.model.token_embedding.embedding_dim, generator=g))
    prefix, suffix = official_buffers(world.model, world.tokenizer, names, n_ctx, dtype)
    return OrderedDict(ctx=ctx.to(dtype), token_prefix=prefix, token_suffix=suffix)


def do_import(world, checkpoint, out, learner="coop", **kwargs):
    return import_dassl(checkpoint, learner, list(world.cache.classnames), out,
                        pretrained=world.weights, **kwargs)


def probabilities(run, features):
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    t = torch.nn.functional.normalize(run.text_features.float(), dim=-1)
    return (run.scale * x @ t.T).softmax(-1)


def test_dassl_file_with_an_unimportable_scheduler_is_read_without_it(world, tmp_path):
    path = tmp_path / "model.pth.tar-10"
    state = coop_state(world)
    save_dassl_checkpoint(path, state, val_result=71.3)
    with pytest.raises(ModuleNotFoundError, match="dassl"):  # what the plain load does
        torch.load(path, weights_only=False)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)

    raw = read_torch_file(path)
    scheduler = raw["scheduler"]
    assert isinstance(scheduler, Opaque)
    assert scheduler.global_name == f"{SCHEDULER_MODULE}.ConstantWarmupScheduler"
    assert isinstance(raw["optimizer"]["state"][0]["momentum_buffer"], torch.Tensor)
    ckpt = read_dassl_checkpoint(tmp_path)  # the folder: its latest model.pth.tar-N
    assert ckpt.path == str(path) and ckpt.epoch == 10 and ckpt.val_result == 71.3
    for key, value in state.items():
        assert ckpt.tensors[key].dtype == torch.float16
        assert torch.equal(ckpt.tensors[key], value)


def test_import_gives_the_official_prompts_features(world, tmp_path):
    state = coop_state(world)
    save_dassl_checkpoint(tmp_path / "model.pth.tar-7", state, epoch=7)
    metrics = do_import(world, tmp_path / "model.pth.tar-7", tmp_path / "run")
    source = metrics["imported_from"]
    assert source["epoch"] == 7 and source["dtype"] == "float16" and source["learner"] == "coop"
    assert source["ignored"] == ["token_prefix", "token_suffix"]
    assert source["token_suffix"] == "matches" and metrics["epochs"] == []
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert sorted(os.listdir(tmp_path / "run")) == ["config.json", "metrics.json",
                                                     "prompt.safetensors"]
    with pytest.raises(ValueError, match="imported from a Dassl checkpoint"):
        refuse_existing_run(str(tmp_path / "run"), False, "coop")  # training would overwrite it
    run = load_run(tmp_path / "run")
    assert run.config.n_ctx == N_CTX and run.config.epochs == 7 and run.config.ctx_init is None
    # The official code under PREC fp32: its own float32 buffers (the saved ones are ignored).
    names = list(world.cache.classnames)
    prefix, suffix = official_buffers(world.model, world.tokenizer, names, N_CTX, torch.float32)
    official = official_text_features(world.model, world.tokenizer, names,
                                      {"ctx": state["ctx"], "token_prefix": prefix,
                                       "token_suffix": suffix})
    torch.testing.assert_close(run.text_features, official, rtol=1e-5, atol=1e-5)
    # The prompt file holds ctx as saved (float16 -> float32 is exact).
    prompted = PromptedTextModel(world.model, world.tokenizer, list(world.cache.classnames),
                                 n_ctx=N_CTX)
    with torch.no_grad():
        expected = prompted(state["ctx"].float())
    assert torch.equal(run.text_features, expected)


@pytest.mark.parametrize("learner, extra, ignored", [
    ("kgcoop", {"bias_vectors": (1, 64), "meta_net.linear1.weight": (64, 64),
                "meta_net.linear1.bias": (64,)},
     ["bias_vectors", "meta_net.linear1.bias", "meta_net.linear1.weight"]),
    ("tcp", {"meta_net.linear1.weight": (16, 64), "meta_net.linear1.bias": (16,),
             "meta_net.linear2.weight": (N_CTX * 64, 16), "meta_net.linear2.bias": (N_CTX * 64,)},
     []),
    pytest.param("cocoop", {"meta_net.linear1.weight": (4, 64), "meta_net.linear1.bias": (4,),
                            "meta_net.linear2.weight": (64, 4), "meta_net.linear2.bias": (64,)},
                 [], marks=pytest.mark.skipif("cocoop" not in LEARNERS,
                                              reason="no CoCoOp learner registered")),
])
def test_kgcoop_tcp_and_cocoop_checkpoints(world, tmp_path, learner, extra, ignored):
    g = torch.Generator().manual_seed(3)
    state = coop_state(world)
    state.update({k: (0.1 * torch.randn(s, generator=g)).half() for k, s in extra.items()})
    save_dassl_checkpoint(tmp_path / "model-best.pth.tar", state)
    metrics = do_import(world, tmp_path, tmp_path / "run", learner=learner,
                        kg_template="a photo of a {}, a shape.", tcp_layer=1)
    assert metrics["imported_from"]["ignored"] == sorted(ignored + ["token_prefix",
                                                                    "token_suffix"])
    run = load_run(tmp_path / "run")
    assert run.config.learner == learner and run.config.kg_template == "a photo of a {}, a shape."
    trained = {k: v for k, v in state.items() if k not in ignored and not k.startswith("token_")}
    prompt = read_prompt_file(tmp_path / "run")
    assert sorted(prompt.tensors) == sorted(trained)
    for key, value in trained.items():
        assert torch.equal(prompt.tensors[key], value.float())
    # And back: the official names, the same tensors (float16 already: exact).
    report = export_dassl(tmp_path / "run", tmp_path / "official")
    exported = torch.load(report.path, weights_only=True)["state_dict"]
    assert sorted(exported) == sorted([*trained, "token_prefix", "token_suffix"])
    do_import(world, tmp_path / "official", tmp_path / "back", learner=learner,
              kg_template="a photo of a {}, a shape.", tcp_layer=1)
    back = read_prompt_file(tmp_path / "back")
    assert all(torch.equal(back.tensors[k], prompt.tensors[k]) for k in trained)


def test_export_is_what_the_official_load_model_reads(world, tmp_path):
    """A trained run's --dassl export: plain torch.load reads it (as Dassl's load_checkpoint
    does), its buffers are the official ones, deleting them and loading the rest with
    strict=False fills the official prompt learner, and the official forward gives the run's
    text features."""
    config = TrainConfig(n_ctx=N_CTX, epochs=2, pretrained=world.weights)
    train_run(config, world.cache, world.model, world.tokenizer, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    names = list(world.cache.classnames)
    for precision, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        report = export_dassl(tmp_path / "run", tmp_path / precision, precision=precision)
        assert report.path == str(tmp_path / precision / "prompt_learner" / "model.pth.tar-2")
        ckpt = torch.load(report.path, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 2 and ckpt["optimizer"] is None and ckpt["scheduler"] is None
        state = ckpt["state_dict"]
        assert list(state) == ["ctx", "token_prefix", "token_suffix"]
        assert all(v.dtype == dtype for v in state.values())
        prefix, suffix = official_buffers(world.model, world.tokenizer, names, N_CTX, dtype)
        assert torch.equal(state["token_prefix"], prefix)
        assert torch.equal(state["token_suffix"], suffix)

        learner = torch.nn.Module()  # the official prompt learner's parameters and buffers
        learner.ctx = torch.nn.Parameter(torch.zeros(N_CTX, 64, dtype=dtype))
        learner.register_buffer("token_prefix", torch.zeros_like(prefix))
        learner.register_buffer("token_suffix", torch.zeros_like(suffix))
        del state["token_prefix"], state["token_suffix"]
        learner.load_state_dict(state, strict=False)
        assert torch.equal(learner.ctx.detach(), run_ctx(tmp_path / "run").to(dtype))

        official = official_text_features(world.model, world.tokenizer, names,
                                          {**ckpt["state_dict"], "token_prefix": prefix,
                                           "token_suffix": suffix})
        # fp16: the context and the token embeddings rounded to half precision.
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=5e-3)
        torch.testing.assert_close(official, run.text_features, **tol)


def run_ctx(run_dir):
    return read_prompt_file(run_dir).tensors["ctx"]


def test_export_then_import_gives_the_same_probabilities(world, tmp_path):
    config = TrainConfig(n_ctx=N_CTX, epochs=2, warmup_epochs=0, pretrained=world.weights,
                         lr=0.05)
    train_run(config, world.cache, world.model, world.tokenizer, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    features = world.cache.test_features
    expected = probabilities(run, features)
    for precision in ("fp32", "fp16"):
        export_dassl(tmp_path / "run", tmp_path / precision, precision=precision)
        do_import(world, tmp_path / precision, tmp_path / f"back-{precision}")
        back = load_run(tmp_path / f"back-{precision}")
        got = probabilities(back, features)
        if precision == "fp32":  # the same tensors: the same probabilities
            assert torch.equal(back.text_features, run.text_features)
            assert torch.equal(got, expected)
        else:
            # Each context entry rounded to half precision (relative error <= 2^-11 ~ 4.9e-4)
            # moves a class feature's direction by about that much, a logit by the logit scale
            # (14.3) times it: < 1e-2, a probability by at most half of a logit's move. Seen:
            # ~5e-5. 2e-3 leaves a wide margin, while a wrong tensor or class order moves
            # probabilities by far more.
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)
            assert torch.equal(got.argmax(1), expected.argmax(1))
        # Once in float16, another round trip is exact.
        export_dassl(tmp_path / f"back-{precision}", tmp_path / f"again-{precision}",
                     precision=precision)
        do_import(world, tmp_path / f"again-{precision}", tmp_path / f"again-run-{precision}")
        assert torch.equal(load_run(tmp_path / f"again-run-{precision}").text_features,
                           back.text_features)


MARKER = "ran-code"


@pytest.mark.parametrize("hostile", ["os.system", "eval", "subprocess.Popen"])
@pytest.mark.parametrize("where", ["optimizer", "state_dict", "ctx"])
def test_a_pickle_that_would_run_code_runs_nothing(world, tmp_path, monkeypatch, hostile, where):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / MARKER
    payload = {"os.system": Reduces(os.system, (f"touch {marker}",)),
               "eval": Reduces(eval, (f"__import__('os').system('touch {marker}')",)),
               # a class built with NEWOBJ-style arguments and then given a state
               "subprocess.Popen": Reduces(subprocess.Popen, (["touch", str(marker)],),
                                           {"returncode": 0})}[hostile]
    state = coop_state(world)
    if where == "ctx":
        state["ctx"] = payload
        save_dassl_checkpoint(tmp_path / "model.pth.tar-1", state)
    elif where == "state_dict":
        save_dassl_checkpoint(tmp_path / "model.pth.tar-1", state,
                              extra={"state_dict": payload})
    else:
        save_dassl_checkpoint(tmp_path / "model.pth.tar-1", state, extra={"optimizer": payload})
    if where == "optimizer":  # inert where nothing needs it: the import goes on
        do_import(world, tmp_path / "model.pth.tar-1", tmp_path / "run")
        raw = read_torch_file(tmp_path / "model.pth.tar-1")
        assert isinstance(raw["optimizer"], Opaque) and MARKER in repr(raw["optimizer"].args)
    else:
        with pytest.raises(ValueError, match="model.pth.tar-1"):
            do_import(world, tmp_path / "model.pth.tar-1", tmp_path / "run")
        assert not (tmp_path / "run").exists()
    assert not marker.exists()


def test_refusals_name_the_file(world, tmp_path):
    good = coop_state(world)
    cases = {
        "not-dassl": ({"ctx": good["ctx"]}, None, "not a Dassl checkpoint \\(no 'state_dict'\\)"),
        "clip": ({"state_dict": {"token_embedding.weight": torch.zeros(3, 64)}, "epoch": 1},
                 None, "not a prompt learner's state \\(no 'ctx' tensor"),
        "no-epoch": ({"state_dict": good}, None, "its 'epoch' is None"),
        "width": (None, {**good, "ctx": torch.zeros(N_CTX, 32)}, "width 32.*text width is 64"),
        "classes": (None, {**good, "ctx": torch.zeros(3, N_CTX, 64)},
                    "class-specific contexts for 3 classes, but --classnames names 4"),
        "cocoop-as-coop": (None, {**good, "meta_net.linear1.weight": torch.zeros(4, 64)},
                           "also holds \\['meta_net.linear1.weight'\\].*--learner"),
        "nan": (None, {**good, "ctx": torch.full((N_CTX, 64), float("nan"))}, "NaN"),
    }
    for name, (raw, state, message) in cases.items():
        path = tmp_path / f"{name}.pth.tar"
        if raw is not None:
            torch.save(raw, path)
        else:
            save_dassl_checkpoint(path, state)
        with pytest.raises(ValueError, match=message) as info:
            do_import(world, path, tmp_path / name)
        assert str(path) in str(info.value), name
        assert not (tmp_path / name).exists()

    save_dassl_checkpoint(tmp_path / "tcp", {**good, "ctx": torch.zeros(4, N_CTX, 64)})
    with pytest.raises(ValueError, match="class-specific .* official TCP cannot train"):
        do_import(world, tmp_path / "tcp", tmp_path / "tcp-run", learner="tcp")
    with pytest.raises(ValueError, match="lacks \\['meta_net.linear1.weight'"):
        do_import(world, tmp_path / "nan.pth.tar", tmp_path / "x", learner="tcp")


def test_damaged_and_missing_files_are_refused_by_name(world, tmp_path):
    path = tmp_path / "model.pth.tar-3"
    save_dassl_checkpoint(path, coop_state(world))
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("text", b"not a checkpoint"),
                          ("flipped", data[:200] + bytes(b ^ 0xFF for b in data[200:400])
                           + data[400:])):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"{bad}.* is damaged or not a torch checkpoint"):
            do_import(world, bad, tmp_path / f"run-{name}")
    (tmp_path / "empty").mkdir()
    # A view repeating one stored element 10^12 times is refused, not copied.
    torch.save({"state_dict": {"ctx": torch.zeros(1).expand(10**6, 10**6)}, "epoch": 1},
               tmp_path / "huge")
    with pytest.raises(ValueError, match="repeats the 1 elements of its storage"):
        read_dassl_checkpoint(tmp_path / "huge")
    with pytest.raises(ValueError, match="holds no Dassl checkpoint"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        find_checkpoint(tmp_path / "missing")
    (tmp_path / "out" / "prompt_learner").mkdir(parents=True)
    for n in (2, 10, 9):
        save_dassl_checkpoint(tmp_path / "out" / "prompt_learner" / f"model.pth.tar-{n}",
                              coop_state(world), epoch=n)
    assert find_checkpoint(tmp_path / "out").endswith("model.pth.tar-10")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        do_import(world, path, tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_class_names_out_of_the_trained_order_are_noted(world, tmp_path):
    """The saved token_suffix holds the trained class names' tokens: another order imports (the
    official load ignores the buffers too) but is recorded as differing."""
    save_dassl_checkpoint(tmp_path / "model.pth.tar-1", coop_state(world), epoch=1)
    names = list(world.cache.classnames)
    metrics = import_dassl(tmp_path, "coop", names[::-1], tmp_path / "run",
                           pretrained=world.weights)
    assert metrics["imported_from"]["token_suffix"] == (
        f"differs for 4 of 4 classes (first: {names[-1]!r})")
    with pytest.raises(ValueError, match="official KgCoOp puts the class name at the end"):
        do_import(world, tmp_path, tmp_path / "x", learner="kgcoop",
                  class_token_position="front")
