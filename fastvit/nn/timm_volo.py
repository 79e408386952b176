"""Fused subclasses of timm's VOLO modules (``volo_d1`` ... ``volo_d5``), swapped onto a model by
``fastvit.patch``.

VOLO's first stage is outlooker blocks, the rest transformer blocks over (B, H, W, C) maps, then
class-attention blocks over (B, 1 + N, C) tokens:

- ``Attention`` (the transformer blocks' self-attention over the H*W tokens): one
  ``fastvit.flash_attention`` call on views of the packed qkv projection;
- ``ClassAttention`` (the class token, query, against every token, keys and values; heads of
  ``head_dim``, possibly not C / heads): one call with one query;
- the MLP half ``x + drop_path2(mlp(norm2(x)))`` of ``Outlooker``, ``Transformer`` (over the
  (B, H, W, C) map) and ``ClassBlock`` (over the class token): one ``fastvit.layernorm_mlp`` call
  each (``fastvit.nn.timm_mlp.PreNormMlpHalf``: drop path as ``sample_scale``).

``OutlookAttention`` (each position's k x k neighbourhood mixed by weights predicted from that
position alone: no query-key product, no softmax over keys) and the convolutional stem run timm's
modules and are reported. Calls in training with attention dropout > 0 (or MLP dropout, for the
MLP halves) run timm's forward. See ``fastvit.nn.fused`` for how the swap works. Importing this
module imports timm.
"""

from __future__ import annotations

import torch
from timm.models import volo

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv, timm_scale
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import PreNormMlpHalf

__all__ = [
    "FusedVoloAttention", "FusedVoloClassAttention", "FusedVoloClassBlock", "FusedVoloOutlooker",
    "FusedVoloTransformer",
]  # fmt: skip


class FusedVoloAttention(FusedModule, volo.Attention):
    """timm VOLO ``Attention`` running one ``fastvit.flash_attention`` call over the map's tokens.

    Same signature, ``forward(x)``: x (B, H, W, C) -> (B, H, W, C). Calls in training with attention
    dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("volo_d1_224")
        >>> fastvit.patch(model)  # network.*.*.attn -> FusedVoloAttention, post_network.* ...
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm VOLO Attention"):
            return super().forward(x)
        _, H, W, C = x.shape
        # (B, H, W, 3C) -> q, k, v (B, heads, H*W, D): views of the projection, unit stride in D
        q, k, v = split_packed_qkv(self.qkv(x).flatten(1, 2), self.num_heads, C // self.num_heads)
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B, heads, H*W, D)
        x = merge_heads(out).unflatten(1, (H, W))  # a view where the kernels ran (README)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"


class FusedVoloClassAttention(FusedModule, volo.ClassAttention):
    """timm VOLO ``ClassAttention`` running one ``fastvit.flash_attention`` call with the class token
    as the only query.

    Same signature, ``forward(x)``: x (B, N, C), class token first -> the class token's update
    (B, 1, C). Calls in training with attention dropout > 0 run timm's forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm VOLO ClassAttention"):
            return super().forward(x)
        B, N, _ = x.shape
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (B, heads, N, head_dim) views
        q = self.q(x[:, :1, :]).reshape(B, self.num_heads, 1, self.head_dim)
        out = fastvit.flash_attention(q, k, v, scale=self.scale)  # (B, heads, 1, head_dim)
        cls_embed = out.transpose(1, 2).reshape(B, 1, self.head_dim * self.num_heads)
        return self.proj_drop(self.proj(cls_embed))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, class token query, fastvit={self.fastvit_op}"


class _VoloPreNormBlock(PreNormMlpHalf):
    """The forward VOLO's ``Outlooker`` and ``Transformer`` share, ``x + drop_path1(attn(norm1(x)))``
    as timm's, then the MLP half as one ``fastvit.layernorm_mlp`` call: x (B, H, W, C) -> (B, H, W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return self._fastvit_mlp_half(x)


class FusedVoloOutlooker(_VoloPreNormBlock, volo.Outlooker):
    """timm VOLO ``Outlooker`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same signature,
    ``forward(x)``: x (B, H, W, C) -> (B, H, W, C)); its outlook attention runs timm's."""


class FusedVoloTransformer(_VoloPreNormBlock, volo.Transformer):
    """timm VOLO ``Transformer`` block whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, H, W, C) -> (B, H, W, C)); its attention is fused on its own."""


class FusedVoloClassBlock(PreNormMlpHalf, volo.ClassBlock):
    """timm VOLO ``ClassBlock`` whose MLP half, over the class token, is one ``fastvit.layernorm_mlp``
    call (same signature, ``forward(x)``: x (B, 1 + N, C) -> (B, 1 + N, C), the class token updated)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        cls_embed = x[:, :1]
        cls_embed = cls_embed + self.drop_path1(self.attn(self.norm1(x)))
        return torch.cat([self._fastvit_mlp_half(cls_embed), x[:, 1:]], dim=1)
