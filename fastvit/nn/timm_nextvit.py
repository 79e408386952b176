"""Fused subclass of timm's Next-ViT efficient multi-head self-attention (``nextvit_*``), swapped
onto a model by ``fastvit.patch``.

Next-ViT's transformer blocks (``NextTransformerBlock``) attend with ``EfficientAttention``: q from
every token, k and v from the tokens average-pooled ``sr_ratio ** 2`` at a time along the
flattened sequence and BatchNorm'd (``sr``, ``norm``; none at ``sr_ratio`` 1), heads of
``head_dim`` 32. timm's projections and spatial reduction stay; the softmax attention from the N
tokens to the M reduced ones becomes one ``fastvit.flash_attention`` call on views of the
projections. The blocks' conv MLPs (BatchNorm, 1x1 convs) and their convolutional attention
(``ConvAttention``) run timm's modules (reported). See ``fastvit.nn.fused`` for how the swap
works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.nextvit import EfficientAttention

import fastvit
from fastvit.nn.attention import merge_heads, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedEfficientAttention"]


class FusedEfficientAttention(FusedModule, EfficientAttention):
    """timm Next-ViT ``EfficientAttention`` running one ``fastvit.flash_attention`` call from the N
    tokens to the M = N / sr_ratio^2 reduced ones.

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, out_dim). Calls in training with
    attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("nextvit_small")
        >>> fastvit.patch(model)  # stages.*.blocks.*.e_mhsa -> FusedEfficientAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm Next-ViT EfficientAttention"):
            return super().forward(x)
        heads = (self.num_heads, self.head_dim)
        q = self.q(x).unflatten(-1, heads).transpose(1, 2)  # (B, H, N, D), a view
        if self.sr is not None:  # (B, N, C) -> (B, M, C): pooled along the sequence, normalised
            x = self.norm(self.sr(x.transpose(1, 2))).transpose(1, 2)
        k = self.k(x).unflatten(-1, heads).transpose(1, 2)  # (B, H, M, D)
        v = self.v(x).unflatten(-1, heads).transpose(1, 2)
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B, H, N, D)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}, fastvit={self.fastvit_op}"
