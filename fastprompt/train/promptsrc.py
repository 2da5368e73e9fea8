"""PromptSRC, prompting with self-regulating constraints (Khattak et al., ICCV 2023,
``muzairkhattak/PromptSRC: trainers/promptsrc.py``): IVLP's deep prompts in both towers,
trained online (``fastprompt.train.online``) with three terms that keep them close to the frozen
model, and the final prompts a Gaussian-weighted average of the epochs' prompts (GPA).

The loss of a batch of B images over C classes (features normalised, ``s`` CLIP's scale):

* the run's loss of the prompted logits ``z = s · f · tᵀ`` (the shared op: CE, DSPT, GCE/MAE,
  ATLaS ``ls``/``csl`` targets);
* ``text_loss_weight`` (25) x the mean absolute difference (over C x E) between the prompted
  text features ``t`` and the frozen ones ``t⁰``: per class the mean over ``TEMPLATES`` of the
  frozen model's *unnormalised* text features, then normalised (as the official code does; it
  is not CLIP's zero-shot classifier, which normalises each template's features first);
* ``image_loss_weight`` (10) x the mean absolute difference (over B x E) between the prompted
  image features ``f`` and the frozen tower's ``f⁰`` of the same augmented images (no grad);
* ``KL(softmax(z⁰) || softmax(z))`` summed over the batch and the classes and divided by B x C
  (not by B: the official ``reduction='sum'`` over ``logits.numel()``), weight 1, temperature 1,
  with ``z⁰ = s · f⁰ · t⁰ᵀ``.

GPA: after the last step of epoch e (1-based) the prompts are added to a running sum with
weight ``w_e = N(e; gpa_mean, gpa_std²) / Σ_{k=1..epochs} N(k; ...)``; after the last epoch the
sum replaces the prompts, so the prompt file, the last checkpoint and the test accuracy are the
averaged prompts'. The sum is part of the checkpoint's training state (a resumed run equals the
uninterrupted one).

The prompt file holds ``IVLPPrompts``' tensors under the official names (``ctx``,
``text_VPT_shallow.{i}``, ``VPT``, ``vision_VPT_shallow.{i}``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.models import IVLPPrompts
from fastprompt.models.text_encoder import PromptTextEncoder
from fastprompt.train.config import TrainConfig
from fastprompt.train.learner import register
from fastprompt.train.online import OnlineLearner

# configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml (base-to-novel): 4 + 4 tokens
# from "a photo of a", depth 9 in both towers, 20 epochs of batch 4, SGD lr 0.0025 (momentum
# 0.9, weight decay 5e-4, one constant warm-up epoch at 1e-5, cosine: TrainConfig's), the
# consistency weights 25 (text) and 10 (image), GPA N(15, 1²).
PROMPTSRC_DEFAULTS = {"n_ctx": 4, "n_ctx_vision": 4, "ctx_init": "a photo of a",
                      "prompt_depth_text": 9, "prompt_depth_vision": 9, "epochs": 20,
                      "batch_size": 4, "lr": 0.0025, "optimizer": "sgd",
                      "text_loss_weight": 25.0, "image_loss_weight": 10.0, "gpa_mean": 15.0,
                      "gpa_std": 1.0}

# The frozen text features' templates: the official trainers/imagenet_templates.py
# (IMAGENET_TEMPLATES, 60 entries, from CLIP's notebooks/Prompt_Engineering_for_ImageNet.ipynb),
# in its order.
TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)

# Prompts per text-tower pass when the frozen text features are computed.
_TEXT_BATCH = 256


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA's weight of each epoch 1 .. ``epochs``: the Gaussian density N(e; mean, std²)
    normalised to sum 1 (the official normalisation). Computed from the exponents less their
    maximum (the density's constant cancels), so epochs far from ``mean`` never make it 0 / 0."""
    if epochs < 1:
        raise ValueError(f"epochs: must be at least 1, got {epochs}")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"gpa_std: must be positive, got {std}")
    exponents = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(exponents)
    raw = [math.exp(x - top) for x in exponents]
    total = math.fsum(raw)
    return [r / total for r in raw]


@torch.no_grad()
def frozen_text_features(model, tokenizer, classnames, templates=TEMPLATES) -> Tensor:
    """PromptSRC's frozen text features (C x E, unit rows, at least float32): per class the
    mean over ``templates`` of the frozen model's unnormalised text features, normalised."""
    encoder = PromptTextEncoder(model)
    total = None
    for template in templates:
        texts = [template.format(name) for name in classnames]
        features = torch.cat([encoder.encode_tokens(tokenizer(texts[i:i + _TEXT_BATCH]))
                              for i in range(0, len(texts), _TEXT_BATCH)])
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        total = features if total is None else total + features
    return F.normalize(total / len(templates), dim=-1)


