"""Fused subclass of timm's ``AttentionRope`` (``timm.layers.attention``), swapped onto a model by
``fastvit.patch``: the RoPE attention of Eva with ``attn_type='rope'`` (the Perception Encoder
``vit_pe_*``), of NaFlexVit with a ``rope_type``, and of timm's Qwen3-VL and DeepSeek vision towers
(``qwen3_vit_*``, ``deepseek_vit_*``).

The attention is one ``fastvit.rotary_qk`` call (patch rows of q and k rotated in one pass, prefix
tokens copied, timm's fp32 math; ``fastvit.nn.timm_eva.rope_attention``, shared with Eva's) and one
``fastvit.flash_attention`` call. Everything around them is timm's, line for line: the packed or
separate q/k/v projections, ``q_norm`` / ``k_norm``, the ``type_as(v)`` after the rotation, the
grouped-query expansion of k and v (``num_kv_heads``: ``repeat_interleave``, as timm does), the
output norm, the gate and the projection. Importing this module imports timm (a release with
``AttentionRope``).
"""

from __future__ import annotations

import torch
from timm.layers.attention import AttentionRope

from fastvit.nn.attention import mask_with_causal
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_eva import rope_attention

__all__ = ["FusedAttentionRope"]


class FusedAttentionRope(FusedModule, AttentionRope):
    """timm ``AttentionRope`` running ``fastvit.rotary_qk`` and ``fastvit.flash_attention`` (same
    signature, ``forward(x, rope=None, attn_mask=None, is_causal=False)``; x (B, N, C), rope timm's
    [sin, cos] embedding of the N - num_prefix_tokens patch rows); ``attn_mask`` goes to the op's
    ``attn_mask`` (NaFlexVit's key-padding mask). Calls in training with attention dropout > 0 run
    timm's forward.

    Example:
        >>> model = timm.create_model("vit_pe_core_small_patch16_384")
        >>> fastvit.patch(model)  # each block's AttentionRope becomes a FusedAttentionRope
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if mask_with_causal(attn_mask, is_causal) or self._fastvit_unfused("timm AttentionRope"):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:  # (B, N, 3 H D) -> three (B, H, N, D) views
            q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
            k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
            v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        return rope_attention(self, q, k, v, gate, rope, attn_mask, is_causal)

    def extra_repr(self) -> str:
        heads = f"heads={self.num_heads}" + (f", kv_heads={self.num_kv_heads}" if self.num_kv_groups > 1 else "")
        return f"{heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"
