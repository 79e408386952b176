"""``fastvit.nn.WindowAttention``: a timm-style attention layer over ``fastvit.window_attention``.

Swin's (shifted) window attention as a module on a ViT's token sequence: the layout and parameter
names of timm's ``Attention`` (``qkv``, ``proj``), with attention limited to window x window
blocks of the grid (prefix tokens attend to everything and are attended by every token). A
different model, not a drop-in replacement for a trained ViT's attention: cost O(N * window^2)
instead of O(N^2). Swin's learned relative-position bias is not part of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvit.ops.window_attention import check_window_and_shift, window_attention

__all__ = ["WindowAttention"]


class WindowAttention(nn.Module):
    """Multi-head (shifted) window self-attention on (B, N, C) tokens: N = num_prefix_tokens + h * w.

    Args:
        dim: C, the token width.
        num_heads: heads; dim must be a multiple of it.
        window: window size, an int or (wh, ww); need not divide the grid (padded and masked).
        shift: Swin's shift, an int or (sh, sw) in [0, window); e.g. window // 2 in every other
            block for SW-MSA.
        num_prefix_tokens: P, the cls / distillation / register tokens before the grid.
        qkv_bias: bias in the qkv projection (Swin: True).
        proj_bias: bias in the output projection.
        grid_size: (h, w) of the token grid; None: a square grid inferred from N at each call.

    Example:
        >>> attn = fastvit.nn.WindowAttention(96, num_heads=3, window=7, shift=3)  # Swin-T, SW-MSA
        >>> y = attn(torch.randn(2, 56 * 56, 96))  # 56 x 56 grid inferred; y: (2, 3136, 96)
        >>> attn = fastvit.nn.WindowAttention(768, 12, window=4, num_prefix_tokens=1)
        >>> y = attn(torch.randn(2, 197, 768), grid=(14, 14))  # ViT-B/16 + cls; y: (2, 197, 768)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window: int | tuple[int, int] = 7,
        *,
        shift: int | tuple[int, int] = 0,
        num_prefix_tokens: int = 0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        grid_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be a multiple of num_heads, got dim={dim}, num_heads={num_heads}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.window, self.shift = check_window_and_shift(window, shift)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _grid(self, n_tokens: int) -> tuple[int, int]:
        if self.grid_size is not None:
            return self.grid_size
        side = math.isqrt(max(0, n_tokens - self.num_prefix_tokens))
        if side * side + self.num_prefix_tokens != n_tokens or side == 0:
            raise ValueError(
                f"cannot infer a square grid from {n_tokens} tokens with {self.num_prefix_tokens} prefix "
                "tokens; pass grid_size=(h, w) to the constructor or grid=(h, w) to forward"
            )
        return side, side

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens; grid: (h, w) for this call (default: grid_size, else square)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        grid = tuple(grid) if grid is not None else self._grid(N)
        # (B, N, 3C) -> (3, B, H, N, D): views, no copies
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = window_attention(
            q, k, v, grid, self.window, shift=self.shift, num_prefix_tokens=self.num_prefix_tokens
        )  # (B, H, N, D), (B, N, H, D) in memory: the reshape below is free
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window={self.window}, shift={self.shift}, "
            f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}"
        )
