"""CoOp's prompt learner for open_clip models: learnable context vectors around each class name.

A prompt is ``"X X ... X <class name>."`` tokenised by the model's CLIP tokenizer, with the
embeddings at the X positions replaced by the learned context. Everything that does not change
during training (token embeddings of the class names, the token ids, where the context goes, how
many positions the text encoder must run) is computed once here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastprompt._checks import shown
from fastprompt._validation import check_tensor
from fastprompt.models.text_encoder import PromptTextEncoder

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"


def _check_tokenizer(tokenizer) -> None:
    missing = [a for a in ("encode", "sot_token_id", "eot_token_id") if not hasattr(tokenizer, a)]
    if missing or not callable(tokenizer):
        raise ValueError(
            f"tokenizer: {type(tokenizer).__name__} lacks {', '.join(missing) or '__call__'}; the "
            "prompt learner needs open_clip's CLIP tokenizer (SimpleTokenizer, from "
            "open_clip.get_tokenizer) to place the context tokens")


class PromptLearner(nn.Module):
    """Learnable prompt context for C classes (CoOp).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with the standard text tower (others
            raise ValueError, see ``PromptTextEncoder``).
        tokenizer: the model's open_clip tokenizer (``open_clip.get_tokenizer(name)``).
        classnames: C class names, already human-readable (underscores replaced by the caller).
        n_ctx: number of context vectors. With ``ctx_init``, None means the phrase's token count
            (CoOp); a larger value puts the phrase in the last slots and zero-fills the leading
            ones (ProGrad's initialisation); a smaller one raises ValueError.
        ctx_init: a phrase (e.g. ``"a photo of a"``) whose token embeddings initialise the
            context; None draws it from N(0, 0.02²) with the global torch generator.
        class_specific: one context per class (C x n_ctx x W) instead of one shared (n_ctx x W);
            with ``ctx_init`` every class starts from the phrase.
        class_token_position: ``"end"`` (``X X X X name.``), ``"middle"`` (``X X name X X.``,
            the first ``n_ctx // 2`` vectors before the name) or ``"front"`` (``name X X X X.``).
        truncate: cut the prompts after the last end-of-text token (exact; see
            ``PromptTextEncoder.needed_length``); False keeps the full context length.
        where: what the class names are called in errors (default ``"classnames"``; callers
            that know where the names came from say so, e.g. the file holding them).

    Class names whose prompts the tokenizer makes identical (it lower-cases and normalises
    text: ``Cat`` and ``cat``) are refused, naming both: they would get identical text features,
    two classes tied for ever. So is a name whose prompt does not fit the context length.

    The learned context is the parameter ``ctx``, the only entry of ``state_dict()``; the token
    embeddings and ids are non-persistent buffers rebuilt from the model and class names.
    ``forward()`` returns the prompt embeddings (C x L x W), to be fed with ``tokenized_prompts``
    (C x L) to ``PromptTextEncoder``; L = ``prompt_length``.
    """

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], *,
                 n_ctx: int | None = 16, ctx_init: str | None = None, class_specific: bool = False,
                 class_token_position: str = "end", truncate: bool = True,
                 where: str = "classnames"):
        super().__init__()
        encoder = PromptTextEncoder(model)  # validates the model
        _check_tokenizer(tokenizer)
        if isinstance(classnames, str) or not isinstance(classnames, Sequence) or not classnames:
            raise ValueError(f"{where}: expected a non-empty sequence of class names")
        for name in classnames:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{where}: every class name must be a non-empty string, got "
                                 f"{name!r:.80}")
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position: must be one of {CLASS_TOKEN_POSITIONS}, "
                             f"got {class_token_position!r}")
        if not isinstance(class_specific, bool):
            raise TypeError(f"class_specific: expected a bool, got {type(class_specific).__name__}")
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate: expected a bool, got {type(truncate).__name__}")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int)):
            raise TypeError(f"n_ctx: expected an int or None, got {type(n_ctx).__name__}")

        # The context's token ids: placeholders, then (ProGrad) the phrase right-aligned.
        placeholder_ids = tokenizer.encode(PLACEHOLDER)
        if len(placeholder_ids) != 1:
            raise ValueError(f"tokenizer: the placeholder {PLACEHOLDER!r} must be one token, got "
                             f"{len(placeholder_ids)}")
        if ctx_init is not None:
            if not isinstance(ctx_init, str) or not ctx_init.strip():
                raise ValueError(f"ctx_init: expected a non-empty phrase or None, got {ctx_init!r}")
            ctx_init = " ".join(ctx_init.split())
            phrase_ids = tokenizer.encode(ctx_init)
            if n_ctx is None:
                n_ctx = len(phrase_ids)
            if n_ctx < len(phrase_ids):
                raise ValueError(f"n_ctx: {n_ctx} context vectors cannot hold ctx_init {ctx_init!r} "
                                 f"({len(phrase_ids)} tokens)")
        else:
            phrase_ids = []
            if n_ctx is None:
                raise ValueError("n_ctx: None is only allowed with ctx_init (the phrase's length)")
        if n_ctx < 1:
            raise ValueError(f"n_ctx: must be at least 1, got {n_ctx}")
        n_zero = n_ctx - len(phrase_ids)
        ctx_ids = placeholder_ids * n_zero + phrase_ids
        prefix_text = " ".join([PLACEHOLDER] * n_zero + ([ctx_init] if ctx_init else []))

        # "end": the tokenizer's own row for "<context> <name>.", so that it matches plain
        # tokenisation even where the name's last character merges with the period. Its context
        # must sit at positions 1..n_ctx, which also checks that this is a CLIP tokenizer.
        full_length = encoder.context_length
        end_texts = [f"{prefix_text} {name}." for name in classnames]
        end_rows = tokenizer(end_texts, context_length=full_length)
        period_ids = tokenizer.encode(".")
        half = n_ctx // 2
        rows, ctx_positions = [], []

        def too_long(c: int, needed: int) -> ValueError:
            return ValueError(f"{where}: class {c + 1} of {len(classnames)}, "
                              f"{shown(classnames[c])}, needs {needed} tokens in its prompt "
                              f"(with {n_ctx} context tokens), more than the model's context "
                              f"length {full_length}; shorten it")

        for c, (name, text) in enumerate(zip(classnames, end_texts)):
            end_length = len(tokenizer.encode(text)) + 2
            if end_length > full_length:
                raise too_long(c, end_length)
            row = end_rows[c].tolist()
            if row[0] != tokenizer.sot_token_id or row[1:1 + n_ctx] != ctx_ids:
                raise ValueError("tokenizer: it does not place the context tokens at positions "
                                 f"1..{n_ctx} of {text!r}; the prompt learner needs open_clip's CLIP "
                                 "tokenizer")
            name_ids = tokenizer.encode(name)
            if class_token_position == "end":
                body = tokenizer.encode(text)
                positions = range(1, 1 + n_ctx)
            elif class_token_position == "front":
                # CoOp's "<name> <context>.": with whitespace around the name, its tokens are
                # those of the name alone.
                body = name_ids + ctx_ids + period_ids
                positions = range(1 + len(name_ids), 1 + len(name_ids) + n_ctx)
            else:
                body = ctx_ids[:half] + name_ids + ctx_ids[half:] + period_ids
                positions = [*range(1, 1 + half),
                             *range(1 + half + len(name_ids), 1 + len(name_ids) + n_ctx)]
            if len(body) + 2 > full_length:
                raise too_long(c, len(body) + 2)
            rows.append([tokenizer.sot_token_id, *body, tokenizer.eot_token_id]
                        + [0] * (full_length - len(body) - 2))
            ctx_positions.append(list(positions))
        _refuse_identical_prompts(rows, classnames, where)
        tokens = torch.tensor(rows, dtype=torch.int64)
        ctx_positions = torch.tensor(ctx_positions, dtype=torch.int64)

        device = encoder.token_embedding.weight.device
        tokens = tokens.to(device)
        self.prompt_length = encoder.needed_length(tokens) if truncate else full_length
        tokens = tokens[:, :self.prompt_length].contiguous()
        with torch.no_grad():
            token_embeds = encoder.token_embedding(tokens).detach()
        self.register_buffer("tokenized_prompts", tokens, persistent=False)
        self.register_buffer("token_embeds", token_embeds, persistent=False)
        self.register_buffer("ctx_positions", ctx_positions.to(device), persistent=False)

        # Context in at least float32, so that it trains in full precision under a half model.
        width = token_embeds.shape[-1]
        dtype = torch.promote_types(token_embeds.dtype, torch.float32)
        if ctx_init is not None:
            ctx = torch.zeros(n_ctx, width, dtype=dtype, device=device)
            if phrase_ids:
                with torch.no_grad():
                    ids = torch.tensor(phrase_ids, dtype=torch.int64, device=device)
                    ctx[n_zero:] = encoder.token_embedding(ids).to(dtype)
            if class_specific:
                ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)
        else:
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            ctx = torch.empty(shape, dtype=dtype, device=device)
            nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)

        self.classnames = tuple(classnames)
        self.n_cls = len(classnames)
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_specific = class_specific
        self.class_token_position = class_token_position
        self.prompt_prefix = prefix_text  # the context as text, as CoOp prints it

    def forward(self, ctx: torch.Tensor | None = None, classes: slice | None = None
                ) -> torch.Tensor:
        """Prompt embeddings, C x ``prompt_length`` x W, in the context's dtype.

        ``ctx`` replaces the learned context for this call (n_ctx x W shared, or C x n_ctx x W),
        e.g. one produced by a meta network (SoftCPT); gradients flow to whichever is used.
        ``classes`` (a slice of the C classes) returns only those classes' prompts.
        """
        if ctx is None:
            ctx = self.ctx
        else:
            check_tensor("ctx", ctx, floating=True)
            if ctx.shape not in ((self.n_ctx, self.ctx.shape[-1]),
                                 (self.n_cls, self.n_ctx, self.ctx.shape[-1])):
                raise ValueError(f"ctx: expected shape {(self.n_ctx, self.ctx.shape[-1])} or "
                                 f"{(self.n_cls, self.n_ctx, self.ctx.shape[-1])}, got {tuple(ctx.shape)}")
            if ctx.device != self.token_embeds.device:
                raise ValueError(f"ctx: on {ctx.device}, but the prompt learner is on "
                                 f"{self.token_embeds.device}")
        if classes is None:
            classes = slice(None)
        elif not isinstance(classes, slice):
            raise TypeError(f"classes: expected a slice or None, got {type(classes).__name__}")
        token_embeds, positions = self.token_embeds[classes], self.ctx_positions[classes]
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(token_embeds.shape[0], -1, -1)
        else:
            ctx = ctx[classes]
        index = positions.unsqueeze(-1).expand(-1, -1, ctx.shape[-1])
        return token_embeds.to(ctx.dtype).scatter(1, index, ctx)

    def prompts_for(self, ctx: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings of R (context, class) pairs, R x ``prompt_length`` x W: row r is the
        prompt of class ``classes[r]`` with the context ``ctx[r]`` (R x n_ctx x W), e.g. one per
        image and class (CoCoOp). Feed them with ``tokenized_prompts[classes]``."""
        check_tensor("ctx", ctx, ndim=3, floating=True)
        check_tensor("classes", classes, ndim=1, integer=True)
        if ctx.shape[0] != classes.shape[0] or ctx.shape[1:] != self.ctx.shape[-2:]:
            raise ValueError(f"ctx: expected shape ({classes.shape[0]}, {self.n_ctx}, "
                             f"{self.ctx.shape[-1]}) for {classes.shape[0]} classes, got "
                             f"{tuple(ctx.shape)}")
        token_embeds, positions = self.token_embeds[classes], self.ctx_positions[classes]
        index = positions.unsqueeze(-1).expand(-1, -1, ctx.shape[-1])
        return token_embeds.to(ctx.dtype).scatter(1, index, ctx)

    def extra_repr(self) -> str:
        return (f"n_cls={self.n_cls}, n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, "
                f"class_specific={self.class_specific}, "
                f"class_token_position={self.class_token_position!r}, "
                f"prompt_length={self.prompt_length}")


def _refuse_identical_prompts(rows: list[list[int]], classnames: Sequence[str], where: str) -> None:
    """ValueError naming the first two classes whose token rows are equal."""
    first: dict[tuple, int] = {}
    for c, row in enumerate(rows):
        other = first.setdefault(tuple(row), c)
        if other != c:
            raise ValueError(
                f"{where}: classes {other + 1} and {c + 1}, {shown(classnames[other])} and "
                f"{shown(classnames[c])}, are the same to the tokenizer (it lower-cases and "
                "normalises text), so their text features would be identical and the classes "
                "tied for ever; merge them or rename one")


class PromptedTextModel(nn.Module):
    """The prompt-tuned text side in one module: ``forward()`` -> class text features, C x E
    (unnormalised, as ``encode_text``).

    ``prompt_learner`` holds the only trainable parameter (``ctx``); ``text_encoder`` references
    the model's frozen text tower, so this module's ``state_dict`` contains the tower too: save
    ``prompt_learner.state_dict()`` for a checkpoint of the learned prompt. Keyword arguments are
    those of ``PromptLearner``.
    """

    def __init__(self, model: nn.Module, tokenizer, classnames: Sequence[str], **learner_kwargs):
        super().__init__()
        self.prompt_learner = PromptLearner(model, tokenizer, classnames, **learner_kwargs)
        self.text_encoder = PromptTextEncoder(model)

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Text features of the C class prompts; ``ctx`` as in ``PromptLearner.forward``."""
        return self.text_encoder(self.prompt_learner(ctx), self.prompt_learner.tokenized_prompts)
