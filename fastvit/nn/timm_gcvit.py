"""Fused subclasses of timm's GCViT (``gcvit_*``), swapped onto a model by ``fastvit.patch``.

GCViT alternates local and global window attention (``WindowAttentionGlobal``): in both the keys
and values come from each window's tokens; the queries too in a local block, and in a global block
from the stage's global query (one map per image, repeated over that image's windows as timm
repeats it). Its relative-position bias (``rel_pos``, timm's ``RelPosBias``: (1, heads, N, N) from
a learnt table) goes to ``fastvit.flash_attention`` as its float ``attn_mask``, learning through the
op's mask gradient; each attention is one call over all windows of all images. The block's window
partition and its LayerScale'd residuals stay timm's; its MLP half
``x + drop_path2(ls2(mlp(norm2(x))))`` is one ``fastvit.layernorm_mlp`` call over the (B, H, W, C)
map (``fastvit.nn.timm_mlp``). Calls in training with attention dropout > 0 run timm's attention
forward, with MLP dropout timm's MLP modules. See ``fastvit.nn.fused`` for how the swap works.
Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.gcvit import GlobalContextVitBlock, WindowAttentionGlobal

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import MLP_BYPASSED, PreNormMlpHalf

__all__ = ["FusedGlobalContextVitBlock", "FusedWindowAttentionGlobal"]


class FusedWindowAttentionGlobal(FusedModule, WindowAttentionGlobal):
    """timm GCViT ``WindowAttentionGlobal`` (local and global) running one
    ``fastvit.flash_attention`` call over every window, its relative-position bias as the op's
    learnable float mask.

    Same signature, ``forward(x, q_global=None)``: x (B*nW, N, C) windows, q_global (B, ..., C)
    the stage's global query (N tokens per image); returns (B*nW, N, C).

    Example:
        >>> model = timm.create_model("gcvit_tiny")
        >>> fastvit.patch(model)  # stages.*.blocks.*.attn -> FusedWindowAttentionGlobal
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("rel_pos", "attn_drop")  # timm calls both; the op adds get_bias() and has no dropout

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, q_global)
        if self._fastvit_unfused("timm GCViT WindowAttentionGlobal"):
            return super().forward(x, q_global)
        B, N, _ = x.shape
        if self.use_global and q_global is not None:
            torch._assert(x.shape[-1] == q_global.shape[-1], "x and q_global seq lengths should be equal")
            k, v = self.qkv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            # windows are image-major: each image's global query for each of its windows (timm's copy)
            q = q_global.repeat_interleave(B // q_global.shape[0], dim=0)
            q = q.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, self.head_dim)  # (B*nW, H, N, D) views
        out = fastvit.flash_attention(q, k, v, scale=self.scale, attn_mask=self.rel_pos.get_bias())
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        kind = "global query" if self.use_global else "local"
        return (
            f"heads={self.num_heads}, window={tuple(self.window_size)}, {kind}, rel_pos as mask, "
            f"fastvit={self.fastvit_op}"
        )


class FusedGlobalContextVitBlock(PreNormMlpHalf, GlobalContextVitBlock):
    """timm GCViT ``GlobalContextVitBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call
    (same signature, ``forward(x, q_global=None)``: x (B, H, W, C) -> (B, H, W, C)); its attention
    is ``self.attn`` (fused on its own). In training with MLP dropout > 0 the MLP half runs timm's
    modules."""

    fastvit_bypassed = (*MLP_BYPASSED, "ls2")

    def forward(self, x: torch.Tensor, q_global: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, q_global)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, q_global)
        x = x + self.drop_path1(self.ls1(self._window_attn(self.norm1(x), q_global)))
        return self._fastvit_mlp_half(x)
