"""PromptLearner and PromptTextEncoder on the random-initialised fastprompt-tiny model.

Truths: open_clip's own ``encode_text`` on the plain tokenised prompt, and a float64 full-length
re-run of open_clip's text-tower modules from hand-built embeddings (hand-placed context).
"""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import nn

from fastprompt.models import (TINY_MODEL, PromptedTextModel, PromptLearner, PromptTextEncoder,
                               count_parameters)
from fastprompt.models import text_encoder as text_encoder_module
from fastprompt.models.factory import CONFIG_DIR
from testlib import assert_close_to_truth

WORDS = ("golden", "retriever", "sea", "lion", "tabby", "cat", "airliner", "b52", "t-shirt",
         "forty", "two", "jack-o'-lantern", "ice", "cream", "st.", "bernard", "go-kart", "zebra")
PHRASE = "a photo of a"


def random_classnames(g: torch.Generator, n: int) -> list[str]:
    """``n`` distinct names (the prompt learner refuses names the tokenizer makes equal)."""
    names: list[str] = []
    while len(names) < n:
        k = int(torch.randint(1, 6, (), generator=g))
        name = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
        if name not in names and name != "st.":  # "st." is added by one test
            names.append(name)
    return names


def tiny_config(**text_overrides) -> dict:
    import json
    import os
    with open(os.path.join(CONFIG_DIR, f"{TINY_MODEL}.json")) as f:
        cfg = json.load(f)
    cfg["text_cfg"].update(text_overrides)
    return cfg


