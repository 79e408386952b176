"""Fused subclasses of timm's Twins (``twins_svt_*``, ``twins_pcpvt_*``), swapped onto a model by
``fastvit.patch``.

Twins' blocks are timm's pre-norm ``x + drop_path1(attn(norm1(x), size))`` then
``x + drop_path2(mlp(norm2(x)))`` with one of three attentions:

- ``LocallyGroupedAttn`` (SVT's LSA): attention within ``ws x ws`` groups of the (H, W) map,
  zero-padded to a multiple of ``ws`` (the padded tokens are attended to, as in timm). The
  (B, groups, heads, ws*ws, D) q, k, v are views of timm's packed qkv whose batch and group axes
  merge, so all groups of all images are one ``fastvit.flash_attention`` call.
- ``GlobalSubSampleAttn`` (SVT's GSA, PCPVT's attention): the queries from all N tokens, the keys
  and values from a map reduced by a strided ``sr`` conv + LayerNorm (``sr_ratio`` > 1), run as
  timm's modules; one cross-attention call (N queries, M keys).
- timm's ``Attention`` where ``ws`` is None (fused on its own: ``fastvit.nn.timm_vit``).

The blocks' MLP half is one ``fastvit.layernorm_mlp`` call (``fastvit.nn.timm_mlp``). Calls in
training with attention dropout > 0 run timm's attention forward, with MLP dropout timm's MLP
modules. See ``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn

import fastvit
from fastvit.nn.attention import merge_heads, timm_scale
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import PreNormMlpHalf

__all__ = ["FusedGlobalSubSampleAttn", "FusedLocallyGroupedAttn", "FusedTwinsBlock"]


class FusedLocallyGroupedAttn(FusedModule, LocallyGroupedAttn):
    """timm Twins ``LocallyGroupedAttn`` running one ``fastvit.flash_attention`` call over every
    ``ws x ws`` group of every image.

    Same signature, ``forward(x, size)``: x (B, N, C) with N = H * W for ``size`` (H, W); returns
    (B, N, C).

    Example:
        >>> model = timm.create_model("twins_svt_small")
        >>> fastvit.patch(model)  # blocks.*.0.attn -> FusedLocallyGroupedAttn
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, size)
        if self._fastvit_unfused("timm Twins LocallyGroupedAttn"):
            return super().forward(x, size)
        # timm's grouping: pad the map to multiples of ws, (B, H/ws, ws, W/ws, ws, C) with the group
        # axes together
        B, N, C = x.shape
        H, W = size
        ws, heads = self.ws, self.num_heads
        x = x.view(B, H, W, C)
        pad_r = (ws - W % ws) % ws
        pad_b = (ws - H % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, Hp, Wp, _ = x.shape
        _h, _w = Hp // ws, Wp // ws
        x = x.reshape(B, _h, ws, _w, ws, C).transpose(2, 3)
        # (B, groups, ws*ws, 3, heads, D) -> (3, B*groups, heads, ws*ws, D): views of the projection
        qkv = self.qkv(x).reshape(B * _h * _w, ws * ws, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = merge_heads(fastvit.flash_attention(q, k, v, scale=timm_scale(self)))  # (B*groups, ws*ws, C)
        # timm's ungrouping
        x = out.reshape(B, _h, _w, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if pad_r > 0 or pad_b > 0:
            x = x[:, :H, :W, :].contiguous()
        return self.proj_drop(self.proj(x.reshape(B, N, C)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, ws={self.ws}, fastvit={self.fastvit_op}"


class FusedGlobalSubSampleAttn(FusedModule, GlobalSubSampleAttn):
    """timm Twins ``GlobalSubSampleAttn``: N queries attend to the M tokens of the ``sr``-reduced
    map in one ``fastvit.flash_attention`` call.

    Same signature, ``forward(x, size)``: x (B, N, C) with N = H * W for ``size`` (H, W); returns
    (B, N, C).
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, size)
        if self._fastvit_unfused("timm Twins GlobalSubSampleAttn"):
            return super().forward(x, size)
        B, _, C = x.shape
        heads = (self.num_heads, C // self.num_heads)
        q = self.q(x).unflatten(-1, heads).transpose(1, 2)  # (B, H, N, D), a view
        if self.sr is not None:  # timm's reduction: (B, N, C) -> NCHW -> strided conv -> (B, M, C)
            x = self.norm(self.sr(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).unflatten(-1, (2, *heads)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, M, D) views
        out = fastvit.flash_attention(q, k, v, scale=timm_scale(self))  # (B, H, N, D)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, sr_ratio={self.sr_ratio}, fastvit={self.fastvit_op}"


class FusedTwinsBlock(PreNormMlpHalf, Block):
    """timm Twins ``Block`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same signature,
    ``forward(x, size)``: x (B, N, C) -> (B, N, C)); its attention is ``self.attn`` (fused on its
    own). In training with MLP dropout > 0 the MLP half runs timm's modules."""

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, size)
        if self._fastvit_overridden():  # the whole forward: the override may be Block.forward itself
            return super().forward(x, size)
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        return self._fastvit_mlp_half(x)
