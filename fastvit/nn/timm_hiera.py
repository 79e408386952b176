"""Fused subclass of timm's Hiera attention (``hiera_*``), swapped onto a model by ``fastvit.patch``.

``timm.models.hiera.MaskUnitAttention`` attends either within mask units (the early stages) or
globally, optionally max-pooling q by ``q_stride`` first (the first block of a stage: N / q_stride
queries, N keys). Hiera's ``Unroll`` has already ordered the tokens so that a mask unit's tokens are
``num_windows`` apart (token ``t * nW + w`` is place t of unit w) and the q pooling is a max over
``q_stride`` consecutive groups; all of that stays as in timm. Only the softmax attention becomes one
``fastvit.flash_attention`` call.

Layout. Mask units become heads: (B, H, nW, T, D) is laid out as (B, H*nW, T, D). timm's qkv
output interleaves units and heads as (B, T, nW, 3, H, D), which no stride folds into one dim, so
k and v (and q, unless pooling already made a fresh one) are copied once (O(tokens * C), like the
qkv projection). Global attention uses q, k, v as views of the qkv output. See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.hiera import MaskUnitAttention

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedMaskUnitAttention"]


class FusedMaskUnitAttention(FusedModule, MaskUnitAttention):
    """timm Hiera ``MaskUnitAttention`` (mask-unit or global, with or without q pooling) running
    ``fastvit.flash_attention``. Same signature, ``forward(x)`` with x (B, N, dim); returns
    (B, N / q_stride, dim_out)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        batch, tokens = x.shape[0], x.shape[1]
        heads, head_dim = self.heads, self.head_dim
        if not self.use_mask_unit_attn:
            q, k, v = split_packed_qkv(self.qkv(x), heads, head_dim)  # (B, H, N, D) views
            if self.q_stride > 1:  # max over the q_stride groups of N / q_stride tokens
                q = q.unflatten(2, (self.q_stride, -1)).amax(dim=2)
            out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))
            return self.proj(merge_heads(out))
        num_windows = tokens // (self.q_stride * self.window_size)
        # (B, T, nW, 3, H, D) -> (3, B, H, nW, T, D), views
        q, k, v = self.qkv(x).reshape(batch, -1, num_windows, 3, heads, head_dim).permute(3, 0, 4, 2, 1, 5).unbind(0)
        if self.q_stride > 1:  # a fresh (B, H, nW, T / q_stride, D) tensor
            q = q.unflatten(3, (self.q_stride, -1)).amax(dim=3)
        # units as heads: (B, H, nW, T, D) -> (B, H*nW, T, D), a view of q after pooling, else a copy
        q, k, v = (t.reshape(batch, heads * num_windows, t.shape[3], head_dim) for t in (q, k, v))
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B, H*nW, T', D)
        out = out.unflatten(1, (heads, num_windows))  # (B, H, nW, T', D), a view
        return self.proj(out.transpose(1, 3).reshape(batch, -1, self.dim_out))  # (B, T', nW, H, D) -> (B, N', C)

    def extra_repr(self) -> str:
        kind = f"mask units of {self.window_size}" if self.use_mask_unit_attn else "global"
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, {kind}, q_stride={self.q_stride}, fastvit={self.fastvit_op}"
        )
