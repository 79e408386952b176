"""``fastvit.axial_attention``: the axial attention baseline (a different model, not exact attention).

Axial attention (Ho et al. 2019; Wang et al. 2020, "Axial-DeepLab") replaces attention over all
N tokens of an h x w grid with attention along its rows and along its columns. This is the
parallel, summed form (lucidrains' ``axial-attention`` with ``sum_axial_out=True``): a grid token's
output is attention over its row plus the prefix tokens, plus attention over its column plus the
prefix tokens; a prefix token (cls, distillation, register) attends to all N tokens. A query sees
w + P or h + P keys instead of N, so the cost is O(N * (h + w + P)) = O(N^1.5) on a square grid,
not O(N^2); the result differs from softmax attention over all tokens.

Plain PyTorch: each axis is one ``F.scaled_dot_product_attention`` call on a reshaped batch of
rows (or columns), so PyTorch's fused kernels run it where they can (memory O(N), no scores
stored) and autograd, autocast and every device work as they do for SDPA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvit.ops._checks import autocast_dtype, check_grid_self_attention, check_same_dtype, check_token_grid
from fastvit.ops._fx import fx_leaf

__all__ = ["axial_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(q, k, v, grid, num_prefix_tokens, scale) -> tuple[int, int, int]:
    check_grid_self_attention(q, k, v, scale, _DTYPES)
    return check_token_grid(grid, num_prefix_tokens, q.shape[2])


def _axis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp, vp, scale: float) -> torch.Tensor:
    """Attention within each line of the last-but-one axis, plus the prefix keys.

    q, k, v: (B, H, L, S, D), L lines of S tokens; kp, vp: (B, H, P, D) prefix keys and values,
    or None. Returns (B, H, L, S, D).
    """
    batch, heads, lines, size, dim = q.shape
    if kp is not None:
        # every line sees the prefix keys first: (B, H, L, P + S, D)
        expand = (batch, heads, lines, kp.shape[2], dim)
        k = torch.cat([kp.unsqueeze(2).expand(expand), k], dim=3)
        v = torch.cat([vp.unsqueeze(2).expand(expand), v], dim=3)
    # fold the lines into the batch: SDPA's fused CPU and GPU kernels take 4-D inputs
    # (reshape copies only when the strides do not allow a view: O(N * D), never O(N^2))
    out = F.scaled_dot_product_attention(
        q.reshape(batch * heads * lines, 1, size, dim),
        k.reshape(batch * heads * lines, 1, k.shape[3], dim),
        v.reshape(batch * heads * lines, 1, v.shape[3], dim),
        scale=scale,
    )
    return out.reshape(batch, heads, lines, size, dim)


@fx_leaf  # one node in torch.fx graphs
def axial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Axial self-attention over an h x w token grid with optional prefix tokens (summed form).

    With N = P + h * w tokens (the P prefix tokens first, then the grid in row-major order):

    - a grid token at (r, c) gets ``attn(q, keys of row r + prefix) + attn(q, keys of column c
      + prefix)``, each a softmax attention over its own key set;
    - a prefix token gets softmax attention over all N tokens.

    This is a different model from full attention, not an approximation of it: cost
    O(N * (h + w + P)) instead of O(N^2). It is the axial baseline of fastvit's benchmarks.

    Args:
        q, k, v: (B, H, N, D) queries, keys, values; any strides. fp16, bf16, fp32 or float64.
        grid: (h, w), the token grid.
        num_prefix_tokens: P, the cls / distillation / register tokens before the grid.
        scale: multiplies q.k before each softmax; default ``1 / sqrt(D)``.

    Returns:
        (B, H, N, D) in q's dtype (the autocast dtype under autocast, like SDPA).

    Example:
        >>> q, k, v = torch.randn(3, 2, 12, 1 + 14 * 14, 64).unbind(0)  # ViT-B/16 at 224
        >>> out = fastvit.axial_attention(q, k, v, (14, 14), num_prefix_tokens=1)  # (2, 12, 197, 64)
    """
    h, w, prefix = _validate(q, k, v, grid, num_prefix_tokens, scale)
    cast_to = autocast_dtype(q.device)
    if cast_to is not None:
        q, k, v = (t.to(cast_to) if t.dtype != torch.float64 else t for t in (q, k, v))
    check_same_dtype(q=q, k=k, v=v)
    batch, heads, _, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)

    grid_shape = (batch, heads, h, w, dim)
    qg, kg, vg = (t[:, :, prefix:].reshape(grid_shape) for t in (q, k, v))  # (B, H, h, w, D)
    kp, vp = (k[:, :, :prefix], v[:, :, :prefix]) if prefix else (None, None)
    rows = _axis_attention(qg, kg, vg, kp, vp, scale)
    cols = _axis_attention(*(t.transpose(2, 3) for t in (qg, kg, vg)), kp, vp, scale).transpose(2, 3)
    out = (rows + cols).reshape(batch, heads, h * w, dim)
    if prefix:
        out_prefix = F.scaled_dot_product_attention(q[:, :, :prefix], k, v, scale=scale)
        out = torch.cat([out_prefix, out], dim=2)
    return out
