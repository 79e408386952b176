"""Fused subclass of the attention of timm's MetaFormer models (CAFormer: ``caformer_*``), swapped
onto a model by ``fastvit.patch``.

CAFormer's last two stages mix their tokens with ``Attention`` (``timm.models.metaformer``): plain
multi-head self-attention over the stage's (B, H*W, C) tokens, heads of 32, no biases. timm's qkv
and output projections stay; the softmax attention becomes one ``fastvit.flash_attention`` call on
views of the packed projection. The blocks' StarReLU MLPs and residual scales, the SepConv stages
and the conv stem run timm's modules (reported). See ``fastvit.nn.fused`` for how the swap works.
Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.metaformer import Attention as MetaFormerAttention

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedMetaFormerAttention"]


class FusedMetaFormerAttention(FusedModule, MetaFormerAttention):
    """timm MetaFormer ``Attention`` (CAFormer's token mixer) running one ``fastvit.flash_attention``
    call.

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C), any float dtype timm's runs. Calls in
    training with attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("caformer_s18")
        >>> fastvit.patch(model)  # stages.2-3.blocks.*.token_mixer -> FusedMetaFormerAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        # heads narrower than the tokens (dim not a multiple of head_dim): timm's reshape to (B, N, C)
        # raises there, and keeps raising
        if self.attention_dim != self.qkv.in_features or self._fastvit_unfused("timm MetaFormer Attention"):
            return super().forward(x)
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, self.head_dim)  # (B, heads, N, D) views
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"
