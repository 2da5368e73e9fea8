"""The frozen image tower of an open_clip model, fed with learned prompt tokens (VPT, IVLP, MaPLe).

The prompt tokens are appended at the end of the sequence, after the class token and the patch
tokens have received their positional embedding (the prompts get none), and before ``ln_pre``.
Deep prompts then overwrite those last tokens right before a transformer block, as the vision
branch of MaPLe's and IVLP's official code does. The class token is pooled, as CLIP does.
Without prompts the encoder computes exactly ``model.encode_image``.
"""
from __future__ import annotations

import torch
from open_clip.transformer import PatchDropout, VisionTransformer
from torch import nn

from fastprompt._validation import check_same_device, check_tensor


def _resolve_vision_tower(model: nn.Module) -> VisionTransformer:
    """The model's open_clip ``VisionTransformer``, or a ValueError naming ``model``."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = "no image tower" if visual is None else f"a {type(visual).__name__} image tower"
        raise ValueError(f"model: {type(model).__name__} with {kind} is not supported; prompt "
                         "tokens need open_clip's VisionTransformer (a ViT CLIP model, not a "
                         "ModifiedResNet or timm tower)")
    if visual.attn_pool is not None:
        raise ValueError("model: the image tower pools with attention (CoCa style), which the "
                         "prompted image tower does not support (it pools the class token)")
    if visual.pool_type != "tok":
        raise ValueError(f"model: image pooling {visual.pool_type!r} is not supported; the "
                         "prompted image tower pools the class token ('tok'), as CLIP does")
    return visual


class PromptVisionEncoder(nn.Module):
    """open_clip's ``encode_image`` with prompt tokens appended to the image's tokens.

    Holds references to the model's own image modules (patch embedding, class and positional
    embeddings, norms, transformer, projection); it neither copies nor freezes them
    (``create_model`` returns a frozen model). Move it together with the model.

    Supports open_clip's ``VisionTransformer`` pooling its class token; raises ValueError naming
    ``model`` for other towers (ModifiedResNet, timm), attention pooling, average pooling, and,
    when called, for patch dropout that is active (a tower in training mode with a drop rate).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = _resolve_vision_tower(model)
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.positional_embedding = visual.positional_embedding
        self.patch_dropout = visual.patch_dropout
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.image_size = tuple(visual.image_size)
        self.width = int(visual.class_embedding.shape[0])
        self.num_tokens = int(visual.positional_embedding.shape[0])  # class token + patches
        self._check_patch_dropout()

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def _check_patch_dropout(self) -> None:
        dropout = self.patch_dropout
        if isinstance(dropout, PatchDropout) and dropout.training and dropout.prob > 0:
            raise ValueError(f"model: the image tower drops patches (patch dropout {dropout.prob}) "
                             "in training mode, which the prompted image tower does not support; "
                             "put the tower in eval mode or build it without patch dropout")

    def forward(self, images: torch.Tensor, prompts: torch.Tensor | None = None,
                deep_prompts: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Image features (B x E, unnormalised, as ``encode_image``) of B images.

        ``images`` (B x 3 x H x W) are preprocessed images of the tower's size; they are cast to
        the tower's dtype. ``prompts`` (n x W shared by every image, or B x n x W; W the tower's
        width) are appended as n tokens after the positional embedding, before ``ln_pre``; None
        appends nothing. ``deep_prompts`` maps a layer index ``i`` (1 <= i < layers) to the
        tokens (same shapes) that overwrite the last n tokens right before block ``i``; it needs
        ``prompts``.
        """
        check_tensor("images", images, ndim=4, floating=True)
        b = images.shape[0]
        if images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images: expected shape (B, 3, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(images.shape)}")
        n = self._check_prompts(b, prompts, deep_prompts)
        check_same_device("images", images, prompts=prompts)
        self._check_patch_dropout()
        dtype = self.conv1.weight.dtype
        x = self.conv1(images.to(dtype))
        x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)  # B x patches x W
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.patch_dropout(x)  # the identity here (checked above)
        if n:
            x = torch.cat([x, prompts.to(x.dtype).expand(b, -1, -1)], dim=1)
        x = self.ln_pre(x)
        if deep_prompts:
            x = self._deep_transformer(x, n, deep_prompts)
        else:
            x = self.transformer(x)
        # ln_post acts on each token alone: pooling the class token first is exact.
        x = self.ln_post(x[:, 0])
        if self.proj is not None:
            x = x @ self.proj
        return x

    def _check_prompts(self, b: int, prompts, deep_prompts) -> int:
        """The number of prompt tokens (0 without prompts), or a ValueError naming the argument."""
        def shape_ok(t: torch.Tensor, n: int | None) -> bool:
            return (t.dim() in (2, 3) and t.shape[-1] == self.width
                    and (t.dim() == 2 or t.shape[0] == b) and (n is None or t.shape[-2] == n))

        if prompts is None:
            if deep_prompts:
                raise ValueError("deep_prompts: need prompts (the appended tokens they replace)")
            return 0
        check_tensor("prompts", prompts, floating=True)
        if not shape_ok(prompts, None) or prompts.shape[-2] == 0:
            raise ValueError(f"prompts: expected shape (n, {self.width}) or ({b}, n, "
                             f"{self.width}) with n >= 1, got {tuple(prompts.shape)}")
        n = prompts.shape[-2]
        layers = self.num_layers
        for i, tokens in (deep_prompts or {}).items():
            if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i < layers:
                raise ValueError(f"deep_prompts: layer {i!r} must be an int in [1, {layers}) "
                                 f"(this image tower has {layers} layers)")
            check_tensor(f"deep_prompts[{i}]", tokens, floating=True)
            if not shape_ok(tokens, n):
                raise ValueError(f"deep_prompts: layer {i}: expected tokens of shape "
                                 f"({n}, {self.width}) or ({b}, {n}, {self.width}), got "
                                 f"{tuple(tokens.shape)}")
            check_same_device("prompts", prompts, **{f"deep_prompts[{i}]": tokens})
        return n

    def _deep_transformer(self, x: torch.Tensor, n: int, deep_prompts: dict) -> torch.Tensor:
        """The blocks one by one (as open_clip's ``Transformer.forward`` runs them), the last
        ``n`` tokens replaced by ``deep_prompts[i]`` before block ``i``."""
        transformer = self.transformer
        b = x.shape[0]
        if not transformer.batch_first:
            x = x.transpose(0, 1).contiguous()  # NLD -> LND
        for i, block in enumerate(transformer.resblocks):
            tokens = deep_prompts.get(i)
            if tokens is not None:
                tokens = tokens.to(x.dtype).expand(b, -1, -1)
                if transformer.batch_first:
                    x = torch.cat([x[:, :-n], tokens], dim=1)
                else:
                    x = torch.cat([x[:-n], tokens.transpose(0, 1)], dim=0)
            if transformer.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, None, None, None,
                                                      use_reentrant=False)
            else:
                x = block(x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)  # LND -> NLD
        return x
