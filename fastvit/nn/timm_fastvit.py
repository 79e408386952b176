"""Fused subclass of the attention of timm's Apple FastViT models (``fastvit_sa*``, ``fastvit_ma*``
and the MobileCLIP image towers ``fastvit_mci*``), swapped onto a model by ``fastvit.patch``.

Apple's FastViT is a hybrid: RepMixer (reparameterisable depthwise conv) blocks, then in its last
stage (the SA / MA / MCi variants) ``AttentionBlock``s whose token mixer, ``Attention``, is plain
multi-head self-attention over the (B, C, H, W) map's H * W positions, heads of 32. timm's qkv and
output projections stay; the softmax attention becomes one ``fastvit.flash_attention`` call on
views of the packed projection. The blocks' BatchNorm and conv MLPs, the RepMixer blocks and the
conv stem run timm's modules. See ``fastvit.nn.fused`` for how the swap works. Importing this
module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.fastvit import Attention as AppleFastVitAttention

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedAppleFastVitAttention"]


class FusedAppleFastVitAttention(FusedModule, AppleFastVitAttention):
    """timm (Apple) FastViT ``Attention`` running one ``fastvit.flash_attention`` call over the
    map's positions.

    Same signature, ``forward(x)``: x (B, C, H, W) -> (B, C, H, W). Calls in training with
    attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("fastvit_mci0")  # MobileCLIP-S0's image tower
        >>> fastvit.patch(model)  # stages.3.blocks.*.token_mixer -> FusedAppleFastVitAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm FastViT Attention"):
            return super().forward(x)
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(-2, -1)  # (B, N, C), a view
        q, k, v = split_packed_qkv(self.qkv(tokens), self.num_heads, self.head_dim)  # (B, heads, N, D) views
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))
        out = self.proj_drop(self.proj(merge_heads(out)))  # (B, N, C)
        return out.transpose(-2, -1).reshape(B, C, H, W)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, channels-first, fastvit={self.fastvit_op}"
