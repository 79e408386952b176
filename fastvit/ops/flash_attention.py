"""``fastvit.flash_attention``: input checks, autocast rule, backend dispatch and autograd.

The Triton route is a pair of ``torch.library`` custom ops (``fastvit::flash_attention_fwd`` and
``fastvit::flash_attention_bwd``) with fake implementations and an autograd formula, so the op
works under ``torch.compile(fullgraph=True)`` without a graph break. The ``torch`` route is
``F.scaled_dot_product_attention`` (PyTorch's memory-efficient kernels where it has them); with an
``attn_mask`` or ``rel_pos`` it runs a block of query rows at a time (the rel_pos bias is built per
block and recomputed in the backward), zeroing fully masked rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvit.backend import interpreter_dtype_problem, resolve_backend, warn_once
from fastvit.ops._autograd import call, function_twin, no_double_backward
from fastvit.ops._checks import (
    autocast_dtype,
    check_dense,
    check_flags,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
    check_unit_last_stride,
    may_overlap,
    unit_last_stride,
    usable_in_autograd,
)
from fastvit.ops._fx import fx_leaf
from fastvit.tuning import attention_bucket

__all__ = ["flash_attention"]

# dtypes the Triton kernels take; float64 is valid input and runs on the torch route.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)
# The torch route with a mask or rel_pos runs SDPA on blocks of query rows holding at most this
# many (B * H * rows * M) scores / bias elements (~64 MB in fp32), and at most
# TORCH_ROUTE_BLOCK_ROWS rows: the memory of a block grows with M alone, so the route's extra
# memory is O(N) (not O(N^2) up to the element budget) as N grows.
TORCH_ROUTE_BLOCK_ELEMENTS = 1 << 24
TORCH_ROUTE_BLOCK_ROWS = 128


# ---------------------------------------------------------------------------------------------
# Triton route: custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    bias: torch.Tensor | None = None,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvit.kernels.flash_attention import flash_attention_forward

    q, k, v = (unit_last_stride(t) for t in (q, k, v))  # checked when traced; a graph's real layout may differ
    return flash_attention_forward(q, k, v, scale, causal, bias=bias, rel_h=rel_h, rel_w=rel_w)


@_flash_attention_fwd.register_fake
def _(q, k, v, scale, causal, bias=None, rel_h=None, rel_w=None):
    from fastvit.kernels.flash_attention import lse_dtype, out_strides

    batch, heads, n_q, _ = q.shape
    # the kernel writes out as (B, N, H, D) in memory: report the same strides
    out = q.new_empty_strided(q.shape, out_strides(q.shape))
    return out, q.new_empty((batch, heads, n_q), dtype=lse_dtype(q.dtype))


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
    bias: torch.Tensor | None = None,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
    bias_grad: bool = False,
    rel_pos_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, then dbias (bias's shape and dtype) when ``bias_grad`` and drel_h, drel_w when
    ``rel_pos_grad``; a gradient not asked for is returned as an empty (0,) tensor."""
    from fastvit.kernels.flash_attention import flash_attention_backward

    if grad_out.stride(-1) != 1 and grad_out.stride(-1) != 0:
        # the kernels take any dO strides, but the head dim is read as a vector: a gradient
        # that is neither unit-stride nor broadcast there is rare enough to copy.
        grad_out = grad_out.contiguous()
    q, k, v = (unit_last_stride(t) for t in (q, k, v))  # as saved: a traced graph's real layout may differ
    # lse is this op's own saved output (contiguous); .contiguous() is a no-op guard for direct callers
    dq, dk, dv, dbias, drel_h, drel_w = flash_attention_backward(
        grad_out, q, k, v, out, lse.contiguous(), scale, causal,
        bias=bias, rel_h=rel_h, rel_w=rel_w, bias_grad=bias_grad, rel_pos_grad=rel_pos_grad,
    )
    # a gradient not asked for: a fresh empty tensor each (outputs may not alias one another)
    return dq, dk, dv, *(q.new_empty((0,)) if t is None else t for t in (dbias, drel_h, drel_w))


