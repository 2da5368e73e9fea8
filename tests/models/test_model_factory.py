"""create_model: local checkpoint files round-trip through open_clip, bad files are named, nothing
is downloaded; count_parameters."""
from __future__ import annotations

import json
import os
import socket
import warnings

import open_clip
import pytest
import safetensors.torch
import torch

from fastprompt.models import TINY_MODEL, count_parameters, create_model
from fastprompt.models.factory import CONFIG_DIR


@pytest.fixture
def no_network(monkeypatch):
    """Any download or connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("attempted a download / network connection")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", refuse)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save(state_dict, path):
    if str(path).endswith(".safetensors"):
        safetensors.torch.save_file(state_dict, str(path))
    else:
        torch.save(state_dict, str(path))


def outputs(model, tokenizer, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 64, 64, generator=g)
    text = tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip(tmp_path, suffix, no_network, seed):
    source, _, _, _ = create_model(TINY_MODEL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights other than the default draw
        for p in source.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    path = tmp_path / f"tiny{suffix}"
    save(source.state_dict(), path)

    loaded, _, preprocess_val, tokenizer = create_model(TINY_MODEL, pretrained=str(path))
    fresh, _, _, _ = create_model(TINY_MODEL)
    expected = source.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not torch.equal(fresh.token_embedding.weight, source.token_embedding.weight)
    for a, b in zip(outputs(loaded, tokenizer, seed), outputs(source, tokenizer, seed)):
        assert torch.equal(a, b)
    assert not loaded.training and count_parameters(loaded) == 0
    assert callable(preprocess_val) and tokenizer(["cat"]).shape == (1, 77)


def test_bad_checkpoint_files_are_named(tmp_path, no_network):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match=f"^pretrained: '{missing}' is not a file"):
        create_model(TINY_MODEL, pretrained=str(missing))

    # A checkpoint of another model: the tiny config with a narrower text tower.
    with open(os.path.join(CONFIG_DIR, f"{TINY_MODEL}.json")) as f:
        cfg = json.load(f)
    cfg["text_cfg"]["width"] = 32
    other = tmp_path / "other.safetensors"
    save(open_clip.CLIP(**cfg).state_dict(), other)
    mismatch = "is not a checkpoint of this model"
    with pytest.raises(ValueError, match=f"^pretrained: '{other}' {mismatch} \\(AssertionError"):
        create_model(TINY_MODEL, pretrained=str(other))

    # Missing keys: a truncated state dict.
    partial = tmp_path / "partial.pt"
    state = create_model(TINY_MODEL)[0].state_dict()
    save({k: v for k, v in list(state.items())[:5]}, partial)
    with pytest.raises(ValueError, match=f"^pretrained: '{partial}' {mismatch} \\(RuntimeError.*Missing key"):
        create_model(TINY_MODEL, pretrained=str(partial))

    for name in ("damaged.safetensors", "damaged.pt"):
        damaged = tmp_path / name
        damaged.write_bytes(os.urandom(256))
        with pytest.raises(ValueError, match=f"^pretrained: cannot read '{damaged}'"):
            create_model(TINY_MODEL, pretrained=str(damaged))


def test_nothing_is_downloaded(tmp_path, no_network):
    # A pretrained tag is not a file: refused before open_clip could fetch it.
    with pytest.raises(ValueError, match="^pretrained: 'openai' is not a file"):
        create_model("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="^name: unknown open_clip model 'hf-hub:"):
        create_model("hf-hub:timm/ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="^name: unknown open_clip model 'no-such-model'"):
        create_model("no-such-model")
    # Configs whose tower or tokenizer come from Hugging Face.
    for key, value, name in (("hf_model_name", "roberta-base", "fastprompt-test-hf-tower"),
                             ("hf_tokenizer_name", "timm/ViT-B-16-SigLIP", "fastprompt-test-hf-tok")):
        with open(os.path.join(CONFIG_DIR, f"{TINY_MODEL}.json")) as f:
            cfg = json.load(f)
        cfg["text_cfg"][key] = value
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(str(path))
        with pytest.raises(ValueError, match=f"^name: '{name}' uses the Hugging Face"):
            create_model(name)


def test_quickgelu_hint_for_openai_files(tmp_path, no_network):
    state = create_model(TINY_MODEL)[0].state_dict()
    for file_name, warns in (("openai_tiny.safetensors", True), ("tiny.safetensors", False)):
        path = tmp_path / file_name
        save(state, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            create_model(TINY_MODEL, pretrained=str(path))
        hints = [w for w in caught if "QuickGELU" in str(w.message)]
        assert bool(hints) == warns, file_name


def test_count_parameters():
    layer = torch.nn.Linear(3, 5)
    layer.bias.requires_grad_(False)
    shared = torch.nn.Sequential(layer, layer)
    assert count_parameters(shared) == 15
    assert count_parameters(shared, trainable_only=False) == 20
    with pytest.raises(TypeError, match="^module:"):
        count_parameters(layer.weight)


def test_default_tiny_weights_are_a_fixed_function_of_the_seed(seed):
    """Without a file, fastprompt-tiny is the draw from TINY_MODEL_SEED in every process,
    whatever the caller's random state, which it leaves alone (a run trained on it can be
    rebuilt for export by another process)."""
    import subprocess
    import sys

    from fastprompt.models import model_weights_hash
    from fastprompt.models.factory import TINY_MODEL_SEED
    torch.manual_seed(seed)
    before = torch.random.get_rng_state()
    here = create_model(TINY_MODEL)[0]
    assert torch.equal(torch.random.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_MODEL_SEED)
        import open_clip
        drawn = open_clip.create_model(TINY_MODEL)
    for (name, a), (_, b) in zip(sorted(here.state_dict().items()), sorted(drawn.state_dict().items())):
        assert torch.equal(a, b), name
    code = ("import torch; torch.manual_seed(12345); from fastprompt.models import create_model; "
            "from fastprompt.models import model_weights_hash; "
            "print(model_weights_hash(create_model('fastprompt-tiny')[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == model_weights_hash(here)


def test_a_model_loaded_from_a_file_draws_no_random_weights(tmp_path, monkeypatch, no_network,
                                                             seed):
    """Weights read from a file are not first drawn at random (seconds for a ViT-B, overwritten
    anyway): torch.nn.init is not run, the caller's random state is untouched, and torch.nn.init
    works again after."""
    path = tmp_path / "tiny.safetensors"
    save(create_model(TINY_MODEL)[0].state_dict(), path)
    calls = []
    original = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda *a, **k: calls.append(1) or original(*a, **k))
    create_model(TINY_MODEL)
    drawn = len(calls)
    torch.manual_seed(seed)
    before = torch.random.get_rng_state()
    create_model(TINY_MODEL, pretrained=str(path))
    assert drawn > 0 and len(calls) == drawn
    assert torch.equal(torch.random.get_rng_state(), before)
    with pytest.raises(ValueError, match="^pretrained:"):  # the init functions come back on errors
        create_model("ViT-B-32", pretrained=str(path))
    w = torch.zeros(3, 4)
    torch.nn.init.normal_(w)
    assert w.abs().sum() > 0


@pytest.mark.parametrize("memo", ["cold", "warm"])
def test_a_model_without_its_image_tower(tmp_path, monkeypatch, no_network, seed, memo):
    """image_tower=False (work on cached features): the text side and the weights' hash are the
    full model's, the image tower holds no weights and refuses to encode, and the file is still
    checked strictly outside the image tower (by shape inside it when the hash is computed)."""
    from fastprompt.models import model_weights_hash
    from fastprompt.models.factory import SkippedImageTower
    monkeypatch.setenv("FASTPROMPT_CACHE_DIR", str(tmp_path / "memo"))
    source = create_model(TINY_MODEL)[0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    path = tmp_path / "tiny.safetensors"
    state = source.state_dict()
    save(state, path)
    full, _, _, tokenizer = create_model(TINY_MODEL, pretrained=str(path))
    if memo == "warm":
        model_weights_hash(full)
    text_only = create_model(TINY_MODEL, pretrained=str(path), image_tower=False)[0]
    assert isinstance(text_only.visual, SkippedImageTower)
    assert not any(k.startswith("visual.") for k in text_only.state_dict())
    assert model_weights_hash(text_only) == model_weights_hash(full)
    tokens = tokenizer(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        assert torch.equal(text_only.encode_text(tokens), full.encode_text(tokens))
        with pytest.raises(RuntimeError, match="without its image tower"):
            text_only.encode_image(torch.zeros(1, 3, 64, 64))
    # Without a file: the seeded draw's hash.
    assert (model_weights_hash(create_model(TINY_MODEL, image_tower=False)[0])
            == model_weights_hash(create_model(TINY_MODEL)[0]))

    no_text = tmp_path / "no_text.safetensors"
    save({k: v for k, v in state.items() if k != "token_embedding.weight"}, no_text)
    with pytest.raises(ValueError, match="is not a checkpoint of this model.*token_embedding"):
        create_model(TINY_MODEL, pretrained=str(no_text), image_tower=False)
    no_image = tmp_path / "no_image.safetensors"
    save({k: v for k, v in state.items() if not k.startswith("visual.")}, no_image)
    with pytest.raises(ValueError, match=f"^pretrained: '{no_image}' is not a checkpoint"):
        create_model(TINY_MODEL, pretrained=str(no_image), image_tower=False)


def test_evaluating_a_run_on_caches_skips_the_image_tower(monkeypatch, tiny_weights):
    """Commands that need cached features only (evaluate on caches, train from a cache, a sweep's
    training jobs) ask for the model without its image tower."""
    from fastprompt.protocols.evaluation import evaluate_run
    from fastprompt.train import runs
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs.get("image_tower", True))
        raise RuntimeError("stop here")
    monkeypatch.setattr(runs, "create_model", recording)
    fixture = os.path.join(os.path.dirname(__file__), "..", "fixtures", "runs_v0_1_0", "coop-run")
    with pytest.raises(RuntimeError, match="stop here"):
        evaluate_run(fixture, "unused.safetensors")
    assert calls == [False]