@register
class PromptSRCLearner(OnlineLearner):
    name = "promptsrc"
    method_keys = ("ctx_init", "n_ctx_vision", "prompt_depth_text", "prompt_depth_vision",
                   "text_loss_weight", "image_loss_weight", "gpa_mean", "gpa_std")
    defaults = PROMPTSRC_DEFAULTS

    def __init__(self, config: TrainConfig, data, model, tokenizer, device: torch.device, *,
                 workers: int = 0):
        super().__init__(config, data, model, tokenizer, device, workers=workers)
        self.frozen_text = frozen_text_features(model, tokenizer, data.classnames).to(device)
        self.gpa_weights = gpa_weights(config.epochs, config.gpa_mean, config.gpa_std)
        # The running sum Σ w_e · prompts after epoch e, float64 on the CPU (None before the
        # first epoch ends).
        self.gpa_sum: dict[str, Tensor] | None = None
        self._terms = torch.zeros(3, dtype=torch.float64, device=device)

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

    # -- the loss

    def consistency_terms(self, images: Tensor, text: Tensor, features: Tensor) -> Tensor:
        """The weighted text L1, image L1 and logit KL terms of a batch (3, in at least
        float32), the frozen image features from the plain tower on the same ``images``."""
        dtype = torch.promote_types(features.dtype, torch.float32)
        c = self.config
        scale = self.scale.to(dtype)
        f = F.normalize(features.to(dtype), dim=-1)
        t = F.normalize(text.to(dtype), dim=-1)
        with torch.no_grad():
            tower = self.model.visual.conv1.weight.dtype
            f0 = F.normalize(self.model.encode_image(images.to(tower)).to(dtype), dim=-1)
            t0 = self.frozen_text.to(dtype)
            z0 = scale * f0 @ t0.t()
        z = scale * f @ t.t()
        text_term = c.text_loss_weight * F.l1_loss(t, t0)
        image_term = c.image_loss_weight * F.l1_loss(f, f0)
        kl = F.kl_div(F.log_softmax(z, dim=1), F.log_softmax(z0, dim=1), reduction="sum",
                      log_target=True) / z.numel()
        return torch.stack([text_term, image_term, kl])

    def step_losses(self, images: Tensor, text: Tensor, features: Tensor, labels: Tensor,
                    epoch: int):
        loss, _ = self.losses(text, features, labels, epoch)
        terms = self.consistency_terms(images, text, features)
        self._terms += terms.detach().to(self._terms.dtype) * features.shape[0]
        return loss.to(terms.dtype) + terms.sum(), None

    # -- the epoch and GPA

    def train_epoch(self, *, epoch: int, bar) -> dict:
        """IVLP's online epoch with the consistency terms (the record's ``loss`` is the whole
        loss; ``text_loss``, ``image_loss``, ``kl_logits`` the weighted terms' epoch means),
        then the prompts join the GPA sum with the epoch's weight; after the last epoch the sum
        replaces them."""
        self._terms.zero_()
        result = super().train_epoch(epoch=epoch, bar=bar)
        means = (self._terms / self.images_per_epoch).tolist()
        result.update(zip(("text_loss", "image_loss", "kl_logits"), means))
        weight = self.gpa_weights[epoch]
        with torch.no_grad():
            current = {k: v.detach().to("cpu", torch.float64) * weight
                       for k, v in self.trainable().items()}
            if self.gpa_sum is None:
                self.gpa_sum = current
            else:
                self.gpa_sum = {k: self.gpa_sum[k] + current[k] for k in current}
            if epoch + 1 == self.config.epochs:
                self.load_trainable(self.gpa_sum)
        return result

    def training_state(self) -> dict[str, Tensor]:
        if self.gpa_sum is None:
            return {}
        return {f"gpa_sum.{k}": v for k, v in self.gpa_sum.items()}

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        own = self.trainable()
        sums = {k[len("gpa_sum."):]: v for k, v in state.items() if k.startswith("gpa_sum.")}
        if not sums:
            self.gpa_sum = None
            return
        if set(sums) != set(own):
            raise ValueError(f"state: the GPA sum holds {sorted(sums)}, expected {sorted(own)}")
        self.gpa_sum = {k: sums[k].to("cpu", torch.float64) for k in own}
