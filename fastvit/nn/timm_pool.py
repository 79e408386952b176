"""Fused subclass of timm's attention pooling head (``timm.layers.AttentionPoolLatent``: the 'map'
global pool of SigLIP, NaFlex and other ViTs), swapped onto a model by ``fastvit.patch``.

The head is cross-attention from ``latent_len`` learned latent queries to the N tokens. timm's
position embedding, latent, q / kv projections, q / k norms, output projection, norm + MLP and
pooling stay; the softmax attention becomes one ``fastvit.flash_attention`` call (L queries
against N keys, the caller's ``attn_mask`` passed through). See ``fastvit.nn.fused`` for how the
swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.layers.attention_pool import AttentionPoolLatent

import fastvit
from fastvit.nn.attention import timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedAttentionPoolLatent"]


class FusedAttentionPoolLatent(FusedModule, AttentionPoolLatent):
    """timm ``AttentionPoolLatent`` running ``fastvit.flash_attention``. Same signature,
    ``forward(x, attn_mask=None)`` with x (B, N, C); returns what timm's does: (B, C') pooled
    ('token' / 'avg') or (B, L, C')."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, attn_mask)
        if not self._fastvit_intact():
            return super().forward(x, attn_mask=attn_mask)
        batch, tokens, channels = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(batch, -1, -1))  # (B, L, C)
        q = q.reshape(batch, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k, v = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = fastvit.flash_attention(q, k, v, attn_mask=attn_mask, scale=timm_scale(self))  # (B, H, L, D)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, self.latent_len, channels)))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == "token":
            x = x[:, 0]
        elif self.pool == "avg":
            x = x.mean(1)
        return x

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, latent queries={self.latent_len}, fastvit={self.fastvit_op}"
