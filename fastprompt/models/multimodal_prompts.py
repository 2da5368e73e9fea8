"""Deep vision-language prompts: MaPLe (coupled) and IVLP (independent), at the model level.

Both run the frozen text tower through ``PromptTextEncoder`` and the frozen image tower through
``PromptVisionEncoder``; the modules here hold only the learned tensors, under the names of the
official code (muzairkhattak/multimodal-prompt-learning), so that a fastprompt prompt file and an
official checkpoint hold the same tensors. ``official_state_dict`` / ``load_official_state_dict``
convert; the official checkpoints hold the whole ``CustomCLIP`` model, whose other keys (the
frozen CLIP weights, the ``token_prefix`` / ``token_suffix`` buffers) are ignored.

Text prompts (both): ``"<ctx_init> <class name>."`` with the first ``n_ctx`` tokens of
``ctx_init`` learned (the official code keeps the rest of the phrase as fixed tokens: with the
defaults, ``n_ctx=2`` and ``"a photo of a"``, "a photo" is learned and "of a" is not), or
``"X ... X <class name>."`` with ``ctx_init=None`` and the context drawn from N(0, 0.02²).
The context sits at positions 1..n_ctx; a deep text prompt replaces those positions before its
layer.

MaPLe (``trainers/maple.py``), names as in ``MultiModalPromptLearner``; the official
checkpoint's key is ``prompt_learner.<name>``:

============================================  =====================================================
``ctx``                                       n_ctx x text width, the text context
``proj.weight``, ``proj.bias``                Linear text width -> image width: the image prompts
                                              appended at the input are ``proj(ctx)``
``compound_prompts_text.{j}``                 n_ctx x text width, replaces the text context
                                              before text layer j+1 (j = 0 .. depth-2)
``compound_prompt_projections.{j}.weight``,   Linear text width -> image width: it maps
``compound_prompt_projections.{j}.bias``      ``compound_prompts_text.{j}`` to the image prompts
                                              that replace the appended tokens before image
                                              layer j+1
============================================  =====================================================

IVLP (``trainers/independentVL.py``, ``clip/model.py``'s ``ResidualAttentionBlock_IVLP``): the
official code keeps the text context in the prompt learner and the other prompts inside the
towers' blocks. fastprompt's names map one to one (``i`` is the official block index):

=============================  =========================================================
fastprompt                     official key
=============================  =========================================================
``ctx``                        ``prompt_learner.ctx``            (n_ctx_text x text width)
``text_VPT_shallow.{i}``       ``text_encoder.transformer.resblocks.{i}.VPT_shallow``
                               (n_ctx_text x text width; replaces the context before text
                               layer i, 1 <= i < depth_text)
``VPT``                        ``image_encoder.VPT``             (n_ctx_vision x image width,
                               appended to the image tokens; absent when depth_vision is 0)
``vision_VPT_shallow.{i}``     ``image_encoder.transformer.resblocks.{i}.VPT_shallow``
                               (n_ctx_vision x image width; replaces the appended tokens
                               before image layer i, 1 <= i < depth_vision)
=============================  =========================================================

Where this differs from the official code, and why (docs/online_learners.md has the list):
the widths come from the model instead of the hard-coded 512 / 768 of ViT-B/16; the learned
tensors are kept in at least float32 and cast to the towers' dtype where used (the official code
casts the prompts to float16 inside the towers); ``n_ctx`` larger than ``ctx_init``'s token count
is refused (the official code then reads past the phrase, or above 4 context tokens silently
ignores ``ctx_init``); ``depth`` larger than a tower's layer count is refused (the official code
silently leaves the extra prompts unused); MaPLe's ``compound_prompt_projections`` all start
from one draw, cloned, as in the official code.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fastprompt.models.prompt_learner import PromptLearner
from fastprompt.models.text_encoder import PromptTextEncoder
from fastprompt.models.vision_encoder import PromptVisionEncoder


def _check_count(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
        raise ValueError(f"{name}: must be {bound}{why}, got {value}")
    return value


class _PromptedTowers(nn.Module):
    """What MaPLe and IVLP share: the class prompts' fixed tokens, the text context ``ctx``, and
    the two prompted encoders (kept out of the module tree, so that ``state_dict()`` holds the
    learned tensors only; moving or casting this module moves or casts them too, and with them
    the model's tower weights they reference)."""

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], *, n_ctx: int,
                 ctx_init: str | None, truncate: bool, ctx_name: str = "n_ctx"):
        super().__init__()
        text_encoder = PromptTextEncoder(model)  # validates the text tower (ValueError: model)
        vision_encoder = PromptVisionEncoder(model)  # validates the image tower
        _check_count(ctx_name, n_ctx, 1)
        if ctx_init is not None:
            # Official: the whole phrase goes into the prompt, its first n_ctx tokens are learned.
            learner = PromptLearner(model, tokenizer, classnames, n_ctx=None, ctx_init=ctx_init,
                                    truncate=truncate)
            if n_ctx > learner.n_ctx:
                raise ValueError(f"{ctx_name}: {n_ctx} context vectors exceed ctx_init "
                                 f"{ctx_init!r} ({learner.n_ctx} tokens); pass ctx_init=None "
                                 "for a random context")
        else:
            learner = PromptLearner(model, tokenizer, classnames, n_ctx=n_ctx, truncate=truncate)
        self.register_buffer("tokenized_prompts", learner.tokenized_prompts, persistent=False)
        self.register_buffer("token_embeds", learner.token_embeds, persistent=False)
        self.register_buffer("ctx_positions", learner.ctx_positions[:, :n_ctx].contiguous(),
                             persistent=False)
        self.ctx = nn.Parameter(learner.ctx.detach()[:n_ctx].clone())
        self.__dict__["_encoders"] = (text_encoder, vision_encoder)
        self.classnames = learner.classnames
        self.n_cls = learner.n_cls
        self.n_ctx = n_ctx
        self.ctx_init = learner.ctx_init
        self.prompt_prefix = learner.prompt_prefix
        self.text_width = text_encoder.width
        self.vision_width = vision_encoder.width

    @property
    def text_encoder(self) -> PromptTextEncoder:
        return self._encoders[0]

    @property
    def vision_encoder(self) -> PromptVisionEncoder:
        return self._encoders[1]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for encoder in self._encoders:
            encoder._apply(fn, recurse)
        return self

    def _new_tensor(self, *shape: int) -> torch.Tensor:
        """An uninitialised tensor in the context's dtype and device."""
        return torch.empty(*shape, dtype=self.ctx.dtype, device=self.ctx.device)

    def _linear(self) -> nn.Linear:
        """Linear text width -> image width, default init, in the context's dtype and device."""
        return nn.Linear(self.text_width, self.vision_width, dtype=self.ctx.dtype,
                         device=self.ctx.device)

    def prompt_embeddings(self) -> torch.Tensor:
        """The C class prompts' embeddings (C x L x text width) with ``ctx`` in place."""
        ctx = self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        index = self.ctx_positions.unsqueeze(-1).expand(-1, -1, ctx.shape[-1])
        return self.token_embeds.to(ctx.dtype).scatter(1, index, ctx)

    def text_prompts(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def vision_prompts(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        raise NotImplementedError

    def text_features(self) -> torch.Tensor:
        """Text features of the C class prompts (C x E, unnormalised)."""
        return self.text_encoder(self.prompt_embeddings(), self.tokenized_prompts,
                                 deep_prompts=self.text_prompts(),
                                 deep_positions=self.ctx_positions)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image features of B images (B x E, unnormalised)."""
        prompts, deep = self.vision_prompts()
        return self.vision_encoder(images, prompts, deep)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text features C x E, image features B x E)``, both unnormalised."""
        return self.text_features(), self.image_features(images)

    # ----- official names -------------------------------------------------------------------

    def official_key(self, name: str) -> str:
        raise NotImplementedError

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` under the official checkpoint's keys."""
        return {self.official_key(k): v for k, v in self.state_dict().items()}

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load the learned tensors from an official checkpoint's ``state_dict`` (the whole
        ``CustomCLIP``; other keys are ignored). A missing key or a shape mismatch raises
        ValueError naming ``state_dict``."""
        ours = {}
        for name, param in self.state_dict().items():
            key = self.official_key(name)
            if key not in state_dict:
                raise ValueError(f"state_dict: has no {key!r} (for {name})")
            value = state_dict[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"state_dict: {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(param.shape)}")
            ours[name] = value
        self.load_state_dict(ours)

    def extra_repr(self) -> str:
        return (f"n_cls={self.n_cls}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, "
                f"text_width={self.text_width}, vision_width={self.vision_width}")


class MaPLePrompts(_PromptedTowers):
    """MaPLe's learned prompts (coupled: every image prompt is a projection of a text prompt).

    Args:
        model: an open_clip ViT CLIP model (see ``PromptTextEncoder``, ``PromptVisionEncoder``).
        tokenizer: the model's open_clip tokenizer.
        classnames: C class names, human-readable.
        n_ctx: context tokens per prompt, in both towers (official default 2).
        depth: prompt depth (official default 9): the input prompts plus ``depth - 1`` deep
            prompts before layers 1 .. depth-1 of both towers; 1 <= depth <= either tower's
            layer count.
        ctx_init: the phrase the prompts start with (its first ``n_ctx`` tokens learned), or
            None for ``"X ... X"`` and a random context.
        truncate: run the text tower over the needed positions only (exact; see
            ``PromptTextEncoder.needed_length``).

    Initialisation follows the official code: ``ctx`` from the phrase (or N(0, 0.02²)),
    ``compound_prompts_text`` from N(0, 0.02²), ``proj`` torch's Linear default, and one Linear
    drawn with torch's default and cloned into every ``compound_prompt_projections`` entry.
    Draws use the global torch generator.
    """

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], *, n_ctx: int = 2,
                 depth: int = 9, ctx_init: str | None = "a photo of a", truncate: bool = True):
        super().__init__(model, tokenizer, classnames, n_ctx=n_ctx, ctx_init=ctx_init,
                         truncate=truncate)
        layers = min(self.text_encoder.num_layers, self.vision_encoder.num_layers)
        _check_count("depth", depth, 1, layers,
                     f" (the towers have {self.text_encoder.num_layers} text and "
                     f"{self.vision_encoder.num_layers} image layers)")
        self.depth = depth
        self.proj = self._linear()
        self.compound_prompts_text = nn.ParameterList()
        for _ in range(depth - 1):
            prompt = self._new_tensor(n_ctx, self.text_width)
            nn.init.normal_(prompt, std=0.02)
            self.compound_prompts_text.append(nn.Parameter(prompt))
        single = self._linear()
        self.compound_prompt_projections = nn.ModuleList(
            copy.deepcopy(single) for _ in range(depth - 1))

    def text_prompts(self) -> dict[int, torch.Tensor]:
        """Deep text prompts: layer j+1 -> ``compound_prompts_text[j]``."""
        return {j + 1: p for j, p in enumerate(self.compound_prompts_text)}

    def vision_prompts(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``(proj(ctx), {j+1: compound_prompt_projections[j](compound_prompts_text[j])})``."""
        deep = {j + 1: layer(p) for j, (layer, p) in
                enumerate(zip(self.compound_prompt_projections, self.compound_prompts_text))}
        return self.proj(self.ctx), deep

    def official_key(self, name: str) -> str:
        return f"prompt_learner.{name}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, depth={self.depth}"


class IVLPPrompts(_PromptedTowers):
    """IVLP's learned prompts (independent: separate text and image prompts, no coupling).

    Args:
        model, tokenizer, classnames, ctx_init, truncate: as ``MaPLePrompts``.
        n_ctx_text: text context tokens (official default 2).
        n_ctx_vision: image prompt tokens (official default 2).
        depth_text: text prompt depth (official default 12): ``ctx`` plus deep prompts before
            text layers 1 .. depth_text-1; 1 <= depth_text <= the text layers.
        depth_vision: image prompt depth (official default 12): ``VPT`` plus deep prompts before
            image layers 1 .. depth_vision-1; 0 (no image prompts, as the official code allows)
            <= depth_vision <= the image layers.

    Every prompt but a phrase-initialised ``ctx`` is drawn from N(0, 0.02²) (global generator).
    """

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], *,
                 n_ctx_text: int = 2, n_ctx_vision: int = 2, depth_text: int = 12,
                 depth_vision: int = 12, ctx_init: str | None = "a photo of a",
                 truncate: bool = True):
        super().__init__(model, tokenizer, classnames, n_ctx=n_ctx_text, ctx_init=ctx_init,
                         truncate=truncate, ctx_name="n_ctx_text")
        text_layers, vision_layers = self.text_encoder.num_layers, self.vision_encoder.num_layers
        _check_count("depth_text", depth_text, 1, text_layers,
                     f" (the text tower has {text_layers} layers)")
        _check_count("depth_vision", depth_vision, 0, vision_layers,
                     f" (the image tower has {vision_layers} layers)")
        _check_count("n_ctx_vision", n_ctx_vision, 1)
        self.depth_text, self.depth_vision = depth_text, depth_vision
        self.n_ctx_vision = n_ctx_vision
        self.text_VPT_shallow = nn.ParameterDict(
            {str(i): self._normal(n_ctx_text, self.text_width) for i in range(1, depth_text)})
        if depth_vision > 0:
            self.VPT = self._normal(n_ctx_vision, self.vision_width)
        else:
            self.register_parameter("VPT", None)
        self.vision_VPT_shallow = nn.ParameterDict(
            {str(i): self._normal(n_ctx_vision, self.vision_width)
             for i in range(1, depth_vision)})

    def _normal(self, *shape: int) -> nn.Parameter:
        prompt = self._new_tensor(*shape)
        nn.init.normal_(prompt, std=0.02)
        return nn.Parameter(prompt)

    def text_prompts(self) -> dict[int, torch.Tensor]:
        """Deep text prompts: layer i -> ``text_VPT_shallow[i]``."""
        return {int(i): p for i, p in self.text_VPT_shallow.items()}

    def vision_prompts(self) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """``(VPT, {i: vision_VPT_shallow[i]})``; ``(None, {})`` at depth_vision 0."""
        return self.VPT, {int(i): p for i, p in self.vision_VPT_shallow.items()}

    def official_key(self, name: str) -> str:
        head, _, index = name.partition(".")
        if name == "ctx":
            return "prompt_learner.ctx"
        if name == "VPT":
            return "image_encoder.VPT"
        if head == "text_VPT_shallow":
            return f"text_encoder.transformer.resblocks.{index}.VPT_shallow"
        if head == "vision_VPT_shallow":
            return f"image_encoder.transformer.resblocks.{index}.VPT_shallow"
        raise ValueError(f"name: {name!r} is not a parameter of IVLPPrompts")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_ctx_vision={self.n_ctx_vision}, "
                f"depth_text={self.depth_text}, depth_vision={self.depth_vision}")
