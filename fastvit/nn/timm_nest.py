"""Fused subclasses of timm's NesT (``nest_*``, ``jx_nest_*``), swapped onto a model by ``fastvit.patch``.

NesT attends within non-overlapping image blocks: its ``Attention`` takes x (B, T, N, C) with T
blocks of N tokens each, and its ``TransformerLayer`` is a pre-norm block over those 4-D tokens.
The attention's q, k, v (B, heads, T, N, D) are views of timm's packed qkv whose batch and block
axes merge, so every block of every image is one ``fastvit.flash_attention`` call; the output is
merged as timm merges it (channels per head major, ``(B, T, N, D, heads)``). The layer's MLP half
is one ``fastvit.layernorm_mlp`` call over the (B, T, N, C) tokens. Calls in training with
attention dropout > 0 run timm's attention forward, with MLP dropout timm's MLP modules. See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.nest import Attention, TransformerLayer

import fastvit
from fastvit.nn.attention import timm_scale
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import PreNormMlpHalf

__all__ = ["FusedNestAttention", "FusedNestTransformerLayer"]


class FusedNestAttention(FusedModule, Attention):
    """timm NesT ``Attention`` running one ``fastvit.flash_attention`` call over every image block.

    Same signature, ``forward(x)``: x (B, T, N, C) -> (B, T, N, C).

    Example:
        >>> model = timm.create_model("nest_tiny")
        >>> fastvit.patch(model)  # levels.*.transformer_encoder.*.attn -> FusedNestAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm NesT Attention"):
            return super().forward(x)
        B, T, N, C = x.shape
        heads = self.num_heads
        # (B, T, N, 3C) -> (3, B*T, heads, N, D): views of the projection's output
        q, k, v = self.qkv(x).reshape(B * T, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B*T, heads, N, D)
        # timm's merge: (B, heads, T, N, D) -> (B, T, N, D, heads) -> (B, T, N, C)
        out = out.reshape(B, T, heads, N, C // heads).permute(0, 1, 3, 4, 2).reshape(B, T, N, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"


class FusedNestTransformerLayer(PreNormMlpHalf, TransformerLayer):
    """timm NesT ``TransformerLayer`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, T, N, C) -> (B, T, N, C)); its attention is ``self.attn``
    (fused on its own). In training with MLP dropout > 0 the MLP half runs timm's modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be TransformerLayer.forward
            return super().forward(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return self._fastvit_mlp_half(x)
