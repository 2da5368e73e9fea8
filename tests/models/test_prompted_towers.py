"""The prompted image tower and MaPLe's / IVLP's deep vision-language prompts, in float64 on the
tiny model (2 layers per tower, text width 64, image width 96, 64x64 images).

Truths: open_clip's ``encode_image``, and plain-torch walks over the towers' blocks written here
from the official code's semantics (muzairkhattak/multimodal-prompt-learning: ``clip/model.py``'s
``VisionTransformer_MaPLe`` / ``ResidualAttentionBlock_MaPLe`` / ``ResidualAttentionBlock_IVLP``):
prompts concatenated after the positional embedding, the last n tokens (image) or positions
1..n (text) cut out and replaced before each deep layer, full-length text, LayerNorm before
pooling.
"""
from __future__ import annotations

import copy

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import PatchDropout

from fastprompt.models import IVLPPrompts, MaPLePrompts, PromptVisionEncoder

CLASSES = ["cat", "sea lion", "hot air balloon", "jack-o'-lantern", "b52"]
TIGHT = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def model64(tiny_clip):
    """A float64 copy of the tiny model (frozen, eval mode, as the original)."""
    return copy.deepcopy(tiny_clip[0]).double()


@pytest.fixture(scope="module")
def tok(tiny_clip):
    return tiny_clip[3]


def random_images(g, b=3):
    return torch.randn(b, 3, 64, 64, generator=g, dtype=torch.float64)


def randomise(module, g, scale=0.3):
    """Every parameter of ``module`` redrawn (non-trivial values, reproducible from ``g``)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def nudge(p, g):
    """A random change (not a constant shift, which the towers' LayerNorms would remove)."""
    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


# ----- the references, written from the official code ----------------------------------------


def reference_image(model, images, first, deep):
    """Image features: ``first`` (n x W) appended after the positional embedding, before
    ``ln_pre``; before block i, the last n tokens replaced by ``deep[i]``."""
    v = model.visual
    b, n = images.shape[0], first.shape[0]
    x = v.conv1(images)
    x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(b, 1, x.shape[-1], dtype=x.dtype), x], dim=1)
    x = x + v.positional_embedding
    x = torch.cat([x, first.expand(b, -1, -1)], dim=1)
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        if i in deep:
            x = torch.cat([x[:, :x.shape[1] - n], deep[i].expand(b, -1, -1)], dim=1)
        x = block(x)
    x = v.ln_post(x)[:, 0]
    return x @ v.proj


