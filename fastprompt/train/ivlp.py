"""IVLP, independent vision-language prompting (the baseline of Khattak et al. 2023,
``muzairkhattak/multimodal-prompt-learning: trainers/independentVL.py``): separate deep prompts
in the text and the image tower, trained online (``fastprompt.train.online``). The prompt file
holds ``IVLPPrompts``' tensors (``ctx``, ``text_VPT_shallow.{i}``, ``VPT``,
``vision_VPT_shallow.{i}``; ``IVLPPrompts.official_key`` maps them to the official keys)."""
from __future__ import annotations

from fastprompt.models import IVLPPrompts
from fastprompt.train.config import TrainConfig
from fastprompt.train.learner import register
from fastprompt.train.online import OnlineLearner

# configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml (the rest as MaPLe's).
IVLP_DEFAULTS = {"n_ctx": 2, "n_ctx_vision": 2, "ctx_init": "a photo of a",
                 "prompt_depth_text": 12, "prompt_depth_vision": 12, "epochs": 5,
                 "batch_size": 4, "lr": 0.0035, "optimizer": "sgd"}


@register
class IVLPLearner(OnlineLearner):
    name = "ivlp"
    method_keys = ("ctx_init", "n_ctx_vision", "prompt_depth_text", "prompt_depth_vision")
    defaults = IVLP_DEFAULTS

    @classmethod
    def depths(cls, config: TrainConfig) -> list:
        return [("prompt_depth_text", "text", config.prompt_depth_text),
                ("prompt_depth_vision", "image", config.prompt_depth_vision)]

    @classmethod
    def build_prompts(cls, config: TrainConfig, model, tokenizer, classnames) -> IVLPPrompts:
        c = config
        return IVLPPrompts(model, tokenizer, classnames, n_ctx_text=c.n_ctx,
                           n_ctx_vision=c.n_ctx_vision, depth_text=c.prompt_depth_text,
                           depth_vision=c.prompt_depth_vision, ctx_init=c.ctx_init)
