"""Fused subclass of timm's MViTv2 pooling attention (``mvitv2_*``), swapped onto a model by
``fastvit.patch``.

``timm.models.mvitv2.MultiScaleAttention`` projects q, k, v from the (H, W) map, then pools each
with its own strided depthwise conv (or max / avg pool) + LayerNorm, so queries and keys lie on
different grids (q_h x q_w, k_h x k_w; the class token, if any, is carried past the pooling). All
of that stays timm's. The softmax attention becomes one ``fastvit.flash_attention`` call and the
residual pooling (``x = attn + q``) follows it, as in timm.

Relative position (``rel_pos_type="spatial"``). timm's ``cal_rel_pos_type`` adds
``rel_h[b, h, i, j // k_w] + rel_w[b, h, i, j % k_w]`` to the scores of patch query i and patch
key j, with ``rel_h = einsum(q, Rh)`` over the query's row, ``Rh = rel_pos_h[dist_h]`` and dist_h
the row distance rescaled by the grids' size ratio (``pooled_rel_pos``): the op's ``rel_pos``
convention, so the kernels add the bias from the (B, H, N, k_h) and (B, H, N, k_w) tables, never
building (N, M), and ``rel_pos_h`` / ``rel_pos_w`` learn through the tables' gradients. With a
class token (the ``*_cls`` models) the class token's row and column get no bias: the keys are laid
out on a (k_h + 1) x k_w grid whose first row holds the class token and k_w - 1 masked-out zero
keys (``class_token_grid``); its row's rel_h entry is -rel_w[..., 0], so the class token's bias
cancels to 0 (to fp32 rounding), and the class token's query row gets zero tables.

``MultiScaleAttentionPoolFirst`` (``pool_first=True``) is left alone: in timm 1.0.31 its forward
multiplies q by an untransposed k and fails, so there is no result to match.

``MultiScaleBlock``'s MLP half, ``x + drop_path2(mlp(norm2(x)))``, is one ``fastvit.layernorm_mlp``
call (``fastvit.nn.timm_mlp.PreNormMlpHalf``) where its residual is x itself: with the default
``expand_attn=True`` every block (the attention changes the width). Blocks whose MLP widens the
tokens (``expand_attn=False`` at a stage change: the residual is ``shortcut_proj_mlp(norm2(x))``)
run timm's half and are reported. See ``fastvit.nn.fused`` for how the swap works. Importing this
module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_notrace_function
from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock, reshape_post_pool, reshape_pre_pool

import fastvit
from fastvit.nn.attention import merge_heads
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import PreNormMlpHalf

__all__ = ["FusedMultiScaleAttention", "FusedMultiScaleBlock", "class_token_grid", "pooled_rel_pos"]


@register_notrace_function
def _post_pool(t: torch.Tensor, num_heads: int, cls_tok: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
    """timm's ``reshape_post_pool`` with a unit stride in D (the op needs it): the pooled map comes
    back as a transposed view, copied here (timm's LayerNorm after it copies it too)."""
    t, size = reshape_post_pool(t, num_heads, cls_tok)
    return t.contiguous(), size


def _grid_distance(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """timm's ``cal_rel_pos_type`` index along one axis: (q_len, k_len) int64 rows of the
    ``rel_pos`` table, the distance between query and key cells rescaled to the finer grid
    (computed as timm does, in float, then truncated)."""
    q_ratio = max(k_len / q_len, 1.0)
    k_ratio = max(q_len / k_len, 1.0)
    dist = (
        torch.arange(q_len, device=device, dtype=torch.long).unsqueeze(-1) * q_ratio
        - torch.arange(k_len, device=device, dtype=torch.long).unsqueeze(0) * k_ratio
    )
    dist += (k_len - 1) * k_ratio
    return dist.long()


@register_notrace_function  # an FX leaf in timm's feature extraction, as timm's cal_rel_pos_type
def pooled_rel_pos(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: list[int],
    k_size: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's MViTv2 ``cal_rel_pos_type`` bias as the op's two tables (an FX leaf: the sizes typed as
    timm's pooling gives them, lists, for TorchScript compiling an FX graph that calls it).

    Args:
        q: (B, H, N, D) patch queries (no class token), N = q_h * q_w in row-major order.
        rel_pos_h, rel_pos_w: the model's (L, D) embeddings, indexed by the rescaled distance.
        q_size: (q_h, q_w), the query grid.
        k_size: (k_h, k_w), the key grid (pooled by another stride than the queries').

    Returns:
        rel_h (B, H, N, k_h) and rel_w (B, H, N, k_w): the bias of query i and key j is
        ``rel_h[..., i, j // k_w] + rel_w[..., i, j % k_w]``.
    """
    q_h, q_w = q_size[0], q_size[1]
    k_h, k_w = k_size[0], k_size[1]
    r_h = rel_pos_h[_grid_distance(q_h, k_h, q.device)]  # (q_h, k_h, D): [query row, key row]
    r_w = rel_pos_w[_grid_distance(q_w, k_w, q.device)]  # (q_w, k_w, D): [query column, key column]
    grid_q = q.unflatten(2, (q_h, q_w))  # (B, H, q_h, q_w, D)
    rel_h = torch.einsum("byhwc,hkc->byhwk", grid_q, r_h).flatten(2, 3)
    rel_w = torch.einsum("byhwc,wkc->byhwk", grid_q, r_w).flatten(2, 3)
    return rel_h, rel_w


@register_notrace_function
def class_token_grid(
    k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys with a class token on a grid, for the op's ``rel_pos``; the class token unbiased.

    Args:
        k, v: (B, H, 1 + k_h * k_w, D), the class token first.
        rel_h, rel_w: (B, H, N, k_h) and (B, H, N, k_w) of the N patch queries (``pooled_rel_pos``).

    Returns:
        k, v (B, H, (k_h + 1) * k_w, D): row 0 of the key grid is the class token then k_w - 1
        zero keys, rows 1.. the patches; rel_h (B, H, 1 + N, k_h + 1) and rel_w (B, H, 1 + N, k_w),
        zero for the class token's query row, and rel_h[..., 0] = -rel_w[..., 0]
        so that the class token's key gets rel_h + rel_w = 0; and the bool mask (M,) that hides the
        zero keys (None when k_w is 1: there are none).
    """
    k_w = rel_w.shape[-1]
    pad = (0, 0, k_w - 1, 0)  # k_w - 1 zero keys before the patches
    k = torch.cat((k[:, :, :1], F.pad(k[:, :, 1:], pad)), dim=2)
    v = torch.cat((v[:, :, :1], F.pad(v[:, :, 1:], pad)), dim=2)
    rel_h = torch.cat((-rel_w[..., :1], rel_h), dim=-1)  # key row 0 cancels rel_w's column 0
    rel_h, rel_w = (F.pad(t, (0, 0, 1, 0)) for t in (rel_h, rel_w))  # the class token's query row: 0
    mask = None
    if k_w > 1:
        mask = torch.ones(k.shape[2], dtype=torch.bool, device=k.device)
        mask[1:k_w] = False
    return k, v, rel_h, rel_w, mask


class FusedMultiScaleAttention(FusedModule, MultiScaleAttention):
    """timm MViTv2 ``MultiScaleAttention`` (pooled q / k / v, decomposed relative position,
    residual pooling, with or without a class token) running ``fastvit.flash_attention``. Same
    signature, ``forward(x, feat_size)`` with x (B, N, dim) and feat_size the (H, W) of its patch
    tokens; returns ((B, N', dim_out), the pooled query grid)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, feat_size)
        if not self._fastvit_intact():
            return super().forward(x, feat_size)
        batch, tokens = x.shape[0], x.shape[1]
        # (B, N, 3*dim_out) -> (3, B, H, N, D), views
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, q_size = self._pool(q, feat_size, self.pool_q, self.norm_q)
        k, k_size = self._pool(k, feat_size, self.pool_k, self.norm_k)
        v, _ = self._pool(v, feat_size, self.pool_v, self.norm_v)
        if self.rel_pos_type == "spatial":
            prefix = int(self.has_cls_token)
            rel_h, rel_w = pooled_rel_pos(q[:, :, prefix:], self.rel_pos_h, self.rel_pos_w, q_size, k_size)
            if self.has_cls_token:
                k, v, rel_h, rel_w, mask = class_token_grid(k, v, rel_h, rel_w)
                out = fastvit.flash_attention(q, k, v, scale=self.scale, attn_mask=mask, rel_pos=(rel_h, rel_w))
            else:
                out = fastvit.flash_attention(q, k, v, scale=self.scale, rel_pos=(rel_h, rel_w))
        else:
            out = fastvit.flash_attention(q, k, v, scale=self.scale)
        if self.residual_pooling:
            out = out + q
        return self.proj(merge_heads(out)), q_size

    def _pool(
        self, t: torch.Tensor, feat_size: list[int], pool: nn.Module | None, norm: nn.Module | None
    ) -> tuple[torch.Tensor, list[int]]:
        """timm's pooling of q, k or v (B, H, N, D): pool on the (H, W) map, class token carried
        past it, then the norm. Returns the pooled tensor (unit stride in D, as the op needs) and
        its grid."""
        size = feat_size
        if pool is not None:
            t, cls_tok = reshape_pre_pool(t, feat_size, self.has_cls_token)
            t, size = _post_pool(pool(t), self.num_heads, cls_tok)
        if norm is not None:
            t = norm(t)
        return t, size

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, rel_pos={self.rel_pos_type}, "
            f"residual_pooling={self.residual_pooling}, fastvit={self.fastvit_op}"
        )


class FusedMultiScaleBlock(PreNormMlpHalf, MultiScaleBlock):
    """timm MViTv2 ``MultiScaleBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x, feat_size)``: x (B, N, C) -> ((B, N', C'), feat_size')); its attention
    half (the residual projected and pooled at a stage change) runs as timm's, the attention fused
    on its own. A block with ``shortcut_proj_mlp`` runs timm's MLP half."""

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module (the residual projected where the MLP widens)."""
        x_norm = self.norm2(x)
        x_shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return x_shortcut + self.drop_path2(self.mlp(x_norm))

    def forward(self, x: torch.Tensor, feat_size: list[int]) -> tuple[torch.Tensor, list[int]]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, feat_size)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, feat_size)
        # timm's attention half, as in MultiScaleBlock.forward
        x_norm = self.norm1(x)
        x_shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        x_shortcut = self._shortcut_pool(x_shortcut, feat_size)
        x, feat_size_new = self.attn(x_norm, feat_size)
        x = x_shortcut + self.drop_path1(x)
        if self.shortcut_proj_mlp is not None:  # the residual is not x: not the op's half
            return self._fastvit_original_half(x), feat_size_new
        return self._fastvit_mlp_half(x), feat_size_new
