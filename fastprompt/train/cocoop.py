"""CoCoOp (Zhou et al., ``KaiyangZhou/CoOp: trainers/cocoop.py``): CoOp's context shifted per
image by a meta network of the image's L2-normalised feature, so each image gets its own C class
prompts: ``ctx_i = ctx + meta_net(x̂_i)`` (added to every context token) and
``z[i, c] = s · x̂_i · t̂_{i,c}``.

The official trainer loops over the images of a batch one by one (batch 1 in its configs). Here a
step's B x C prompts go through the truncated text tower at once — or K at a time with
``--text-chunk K``, or sharded over ``torchrun`` ranks — and the per-image logits meet the fused
loss on given logits (``fastprompt.logits_cross_entropy``; ProGrad:
``fastprompt.logits_prograd_losses`` against the zero-shot logits), so every loss, target kind
and plug-in applies. ``meta_net`` is the official ``linear1`` (E -> E // 16), ReLU, ``linear2``
(-> text width W); the trained tensors are ``ctx`` and ``meta_net.linear{1,2}.{weight,bias}``.

A trained CoCoOp classifier's text side depends on the image: it is a ``CoCoOpHead`` (image
features -> logits), evaluated per image and exported with the text tower in the graph.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt.models import PromptedTextModel
from fastprompt.train.coop import CachedBatch, CoOpLearner, prompted_model
from fastprompt.train.epoch import autocast, logit_scale
from fastprompt.train.learner import TrainedClassifier, cache_record, method_summary, register
from fastprompt.train.text_backward import TextEncoding

# vit_b16_c4_ep10_batch1_ctxv1: 4 tokens from "a photo of a", batch 1, 10 epochs, SGD at 0.002.
COCOOP_DEFAULTS = {"n_ctx": 4, "ctx_init": "a photo of a", "epochs": 10, "batch_size": 1,
                   "lr": 0.002}
# Images whose B x C prompts a classifier encodes at once at test (memory of B x C prompts).
HEAD_IMAGES = 32


def cocoop_meta_net(embed_dim: int, width: int) -> nn.Sequential:
    """The official ``meta_net``; its initial weights are drawn from the global generator."""
    hidden = max(1, embed_dim // 16)
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(embed_dim, hidden)),
                                      ("relu", nn.ReLU()),
                                      ("linear2", nn.Linear(hidden, width))]))


class ConditionalPrompts(nn.Module):
    """CoCoOp's text side over C class names: ``encode(src, a, b)`` gives the features of rows
    [a, b) of the B x C (image, class) prompts, row ``r`` = image ``r // C``, class ``r % C``,
    from ``src = source(images)``: each image's shifted context, B x n_ctx x W."""

    def __init__(self, prompted: PromptedTextModel, meta_net: nn.Sequential):
        super().__init__()
        self.prompted, self.meta_net = prompted, meta_net
        self.n_cls = prompted.prompt_learner.n_cls

    def source(self, images: Tensor) -> Tensor:
        learner = self.prompted.prompt_learner
        bias = self.meta_net(F.normalize(images.float(), dim=-1).to(learner.ctx.dtype))
        return learner.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def encode(self, src: Tensor, a: int, b: int) -> Tensor:
        learner = self.prompted.prompt_learner
        rows = torch.arange(a, b, device=src.device)
        image, cls = rows // self.n_cls, rows % self.n_cls
        embeds = learner.prompts_for(src[image], cls)
        return self.prompted.text_encoder(embeds, learner.tokenized_prompts[cls])

    def encoding(self, images: Tensor) -> TextEncoding:
        params = [self.prompted.prompt_learner.ctx, *self.meta_net.parameters()]
        return TextEncoding(lambda: self.source(images), self.encode,
                            images.shape[0] * self.n_cls, params)

    def logits(self, images: Tensor, text: Tensor, scale) -> Tensor:
        """``z[i, c] = s · x̂_i · t̂_{i,c}`` from the B x C rows of ``text``."""
        t = F.normalize(text.float(), dim=-1).reshape(images.shape[0], self.n_cls, -1)
        x = F.normalize(images.float(), dim=-1)
        return scale * torch.einsum("be,bce->bc", x, t)


