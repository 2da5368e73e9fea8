"""KgCoOp (Yao et al., ``htyao89/KgCoOp: KgCoOp/trainers/kgcoop.py``): CoOp's context, plus a
term that keeps the learned class features close to those of a hand-made prompt,
``w · (1 - mean_c cos(t_c, t_c^clip))``, with ``t^clip`` the frozen encoder's features of
``kg_template.format(class name)`` (the official code's ``CUSTOM_TEMPLATES``, one per data set:
"a photo of a {}, a type of pet." for OxfordPets, "a centered satellite photo of {}." for
EuroSAT, ...; "a photo of a {}." by default) and ``w = kg_weight`` (8.0 in the official
scripts).

The official prompt learner also holds a ``bias_vectors`` tensor and a ``meta_net`` that its
forward never uses; they are not trained here (a Dassl checkpoint's ``ctx`` is all that counts).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.models import zeroshot_text_features
from fastprompt.train.coop import CoOpLearner
from fastprompt.train.learner import register

# vit_b16_ep100_ctxv1 with the official scripts' settings.
KGCOOP_DEFAULTS = {"n_ctx": 4, "ctx_init": "a photo of a", "epochs": 100, "batch_size": 128,
                   "lr": 0.002}


def knowledge_distance(text: Tensor, clip_text: Tensor) -> Tensor:
    """``1 - mean_c cos(t_c, t_c^clip)`` (KgCoOp's ``score``), in float32."""
    return 1.0 - F.cosine_similarity(text.float(), clip_text.float(), dim=-1, eps=1e-7).mean()


@register
class KgCoOpLearner(CoOpLearner):
    """CoOp's context with KgCoOp's distance to the hand-made prompt's features."""
    name = "kgcoop"
    method_keys = CoOpLearner.method_keys + ("kg_weight", "kg_template")
    defaults = KGCOOP_DEFAULTS

    def setup(self) -> None:
        super().setup()
        self.clip_text = zeroshot_text_features(self.model, self.tokenizer, self.cache.classnames,
                                                templates=(self.config.kg_template,)
                                                ).to(self.device)

    def extra_loss(self, text: Tensor, batch) -> Tensor:
        return self.config.kg_weight * knowledge_distance(text, self.clip_text)

    def final_metrics(self) -> dict:
        with torch.no_grad():
            distance = float(knowledge_distance(self.text_features(), self.clip_text))
        return {**super().final_metrics(), "knowledge_distance": distance}
