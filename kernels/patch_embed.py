"""Patch embedding (strided Conv2d + flatten + transpose + prefix concat + pos add) in Triton.

The convolution with stride = kernel = p is a GEMM over non-overlapping patches::

    tokens[b, P + n, d] = sum_k  A[b*N + n, k] * W[d, k]  + bias[d] + pos[row(n), d]
    A[m, k] = x[b, c, gh*p + i, gw*p + j],   m = b*N + n, n = gh*GW + gw,  k = (c*p + i)*p + j

Forward: one launch. ``A`` is never built: each program gathers its (BLOCK_M, BLOCK_K) tile of
patches straight from the image through its strides, in runs of pixels (an implicit GEMM, see
"Gathering patches" below; channels_last images need no copy), multiplies by the weight (read in
the same virtual-column order: a view of it, or where patch rows are not whole runs, p = 14, a
zero-padded copy of the weight, never of the image: ``_weight_in_virtual_order``) with fp32
accumulation, adds bias and pos_embed in the epilogue and writes its rows into the (B, P+N, D)
token buffer. Extra programs of the same grid write the prefix rows (``prefix_tokens[t] + pos[t]``).

Backward (deterministic, no atomics; ``G[m, d] = dOut[b, P + n, d]``, the patch rows of dOut):
    dW[d, k] = sum_m G[m, d] A[m, k]   split over m into fp32 partials, summed by a second kernel
    S[t, d]  = sum_b dOut[b, t, d]     (fp32, split over b the same way); then, in the op,
               dprefix = S[:P], dpos = S or S[P:], dbias = sum_t S[P:, d]
    dx       = col2im(G @ W)           patches do not overlap, so col2im is a scatter: the GEMM's
                                       epilogue stores each element at its pixel, no accumulation

``EDGE`` programs (timm's ``dynamic_img_pad``) take a grid of ceil(H/p) x ceil(W/p) patches and
mask the pixels past the image, which reads them as zeros: the padding is never materialised.

Precision: fp16/bf16 weights use tensor-core dots with fp32 accumulation; fp32 images are rounded
to the weight's dtype in registers (autocast: fp32 images, bf16 GEMM), not copied first as
F.conv2d's autocast does: by the static model (sm_90, Triton 3.8) the forward converting on load
stays tensor-bound (issue ratio 0.50-0.59 against 0.33-0.43 for bf16 images) and reads 4 bytes a
pixel against 8 (read fp32, write and read bf16) for a cast; the weight gradient converts either
operand through registers and shared memory, and under autocast its token gradient is fp32 too
whenever pos_embed or prefix tokens are fp32 parameters (timm): vec p=16 at 128x128x64 issues at
1.86 with both fp32, 1.69 with bf16 images and fp32 tokens, 0.92 with both bf16 (flat rows; 1.37,
1.25, 0.71 walking image tiles), so a cast of the image alone would buy ~10% of that loop for a
whole extra pass over the image; fp32 weights use IEEE fp32
dots (no TF32). Batch offsets are int64; offsets inside one image are int32 (a view whose offsets
inside an image would reach 2^31 is copied first, ``image_addressable_in_int32``; the op sends
images of 2^31 elements or more to the torch route), and so are the weight gradient's offsets inside
one image's token gradient (``tokens_addressable_in_int32``; the op sends (P+N)*D >= 2^31 to the
torch route). Every launch runs under ``device_guard``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .aot import ARCHS, KernelSpec
from .runtime import (
    AOT_DTYPE_NAMES,
    INTERPRETER,
    GemmConfig,
    arch_of,
    cdiv,
    device_guard,
    dot_precision,
    new_output,
    sm_count,
)

# ---------------------------------------------------------------------------------------------
# Gathering patches: runs of RUN pixels
# ---------------------------------------------------------------------------------------------
# The GEMM's reduction runs over "virtual columns": run u = v // RUN, element v % RUN of it. A patch
# is R rows of row_len elements that are evenly strided in memory: per-channel rows (R = C*p rows of
# p pixels, stride along W) for any image, or pixel rows (R = p rows of p*C values, stride along C)
# for channels_last images. Each row is cut into S = cdiv(row_len, RUN) runs, the last one masked.
# A run starts at an aligned position of its row, so with a unit stride along the row and a row
# length that is a multiple of RUN (p = 16 or 32; channels_last p*C = 48) a run is one vector load.
# RUN is 16, or 8 where a row holds a multiple of 8 but not of 16 elements (p = 8; channels_last
# 8*3 = 24): no padded columns there, and runs of 8 are still 16-byte loads of 16-bit images.
# The patch size p and the elements per pixel along a row (CPR: 1, or C for pixel rows) are
# constexprs, so row_len = p*CPR and S are too and the gather's divisions and moduli are shifts,
# masks or multiply-highs: one compile per (p, CPR), i.e. per patch size for NCHW images and per
# (patch size, channels) for channels_last ones (ViTs use p in {8, 14, 16, 32} and C = 3). The
# weight gradient's loop also splits patch rows into (image, patch) by the runtime N and GW: those
# divisions use magic numbers computed once per program (``_magic_divisor``).
RUN = 16


def run_length(row_len: int) -> int:
    """RUN for rows of ``row_len`` elements: 8 when that divides them and 16 does not, else 16."""
    return 8 if row_len % 16 and row_len % 8 == 0 else RUN


@triton.jit
def _patch_rows(offs_m, N, GW, PATCH: tl.constexpr):
    """Patch rows m -> (image b, patch n, top-left pixel row h0 and column w0)."""
    b = offs_m // N
    n = offs_m % N
    h0 = (n // GW) * PATCH
    w0 = (n % GW) * PATCH
    return b, n, h0, w0


@triton.jit
def _magic_divisor(d):
    """(magic, shift) with n // d == umulhi(2n, magic) >> shift for all 0 <= n < 2^31 (1 <= d < 2^31):
    Granlund and Montgomery's round-up method, shift = ceil(log2 d), magic = ceil(2^(31+shift) / d),
    which lies in [2^31, 2^32). Computed once per program (ceil(log2 d) from the exponent of d - 1
    as a double, exact), so a loop divides by a runtime d in three integer instructions."""
    shift = tl.maximum(((d - 1).to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1022, 0)
    magic = ((tl.full((), 1, tl.int64) << (shift + 31)) + d - 1) // d
    return magic.to(tl.uint32), shift.to(tl.uint32)


@triton.jit
def _divide(n, magic, shift):
    """n // d for 0 <= n < 2^31, with (magic, shift) = _magic_divisor(d)."""
    return (tl.umulhi(n.to(tl.uint32) << 1, magic) >> shift).to(tl.int32)


@triton.jit
def _patch_cols(offs_v, R, PATCH: tl.constexpr, CPR: tl.constexpr, RUN: tl.constexpr):
    """Virtual columns v -> (patch row q, position along the row, pixel row i in the patch, valid).

    Every divisor is a compile-time constant (RUN, S = cdiv(PATCH * CPR, RUN), PATCH): shifts and
    masks for power-of-two patches, a multiply-high for the others (p = 14), never a division."""
    ROW_LEN: tl.constexpr = PATCH * CPR
    S: tl.constexpr = (ROW_LEN + RUN - 1) // RUN
    v = offs_v.to(tl.uint32)
    run = v // RUN
    q = run // S
    pos = (run % S) * RUN + v % RUN
    i = q % PATCH
    if ROW_LEN % RUN == 0:  # noqa: SIM108 (a constexpr branch) -- no padded columns: only the last row bounds the walk
        valid = offs_v < R * S * RUN  # (q < R), written as the weight's mask is
    else:
        valid = (q < R) & (pos < ROW_LEN)
    return q.to(tl.int32), pos.to(tl.int32), i.to(tl.int32), valid


