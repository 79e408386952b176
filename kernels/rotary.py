"""Rotary position embedding (RoPE) of q and k in one pass, timm's ``apply_rot_embed_cat`` math.

timm's ``EvaAttention`` rotates the patch rows of q and of k separately (slices, two multiplies, a
``rot`` built with ``torch.stack``, an add, a cast, then ``torch.cat`` of the unrotated prefix rows
and a ``type_as``): several elementwise passes over each tensor. Here one launch reads q, k and
the embedding once and writes the rotated q and k once; prefix rows are copied unrotated.

The math, per row n >= P (P prefix tokens), with ``rope[n - P] = [sin (D), cos (D)]`` and every
product in fp32 whatever the storage dtypes::

    out = x * cos + rot(x) * sin         # timm: apply_rot_embed(x, sin, cos, half)

``rot`` pairs each lane a with a partner b: interleaved (timm's ``rot``) a = 2i, b = 2i + 1;
half (``rope_rotate_half``) a = i, b = i + D/2. In both, ``rot(x)_a = -x_b`` and ``rot(x)_b = x_a``:

    forward:   out_a = x_a cos_a - x_b sin_a          out_b = x_b cos_b + x_a sin_b
    backward:  dx_a  = g_a cos_a + g_b sin_b          dx_b  = g_b cos_b - g_a sin_a

(the backward is the transpose, i.e. the inverse rotation for timm's embeddings, whose sin and cos
are equal within a pair). The same kernel runs both, ``BACKWARD`` a constexpr; the gradient of the
embedding itself is not computed here (timm's rope buffers need none; the op runs its ``torch``
route when the embedding requires grad).

Layout: q, k, and the outputs (B, H, N, D), any strides (views of a packed qkv; stride 0 of an
expanded gradient); rope (B|1, H|1, N - P, 2D) through its own strides (stride 0 in broadcast
dims). D is even and padded to a power of two in registers. Interleaved lanes are loaded as whole
rows (16-byte vectors) and split into pairs in registers; the half layout loads each half as a
contiguous run. Grid: one program per (batch*head, block of rows), batch*head fastest so that
neighbouring programs read the same embedding rows (L2 hits when the embedding broadcasts over
heads); all offsets in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .aot import ARCHS, KernelSpec, signature
from .runtime import AOT_DTYPE_NAMES, cdiv, device_guard, new_output, next_power_of_2

__all__ = ["aot_specs", "rotary_config", "rotary_qk_backward", "rotary_qk_forward"]

# Elements of one (rows x head dim) tile per program and per tensor: 2048 = 16 per thread of 4
# warps (two 16-byte vectors of bf16, four of fp32) for each of q, k, sin and cos.
TILE_ELEMENTS = 2048
NUM_WARPS = 4


def rotary_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_PAIRS, BLOCK_N): the lane pairs padded to a power of two, and the rows per program."""
    block_pairs = next_power_of_2(max(head_dim // 2, 1))
    return block_pairs, max(1, TILE_ELEMENTS // (2 * block_pairs))


@triton.jit
def _rotate(x_a, x_b, sin_a, sin_b, cos_a, cos_b, BACKWARD: tl.constexpr):
    """(out_a, out_b) of one pair of lanes, fp32 (module docstring)."""
    if BACKWARD:
        return x_a * cos_a + x_b * sin_b, x_b * cos_b - x_a * sin_a
    return x_a * cos_a - x_b * sin_a, x_b * cos_b + x_a * sin_b


@triton.jit
def _load_pairs(ptr, rows, stride_row, stride_d, mask_rows, pairs, HEAD_DIM: tl.constexpr,
                BLOCK_PAIRS: tl.constexpr, HALF: tl.constexpr, other: tl.constexpr):
    """(x_a, x_b) fp32 tiles (rows, BLOCK_PAIRS) of a (rows, D) block at ``ptr``."""
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    if HALF:  # a = i, b = i + D/2: two contiguous runs
        mask = mask_rows[:, None] & (pairs < HEAD_DIM // 2)[None, :]
        x_a = tl.load(ptr + row_offsets + pairs[None, :] * stride_d, mask=mask, other=other)
        x_b = tl.load(ptr + row_offsets + (pairs + HEAD_DIM // 2)[None, :] * stride_d, mask=mask, other=other)
    else:  # a = 2i, b = 2i + 1: whole rows, split into pairs in registers
        lanes = tl.arange(0, 2 * BLOCK_PAIRS)
        mask = mask_rows[:, None] & (lanes < HEAD_DIM)[None, :]
        x = tl.load(ptr + row_offsets + lanes[None, :] * stride_d, mask=mask, other=other)
        x_a, x_b = tl.split(tl.reshape(x, (x.shape[0], BLOCK_PAIRS, 2)))
    return x_a.to(tl.float32), x_b.to(tl.float32)


@triton.jit
def _store_pairs(ptr, rows, stride_row, mask_rows, pairs, out_a, out_b, HEAD_DIM: tl.constexpr,
                 BLOCK_PAIRS: tl.constexpr, HALF: tl.constexpr):
    """Store (rows, BLOCK_PAIRS) lanes a and b into a (rows, D) block at ``ptr`` (unit stride in D)."""
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    dtype = ptr.dtype.element_ty
    if HALF:
        mask = mask_rows[:, None] & (pairs < HEAD_DIM // 2)[None, :]
        tl.store(ptr + row_offsets + pairs[None, :], out_a.to(dtype), mask=mask)
        tl.store(ptr + row_offsets + (pairs + HEAD_DIM // 2)[None, :], out_b.to(dtype), mask=mask)
    else:
        lanes = tl.arange(0, 2 * BLOCK_PAIRS)
        mask = mask_rows[:, None] & (lanes < HEAD_DIM)[None, :]
        out = tl.reshape(tl.join(out_a, out_b), (out_a.shape[0], 2 * BLOCK_PAIRS))
        tl.store(ptr + row_offsets + lanes[None, :], out.to(dtype), mask=mask)


@triton.jit
def rotary_qk_kernel(
    # pointers
    Q,  # (B, H, N, D) queries (the forward) or the gradient of the rotated queries (the backward)
    K,  # (B, H, N, D) keys, or the gradient of the rotated keys
    QOut,  # (B, H, N, D) rotated q (or dq), contiguous
    KOut,  # (B, H, N, D) rotated k (or dk), contiguous
    Rope,  # (B|1, H|1, N - P, 2D) [sin, cos] along the last dim, stride 0 in broadcast dims
    # strides (elements)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_ob, stride_oh, stride_on,  # QOut's and KOut's (one contiguous shape), unit in D
    stride_rb, stride_rh, stride_rn, stride_rd,
    # sizes
    batch_heads, heads, n_tokens, num_prefix,
    # meta-parameters
    HEAD_DIM: tl.constexpr,
    BLOCK_PAIRS: tl.constexpr,  # D / 2 padded to a power of two
    BLOCK_N: tl.constexpr,  # rows per program
    HALF: tl.constexpr,  # rotate_half layout, else interleaved
    BACKWARD: tl.constexpr,  # the transposed rotation (gradients)
):
    pid = tl.program_id(0)
    bh = pid % batch_heads  # batch*head fastest: neighbours share embedding rows
    row_block = pid // batch_heads
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, BLOCK_PAIRS)
    in_range = rows < n_tokens
    rotated = rows >= num_prefix  # prefix rows are copied as they are

    # the embedding rows n - P (masked on prefix rows): sin in lanes [0, D), cos in [D, 2D)
    rope = Rope + b * stride_rb + h * stride_rh
    rope_rows = rows - num_prefix
    mask_rope = in_range & rotated
    sin_a, sin_b = _load_pairs(rope, rope_rows, stride_rn, stride_rd, mask_rope, pairs, HEAD_DIM, BLOCK_PAIRS, HALF,
                               0.0)
    cos_a, cos_b = _load_pairs(rope + HEAD_DIM * stride_rd, rope_rows, stride_rn, stride_rd, mask_rope, pairs,
                               HEAD_DIM, BLOCK_PAIRS, HALF, 1.0)

    keep = (~rotated)[:, None]
    out_base = b * stride_ob + h * stride_oh
    x_a, x_b = _load_pairs(Q + b * stride_qb + h * stride_qh, rows, stride_qn, stride_qd, in_range, pairs, HEAD_DIM,
                           BLOCK_PAIRS, HALF, 0.0)
    out_a, out_b = _rotate(x_a, x_b, sin_a, sin_b, cos_a, cos_b, BACKWARD)
    out_a, out_b = tl.where(keep, x_a, out_a), tl.where(keep, x_b, out_b)
    _store_pairs(QOut + out_base, rows, stride_on, in_range, pairs, out_a, out_b, HEAD_DIM, BLOCK_PAIRS, HALF)

    x_a, x_b = _load_pairs(K + b * stride_kb + h * stride_kh, rows, stride_kn, stride_kd, in_range, pairs, HEAD_DIM,
                           BLOCK_PAIRS, HALF, 0.0)
    out_a, out_b = _rotate(x_a, x_b, sin_a, sin_b, cos_a, cos_b, BACKWARD)
    out_a, out_b = tl.where(keep, x_a, out_a), tl.where(keep, x_b, out_b)
    _store_pairs(KOut + out_base, rows, stride_on, in_range, pairs, out_a, out_b, HEAD_DIM, BLOCK_PAIRS, HALF)


# ---------------------------------------------------------------------------------------------
# Launchers: check nothing (fastvit.ops.rotary validates), allocate, launch
# ---------------------------------------------------------------------------------------------
def _rope_strides(rope: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_b, stride_h, stride_n, stride_d) of a rope of 2 to 4 dims, 0 in broadcast dims."""
    padded = [(1, 0)] * (4 - rope.dim()) + list(zip(rope.shape, rope.stride(), strict=True))
    (size_b, stride_b), (size_h, stride_h), (_, stride_n), (_, stride_d) = padded
    return 0 if size_b == 1 else stride_b, 0 if size_h == 1 else stride_h, stride_n, stride_d


def _launch(q, k, rope, num_prefix, half, backward, dtype):
    batch, heads, n_tokens, head_dim = q.shape
    q_out = new_output((batch, heads, n_tokens, head_dim), dtype=dtype, device=q.device)
    k_out = new_output((batch, heads, n_tokens, head_dim), dtype=dtype, device=q.device)
    if q_out.numel() == 0:
        return q_out, k_out
    block_pairs, block_n = rotary_config(head_dim)
    grid = (batch * heads * cdiv(n_tokens, block_n),)
    with device_guard(q):
        rotary_qk_kernel[grid](
            q, k, q_out, k_out, rope,
            *q.stride(), *k.stride(), *q_out.stride()[:3], *_rope_strides(rope),
            batch * heads, heads, n_tokens, num_prefix,
            HEAD_DIM=head_dim, BLOCK_PAIRS=block_pairs, BLOCK_N=block_n, HALF=half, BACKWARD=backward,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return q_out, k_out


def rotary_qk_forward(
    q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor, num_prefix: int, half: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (one launch).

    Args:
        q, k: (B, H, N, D), one dtype (fp16, bf16, fp32), any strides, D even.
        rope: (B|1, H|1, N - P, 2D), or with fewer leading dims: [sin, cos], any float dtype.
        num_prefix: P, the leading rows left unrotated.
        half: timm's ``rotate_half`` layout, else interleaved pairs.

    Returns:
        (q_rot, k_rot), contiguous (B, H, N, D) in q's dtype.
    """
    return _launch(q, k, rope, num_prefix, half, False, q.dtype)


def rotary_qk_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, rope: torch.Tensor, num_prefix: int, half: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of q and k from those of the rotated q and k (one launch, the transposed rotation).

    Args:
        grad_q, grad_k: (B, H, N, D), one dtype, any strides (stride 0 from ``out.sum()`` is fine).
        rope, num_prefix, half: the forward's.

    Returns:
        (dq, dk), contiguous (B, H, N, D) in the gradients' dtype.
    """
    return _launch(grad_q, grad_k, rope, num_prefix, half, True, grad_q.dtype)


# ---------------------------------------------------------------------------------------------
# Ahead of time
# ---------------------------------------------------------------------------------------------
# head dims of the RoPE ViTs: 64 (ViT-B, EVA02-B, DINOv3-S/B), 128 (ViT-g) and EVA02-L's 64; dtypes:
# bf16 activations with timm's fp32 embedding (the usual case), and fp32 throughout
_AOT_HEAD_DIMS = (64, 128)
_AOT_DTYPES = ((torch.bfloat16, torch.float32), (torch.float32, torch.float32))
# strides that are multiples of 16 elements for a contiguous or packed-qkv layout with D = 64 or 128
# (the broadcast embedding's 0 included); the runtime specialises them so too
_ALIGNED_STRIDES = ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn",
                    "stride_ob", "stride_oh", "stride_on", "stride_rb", "stride_rh", "stride_rn")  # fmt: skip


def aot_specs() -> list[KernelSpec]:
    """The forward and backward, both layouts, for each (x dtype, rope dtype) and head dim: x and
    the outputs unit-stride in D (the runtime specialises a stride of 1), rope contiguous."""
    specs = []
    for arch in ARCHS:
        for x_dtype, rope_dtype in _AOT_DTYPES:
            x, r = AOT_DTYPE_NAMES[x_dtype], AOT_DTYPE_NAMES[rope_dtype]
            pointers = {"Q": f"*{x}", "K": f"*{x}", "QOut": f"*{x}", "KOut": f"*{x}", "Rope": f"*{r}",
                        "stride_qd": "constexpr", "stride_kd": "constexpr", "stride_rd": "constexpr"}  # fmt: skip
            sig = signature(rotary_qk_kernel, pointers)
            aligned = tuple(n for n, ty in sig.items() if ty.startswith("*") or n in _ALIGNED_STRIDES)
            for head_dim in _AOT_HEAD_DIMS:
                block_pairs, block_n = rotary_config(head_dim)
                for half in (False, True):
                    for backward in (False, True):
                        specs.append(KernelSpec(
                            "rotary.rotary_qk_kernel",
                            f"x {x} rope {r} D={head_dim} {'half' if half else 'interleaved'} "
                            f"{'bwd' if backward else 'fwd'} BN={block_n} w={NUM_WARPS}",
                            sig,
                            {"stride_qd": 1, "stride_kd": 1, "stride_rd": 1, "HEAD_DIM": head_dim,
                             "BLOCK_PAIRS": block_pairs, "BLOCK_N": block_n, "HALF": half, "BACKWARD": backward},
                            NUM_WARPS, 1, arch, divisible_by_16=aligned,
                        ))  # fmt: skip
    return specs
