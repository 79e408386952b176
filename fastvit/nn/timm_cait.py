"""Fused subclass of timm's CaiT class attention (``cait_*``), swapped onto a model by ``fastvit.patch``.

``timm.models.cait.ClassAttn`` is cross-attention from the class token: one query (the class
token, x[:, 0]) against the keys and values of all N tokens (class token + patches), in the
``LayerScaleBlockClassAttn`` blocks at the end of the model. timm's q, k, v and output
projections stay; the softmax attention becomes one ``fastvit.flash_attention`` call with N = 1
query. CaiT's other attention, ``TalkingHeadAttn``, mixes the heads with a linear layer before and
after the softmax, so no single attention call computes it: the timm adapter reports it as
skipped.

Both kinds of block, ``LayerScaleBlock`` (talking heads, over every token) and
``LayerScaleBlockClassAttn`` (the class token's update), run their attention half as timm does and
their MLP half ``x + drop_path(gamma_2 * mlp(norm2(x)))`` as one ``fastvit.layernorm_mlp`` call
(``fastvit.nn.timm_mlp.SharedDropPathMlpHalf``: ``gamma_2`` as ``layer_scale``, the drop path as
``sample_scale``; the one ``drop_path`` module is shared by both halves, as in timm). In training
with MLP dropout > 0 the MLP half runs timm's modules. See ``fastvit.nn.fused`` for how the swap
works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.cait import ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn

import fastvit
from fastvit.nn.attention import merge_heads, timm_scale
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import SharedDropPathBlock, SharedDropPathMlpHalf

__all__ = ["FusedClassAttn", "FusedLayerScaleBlock", "FusedLayerScaleBlockClassAttn", "class_token_attention"]


def class_token_attention(
    x: torch.Tensor, q: nn.Module, k: nn.Module, v: nn.Module, num_heads: int, scale: float | None
) -> torch.Tensor:
    """The class token attending to every token (CaiT's ``ClassAttn``, CrossViT's
    ``CrossAttention``): x (B, N, C), class token first, and the three projections -> the class
    token's attention output (B, 1, C), heads merged, before the output projection.

    Example:
        >>> out = class_token_attention(x, attn.q, attn.k, attn.v, attn.num_heads, attn.scale)
    """
    heads = (num_heads, x.shape[-1] // num_heads)
    q = q(x[:, 0]).unflatten(-1, heads).unsqueeze(2)  # class token: (B, C) -> (B, H, 1, D)
    k = k(x).unflatten(-1, heads).transpose(1, 2)  # (B, H, N, D), a view
    v = v(x).unflatten(-1, heads).transpose(1, 2)
    return merge_heads(fastvit.flash_attention(q, k, v, scale=scale))  # (B, 1, C)


class FusedClassAttn(FusedModule, ClassAttn):
    """timm CaiT ``ClassAttn`` running ``fastvit.flash_attention``. Same signature, ``forward(x)``
    with x (B, N, C) (class token first); returns the class token's update (B, 1, C). Calls in
    training with attention dropout > 0 run timm's forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm CaiT ClassAttn"):
            return super().forward(x)
        x = class_token_attention(x, self.q, self.k, self.v, self.num_heads, timm_scale(self))
        return self.proj_drop(self.proj(x))  # (B, 1, C)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, class token query, fastvit={self.fastvit_op}"


class FusedLayerScaleBlock(SharedDropPathBlock, LayerScaleBlock):
    """timm CaiT ``LayerScaleBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, N, C) -> (B, N, C)); its talking-heads attention runs timm's
    (the forward: ``fastvit.nn.timm_mlp.SharedDropPathBlock``, with ``gamma_1`` and ``gamma_2``).

    Example:
        >>> model = timm.create_model("cait_xxs24_224")
        >>> fastvit.patch(model)  # blocks.* -> FusedLayerScaleBlock, blocks_token_only.* -> ...ClassAttn
    """


class FusedLayerScaleBlockClassAttn(SharedDropPathMlpHalf, LayerScaleBlockClassAttn):
    """timm CaiT ``LayerScaleBlockClassAttn`` whose MLP half is one ``fastvit.layernorm_mlp`` call
    over the class token (same signature, ``forward(x, x_cls)``: x (B, N, C), x_cls (B, 1, C) ->
    the updated class token (B, 1, C)); its class attention is ``FusedClassAttn`` where fused."""

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, x_cls)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, x_cls)
        u = torch.cat((x_cls, x), dim=1)
        x_cls = x_cls + self.drop_path(self.gamma_1 * self.attn(self.norm1(u)))
        return self._fastvit_mlp_half(x_cls)