@triton.jit
def _pixel_offsets(q, pos, i, PATCH: tl.constexpr, stride_outer, stride_xh, stride_run):
    """Offset of element ``pos`` of patch row q from the patch's top-left pixel (int32: one image)."""
    return (q.to(tl.uint32) // PATCH).to(tl.int32) * stride_outer + i * stride_xh + pos * stride_run


@triton.jit
def _inside_image(h0, w0, i, pos, H, W, CPR: tl.constexpr):
    """(rows, cols) mask of the pixels that lie inside the image (edge patches of a padded grid)."""
    return (h0[:, None] + i[None, :] < H) & (w0[:, None] + (pos // CPR)[None, :] < W)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["B", "H", "W", "P", "GW", "N", "pos_row0"])
def patch_embed_fwd_kernel(
    X,  # (B, C, H, W) images, any strides
    Wt,  # (D, R*S*RUN) conv weight in virtual-column order (patch rows padded with zeros to S*RUN)
    Bias,  # (D,) bias, or None (HAS_BIAS=False)
    Pos,  # (L, D) position embedding, L = P+N or N, or None (HAS_POS=False)
    Prefix,  # (P, D) prefix tokens (read only when P > 0)
    Out,  # (B, P+N, D) tokens
    stride_xb, stride_xh, stride_xw,
    stride_outer,  # image stride between per-channel patch rows (stride along C), or 0
    stride_run,  # image stride between consecutive elements of a patch row
    stride_wd,
    stride_bias,
    stride_pos_t, stride_pos_d,
    stride_pre_t, stride_pre_d,
    stride_ob, stride_ot, stride_od,
    B, H, W,
    D, P, GW, N,  # embed dim, prefix tokens, patch columns, patches per image
    R,  # patch rows: C*p (per-channel rows) or p (pixel rows)
    pos_row0,  # Pos row of patch 0: P when Pos covers the prefix rows, 0 when it covers patches only
    PATCH: tl.constexpr,  # p
    CPR: tl.constexpr,  # elements per pixel along a row: 1 (per-channel rows) or C (pixel rows)
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    EDGE: tl.constexpr,  # patches may reach past the image (dynamic padding): mask pixels
    BLOCK_M: tl.constexpr,  # patch rows per program
    BLOCK_N: tl.constexpr,  # embed dims per program
    BLOCK_K: tl.constexpr,  # virtual columns per step, a multiple of RUN
    RUN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 weights
):
    ROW_LEN: tl.constexpr = PATCH * CPR  # elements per patch row
    RUNS: tl.constexpr = (ROW_LEN + RUN - 1) // RUN  # runs per patch row (S)
    M = B * N
    num_n = tl.cdiv(D, BLOCK_N)
    num_gemm = tl.cdiv(M, BLOCK_M) * num_n
    pid = tl.program_id(0)
    pid_n = pid % num_n  # programs sharing a block of patches run side by side (L2 reuse of A)
    offs_d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_valid = offs_d < D
    if pid < num_gemm:
        # -- this program's patches and where each one starts in its image; rows past the last
        #    patch (and dims past D) re-read the last one, are never stored, and so need no mask
        #    in the loop: its masks are per column only --
        offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < M
        b, n, h0, w0 = _patch_rows(tl.minimum(offs_m, M - 1), N, GW, PATCH)
        x_rows = X + b.to(tl.int64) * stride_xb + (h0 * stride_xh + w0 * stride_xw)  # int32 inside an image
        # the weight is walked in virtual columns, so its tile is BLOCK_K consecutive elements of
        # each row (vector loads; padded columns hold zeros)
        num_v = R * RUNS * RUN
        w_cols = Wt + tl.minimum(offs_d, D - 1).to(tl.int64) * stride_wd
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for v0 in range(0, num_v, BLOCK_K):
            # -- A tile: gather BLOCK_K // RUN runs of every patch (the implicit im2col) --
            offs_v = v0 + tl.arange(0, BLOCK_K)
            q, pos, i, k_valid = _patch_cols(offs_v, R, PATCH, CPR, RUN)
            x_cols = _pixel_offsets(q, pos, i, PATCH, stride_outer, stride_xh, stride_run)
            if EDGE:
                a_mask = k_valid[None, :] & _inside_image(h0, w0, i, pos, H, W, CPR)
                a = tl.load(x_rows[:, None] + x_cols[None, :], mask=a_mask, other=0.0)
            else:
                a = tl.load(x_rows[:, None] + x_cols[None, :], mask=k_valid[None, :], other=0.0)
            # -- B tile: the matching weight columns, W^T (BLOCK_K, BLOCK_N) --
            w = tl.load(w_cols[None, :] + offs_v[:, None], mask=(offs_v < num_v)[:, None], other=0.0)
            acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        # -- epilogue: bias, pos_embed, store into the patch rows of the token buffer; the rows'
        #    patches are split again (unclamped: rows past the last patch are masked) rather than
        #    kept alive across the loop --
        b = offs_m // N
        n = offs_m % N
        if HAS_BIAS:
            acc += tl.load(Bias + offs_d * stride_bias, mask=d_valid, other=0.0).to(tl.float32)[None, :]
        mask = m_valid[:, None] & d_valid[None, :]
        if HAS_POS:
            pos_rows = Pos + (n + pos_row0).to(tl.int64) * stride_pos_t
            acc += tl.load(pos_rows[:, None] + offs_d[None, :] * stride_pos_d, mask=mask, other=0.0).to(tl.float32)
        out_rows = Out + b.to(tl.int64) * stride_ob + (n + P).to(tl.int64) * stride_ot
        tl.store(out_rows[:, None] + offs_d[None, :] * stride_od, acc.to(Out.dtype.element_ty), mask=mask)
    else:
        # -- prefix rows r = b*P + t: prefix_tokens[t] (+ pos[t] when Pos covers them) --
        offs_r = ((pid - num_gemm) // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        t = offs_r % P
        b = offs_r // P
        mask = (offs_r < B * P)[:, None] & d_valid[None, :]
        val = tl.load(Prefix + t[:, None] * stride_pre_t + offs_d[None, :] * stride_pre_d, mask=mask, other=0.0)
        val = val.to(tl.float32)
        if HAS_POS:
            pos_t = t - P + pos_row0  # negative when Pos covers the patches only
            val += tl.load(Pos + pos_t[:, None] * stride_pos_t + offs_d[None, :] * stride_pos_d,
                           mask=mask & (pos_t >= 0)[:, None], other=0.0).to(tl.float32)
        out_rows = Out + b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot
        tl.store(out_rows[:, None] + offs_d[None, :] * stride_od, val.to(Out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["B", "H", "W", "P", "GW", "N", "steps_per_split"])
def patch_embed_bwd_weight_kernel(
    X,  # (B, C, H, W) images, any strides
    dOut,  # (B, P+N, D) token gradient, any strides (stride 0 from out.sum() is fine)
    dWs,  # (S_split, D, R*row_len) fp32 partial weight gradients in gather order, contiguous
    stride_xb, stride_xh, stride_xw, stride_outer, stride_run,
    stride_gb, stride_gt, stride_gd,
    B, H, W,
    D, P, GW, N,
    R,
    steps_per_split,  # reduction steps (row tiles) summed by one split
    PATCH: tl.constexpr,
    CPR: tl.constexpr,
    EDGE: tl.constexpr,
    IMAGE_TILES: tl.constexpr,  # row tiles of one image each (cdiv(N, BLOCK_M) an image), else of B*N rows
    COMPUTE_DTYPE: tl.constexpr,  # the dot's operand dtype (the forward's weight dtype)
    BLOCK_D: tl.constexpr,  # embed dims per program
    BLOCK_K: tl.constexpr,  # virtual weight columns per program, a multiple of RUN
    BLOCK_M: tl.constexpr,  # patch rows per reduction step
    RUN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    ROW_LEN: tl.constexpr = PATCH * CPR
    RUNS: tl.constexpr = (ROW_LEN + RUN - 1) // RUN
    M = B * N
    K = R * ROW_LEN
    num_k = tl.cdiv(R * RUNS * RUN, BLOCK_K)
    num_d = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    split = pid // (num_d * num_k)
    pid_d = (pid // num_k) % num_d
    pid_k = pid % num_k

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    # -- this program's weight columns: fixed pixel offsets inside every patch --
    q, pos, i, k_valid = _patch_cols(pid_k * BLOCK_K + tl.arange(0, BLOCK_K), R, PATCH, CPR, RUN)
    x_cols = _pixel_offsets(q, pos, i, PATCH, stride_outer, stride_xh, stride_run)
    g_cols = offs_d.to(tl.int64) * stride_gd

    # -- the reduction walks row tiles of BLOCK_M patch rows. IMAGE_TILES: consecutive patches of one
    #    image (its last tile masked), so a step's image is one scalar and a row's address costs a
    #    multiply-high and a few adds; else consecutive rows of all B*N, no tile padded but every
    #    row split into (image, patch) with 64-bit image offsets (the launcher picks: padding) --
    if IMAGE_TILES:
        steps_per_image = (N + BLOCK_M - 1) // BLOCK_M
        num_steps = B * steps_per_image
        magic_s, shift_s = _magic_divisor(steps_per_image)
    else:
        num_steps = tl.cdiv(M, BLOCK_M)
        magic_n, shift_n = _magic_divisor(N)
    s_start = split * steps_per_split
    s_end = tl.minimum(num_steps, s_start + steps_per_split)
    m_end = tl.minimum(M, s_end * BLOCK_M)
    magic_gw, shift_gw = _magic_divisor(GW)
    acc = tl.zeros([BLOCK_D, BLOCK_K], dtype=tl.float32)
    for step in range(s_start, s_end):
        # rows past an image's (or the split's) last re-read it; their G is masked to zero, so the
        # A tile needs no row mask (its mask is per column: loop-invariant outside the padding walk)
        if IMAGE_TILES:
            b = _divide(tl.full((), step, tl.int32), magic_s, shift_s)  # (a tensor under the interpreter too)
            n = (step - b * steps_per_image) * BLOCK_M + tl.arange(0, BLOCK_M)
            row_valid = n < N
            n = tl.minimum(n, N - 1)
        else:
            offs_m = step * BLOCK_M + tl.arange(0, BLOCK_M)
            row_valid = offs_m < m_end
            rows = tl.minimum(offs_m, m_end - 1)
            b = _divide(rows, magic_n, shift_n)
            n = rows - b * N
        gh = _divide(n, magic_gw, shift_gw)
        h0 = gh * PATCH
        w0 = (n - gh * GW) * PATCH
        # -- G^T tile (BLOCK_D, BLOCK_M): the patch rows of dOut (token offsets inside an image in
        #    int32, like the pixels': the op sends images of 2^31 tokens x dims to the torch route) --
        g_rows = (dOut + b.to(tl.int64) * stride_gb) + (n + P) * stride_gt
        g_t = tl.load(g_rows[None, :] + g_cols[:, None], mask=d_valid[:, None] & row_valid[None, :], other=0.0)
        # -- A tile (BLOCK_M, BLOCK_K): the same patches' pixels --
        x_rows = (X + b.to(tl.int64) * stride_xb) + (h0 * stride_xh + w0 * stride_xw)  # int32 inside an image
        a_mask = k_valid[None, :]
        if EDGE:
            a_mask &= _inside_image(h0, w0, i, pos, H, W, CPR)
        a = tl.load(x_rows[:, None] + x_cols[None, :], mask=a_mask, other=0.0)
        acc = tl.dot(g_t.to(COMPUTE_DTYPE), a.to(COMPUTE_DTYPE), acc, input_precision=DOT_PRECISION)
    out = dWs + split.to(tl.int64) * D * K + offs_d[:, None] * K + (q * ROW_LEN + pos)[None, :]
    tl.store(out, acc, mask=d_valid[:, None] & k_valid[None, :])


@triton.jit(do_not_specialize=["B", "H", "W", "P", "GW", "N"])
def patch_embed_bwd_input_kernel(
    dOut,  # (B, P+N, D) token gradient, any strides
    Wt,  # (D, R*S*RUN) forward weight in virtual-column order (as the forward's)
    dX,  # (B, C, H, W) image gradient, any strides; every pixel is written exactly once
    stride_gb, stride_gt, stride_gd,
    stride_wd,
    stride_xb, stride_xh, stride_xw, stride_outer, stride_run,
    B, H, W,
    D, P, GW, N,
    R,
    PATCH: tl.constexpr,
    CPR: tl.constexpr,
    EDGE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # patch rows per program
    BLOCK_K: tl.constexpr,  # virtual columns (pixels of a patch) per program, a multiple of RUN
    BLOCK_D: tl.constexpr,  # reduction step over embed dims
    RUN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    ROW_LEN: tl.constexpr = PATCH * CPR
    RUNS: tl.constexpr = (ROW_LEN + RUN - 1) // RUN
    M = B * N
    num_v = R * RUNS * RUN
    num_k = tl.cdiv(num_v, BLOCK_K)
    pid = tl.program_id(0)
    offs_m = (pid // num_k) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < M
    # rows past the last patch re-read the last one and are never stored: no row mask in the loop
    b, n, h0, w0 = _patch_rows(tl.minimum(offs_m, M - 1), N, GW, PATCH)
    offs_v = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    q, pos, i, k_valid = _patch_cols(offs_v, R, PATCH, CPR, RUN)
    g_rows = dOut + b.to(tl.int64) * stride_gb + (n + P).to(tl.int64) * stride_gt
    # the weight's virtual columns: BLOCK_K consecutive elements of each row (padded ones are zero)
    w_cols = Wt + offs_v
    w_mask = offs_v < num_v

    # -- (G @ W) tile for these patches and pixels; G is zero past D, so W needs no mask there --
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        g = tl.load(g_rows[:, None] + offs_d.to(tl.int64)[None, :] * stride_gd,
                    mask=(offs_d < D)[None, :], other=0.0)
        w = tl.load(w_cols[None, :] + tl.minimum(offs_d, D - 1).to(tl.int64)[:, None] * stride_wd,
                    mask=w_mask[None, :], other=0.0)
        acc = tl.dot(g.to(w.dtype), w, acc, input_precision=DOT_PRECISION)

    # -- col2im: patches do not overlap, so each element lands on its own pixel --
    x_rows = dX + b.to(tl.int64) * stride_xb + (h0 * stride_xh + w0 * stride_xw)  # int32 inside an image
    x_cols = _pixel_offsets(q, pos, i, PATCH, stride_outer, stride_xh, stride_run)
    mask = m_valid[:, None] & k_valid[None, :]
    if EDGE:
        mask &= _inside_image(h0, w0, i, pos, H, W, CPR)
    tl.store(x_rows[:, None] + x_cols[None, :], acc.to(dX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["B", "T", "batches_per_split"])
def patch_embed_bwd_token_sum_kernel(
    dOut,  # (B, T, D) token gradient, any strides
    Partial,  # (S_split, T, D) fp32 sums over each split's images, contiguous
    stride_gb, stride_gt, stride_gd,
    B, T, D,
    batches_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    num_t = tl.cdiv(T, BLOCK_T)
    num_d = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    split = pid // (num_t * num_d)
    offs_t = ((pid // num_d) % num_t) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = (pid % num_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    b_start = split * batches_per_split
    b_end = tl.minimum(B, b_start + batches_per_split)
    ptrs = (dOut + b_start.to(tl.int64) * stride_gb
            + offs_t.to(tl.int64)[:, None] * stride_gt + offs_d.to(tl.int64)[None, :] * stride_gd)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for _ in range(b_start, b_end):  # images in order: deterministic
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += stride_gb
    out = Partial + split.to(tl.int64) * T * D + offs_t[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=mask)


@triton.jit(do_not_specialize=["S"])
def sum_splits_kernel(
    Partial,  # (S_split, numel) fp32, contiguous
    Out,  # (numel,) contiguous, any float dtype
    S, numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    ptrs = Partial + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(0, S):  # in split order: deterministic
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += numel
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configurations (chosen per architecture from the ahead-of-time register/spill report)
# ---------------------------------------------------------------------------------------------
# Under the interpreter: small tiles, so short test grids still cross several tiles of patches and
# embed dims; the weight gradient and col2im take 128 pixels of a patch per program (the
# interpreter's cost is per program and op, and K = C*p*p is the long side on test shapes: 192 to
# 1024 columns, still 2 to 8 tiles, the last one partial).
_INTERPRETER_CONFIGS = {
    "fwd": GemmConfig(32, 32, 32, 4, 1), "dw": GemmConfig(32, 128, 32, 4, 1), "dx": GemmConfig(32, 128, 32, 4, 1)
}

# 16-bit weights, runs loaded as vectors ("vec" walk), per architecture. sm_90: warpgroup MMA on two
# warpgroups; sm_89 (and sm_86, sm_120): 99 KB of shared memory; sm_80: 163 KB. Every entry keeps
# ptxas (Triton 3.8) at <= ~230 registers per thread with no spills, leaving headroom for other
# Triton versions (the GPU machines run 3.6): e.g. the forward's 128x128 tile on 8 warps reaches
# 246-252 registers on sm_80 (fp32 images are converted to bf16 in registers), 128x64 on 8 warps 126.
_VEC_CONFIGS = {
    "fwd": {90: GemmConfig(128, 128, 64, 8, 3), 89: GemmConfig(128, 64, 32, 8, 3), 80: GemmConfig(128, 64, 32, 8, 3)},
    "dw": {90: GemmConfig(128, 128, 64, 8, 3), 89: GemmConfig(64, 128, 32, 8, 3), 80: GemmConfig(128, 128, 32, 8, 3)},
    "dx": {90: GemmConfig(128, 128, 64, 8, 2), 89: GemmConfig(128, 64, 32, 4, 3), 80: GemmConfig(128, 128, 32, 8, 3)},
}
# 16-bit weights, unit strides but rows that are not whole runs ("aligned" walk: p = 14, rows of 14
# padded to runs of 16): the image side loads pairs of pixels, the weight (padded, see
# ``_weight_in_virtual_order``) and the gradient 16-byte vectors. The vec tiles, except the image
# gradient: its col2im epilogue stores pairs of pixels, each with its own address, and the vec
# tiles reached 254-255 registers (fp32 images; sm_90 128x128x64 233 with bf16 ones), so 128 rows
# x 64 pixels: sm_90 with 128 embed dims per step (194 / 92 registers, issue ratio 0.80 / 0.51),
# sm_80 and sm_89 32 on 8 warps (126 and 128 registers; Triton 3.8, 2026-12-04).
_ALIGNED_CONFIGS = {
    "fwd": {90: GemmConfig(128, 128, 64, 8, 3), 89: GemmConfig(128, 64, 32, 8, 3), 80: GemmConfig(128, 64, 32, 8, 3)},
    "dw": {90: GemmConfig(128, 128, 64, 8, 3), 89: GemmConfig(64, 128, 32, 8, 3), 80: GemmConfig(128, 128, 32, 8, 3)},
    "dx": {90: GemmConfig(128, 64, 128, 8, 2), 89: GemmConfig(128, 64, 32, 8, 3), 80: GemmConfig(128, 64, 32, 8, 3)},
}
# The weight gradient on sm_90 when images and token gradients are both 16-bit (no conversion in
# registers, both tiles cp.async): wider tiles, since its loop is issue-bound on the patch rows'
# addresses (each row a thread loads costs a multiply-high and 64-bit adds, and rows per thread
# grow with BLOCK_M x tile width / vector width). Figures of the all-bf16 stem (Triton 3.8,
# 2026-12-04; flat rows / image tiles, ``dw_image_tiles``): vec p=16 128x128x64 0.92 / 0.71 ->
# 128x256x64 0.73 / 0.48 (168 / 198 registers); aligned p=14 (pairs of pixels: 4x the rows of vec)
# 128x128x64 2.29 / 1.42 -> 256x64x64 1.66 / 1.16 (165 / 124; 256x128x64 image tiles reach 0.84 at
# 252 registers, 128x256x64 1.15 at 242). With fp32 images the wide tiles reach 255 registers and
# spill, so the autocast recipes keep the tables above; so do launches with dynamic padding (its
# per-pixel masks: 242 registers at 128x256x64, bf16).
_DW_16BIT_SM90 = {"vec": GemmConfig(128, 256, 64, 8, 3), "aligned": GemmConfig(256, 64, 64, 8, 3)}
# 16-bit weights, element-wise gathers ("gather" walk: strided views, odd widths). Every
# address and the row indices of each patch stay in registers across the loop, so the tiles are
# small; sm_90 keeps 64 rows, the least warpgroup MMA takes, on 8 warps (on 4: 251-254 registers);
# its forward and weight gradient take wider steps (64x128x32 forward: 180 registers, issue ratio
# 2.59 against 4.97 at 64x64x32; weight gradient 64x128x64: 195, 8.1 against 12.7 at 64x128x32;
# 128-row tiles spill; Triton 3.8, 2026-12-04).
_GATHER_CONFIGS = {
    "fwd": {90: GemmConfig(64, 128, 32, 8, 3), 89: GemmConfig(32, 64, 16, 4, 2), 80: GemmConfig(32, 64, 16, 4, 2)},
    "dw": {90: GemmConfig(64, 128, 64, 8, 2), 89: GemmConfig(64, 128, 32, 8, 3), 80: GemmConfig(64, 128, 32, 8, 3)},
    "dx": {90: GemmConfig(64, 64, 32, 8, 2), 89: GemmConfig(32, 64, 32, 4, 2), 80: GemmConfig(32, 64, 32, 4, 2)},
}
# fp32 weights: IEEE fp32 dots run on FMA units, small tiles on every architecture (an FMA dot holds
# a row of A and a column of B per thread: the forward's 64x64x32 tile on 4 warps hits 255 on sm_80).
_FP32_CONFIGS = {  # keyed by vec
    True: {"fwd": GemmConfig(64, 64, 32, 8, 2), "dw": GemmConfig(64, 64, 32, 8, 2), "dx": GemmConfig(64, 64, 32, 4, 2)},
    False: {
        "fwd": GemmConfig(32, 64, 16, 8, 2), "dw": GemmConfig(64, 64, 16, 4, 2), "dx": GemmConfig(32, 64, 32, 4, 2)
    },
}


def gemm_config(kernel: str, arch: int, dtype: torch.dtype, walk: str, io16: bool = False) -> GemmConfig:
    """Tiles of one GEMM kernel for (architecture, weight dtype, walk).

    Args:
        kernel: "fwd" (patch rows, embed dims, pixels per step), "dw" (embed dims, weight columns,
            patch rows per step) or "dx" (patch rows, pixels, embed dims per step).
        walk: "vec", "aligned" or "gather" (``walk_kind``).
        io16: the weight gradient's images and token gradient are both 16-bit (not autocast's fp32)
            and it has no padding masks (``_DW_16BIT_SM90``).
    """
    if INTERPRETER:
        return _INTERPRETER_CONFIGS[kernel]
    if dtype == torch.float32:
        return _FP32_CONFIGS[walk != "gather"][kernel]
    # sm_80 and sm_90 (and sm_100) have large shared memories; the rest (sm_86, sm_89, sm_120) 99 KB
    key = 80 if arch == 80 else 90 if 90 <= arch < 120 else 89
    if kernel == "dw" and key == 90 and io16 and walk in _DW_16BIT_SM90:
        return _DW_16BIT_SM90[walk]
    return {"vec": _VEC_CONFIGS, "aligned": _ALIGNED_CONFIGS, "gather": _GATHER_CONFIGS}[walk][kernel][key]


# token sums: (tokens, embed dims) per program; the reduction over splits: elements per program
TOKEN_SUM_BLOCK = (16, 128)
SUM_SPLITS_BLOCK = 1024


def dw_image_tiles(patches: int, block_m: int) -> bool:
    """Whether the weight gradient walks row tiles of one image each (``IMAGE_TILES``): when that
    pads at most 1/16 of the rows (N = 256 at p = 14 / 224 px, 1369 at 518 px, 576 at p = 16 / 384
    px), not at N = 196 (p = 16, 224 px: 64-row tiles pad 31%, tensor time the static model does not
    count in the loop's issue ratio)."""
    padded = cdiv(patches, block_m) * block_m - patches
    return 16 * padded <= patches


def _programs_wanted(device: torch.device) -> int:
    """About two waves of programs: enough to fill the GPU when a reduction is split."""
    if device.type != "cuda":
        return 8  # the interpreter: small, but more than one split on test shapes
    return 2 * sm_count(device)


def _split(total: int, step: int, tiles: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """Split ``total`` reduction items (in multiples of ``step``) so that ``tiles`` x splits fills
    the GPU; returns (items per split, number of splits)."""
    wanted = splits if splits is not None else cdiv(_programs_wanted(device), max(tiles, 1))
    wanted = max(1, min(wanted, cdiv(total, step)))
    per_split = cdiv(cdiv(total, wanted), step) * step
    return per_split, cdiv(total, per_split)


# ---------------------------------------------------------------------------------------------
# Launchers (inputs already validated by fastvit.ops.patch_embed)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gather:
    """How the kernels walk a patch of one image layout: ``rows`` rows of ``row_len`` elements.

    Per-channel rows (any strides): C*p rows of p pixels, ``stride_outer`` between channels and
    ``stride_run`` along W. Pixel rows (channels_last images): p rows of p*C values, consecutive in
    memory, so runs are long and contiguous; the weight is then walked in (i, j, c) order.
    """

    rows: int  # R
    row_len: int
    run: int  # RUN (``run_length``)
    stride_outer: int
    stride_run: int
    cpr: int  # elements per pixel along a row: 1, or C for pixel rows

    @property
    def pixel_rows(self) -> bool:
        return self.cpr > 1

    @property
    def runs(self) -> int:  # S = cdiv(row_len, RUN)
        return cdiv(self.row_len, self.run)

    @property
    def virtual_cols(self) -> int:  # R * S * RUN: the GEMM's reduction length, padded rows included
        return self.rows * self.runs * self.run


def gather_plan(x: torch.Tensor, patch: int) -> Gather:
    """The walk for ``x``'s strides: pixel rows when C > 1 and a pixel's channels sit side by side
    with the next pixel's (channels_last), per-channel rows otherwise."""
    chans = x.shape[1]
    _, stride_c, _, stride_w = x.stride()
    if chans > 1 and stride_c == 1 and stride_w == chans:
        row_len = patch * chans
        return Gather(patch, row_len, run_length(row_len), 0, 1, chans)
    return Gather(chans * patch, patch, run_length(patch), stride_c, stride_w, 1)


def walk_kind(
    image: torch.Tensor, plan: Gather, patch: int, dim: int, grad_out: torch.Tensor | None = None
) -> str:
    """The AOT specs' walk whose tiles a launch takes, from what Triton's argument specialisation
    will see: "aligned" with unit strides along rows and D and 16-divisible embed dim, strides and
    addresses; "vec" when runs are vector loads too (rows and patches a multiple of RUN: p = 8, 16,
    32); "gather" otherwise (scalar loads of the image and gradient)."""
    ok = plan.stride_run == 1 and dim % 16 == 0 and image.data_ptr() % 16 == 0
    ok = ok and all(st % 16 == 0 for st in (image.stride(0), image.stride(2), plan.stride_outer))
    if grad_out is not None:
        ok = ok and grad_out.stride(2) == 1 and grad_out.data_ptr() % 16 == 0
        ok = ok and grad_out.stride(0) % 16 == 0 and grad_out.stride(1) % 16 == 0
    if not ok:
        return "gather"
    return "vec" if patch % plan.run == 0 and plan.row_len % plan.run == 0 else "aligned"


def grid_size(height: int, width: int, patch: int, pad: bool) -> tuple[int, int]:
    """Patch rows and columns of an image: floor division, or ceil with dynamic padding."""
    if pad:
        return cdiv(height, patch), cdiv(width, patch)
    return height // patch, width // patch


def _weight_in_virtual_order(weight: torch.Tensor, plan: Gather) -> torch.Tensor:
    """(D, C, p, p) -> (D, R*S*RUN) with unit stride along a row: the weight in the order the plan
    walks a patch, each patch row padded with zeros to whole runs (the kernels' virtual columns).

    A view for a contiguous weight and per-channel rows (or a channels_last weight and pixel rows)
    whose rows are whole runs (p = 8, 16, 32; channels_last 16*3); otherwise a copy of the weight
    (never the image): for p = 14, D*R*16 elements, 8/7 of the weight. The copy is what lets the
    forward and the image gradient load the weight's tile as 16-byte vectors with one mask per
    step: rows of 14 elements leave offsets 4-byte aligned at best and the weight's row stride C*196
    is not 16-divisible, so in gather order each element was its own 2-byte load and shared-memory store
    (sm_90, Triton 3.8: 8 of each per thread per 64x64x32 step of the forward)."""
    w = weight.permute(0, 2, 3, 1) if plan.pixel_rows else weight
    flat = w.reshape(w.shape[0], -1)
    if plan.row_len % plan.run == 0:
        return flat if flat.stride(1) == 1 else flat.contiguous()
    rows = flat.reshape(flat.shape[0], plan.rows, plan.row_len)
    return F.pad(rows, (0, plan.runs * plan.run - plan.row_len)).view(flat.shape[0], -1)


def _edge(height: int, width: int, patch: int, pad: bool) -> bool:
    return pad and (height % patch != 0 or width % patch != 0)


# Offsets inside one image (channel, row and column terms) are int32 in the kernels; the batch term
# is int64. One image of 2^31 elements or more is left to the torch route by the op.
INT32_SPAN = 2**31


def image_addressable_in_int32(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, unless an offset inside one image reaches 2^31 (a view with a huge channel or
    row stride, e.g. a batch-minor permute of a large batch): then a copy in x's layout (channels_last
    stays channels_last, so the walk and the weight gradient's layout do not change), whose offsets
    inside one image stay below C*H*W."""
    span = sum(abs(st) * (size - 1) for st, size in zip(x.stride()[1:], x.shape[1:], strict=True) if size > 0)
    if span < INT32_SPAN:
        return x
    layout = torch.channels_last if gather_plan(x, 1).pixel_rows else torch.contiguous_format
    return x.contiguous(memory_format=layout)


def tokens_addressable_in_int32(grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out`` (B, T, D) itself, unless an offset inside one image's tokens reaches 2^31 (a view
    with huge strides): then a contiguous copy, whose offsets stay below T*D (< 2^31, the op's rule)."""
    span = sum(abs(st) * (size - 1) for st, size in zip(grad_out.stride()[1:], grad_out.shape[1:], strict=True))
    return grad_out if span < INT32_SPAN else grad_out.contiguous()


def patch_embed_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    prefix_tokens: torch.Tensor | None,
    pad: bool,
) -> torch.Tensor:
    """Launch the forward kernel.

    Args:
        x: (B, C, H, W) images, any strides, fp32 or the weight's dtype.
        weight: (D, C, p, p); bias: (D,) or None, in the weight's dtype.
        pos_embed: (1, P+N, D) or (1, N, D), or None; prefix_tokens: (1, P, D) with P >= 1, or
            None; both in the output dtype (the weight's, or fp32 under autocast).
        pad: the grid is ceil(H/p) x ceil(W/p) and pixels past the image read as zeros; without
            it H and W are multiples of p.

    Returns:
        (B, P+N, D) tokens, contiguous, in the dtype of prefix_tokens / pos_embed if given, else
        the weight's.
    """
    batch, _, height, width = x.shape
    dim, patch = weight.shape[0], weight.shape[-1]
    gh, gw = grid_size(height, width, patch, pad)
    n = gh * gw
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    out_dtype = next((t.dtype for t in (prefix_tokens, pos_embed) if t is not None), weight.dtype)
    out = new_output((batch, num_prefix + n, dim), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    x = image_addressable_in_int32(x)
    plan = gather_plan(x, patch)
    w = _weight_in_virtual_order(weight, plan)
    cfg = gemm_config("fwd", arch_of(x.device), weight.dtype, walk_kind(x, plan, patch, dim))
    num_n = cdiv(dim, cfg.block_n)
    grid = ((cdiv(batch * n, cfg.block_m) + cdiv(batch * num_prefix, cfg.block_m)) * num_n,)
    pos = pos_embed[0] if pos_embed is not None else None
    pre = prefix_tokens[0] if num_prefix else out[0]  # out[0]: a placeholder, never read when P == 0
    with device_guard(x):
        patch_embed_fwd_kernel[grid](
            x, w, bias, pos, pre, out,
            x.stride(0), x.stride(2), x.stride(3), plan.stride_outer, plan.stride_run,
            w.stride(0),
            bias.stride(0) if bias is not None else 0,
            *(pos.stride() if pos is not None else (0, 0)),
            *pre.stride(),
            *out.stride(),
            batch, height, width,
            dim, num_prefix, gw, n,
            plan.rows,
            num_prefix if pos is not None and pos.shape[0] == num_prefix + n else 0,
            PATCH=patch, CPR=plan.cpr,
            HAS_BIAS=bias is not None, HAS_POS=pos is not None, EDGE=_edge(height, width, patch, pad),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, RUN=plan.run,
            DOT_PRECISION=dot_precision(weight.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def _sum_splits(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (contiguous, numel = partial[0].numel()) = partial.sum(0), summed in split order."""
    numel = out.numel()
    with device_guard(out):
        sum_splits_kernel[(cdiv(numel, SUM_SPLITS_BLOCK),)](
            partial, out, partial.shape[0], numel, BLOCK=SUM_SPLITS_BLOCK, num_warps=4
        )
    return out


def weight_grad_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A new (D, C, p, p) weight gradient laid out in the gather order of ``x`` (channels_last
    images give a channels_last gradient), in the weight's dtype."""
    dim, chans, patch, _ = weight.shape
    if gather_plan(x, patch).pixel_rows:
        return new_output((dim, patch, patch, chans), dtype=weight.dtype, device=weight.device).permute(0, 3, 1, 2)
    return new_output((dim, chans, patch, patch), dtype=weight.dtype, device=weight.device)


def patch_embed_backward_weight(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pad: bool, splits: int | None = None
) -> torch.Tensor:
    """dW (D, C, p, p) in the weight's dtype (layout: ``weight_grad_like``).

    Args:
        grad_out: (B, P+N, D) gradient of the tokens, any strides.
        x: (B, C, H, W) the forward's images; weight: the forward's (D, C, p, p) weight.
        pad: as in the forward.
        splits: how many partial sums the patch rows are split into (default: enough programs to
            fill the GPU); the partials are summed in a fixed order, so the result is deterministic.
    """
    batch, _, height, width = x.shape
    dim, patch = weight.shape[0], weight.shape[-1]
    gh, gw = grid_size(height, width, patch, pad)
    n = gh * gw
    dw = weight_grad_like(x, weight)
    if dw.numel() == 0:
        return dw
    if batch * n == 0:
        return dw.zero_()
    x = image_addressable_in_int32(x)
    grad_out = tokens_addressable_in_int32(grad_out)
    plan = gather_plan(x, patch)
    dw_flat = (dw.permute(0, 2, 3, 1) if plan.pixel_rows else dw).view(dim, -1)  # gather order
    edge = _edge(height, width, patch, pad)
    io16 = x.element_size() == 2 and grad_out.element_size() == 2 and not edge
    cfg = gemm_config("dw", arch_of(x.device), weight.dtype, walk_kind(x, plan, patch, dim, grad_out), io16)
    tiles = cdiv(dim, cfg.block_m) * cdiv(plan.virtual_cols, cfg.block_n)
    image_tiles = dw_image_tiles(n, cfg.block_k)
    steps = batch * cdiv(n, cfg.block_k) if image_tiles else cdiv(batch * n, cfg.block_k)
    steps_per_split, num_splits = _split(steps, 1, tiles, x.device, splits)
    partial = new_output((num_splits, *dw_flat.shape), dtype=torch.float32, device=x.device)
    with device_guard(x):
        patch_embed_bwd_weight_kernel[(tiles * num_splits,)](
            x, grad_out, partial,
            x.stride(0), x.stride(2), x.stride(3), plan.stride_outer, plan.stride_run,
            *grad_out.stride(),
            batch, height, width,
            dim, grad_out.shape[1] - n, gw, n,
            plan.rows,
            steps_per_split,
            PATCH=patch, CPR=plan.cpr,
            EDGE=edge, IMAGE_TILES=image_tiles,
            COMPUTE_DTYPE=_TL_DTYPE[weight.dtype],
            BLOCK_D=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_M=cfg.block_k, RUN=plan.run,
            DOT_PRECISION=dot_precision(weight.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    _sum_splits(partial, dw_flat)
    return dw


def image_like(x: torch.Tensor) -> torch.Tensor:
    """A new (B, C, H, W) tensor in x's dtype and memory format (channels_last stays channels_last)."""
    batch, chans, height, width = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return new_output((batch, height, width, chans), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)
    return new_output((batch, chans, height, width), dtype=x.dtype, device=x.device)


def patch_embed_backward_input(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pad: bool
) -> torch.Tensor:
    """dx (B, C, H, W) in x's dtype and memory format (``image_like``): col2im(G @ W) as one GEMM
    whose epilogue scatters each element to its pixel.

    Args:
        grad_out: (B, P+N, D) gradient of the tokens, any strides.
        x: the forward's images (for their shape, dtype and layout); weight: the forward's weight.
        pad: as in the forward (the padding is never stored, so it gets no gradient).
    """
    batch, _, height, width = x.shape
    dim, patch = weight.shape[0], weight.shape[-1]
    gh, gw = grid_size(height, width, patch, pad)
    n = gh * gw
    dx = image_like(x)
    if dx.numel() == 0:
        return dx
    if dim == 0:
        return dx.zero_()
    plan = gather_plan(dx, patch)
    w = _weight_in_virtual_order(weight, plan)
    cfg = gemm_config("dx", arch_of(x.device), weight.dtype, walk_kind(dx, plan, patch, dim, grad_out))
    grid = (cdiv(batch * n, cfg.block_m) * cdiv(plan.virtual_cols, cfg.block_n),)
    with device_guard(dx):
        patch_embed_bwd_input_kernel[grid](
            grad_out, w, dx,
            *grad_out.stride(),
            w.stride(0),
            dx.stride(0), dx.stride(2), dx.stride(3), plan.stride_outer, plan.stride_run,
            batch, height, width,
            dim, grad_out.shape[1] - n, gw, n,
            plan.rows,
            PATCH=patch, CPR=plan.cpr,
            EDGE=_edge(height, width, patch, pad),
            BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_n, BLOCK_D=cfg.block_k, RUN=plan.run,
            DOT_PRECISION=dot_precision(weight.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dx


def patch_embed_backward_tokens(grad_out: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """(T, D) fp32 sum over the batch of the token gradient (B, T, D), any strides.

    The op derives dprefix_tokens (rows :P), dpos_embed (all rows, or rows P:) and dbias (the sum
    of rows P:) from it. Split over the batch into fp32 partials, summed in a fixed order.
    """
    batch, tokens, dim = grad_out.shape
    out = new_output((tokens, dim), dtype=torch.float32, device=grad_out.device)
    if out.numel() == 0:
        return out
    if batch == 0:
        return out.zero_()
    block_t, block_d = TOKEN_SUM_BLOCK if not INTERPRETER else (8, 32)
    tiles = cdiv(tokens, block_t) * cdiv(dim, block_d)
    per_split, num_splits = _split(batch, 1, tiles, grad_out.device, splits)
    partial = new_output((num_splits, tokens, dim), dtype=torch.float32, device=grad_out.device)
    with device_guard(grad_out):
        patch_embed_bwd_token_sum_kernel[(tiles * num_splits,)](
            grad_out, partial, *grad_out.stride(), batch, tokens, dim, per_split,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
        )
    return _sum_splits(partial, out)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every configuration the launchers can pick
# ---------------------------------------------------------------------------------------------
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# (image, weight = GEMM operand, token) dtypes the op passes: plain fp16 / bf16 / fp32, and under
# autocast fp32 (or autocast-dtype) images with a 16-bit GEMM and 16-bit or fp32 tokens (fp32 when
# fp32 prefix tokens or pos_embed take part, as torch.cat and + would promote).
DTYPE_RECIPES: tuple[tuple[torch.dtype, torch.dtype, torch.dtype], ...] = (
    (torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float16, torch.float32),
    (torch.float32, torch.float16, torch.float16),
    (torch.float16, torch.float16, torch.float32),
)

# Runtime specialisation, which the specs mirror: Triton compiles an int argument equal to 1 as a
# constant and marks one divisible by 16 (sizes in a kernel's do_not_specialize never are); PATCH and
# CPR are constexprs, so each (patch size, layout) is its own compile. Walks:
#   "vec"     the common case (``walk_kind``): unit strides along rows and D, 16-divisible
#             sizes and strides, so runs are vector loads; the large tiles. NCHW (stride_xw = 1) or
#             channels_last ("C=3": pixel rows, stride_xw = C, neither 1 nor 16-divisible); p = 8
#             walks runs of 8 (R = 3*8 is not 16-divisible).
#   "edge"    "vec" plus the dynamic-padding masks.
#   "aligned" a contiguous NCHW image whose patch is not a multiple of 8 (p = 14): unit and
#             16-divisible strides, but R = C*p is not 16-divisible and the image's runs are pairs of
#             pixels; the weight, padded to runs, is vectors (its row stride R*16 is 16-divisible).
#   "gather"  the worst case: no unit stride or 16-divisible size on the image or gradient side,
#             scalar loads (every address in registers), with the padding masks; the small tiles.
# The op makes bias, pos_embed and prefix_tokens unit-stride along D, and the launchers allocate
# the tokens, the weight in virtual-column order (rows of R*S*RUN elements: a multiple of 16 for
# every patch and layout a ViT uses) and the partial sums, so those are unit-stride everywhere.
# Bias, Pos and Prefix are parameters (16-byte aligned unless a user passes an odd view, which
# only narrows the epilogue's loads).
_ALWAYS_UNIT = {"stride_bias", "stride_pos_d", "stride_pre_d", "stride_od"}
_UNIT_IN_VEC = {"stride_run", "stride_gd"}
_OURS = {"Wt", "Out", "dWs", "Partial", "Bias", "Pos", "Prefix"}  # 16-byte aligned
_OURS_DIVISIBLE = {"stride_wd"}  # the virtual-order weight's row stride


@dataclasses.dataclass(frozen=True)
class _Walk:
    """One AOT walk: the tiles (``walk_kind``), the argument specialisation and the patch."""

    kind: str  # "vec", "edge", "aligned" or "gather" (above)
    patch: int
    cpr: int = 1  # C for a channels_last image (pixel rows), else 1
    odd: frozenset[str] = frozenset()  # ints that are not 16-divisible in this walk

    @property
    def label(self) -> str:
        return f"{self.kind} p={self.patch}" + (f" C={self.cpr}" if self.cpr > 1 else "")

    @property
    def tiles(self) -> str:  # the launchers' ``walk_kind``
        return "vec" if self.kind == "edge" else self.kind

    @property
    def aligned(self) -> bool:
        return self.kind != "gather"

    @property
    def edge(self) -> bool:
        return self.kind in ("edge", "gather")


def _signature(kernel, pointers: dict[str, str], walk: _Walk) -> tuple[dict[str, str], dict[str, int], tuple]:
    """Signature, constant-1 arguments and 16-divisible arguments of ``kernel`` for one walk."""
    sig: dict[str, str] = {}
    ones: dict[str, int] = {}
    divisible = []
    unit = _ALWAYS_UNIT | (_UNIT_IN_VEC if walk.aligned else set()) | (
        {"stride_xw"} if walk.aligned and walk.cpr == 1 else set())
    for index, name in enumerate(kernel.arg_names):
        param = kernel.params[index]
        if name in pointers:
            sig[name] = pointers[name]
            if walk.aligned or name in _OURS:
                divisible.append(name)
        elif param.is_constexpr:
            sig[name] = "constexpr"
        elif name in unit:
            sig[name], ones[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            ours = name in _OURS_DIVISIBLE
            if ours or (not param.do_not_specialize and walk.aligned and name not in walk.odd and name != "stride_xw"):
                divisible.append(name)
    return sig, ones, tuple(divisible)


# What is compiled ahead of time, per architecture: each GEMM kernel in the heaviest recipe of each
# (dtype class, walk) -- fp32 images and fp32 tokens around a bf16 GEMM (autocast), the widest loads
# and stores, the images converted in registers -- and the fp32 (IEEE) path; on sm_90 also the
# all-bf16 stem (the performance target, operands straight from memory into warpgroup MMA). The
# other recipes go through the same configurations with narrower loads and stores (fp16 and bf16
# MMAs are the same instructions): in every comparison made (fp16 vs fp32-image recipes, all
# three architectures) they took fewer registers and less shared memory. The patch sizes are the
# ViTs' (16; 14 for DINOv2 and EVA02; 8 and 32) and channels_last RGB at 16; the less common ones on
# sm_80 and sm_90 only (sm_89 has sm_80's instructions, on smaller tiles). The weight gradient is
# compiled in both reduction walks (rows=image / rows=flat, ``dw_image_tiles``), and on sm_90 the
# all-16-bit stem takes its own tiles (``_DW_16BIT_SM90``; fp16 as bf16). 110 compiles.
_VEC16, _EDGE16, _GATHER14 = _Walk("vec", 16), _Walk("edge", 16), _Walk("gather", 14)
_ALIGNED14 = _Walk("aligned", 14, odd=frozenset({"R"}))
_MORE_PATCHES = (_Walk("vec", 32), _Walk("vec", 16, 3), _Walk("vec", 8, odd=frozenset({"R"})))
_AOT_RECIPES = (
    ((torch.float32, torch.bfloat16, torch.float32), (_VEC16, _EDGE16, _ALIGNED14, _GATHER14), ARCHS),
    ((torch.float32, torch.bfloat16, torch.float32), _MORE_PATCHES, (80, 90)),
    ((torch.bfloat16, torch.bfloat16, torch.bfloat16), (_VEC16, _ALIGNED14), (90,)),
    ((torch.float32, torch.float32, torch.float32), (_VEC16, _GATHER14), ARCHS),
)


def _gemm_specs(arch: int, recipe: tuple[torch.dtype, ...], walk: _Walk) -> list[KernelSpec]:
    xdt, wdt, odt = recipe
    x, w, o = AOT_DTYPE_NAMES[xdt], AOT_DTYPE_NAMES[wdt], AOT_DTYPE_NAMES[odt]
    label = f"x {x} w {w} out {o} {walk.label}"
    common = {"EDGE": walk.edge, "RUN": run_length(walk.patch * walk.cpr), "DOT_PRECISION": dot_precision(wdt),
              "PATCH": walk.patch, "CPR": walk.cpr}  # fmt: skip
    mma = wdt != torch.float32
    specs = []
    cfg = gemm_config("fwd", arch, wdt, walk.tiles)
    sig, ones, div = _signature(patch_embed_fwd_kernel, {
        "X": f"*{x}", "Wt": f"*{w}", "Bias": f"*{w}", "Pos": f"*{o}", "Prefix": f"*{o}", "Out": f"*{o}"}, walk)
    specs.append(KernelSpec(
        "patch_embed.patch_embed_fwd_kernel", f"{label} {_label(cfg)}", sig,
        {**ones, **common, "HAS_BIAS": True, "HAS_POS": True,
         "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k},
        cfg.num_warps, cfg.num_stages, arch, needs_wgmma=mma, divisible_by_16=div,
    ))
    cfg = gemm_config("dw", arch, wdt, walk.tiles, xdt.itemsize == 2 and odt.itemsize == 2 and not walk.edge)
    sig, ones, div = _signature(patch_embed_bwd_weight_kernel, {"X": f"*{x}", "dOut": f"*{o}", "dWs": "*fp32"}, walk)
    for image_tiles in (True, False):  # both reduction walks (``dw_image_tiles``)
        specs.append(KernelSpec(
            "patch_embed.patch_embed_bwd_weight_kernel",
            f"{label} rows={'image' if image_tiles else 'flat'} {_label(cfg)}", sig,
            {**ones, **common, "COMPUTE_DTYPE": _TL_DTYPE[wdt], "IMAGE_TILES": image_tiles,
             "BLOCK_D": cfg.block_m, "BLOCK_K": cfg.block_n, "BLOCK_M": cfg.block_k},
            cfg.num_warps, cfg.num_stages, arch, needs_wgmma=mma, divisible_by_16=div,
        ))
    cfg = gemm_config("dx", arch, wdt, walk.tiles)
    sig, ones, div = _signature(patch_embed_bwd_input_kernel, {"dOut": f"*{o}", "Wt": f"*{w}", "dX": f"*{x}"}, walk)
    specs.append(KernelSpec(
        "patch_embed.patch_embed_bwd_input_kernel", f"{label} {_label(cfg)}", sig,
        {**ones, **common, "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_n, "BLOCK_D": cfg.block_k},
        cfg.num_warps, cfg.num_stages, arch, needs_wgmma=mma, divisible_by_16=div,
    ))
    return specs


def aot_specs() -> list[KernelSpec]:
    """The GEMM kernels' (recipe, walk) configurations of ``_AOT_RECIPES`` and the two reductions,
    for every architecture. The forward is compiled with bias and pos_embed present (its largest
    variant); without them its epilogue only loses loads."""
    specs = []
    for arch in ARCHS:
        for recipe, walks, archs in _AOT_RECIPES:
            for walk in walks if arch in archs else ():
                specs.extend(_gemm_specs(arch, recipe, walk))
        block_t, block_d = TOKEN_SUM_BLOCK
        sig, ones, div = _signature(patch_embed_bwd_token_sum_kernel, {"dOut": "*fp32", "Partial": "*fp32"}, _VEC16)
        specs.append(KernelSpec(
            "patch_embed.patch_embed_bwd_token_sum_kernel", f"dOut fp32 BT={block_t} BD={block_d} w=4",
            sig, {**ones, "BLOCK_T": block_t, "BLOCK_D": block_d}, 4, 3, arch, divisible_by_16=div,
        ))
        sig, ones, div = _signature(sum_splits_kernel, {"Partial": "*fp32", "Out": "*bf16"}, _VEC16)
        specs.append(KernelSpec(
            "patch_embed.sum_splits_kernel", f"out bf16 BLOCK={SUM_SPLITS_BLOCK} w=4",
            sig, {**ones, "BLOCK": SUM_SPLITS_BLOCK}, 4, 3, arch, divisible_by_16=div,
        ))
    return specs


def _label(cfg: GemmConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w={cfg.num_warps} s={cfg.num_stages}"
