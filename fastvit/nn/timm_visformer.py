"""Fused subclass of timm's Visformer attention (``visformer_*``), swapped onto a model by
``fastvit.patch``.

``timm.models.visformer.Attention`` works on (B, C, H, W) maps: a 1x1-conv qkv projection (heads
of ``head_dim``, possibly not C / heads: ``head_dim_ratio``), attention over the H*W positions, a
1x1-conv output projection. The channel-first q, k, v (B, heads, D, H*W) are laid out token-major
for the op (one copy each, as timm's own SDPA path makes with ``.contiguous()``); the softmax
attention is one ``fastvit.flash_attention`` call. The stages' BatchNorm + conv MLP blocks are not
LayerNorm MLPs and run timm's modules. See ``fastvit.nn.fused`` for how the swap works. Importing
this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.visformer import Attention

import fastvit
from fastvit.nn.attention import timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedVisformerAttention"]


class FusedVisformerAttention(FusedModule, Attention):
    """timm Visformer ``Attention`` running one ``fastvit.flash_attention`` call over the map's
    positions.

    Same signature, ``forward(x)``: x (B, C, H, W) -> (B, C, H, W). Calls in training with attention
    dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("visformer_small")
        >>> fastvit.patch(model)  # stage2.*.attn, stage3.*.attn -> FusedVisformerAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm Visformer Attention"):
            return super().forward(x)
        B, _, H, W = x.shape
        # (B, 3*heads*D, H, W) -> (3, B, heads, D, H*W); the op reads D with a unit stride: token-major
        # copies, as timm's SDPA path makes
        qkv = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, -1).transpose(-1, -2)
        q, k, v = qkv.contiguous().unbind(1)
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B, heads, H*W, D)
        x = out.transpose(-1, -2).reshape(B, -1, H, W)  # timm's (B, heads, D, H*W) -> (B, heads*D, H, W)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"