def reference_text(model, tok, prefix, ctx, deep):
    """Text features of ``"<prefix> <name>."``, full length, positions 1..n_ctx replaced by
    ``ctx`` at the input and by ``deep[i]`` before block i (prefix | tokens | suffix)."""
    tokens = tok([f"{prefix} {name}." for name in CLASSES])
    n, c = ctx.shape[0], len(CLASSES)
    embeds = model.token_embedding(tokens)
    x = torch.cat([embeds[:, :1], ctx.expand(c, -1, -1), embeds[:, 1 + n:]], dim=1)
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if i in deep:
            x = torch.cat([x[:, :1], deep[i].expand(c, -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(c), tokens.argmax(dim=-1)] @ model.text_projection


# ----- PromptVisionEncoder --------------------------------------------------------------------


def test_without_prompts_it_is_encode_image(tiny_clip, model64, seed):
    g = torch.Generator().manual_seed(seed)
    images = random_images(g, 5)
    torch.testing.assert_close(PromptVisionEncoder(model64)(images), model64.encode_image(images),
                               **TIGHT)
    model = tiny_clip[0]  # and in the model's own float32
    torch.testing.assert_close(PromptVisionEncoder(model)(images.float()),
                               model.encode_image(images.float()))


@pytest.mark.parametrize("variant", ["plain", "sequence_first", "checkpointing", "per_image"])
def test_prompts_match_the_reference(model64, variant, seed):
    g = torch.Generator().manual_seed(seed)
    model = model64
    if variant in ("sequence_first", "checkpointing"):
        model = copy.deepcopy(model64)
        if variant == "sequence_first":
            model.visual.transformer.batch_first = False
            for block in model.visual.transformer.resblocks:
                block.attn.batch_first = False
        else:
            model.visual.set_grad_checkpointing(True)
    images = random_images(g)
    first = torch.randn(3, 96, generator=g, dtype=torch.float64)
    deep = {1: torch.randn(3, 96, generator=g, dtype=torch.float64)}
    encoder = PromptVisionEncoder(model)
    if variant == "per_image":  # B x n x W prompts: image b gets row b
        firsts = torch.randn(3, 3, 96, generator=g, dtype=torch.float64)
        deeps = torch.randn(3, 3, 96, generator=g, dtype=torch.float64)
        got = encoder(images, firsts, {1: deeps})
        want = torch.cat([reference_image(model64, images[b:b + 1], firsts[b], {1: deeps[b]})
                          for b in range(3)])
    else:
        got = encoder(images, first, deep)
        want = reference_image(model64, images, first, deep)
    torch.testing.assert_close(got, want, **TIGHT)
    # Shallow prompts only: appended, never replaced.
    torch.testing.assert_close(encoder(images, first), reference_image(model64, images, first, {}),
                               **TIGHT)


def test_bad_vision_arguments_are_refused_by_name(model64):
    encoder = PromptVisionEncoder(model64)
    images = torch.zeros(2, 3, 64, 64, dtype=torch.float64)
    p = torch.zeros(2, 96, dtype=torch.float64)
    for args, match in [
        ((torch.zeros(2, 3, 32, 32, dtype=torch.float64),),
         r"images: expected shape \(B, 3, 64, 64\)"),
        ((images, torch.zeros(2, 64, dtype=torch.float64)), r"prompts: expected shape"),
        ((images, torch.zeros(3, 2, 96, dtype=torch.float64)), r"prompts: expected shape"),
        ((images, None, {1: p}), r"deep_prompts: need prompts"),
        ((images, p, {0: p}), r"deep_prompts: layer 0 must be an int in \[1, 2\)"),
        ((images, p, {2: p}), r"deep_prompts: layer 2"),
        ((images, p, {1: torch.zeros(3, 96, dtype=torch.float64)}),
         r"deep_prompts: layer 1: expected"),
    ]:
        with pytest.raises(ValueError, match=match):
            encoder(*args)


def test_unsupported_image_towers_are_refused_naming_model(model64, tok):
    resnet = copy.deepcopy(model64)
    resnet.visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=64, heads=2, image_size=64,
                                   width=8)
    attn_pool = copy.deepcopy(model64)
    attn_pool.visual.attn_pool = torch.nn.Identity()
    avg = copy.deepcopy(model64)
    avg.visual.pool_type = "avg"
    for model, match in [(resnet, "ModifiedResNet"), (attn_pool, "attention"), (avg, "'avg'"),
                         (torch.nn.Linear(2, 2), "no image tower")]:
        with pytest.raises(ValueError, match=f"model: .*{match}"):
            PromptVisionEncoder(model)
    with pytest.raises(ValueError, match="model: .*ModifiedResNet"):
        MaPLePrompts(resnet, tok, CLASSES, depth=2)
    dropping = copy.deepcopy(model64)
    dropping.visual.patch_dropout = PatchDropout(0.5)
    dropping.visual.eval()
    encoder = PromptVisionEncoder(dropping)  # eval mode: the dropout is the identity
    images = torch.zeros(1, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(encoder(images), model64.encode_image(images), **TIGHT)
    dropping.visual.train()
    with pytest.raises(ValueError, match="model: .*patch dropout"):
        encoder(images)
    with pytest.raises(ValueError, match="model: .*patch dropout"):
        PromptVisionEncoder(dropping)


# ----- MaPLe ----------------------------------------------------------------------------------


def test_maple_matches_the_official_semantics(model64, tok, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompts = MaPLePrompts(model64, tok, CLASSES, n_ctx=2, depth=2)
    randomise(prompts, g)
    images = random_images(g)
    text, image = prompts(images)
    assert text.shape == (len(CLASSES), 64) and image.shape == (3, 64)
    ctx, deep_text = prompts.ctx, prompts.compound_prompts_text[0]
    deep_image = prompts.compound_prompt_projections[0](deep_text)
    with torch.no_grad():
        torch.testing.assert_close(
            text, reference_text(model64, tok, "a photo of a", ctx, {1: deep_text}), **TIGHT)
        torch.testing.assert_close(
            image, reference_image(model64, images, prompts.proj(ctx), {1: deep_image}), **TIGHT)
        # The deep prompts act: without them (depth 1) both towers' features change.
        shallow = MaPLePrompts(model64, tok, CLASSES, n_ctx=2, depth=1)
        shallow.load_state_dict({k: v for k, v in prompts.state_dict().items()
                                 if k in shallow.state_dict()})
        torch.testing.assert_close(shallow.text_features(),
                                   reference_text(model64, tok, "a photo of a", ctx, {}), **TIGHT)
        torch.testing.assert_close(shallow.image_features(images),
                                   reference_image(model64, images, prompts.proj(ctx), {}), **TIGHT)
        assert not torch.allclose(shallow.text_features(), text)
        assert not torch.allclose(shallow.image_features(images), image)


def test_maple_random_context_and_initialisation(model64, tok, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # ctx_init: the phrase stays whole in the prompt, its first n_ctx tokens are learned.
    prompts = MaPLePrompts(model64, tok, CLASSES, n_ctx=2, depth=2)
    phrase = model64.token_embedding(tok(["a photo"])[0, 1:3])
    torch.testing.assert_close(prompts.ctx.detach(), phrase)
    rows = tok([f"a photo of a {name}." for name in CLASSES])
    assert torch.equal(prompts.tokenized_prompts, rows[:, :prompts.tokenized_prompts.shape[1]])
    # Random context: "X X X <name>.", three context tokens.
    rand = MaPLePrompts(model64, tok, CLASSES, n_ctx=3, depth=2, ctx_init=None)
    randomise(rand, g)
    images = random_images(g, 1)
    deep = rand.compound_prompts_text[0]
    with torch.no_grad():
        torch.testing.assert_close(
            rand.text_features(), reference_text(model64, tok, "X X X", rand.ctx, {1: deep}),
            **TIGHT)
        torch.testing.assert_close(
            rand.image_features(images),
            reference_image(model64, images, rand.proj(rand.ctx),
                            {1: rand.compound_prompt_projections[0](deep)}), **TIGHT)


def test_maple_gradients_and_coupling(model64, tok, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompts = MaPLePrompts(model64, tok, CLASSES, n_ctx=2, depth=2)
    randomise(prompts, g)
    images = random_images(g)
    text, image = prompts(images)
    weights_t = torch.randn(text.shape, generator=g, dtype=torch.float64)
    weights_i = torch.randn(image.shape, generator=g, dtype=torch.float64)
    ((text * weights_t).sum() + (image * weights_i).sum()).backward()
    names = [name for name, _ in prompts.named_parameters()]
    assert names == ["ctx", "proj.weight", "proj.bias", "compound_prompts_text.0",
                     "compound_prompt_projections.0.weight", "compound_prompt_projections.0.bias"]
    for name, p in prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model64.parameters())
    # Coupling: compound_prompts_text.0 moves both towers.
    with torch.no_grad():
        nudge(prompts.compound_prompts_text[0], g)
        text2, image2 = prompts(images)
    assert not torch.allclose(text2, text) and not torch.allclose(image2, image)


def test_maple_names_and_bad_arguments(model64, tok):
    prompts = MaPLePrompts(model64, tok, CLASSES, n_ctx=2, depth=2)
    state = prompts.state_dict()
    assert list(state) == ["ctx", "proj.weight", "proj.bias", "compound_prompts_text.0",
                           "compound_prompt_projections.0.weight",
                           "compound_prompt_projections.0.bias"]
    assert state["ctx"].shape == (2, 64) and state["proj.weight"].shape == (96, 64)
    assert state["compound_prompts_text.0"].shape == (2, 64)
    official = prompts.official_state_dict()
    assert list(official) == [f"prompt_learner.{k}" for k in state]
    # An official checkpoint (the whole CustomCLIP) loads; other keys are ignored.
    other = MaPLePrompts(model64, tok, CLASSES, n_ctx=2, depth=2, ctx_init=None)
    other.load_official_state_dict({**official, "prompt_learner.token_prefix": torch.zeros(1),
                                    "image_encoder.conv1.weight": torch.zeros(1)})
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="state_dict: has no 'prompt_learner.proj.bias'"):
        other.load_official_state_dict({k: v for k, v in official.items() if "proj.bias" not in k})
    for kwargs, match in [
        (dict(depth=0), r"depth: must be in \[1, 2\]"),
        (dict(depth=3),
         r"depth: must be in \[1, 2\] \(the towers have 2 text and 2 image layers\)"),
        (dict(n_ctx=0), r"n_ctx: must be at least 1"),
        (dict(n_ctx=5), r"n_ctx: 5 context vectors exceed ctx_init"),
    ]:
        with pytest.raises(ValueError, match=match):
            MaPLePrompts(model64, tok, CLASSES, **{"depth": 2, **kwargs})
    with pytest.raises(ValueError, match=r"^model: "):
        MaPLePrompts(torch.nn.Linear(2, 2), tok, CLASSES, depth=2)


# ----- IVLP -----------------------------------------------------------------------------------


def test_ivlp_matches_the_official_semantics(model64, tok, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompts = IVLPPrompts(model64, tok, CLASSES, n_ctx_text=2, n_ctx_vision=3, depth_text=2,
                          depth_vision=2)
    randomise(prompts, g)
    images = random_images(g)
    text, image = prompts(images)
    with torch.no_grad():
        torch.testing.assert_close(
            text, reference_text(model64, tok, "a photo of a", prompts.ctx,
                                 {1: prompts.text_VPT_shallow["1"]}), **TIGHT)
        torch.testing.assert_close(
            image, reference_image(model64, images, prompts.VPT,
                                   {1: prompts.vision_VPT_shallow["1"]}), **TIGHT)
    # Depth 1 text, depth 0 image: a shallow text prompt and the plain image tower.
    plain = IVLPPrompts(model64, tok, CLASSES, depth_text=1, depth_vision=0, ctx_init=None)
    assert list(plain.state_dict()) == ["ctx"]
    with torch.no_grad():
        torch.testing.assert_close(plain.image_features(images), model64.encode_image(images),
                                   **TIGHT)
        torch.testing.assert_close(plain.text_features(),
                                   reference_text(model64, tok, "X X", plain.ctx, {}), **TIGHT)


def test_ivlp_gradients_and_independence(model64, tok, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompts = IVLPPrompts(model64, tok, CLASSES, n_ctx_text=3, n_ctx_vision=2, depth_text=2,
                          depth_vision=2)
    randomise(prompts, g)
    images = random_images(g)
    text, image = prompts(images)
    weights_t = torch.randn(text.shape, generator=g, dtype=torch.float64)
    weights_i = torch.randn(image.shape, generator=g, dtype=torch.float64)
    ((text * weights_t).sum() + (image * weights_i).sum()).backward()
    names = [name for name, _ in prompts.named_parameters()]
    assert names == ["ctx", "VPT", "text_VPT_shallow.1", "vision_VPT_shallow.1"]
    for name, p in prompts.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model64.parameters())
    with torch.no_grad():  # text prompts leave the image features alone, and the reverse
        nudge(prompts.ctx, g)
        nudge(prompts.text_VPT_shallow["1"], g)
        text2, image2 = prompts(images)
        assert torch.equal(image2, image) and not torch.allclose(text2, text)
        nudge(prompts.VPT, g)
        nudge(prompts.vision_VPT_shallow["1"], g)
        text3, image3 = prompts(images)
        assert torch.equal(text3, text2) and not torch.allclose(image3, image2)


def test_ivlp_names_and_bad_arguments(model64, tok):
    prompts = IVLPPrompts(model64, tok, CLASSES, depth_text=2, depth_vision=2)
    official = prompts.official_state_dict()
    assert list(official) == ["prompt_learner.ctx", "image_encoder.VPT",
                              "text_encoder.transformer.resblocks.1.VPT_shallow",
                              "image_encoder.transformer.resblocks.1.VPT_shallow"]
    assert [tuple(v.shape) for v in official.values()] == [(2, 64), (2, 96), (2, 64), (2, 96)]
    other = IVLPPrompts(model64, tok, CLASSES, depth_text=2, depth_vision=2)
    other.load_official_state_dict({**official, "logit_scale": torch.zeros(())})
    for k, v in other.state_dict().items():
        assert torch.equal(v, prompts.state_dict()[k]), k
    for kwargs, match in [
        (dict(depth_text=0), r"depth_text: must be in \[1, 2\]"),
        (dict(depth_text=3), r"depth_text: must be in \[1, 2\]"),
        (dict(depth_vision=-1), r"depth_vision: must be in \[0, 2\]"),
        (dict(depth_vision=3), r"depth_vision: must be in \[0, 2\]"),
        (dict(n_ctx_text=0), r"n_ctx_text: must be at least 1"),
        (dict(n_ctx_vision=0), r"n_ctx_vision: must be at least 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            IVLPPrompts(model64, tok, CLASSES, **{"depth_text": 2, "depth_vision": 2, **kwargs})
    with pytest.raises(ValueError, match=r"^model: "):
        IVLPPrompts(torch.nn.Linear(2, 2), tok, CLASSES, depth_text=2, depth_vision=2)


def test_casting_the_prompts_casts_the_towers_they_run(tiny_clip, model64, tok, seed):
    """The encoders are outside the module tree (state_dict: learned tensors only), but ``.to``
    reaches them: a float32 model's prompts cast to float64 give the float64 model's features."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(tiny_clip[0])
    prompts = IVLPPrompts(model, tok, CLASSES, depth_text=2, depth_vision=2)
    assert prompts.ctx.dtype == torch.float32
    prompts.double()
    assert model.visual.conv1.weight.dtype == torch.float64
    assert prompts.text_encoder.attn_mask.dtype == torch.float64
    want = IVLPPrompts(model64, tok, CLASSES, depth_text=2, depth_vision=2)
    want.load_state_dict(prompts.state_dict())
    images = random_images(g, 2)
    with torch.no_grad():
        for got, truth in zip(prompts(images), want(images)):
            torch.testing.assert_close(got, truth, **TIGHT)