class CoCoOpHead(nn.Module):
    """A trained CoCoOp classifier: image features (N x E) -> logits (N x C), the prompts of
    ``images_per_pass`` images at a time through the text tower (None: all at once, as an
    exported graph runs them)."""

    def __init__(self, prompts: ConditionalPrompts, scale: float,
                 images_per_pass: int | None = HEAD_IMAGES):
        super().__init__()
        self.prompts, self.scale, self.images_per_pass = prompts, float(scale), images_per_pass

    def for_export(self) -> "CoCoOpHead":
        """A float32 CPU copy that runs every image in one pass, as an exported graph does."""
        head = copy.deepcopy(self).to("cpu", torch.float32).eval()
        head.images_per_pass = None
        return head

    def _logits(self, x: Tensor) -> Tensor:
        text = self.prompts.encode(self.prompts.source(x), 0, x.shape[0] * self.prompts.n_cls)
        return self.prompts.logits(x, text, self.scale)

    def forward(self, features: Tensor) -> Tensor:
        step = self.images_per_pass
        if step is None or features.shape[0] <= step:
            return self._logits(features)
        return torch.cat([self._logits(features[i:i + step])
                          for i in range(0, features.shape[0], step)])


class ImageBatch(NamedTuple):
    """A batch of cached rows with their image features on the device."""
    cached: CachedBatch
    images: Tensor


