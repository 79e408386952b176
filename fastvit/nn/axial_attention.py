"""``fastvit.nn.AxialAttention``: a timm-style attention layer over ``fastvit.axial_attention``.

The axial baseline as a module: the layout and parameter names of timm's ``Attention`` (``qkv``,
``proj``), with axial attention (rows + columns, summed; prefix tokens attend to everything) in
place of full softmax attention. A different model, not a drop-in replacement for a trained
ViT's attention: cost O(N * (h + w)) instead of O(N^2).
"""

from __future__ import annotations

import torch

from fastvit.nn.grid_attention import GridAttention
from fastvit.ops.axial_attention import axial_attention

__all__ = ["AxialAttention"]


class AxialAttention(GridAttention):
    """Multi-head axial self-attention on (B, N, C) tokens: N = num_prefix_tokens + h * w.

    Args:
        dim: C, the token width.
        num_heads: heads; dim must be a multiple of it.
        qkv_bias: bias in the qkv projection.
        proj_bias: bias in the output projection.
        grid_size: (h, w) of the token grid; None: a square grid inferred from N at each call.
        num_prefix_tokens: P, the cls / distillation / register tokens before the grid.

    dtypes: the parameters are created in the default dtype (``.to(dtype)`` moves them); x must
    have their dtype (fp16, bf16, fp32; float64 runs the ``torch`` route), and the output has it.
    Under autocast the projections and the attention run in the autocast dtype, as does the output.

    Example:
        >>> attn = fastvit.nn.AxialAttention(768, num_heads=12, num_prefix_tokens=1)
        >>> y = attn(torch.randn(2, 197, 768))  # 14 x 14 grid inferred; y: (2, 197, 768)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        grid_size: tuple[int, int] | None = None,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, grid_size=grid_size,
            num_prefix_tokens=num_prefix_tokens,
        )  # fmt: skip

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H, P + h * w, D) q, k, v (views of the qkv projection) -> (B, H, P + h * w, D):
        ``fastvit.axial_attention`` over the (h, w) ``grid`` with this layer's prefix tokens.

        Example:
            >>> attn = fastvit.nn.AxialAttention(64, num_heads=2, num_prefix_tokens=1)
            >>> q = k = v = torch.randn(2, 2, 1 + 4 * 6, 32)
            >>> attn.attend(q, k, v, (4, 6)).shape
            torch.Size([2, 2, 25, 32])
        """
        return axial_attention(q, k, v, grid, self.num_prefix_tokens)
