"""TCP, textual-based class-aware prompt tuning (Yao et al., ``htyao89/Textual-based_Class-
aware_prompt_tuning: trainers/tcp.py``): CoOp's context, plus class-aware tokens that a meta
network makes from each class's zero-shot text features and that replace the context's hidden
states right before text layer ``tcp_layer`` (8 in the official code: ``layers=[8]``, counted
from 0); and KgCoOp's distance to the hand-made prompt's features with weight ``kg_weight``
(8.0, hard-coded there).

The meta network is the official ``meta_net``: ``linear1`` (E -> E // 4), QuickGELU, ``linear2``
(E // 4 -> n_ctx · W), its output reshaped to n_ctx tokens of the text width W per class; its
input is the L2-normalised zero-shot features of ``kg_template`` (the official
``CUSTOM_TEMPLATES_ori``), which are also the distance's targets. The trained tensors are
``ctx`` and ``meta_net.linear{1,2}.{weight,bias}``. Defaults as ``vit_b16_ep100_ctxv1`` with the
official scripts: 4 context tokens drawn at random, Adam at 0.002, batch 32, 50 epochs.

Because the class-aware tokens come from class names through the frozen encoder, a trained TCP
prompt applies to other class names (base-to-new, ``export --classnames``).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fastprompt.models import PromptedTextModel, zeroshot_text_features
from fastprompt.train.coop import prompted_model
from fastprompt.train.epoch import logit_scale
from fastprompt.train.kgcoop import KgCoOpLearner
from fastprompt.train.learner import TrainedClassifier, method_summary, register
from fastprompt.train.text_backward import TextEncoding

TCP_DEFAULTS = {"n_ctx": 4, "ctx_init": None, "optimizer": "adam", "lr": 0.002, "epochs": 50,
                "batch_size": 32}


class QuickGELU(nn.Module):
    """CLIP's GELU approximation, ``x · σ(1.702 x)``, as the official meta network uses."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def tcp_meta_net(embed_dim: int, n_ctx: int, width: int) -> nn.Sequential:
    """The official ``meta_net``; its initial weights are drawn from the global generator."""
    hidden = embed_dim // 4
    return nn.Sequential(OrderedDict([("linear1", nn.Linear(embed_dim, hidden)),
                                      ("relu", QuickGELU()),
                                      ("linear2", nn.Linear(hidden, n_ctx * width))]))


class ClassAwarePrompts(nn.Module):
    """TCP's text side over C class names: the prompted text model, the meta network and the
    class features it reads; ``encode(src, a, b)`` the features of classes [a, b) from ``src``
    (``source()``: each class's context next to its class-aware tokens, C x 2·n_ctx x W)."""

    def __init__(self, prompted: PromptedTextModel, meta_net: nn.Sequential,
                 class_features: Tensor, layer: int):
        super().__init__()
        self.prompted, self.meta_net, self.layer = prompted, meta_net, layer
        self.register_buffer("class_features", class_features, persistent=False)
        learner = prompted.prompt_learner
        self.n_ctx, self.n_cls = learner.n_ctx, learner.n_cls
        layers = prompted.text_encoder.num_layers
        if not 1 <= layer < layers:
            raise ValueError(f"tcp_layer: {layer} is not a layer of this text tower, which has "
                             f"{layers}: take one in [1, {layers})")

    def source(self) -> Tensor:
        learner = self.prompted.prompt_learner
        tokens = self.meta_net(self.class_features.to(learner.ctx.dtype))
        tokens = tokens.reshape(self.n_cls, self.n_ctx, -1)
        ctx = learner.ctx.expand(self.n_cls, -1, -1)
        return torch.cat([ctx, tokens], dim=1)

    def encode(self, src: Tensor, a: int, b: int) -> Tensor:
        learner = self.prompted.prompt_learner
        rows = slice(a, b)
        embeds = learner(src[:, :self.n_ctx], classes=rows)
        return self.prompted.text_encoder(embeds, learner.tokenized_prompts[rows],
                                          deep_prompts={self.layer: src[rows, self.n_ctx:]},
                                          deep_positions=learner.ctx_positions[rows])

    def forward(self) -> Tensor:
        return self.encode(self.source(), 0, self.n_cls)

    def encoding(self) -> TextEncoding:
        params = [self.prompted.prompt_learner.ctx, *self.meta_net.parameters()]
        return TextEncoding(self.source, self.encode, self.n_cls, params)


def load_class_aware_prompts(prompt, model, tokenizer, classnames, device) -> ClassAwarePrompts:
    """TCP's trained text side (the prompt file's ``ctx`` and ``meta_net``) over
    ``classnames``, whose own zero-shot features feed the meta network."""
    config = prompt.config
    features = zeroshot_text_features(model, tokenizer, classnames,
                                      templates=(config.kg_template,)).to(device)
    with torch.random.fork_rng(devices=[]):  # the initial draws are overwritten
        prompted = prompted_model(model, tokenizer, classnames, config).to(device)
        meta_net = tcp_meta_net(features.shape[1], config.n_ctx,
                                prompted.text_encoder.width).to(device)
    meta_net.load_state_dict({k[len("meta_net."):]: v for k, v in prompt.tensors.items()
                              if k.startswith("meta_net.")})
    with torch.no_grad():
        prompted.prompt_learner.ctx.copy_(prompt.tensors["ctx"])
    return ClassAwarePrompts(prompted, meta_net, features, config.tcp_layer)


@register
class TCPLearner(KgCoOpLearner):
    """TCP's context and class-aware tokens, with KgCoOp's distance."""
    name = "tcp"
    method_keys = KgCoOpLearner.method_keys + ("tcp_layer",)
    defaults = TCP_DEFAULTS

    def __init__(self, config, cache, model, tokenizer, device, **options):
        if options.get("compile"):
            raise ValueError("compile: the compiled step runs CoOp-style prompts; TCP's deep "
                             "class-aware tokens are not supported there (drop --compile)")
        super().__init__(config, cache, model, tokenizer, device, **options)

    def setup(self) -> None:
        super().setup()
        # Drawn after the context, from the generator the CoOp learner seeded.
        self.meta_net = tcp_meta_net(self.clip_text.shape[1], self.config.n_ctx,
                                     self.prompted.text_encoder.width).to(self.device)
        self.tcp = ClassAwarePrompts(self.prompted, self.meta_net, self.clip_text,
                                     self.config.tcp_layer)
        self.encoding = self.tcp.encoding()

    def trainable(self) -> dict:
        return {**super().trainable(),
                **{f"meta_net.{k}": v for k, v in self.meta_net.named_parameters()}}

    @classmethod
    def load_classifiers(cls, prompt, run_dir, model, preprocess_val, tokenizer, device,
                         tasks) -> list[TrainedClassifier]:
        config, classnames = prompt.config, prompt.field("classnames")
        prompts = load_class_aware_prompts(prompt, model, tokenizer, classnames, device)
        with torch.no_grad():
            text = prompts().float()
        return [TrainedClassifier(run_dir, config, model, tokenizer, config.model, classnames,
                                  text, float(logit_scale(model)), method_summary(config),
                                  preprocess_val)]

    @classmethod
    @torch.no_grad()
    def text_features_for(cls, prompt, classifier, classnames, device) -> Tensor:
        """The context and the meta network's tokens made from ``classnames``' own zero-shot
        features."""
        prompts = load_class_aware_prompts(prompt, classifier.model, classifier.tokenizer,
                                           list(classnames), device)
        return prompts().float()
