"""Plain-PyTorch math of every fastvit op: the test oracle.

Each function computes in the dtype of its inputs, with nothing fused and nothing clever, so tests
run it twice: on float64 copies (the oracle) and in the input dtype (the error budget of
design.md's tolerance rule). Autograd works through every function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["attention", "axial_attention", "layernorm_mlp", "patch_embed"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised softmax attention.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H, M, D) keys.
        v: (B, H, M, D) values.
        scale: multiplies q.k; default 1/sqrt(D).
        causal: query i sees keys j <= i (top-left aligned, like SDPA's ``is_causal``).

    Returns:
        out (B, H, N, D) and lse (B, H, N), the natural-log logsumexp over keys of scale * q.k.
    """
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal:
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v), lse


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    prefix_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv2d(stride = kernel = p) + flatten + transpose + prefix concat + pos_embed add.

    Args:
        x: (B, C, H, W) images, H and W multiples of p.
        weight: (D, C, p, p) Conv2d weight.
        bias: (D,) or None.
        pos_embed: (1, P+N, D) added to all tokens, or (1, N, D) added to the patch tokens only.
        prefix_tokens: (1, P, D) cls / distillation / register tokens, prepended in that order.

    Returns:
        (B, P+N, D) tokens, N = (H/p)*(W/p).
    """
    p = weight.shape[-1]
    tokens = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)  # NCHW -> NLC
    n = tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        tokens = tokens + pos_embed  # timm's no_embed_class: patches only
        pos_embed = None
    if prefix_tokens is not None and prefix_tokens.shape[1] > 0:
        tokens = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def layernorm_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    layer_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + sample_scale * layer_scale * fc2(gelu(fc1(layer_norm(x))))`` over the last dim.

    Args:
        x: (..., D) tokens.
        norm_weight, norm_bias: (D,) LayerNorm affine parameters (None: no affine).
        fc1_weight: (Hd, D), fc1_bias: (Hd,) or None -- nn.Linear layout.
        fc2_weight: (D, Hd), fc2_bias: (D,) or None.
        eps: LayerNorm epsilon.
        approximate: "none" (exact erf GELU) or "tanh".
        residual: add x to the branch.
        layer_scale: (D,) timm LayerScale gamma, or None.
        sample_scale: (x.shape[0],) per-sample factor on the branch (drop-path), or None.

    Returns:
        Tensor of x's shape.
    """
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
    if layer_scale is not None:
        h = h * layer_scale
    if sample_scale is not None:
        h = h * sample_scale.reshape((-1,) + (1,) * (x.dim() - 1))
    return x + h if residual else h


def axial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Axial attention (summed form) as explicit masked attention over all N tokens: the definition.

    N = P + h*w tokens, P prefix tokens first, then the h x w grid row-major. A grid token's output
    is softmax attention over (its row + the prefix) plus softmax attention over (its column + the
    prefix); a prefix token's output is softmax attention over all N tokens.

    Args:
        q, k, v: (B, H, N, D).
        grid: (h, w).
        num_prefix_tokens: P.
        scale: multiplies q.k; default 1/sqrt(D).

    Returns:
        (B, H, N, D).
    """
    n, d = q.shape[-2], q.shape[-1]
    w = grid[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    idx = torch.arange(n, device=q.device)
    prefix = idx < num_prefix_tokens
    row = torch.div(idx - num_prefix_tokens, w, rounding_mode="floor")
    col = (idx - num_prefix_tokens) % w
    both_grid = ~prefix[:, None] & ~prefix[None, :]
    same_row = prefix[None, :] | (both_grid & (row[:, None] == row[None, :]))  # (N queries, N keys)
    same_col = prefix[None, :] | (both_grid & (col[:, None] == col[None, :]))
    s = torch.matmul(q, k.transpose(-2, -1)) * scale

    def masked(keep: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1), v)

    full = torch.matmul(torch.softmax(s, dim=-1), v)
    return torch.where(prefix[:, None], full, masked(same_row) + masked(same_col))