@register
class CoCoOpLearner(CoOpLearner):
    """CoOp's context shifted per image by CoCoOp's meta network."""
    name = "cocoop"
    defaults = COCOOP_DEFAULTS

    def __init__(self, config, cache, model, tokenizer, device, **options):
        if options.get("compile"):
            raise ValueError("compile: the compiled step runs CoOp-style prompts; CoCoOp's "
                             "per-image prompts are not supported there (drop --compile)")
        super().__init__(config, cache, model, tokenizer, device, **options)

    def setup(self) -> None:
        super().setup()
        # Drawn after the context, from the generator the CoOp learner seeded.
        self.meta_net = cocoop_meta_net(self.cache.feature_dim,
                                        self.prompted.text_encoder.width).to(self.device)
        self.conditional = ConditionalPrompts(self.prompted, self.meta_net)
        # What one step encodes, for --text-chunk auto: a batch's images times the classes.
        first = self.cache.train_features[:min(self.config.batch_size,
                                               self.cache.train_features.shape[0])]
        self.encoding = self.conditional.encoding(first.to(self.device))

    def trainable(self) -> dict:
        return {**super().trainable(),
                **{f"meta_net.{k}": v for k, v in self.meta_net.named_parameters()}}

    # -- one epoch

    def _images(self, batch: CachedBatch) -> Tensor:
        return self.cache.train_features[batch.rows].to(self.device).float()

    def text_encoding(self, batch: CachedBatch) -> TextEncoding:
        return self.conditional.encoding(self._images(batch))

    def batch_losses(self, text: Tensor, batch: CachedBatch):
        images = self._images(batch)
        logits = self.conditional.logits(images, text, self.scale)
        zeroshot = (self.scale * F.normalize(images, dim=-1) @ self.zeroshot.t()
                    if self.config.prograd else None)
        class_text = None
        if self.objective.dept is not None:  # DePT: each image's prompt of its own class
            labels = self.cache.train_labels[batch.rows].to(self.device)
            rows = text.reshape(images.shape[0], self.conditional.n_cls, -1)
            class_text = rows[torch.arange(images.shape[0], device=rows.device), labels]
        loss, kl = self.objective.logit_losses(logits, batch.rows, batch.samples, batch.options,
                                               zeroshot, class_text)
        extra = self.extra_loss(text, batch)
        return (loss if extra is None else loss + extra), kl

    # -- metrics

    def head(self) -> CoCoOpHead:
        return CoCoOpHead(self.conditional, float(self.scale))

    @torch.no_grad()
    def _accuracy(self, features: Tensor, labels: Tensor) -> float:
        if features.shape[0] == 0:
            return float("nan")
        x = features.to(self.device).float()
        logits = self.head()(x)
        fused = self.objective.fused_head(self.scale)
        if fused is not None:
            logits = fused.combine(logits, x)
        return int((logits.argmax(1).cpu() == labels).sum()) / features.shape[0]

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        with autocast(self.device, self.config.amp):
            return self.head()(features.to(self.device).float()).float()

    def text_features(self) -> Tensor:
        raise NotImplementedError("CoCoOp's class text features depend on the image: use head()")

    def train_accuracy(self) -> dict:
        m, cache = self.cache.num_train_images, self.cache
        first_view = cache.train_features[:m]
        return {"train_acc_noisy": self._accuracy(first_view, cache.train_labels[:m]),
                "train_acc_clean": self._accuracy(first_view, cache.train_clean_labels[:m])}

    def final_metrics(self) -> dict:
        cache = self.cache
        zeroshot = (cache.test_features.float().to(self.device) @ self.zeroshot.t()).argmax(1)
        zs = (int((zeroshot.cpu() == cache.test_labels).sum()) / len(cache.test_labels)
              if len(cache.test_labels) else float("nan"))
        return {"compile": None, "zeroshot_test_acc": zs,
                "test_acc": self._accuracy(cache.test_features, cache.test_labels),
                "val_acc": self._accuracy(cache.val_features, cache.val_labels),
                "trainable_parameters": sum(p.numel() for p in self.trainable().values()),
                "num_classes": cache.num_classes, "num_train_images": cache.num_train_images,
                "views": cache.views, "cache": cache_record(cache)}

    # -- loading

    @classmethod
    def _load_prompts(cls, prompt, model, tokenizer, classnames, device) -> ConditionalPrompts:
        config = prompt.config
        with torch.random.fork_rng(devices=[]):  # the initial draws are overwritten
            prompted = prompted_model(model, tokenizer, classnames, config).to(device)
            meta_net = cocoop_meta_net(prompt.tensors["meta_net.linear1.weight"].shape[1],
                                       prompted.text_encoder.width).to(device)
        meta_net.load_state_dict({k[len("meta_net."):]: v for k, v in prompt.tensors.items()
                                  if k.startswith("meta_net.")})
        with torch.no_grad():
            prompted.prompt_learner.ctx.copy_(prompt.tensors["ctx"])
        return ConditionalPrompts(prompted, meta_net).eval()

    @classmethod
    def _classifier(cls, prompt, run_dir, model, preprocess_val, tokenizer, device, classnames,
                    method) -> TrainedClassifier:
        prompts = cls._load_prompts(prompt, model, tokenizer, classnames, device)
        scale = float(logit_scale(model))
        with torch.no_grad():  # the prompts with the context alone (no image's shift)
            text = prompts.prompted().float()
        return TrainedClassifier(run_dir, prompt.config, model, tokenizer, prompt.config.model,
                                 classnames, text, scale, method, preprocess_val,
                                 head=CoCoOpHead(prompts, scale))

    @classmethod
    def load_classifiers(cls, prompt, run_dir, model, preprocess_val, tokenizer, device,
                         tasks) -> list[TrainedClassifier]:
        return [cls._classifier(prompt, run_dir, model, preprocess_val, tokenizer, device,
                                prompt.field("classnames"), method_summary(prompt.config))]

    @classmethod
    def for_classnames(cls, prompt, classifier, classnames, device) -> TrainedClassifier:
        """The meta network conditions each image's context, in front of ``classnames``."""
        return cls._classifier(prompt, classifier.run_dir, classifier.model,
                               classifier.preprocess_val, classifier.tokenizer, device,
                               list(classnames), {**classifier.method,
                                                  "classnames_transferred": True})
