"""Fused subclass of timm's ``AttentionRope`` (``timm.layers.attention``), swapped onto a model by
``fastvit.patch``: the RoPE attention of Eva with ``attn_type='rope'`` (the Perception Encoder
``vit_pe_*``), of NaFlexVit with a ``rope_type``, and of timm's Qwen3-VL and DeepSeek vision towers
(``qwen3_vit_*``, ``deepseek_vit_*``).

The attention is one ``fastvit.rotary_qk`` call (patch rows of q and k rotated in one pass, prefix
tokens copied, timm's fp32 math; ``fastvit.nn.timm_eva.RopeAttentionForward``, shared with Eva's) and one
``fastvit.flash_attention`` call. Everything around them is timm's, line for line: the packed or
separate q/k/v projections, ``q_norm`` / ``k_norm``, the ``type_as(v)`` after the rotation, the
grouped-query expansion of k and v (``num_kv_heads``: ``repeat_interleave``, as timm does), the
output norm, the gate and the projection. Importing this module imports timm (a release with
``AttentionRope``).
"""

from __future__ import annotations

import torch
from timm.layers.attention import AttentionRope

from fastvit.nn.timm_eva import RopeAttentionForward

__all__ = ["FusedAttentionRope"]


class FusedAttentionRope(RopeAttentionForward, AttentionRope):
    """timm ``AttentionRope`` running ``fastvit.rotary_qk`` and ``fastvit.flash_attention`` (same
    signature, ``forward(x, rope=None, attn_mask=None, is_causal=False)``; x (B, N, C), rope timm's
    [sin, cos] embedding of the N - num_prefix_tokens patch rows); ``attn_mask`` goes to the op's
    ``attn_mask`` (NaFlexVit's key-padding mask). Calls in training with attention dropout > 0 run
    timm's forward.

    Example:
        >>> model = timm.create_model("vit_pe_core_small_patch16_384")
        >>> fastvit.patch(model)  # each block's AttentionRope becomes a FusedAttentionRope
    """

    def _fastvit_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is not None:  # (B, N, 3 H D) -> three (B, H, N, D) views
            q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        return q, k, v
