"""Fused subclass of the attention of timm's Gemma 4 vision tower (``gemma4_vit_*``), swapped onto a
model by ``fastvit.patch``.

``timm.models.gemma4_vit.Gemma4Attention`` projects q, k, v separately, RMS-normalises all three
(q and k with a gain, v without), applies Gemma's 2-D RoPE to q and k, expands k and v to the q
heads (``num_kv_heads``: ``repeat_interleave``) and attends with scale 1 (q and k are normalised)
under the tower's additive key-padding mask. All of that stays as in timm, line for line; only the
softmax attention becomes one ``fastvit.flash_attention`` call (its output (B, N, heads, D) in
memory, so the reshape back to (B, N, heads * D) for ``o_proj`` is free). Importing this module
imports timm (a release with the Gemma 4 tower).
"""

from __future__ import annotations

import torch
from timm.models.gemma4_vit import Gemma4Attention, apply_multidimensional_rope

import fastvit
from fastvit.nn.attention import merge_heads
from fastvit.nn.fused import FusedModule

__all__ = ["FusedGemma4Attention"]


class FusedGemma4Attention(FusedModule, Gemma4Attention):
    """timm ``Gemma4Attention`` running ``fastvit.flash_attention``. Same signature,
    ``forward(x, rope_cos, rope_sin, attn_mask=None)``: x (B, N, dim), rope_cos / rope_sin timm's
    (B, N, head_dim) tables, attn_mask the tower's float (B, 1, 1, N) key-padding mask (0 or -inf);
    returns (B, N, dim) in x's dtype. Calls in training with attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("gemma4_vit_167m")
        >>> fastvit.patch(model)  # each block's Gemma4Attention becomes a FusedGemma4Attention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope_cos, rope_sin, attn_mask=attn_mask)
        if self._fastvit_unfused("timm Gemma4Attention"):
            return super().forward(x, rope_cos, rope_sin, attn_mask=attn_mask)
        batch, tokens, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, tokens, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim))
        v = self.v_norm(self.v_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim))
        q = apply_multidimensional_rope(q, rope_cos, rope_sin, ndim=2, unsqueeze_dim=2)
        k = apply_multidimensional_rope(k, rope_cos, rope_sin, ndim=2, unsqueeze_dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, D) views
        if self.num_kv_groups > 1:  # grouped-query attention: head h reads kv head h // groups, as timm
            k = k.repeat_interleave(self.num_kv_groups, dim=1)
            v = v.repeat_interleave(self.num_kv_groups, dim=1)
        if attn_mask is None:
            out = fastvit.flash_attention(q, k, v, scale=1.0)
        else:
            out = fastvit.flash_attention(q, k, v, scale=1.0, attn_mask=attn_mask)
        return self.proj_drop(self.o_proj(merge_heads(out)))

    def extra_repr(self) -> str:
        heads = f"heads={self.num_heads}" + (f", kv_heads={self.num_kv_heads}" if self.num_kv_groups > 1 else "")
        return f"{heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"
