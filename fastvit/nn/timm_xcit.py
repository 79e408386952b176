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
PyTorch's SDPA with its one-time fallback warning.

``XCABlock``'s MLP half, ``x + drop_path2(gamma2 * mlp(norm2(x)))`` after the attention and the
local patch interaction (LPI), is one ``fastvit.layernorm_mlp`` call (``gamma2`` as
``layer_scale``); its attention and LPI run as timm's. The class-attention blocks
(``ClassAttentionBlock``: the MLP on the normalised class token only) run timm's modules. See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.xcit import XCA, XCABlock

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import MLP_BYPASSED, FusedGammaMlpHalf

__all__ = ["FusedXCA", "FusedXCABlock", "cross_covariance_attention"]


def cross_covariance_attention(qkv: torch.Tensor, num_heads: int, temperature: torch.Tensor) -> torch.Tensor:
    """XCiT's cross-covariance attention (also EdgeNeXt's) from its packed projection: the channels
    of each head attend, the tokens are the head dim.

    Args:
        qkv: (B, N, 3C), the ``qkv`` Linear's output, laid out [q; k; v], each head-major.
        num_heads: H (C / H channels per head).
        temperature: (H, 1, 1) per-head temperature, multiplying the normalised q.

    Returns:
        (B, N, C): each head's (C', C') softmax weights applied to its value channels, as timm's
        ``x.permute(0, 3, 1, 2).reshape(B, N, C)``, before the output projection.

    Example:
        >>> x = attn.proj(cross_covariance_attention(attn.qkv(x), attn.num_heads, attn.temperature))
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    # (B, N, 3C) -> (3, B, H, C', N), the token axis last as in timm, copied once so that the op
    # reads its "head dim" (the tokens) with a unit stride (their stride in the projection is 3C)
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads).permute(2, 0, 3, 4, 1)
    q, k, v = qkv.contiguous().unbind(0)
    q = F.normalize(q, dim=-1) * temperature  # over the tokens, then the per-head temperature
    k = F.normalize(k, dim=-1)
    out = fastvit.flash_attention(q, k, v, scale=1.0)  # (B, H, C', N)
    return out.permute(0, 3, 1, 2).reshape(B, N, C)


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
        x = cross_covariance_attention(self.qkv(x), self.num_heads, self.temperature)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cross-covariance (channels attend), fastvit={self.fastvit_op}"


class FusedXCABlock(FusedGammaMlpHalf, XCABlock):
    """timm XCiT ``XCABlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same signature,
    ``forward(x, H, W)``: x (B, N, C) -> (B, N, C)); its attention (fused on its own) and its local
    patch interaction run as timm's."""

    fastvit_bypassed = MLP_BYPASSED

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's third residual branch, module by module."""
        return x + self.drop_path2(self.gamma2 * self.mlp(self.norm2(x)))

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        return self.gamma2

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, H, W)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, H, W)
        x = x + self.drop_path1(self.gamma1 * self.attn(self.norm1(x)))
        x = x + self.drop_path3(self.gamma3 * self.local_mp(self.norm3(x), H, W))
        return self._fastvit_mlp_half(x)
