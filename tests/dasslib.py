"""Helpers of the Dassl checkpoint tests (tests/train/test_dassl.py, tests/cli/test_dassl_cli.py):
checkpoints written the way Dassl's ``save_model`` writes them, with an optimiser state and a
scheduler object of a class that is importable only while the file is written; pickles that
would run code when loaded; and the official prompt learner's buffers and forward, written
here from the official code's semantics (not from fastprompt's). Not a test module; tests import
it by name (tests/ is on sys.path)."""
from __future__ import annotations

import sys
import types
from collections import OrderedDict

import torch

# Where Dassl's warm-up scheduler lives; nothing of that name is installed here.
SCHEDULER_MODULE = "dassl.optim.lr_scheduler"


def _scheduler_class():
    class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
        """A stand-in of Dassl's class: a warm-up at a constant rate, then ``successor``."""

        def __init__(self, optimizer, successor, cons_lr=1e-5):
            self.successor, self.cons_lr = successor, cons_lr
            super().__init__(optimizer)

        def get_lr(self):
            return [self.cons_lr for _ in self.base_lrs]

    ConstantWarmupScheduler.__module__ = SCHEDULER_MODULE
    ConstantWarmupScheduler.__qualname__ = "ConstantWarmupScheduler"
    return ConstantWarmupScheduler


def save_dassl_checkpoint(path, state_dict: dict, *, epoch: int = 10, val_result=None,
                          extra: dict | None = None) -> None:
    """``torch.save`` of what Dassl's ``save_model`` writes: ``state_dict`` (the prompt
    learner's), ``epoch``, the state of an SGD optimiser that took a step (momentum buffers),
    ``val_result`` and, as ``scheduler``, an object of ``dassl.optim.lr_scheduler.
    ConstantWarmupScheduler`` (holding torch's cosine scheduler and the optimiser), a class
    that exists only while this writes: loading the file with plain ``torch.load`` fails."""
    params = [torch.nn.Parameter(v.detach().float().clone()) for v in state_dict.values()
              if isinstance(v, torch.Tensor) and v.is_floating_point()][:1]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    names = ("dassl", "dassl.optim", SCHEDULER_MODULE)
    modules = {name: types.ModuleType(name) for name in names}
    cls = _scheduler_class()
    modules[SCHEDULER_MODULE].ConstantWarmupScheduler = cls
    assert not any(name in sys.modules for name in names)
    sys.modules.update(modules)
    try:
        scheduler = cls(optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10))
        torch.save({"state_dict": OrderedDict(state_dict), "epoch": epoch,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler,
                    "val_result": val_result, **(extra or {})}, path)
    finally:
        for name in names:
            del sys.modules[name]


class Reduces:
    """Pickled as ``func(*args)`` (with ``state`` set afterwards, if given): what a hostile file
    holds to run ``func`` when it is loaded."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args,
                                                                  self.state)


def official_tokens(tokenizer, classnames, n_ctx: int) -> torch.Tensor:
    """``clip.tokenize`` of the official prompts ``"X X .. X <name>."``, 77 positions."""
    return tokenizer([" ".join(["X"] * n_ctx) + " " + n.replace("_", " ") + "."
                      for n in classnames], context_length=77)


def official_buffers(model, tokenizer, classnames, n_ctx: int, dtype=torch.float16):
    """``(token_prefix, token_suffix)`` as the official prompt learner registers them."""
    with torch.no_grad():
        embedding = model.token_embedding(official_tokens(tokenizer, classnames, n_ctx))
    embedding = embedding.to(dtype)
    return embedding[:, :1, :], embedding[:, 1 + n_ctx:, :]


@torch.no_grad()
def official_text_features(model, tokenizer, classnames, state_dict: dict) -> torch.Tensor:
    """The official CoOp forward (float32) from a prompt learner's state: ``cat(prefix, ctx,
    suffix)`` over all 77 positions, plus the positional embedding, through the transformer,
    the final norm, pooled at the end token (argmax of the ids), projected."""
    ctx, prefix, suffix = (state_dict[k].float() for k in ("ctx", "token_prefix",
                                                           "token_suffix"))
    n_cls, n_ctx = prefix.shape[0], ctx.shape[-2]
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(n_cls, -1, -1)
    x = torch.cat([prefix, ctx, suffix], dim=1) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    tokens = official_tokens(tokenizer, classnames, n_ctx)
    return x[torch.arange(n_cls), tokens.argmax(dim=-1)] @ model.text_projection
