"""Fused subclasses of timm's parallel ViT blocks (``ParallelScalingBlock``: ViT-22B's layout, timm's
``vit_*_xp_*`` and ``vit_pwee_*`` models; ``DiffParallelScalingBlock``, the same with differential
attention: ``vit_dpwee_*``), swapped onto a model by ``fastvit.patch``.

The block computes its attention and its MLP from one normalised projection, ``in_proj(in_norm(x))``
split into the MLP's hidden pre-activation and q, k, v, and adds both branches' output projections
to the residual stream at once. Its attention becomes one ``fastvit.flash_attention`` call on views
of that projection (qk norm as timm applies it); every module of the block runs as in timm, in
timm's order. The MLP branch shares the block's norm and input projection with the attention, so
it is no LayerNorm+MLP half the op computes: it runs timm's modules (reported). Differential
attention, ``softmax(q1 k1^T) v - lambda * softmax(q2 k2^T) v`` with q / k heads half as wide as v's,
is two op calls, q and k zero-padded to v's width (zero columns add nothing to q.k; the scale is the
unpadded width's). See ``fastvit.nn.fused`` for how the swap works. Importing this module imports
timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import DiffParallelScalingBlock, ParallelScalingBlock

from fastvit.nn.attention import mask_refused, mask_with_causal, self_attention, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedDiffParallelScalingBlock", "FusedParallelScalingBlock"]


class _ParallelBlockForward(FusedModule):
    """The forward the parallel blocks share, timm's line for line but for the attention
    (``_fastvit_attention``): ``x + drop_path(ls(out_proj([attention(q, k, v); act(x_mlp)])))`` with
    ``x_mlp, q, k, v`` split from ``in_proj(in_norm(x))``. Same signature as timm's,
    ``forward(x, attn_mask=None, is_causal=False)``: x (B, N, C) -> (B, N, C). Calls in training
    with attention dropout, or with both a mask and ``is_causal`` (timm's SDPA path raises, its eager
    path drops the mask), run timm's forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def _fastvit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        """The attention branch from the (B, N, C) slices of ``in_proj``'s output: (B, N, C)."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        name = type(self).fastvit_original().__name__
        refused = mask_with_causal(attn_mask, is_causal) or mask_refused(attn_mask, x, self.num_heads)
        if refused or self._fastvit_unfused(f"timm {name}"):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        # the MLP's fc1 and q, k, v: one projection of the normalised tokens, split as views
        y = self.in_proj(self.in_norm(x))
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        x_attn = self._fastvit_attention(q, k, v, attn_mask, is_causal)
        # the MLP branch and the output projection(s), as timm
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))


class FusedParallelScalingBlock(_ParallelBlockForward, ParallelScalingBlock):
    """timm ``ParallelScalingBlock`` whose attention runs ``fastvit.flash_attention``
    (``_ParallelBlockForward``): q, k, v are (B, heads, N, head_dim) views into the block's ``in_proj``
    output (no copies); ``attn_mask`` (SDPA's convention) goes to the op.

    Example:
        >>> model = timm.create_model("vit_base_patch16_xp_224")
        >>> fastvit.patch(model)  # blocks.* -> FusedParallelScalingBlock (attention)
    """

    def _fastvit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        B, N, C = q.shape
        # (B, heads, N, head_dim) views, qk norm over each head as timm applies it
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        x_attn = self_attention(q, k, v, scale=timm_scale(self), causal=is_causal, attn_mask=attn_mask)
        return x_attn.transpose(1, 2).reshape(B, N, C)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


class FusedDiffParallelScalingBlock(_ParallelBlockForward, DiffParallelScalingBlock):
    """timm ``DiffParallelScalingBlock`` whose differential attention runs two
    ``fastvit.flash_attention`` calls (``_ParallelBlockForward``): each softmax of the pair is one
    call on q_i, k_i (B, heads, N, head_dim), zero-padded to v's 2 * head_dim, and v (B, heads, N,
    2 * head_dim), a view of the block's ``in_proj`` output; the difference, its sub-norm and scale
    are timm's. Its attention dropout is timm's ``attn_drop_p`` on its SDPA path, ``attn_drop`` on
    its eager path.

    Example:
        >>> model = timm.create_model("vit_dpwee_patch16_reg1_gap_256")
        >>> fastvit.patch(model)  # blocks.* -> FusedDiffParallelScalingBlock (attention)
    """

    def _fastvit_timm_attention_dropout(self, sdpa_dropout: bool) -> float:
        """timm's SDPA path drops with the float ``attn_drop_p`` while the block trains, its eager
        path with the ``attn_drop`` module while that trains."""
        if self.fused_attn:
            return self.attn_drop_p if self.training else 0.0
        return self.attn_drop.p if self.attn_drop.training else 0.0

    def _fastvit_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        B, N, C = q.shape
        # twice the heads at half the width for q / k, v at the full width, as timm lays them out
        q = q.reshape(B, N, 2 * self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, N, 2 * self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        lambda_full = self._compute_lambda().type_as(q)
        q1, q2 = q.reshape(B, self.num_heads, 2, N, self.head_dim).unbind(2)
        k1, k2 = k.reshape(B, self.num_heads, 2, N, self.head_dim).unbind(2)
        # one call per softmax: q / k zero-padded to v's width, the scale the unpadded width's
        pad, scale = (0, self.head_dim), timm_scale(self, self.head_dim)
        attn1 = self_attention(F.pad(q1, pad), F.pad(k1, pad), v, scale=scale, causal=is_causal, attn_mask=attn_mask)
        attn2 = self_attention(F.pad(q2, pad), F.pad(k2, pad), v, scale=scale, causal=is_causal, attn_mask=attn_mask)
        x_attn = self.sub_norm(attn1 - lambda_full * attn2)
        x_attn = x_attn * (1 - self.lambda_init)
        return x_attn.transpose(1, 2).reshape(B, N, C)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, head_dim={self.head_dim} (q, k; v: {2 * self.head_dim}), differential, "
                f"fastvit={self.fastvit_op}")
