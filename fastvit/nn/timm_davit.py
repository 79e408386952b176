"""Fused subclasses of timm's DaViT (``davit_*``; ``davit_base_fl`` / ``davit_huge_fl`` are
Florence-2's image encoders), swapped onto a model by ``fastvit.patch``.

DaViT alternates two blocks, each ``cpe1`` (a depthwise-conv position encoding), a pre-norm
attention half, ``cpe2``, then a pre-norm MLP half on the (B, H*W, C) tokens of a (B, C, H, W) map:

- ``SpatialBlock``: window attention (``WindowAttention``: plain multi-head attention within
  ``window_size`` windows, no position bias; the block pads, partitions and reverses). Its
  softmax attention is one ``fastvit.flash_attention`` call over the (B*nW, heads, wh*ww, D)
  windows, views of timm's packed qkv.
- ``ChannelBlock``: channel attention, the channels attending over the tokens as XCiT's
  (``fastvit.nn.timm_xcit``): ``ChannelAttention`` computes softmax((k s)^T v) (C' x C' per head)
  applied to q^T, i.e. attention with k as the queries, v as the keys and q as the values, s =
  C'^-0.5; ``ChannelAttentionV2`` (``channel_attn_v2``, Florence-2) softmax((q s)^T k) applied to
  v^T, s = N^-0.5 (``dynamic_scale``) or C'^-0.5. One ``fastvit.flash_attention`` call over the
  (B, heads, C', N) tensors, whose "head dim" is the token count N, where the kernels take it:
  N <= 256 (DaViT's third and fourth stages at 224 px: 14 x 14, 7 x 7). Longer rows (its first
  two stages; every stage of Florence-2's encoder at 768 px: 192 x 192 ... 24 x 24) run timm's
  own math, which is what the op would fall back to (a C' x C' matrix per head; no copy, no
  warning).
- Both blocks' MLP half ``x + drop_path2(mlp(norm2(x)))`` is one ``fastvit.layernorm_mlp`` call
  (``fastvit.nn.timm_mlp.FusedGammaMlpHalf``); the rest of the block (convs, window partition,
  attention half) runs timm's code. Blocks built with ``ffn=False`` (no MLP) are left alone.

See ``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import davit
from timm.models.davit import ChannelAttention, ChannelAttentionV2, ChannelBlock, SpatialBlock, WindowAttention

import fastvit
from fastvit.kernels.flash_attention import MAX_HEAD_DIM
from fastvit.nn.attention import merge_heads, self_attention, split_packed_qkv, timm_scale
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import PreNormMlpHalf

__all__ = [
    "FusedDaVitChannelAttention", "FusedDaVitChannelAttentionV2", "FusedDaVitChannelBlock", "FusedDaVitSpatialBlock",
    "FusedDaVitWindowAttention",
]  # fmt: skip


class FusedDaVitWindowAttention(FusedModule, WindowAttention):
    """timm DaViT ``WindowAttention`` running ``fastvit.flash_attention`` within each window.

    Same signature, ``forward(x)``: x (B*nW, wh*ww, C) -> (B*nW, wh*ww, C).

    Example:
        >>> model = timm.create_model("davit_tiny")
        >>> fastvit.patch(model)  # stages.*.blocks.*.0.attn -> FusedDaVitWindowAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("softmax",)  # timm's eager path (fused_attn=False) calls it; the op replaces it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():  # a hook on, or a replacement of, softmax: timm's forward
            return super().forward(x)
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, x.shape[-1] // self.num_heads)  # views
        return self.proj(merge_heads(self_attention(q, k, v, scale=timm_scale(self))))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, window={tuple(self.window_size)}, fastvit={self.fastvit_op}"


