"""Fused subclass of timm's parallel ViT block (``ParallelScalingBlock``: ViT-22B's layout, timm's
``vit_*_xp_*`` and ``vit_pwee_*`` models), swapped onto a model by ``fastvit.patch``.

The block computes its attention and its MLP from one normalised projection, ``in_proj(in_norm(x))``
split into the MLP's hidden pre-activation and q, k, v, and adds both branches' output projections
to the residual stream at once. Its attention becomes one ``fastvit.flash_attention`` call on views
of that projection (qk norm as timm applies it); every module of the block runs as in timm, in
timm's order. The MLP branch shares the block's norm and input projection with the attention, so
it is no LayerNorm+MLP half the op computes: it runs timm's modules (reported). See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import ParallelScalingBlock

from fastvit.nn.attention import mask_with_causal, self_attention, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedParallelScalingBlock"]


class FusedParallelScalingBlock(FusedModule, ParallelScalingBlock):
    """timm ``ParallelScalingBlock`` whose attention runs ``fastvit.flash_attention``.

    Same signature, ``forward(x, attn_mask=None, is_causal=False)``: x (B, N, C) -> (B, N, C). q, k,
    v are (B, heads, N, head_dim) views into the block's ``in_proj`` output (no copies); ``attn_mask``
    (SDPA's convention) goes to the op. Calls in training with attention dropout > 0, or with both a
    mask and ``is_causal`` (timm's SDPA path raises, its eager path drops the mask), run timm's
    forward.

    Example:
        >>> model = timm.create_model("vit_base_patch16_xp_224")
        >>> fastvit.patch(model)  # blocks.* -> FusedParallelScalingBlock (attention)
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if mask_with_causal(attn_mask, is_causal) or self._fastvit_unfused("timm ParallelScalingBlock"):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, C = x.shape
        # the MLP's fc1 and q, k, v: one projection of the normalised tokens, split as views
        y = self.in_proj(self.in_norm(x))
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        # attention on (B, heads, N, head_dim) views, qk norm over each head as timm applies it
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x_attn = self_attention(q, k, v, scale=timm_scale(self), causal=is_causal, attn_mask=attn_mask)
        x_attn = x_attn.transpose(1, 2).reshape(B, N, C)
        # the MLP branch and both output projections, as timm
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"
