"""Fused subclass of timm's SAM / ViTDet attention (``samvit_*``), swapped onto a model by
``fastvit.patch``.

``timm.models.vision_transformer_sam.Attention`` serves both kinds of SAM block: the window blocks,
whose ``Block`` pads the (B, H, W, C) map to a multiple of the window and hands the attention the
windows (B*nW, ws, ws, C) (the padding tokens take part, unmasked, as in SAM), and the global
blocks, which hand it the whole map. The block's partition, padding and unpartition are unchanged;
the attention becomes one ``fastvit.flash_attention`` call. With ``use_rel_pos`` its decomposed
relative position (MViTv2 / SAM) goes to the op's ``rel_pos=(rel_h, rel_w)``: timm's
``get_decomposed_rel_pos_bias`` adds ``rel_h[b, i, j // kw] + rel_w[b, i, j % kw]`` with
``rel_h = einsum(q, Rh)`` over the query's row and ``rel_w = einsum(q, Rw)`` over its column,
exactly the op's convention, so the (N, N) bias is never built: the kernels add it from the two
(B, H, N, ws) tables, and ``rel_pos_h`` / ``rel_pos_w`` learn through the tables' gradients.
With a ``rope`` module, q and k are rotated as timm does. See ``fastvit.nn.fused`` for how the
swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.layers import apply_rot_embed_cat
from timm.models import vision_transformer_sam as sam

import fastvit
from fastvit.nn.attention import decomposed_rel_pos_tables, merge_heads, split_packed_qkv, timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedSamAttention", "decomposed_rel_pos"]


def decomposed_rel_pos(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``get_decomposed_rel_pos_bias`` for self-attention, as the op's two tables.

    Args:
        q: (B, H, N, D) queries, N = h * w in row-major order.
        rel_pos_h, rel_pos_w: the model's (2*h' - 1, D) and (2*w' - 1, D) embeddings (resized
            to the grid by timm's ``get_rel_pos`` when the grid differs from the trained one).
        size: (h, w), the query grid, which is also the key grid.

    Returns:
        rel_h (B, H, N, h) and rel_w (B, H, N, w): the bias of query i and key j is
        ``rel_h[..., i, j // w] + rel_w[..., i, j % w]``.
    """
    h, w = size
    r_h = sam.get_rel_pos(h, h, rel_pos_h)  # (h, h, D): [query row, key row]
    r_w = sam.get_rel_pos(w, w, rel_pos_w)  # (w, w, D): [query column, key column]
    return decomposed_rel_pos_tables(q, r_h, r_w, size)


class FusedSamAttention(FusedModule, sam.Attention):
    """timm SAM ``Attention`` running ``fastvit.flash_attention`` (decomposed rel-pos as ``rel_pos``).

    Same signature, ``forward(x)`` with x (B, H, W, C) (windows or the whole map), returns
    (B, H, W, C). q, k, v are views into the packed ``qkv`` output; ``q_norm`` / ``k_norm`` and the
    rotary embedding apply as in timm. Calls in training with attention dropout > 0 run timm's
    forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm SAM Attention"):
            return super().forward(x)
        batch, height, width, channels = x.shape  # NHWC
        tokens = x.reshape(batch, height * width, channels)  # NHWC -> NLC
        q, k, v = split_packed_qkv(self.qkv(tokens), self.num_heads, self.head_dim)  # (B, H, N, D) views
        q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rel_pos:
            rel_pos = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (height, width))
            out = fastvit.flash_attention(q, k, v, scale=timm_scale(self), rel_pos=rel_pos)
        else:
            if self.rope is not None:
                rope = self.rope.get_embed()
                q = apply_rot_embed_cat(q, rope).type_as(v)
                k = apply_rot_embed_cat(k, rope).type_as(v)
            out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))
        x = self.proj_drop(self.proj(merge_heads(out)))
        return x.view(batch, height, width, -1)

    def extra_repr(self) -> str:
        kind = "rel_pos" if self.use_rel_pos else "rope" if self.rope is not None else "plain"
        return f"heads={self.num_heads}, head_dim={self.head_dim}, {kind}, fastvit={self.fastvit_op}"
