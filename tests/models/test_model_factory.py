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

    from fastprompt.data import model_weights_hash
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
            "from fastprompt.data import model_weights_hash; "
            "print(model_weights_hash(create_model('fastprompt-tiny')[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == model_weights_hash(here)
