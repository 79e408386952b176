"""Fused subclass of torchvision's MaxViT attention (``maxvit_t``), swapped onto a model by
``fastvit.patch``.

``RelativePositionalMultiHeadAttention`` runs on MaxViT's partitioned tokens, (B, G, P, C): G
windows (block attention) or grid cells (grid attention, after the model's axis swap) of P tokens
each. The partition, the axis swap and ``get_relative_positional_bias`` stay the model's; the
softmax attention is one ``fastvit.flash_attention`` call over B*G sequences of P tokens with the
(1, H, P, P) relative-position bias as ``attn_mask`` (read through its strides, never expanded
over B*G; the bias table learns through the mask gradient). MaxViT scales k by
``feat_dim ** -0.5`` (the full width, not the head dim): that is the op's ``scale``.
See ``fastvit.nn.fused`` for how the swap works. Importing this module imports torchvision.
"""

from __future__ import annotations

import torch
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

from fastvit.nn.attention import merge_heads, self_attention, split_packed_qkv
from fastvit.nn.fused import FusedModule

__all__ = ["FusedRelativePositionalMultiHeadAttention"]


class FusedRelativePositionalMultiHeadAttention(FusedModule, RelativePositionalMultiHeadAttention):
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention`` whose attention is one
    ``fastvit.flash_attention`` call with the relative-position bias as ``attn_mask``. Same input
    and output, (B, G, P, C); ``to_qkv`` and ``merge`` are called as modules (their hooks run)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        B, G, P, _ = x.shape
        qkv = self.to_qkv(x).flatten(0, 1)  # (B*G, P, 3*H*DH), rows [q; k; v] as torch.chunk splits them
        q, k, v = split_packed_qkv(qkv, self.n_heads, self.head_dim)  # (B*G, H, P, DH) views
        out = self_attention(q, k, v, scale=self.scale_factor, attn_mask=self.get_relative_positional_bias())
        return self.merge(merge_heads(out).reshape(B, G, P, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, head_dim={self.head_dim}, tokens={self.max_seq_len}, "
            f"scale={self.scale_factor:.4g}, fastvit={self.fastvit_op}"
        )