@_flash_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, causal, bias=None, rel_h=None, rel_w=None, bias_grad=False,
      rel_pos_grad=False):
    def like(t, wanted):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else q.new_empty((0,))

    return (
        like(q, True), like(k, True), like(v, True),
        like(bias, bias_grad), like(rel_h, rel_pos_grad), like(rel_w, rel_pos_grad),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, scale, causal, bias, rel_h, rel_w = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, rel_h, rel_w)
    ctx.scale = scale
    ctx.causal = causal
    # lse never gets a gradient: no (B, H, N) zeros (an allocation and a fill launch) per backward
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    # lse is returned without gradient (the public function detaches it), so grad_lse is ignored.
    if grad_out is None:  # not materialised (see _setup_context): no gradient reached out
        return (None,) * 8
    q, k, v, out, lse, bias, rel_h, rel_w = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[5]
    rel_pos_grad = rel_h is not None and (ctx.needs_input_grad[6] or ctx.needs_input_grad[7])
    dq, dk, dv, dbias, drel_h, drel_w = call(
        _flash_attention_bwd, _flash_attention_bwd_function,
        grad_out, q, k, v, out, lse, ctx.scale, ctx.causal, bias, rel_h, rel_w, bias_grad, rel_pos_grad,
    )
    return (
        dq, dk, dv, None, None,
        dbias if bias_grad else None,
        drel_h if rel_pos_grad else None,
        drel_w if rel_pos_grad else None,
    )


_flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
# the kernels have first derivatives only: a double backward raises an error naming the torch route
_flash_attention_bwd_function = no_double_backward(_flash_attention_bwd, "flash_attention")
# the same pair as autograd.Functions, for torch.func transforms (fastvit.ops._autograd.call)
_flash_attention_fwd_function = function_twin(_flash_attention_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# torch route
# ---------------------------------------------------------------------------------------------
def _logsumexp_chunked(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """(B, H, N) float32 lse over keys, computed a block of queries at a time (linear memory)."""
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    rows = max(1, (1 << 24) // max(1, batch * heads * n_k))  # ~64 MB of fp32 scores per block
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    # fp32 scores, never fp16/bf16 ones: q.k in fp16 overflows (q = k = 40, D = 64: 102400) and
    # rounds the logits; float64 input keeps float64
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    k_t = k.to(work).transpose(-2, -1)
    with torch.no_grad():
        for start in range(0, n_q, rows):
            scores = torch.matmul(q[:, :, start : start + rows].to(work), k_t) * scale
            if causal:
                i = torch.arange(start, min(start + rows, n_q), device=q.device)[:, None]
                scores = scores.masked_fill(torch.arange(n_k, device=q.device)[None, :] > i, float("-inf"))
            lse[:, :, start : start + rows] = torch.logsumexp(scores, dim=-1)
    return lse


def keep_nan_rows(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` with NaN in every query row where ``q`` holds a NaN, as the math gives (the reference,
    the Triton kernels, SDPA's math backend): PyTorch's CPU flash SDPA without a mask returns zeros
    there. One pass over q and one over out; the rows set here get no gradient from out.

    Example:
        >>> keep_nan_rows(q, F.scaled_dot_product_attention(q, k, v))  # q[0, 0, 3] has a NaN: row 3 NaN
    """
    return out.masked_fill(torch.isnan(q).any(-1, keepdim=True), float("nan"))


def _torch_route(q, k, v, scale, causal, return_lse, attn_mask=None, rel_pos=None):
    # PyTorch's CPU SDPA reads inputs whose elements share memory (x.unfold(...) views) as garbage:
    # copy those (packed-qkv views never overlap; broadcast stride-0 dims are read correctly)
    q, k, v = (t.contiguous() if may_overlap(t) else t for t in (q, k, v))
    if attn_mask is not None or rel_pos is not None:
        return _masked_torch_route(q, k, v, scale, causal, return_lse, attn_mask, rel_pos)
    out = keep_nan_rows(q, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale))
    if not return_lse:
        return out
    return out, _logsumexp_chunked(q, k, scale, causal)


def _chunk_mask(q_rows, n_k, mask, rel_h, rel_w, row0, causal):
    """The SDPA mask of one block of query rows, from the 4-D ``mask`` rows and rel_pos rows: bool
    (True = attend) or additive in q's dtype, shape (B|1, H|1, rows, M|1), and its fully masked
    rows (B|1, H|1, rows, 1). Differentiable in ``mask`` (float), ``rel_h`` and ``rel_w``."""
    rows, dtype, device = q_rows.shape[2], q_rows.dtype, q_rows.device
    keep = bias = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            bias = mask.to(dtype)  # a copy only if the dtypes differ; the gradient flows back through it
    if rel_h is not None:
        rel = (rel_h.to(dtype)[..., :, None] + rel_w.to(dtype)[..., None, :]).flatten(-2)
        bias = rel if bias is None else bias + rel
    if causal:
        i = torch.arange(row0, row0 + rows, device=device)[:, None]
        below = torch.arange(n_k, device=device)[None, :] <= i
        keep = below if keep is None else keep & below
    if bias is None:
        combined = keep
        dead = ~keep.any(-1, keepdim=True)
    else:
        combined = bias if keep is None else bias.masked_fill(~keep, float("-inf"))
        dead = torch.isneginf(combined.detach()).all(-1, keepdim=True)
    return combined, dead


def _masked_chunk(q_rows, k, v, mask, rel_h, rel_w, row0, scale, causal):
    """SDPA over one block of query rows with its mask; fully masked rows give zeros (SDPA would
    give NaN on some backends) and, as their output does not depend on anything, zero gradients."""
    combined, dead = _chunk_mask(q_rows, k.shape[2], mask, rel_h, rel_w, row0, causal)
    # let dead rows attend to everything (finite softmax, no NaN in the backward), then zero them
    combined = combined.masked_fill(dead, True if combined.dtype == torch.bool else 0.0)
    if combined.shape[-1] != k.shape[2] or combined.stride(-1) != 1:
        # CUDA SDPA's memory-efficient kernel reads the mask's last dim with a unit stride ("last
        # dimension must be contiguous"): a mask broadcast over keys is written out, for this
        # block of query rows only
        combined = combined.expand(*combined.shape[:-1], k.shape[2]).contiguous()
    out = F.scaled_dot_product_attention(q_rows, k, v, attn_mask=combined, scale=scale)
    return out.masked_fill(dead, 0.0)


def _masked_torch_route(q, k, v, scale, causal, return_lse, mask, rel_pos):
    """SDPA with a mask and/or the decomposed relative-position bias, a block of query rows at a
    time: at most ~2^24 scores or bias elements exist at once, never (B, H, N, M). With rel_pos
    each block is checkpointed, so the backward recomputes its bias instead of keeping it."""
    from torch.utils.checkpoint import checkpoint

    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    if n_q == 0:
        return _torch_route(q, k, v, scale, causal, return_lse)
    if mask is not None:
        mask = mask[(None,) * (4 - mask.dim())]  # left-pad to 4-D with size-1 dims (a view)
    rel_h, rel_w = rel_pos if rel_pos is not None else (None, None)
    rows = max(1, min(TORCH_ROUTE_BLOCK_ROWS, TORCH_ROUTE_BLOCK_ELEMENTS // max(1, batch * heads * n_k)))
    recompute = rel_pos is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, mask, rel_h, rel_w)
    )
    # blocks as torch.split views: the backward concatenates the blocks' gradients once (slicing
    # would give every block a full-size zero gradient of q, the mask and the tables to add up)
    q_blocks = q.split(rows, dim=2)
    count = len(q_blocks)
    mask_blocks = [mask] * count if mask is None or mask.shape[2] == 1 else mask.split(rows, dim=2)
    rh_blocks, rw_blocks = ([None] * count,) * 2 if rel_h is None else (rel_h.split(rows, 2), rel_w.split(rows, 2))
    outs, lses = [], []
    for i, (q_rows, mask_rows, rh, rw) in enumerate(zip(q_blocks, mask_blocks, rh_blocks, rw_blocks, strict=True)):
        row0 = i * rows
        args = (q_rows, k, v, mask_rows, rh, rw, row0, scale, causal)
        outs.append(checkpoint(_masked_chunk, *args, use_reentrant=False) if recompute else _masked_chunk(*args))
        if return_lse:
            with torch.no_grad():
                # fp32 scores (never fp16) plus the bias; fully masked rows give -inf
                combined, _ = _chunk_mask(q_rows.float(), n_k, mask_rows, rh, rw, row0, causal)
                scores = torch.matmul(q_rows.float(), k.float().transpose(-2, -1)) * scale
                if combined.dtype == torch.bool:
                    scores = scores.masked_fill(~combined, float("-inf"))
                else:
                    scores = scores + combined
                lses.append(torch.logsumexp(scores, dim=-1))
    out = torch.cat(outs, dim=2) if len(outs) != 1 else outs[0]
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=2) if len(lses) != 1 else lses[0]


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _validate(q, k, v, scale, attn_mask=None, rel_pos=None) -> None:
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
    check_scale(scale)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    if attn_mask is not None:
        _validate_mask(attn_mask, q.device, (batch, heads, n_q, n_k))
    if rel_pos is not None:
        _validate_rel_pos(rel_pos, q.device, (batch, heads, n_q, n_k))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _validate_mask(mask, device, target) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    check_dense("attn_mask", mask)
    if mask.dtype != torch.bool and mask.dtype not in _ALL_DTYPES:
        raise TypeError(
            f"attn_mask must be bool (True = may attend) or floating (added to the scores), "
            f"got dtype {_dtype_name(mask.dtype)}"
        )
    if mask.device != device:
        raise ValueError(f"attn_mask must be on q's device {device}, got {mask.device}")
    if mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions (B, H, N, M), got shape {tuple(mask.shape)}")
    padded = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if any(m != 1 and m != t for m, t in zip(padded, target, strict=True)):
        raise ValueError(
            f"attn_mask of shape {tuple(mask.shape)} is not broadcastable to (B, H, N, M) = {tuple(target)}: "
            "each of its trailing dimensions must be 1 or the matching size"
        )


def _validate_rel_pos(rel_pos, device, target) -> None:
    batch, heads, n_q, n_k = target
    if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
        raise TypeError(f"rel_pos must be a pair (rel_h, rel_w) of tensors or None, got {type(rel_pos).__name__}")
    for name, t in zip(("rel_h", "rel_w"), rel_pos, strict=True):
        check_tensor(f"rel_pos {name}", t, ndim=4, dtypes=_ALL_DTYPES, shape_hint="(B|1, H|1, N, k)")
        if t.device != device:
            raise ValueError(f"rel_pos {name} must be on q's device {device}, got {t.device}")
        b, h, n, _ = t.shape
        if b not in (1, batch) or h not in (1, heads) or n != n_q or t.shape[3] < 1:
            raise ValueError(
                f"rel_pos {name} must have shape (B|1, H|1, N, k) = ({batch}|1, {heads}|1, {n_q}, k >= 1), "
                f"got {tuple(t.shape)}"
            )
    kh, kw = rel_pos[0].shape[3], rel_pos[1].shape[3]
    if kh * kw != n_k:
        raise ValueError(
            f"rel_pos needs M == kh * kw (keys on a kh x kw grid), got rel_h {tuple(rel_pos[0].shape)}, "
            f"rel_w {tuple(rel_pos[1].shape)}: kh * kw = {kh * kw}, M = {n_k}"
        )


@fx_leaf  # one node in torch.fx graphs
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention without the N x M score matrix (FlashAttention-2 in Triton).

    ``out = softmax(scale * q @ k^T + bias) @ v``, the layout of ``F.scaled_dot_product_attention``.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H, M, D) keys; M may differ from N.
        v: (B, H, M, D) values.
        scale: multiplies q.k before the softmax; default ``1 / sqrt(D)``.
        causal: query i attends to keys j <= i (top-left aligned, like SDPA's ``is_causal``);
            combines with ``attn_mask`` and ``rel_pos``.
        attn_mask: SDPA's convention, at most 4-D and broadcastable to (B, H, N, M), e.g. (N, M),
            (1, H, N, M), (B, 1, 1, M): bool (True = may attend) or floating (fp16, bf16, fp32,
            fp64; added to ``scale * q.k``, may hold -inf). Never materialised: the kernels read
            it through its own strides (stride 0 in broadcast dims). A floating mask that requires
            grad gets its gradient in its own shape and dtype, summed over its broadcast dims
            (fp32 accumulation, deterministic): a relative-position table gathered into a
            (1, H, N, M) bias (BEiT, Swin) learns through it.
        rel_pos: ``(rel_h, rel_w)``, the decomposed 2-D relative position of SAM / ViTDet /
            MViTv2: rel_h (B|1, H|1, N, kh), rel_w (B|1, H|1, N, kw), floating, with
            M == kh * kw (key j is grid cell (j // kw, j % kw)); adds
            ``rel_h[b, h, i, j // kw] + rel_w[b, h, i, j % kw]`` to the scores (after
            ``attn_mask`` if both are given), computed in the kernels in O(N * (kh + kw))
            memory, with gradients for both tables.
        return_lse: also return the natural-log logsumexp over keys of the (biased, masked)
            scores, so that partial attentions over key shards can be merged (ring /
            context-parallel attention).

    Returns:
        ``out`` (B, H, N, D) in q's dtype, or ``(out, lse)`` with ``lse`` (B, H, N) float32,
        returned without gradient. Where the Triton kernels run, ``out`` is laid out as
        (B, N, H, D) in memory, so ``out.transpose(1, 2).reshape(B, N, H * D)`` is a view; on the
        ``torch`` route it is SDPA's own output (on the CPU a contiguous (B, H, N, D): that
        reshape copies). A query row that may attend to no key (fully masked) gets
        zeros, zero gradients and lse = -inf, never NaN. Otherwise a NaN in a query row gives
        NaN in that output row on every route (the torch route restores it where PyTorch's CPU
        SDPA gives zeros). The fused routes have first derivatives only: a double backward raises
        an error naming the torch route (with SDPA's math backend) that has them. The kernels add the mask in log2 units
        (times log2 e) in fp32, so a finite bias below -2.3e38 (``torch.finfo(torch.float32).min``,
        as in Hugging Face masks) counts as -inf there: rows partly masked that way match SDPA,
        a row masked that way everywhere is fully masked (zeros), where SDPA averages it.

    Tensors may have any strides with a unit stride in the last dim (views of a packed qkv are
    not copied). dtypes: fp16, bf16 and fp32 run the kernels; fp32 uses IEEE fp32 dot products
    (no TF32), so its forward matches an fp32 reference to rounding (its backward recomputes P from
    the saved lse, kept in fp64 for fp32 inputs; where the backward's scores round otherwise than
    the forward's, P's error grows as |score| x 2^-24: README); float64 runs the ``torch`` route.
    Head dims 1 to 256 run the kernels (padded to a power of two in registers), 1 to 128 with an
    ``attn_mask`` or ``rel_pos``; larger head dims and non-positive scales run the ``torch`` route
    with one warning. Under autocast, q, k and v
    are cast to the autocast dtype, like SDPA (masks and rel_pos keep their dtype). On the
    ``torch`` route a mask or rel_pos runs SDPA a block of query rows at a time, so no
    (B, H, N, M) tensor exists at once there either.

    Raises:
        ValueError / TypeError naming ``attn_mask`` or ``rel_pos``: more than 4 dims, a shape not
        broadcastable to (B, H, N, M), kh * kw != M, an integer dtype, another device.

    Example:
        >>> q, k, v = torch.randn(3, 2, 12, 197, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> out = fastvit.flash_attention(q, k, v)                       # (2, 12, 197, 64)
        >>> out, lse = fastvit.flash_attention(q, k, v, return_lse=True)  # lse: (2, 12, 197)
        >>> keep = torch.rand(197, 197, device="cuda") > 0.1               # bool (N, M) mask
        >>> out = fastvit.flash_attention(q, k, v, attn_mask=keep)
        >>> table = torch.zeros(1, 12, 197, 197, device="cuda", requires_grad=True)
        >>> fastvit.flash_attention(q, k, v, attn_mask=table).sum().backward()  # table.grad
        >>> q, k, v = torch.randn(3, 2, 12, 196, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> rel_h = torch.randn(2, 12, 196, 14, device="cuda", dtype=q.dtype)  # 14 x 14 key grid, q's dtype
        >>> out = fastvit.flash_attention(q, k, v, rel_pos=(rel_h, rel_h.clone()))
    """
    check_flags(causal=causal, return_lse=return_lse)
    _validate(q, k, v, scale, attn_mask, rel_pos)
    device = q.device
    rel_h, rel_w = (None, None) if rel_pos is None else rel_pos
    q, k, v, attn_mask, rel_h, rel_w = usable_in_autograd(q, k, v, attn_mask, rel_h, rel_w)
    rel_pos = None if rel_pos is None else (rel_h, rel_w)
    cast_to = autocast_dtype(device)
    if cast_to is not None:
        q, k, v = (t.to(cast_to) if t.dtype in _KERNEL_DTYPES else t for t in (q, k, v))
    check_same_dtype(q=q, k=k, v=v)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    route = resolve_backend(
        device, "flash_attention",
        lambda: attention_bucket(head_dim, q.dtype, q.shape[-2], q.shape[0] * q.shape[1], causal,
                                 attn_mask is not None or rel_pos is not None,
                                 torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))),
    )  # fmt: skip
    if route == "triton":
        from fastvit.kernels.flash_attention import MAX_HEAD_DIM, MAX_MASK_HEAD_DIM

        reason = None
        if head_dim > MAX_HEAD_DIM:
            reason = f"head_dim {head_dim} > {MAX_HEAD_DIM}"
        elif head_dim > MAX_MASK_HEAD_DIM and (attn_mask is not None or rel_pos is not None):
            reason = f"head_dim {head_dim} > {MAX_MASK_HEAD_DIM} with attn_mask or rel_pos"
        elif q.dtype not in _KERNEL_DTYPES:
            reason = f"dtype {q.dtype}"
        elif interpreter_dtype_problem(device, q.dtype):
            reason = interpreter_dtype_problem(device, q.dtype)
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
        return _torch_route(q, k, v, scale, causal, return_lse, attn_mask, rel_pos)
    bias = None if attn_mask is None else attn_mask[(None,) * (4 - attn_mask.dim())]  # 4-D view
    out, lse = call(_flash_attention_fwd, _flash_attention_fwd_function, q, k, v, scale, bool(causal), bias, rel_h,
                    rel_w)
    # the saved lse is float64 for fp32 inputs (lse_dtype); the public one is float32
    return (out, lse.detach().to(torch.float32)) if return_lse else out
