"""The frozen text tower of an open_clip model, fed with prompt embeddings instead of token ids.

Only as many positions run as the prompts need. Under the causal mask, position ``i`` attends to
positions ``<= i`` only, so the output at the pooled (end-of-text) position does not depend on
anything after it: cutting the sequence after the last end-of-text token of the batch is exact,
not an approximation. Where that does not hold (no causal mask, or pooling at the last position),
the encoder runs the full context length and says so once.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool
from torch import nn

from fastprompt._validation import check_same_device, check_tensor

# Pooling types of open_clip's text tower that yield one feature per prompt; 'none' returns every
# token (there is no text 'avg' pooling in open_clip 3.3) and is refused.
POOL_TYPES = ("argmax", "eos", "first", "last")
# Pooled at or before the last end-of-text token: exact to truncate under the causal mask.
_TRUNCATABLE_POOL_TYPES = ("argmax", "eos", "first")
_warned_full_length: set[str] = set()


def _resolve_text_tower(model: nn.Module) -> tuple[nn.Module, str, int | None]:
    """``(module holding the text tower's parts, pool type, eos id)``, or a ValueError."""
    if isinstance(model, open_clip.CLIP):
        # CLIP flattens its text tower onto the model; encode_text ignores cls_emb / pad masks.
        tower, pool_type, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(model, open_clip.CustomTextCLIP):
        tower = model.text
        if not isinstance(tower, TextTransformer):
            raise ValueError(
                f"model: CustomTextCLIP with a {type(tower).__name__} text tower is not supported "
                "(a Hugging Face tower has no positional embedding to add and takes inputs_embeds); "
                "the prompt learner needs open_clip's standard TextTransformer")
        if tower.cls_emb is not None:
            raise ValueError("model: the text tower appends a class token (CoCa style), which the "
                             "prompt learner does not support")
        if tower.use_pad_mask:
            raise ValueError("model: the text tower masks padding tokens (bidirectional with pad "
                             "mask), which the prompt learner does not support")
        pool_type, eos_id = tower.pool_type, tower.eos_id
    else:
        raise ValueError(f"model: expected an open_clip CLIP or CustomTextCLIP model with the "
                         f"standard text tower, got {type(model).__name__}")
    if pool_type not in POOL_TYPES:
        raise ValueError(f"model: text pooling {pool_type!r} does not give one feature per prompt; "
                         f"supported: {POOL_TYPES}")
    return tower, pool_type, eos_id


def _is_causal(mask: torch.Tensor | None, length: int) -> bool:
    if mask is None or tuple(mask.shape) != (length, length):
        return False
    upper = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), upper)) and bool((mask[~upper] == 0).all())


