"""Fused subclass of the attention of timm's HieraDet (SAM 2's image encoder: ``sam2_hiera_*``,
``hieradet_*``), swapped onto a model by ``fastvit.patch``.

``timm.models.hieradet_sam2.MultiScaleAttention`` attends within each window its block cut out
(``MultiScaleBlock``: padding and window partition before, unpartition after, all as in timm) or
over the whole grid (its global blocks), optionally max-pooling q on its 2-D grid first (the first
block of a stage: ``q_pool``, timm's own ``MaxPool2d``, called as timm calls it). Only the softmax
attention becomes one ``fastvit.flash_attention`` call: q, k and v are (B, heads, tokens, D) views of
the qkv projection (q a fresh tensor after pooling), and the output is (B, tokens, heads, D) in
memory, so the reshape back to (B, H, W, C) for the projection is free. Importing this module
imports timm (a release with HieraDet).
"""

from __future__ import annotations

import torch
from timm.models.hieradet_sam2 import MultiScaleAttention

import fastvit
from fastvit.nn.attention import timm_scale
from fastvit.nn.fused import FusedModule

__all__ = ["FusedHieraDetAttention"]


class FusedHieraDetAttention(FusedModule, MultiScaleAttention):
    """HieraDet's ``MultiScaleAttention`` (windowed or global, with or without q pooling) running
    ``fastvit.flash_attention``. Same signature, ``forward(x)`` with x (B, H, W, dim) channels-last
    windows; returns (B, H', W', dim_out), (H', W') the grid after ``q_pool``; any float dtype.

    Example:
        >>> model = timm.create_model("sam2_hiera_tiny")
        >>> fastvit.patch(model)  # each block's attention becomes a FusedHieraDetAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        batch, height, width, _ = x.shape
        # (B, H*W, 3, heads, D) -> three (B, H*W, heads, D) views
        q, k, v = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).unbind(2)
        if self.q_pool is not None:  # max-pool q on its grid, as timm: (B, C, H, W) in, (B, H', W', C) out
            q = self.q_pool(q.reshape(batch, height, width, -1).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            height, width = q.shape[1:3]
            q = q.reshape(batch, height * width, self.num_heads, -1)
        out = fastvit.flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=timm_scale(self))
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))

    def extra_repr(self) -> str:
        pool = ", q_pool" if self.q_pool is not None else ""
        return f"heads={self.num_heads}, dim_out={self.dim_out}{pool}, fastvit={self.fastvit_op}"
