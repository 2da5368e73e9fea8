"""MaPLe (Khattak et al. 2023, ``muzairkhattak/multimodal-prompt-learning: trainers/maple.py``):
coupled prompts in both towers, the image prompts projections of the text prompts, trained
online (``fastprompt.train.online``). The prompt file holds ``MaPLePrompts``' tensors under the
official names (``ctx``, ``proj.*``, ``compound_prompts_text.{j}``,
``compound_prompt_projections.{j}.*``)."""
from __future__ import annotations

from fastprompt.models import MaPLePrompts
from fastprompt.train.config import TrainConfig
from fastprompt.train.learner import register
from fastprompt.train.online import OnlineLearner

# configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml (warm-up: one constant epoch at 1e-5,
# weight decay 5e-4 and momentum 0.9 from Dassl's defaults: TrainConfig's own).
MAPLE_DEFAULTS = {"n_ctx": 2, "ctx_init": "a photo of a", "prompt_depth": 9, "epochs": 5,
                  "batch_size": 4, "lr": 0.0035, "optimizer": "sgd"}


@register
class MaPLeLearner(OnlineLearner):
    name = "maple"
    method_keys = ("ctx_init", "prompt_depth")
    defaults = MAPLE_DEFAULTS

    @classmethod
    def depths(cls, config: TrainConfig) -> list:
        # Both towers take prompts to the same depth: the smaller tower bounds it.
        return [("prompt_depth", "text", config.prompt_depth),
                ("prompt_depth", "image", config.prompt_depth)]

    @classmethod
    def build_prompts(cls, config: TrainConfig, model, tokenizer, classnames) -> MaPLePrompts:
        c = config
        return MaPLePrompts(model, tokenizer, classnames, n_ctx=c.n_ctx, depth=c.prompt_depth,
                            ctx_init=c.ctx_init)
