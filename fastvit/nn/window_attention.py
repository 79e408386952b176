"""``fastvit.nn.WindowAttention``: a timm-style attention layer over ``fastvit.window_attention``.

Swin's (shifted) window attention as a module on a ViT's token sequence: the layout and parameter
names of timm's ``Attention`` (``qkv``, ``proj``), with attention limited to window x window
blocks of the grid (prefix tokens attend to everything and are attended by every token). A
different model, not a drop-in replacement for a trained ViT's attention: cost O(N * window^2)
instead of O(N^2). Swin's learned relative-position bias is not part of it.
"""

from __future__ import annotations

import torch

from fastvit.nn.grid_attention import GridAttention
from fastvit.ops.window_attention import check_window_and_shift, window_attention

__all__ = ["WindowAttention"]


class WindowAttention(GridAttention):
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

    dtypes: the parameters are created in the default dtype (``.to(dtype)`` moves them); x must
    have their dtype (fp16, bf16, fp32; float64 runs the ``torch`` route), and the output has it.
    Under autocast the projections and the attention run in the autocast dtype, as does the output.

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
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, grid_size=grid_size,
            num_prefix_tokens=num_prefix_tokens,
        )  # fmt: skip
        self.window, self.shift = check_window_and_shift(window, shift)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H, P + h * w, D) q, k, v (views of the qkv projection) -> (B, H, P + h * w, D):
        ``fastvit.window_attention`` over the (h, w) ``grid`` with this layer's window, shift and
        prefix tokens.

        Example:
            >>> attn = fastvit.nn.WindowAttention(64, num_heads=2, window=4, shift=2)
            >>> q = k = v = torch.randn(2, 2, 8 * 8, 32)
            >>> attn.attend(q, k, v, (8, 8)).shape
            torch.Size([2, 2, 64, 32])
        """
        return window_attention(q, k, v, grid, self.window, shift=self.shift, num_prefix_tokens=self.num_prefix_tokens)

    def extra_repr(self) -> str:
        """The layer's sizes, window and shift in its ``repr``.

        Example:
            >>> fastvit.nn.WindowAttention(96, 3, window=7, shift=3).extra_repr()
            'dim=96, num_heads=3, window=(7, 7), shift=(3, 3), grid_size=None, num_prefix_tokens=0'
        """
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window={self.window}, shift={self.shift}, "
            f"grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}"
        )
