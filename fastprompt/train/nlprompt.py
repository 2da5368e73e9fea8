"""NLPrompt (Pan et al., CVPR 2025; ``qunovo/NLPrompt: trainers/nlprompt.py``) as a plug-in of
any learner: ``--nlprompt``.

Before each epoch the current classifier scores each training image's view of that epoch; the
optimal transport of those scores to uniform sample and class marginals
(``fastprompt.ot_pseudo_labels``, entropic regularisation ``ot_reg``) gives each image a
pseudo-label. Images whose pseudo-label equals their given label are kept as clean and train
with the run's loss (cross-entropy, or DSPT's double softmax); the others train with MAE on the
given label, ``1 - p_y`` (GCE at q = 1), which bounds what a wrong label can pull.

The official trainer walks the clean images and then the noisy ones in separate loaders each
epoch; here one shuffled pass holds both, each row with its own loss in one fused call (the
op's per-row ``q``: 0 is cross-entropy, 1 is MAE), so every image weighs the same in the
epoch's mean. The official code's curriculum budget is off in its published setting
(``CURRICLUM_EPOCH = 0``: every image takes part), and so it is here.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import fastprompt
from fastprompt.data.cache import FeatureCache
from fastprompt.train.config import TrainConfig


def selection_record(prefix: str, kept: Tensor, given: Tensor, clean: Tensor) -> dict:
    """How well a clean/noisy split purifies: the share of images ``kept`` (bool, M), the
    share of kept images whose ``given`` label is their ``clean`` one (precision: how clean the
    kept set is), and the share of correctly labelled images that were kept (recall)."""
    correct = given == clean
    n_kept, n_correct = int(kept.sum()), int(correct.sum())
    both = int((kept & correct).sum())
    nan = float("nan")
    return {f"{prefix}kept": n_kept / max(1, kept.numel()),
            f"{prefix}kept_precision": both / n_kept if n_kept else nan,
            f"{prefix}kept_recall": both / n_correct if n_correct else nan}


class NLPromptSelection:
    """The per-epoch OT split of one cache's training images, and each batch's loss choice."""
    prefix = "nlprompt_"

    def __init__(self, config: TrainConfig, cache: FeatureCache, device: torch.device):
        self.config, self.cache, self.device = config, cache, device

    def epoch_options(self, options: dict, logits: Callable[[], Tensor]) -> tuple[dict, dict]:
        """The epoch's loss options (``q``: a per-image table, 0 for kept images, 1 for the
        others, which each batch gathers) and its record, from ``logits()``: the current
        classifier's logits of each training image's view this epoch (M x C, by image)."""
        z = logits().float()
        # The official scores (PMODE 'logP'): log_softmax of the softmax probabilities.
        scores = torch.log_softmax(torch.softmax(z, dim=1), dim=1)
        pseudo = fastprompt.ot_pseudo_labels(scores, reg=self.config.ot_reg).cpu()
        m = self.cache.num_train_images
        given = self.cache.train_labels[:m]
        kept = pseudo == given
        table = torch.where(kept, 0.0, 1.0).to(self.device)
        record = selection_record(self.prefix, kept, given, self.cache.train_clean_labels[:m])
        record[f"{self.prefix}pseudo_acc"] = float(
            (pseudo == self.cache.train_clean_labels[:m]).float().mean())
        return {**options, "loss": "gce", "q": table}, record

    @staticmethod
    def batch_options(options: dict, samples: Tensor) -> dict:
        """The batch's rows of the epoch's per-image ``q``."""
        return {**options, "q": options["q"][samples.to(options["q"].device)]}