def _channel_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3C) -> q, k, v (B, heads, C', N): the tokens last, copied once so that the op reads
    its "head dim" (the tokens) with a unit stride (their stride in the projection is 3C)."""
    batch, tokens, width = qkv.shape
    qkv = qkv.reshape(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 4, 1)
    q, k, v = qkv.contiguous().unbind(0)
    return q, k, v


def _beyond_the_kernels(x: torch.Tensor) -> bool:
    """Whether x's (B, N, C) rows are more than the kernels take as the head dim (N > 256). A size
    torch.fx traces (a Proxy) is not: the graph keeps the op, which runs SDPA past 256 itself."""
    tokens = x.shape[1]
    return isinstance(tokens, int) and tokens > MAX_HEAD_DIM


def _merge_channels(out: torch.Tensor) -> torch.Tensor:
    """(B, heads, C', N) -> (B, N, heads*C'), as timm's ``x.transpose(-1, -2)`` then merge."""
    return out.permute(0, 3, 1, 2).flatten(2)


class FusedDaVitChannelAttention(FusedModule, ChannelAttention):
    """timm DaViT ``ChannelAttention`` as one ``fastvit.flash_attention`` call over the channels:
    k as the queries, v as the keys, q as the values (timm: ``softmax((k * scale)^T v) @ q^T``).

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C). The kernels take N <= 256 tokens;
    longer inputs run timm's math.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if _beyond_the_kernels(x) or not self._fastvit_intact():  # rows the kernels do not take; an override
            return super().forward(x)
        q, k, v = _channel_qkv(self.qkv(x), self.num_heads)
        out = fastvit.flash_attention(k, v, q, scale=self.scale)  # (B, H, C', N)
        return self.proj(_merge_channels(out))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, channel attention (channels attend), fastvit={self.fastvit_op}"


class FusedDaVitChannelAttentionV2(FusedModule, ChannelAttentionV2):
    """timm DaViT ``ChannelAttentionV2`` (Florence-2's encoders) as one ``fastvit.flash_attention``
    call over the channels (timm: ``softmax((q * s)^T k) @ v^T``, s = N^-0.5 with
    ``dynamic_scale``, else C'^-0.5).

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C). The kernels take N <= 256 tokens;
    longer inputs run timm's math.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if _beyond_the_kernels(x) or not self._fastvit_intact():  # rows the kernels do not take; an override
            return super().forward(x)
        q, k, v = _channel_qkv(self.qkv(x), self.groups)
        scale = x.shape[1] ** -0.5 if self.dynamic_scale else self.head_dim**-0.5
        return self.proj(_merge_channels(fastvit.flash_attention(q, k, v, scale=scale)))

    def extra_repr(self) -> str:
        scale = "N^-0.5" if self.dynamic_scale else "head_dim^-0.5"
        return f"heads={self.groups}, channel attention (channels attend), scale={scale}, fastvit={self.fastvit_op}"


class _DaVitMlpHalf(PreNormMlpHalf):
    """The DaViT blocks' MLP half on their (B, C, H, W) maps: ``x + drop_path2(mlp(norm2(x)))`` over
    the (B, H*W, C) tokens as one ``fastvit.layernorm_mlp`` call, returned as (B, C, H, W)."""

    def _fastvit_map_mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, H*W, C) with the channels at stride H*W: the op copies it once to read C with a unit
        # stride (timm's LayerNorm on this view makes the same copy)
        tokens = self._fastvit_mlp_half(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).view(batch, channels, height, width)


class FusedDaVitSpatialBlock(_DaVitMlpHalf, SpatialBlock):
    """timm DaViT ``SpatialBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, C, H, W) -> (B, C, H, W)); its window attention is
    ``self.attn`` (fused on its own). In training with MLP dropout > 0 the MLP half runs timm's
    modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be SpatialBlock.forward
            return super().forward(x)
        # timm's attention half, as in SpatialBlock.forward
        B, C, H, W = x.shape
        shortcut = self.cpe1(x).flatten(2).transpose(1, 2)
        x = self.norm1(shortcut).view(B, H, W, C)
        pad_r = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
        pad_b = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, Hp, Wp, _ = x.shape
        windows = davit.window_partition(x, self.window_size).view(-1, self.window_size[0] * self.window_size[1], C)
        windows = self.attn(windows).view(-1, self.window_size[0], self.window_size[1], C)
        x = davit.window_reverse(windows, self.window_size, Hp, Wp)[:, :H, :W, :].contiguous().view(B, H * W, C)
        x = self.cpe2((shortcut + self.drop_path1(x)).transpose(1, 2).view(B, C, H, W))
        return self._fastvit_map_mlp_half(x)


class FusedDaVitChannelBlock(_DaVitMlpHalf, ChannelBlock):
    """timm DaViT ``ChannelBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, C, H, W) -> (B, C, H, W)); its channel attention is
    ``self.attn`` (fused on its own). In training with MLP dropout > 0 the MLP half runs timm's
    modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be ChannelBlock.forward
            return super().forward(x)
        # timm's attention half, as in ChannelBlock.forward
        B, C, H, W = x.shape
        x = self.cpe1(x).flatten(2).transpose(1, 2)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = self.cpe2(x.transpose(1, 2).view(B, C, H, W))
        return self._fastvit_map_mlp_half(x)
