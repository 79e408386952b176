"""Fused subclass of timm's XCiT cross-covariance attention (``xcit_*``), swapped onto a model by ``fastvit.patch``.

``timm.models.xcit.XCA`` attends across channels, not tokens: with q, k, v laid out as
(B, H, C', N) (C' = C / H channels per head, N tokens), q and k are L2-normalised over the token
axis, q is scaled by the per-head learnable ``temperature``, and each head's (C', C') softmax
weights mix the channels of v. That is exactly ``scaled_dot_product_attention(q, k, v, scale=1)``
on the (B, H, C', N) tensors (timm's own fused path), where the "sequence" is the head's C'
channels and the "head dim" is the token count N. timm's qkv and output projections, the
normalisation and the temperature stay as they are; the softmax attention becomes one
``fastvit.flash_attention`` call. Its kernels take head dims up to 256, so up to 256 tokens
(196 at 224 px with 16 px patches); above that (e.g. 384 px: 576 tokens) the op itself runs
PyTorch's SDPA with its one-time fallback warning. See ``fastvit.nn.fused`` for how the swap
works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.xcit import XCA

import fastvit
from fastvit.nn.fused import FusedModule

__all__ = ["FusedXCA"]


class FusedXCA(FusedModule, XCA):
    """timm XCiT ``XCA`` running ``fastvit.flash_attention`` over the channels. Same signature,
    ``forward(x)`` with x (B, N, C); returns (B, N, C). The kernels cover N <= 256 tokens; longer
    inputs run SDPA inside the op (with its warning). Calls in training with attention dropout
    > 0 run timm's forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm XCiT XCA", sdpa_dropout=False):
            return super().forward(x)
        B, N, C = x.shape
        # (B, N, 3C) -> (3, B, H, C', N), the token axis last as in timm, copied once so that the op
        # reads its "head dim" (the tokens) with a unit stride (their stride in the projection is 3C)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.contiguous().unbind(0)
        q = F.normalize(q, dim=-1) * self.temperature  # (H, 1, 1) per-head temperature
        k = F.normalize(k, dim=-1)
        out = fastvit.flash_attention(q, k, v, scale=1.0)  # (B, H, C', N)
        x = out.permute(0, 3, 1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cross-covariance (channels attend), fastvit={self.fastvit_op}"
