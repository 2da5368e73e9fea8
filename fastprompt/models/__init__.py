"""open_clip integration: model loading, CoOp prompt learner, truncated prompt text encoder,
prompted image tower and deep vision-language prompts (MaPLe, IVLP)."""
from fastprompt.models.factory import TINY_MODEL, create_model, register_configs
from fastprompt.models.multimodal_prompts import IVLPPrompts, MaPLePrompts
from fastprompt.models.prompt_learner import CLASS_TOKEN_POSITIONS, PromptedTextModel, PromptLearner
from fastprompt.models.softcpt import MetaNet, SoftCPTModel, softcpt_parameter_count  # SoftCPT
from fastprompt.models.text_encoder import PromptTextEncoder, zeroshot_text_features
from fastprompt.models.utils import count_parameters
from fastprompt.models.vision_encoder import PromptVisionEncoder
from fastprompt.models.weights import model_weights_hash

__all__ = [
    "CLASS_TOKEN_POSITIONS",
    "IVLPPrompts",
    "MaPLePrompts",
    "MetaNet",
    "SoftCPTModel",
    "softcpt_parameter_count",
    "PromptLearner",
    "PromptTextEncoder",
    "PromptVisionEncoder",
    "PromptedTextModel",
    "TINY_MODEL",
    "count_parameters",
    "create_model",
    "model_weights_hash",
    "register_configs",
    "zeroshot_text_features",
]
