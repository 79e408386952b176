"""Fused subclass of timm's CrossViT cross attention (``crossvit_*``), swapped onto a model by
``fastvit.patch``.

CrossViT's two branches (small and large patches) run timm's ``Block`` (fused by
``fastvit.nn.timm_vit``); between them its fusion blocks let each branch's class token attend to
the other branch's tokens: ``CrossAttention`` projects the class token to the query (``wq``) and
every token to keys and values (``wk``, ``wv``). That is CaiT's class attention
(``fastvit.nn.timm_cait.class_token_attention``): one ``fastvit.flash_attention`` call with one
query per image. See ``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.crossvit import CrossAttention

from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_cait import class_token_attention

__all__ = ["FusedCrossAttention"]


class FusedCrossAttention(FusedModule, CrossAttention):
    """timm CrossViT ``CrossAttention`` running ``fastvit.flash_attention`` with the class token as
    the only query. Same signature, ``forward(x)`` with x (B, N, C) (class token first); returns
    the class token's update (B, 1, C). Calls in training with attention dropout > 0 run timm's
    forward.

    Example:
        >>> model = timm.create_model("crossvit_tiny_240")
        >>> fastvit.patch(model)  # blocks.*.fusion.*.attn -> FusedCrossAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it in its forward; the op has no dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm CrossViT CrossAttention"):
            return super().forward(x)
        x = class_token_attention(x, self.wq, self.wk, self.wv, self.num_heads, self.scale)
        return self.proj_drop(self.proj(x))  # (B, 1, C)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, class token query, fastvit={self.fastvit_op}"
