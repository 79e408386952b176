"""Fused subclass of timm's ``EvaAttention`` (EVA02, the ``vit_*_rope_*`` ViTs, timm's DINOv3),
swapped onto a model by ``fastvit.patch``.

The attention is one ``fastvit.flash_attention`` call. Everything around it is timm's, line for
line: the packed or separate q/k/v projections (with EVA's zero k bias), ``q_norm`` / ``k_norm``,
the rotary position embedding applied to the patch tokens only (prefix tokens stay unrotated, in
timm's dtype handling), the output norm, the gate and the projection. RoPE itself runs as timm
computes it (a fused rotation is issue 14's next step). Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import EvaAttention

from fastvit.nn.attention import biased_qkv, merge_heads, self_attention
from fastvit.nn.fused import FusedModule

__all__ = ["FusedEvaAttention"]


class FusedEvaAttention(FusedModule, EvaAttention):
    """timm ``EvaAttention`` running ``fastvit.flash_attention`` (same signature,
    ``forward(x, rope=None, attn_mask=None, is_causal=False)``); ``attn_mask`` goes to the op's
    ``attn_mask``. Calls in training with attention dropout > 0 run timm's forward."""

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
        if self._fastvit_unfused(self.attn_drop.p, "timm EvaAttention"):
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        heads = (self.num_heads, -1)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:  # timm's packed projection, EVA's zero k bias included
            qkv = biased_qkv(x, self.qkv, self.q_bias, self.k_bias, self.v_bias, self.qkv_bias_separate)
            q, k, v = qkv.unflatten(-1, (3, *heads)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views
        else:
            q, k, v = (proj(x).unflatten(-1, heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # patch tokens only, as timm
            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        out = self.norm(merge_heads(self_attention(q, k, v, scale=self.scale, causal=is_causal, attn_mask=attn_mask)))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"
