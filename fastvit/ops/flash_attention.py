"""``fastvit.flash_attention``: input checks, autocast rule, backend dispatch and autograd.

The Triton route is a pair of ``torch.library`` custom ops (``fastvit::flash_attention_fwd`` and
``fastvit::flash_attention_bwd``) with fake implementations and an autograd formula, so the op
works under ``torch.compile(fullgraph=True)`` without a graph break. The ``torch`` route is
``F.scaled_dot_product_attention`` (PyTorch's memory-efficient kernels where it has them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvit.backend import resolve_backend, warn_once
from fastvit.ops._checks import (
    autocast_dtype,
    check_same_device,
    check_same_dtype,
    check_tensor,
    check_unit_last_stride,
)

__all__ = ["flash_attention"]

# dtypes the Triton kernels take; float64 is valid input and runs on the torch route.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)


# ---------------------------------------------------------------------------------------------
# Triton route: custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvit.kernels.flash_attention import flash_attention_forward

    return flash_attention_forward(q, k, v, scale, causal)


@_flash_attention_fwd.register_fake
def _(q, k, v, scale, causal):
    batch, heads, n_q, head_dim = q.shape
    # the kernel writes out as (B, N, H, D) in memory: report the same strides
    out = q.new_empty((batch, n_q, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, n_q), dtype=torch.float32)


@torch.library.custom_op("fastvit::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvit.kernels.flash_attention import flash_attention_backward

    if grad_out.stride(-1) != 1 and grad_out.stride(-1) != 0:
        # the kernels take any dO strides, but the head dim is read as a vector: a gradient
        # that is neither unit-stride nor broadcast there is rare enough to copy.
        grad_out = grad_out.contiguous()
    # lse is this op's own saved output (contiguous); .contiguous() is a no-op guard for direct callers
    return flash_attention_backward(grad_out, q, k, v, out, lse.contiguous(), scale, causal)


@_flash_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, causal):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    ), torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.causal = causal


def _backward(ctx, grad_out, grad_lse):
    # lse is returned without gradient (the public function detaches it), so grad_lse is ignored.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


_flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# torch route
# ---------------------------------------------------------------------------------------------
def _logsumexp_chunked(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """(B, H, N) float32 lse over keys, computed a block of queries at a time (linear memory)."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    rows = max(1, (1 << 24) // max(1, batch * heads * n_k))  # ~64 MB of fp32 scores per block
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for start in range(0, n_q, rows):
            scores = torch.matmul(q[:, :, start : start + rows], k.transpose(-2, -1)).float() * scale
            if causal:
                i = torch.arange(start, min(start + rows, n_q), device=q.device)[:, None]
                scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None, :] > i, float("-inf"))
            lse[:, :, start : start + rows] = torch.logsumexp(scores, dim=-1)
    return lse


def _torch_route(q, k, v, scale, causal, return_lse):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if not return_lse:
        return out
    return out, _logsumexp_chunked(q, k, scale, causal)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _validate(q, k, v, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=_ALL_DTYPES, shape_hint="(batch, heads, tokens, head_dim)")
    check_same_device(q=q, k=k, v=v)
    batch, heads, _, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != batch or t.shape[1] != heads or t.shape[3] != head_dim:
            raise ValueError(
                f"{name} must match q in batch, heads and head_dim: q is {tuple(q.shape)} "
                f"(B, H, N, D), {name} is {tuple(t.shape)}; expected ({batch}, {heads}, M, {head_dim})"
            )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of keys, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError(f"k and v must hold at least one key, got k {tuple(k.shape)}")
    if head_dim == 0:
        raise ValueError(f"head_dim must be at least 1, got q {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_unit_last_stride(name, t)
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if scale is not None and (not is_number or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention without the N x M score matrix (FlashAttention-2 in Triton).

    ``out = softmax(scale * q @ k^T) @ v``, the layout of ``F.scaled_dot_product_attention``.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H, M, D) keys; M may differ from N.
        v: (B, H, M, D) values.
        scale: multiplies q.k before the softmax; default ``1 / sqrt(D)``.
        causal: query i attends to keys j <= i (top-left aligned, like SDPA's ``is_causal``).
        return_lse: also return the natural-log logsumexp over keys of ``scale * q.k``, so that
            partial attentions over key shards can be merged (ring / context-parallel attention).

    Returns:
        ``out`` (B, H, N, D) in q's dtype, or ``(out, lse)`` with ``lse`` (B, H, N) float32,
        returned without gradient.

    Tensors may have any strides with a unit stride in the last dim (views of a packed qkv are
    not copied). dtypes: fp16, bf16 and fp32 run the kernels; fp32 uses IEEE fp32 dot products
    (no TF32), so it matches an fp32 reference to rounding; float64 runs the ``torch`` route.
    Head dims 1 to 128 run the kernels (padded to a power of two in registers); larger head dims
    and non-positive scales run the ``torch`` route with one warning. Under autocast, q, k and v
    are cast to the autocast dtype, like SDPA.

    Example:
        >>> q, k, v = torch.randn(3, 2, 12, 197, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> out = fastvit.flash_attention(q, k, v)                       # (2, 12, 197, 64)
        >>> out, lse = fastvit.flash_attention(q, k, v, return_lse=True)  # lse: (2, 12, 197)
    """
    _validate(q, k, v, scale)
    device = q.device
    cast_to = autocast_dtype(device)
    if cast_to is not None:
        q, k, v = (t.to(cast_to) if t.dtype in _KERNEL_DTYPES else t for t in (q, k, v))
    check_same_dtype(q=q, k=k, v=v)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    route = resolve_backend(device)
    if route == "triton":
        from fastvit.kernels.flash_attention import MAX_HEAD_DIM

        reason = None
        if head_dim > MAX_HEAD_DIM:
            reason = f"head_dim {head_dim} > {MAX_HEAD_DIM}"
        elif q.dtype not in _KERNEL_DTYPES:
            reason = f"dtype {q.dtype}"
        elif scale <= 0:
            reason = f"non-positive scale {scale}"
        if reason is not None:
            warn_once(
                f"flash_attention:{reason}",
                f"fastvit.flash_attention: the Triton kernels do not cover {reason}; "
                "running PyTorch's scaled_dot_product_attention instead",
            )
            route = "torch"

    if route == "torch":
        return _torch_route(q, k, v, scale, causal, return_lse)
    out, lse = _flash_attention_fwd(q, k, v, scale, bool(causal))
    return (out, lse.detach()) if return_lse else out