def reference_features(model: nn.Module, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Full-length float64 text tower from embeddings (argmax pooling), per open_clip 3.3's
    encode_text: + positional embedding, causal transformer, final norm, pool, projection."""
    transformer = copy.deepcopy(model.transformer).double()
    ln_final = copy.deepcopy(model.ln_final).double()
    x = embeds.detach().double() + model.positional_embedding.double()
    x = ln_final(transformer(x, attn_mask=model.attn_mask.double()))
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return x @ model.text_projection.double()


def hand_built_embeddings(model, tokenizer, texts, ctx):
    """Token embeddings of ``texts`` with the placeholder X positions replaced, in order, by the
    rows of ``ctx`` (C x n_ctx x W)."""
    tokens = tokenizer(texts)
    x_id = tokenizer.encode("X")[0]
    embeds = model.token_embedding(tokens).detach().clone().to(ctx.dtype)
    for c in range(len(texts)):
        positions = (tokens[c] == x_id).nonzero().flatten()
        assert len(positions) == ctx.shape[1]
        embeds[c, positions] = ctx[c].detach()
    return tokens, embeds


@pytest.mark.parametrize("class_specific", [False, True])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_truncated_run_equals_full_length(tiny_text, position, class_specific, seed):
    model, tokenizer = tiny_text
    g = torch.Generator().manual_seed(seed)
    n_cls = int(torch.randint(2, 8, (), generator=g))
    n_ctx = int(torch.randint(1, 9, (), generator=g))
    # "st." as the last word merges with the period in the "end" layout ("st.." is one token).
    classnames = random_classnames(g, n_cls - 1) + ["st."]
    kwargs = dict(n_ctx=n_ctx, class_specific=class_specific, class_token_position=position)
    short = PromptedTextModel(model, tokenizer, classnames, **kwargs)
    full = PromptedTextModel(model, tokenizer, classnames, truncate=False, **kwargs)
    with torch.no_grad():
        ctx = torch.randn(short.prompt_learner.ctx.shape, generator=g) * 0.5
        short.prompt_learner.ctx.copy_(ctx)
        full.prompt_learner.ctx.copy_(ctx)


    weights = torch.randn(n_cls, model.text_projection.shape[1], generator=g)
    features_short = short()
    (features_short * weights).sum().backward()
    features_full = full()
    (features_full * weights).sum().backward()
    assert_close_to_truth(features_short, features_full, 1e-5, 1e-5, f"features (seed {seed})")
    assert_close_to_truth(short.prompt_learner.ctx.grad, full.prompt_learner.ctx.grad, 1e-4, 1e-5,
                          f"ctx grad (seed {seed})")

    # Independent truth: the prompt written out with X placeholders, X embeddings replaced.
    half = n_ctx // 2
    xs = ["X"] * n_ctx
    texts = {"end": [f"{' '.join(xs)} {c}." for c in classnames],
             "front": [f"{c} {' '.join(xs)}." for c in classnames],
             "middle": [" ".join(xs[:half] + [c] + xs[half:]) + "." for c in classnames]}[position]
    # The cut: one past the longest prompt's end-of-text token, counted by hand.
    longest = max(len(tokenizer.encode(text)) + 2 for text in texts)
    assert short.prompt_learner.prompt_length == longest < 77
    assert full.prompt_learner.prompt_length == 77
    per_class_ctx = ctx if class_specific else ctx.expand(n_cls, -1, -1)
    tokens, embeds = hand_built_embeddings(model, tokenizer, texts, per_class_ctx)
    length = short.prompt_learner.prompt_length
    assert torch.equal(short.prompt_learner.tokenized_prompts, tokens[:, :length])
    assert not tokens[:, length:].any()
    torch.testing.assert_close(short.prompt_learner(), embeds[:, :length], rtol=0, atol=0)
    truth = reference_features(model, embeds, tokens)
    assert_close_to_truth(features_short, truth, 1e-5, 1e-5, f"features vs float64 (seed {seed})")


def test_phrase_context_equals_encode_text(tiny_text, seed):
    model, tokenizer = tiny_text
    g = torch.Generator().manual_seed(seed)
    classnames = random_classnames(g, 5)
    prompted = PromptedTextModel(model, tokenizer, classnames, n_ctx=None, ctx_init=PHRASE)
    learner = prompted.prompt_learner
    assert learner.n_ctx == 4 and learner.prompt_prefix == PHRASE
    tokens = tokenizer([f"{PHRASE} {c}." for c in classnames])
    assert torch.equal(learner.tokenized_prompts, tokens[:, :learner.prompt_length])
    with torch.no_grad():
        truth = model.encode_text(tokens)
    assert_close_to_truth(prompted(), truth, 1e-5, 1e-5, "features vs encode_text")


@pytest.mark.parametrize("class_specific", [False, True])
def test_prograd_initialisation_zero_fills_leading_slots(tiny_text, class_specific, seed):
    model, tokenizer = tiny_text
    g = torch.Generator().manual_seed(seed)
    n_zero = int(torch.randint(1, 5, (), generator=g))
    classnames = random_classnames(g, 3)
    prompted = PromptedTextModel(model, tokenizer, classnames, n_ctx=4 + n_zero, ctx_init=PHRASE,
                                 class_specific=class_specific)
    ctx = prompted.prompt_learner.ctx.detach()
    phrase = model.token_embedding.weight[tokenizer.encode(PHRASE)]
    expected = torch.cat([torch.zeros(n_zero, phrase.shape[1]), phrase])
    for row in (ctx if class_specific else ctx[None]):
        assert torch.equal(row, expected)

    texts = [f"{' '.join(['X'] * n_zero)} {PHRASE} {c}." for c in classnames]
    assert prompted.prompt_learner.prompt_prefix == f"{' '.join(['X'] * n_zero)} {PHRASE}"
    tokens = tokenizer(texts)
    embeds = model.token_embedding(tokens).detach().clone()
    embeds[:, 1:1 + n_zero] = 0
    assert_close_to_truth(prompted(), reference_features(model, embeds, tokens), 1e-5, 1e-5,
                          "features vs float64")


def test_external_context_replaces_learned_one(tiny_text, seed):
    model, tokenizer = tiny_text
    g = torch.Generator().manual_seed(seed)
    prompted = PromptedTextModel(model, tokenizer, random_classnames(g, 3), n_ctx=5)
    other = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    features = prompted(other)
    features.sum().backward()
    assert other.grad is not None and other.grad.abs().sum() > 0
    assert prompted.prompt_learner.ctx.grad is None
    with torch.no_grad():
        copy_model = copy.deepcopy(prompted)
        copy_model.prompt_learner.ctx = nn.Parameter(other.detach()[0].clone())
    assert_close_to_truth(prompted(other[0]), copy_model(), 1e-6, 1e-6, "shared external ctx")
    with pytest.raises(ValueError, match="^ctx:"):
        prompted(torch.zeros(4, 64))


@pytest.mark.parametrize("class_specific", [False, True])
def test_state_dict_and_parameter_count(tiny_text, class_specific):
    model, tokenizer = tiny_text
    prompted = PromptedTextModel(model, tokenizer, ["cat", "dog", "sea lion"], n_ctx=7,
                                 class_specific=class_specific)
    assert list(prompted.prompt_learner.state_dict()) == ["ctx"]
    assert count_parameters(prompted) == (3 if class_specific else 1) * 7 * 64
    assert count_parameters(model) == 0
    assert count_parameters(model, trainable_only=False) == sum(p.numel() for p in model.parameters())
    ctx = prompted.prompt_learner.ctx
    assert ctx.dtype == torch.float32 and abs(ctx.std().item() - 0.02) < 0.01


@pytest.mark.parametrize("variant", ["custom_text", "eos_pool", "linear_projection"])
def test_other_standard_text_towers(tiny_text, variant, seed):
    torch.manual_seed(seed)
    if variant == "custom_text":
        model = open_clip.CustomTextCLIP(**tiny_config())
    elif variant == "eos_pool":
        model = open_clip.CLIP(**tiny_config(pool_type="eos", eos_id=49407))
    else:
        model = open_clip.CLIP(**tiny_config(proj_bias=True))
    model.eval().requires_grad_(False)
    tokenizer = tiny_text[1]
    classnames = ["tabby cat", "st. bernard", "ice cream"]
    prompted = PromptedTextModel(model, tokenizer, classnames, n_ctx=None, ctx_init=PHRASE)
    assert prompted.prompt_learner.prompt_length < 77
    with torch.no_grad():
        truth = model.encode_text(tokenizer([f"{PHRASE} {c}." for c in classnames]))
    assert_close_to_truth(prompted(), truth, 1e-5, 1e-5, f"{variant} features vs encode_text")


@pytest.mark.parametrize("tower", ["bidirectional", "last_pool"])
def test_full_length_fallback_where_truncation_is_inexact(tiny_text, tower, monkeypatch, seed):
    monkeypatch.setattr(text_encoder_module, "_warned_full_length", set())
    torch.manual_seed(seed)
    if tower == "bidirectional":
        model = open_clip.CustomTextCLIP(**tiny_config(no_causal_mask=True, pool_type="last"))
    else:
        model = open_clip.CLIP(**tiny_config(pool_type="last"))
    model.eval().requires_grad_(False)
    tokenizer = tiny_text[1]
    classnames = ["cat", "golden retriever"]
    with pytest.warns(UserWarning, match="running all 77 positions"):
        prompted = PromptedTextModel(model, tokenizer, classnames, n_ctx=None, ctx_init=PHRASE)
    assert prompted.prompt_learner.prompt_length == 77
    assert not prompted.text_encoder.truncatable
    with torch.no_grad():
        truth = model.encode_text(tokenizer([f"{PHRASE} {c}." for c in classnames]))
    assert_close_to_truth(prompted(), truth, 1e-5, 1e-5, f"{tower} features vs encode_text")
    embeds = prompted.prompt_learner()
    with pytest.raises(ValueError, match="^prompt_embeddings: .*needs all 77"):
        prompted.text_encoder(embeds[:, :20], prompted.prompt_learner.tokenized_prompts[:, :20])


def test_refuses_unsupported_models(tiny_text):
    _, tokenizer = tiny_text

    class HFTextEncoder(nn.Module):  # stands in for open_clip's Hugging Face tower
        pass

    custom = open_clip.CustomTextCLIP(**tiny_config())
    custom.text = HFTextEncoder()
    with pytest.raises(ValueError, match="^model: CustomTextCLIP with a HFTextEncoder"):
        PromptLearner(custom, tokenizer, ["cat"])
    with pytest.raises(ValueError, match="^model: .*class token"):
        PromptLearner(open_clip.CustomTextCLIP(**tiny_config(embed_cls=True)), tokenizer, ["cat"])
    with pytest.raises(ValueError, match="^model: expected an open_clip CLIP"):
        PromptTextEncoder(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^model: text pooling 'none'"):
        PromptTextEncoder(open_clip.CLIP(**tiny_config(pool_type="none")))


def test_bad_arguments(tiny_text):
    model, tokenizer = tiny_text
    cases = [
        (dict(classnames=[]), "classnames:"),
        (dict(classnames="cat"), "classnames:"),
        (dict(classnames=["cat", " "]), "classnames:"),
        (dict(classnames=["cat " * 80]), "classnames: class 1 of 1, 'cat cat"),
        (dict(class_token_position="left"), "class_token_position:"),
        (dict(n_ctx=0), "n_ctx:"),
        (dict(n_ctx=None), "n_ctx:"),
        (dict(n_ctx=3, ctx_init=PHRASE), "n_ctx: 3 context vectors"),
        (dict(ctx_init="  "), "ctx_init:"),
    ]
    for overrides, message in cases:
        kwargs = dict(classnames=["cat", "dog"])
        kwargs.update(overrides)
        with pytest.raises(ValueError, match=f"^{message}"):
            PromptLearner(model, tokenizer, kwargs.pop("classnames"), **kwargs)
    with pytest.raises(TypeError, match="^n_ctx:"):
        PromptLearner(model, tokenizer, ["cat"], n_ctx=2.0)
    with pytest.raises(ValueError, match="^tokenizer:"):
        PromptLearner(model, lambda texts: None, ["cat"])


def test_encoder_validates_inputs(tiny_text):
    model, _ = tiny_text
    encoder = PromptTextEncoder(model)
    tokens = torch.zeros(2, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match="^prompt_embeddings: width"):
        encoder(torch.zeros(2, 10, 32), tokens)
    with pytest.raises(ValueError, match="^tokenized: expected shape"):
        encoder(torch.zeros(2, 10, 64), tokens[:, :9])
    with pytest.raises(ValueError, match="^prompt_embeddings: length 78"):
        encoder(torch.zeros(2, 78, 64), torch.zeros(2, 78, dtype=torch.int64))
    with pytest.raises(TypeError, match="^tokenized:"):
        encoder(torch.zeros(2, 10, 64), tokens.int())


def test_a_class_name_too_long_is_named_briefly(tiny_text):
    """The error names the class by number and a cut of its name, and where the names came
    from, instead of echoing a prompt of thousands of characters (issue 23, item 16)."""
    model, tokenizer = tiny_text
    name = "very " * 2000
    with pytest.raises(ValueError) as e:
        PromptLearner(model, tokenizer, ["cat", name], n_ctx=4, where="--classnames: x.txt")
    message = str(e.value)
    assert message.startswith("--classnames: x.txt: class 2 of 2, 'very very")
    assert "(10000 characters)" in message and "context length 77" in message
    assert len(message) < 300


@pytest.mark.parametrize("names, i, j", [
    (["dog", "Cat", "cat"], 2, 3),
    (["caf\u00e9", "bird", "cafe\u0301"], 1, 3),  # NFC and NFD
    (["hot  dog", "hot dog"], 1, 2),
])
def test_classes_the_tokenizer_makes_equal_are_refused(tiny_text, names, i, j):
    """Names that differ only in case, Unicode normalisation or spacing give the same tokens,
    hence identical text features: two classes tied for ever (issue 23, item 5)."""
    model, tokenizer = tiny_text
    for position in ("end", "middle", "front"):
        with pytest.raises(ValueError, match=f"^classnames: classes {i} and {j}, .* the same to "
                                             "the tokenizer") as e:
            PromptLearner(model, tokenizer, names, n_ctx=4, class_token_position=position)
        assert repr(names[i - 1]) in str(e.value) and repr(names[j - 1]) in str(e.value)
