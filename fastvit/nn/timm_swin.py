"""Fused subclasses of timm's Swin window attentions (``swin_*``, ``swinv2_*`` and ``swinv2_cr_*``),
swapped onto a model by ``fastvit.patch``.

timm's Swin blocks keep their window math: the cyclic shift, the padding to a multiple of the
window, the window partition and its reverse, and the shifted-window mask (-100 between regions,
built by the block) all stay in the block. The block hands its ``WindowAttention`` the windows,
(B*nW, N, C) with N = wh * ww, and the (nW, N, N) mask or None; only that module changes. Its
softmax attention becomes one ``fastvit.flash_attention`` call with the relative-position bias
(V1's table, V2's continuous-position-bias MLP, ``16 * sigmoid``) plus the mask as ``attn_mask``,
so the table (or the CPB MLP) learns through the op's mask gradient. V2's cosine attention is exact
attention on normalised q pre-scaled by the per-head ``exp(clamp(logit_scale, max=log 100))`` and
normalised k, with ``scale=1``. Swin V2-CR's ``WindowMultiHeadAttention`` (``swinv2_cr_*``, timm's
reimplementation of V2) is the same cosine attention with its own position bias, the
log-spaced-coordinate ``meta_mlp`` added as it is (no sigmoid), called as a module so that its
dropout (``drop=(0.125, 0)``, active in training) draws as in timm.

Layout. Without a mask (W-MSA, or a shift the block dropped) q, k, v are views of the packed qkv
output, (B*nW, H, N, D), and the bias (1, H, N, N) is read through stride 0 for every window. With
the mask (SW-MSA) the bias depends on the window, and the windows of one image are consecutive in
the batch, which no stride can express; so windows become heads: q, k, v are copied once into
(B, nW*H, N, D) (O(tokens * C), like the qkv projection itself) and the bias plus the mask is one
(1, nW*H, N, N) tensor, the size of one image's scores, read for every image (timm's fused path
materialises (B*nW, H, N, N)). See ``fastvit.nn.fused`` for how the swap works. Importing this
module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention as SwinV2CrWindowAttention

from fastvit.nn.attention import (
    biased_qkv,
    cosine_qk,
    split_packed_qkv,
    timm_scale,
    windowed_attention,
)
from fastvit.nn.fused import FusedModule

__all__ = ["FusedSwinV2CrWindowAttention", "FusedSwinV2WindowAttention", "FusedSwinWindowAttention"]


class FusedSwinWindowAttention(FusedModule, SwinWindowAttention):
    """timm Swin V1 ``WindowAttention`` running ``fastvit.flash_attention`` with the
    relative-position bias (and the block's shifted-window mask) as ``attn_mask``.

    Same signature, ``forward(x, mask=None)``: x (B*nW, N, C), mask (nW, N, N) or None. Calls in
    training with attention dropout > 0 run timm's forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop", "softmax")  # timm's unfused path calls them; the op replaces both

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, mask=mask)
        if self._fastvit_unfused("timm Swin WindowAttention"):
            return super().forward(x, mask=mask)
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, head_dim)  # (B*nW, H, N, D) views
        x = windowed_attention(q, k, v, self._get_rel_pos_bias(), mask, timm_scale(self))
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, window={tuple(self.window_size)}, fastvit={self.fastvit_op}"


class FusedSwinV2WindowAttention(FusedModule, SwinV2WindowAttention):
    """timm Swin V2 ``WindowAttention``: cosine attention as one ``fastvit.flash_attention`` call on
    normalised q times the per-head logit scale and normalised k (``scale=1``), with the continuous
    position bias (``16 * sigmoid(cpb_mlp(...))``) and the block's mask as ``attn_mask``.

    Same signature, ``forward(x, mask=None)``. ``cpb_mlp`` is called as a module. Calls in
    training with attention dropout > 0 run timm's forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop", "softmax")  # the op replaces timm's softmax and attention dropout

    def _fastvit_bias(self) -> torch.Tensor:
        """timm's continuous position bias, (1, H, N, N)."""
        tokens = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)  # N, N, H
        return (16 * torch.sigmoid(bias.permute(2, 0, 1))).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, mask=mask)
        if self._fastvit_unfused("timm Swin V2 WindowAttention"):
            return super().forward(x, mask=mask)
        qkv = biased_qkv(x, self.qkv, self.q_bias, self.k_bias, self.v_bias, self.qkv_bias_separate)
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        q, k, v = split_packed_qkv(qkv, self.num_heads, head_dim)  # (B*nW, H, N, D) views
        q, k = cosine_qk(q, k, self.logit_scale)
        x = windowed_attention(q, k, v, self._fastvit_bias(), mask, 1.0)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.num_heads}, window={tuple(self.window_size)}, cosine, "
            f"fastvit={self.fastvit_op}"
        )


class FusedSwinV2CrWindowAttention(FusedModule, SwinV2CrWindowAttention):
    """timm Swin V2-CR ``WindowMultiHeadAttention``: cosine attention as one
    ``fastvit.flash_attention`` call on normalised q times the per-head logit scale and normalised
    k (``scale=1``), with the meta-network position bias (``_relative_positional_encodings()``,
    (1, H, N, N)) and the block's shifted-window mask as ``attn_mask``.

    Same signature, ``forward(x, mask=None)``: x (B*nW, N, C), mask (nW, N, N) or None. The
    ``meta_mlp`` runs as a module (its dropout draws in training as in timm) and learns through the
    op's mask gradient. Calls in training with attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("swinv2_cr_tiny_224")
        >>> fastvit.patch(model)  # stages.*.blocks.*.attn -> FusedSwinV2CrWindowAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # the op replaces timm's softmax and attention dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, mask=mask)
        if self._fastvit_unfused("timm Swin V2-CR WindowMultiHeadAttention"):
            return super().forward(x, mask=mask)
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, x.shape[-1] // self.num_heads)  # (B*nW, H, N, D)
        q, k = cosine_qk(q, k, self.logit_scale)
        x = windowed_attention(q, k, v, self._relative_positional_encodings(), mask, 1.0)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (
            f"dim={self.in_features}, heads={self.num_heads}, window={tuple(self.window_size)}, cosine, "
            f"fastvit={self.fastvit_op}"
        )
