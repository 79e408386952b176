"""Fused subclass of timm's PVTv2 attention (``pvt_v2_*``), swapped onto a model by ``fastvit.patch``.

``timm.models.pvt_v2.Attention`` is spatial-reduction attention: the queries come from all N tokens
of the (H, W) map, the keys and values from a reduced map of M < N tokens. The reduction stays
timm's, module for module: a strided ``sr`` conv + LayerNorm (``sr_ratio`` > 1), or, in the
``linear`` variant (``pvt_v2_b2_li``), an adaptive average pool to 7x7 + 1x1 ``sr`` conv +
LayerNorm + GELU; with ``sr_ratio`` 1 keys and values come from all tokens. Only the softmax
attention becomes one ``fastvit.flash_attention`` call (cross-attention, N queries, M keys), then
timm's ``proj``. See ``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models import pvt_v2

import fastvit
from fastvit.nn.attention import merge_heads, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedPvtAttention"]


class FusedPvtAttention(FusedModule, pvt_v2.Attention):
    """timm PVTv2 ``Attention`` (spatial reduction, or the ``linear`` pooled variant) running
    ``fastvit.flash_attention``. Same signature, ``forward(x, feat_size)`` with x (B, N, C) and
    feat_size the (H, W) of its N = H * W tokens; returns (B, N, C). Calls in training with
    attention dropout > 0 run timm's forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, feat_size)
        if self._fastvit_unfused("timm PVTv2 Attention"):
            return super().forward(x, feat_size)
        batch, _, channels = x.shape  # (B, N, C)
        height, width = feat_size
        heads = (self.num_heads, self.head_dim)
        q = self.q(x).unflatten(-1, heads).transpose(1, 2)  # (B, H, N, D), a view
        if self.sr is not None:  # reduce the map: (B, N, C) -> NCHW -> (B, M, C)
            grid = x.transpose(1, 2).reshape(batch, channels, height, width)
            if self.pool is not None:  # linear variant: pool to 7x7 first
                grid = self.pool(grid)
            x = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
            if self.act is not None:
                x = self.act(x)
        # (B, M, 2*C) -> (2, B, H, M, D), views
        k, v = self.kv(x).unflatten(-1, (2, *heads)).permute(2, 0, 3, 1, 4).unbind(0)
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B, H, N, D)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        if self.pool is not None:
            kind = "linear (pool 7x7)"
        else:
            kind = f"sr_ratio={self.sr.stride[0] if self.sr is not None else 1}"
        return f"heads={self.num_heads}, head_dim={self.head_dim}, {kind}, fastvit={self.fastvit_op}"