class PromptTextEncoder(nn.Module):
    """open_clip's ``encode_text`` from prompt embeddings, over as few positions as needed.

    Holds references to the model's own text modules (token embedding, positional embedding,
    transformer, final norm, projection, causal mask); it neither copies nor freezes them
    (``create_model`` returns a frozen model). Move it together with the model.

    Supports ``open_clip.CLIP`` and ``open_clip.CustomTextCLIP`` with the standard
    ``TextTransformer``, pooled by ``argmax``, ``eos``, ``first`` or ``last``; raises ValueError
    for anything else (Hugging Face towers, CoCa, unpooled outputs).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        tower, pool_type, eos_id = _resolve_text_tower(model)
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.context_length = int(tower.positional_embedding.shape[0])
        self.width = int(tower.positional_embedding.shape[1])
        self.causal = _is_causal(tower.attn_mask, self.context_length)
        # Truncation is exact only when no position before the pooled one sees positions after it.
        self.truncatable = self.causal and pool_type in _TRUNCATABLE_POOL_TYPES

    def pool_positions(self, tokenized: torch.Tensor) -> torch.Tensor:
        """The position each prompt is pooled at (C,), exactly as open_clip's ``text_global_pool``."""
        check_tensor("tokenized", tokenized, ndim=2, integer=True)
        if self.pool_type == "argmax":
            return tokenized.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokenized == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(tokenized.shape[0], dtype=torch.int64, device=tokenized.device)
        return torch.full((tokenized.shape[0],), tokenized.shape[1] - 1, dtype=torch.int64,
                          device=tokenized.device)

    def needed_length(self, tokenized: torch.Tensor) -> int:
        """How many positions must run for these prompts: one past the last pooled position.

        One host synchronisation: call it once (PromptLearner does, at construction), not every
        step. Falls back to the full context length, with a one-time warning, where truncating
        would change the features (no causal mask, or 'last' pooling).
        """
        if not self.truncatable:
            reason = ("no causal mask" if not self.causal else f"pooling {self.pool_type!r}")
            if reason not in _warned_full_length:
                _warned_full_length.add(reason)
                warnings.warn(f"fastprompt: text tower with {reason}: truncating the context would "
                              f"change the features, running all {self.context_length} positions",
                              stacklevel=2)
            return self.context_length
        if tokenized.shape[0] == 0:
            raise ValueError("tokenized: no prompts (0 rows)")
        return int(self.pool_positions(tokenized).max().item()) + 1

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def forward(self, prompt_embeddings: torch.Tensor, tokenized: torch.Tensor,
                deep_prompts: dict[int, torch.Tensor] | None = None,
                deep_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Text features (C x E, unnormalised, as ``encode_text``) of C prompts.

        ``prompt_embeddings`` (C x L x W) are token embeddings without positional embedding;
        ``tokenized`` (C x L, int64) are the matching token ids, used only to find the pooled
        position. L may be less than the context length (a truncated batch) where truncation is
        exact; see ``needed_length``.

        Deep prompts: ``deep_prompts`` maps a layer index ``i`` (1 <= i < layers) to the tokens
        (n x W shared by every prompt, or C x n x W) that replace, right before layer ``i``, the
        hidden states at ``deep_positions`` (C x n: each prompt's context positions, e.g.
        ``PromptLearner.ctx_positions``), as MaPLe's, IVLP's and TCP's text towers do.
        """
        check_tensor("prompt_embeddings", prompt_embeddings, ndim=3, floating=True)
        check_tensor("tokenized", tokenized, ndim=2, integer=True)
        check_same_device("prompt_embeddings", prompt_embeddings, tokenized=tokenized)
        n, length, width = prompt_embeddings.shape
        if tuple(tokenized.shape) != (n, length):
            raise ValueError(f"tokenized: expected shape {(n, length)} to match prompt_embeddings, "
                             f"got {tuple(tokenized.shape)}")
        if width != self.width:
            raise ValueError(f"prompt_embeddings: width {width} does not match the text tower's "
                             f"{self.width}")
        if length == 0 or length > self.context_length:
            raise ValueError(f"prompt_embeddings: length {length} must lie in [1, "
                             f"{self.context_length}] (the model's context length)")
        if length != self.context_length and not self.truncatable:
            mask = "causal" if self.causal else "no causal mask"
            raise ValueError(f"prompt_embeddings: this text tower ({mask}, pooling "
                             f"{self.pool_type!r}) needs all {self.context_length} positions, got {length}")
        cast_dtype = self.transformer.get_cast_dtype()
        x = prompt_embeddings.to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        attn_mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        if deep_prompts:
            x = self._deep_transformer(x, attn_mask, deep_prompts, deep_positions)
        else:
            x = self.transformer(x, attn_mask=attn_mask)
        # The final norm acts on each position alone: pooling first is exact and skips L-1 rows.
        x = text_global_pool(x, tokenized, self.pool_type, eos_token_id=self.eos_id)
        x = self.ln_final(x)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x

    def _deep_transformer(self, x: torch.Tensor, attn_mask, deep_prompts: dict,
                          positions: torch.Tensor | None) -> torch.Tensor:
        """The transformer's blocks one by one (as open_clip's ``Transformer.forward`` runs
        them), with ``deep_prompts[i]`` written over ``positions`` before block ``i``."""
        n, length = x.shape[:2]
        if positions is None or positions.dim() != 2 or positions.shape[0] != n:
            raise ValueError(f"deep_positions: expected the {n} prompts' context positions "
                             f"(C x n_ctx), got {None if positions is None else tuple(positions.shape)}")
        if int(positions.max()) >= length:
            raise ValueError(f"deep_positions: a position lies past the prompts' length {length}")
        layers = self.num_layers
        for i, tokens in deep_prompts.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i < layers:
                raise ValueError(f"deep_prompts: layer {i!r} must be an int in [1, {layers}) "
                                 f"(this text tower has {layers} layers)")
            if tokens.shape[-2:] != (positions.shape[1], x.shape[-1]) or tokens.dim() not in (2, 3):
                raise ValueError(f"deep_prompts: layer {i}: expected tokens of shape "
                                 f"({positions.shape[1]}, {x.shape[-1]}) or "
                                 f"({n}, {positions.shape[1]}, {x.shape[-1]}), got "
                                 f"{tuple(tokens.shape)}")
        transformer = self.transformer
        if not transformer.batch_first:
            x = x.transpose(0, 1).contiguous()  # NLD -> LND
        index = positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        for i, block in enumerate(transformer.resblocks):
            tokens = deep_prompts.get(i)
            if tokens is not None:
                tokens = tokens.to(x.dtype).expand(n, -1, -1)
                if transformer.batch_first:
                    x = x.scatter(1, index, tokens)
                else:
                    x = x.transpose(0, 1).scatter(1, index, tokens).transpose(0, 1)
            if transformer.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, None, None, attn_mask,
                                                      use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # LND -> NLD
        return x

    def encode_tokens(self, tokenized: torch.Tensor) -> torch.Tensor:
        """``model.encode_text(tokenized)`` (C x E, unnormalised), truncated where exact.

        For one-off encodings (zero-shot classifiers); costs one host synchronisation.
        """
        check_tensor("tokenized", tokenized, ndim=2, integer=True)
        if tokenized.shape[1] != self.context_length:
            raise ValueError(f"tokenized: expected {self.context_length} columns (the model's "
                             f"context length), got {tokenized.shape[1]}")
        tokenized = tokenized.to(self.token_embedding.weight.device)
        length = self.needed_length(tokenized)
        tokenized = tokenized[:, :length]
        return self(self.token_embedding(tokenized), tokenized)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def zeroshot_text_features(model: nn.Module, tokenizer, classnames: Sequence[str],
                           templates: Sequence[str] = ("a photo of a {}.",),
                           batch_size: int = 256) -> torch.Tensor:
    """CLIP's zero-shot classifier: per class, the normalised mean over templates of the
    normalised text features of ``template.format(classname)``; C x E, unit rows, no grad.

    Runs under ``torch.no_grad``. ``batch_size`` bounds how many prompts run at once.
    """
    if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames:
        raise ValueError("classnames: expected a non-empty sequence of class names")
    if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
        raise ValueError("templates: expected a non-empty sequence of format strings such as "
                         "'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"templates: {template!r} has no '{{}}' for the class name")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    encoder = PromptTextEncoder(model)
    total = None
    for template in templates:
        texts = [template.format(name) for name in classnames]
        features = torch.cat([
            F.normalize(_at_least_float32(encoder.encode_tokens(tokenizer(texts[i:i + batch_size]))),
                        dim=-1)
            for i in range(0, len(texts), batch_size)])
        total = features if total is None else total + features
    return F.normalize(total / len(templates), dim=-1)
