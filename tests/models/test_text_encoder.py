"""PromptTextEncoder's deep prompts: the hidden states at the context positions replaced before
a layer, as MaPLe's and TCP's text towers do it, against a float64 full-length re-run written
here from open_clip's blocks (the official code's concatenation of prefix, tokens and suffix)."""
from __future__ import annotations

import copy

import pytest
import torch

from fastprompt.models import PromptLearner, PromptTextEncoder

CLASSES = ["cat", "sea lion", "hot air balloon", "jack-o'-lantern", "b52"]


def official_deep_features(model, embeds, tokens, n_ctx, deep):
    """float64, full length: x = prefix | tokens | suffix before each layer in ``deep`` (CoOp's
    "end" prompts: the context at positions 1..n_ctx), then pooled at the end-of-text token."""
    blocks = copy.deepcopy(model.transformer).double()
    x = embeds.detach().double() + model.positional_embedding.double()
    mask = model.attn_mask.double()
    for i, block in enumerate(blocks.resblocks):
        if i in deep:
            t = deep[i].double().expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], t, x[:, 1 + n_ctx:]], dim=1)
        x = block(x, attn_mask=mask)
    x = copy.deepcopy(model.ln_final).double()(x[torch.arange(x.shape[0]), tokens.argmax(-1)])
    return x @ model.text_projection.double()


@pytest.mark.parametrize("shared", [True, False])
def test_deep_prompts_match_the_official_concatenation(tiny_text, shared, seed):
    model, tok = tiny_text
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    learner = PromptLearner(model, tok, CLASSES, n_ctx=3, truncate=False)
    encoder = PromptTextEncoder(model)
    shape = (3, encoder.width) if shared else (len(CLASSES), 3, encoder.width)
    deep = {1: torch.randn(*shape, generator=g)}
    got = encoder(learner(), learner.tokenized_prompts, deep_prompts=deep,
                  deep_positions=learner.ctx_positions)
    want = official_deep_features(model, learner(), learner.tokenized_prompts, 3, deep)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # Truncated prompts give the same features (the injected positions come before the cut).
    short = PromptLearner(model, tok, CLASSES, n_ctx=3)
    with torch.no_grad():
        short.ctx.copy_(learner.ctx)
    truncated = encoder(short(), short.tokenized_prompts, deep_prompts=deep,
                        deep_positions=short.ctx_positions)
    torch.testing.assert_close(truncated, got, rtol=1e-5, atol=1e-6)


def test_deep_prompts_carry_gradients_and_change_only_what_they_should(tiny_text, seed):
    model, tok = tiny_text
    torch.manual_seed(seed)
    learner = PromptLearner(model, tok, CLASSES, n_ctx=2)
    encoder = PromptTextEncoder(model)
    plain = encoder(learner(), learner.tokenized_prompts)
    deep = torch.zeros(2, encoder.width, requires_grad=True)
    out = encoder(learner(), learner.tokenized_prompts, deep_prompts={1: deep},
                  deep_positions=learner.ctx_positions)
    assert not torch.allclose(out, plain)
    (grad,) = torch.autograd.grad(out.sum(), deep)
    assert grad.abs().sum() > 0


def test_bad_deep_prompts_are_refused_by_name(tiny_text):
    model, tok = tiny_text
    learner = PromptLearner(model, tok, CLASSES, n_ctx=2)
    encoder = PromptTextEncoder(model)
    e, t, p = learner(), learner.tokenized_prompts, learner.ctx_positions
    w = encoder.width
    for deep, positions, match in [
        ({0: torch.zeros(2, w)}, p, r"deep_prompts: layer 0 must be an int in \[1, 2\)"),
        ({2: torch.zeros(2, w)}, p, r"deep_prompts: layer 2"),
        ({1: torch.zeros(3, w)}, p, r"deep_prompts: layer 1: expected tokens of shape"),
        ({1: torch.zeros(2, w)}, None, r"deep_positions: expected"),
    ]:
        with pytest.raises(ValueError, match=match):
            encoder(e, t, deep_prompts=deep, deep_positions=positions)
