"""Fused subclasses of timm's ConViT modules (``convit_*``), swapped onto a model by
``fastvit.patch``.

ConViT's first ``local_up_to_layer`` blocks attend with ``GPSA`` (gated positional self-attention:
a learned gate blends a softmax over relative positions into the content softmax, which no single
attention call computes: reported, timm's forward), the last ones with ``MHSA``, plain multi-head
self-attention: one ``fastvit.flash_attention`` call on views of the packed qkv projection. Every
block's MLP half, ``x + drop_path(mlp(norm2(x)))`` with the block's one ``drop_path`` (timm calls
it in both halves), is one ``fastvit.layernorm_mlp`` call
(``fastvit.nn.timm_mlp.SharedDropPathBlock``). Calls in training with attention dropout > 0 (or
MLP dropout, for the MLP halves) run timm's forward. See ``fastvit.nn.fused`` for how the swap
works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models import convit

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import SharedDropPathBlock

__all__ = ["FusedConvitBlock", "FusedConvitMHSA"]


class FusedConvitMHSA(FusedModule, convit.MHSA):
    """timm ConViT ``MHSA`` running one ``fastvit.flash_attention`` call.

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C). Calls in training with attention
    dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("convit_tiny")
        >>> fastvit.patch(model)  # blocks.10.attn, blocks.11.attn -> FusedConvitMHSA; blocks.* -> FusedConvitBlock
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm ConViT MHSA"):
            return super().forward(x)
        # (B, N, 3C) -> q, k, v (B, heads, N, D): views of the projection, unit stride in D
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, x.shape[-1] // self.num_heads)
        out = fastvit.flash_attention(q, k, v, scale=self.scale)  # (B, heads, N, D)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"


class FusedConvitBlock(SharedDropPathBlock, convit.Block):
    """timm ConViT ``Block`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same signature,
    ``forward(x)``: x (B, N, C) -> (B, N, C)); its attention (GPSA: timm's; MHSA: fused on its own)
    runs first, as in timm (the forward: ``fastvit.nn.timm_mlp.SharedDropPathBlock``)."""

    fastvit_gamma = False  # no layer scale

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module (no layer scale)."""
        return x + self.drop_path(self.mlp(self.norm2(x)))
