"""``GridAttention``: the shared frame of the timm-style attention layers over a token grid.

timm's ``Attention`` layout and parameter names (``qkv``, ``proj``) on (B, N, C) tokens, N =
num_prefix_tokens + h * w, with the attention itself left to a subclass (``AxialAttention``,
``WindowAttention``): the grid comes from the call, else from the constructor, else is inferred as
a square.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GridAttention"]


class GridAttention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens laid out as P prefix tokens and an h x w grid.

    Subclasses implement ``attend(q, k, v, grid) -> (B, H, N, D)`` and may add to ``extra_repr``.

    The constructor takes what ``AxialAttention`` documents: dim, num_heads, qkv_bias, proj_bias,
    grid_size (None: a square grid inferred from N at each call) and num_prefix_tokens.

    Example:
        >>> attn = fastvit.nn.AxialAttention(768, num_heads=12, num_prefix_tokens=1)  # a subclass
        >>> y = attn(torch.randn(2, 197, 768))  # 14 x 14 grid inferred; y: (2, 197, 768)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool,
        proj_bias: bool,
        grid_size: tuple[int, int] | None,
        num_prefix_tokens: int,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be a multiple of num_heads, got dim={dim}, num_heads={num_heads}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
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

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, H, N, D) q, k, v views -> (B, H, N, D) attention output."""
        raise NotImplementedError(f"{type(self).__name__} must implement attend(q, k, v, grid)")

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens; grid: (h, w) for this call (default: grid_size, else square).

        Returns (B, N, C). dtype: x must have the dtype of the ``qkv`` / ``proj`` weights (as for
        nn.Linear), and the output has it: fp16, bf16 and fp32 (the Triton kernels' dtypes), or
        float64 (the ``torch`` route). Under autocast the projections and the attention run in the
        autocast dtype, and so does the output (fp32 x and weights included).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, tokens, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        grid = tuple(grid) if grid is not None else self._grid(N)
        # (B, N, 3C) -> (3, B, H, N, D): views, no copies
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.attend(q, k, v, grid)  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )
