"""Flash attention (FlashAttention-2 style) forward and backward in Triton.

Forward, per (query block, batch*head) program: stream key/value blocks through SRAM, keep the
running row max ``m`` and row sum ``l`` of the online softmax in fp32, rescale the accumulator when
the max grows, and write ``out = acc / l`` and the natural-log ``lse = (m + log2 l) * ln 2`` once.
``exp2`` is used throughout, with ``log2(e)`` folded into the softmax scale. Nothing N x M is ever
written to memory.

Backward (FlashAttention-2, no atomics, deterministic), two launches in stream order:
    1. per query block: ``delta_i = sum_d dO_id * O_id`` (fp32, written for the next pass)
                        ``P = exp2(Q K^T * scale*log2e - lse*log2e)``
                        ``dS = P * (dO V^T - delta)``; ``dQ += dS K``
    2. per key block:   ``P^T = exp2(K Q^T * scale*log2e - lse*log2e)``
                        ``dV += P^T dO``; ``dS^T = P^T * (V dO^T - delta)``; ``dK += dS^T Q``
    with ``dK`` and ``dQ`` multiplied by the softmax scale at the end. The dQ pass holds its rows'
    dO already, so delta costs it one load of their O (no pre-pass launch of its own).
    Short sequences (every query in one row tile and every key in one column tile, no mask
    gradient: windows) take one launch instead, ``flash_attention_bwd_short_kernel``: per (batch,
    head) pair ``delta = rowsum(P * dP)`` (= rowsum(dO * O), no O read; fp32: over rowsum(P),
    ``_tile_delta``), ``dV = P^T dO``,
    ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, each complete after its one step (head dims
    above 64 in two halves, SPLIT_D); packed sequences too (VARLEN, a (sequence, head) pair a step).

Conventions: q (B, H, N, D), k and v (B, H, M, D), any strides with unit stride in D (views of a
packed qkv reach the kernels as they are). Head dims are padded to the next power of two
(>= 16) in registers and masked in every load and store. Causal masking is top-left aligned like
SDPA's ``is_causal`` (query i sees keys j <= i). The batch*head index is folded into grid axis 0
(no grid y/z limit), and every (batch, head) base offset is computed in int64; inside one head,
pointers advance block by block, so no int32 product of a row index and a stride can overflow.

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation (P is rounded to the
input dtype before the P V product, as in FlashAttention); fp32 inputs use IEEE fp32 dots (no
TF32), so fp32 results are accurate to fp32 rounding.

Masks and biases (constexpr flags, all off by default: plain attention compiles to the same code):
    HAS_BIAS      an attn_mask, 4-D, each dim 1 or full, read in place through its own strides
                  (stride 0 in broadcast dims), one (rows, keys) tile per key block: a 64-bit base
                  per (batch, head, block) plus int32 offsets inside the tile (the launcher copies a
                  table whose tile offsets could overflow, ``_tiles_in_int32``); BIAS_BOOL: uint8
                  (0 = masked -> -inf), else float, added (x log2 e).
    HAS_REL_POS   SAM's decomposed bias rel_h[i, j // kw] + rel_w[i, j % kw], gathered from the
                  (N, kh) and (N, kw) tables per tile: O(N * (kh + kw)) memory; the column split
                  (j // kw, j % kw) is a (keys,) vector per key block, carried from block to block.
                  REL_POS_MMA (``rel_pos_by_mma``: 16-bit tables in q's dtype, kh, kw padded to <= 64
                  bins in the forward, <= 16 in the backward): no gathers; scale * q k^T + rel_h sel_h^T
                  + rel_w sel_w^T with one-hot (keys, bins) selection matrices, dots accumulated onto
                  the scores (one non-zero term each: exact); the forward holds its table rows.
                  A bool mask's 0 / -inf tile enters the forward's q k^T dot as its initial
                  accumulator (into the dot's register layout), then a select keeps masked keys at
                  -inf whatever their score (NaN and inf included).
    A row whose every score is -inf (fully masked) is guarded: the online softmax subtracts 0
    instead of a -inf max, l = 0 gives out = 0 and lse = -inf, and the backward turns lse = -inf
    into +inf so that P = 0 there (zero gradients, never NaN).
    dBias (a float mask that requires grad) = dS = P * (dP - delta), summed over the mask's
    broadcast dims by ``flash_attention_bwd_dbias_kernel``: one program per tile of the mask's own
    shape looping over the (batch, head, row block, key block) that broadcast onto it in a fixed
    order and recomputing P and dP (extra FLOPs only when the mask needs grad; no atomics). Where
    one of its tiles holds every key of a (1, H, N, M)-like table (Swin's windows) it also writes
    delta and dQ = scale * dS K and runs in place of the dQ pass (WITH_DQ), and where it holds every
    query too, dK and dV, in place of the dK/dV pass (WITH_DKDV): Swin's backward in one launch.
    d rel_h / d rel_w (REL_POS_GRAD): the dQ pass reduces each dS tile into kh and kw bins with
    dots against 0/1 selection matrices and writes per-(batch, head) fp32 partials (B*H, N, k),
    which the launcher sums over the tables' broadcast dims (fixed order, deterministic).

Packed variable-length sequences (VARLEN, flash-attn's varlen layout; constexpr, off by default):
    q (T, H, D), k and v (Tk, H, D) hold S sequences end to end at the int32 offsets cu_seqlens_q,
    cu_seqlens_k (S+1,). The forward, dK/dV and dQ kernels take a (2, G) tile table built on the
    device from cu_seqlens (``varlen_tiles``): program (head, tile) reads its sequence and block
    start there, moves its pointers to the sequence's first token and uses the sequence's lengths
    as N and M, so tiles never see another sequence's keys and the work is sum(len_q * len_k) up
    to tile granularity (at most S idle programs per head beyond the tiles, which do nothing). A
    sequence with queries but no keys takes the fully masked guard (zeros, lse -inf). Lse and
    delta are (H, T); the dQ pass writes delta for its sequence's rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
import types
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .aot import ARCHS, KernelSpec, signature
from .runtime import (
    AOT_DTYPE_NAMES,
    INTERPRETER,
    arch_of,
    cdiv,
    device_guard,
    dot_precision,
    new_output,
    next_power_of_2,
    rows_addressable_in_int32,
    sm_count,
)

# Largest head dim the kernels cover (padded to a power of two in registers), and the largest with an
# attn_mask or rel_pos, whose gathered tiles have configurations up to 128 wide only.
MAX_HEAD_DIM = 256
# log2(e): the kernels work in base 2 (exp(x) = exp2(x * LOG2E)), scores and LSE scaled by it
LOG2E = tl.constexpr(1.4426950408889634)
MAX_MASK_HEAD_DIM = 128
# The forward's lazy rescaling (LAZY_RESCALE): the accumulator and the row sums are rescaled only when
# some row's max grew by more than this many log2 units over the max its exponents are taken from
RESCALE_THRESHOLD = tl.constexpr(8.0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _add_bias(
    t,  # (R, C) fp32 scores, in natural-log units (scale * q.k) or with UNIT = log2 e in log2 units
    bias_ptrs,  # (R, C) pointers into the attn_mask (HAS_BIAS), else None
    rh_ptrs, rw_ptrs,  # (R, C) gathered pointers into rel_h and rel_w (HAS_REL_POS), else None
    valid,  # (R, C) in-range (query, key) pairs: out-of-range loads are skipped; None: all in range
    HAS_BIAS: tl.constexpr,
    BIAS_BOOL: tl.constexpr,  # the mask is bool (read as uint8, 0 = masked), else float (added)
    HAS_REL_POS: tl.constexpr,
    UNIT: tl.constexpr = 1.0,  # t's units per natural-log unit (log2 e: scores in log2 units)
):
    # -- t += (rel_h[i, j // kw] + rel_w[i, j % kw]) * unit --
    if HAS_REL_POS:
        if valid is None:
            rh = tl.load(rh_ptrs).to(tl.float32)
            rw = tl.load(rw_ptrs).to(tl.float32)
        else:
            rh = tl.load(rh_ptrs, mask=valid, other=0.0).to(tl.float32)
            rw = tl.load(rw_ptrs, mask=valid, other=0.0).to(tl.float32)
        t += (rh + rw) * UNIT
    # -- bool: -inf where masked;  float: t += bias * unit (bias may hold -inf) --
    if HAS_BIAS:
        if BIAS_BOOL:
            keep = tl.load(bias_ptrs) if valid is None else tl.load(bias_ptrs, mask=valid, other=0)
            t = tl.where(keep != 0, t, float("-inf"))
        else:
            b = tl.load(bias_ptrs) if valid is None else tl.load(bias_ptrs, mask=valid, other=0.0)
            t += b.to(tl.float32) * UNIT
    return t


@triton.jit
def _rescale_if_grown(
    acc, l_i, m_i,  # running output (BLOCK_M, HEAD_DIM_PAD) fp32, row sum, the rows' reference max (log2 units)
    m_new,  # (BLOCK_M,) the rows' max with this key block (-inf where a row has seen no key yet)
):
    # -- lazy rescaling (FlashAttention-4's): the exponents of a key block are taken against m_i, the
    #    max of an earlier block, as long as no row's max grew by more than RESCALE_THRESHOLD: then
    #    p <= 2^8 (far inside fp16's range, no precision lost), and out = acc / l and lse = m + log2(l)
    #    are the same whatever reference max a row's sum shares with its exponents. One CTA-wide test in
    #    place of a multiply of the whole accumulator per step: the first step of a program rescales
    #    (m_i = -inf), later ones only when a row's max grows past 2^8 times its reference. Rows that
    #    have seen no key yet (-inf, masked) stay at -inf; a NaN row compares false and takes NaN from
    #    its scores --
    if tl.max((m_new > m_i + RESCALE_THRESHOLD).to(tl.int32), 0) > 0:
        alpha = tl.math.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _natural_lse(m_i, l_i, lse_ty: tl.constexpr):
    """The rows' natural-log lse, (m + log2 l) ln 2, from the max m (log2 units) and the sum l of
    exp2(t - m). In fp64 where the Lse buffer is fp64 (fp32 inputs, ``lse_dtype``): the sum of the
    two fp32 terms exact, the product to 2^-53, so the backward can undo the rounding of the fp32
    lse its kernels read (``backward_lse``)."""
    if lse_ty == tl.float64:
        lse = (m_i.to(tl.float64) + tl.math.log2(l_i).to(tl.float64)) * 0.6931471805599453
    else:
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln(2)
    return lse


@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i,  # running output (BLOCK_M, HEAD_DIM_PAD) fp32, row sum, row max (log2 units)
    q,  # (BLOCK_M, HEAD_DIM_PAD) query tile
    k_head, v_head,  # scalar pointers to key 0 of this (batch, head) in K and V; with USE_TMA the
                     # (B, H, M, D) tensor descriptors of K and V with (1, 1, BLOCK_N, HEAD_DIM_PAD) boxes
    off_b, off_h,  # this program's batch and head (the descriptors' coordinates)
    stride_kn, stride_vn,
    offs_m,  # (BLOCK_M,) query rows of this program
    offs_n,  # (BLOCK_N,) 0..BLOCK_N-1
    offs_d,  # (HEAD_DIM_PAD,) 0..HEAD_DIM_PAD-1
    lo, hi,  # key range [lo, hi) to visit, lo a multiple of BLOCK_N
    M,  # number of keys
    qk_scale,  # softmax scale * log2(e)
    bias_base,  # attn_mask at (this program's first row, key 0) of this head (HAS_BIAS), else None
    rh_base, rw_base,  # rel_h / rel_w at (this program's first row, bin 0) (HAS_REL_POS), else None
    bias_rows, rh_rows, rw_rows,  # (BLOCK_M,) int32 row offsets from the bases (rows past N clamped to
    #                               row N - 1, so every row reads inside the tables: no row predicate)
    stride_bm, stride_rhk, stride_rwk, KW,
    rh_slab, rw_slab,  # (BLOCK_M, KH_PAD), (BLOCK_M, KW_PAD) this program's rel_h / rel_w rows (REL_POS_MMA)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # the range holds key columns >= M
    CAUSAL_MASK: tl.constexpr,  # the range crosses the causal diagonal
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
    BIAS_BOOL: tl.constexpr = False,
    HAS_REL_POS: tl.constexpr = False,
    USE_TMA: tl.constexpr = False,
    REL_POS_MMA: tl.constexpr = False,  # rel_pos by selection-matrix dots (16-bit tables in q's dtype)
    KH_PAD: tl.constexpr = 16,  # kh and kw rounded up to a power of two >= 16 (REL_POS_MMA)
    KW_PAD: tl.constexpr = 16,
    BIAS_ROWS_BCAST: tl.constexpr = False,  # the mask is one row of keys for every query (bias_rows: (1,))
    LAZY_RESCALE: tl.constexpr = False,  # rescale acc only when a row max grows past RESCALE_THRESHOLD
):
    GATHER: tl.constexpr = HAS_REL_POS and not REL_POS_MMA  # rel_pos by per-element gathers
    # only scalar block pointers are carried through the loop; tile offsets are cheap to rebuild
    if not USE_TMA:
        k_block = k_head + tl.cast(lo, tl.int64) * stride_kn
        v_block = v_head + tl.cast(lo, tl.int64) * stride_vn
    d_valid = offs_d < HEAD_DIM
    # the mask tile: a 64-bit base advanced by BLOCK_N keys per step plus loop-invariant int32 offsets
    # inside the tile (the launcher keeps them < 2^31)
    if HAS_BIAS:
        bias_base += tl.cast(lo, tl.int64) * stride_bm
        bias_offs = bias_rows[:, None] + (offs_n * stride_bm)[None, :]
    else:
        bias_offs = bias_rows
    # the rel_pos column split (j // kw, j % kw) as (BLOCK_N,) vectors: one division per call, then
    # carried from step to step (BLOCK_N % kw < kw: adding it wraps at most once)
    if HAS_REL_POS:
        col_h = (lo + offs_n) // KW
        col_w = (lo + offs_n) % KW
        step_h = BLOCK_N // KW
        step_w = BLOCK_N % KW
    for start_n in range(lo, hi, BLOCK_N):
        # -- s = q k^T for this key block (fp32) --
        if MASK_KEYS:
            key_valid = offs_n < M - start_n
        if USE_TMA:
            # one bulk copy; keys >= M and head-dim columns >= HEAD_DIM arrive as zeros
            k = k_head.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD).T
        elif MASK_KEYS:
            k = tl.load(k_block + offs_n[None, :] * stride_kn + offs_d[:, None],
                        mask=d_valid[:, None] & key_valid[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_block + offs_n[None, :] * stride_kn + offs_d[:, None])
        else:
            k = tl.load(k_block + offs_n[None, :] * stride_kn + offs_d[:, None], mask=d_valid[:, None], other=0.0)
        # (mask and rel_pos rows are clamped inside the tables; only keys >= M need a predicate)
        valid = key_valid[None, :] if MASK_KEYS else None
        bias_ptrs = bias_base + bias_offs.to(tl.uint32) if HAS_BIAS else bias_base
        if HAS_BIAS and BIAS_BOOL and BIAS_ROWS_BCAST:
            # -- a key-padding bool mask: one (1, BLOCK_N) row for every query, selected on the scores --
            keep = tl.load(bias_ptrs) if valid is None else tl.load(bias_ptrs, mask=valid, other=0)
            s = tl.where(keep != 0, tl.dot(q, k, input_precision=DOT_PRECISION), float("-inf"))
        elif HAS_BIAS and BIAS_BOOL:
            # -- a bool mask: its 0 / -inf tile enters the dot as the initial accumulator, which moves it
            #    into the dot's register layout (selected against the loaded tile instead, it anchored the
            #    softmax in the load's layout and Triton ran the softmax twice, once per layout: sm_90
            #    70 MUFU per thread per step against 34); the select on that tile then gives masked keys
            #    -inf whatever their score (NaN or inf included: q k^T + -inf alone could be NaN) --
            keep = tl.load(bias_ptrs) if valid is None else tl.load(bias_ptrs, mask=valid, other=0)
            masked = tl.where(keep != 0, 0.0, float("-inf"))
            s = tl.where(masked == 0.0, tl.dot(q, k, masked, input_precision=DOT_PRECISION), float("-inf"))
        else:
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if HAS_BIAS or HAS_REL_POS:
            # -- the scores in log2 units are t * t_scale, t_scale folded into the exponent's fma as in
            #    the plain path: t in natural-log units (scale * q k^T + bias + rel_pos: one fma per
            #    score for the scale and a bias), or a bool mask alone: t = q k^T, already masked;
            #    a row may be -inf throughout --
            FLOAT_BIAS: tl.constexpr = HAS_BIAS and not BIAS_BOOL
            if GATHER:
                rh_ptrs = rh_base + (rh_rows[:, None] + (col_h * stride_rhk)[None, :]).to(tl.uint32)
                rw_ptrs = rw_base + (rw_rows[:, None] + (col_w * stride_rwk)[None, :]).to(tl.uint32)
            else:
                rh_ptrs = rh_base
                rw_ptrs = rw_base
            if REL_POS_MMA:
                # -- scale * q k^T + rel_h sel_h^T + rel_w sel_w^T accumulated onto the scores by dots with
                #    one-hot (bins, keys) selection matrices (one non-zero product per element: exact),
                #    keys past M select nothing or a zero bin and are masked below --
                sel_h_t = (tl.arange(0, KH_PAD)[:, None] == col_h[None, :]).to(q.dtype)
                sel_w_t = (tl.arange(0, KW_PAD)[:, None] == col_w[None, :]).to(q.dtype)
                t = tl.dot(rh_slab, sel_h_t, s * (qk_scale / LOG2E))
                t = tl.dot(rw_slab, sel_w_t, t)
                t_scale = LOG2E
            elif FLOAT_BIAS or GATHER:
                t = s * (qk_scale / LOG2E)
                t_scale = LOG2E
            else:  # a bool mask alone, already in s
                t = s
                t_scale = qk_scale
            # -- + bias, + rel_h + rel_w by gathers --
            t = _add_bias(t, bias_ptrs, rh_ptrs, rw_ptrs, valid,
                          HAS_BIAS=FLOAT_BIAS, BIAS_BOOL=False, HAS_REL_POS=GATHER)
            if MASK_KEYS:
                t = tl.where(key_valid[None, :], t, float("-inf"))
            if CAUSAL_MASK:
                t = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], t, float("-inf"))
            # -- online softmax guarded for fully masked rows: max -inf would make exp2 NaN --
            m_new = tl.maximum(m_i, tl.max(t, 1) * t_scale)
            if LAZY_RESCALE:
                acc, l_i, m_i = _rescale_if_grown(acc, l_i, m_i, m_new)
                p = tl.math.exp2(t * t_scale - tl.where(m_i == float("-inf"), 0.0, m_i)[:, None])
            else:
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(t * t_scale - m_safe[:, None])
                alpha = tl.math.exp2(m_i - m_safe)
        else:
            if MASK_KEYS:
                s = tl.where(key_valid[None, :], s, float("-inf"))
            if CAUSAL_MASK:
                s = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], s, float("-inf"))
            # -- online softmax: new row max, rescale the old sum and accumulator --
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            if LAZY_RESCALE:
                acc, l_i, m_i = _rescale_if_grown(acc, l_i, m_i, m_new)
                p = tl.math.exp2(s * qk_scale - m_i[:, None])
            else:
                p = tl.math.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
        if LAZY_RESCALE:
            l_i += tl.sum(p, 1)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)
        # -- acc += p v --
        if USE_TMA:
            v = v_head.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PAD)
        elif MASK_KEYS:
            v = tl.load(v_block + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=key_valid[:, None] & d_valid[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_block + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_block + offs_n[:, None] * stride_vn + offs_d[None, :], mask=d_valid[None, :], other=0.0)
        if not LAZY_RESCALE:
            acc = acc * alpha[:, None]
            m_i = m_new
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if not USE_TMA:
            k_block += BLOCK_N * stride_kn
            v_block += BLOCK_N * stride_vn
        if HAS_BIAS:
            bias_base += BLOCK_N * stride_bm
        if HAS_REL_POS:
            col_w += step_w
            wrap = col_w >= KW
            col_w = tl.where(wrap, col_w - KW, col_w)
            col_h += tl.where(wrap, step_h + 1, step_h)
    return acc, l_i, m_i


@triton.jit
def _varlen_tile(
    Tiles,  # (2, num_tiles) int32 tile table: the sequence of each tile (-1 past the last), its first row
    CuSeqA,  # (S+1,) int32 offsets of the sequences the tiles cut (queries, or keys for dK/dV)
    CuSeqB,  # (S+1,) int32 offsets of the other side's sequences
    tile, num_tiles,
):
    """(first row of the tile in its sequence, the sequence's first token and length on side A,
    and on side B) of one tile of a VARLEN launch. A tile past the last one gets lengths 0, so its
    program loads nothing, loops over nothing and stores nothing."""
    seq = tl.load(Tiles + tile)
    start = tl.load(Tiles + num_tiles + tile)
    live = seq >= 0
    seq = tl.maximum(seq, 0)
    a_row0 = tl.load(CuSeqA + seq)
    b_row0 = tl.load(CuSeqB + seq)
    a_len = tl.where(live, tl.load(CuSeqA + seq + 1) - a_row0, 0)
    b_len = tl.where(live, tl.load(CuSeqB + seq + 1) - b_row0, 0)
    return start, a_row0.to(tl.int64), a_len, b_row0.to(tl.int64), b_len


@triton.jit
def flash_attention_fwd_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    Out,  # (B, H, N, D) output, unit stride in D
    Lse,  # (B*H, N) natural-log logsumexp of the biased scores, fp32 (fp64 for fp32 inputs: lse_dtype),
          # contiguous; -inf on fully masked rows
    Bias,  # (B|1, H|1, N|1, M|1) attn_mask (HAS_BIAS, else None): uint8 (bool) or float, any strides
    RelH,  # (B|1, H|1, N, kh) rel_pos row table (HAS_REL_POS, else None), any strides
    RelW,  # (B|1, H|1, N, kw) rel_pos column table (HAS_REL_POS, else None), any strides
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_bb, stride_bh, stride_bn, stride_bm,  # 0 in the mask's broadcast dims
    stride_rhb, stride_rhh, stride_rhn, stride_rhk,  # 0 in rel_h's broadcast dims
    stride_rwb, stride_rwh, stride_rwn, stride_rwk,
    H, N, M,  # heads, queries, keys
    KW,  # rel_pos grid width: key j is grid cell (j // KW, j % KW)
    sm_scale,  # softmax scale (> 0)
    HEAD_DIM: tl.constexpr,  # D
    HEAD_DIM_PAD: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (unused by fp16/bf16 dots)
    HAS_BIAS: tl.constexpr = False,  # attn_mask given
    BIAS_BOOL: tl.constexpr = False,  # ... and it is bool
    HAS_REL_POS: tl.constexpr = False,  # rel_pos given
    CuSeqQ=None,  # (S+1,) int32 offsets of the packed query sequences (VARLEN, else None)
    CuSeqK=None,  # (S+1,) int32 offsets of the packed key sequences (VARLEN, else None)
    Tiles=None,  # (2, G) int32 tile table of this launch (VARLEN, else None), see _varlen_tile
    VARLEN: tl.constexpr = False,  # packed sequences: Q (T, H, D), K, V (Tk, H, D), Lse (H, T); N = T
    BLOCK_TAIL: tl.constexpr = 0,  # keys per step past the last whole key block when they fit (0: BLOCK_N)
    KTail=None,  # USE_TMA and BLOCK_TAIL: K's (B, H, M, D) descriptor with (1, 1, BLOCK_TAIL, HEAD_DIM_PAD) boxes
    VTail=None,  # ... and V's
    USE_TMA: tl.constexpr = False,  # Q, K, V, Out are (B, H, N|M, D) tensor descriptors (Hopper's TMA), their
                                    # boxes (1, 1, BLOCK_M|BLOCK_N, HEAD_DIM_PAD); not with VARLEN
    REL_POS_MMA: tl.constexpr = False,  # rel_pos by selection-matrix dots (16-bit tables in q's dtype)
    KH_PAD: tl.constexpr = 16,  # kh and kw rounded up to a power of two >= 16 (REL_POS_MMA)
    KW_PAD: tl.constexpr = 16,
    BIAS_ROWS_BCAST: tl.constexpr = False,  # the mask has one row for every query (stride_bn == 0: key
                                            # padding), read as one (1, BLOCK_N) vector per key step
    LAZY_RESCALE: tl.constexpr = False,  # rescale the accumulator only when a row max grows past
                                         # RESCALE_THRESHOLD (_rescale_if_grown; the launcher: lazy_rescale)
):
    if VARLEN:
        # -- (head, tile): the tile table gives the sequence and the query block; the pointers move
        #    to the sequence's first token and N, M become its lengths (N came in as T, Lse's rows) --
        pid = tl.program_id(0)
        num_tiles = tl.num_programs(0) // H
        off_h = (pid // num_tiles).to(tl.int64)
        start_m, q_row0, n_seq, k_row0, m_seq = _varlen_tile(Tiles, CuSeqQ, CuSeqK, pid % num_tiles, num_tiles)
        lse_row = Lse + off_h * N + q_row0
        Q += q_row0 * stride_qn
        Out += q_row0 * stride_on
        K += k_row0 * stride_kn
        V += k_row0 * stride_vn
        N = n_seq
        M = m_seq
        off_b = off_h * 0  # no batch dim (its strides are 0)
    else:
        # -- which query block and which (batch, head); the heaviest causal blocks start first --
        num_m_blocks = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        bh = pid // num_m_blocks
        start_m = (num_m_blocks - 1 - pid % num_m_blocks) * BLOCK_M
        off_b = (bh // H).to(tl.int64)
        off_h = (bh % H).to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    row_valid = offs_m < N

    local_m = tl.arange(0, BLOCK_M)
    if USE_TMA:
        # -- bulk copies addressed by (batch, head, row, 0); rows and columns past the tensor read as 0 --
        tma_b = off_b.to(tl.int32)
        tma_h = off_h.to(tl.int32)
        q = Q.load([tma_b, tma_h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_PAD)
        k_head = K
        v_head = V
        k_tail = KTail
        v_tail = VTail
    else:
        tma_b = 0
        tma_h = 0
        # -- base pointers of this (batch, head) in int64, local offsets in int32 --
        q_base = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qn
        k_head = K + off_b * stride_kb + off_h * stride_kh
        v_head = V + off_b * stride_vb + off_h * stride_vh
        k_tail = k_head
        v_tail = v_head
        q = tl.load(
            q_base + local_m[:, None] * stride_qn + offs_d[None, :],
            mask=row_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
    # -- the mask and rel_pos tables: 64-bit bases at this program's first row, int32 row offsets
    #    (rows past N read row N - 1: their scores are never stored, and the loads need no row mask) --
    mask_rows = tl.minimum(offs_m, N - 1) - start_m
    if HAS_BIAS:
        bias_base = Bias + off_b * stride_bb + off_h * stride_bh + start_m.to(tl.int64) * stride_bn
        # a key-padding mask: one row offset, so its tiles are (1, BLOCK_N) and broadcast over the queries
        bias_rows = tl.zeros([1], dtype=tl.int32) if BIAS_ROWS_BCAST else mask_rows * stride_bn
    else:
        bias_base = Bias
        bias_rows = mask_rows
    if HAS_REL_POS:
        rh_base = RelH + off_b * stride_rhb + off_h * stride_rhh + start_m.to(tl.int64) * stride_rhn
        rw_base = RelW + off_b * stride_rwb + off_h * stride_rwh + start_m.to(tl.int64) * stride_rwn
        rh_rows = mask_rows * stride_rhn
        rw_rows = mask_rows * stride_rwn
    else:
        rh_base = RelH
        rw_base = RelW
        rh_rows = mask_rows
        rw_rows = mask_rows
    if REL_POS_MMA:
        # -- this program's rel_h / rel_w rows, held for the whole loop (bins past kh / kw: 0; kh = M / kw) --
        bins_h = tl.arange(0, KH_PAD)
        bins_w = tl.arange(0, KW_PAD)
        rh_slab = tl.load(rh_base + rh_rows[:, None] + (bins_h * stride_rhk)[None, :],
                          mask=(bins_h < M // KW)[None, :], other=0.0)
        rw_slab = tl.load(rw_base + rw_rows[:, None] + (bins_w * stride_rwk)[None, :],
                          mask=(bins_w < KW)[None, :], other=0.0)
    else:
        rh_slab = rh_rows
        rw_slab = rw_rows

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    qk_scale = sm_scale * LOG2E

    # -- key ranges: whole blocks off the diagonal need no mask, diagonal blocks the causal one;
    #    the M % BLOCK_N keys past the last whole block take one masked step, of BLOCK_TAIL keys
    #    when they fit (M = 197 with 64-key blocks: 5 keys in a 32-key step, not a 64-key one) --
    full_end = (M // BLOCK_N) * BLOCK_N  # keys in whole blocks
    if CAUSAL:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, M), N)  # queries i < N see keys j <= i
        # whole key blocks left of this query block's first row (BLOCK_N may exceed BLOCK_M)
        unmasked_end = (tl.minimum(start_m, full_end) // BLOCK_N) * BLOCK_N
    else:
        hi = M
        unmasked_end = full_end
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, tma_b, tma_h, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        0, unmasked_end, M, qk_scale,
        bias_base, rh_base, rw_base, bias_rows, rh_rows, rw_rows, stride_bm, stride_rhk, stride_rwk, KW,
        rh_slab, rw_slab,
        HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_N,
        MASK_KEYS=False, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
        HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS, USE_TMA=USE_TMA,
        REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
        LAZY_RESCALE=LAZY_RESCALE,
    )
    if CAUSAL:
        # whole blocks on the diagonal (every key < M; a last block past hi is causally masked)
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_head, v_head, tma_b, tma_h, stride_kn, stride_vn, offs_m, offs_n, offs_d,
            unmasked_end, tl.minimum(hi, full_end), M, qk_scale,
            bias_base, rh_base, rw_base, bias_rows, rh_rows, rw_rows, stride_bm, stride_rhk, stride_rwk, KW,
            rh_slab, rw_slab,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_N,
            MASK_KEYS=False, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION,
            HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS, USE_TMA=USE_TMA,
            REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
            LAZY_RESCALE=LAZY_RESCALE,
        )
    # the keys past the last whole block (none when hi <= full_end): at most one step of either size
    if BLOCK_TAIL > 0 and BLOCK_TAIL < BLOCK_N:
        short = hi - full_end <= BLOCK_TAIL
        acc, l_i, m_i = _attention_fwd_inner(
            acc, l_i, m_i, q, k_tail, v_tail, tma_b, tma_h, stride_kn, stride_vn,
            offs_m, tl.arange(0, BLOCK_TAIL), offs_d, full_end, tl.where(short, hi, full_end), M, qk_scale,
            bias_base, rh_base, rw_base, bias_rows, rh_rows, rw_rows, stride_bm, stride_rhk, stride_rwk, KW,
            rh_slab, rw_slab,
            HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_TAIL,
            MASK_KEYS=True, CAUSAL_MASK=CAUSAL, DOT_PRECISION=DOT_PRECISION,
            HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS, USE_TMA=USE_TMA,
            REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
            LAZY_RESCALE=LAZY_RESCALE,
        )
        long_end = tl.where(short, full_end, hi)
    else:
        long_end = hi
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, tma_b, tma_h, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        full_end, long_end, M, qk_scale,
        bias_base, rh_base, rw_base, bias_rows, rh_rows, rw_rows, stride_bm, stride_rhk, stride_rwk, KW,
        rh_slab, rw_slab,
        HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_N,
        MASK_KEYS=True, CAUSAL_MASK=CAUSAL, DOT_PRECISION=DOT_PRECISION,
        HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS, USE_TMA=USE_TMA,
        REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
        LAZY_RESCALE=LAZY_RESCALE,
    )

    # -- epilogue: normalise, write out and the natural-log lse --
    if HAS_BIAS or HAS_REL_POS or VARLEN:
        # a fully masked row (VARLEN: a sequence with no keys) has l = 0: out 0 (not 0/0), lse -inf
        # (one approximate reciprocal per row: the IEEE division's slow-path subroutine calls made
        # ptxas spill around them, 8 B on sm_80)
        dead = l_i == 0.0
        l_safe = tl.where(dead, 1.0, l_i)
        acc = acc * tl.fdiv(1.0, l_safe, ieee_rounding=False)[:, None]
        lse = tl.where(dead, float("-inf"), _natural_lse(m_i, l_safe, Lse.dtype.element_ty))
    else:
        acc = acc / l_i[:, None]
        lse = _natural_lse(m_i, l_i, Lse.dtype.element_ty)
    if USE_TMA:
        Out.store([tma_b, tma_h, start_m, 0], acc.to(Out.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM_PAD))
    else:
        o_base = Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
        tl.store(
            o_base + local_m[:, None] * stride_on + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )
    if VARLEN:
        tl.store(lse_row + offs_m, lse, mask=row_valid)
    else:
        tl.store(Lse + bh.to(tl.int64) * N + offs_m, lse, mask=row_valid)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_dkdv_inner(
    dk, dv,  # (BLOCK_N, HEAD_DIM_PAD) fp32 accumulators
    k, v,  # (BLOCK_N, HEAD_DIM_PAD) this program's keys and values
    q_ptrs,  # (HEAD_DIM_PAD, BLOCK_M) pointers to Q^T at query 0 of this head
    do_ptrs,  # (BLOCK_M, HEAD_DIM_PAD) pointers to dO at query 0 of this head
    lse_ptr, delta_ptr,  # (N,) fp32 rows of this head
    stride_qn, stride_don,
    offs_n,  # (BLOCK_N,) key indices of this program
    local_m,  # (BLOCK_M,) 0..BLOCK_M-1
    d_valid,
    lo, hi,  # query range [lo, hi)
    N,
    qk_scale,
    bias_base,  # attn_mask at (query 0, key start_n) of this head (HAS_BIAS), else None
    rh_base, rw_base,  # rel_h / rel_w at (query 0, bin 0) of this head (HAS_REL_POS), else None
    bias_cols, rh_cols, rw_cols,  # (BLOCK_N,) int32 column offsets: local key * stride_bm, (j // kw) * stride_rhk,
    #                               (j % kw) * stride_rwk, keys past M clamped to key M - 1 (no key predicate)
    stride_bn, stride_rhn, stride_rwn,
    sel_h, sel_w,  # (BLOCK_N, KH_PAD), (BLOCK_N, KW_PAD) one-hot [j, j // kw] / [j, j % kw] in q's dtype (REL_POS_MMA)
    stride_rhk, stride_rwk, KH, KW,
    key_bias,  # (BLOCK_N,) fp32 a key-padding float bias at this program's keys (BIAS_ROWS_BCAST), else unused
    BLOCK_M: tl.constexpr,
    MASK_ROWS: tl.constexpr,  # the range holds query rows >= N (its last step); else every load is unpredicated
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
    BIAS_BOOL: tl.constexpr = False,
    HAS_REL_POS: tl.constexpr = False,
    REL_POS_MMA: tl.constexpr = False,
    KH_PAD: tl.constexpr = 16,
    KW_PAD: tl.constexpr = 16,
    BIAS_ROWS_BCAST: tl.constexpr = False,  # the mask is key_bias, the same for every query (a float bias)
):
    GATHER: tl.constexpr = HAS_REL_POS and not REL_POS_MMA  # rel_pos by per-element gathers
    TILE_BIAS: tl.constexpr = HAS_BIAS and not BIAS_ROWS_BCAST  # the mask read as (BLOCK_N, BLOCK_M) tiles
    # a bool mask tile alone: the plain exponent, then P = 0 where masked (one select, no rescaling)
    BOOL_TILE: tl.constexpr = TILE_BIAS and BIAS_BOOL and not HAS_REL_POS
    q_ptrs += tl.cast(lo, tl.int64) * stride_qn
    do_ptrs += tl.cast(lo, tl.int64) * stride_don
    # the mask and rel_pos tiles: one 64-bit base per table (advanced by BLOCK_M rows per step) plus
    # int32 offsets inside the tile, (BLOCK_N, BLOCK_M) and loop-invariant (the launcher keeps them < 2^31)
    if TILE_BIAS:
        bias_base += tl.cast(lo, tl.int64) * stride_bn
        bias_offs = bias_cols[:, None] + (local_m * stride_bn)[None, :]
    else:
        bias_offs = bias_cols
    if HAS_REL_POS:
        rh_base += tl.cast(lo, tl.int64) * stride_rhn
        rw_base += tl.cast(lo, tl.int64) * stride_rwn
    if REL_POS_MMA:
        # (KH_PAD, BLOCK_M) / (KW_PAD, BLOCK_M) slabs of rel_h^T / rel_w^T per step (bins past kh / kw: 0)
        bins_h = tl.arange(0, KH_PAD)
        bins_w = tl.arange(0, KW_PAD)
        rh_offs = (bins_h * stride_rhk)[:, None] + (local_m * stride_rhn)[None, :]
        rw_offs = (bins_w * stride_rwk)[:, None] + (local_m * stride_rwn)[None, :]
    elif HAS_REL_POS:
        rh_offs = rh_cols[:, None] + (local_m * stride_rhn)[None, :]
        rw_offs = rw_cols[:, None] + (local_m * stride_rwn)[None, :]
    else:
        rh_offs = rh_cols
        rw_offs = rw_cols
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + local_m
        row_valid = offs_m < N
        if MASK_ROWS:
            q_t = tl.load(q_ptrs, mask=d_valid[:, None] & row_valid[None, :], other=0.0)
            # lse = +inf on missing query rows makes their P exactly 0
            lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=float("inf"))
        else:
            q_t = tl.load(q_ptrs, mask=d_valid[:, None], other=0.0)
            lse = tl.load(lse_ptr + offs_m)
        # -- P^T = exp(scale * k q^T - lse) --
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
        if BOOL_TILE:
            # -- P^T where the (key, query) pair is kept, else 0 (NaN scores included); lse = -inf -> P = 0 --
            keep_ptrs = bias_base + bias_offs
            keep = tl.load(keep_ptrs, mask=row_valid[None, :], other=0) if MASK_ROWS else tl.load(keep_ptrs)
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            p_t = tl.where(keep != 0, tl.math.exp2(s_t * qk_scale - lse[None, :] * LOG2E), 0.0)
        elif HAS_BIAS or HAS_REL_POS:
            # -- with the bias (transposed tile: keys x queries); lse = -inf (fully masked row) -> P = 0;
            #    the key columns are clamped inside the tables, so only a step with rows >= N predicates --
            valid = row_valid[None, :] if MASK_ROWS else None
            if REL_POS_MMA:
                # -- scale * k q^T + rel_pos^T, rel_pos^T = sel_h rel_h^T + sel_w rel_w^T accumulated onto the
                #    scores (one non-zero product per element: exact) --
                if MASK_ROWS:
                    rh_t = tl.load(rh_base + rh_offs, mask=(bins_h < KH)[:, None] & row_valid[None, :], other=0.0)
                    rw_t = tl.load(rw_base + rw_offs, mask=(bins_w < KW)[:, None] & row_valid[None, :], other=0.0)
                else:
                    rh_t = tl.load(rh_base + rh_offs, mask=(bins_h < KH)[:, None], other=0.0)
                    rw_t = tl.load(rw_base + rw_offs, mask=(bins_w < KW)[:, None], other=0.0)
                s_t = tl.dot(sel_h, rh_t, s_t * (qk_scale / LOG2E))
                s_t = tl.dot(sel_w, rw_t, s_t)
            else:
                s_t = s_t * (qk_scale / LOG2E)
            # -- in natural-log units (scale and a bias: one fma), log2 e folded into the exponent's fma --
            t_t = _add_bias(s_t, bias_base + bias_offs if TILE_BIAS else bias_base,
                            rh_base + rh_offs if GATHER else rh_base,
                            rw_base + rw_offs if GATHER else rw_base, valid,
                            HAS_BIAS=TILE_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=GATHER)
            if HAS_BIAS and BIAS_ROWS_BCAST:
                t_t += key_bias[:, None]
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            p_t = tl.math.exp2(t_t * LOG2E - lse[None, :] * LOG2E)
        else:
            p_t = tl.math.exp2(s_t * qk_scale - lse[None, :] * LOG2E)
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        if MASK_ROWS:
            do = tl.load(do_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        else:
            do = tl.load(do_ptrs, mask=d_valid[None, :], other=0.0)
        # -- dV += P^T dO --
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # -- dS^T = P^T * (V dO^T - delta);  dK += dS^T Q --
        delta = tl.load(delta_ptr + offs_m, mask=row_valid, other=0.0) if MASK_ROWS else tl.load(delta_ptr + offs_m)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
        if TILE_BIAS:
            bias_base += BLOCK_M * stride_bn
        if HAS_REL_POS:
            rh_base += BLOCK_M * stride_rhn
            rw_base += BLOCK_M * stride_rwn
    return dk, dv


@triton.jit
def flash_attention_bwd_dkdv_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides
    Lse,  # (B*H, N) fp32 forward logsumexp (natural log), -inf on fully masked rows
    Delta,  # (B*H, N) fp32 rowsum(dO * O)
    dK,  # (B, H, M, D) key gradient, unit stride in D
    dV,  # (B, H, M, D) value gradient, unit stride in D
    Bias,  # (B|1, H|1, N|1, M|1) attn_mask (HAS_BIAS, else None): uint8 (bool) or float, any strides
    RelH,  # (B|1, H|1, N, kh) rel_pos row table (HAS_REL_POS, else None)
    RelW,  # (B|1, H|1, N, kw) rel_pos column table (HAS_REL_POS, else None)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_bb, stride_bh, stride_bn, stride_bm,  # 0 in the mask's broadcast dims
    stride_rhb, stride_rhh, stride_rhn, stride_rhk,
    stride_rwb, stride_rwh, stride_rwn, stride_rwk,
    H, N, M,
    KW,  # rel_pos grid width
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program; a multiple of BLOCK_M
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
    BIAS_BOOL: tl.constexpr = False,
    HAS_REL_POS: tl.constexpr = False,
    REL_POS_MMA: tl.constexpr = False,  # rel_pos by selection-matrix dots (16-bit tables in q's dtype)
    KH_PAD: tl.constexpr = 16,  # kh and kw rounded up to a power of two >= 16 (REL_POS_MMA)
    KW_PAD: tl.constexpr = 16,
    CuSeqQ=None,  # (S+1,) int32 offsets of the packed query sequences (VARLEN, else None)
    CuSeqK=None,  # (S+1,) int32 offsets of the packed key sequences (VARLEN, else None)
    Tiles=None,  # (2, G) int32 tile table of this launch (VARLEN, else None), see _varlen_tile
    VARLEN: tl.constexpr = False,  # packed sequences: Q (T, H, D), K, V (Tk, H, D), Lse (H, T); N = T
    BIAS_ROWS_BCAST: tl.constexpr = False,  # the mask has one row for every query (stride_bn == 0: key
                                            # padding), read once per program at its keys
    SPLIT_ROWS: tl.constexpr = False,  # whole query blocks with no row predicate, then one predicated step
):
    if VARLEN:
        # -- (head, key tile) of the packed sequences, as in the forward (N came in as T) --
        pid = tl.program_id(0)
        num_tiles = tl.num_programs(0) // H
        off_h = (pid // num_tiles).to(tl.int64)
        start_n, k_row0, m_seq, q_row0, n_seq = _varlen_tile(Tiles, CuSeqK, CuSeqQ, pid % num_tiles, num_tiles)
        total_q = N
        Q += q_row0 * stride_qn
        dOut += q_row0 * stride_don
        K += k_row0 * stride_kn
        V += k_row0 * stride_vn
        dK += k_row0 * stride_dkn
        dV += k_row0 * stride_dvn
        N = n_seq
        M = m_seq
        off_b = off_h * 0  # no batch dim (its strides are 0)
    else:
        num_n_blocks = tl.cdiv(M, BLOCK_N)
        pid = tl.program_id(0)
        bh = pid // num_n_blocks
        start_n = (pid % num_n_blocks) * BLOCK_N
        off_b = (bh // H).to(tl.int64)
        off_h = (bh % H).to(tl.int64)

    local_n = tl.arange(0, BLOCK_N)
    offs_n = start_n + local_n
    local_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    key_valid = offs_n < M
    kv_mask = key_valid[:, None] & d_valid[None, :]

    # -- this program's keys and values stay in registers for the whole loop --
    k = tl.load(
        K + off_b * stride_kb + off_h * stride_kh + start_n.to(tl.int64) * stride_kn
        + local_n[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask, other=0.0,
    )
    v = tl.load(
        V + off_b * stride_vb + off_h * stride_vh + start_n.to(tl.int64) * stride_vn
        + local_n[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask, other=0.0,
    )
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + local_m[None, :] * stride_qn + offs_d[:, None]
    do_ptrs = (
        dOut + off_b * stride_dob + off_h * stride_doh + local_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    )
    if VARLEN:
        lse_ptr = Lse + off_h * total_q + q_row0
        delta_ptr = Delta + off_h * total_q + q_row0
    else:
        lse_ptr = Lse + bh.to(tl.int64) * N
        delta_ptr = Delta + bh.to(tl.int64) * N
    qk_scale = sm_scale * LOG2E
    # -- the mask and rel_pos tables: this head's 64-bit bases, int32 offsets of this program's key columns
    #    (the rel_pos split j // kw, j % kw once per program, not per element); keys past M read key M - 1
    #    (their dK / dV rows are never stored), so no tile load needs a key predicate --
    table_n = tl.minimum(offs_n, tl.maximum(M - 1, 0))
    if HAS_BIAS:
        bias_base = Bias + off_b * stride_bb + off_h * stride_bh + start_n.to(tl.int64) * stride_bm
        bias_cols = (table_n - start_n) * stride_bm
    else:
        bias_base = Bias
        bias_cols = local_n
    if HAS_REL_POS:
        rh_base = RelH + off_b * stride_rhb + off_h * stride_rhh
        rw_base = RelW + off_b * stride_rwb + off_h * stride_rwh
        rh_cols = (table_n // KW) * stride_rhk
        rw_cols = (table_n % KW) * stride_rwk
    else:
        rh_base = RelH
        rw_base = RelW
        rh_cols = local_n
        rw_cols = local_n
    kh = M // KW  # rel_pos grid height (M == kh * kw)
    # -- a key-padding mask (one row for every query): its values at this program's keys, read once. A
    #    bool one leaves the unmasked keys' gradients as without it and the masked keys' are zero, so the
    #    loop runs unmasked (a block of padding keys skips it) and the masked rows are zeroed at the end --
    KEY_MASK: tl.constexpr = HAS_BIAS and BIAS_BOOL and BIAS_ROWS_BCAST
    live = True
    if HAS_BIAS and BIAS_ROWS_BCAST:
        key_bias = tl.load(bias_base + bias_cols, mask=key_valid, other=0)
        if KEY_MASK:
            keep = key_bias != 0
            live = tl.max(keep.to(tl.int32), 0) > 0
        else:
            key_bias = key_bias.to(tl.float32)
    else:
        key_bias = bias_cols
    if REL_POS_MMA:
        # loop-invariant one-hot selections of this program's keys: [j, j // kw] and [j, j % kw]
        sel_h = ((offs_n // KW)[:, None] == tl.arange(0, KH_PAD)[None, :]).to(K.dtype.element_ty)
        sel_w = ((offs_n % KW)[:, None] == tl.arange(0, KW_PAD)[None, :]).to(K.dtype.element_ty)
    else:
        sel_h = rh_cols
        sel_w = rw_cols

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    if live:  # (a block of padding keys visits no query)
        if CAUSAL:
            # queries i >= start_n see these keys; those below start_n + BLOCK_N cross the diagonal
            lo = (start_n // BLOCK_M) * BLOCK_M
            diag_end = tl.minimum(start_n + BLOCK_N, N)
            dk, dv = _attention_bwd_dkdv_inner(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                offs_n, local_m, d_valid, lo, diag_end, N, qk_scale,
                bias_base, rh_base, rw_base, bias_cols, rh_cols, rw_cols, stride_bn, stride_rhn, stride_rwn,
                sel_h, sel_w, stride_rhk, stride_rwk, kh, KW, key_bias,
                BLOCK_M=BLOCK_M, MASK_ROWS=True, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION,
                HAS_BIAS=HAS_BIAS and not KEY_MASK, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS,
                REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
            )
            lo = diag_end  # N, or a multiple of BLOCK_M
        else:
            lo = 0
        if SPLIT_ROWS:
            # -- whole query blocks with no row predicate, then the rows past the last one in one step --
            full_end = tl.maximum((N // BLOCK_M) * BLOCK_M, lo)
            dk, dv = _attention_bwd_dkdv_inner(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                offs_n, local_m, d_valid, lo, full_end, N, qk_scale,
                bias_base, rh_base, rw_base, bias_cols, rh_cols, rw_cols, stride_bn, stride_rhn, stride_rwn,
                sel_h, sel_w, stride_rhk, stride_rwk, kh, KW, key_bias,
                BLOCK_M=BLOCK_M, MASK_ROWS=False, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
                HAS_BIAS=HAS_BIAS and not KEY_MASK, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS,
                REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
            )
        else:
            full_end = lo  # every step predicates its rows
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
            offs_n, local_m, d_valid, full_end, N, N, qk_scale,
            bias_base, rh_base, rw_base, bias_cols, rh_cols, rw_cols, stride_bn, stride_rhn, stride_rwn,
            sel_h, sel_w, stride_rhk, stride_rwk, kh, KW, key_bias,
            BLOCK_M=BLOCK_M, MASK_ROWS=True, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
            HAS_BIAS=HAS_BIAS and not KEY_MASK, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS,
            REL_POS_MMA=REL_POS_MMA, KH_PAD=KH_PAD, KW_PAD=KW_PAD, BIAS_ROWS_BCAST=BIAS_ROWS_BCAST,
        )
    if KEY_MASK:
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)

    dk = dk * sm_scale
    tl.store(
        dK + off_b * stride_dkb + off_h * stride_dkh + start_n.to(tl.int64) * stride_dkn
        + local_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(dK.dtype.element_ty), mask=kv_mask,
    )
    tl.store(
        dV + off_b * stride_dvb + off_h * stride_dvh + start_n.to(tl.int64) * stride_dvn
        + local_n[:, None] * stride_dvn + offs_d[None, :],
        dv.to(dV.dtype.element_ty), mask=kv_mask,
    )


@triton.jit
def _attention_bwd_dq_inner(
    dq,  # (BLOCK_M, HEAD_DIM_PAD) fp32 accumulator
    drh, drw,  # (BLOCK_M, KH_PAD), (BLOCK_M, KW_PAD) fp32 rel_pos gradient accumulators (REL_POS_GRAD)
    q, do,  # (BLOCK_M, HEAD_DIM_PAD) this program's queries and output gradients
    lse, delta,  # (BLOCK_M,) fp32
    k_ptrs,  # (HEAD_DIM_PAD, BLOCK_N) pointers to K^T at key 0 of this head
    v_ptrs,  # (HEAD_DIM_PAD, BLOCK_N) pointers to V^T at key 0 of this head
    stride_kn, stride_vn,
    offs_m, local_n, d_valid,
    lo, hi,  # key range [lo, hi)
    M,
    qk_scale,
    bias_base,  # attn_mask at (this program's first row, key 0) of this head (HAS_BIAS), else None
    rh_base, rw_base,  # rel_h / rel_w at (this program's first row, bin 0) (HAS_REL_POS), else None
    bias_rows, rh_rows, rw_rows,  # (BLOCK_M,) int32 row offsets: local row * stride_bn / stride_rhn / stride_rwn
    stride_bm, stride_rhk, stride_rwk, KW,
    rh_slab, rw_slab,  # (BLOCK_M, KH_PAD), (BLOCK_M, KW_PAD) this program's rel_h / rel_w rows (REL_POS_MMA)
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # keys >= M or past the causal diagonal are in the range
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
    BIAS_BOOL: tl.constexpr = False,
    HAS_REL_POS: tl.constexpr = False,
    REL_POS_GRAD: tl.constexpr = False,
    KH_PAD: tl.constexpr = 16,  # kh and kw rounded up to a power of two >= 16
    KW_PAD: tl.constexpr = 16,
    REL_POS_MMA: tl.constexpr = False,  # rel_pos by selection-matrix dots (16-bit tables in q's dtype)
    SYNC_KV: tl.constexpr = False,  # a CTA barrier after each step's K/V loads (dq_syncs_kv)
):
    GATHER: tl.constexpr = HAS_REL_POS and not REL_POS_MMA  # rel_pos by per-element gathers
    # a bool mask alone (tiles or a key-padding row): the plain exponent, then P = 0 where masked
    BOOL_ONLY: tl.constexpr = HAS_BIAS and BIAS_BOOL and not HAS_REL_POS
    k_ptrs += tl.cast(lo, tl.int64) * stride_kn
    v_ptrs += tl.cast(lo, tl.int64) * stride_vn
    # the mask tile: a 64-bit base advanced by BLOCK_N keys per step plus int32 offsets inside the tile
    if HAS_BIAS:
        bias_base += tl.cast(lo, tl.int64) * stride_bm
        bias_offs = bias_rows[:, None] + (local_n * stride_bm)[None, :]
    else:
        bias_offs = bias_rows
    # the rel_pos column split (j // kw, j % kw): one division per call, then carried from step to step
    # (BLOCK_N % kw < kw: adding it wraps at most once)
    if HAS_REL_POS or REL_POS_GRAD:
        col_h = (lo + local_n) // KW
        col_w = (lo + local_n) % KW
        step_h = BLOCK_N // KW
        step_w = BLOCK_N % KW
    else:
        col_h = local_n
        col_w = local_n
        step_h = 0
        step_w = 0
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        key_valid = offs_n < M
        if MASK_KEYS:
            k_t = tl.load(k_ptrs, mask=d_valid[:, None] & key_valid[None, :], other=0.0)
            v_t = tl.load(v_ptrs, mask=d_valid[:, None] & key_valid[None, :], other=0.0)
        else:
            k_t = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
            v_t = tl.load(v_ptrs, mask=d_valid[:, None], other=0.0)
        if SYNC_KV:
            tl.debug_barrier()
        # -- P = exp(scale * q k^T - lse) --
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if BOOL_ONLY:
            # -- P = exp(scale * q k^T - lse) where the pair is kept, else 0 (NaN scores included; rows are
            #    clamped inside the mask, so only key-tail steps predicate) --
            keep_ptrs = bias_base + bias_offs.to(tl.uint32)
            keep = tl.load(keep_ptrs, mask=key_valid[None, :], other=0) if MASK_KEYS else tl.load(keep_ptrs)
            p = tl.where(keep != 0, tl.math.exp2(s * qk_scale - lse[:, None] * LOG2E), 0.0)
        elif HAS_BIAS or HAS_REL_POS:
            # -- P = exp(scale * q k^T + bias - lse); lse is +inf (not -inf) on fully masked rows --
            # (rows are clamped inside the tables; only keys >= M need a predicate)
            valid = key_valid[None, :] if MASK_KEYS else None
            bias_ptrs = bias_base + bias_offs.to(tl.uint32) if HAS_BIAS else bias_base
            if GATHER:
                rh_ptrs = rh_base + (rh_rows[:, None] + (col_h * stride_rhk)[None, :]).to(tl.uint32)
                rw_ptrs = rw_base + (rw_rows[:, None] + (col_w * stride_rwk)[None, :]).to(tl.uint32)
            else:
                rh_ptrs = rh_base
                rw_ptrs = rw_base
            if REL_POS_MMA:
                # -- scale * q k^T + rel_pos, rel_pos = rel_h sel_h^T + rel_w sel_w^T accumulated onto the scores
                #    (one non-zero product per element: exact) --
                sel_h_t = (tl.arange(0, KH_PAD)[:, None] == col_h[None, :]).to(k_t.dtype)
                sel_w_t = (tl.arange(0, KW_PAD)[:, None] == col_w[None, :]).to(k_t.dtype)
                s = tl.dot(rh_slab, sel_h_t, s * (qk_scale / LOG2E))
                s = tl.dot(rw_slab, sel_w_t, s)
            else:
                s = s * (qk_scale / LOG2E)
            # -- in natural-log units (scale and a bias: one fma), log2 e folded into the exponent's fma --
            t = _add_bias(s, bias_ptrs, rh_ptrs, rw_ptrs, valid,
                          HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=GATHER)
            p = tl.math.exp2(t * LOG2E - lse[:, None] * LOG2E)
        else:
            p = tl.math.exp2(s * qk_scale - lse[:, None] * LOG2E)
        if MASK_KEYS:
            p = tl.where(key_valid[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        # -- dS = P * (dO V^T - delta);  dQ += dS K --
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
        if REL_POS_GRAD:
            # -- d rel_h[i, a] += sum_{j // kw == a} dS[i, j]; d rel_w[i, c] += sum_{j % kw == c} dS[i, j]:
            #    dots with 0/1 selection matrices, dS rounded as for dQ (fp32 accumulation, tensor cores) --
            bins_h = tl.arange(0, KH_PAD)
            bins_w = tl.arange(0, KW_PAD)
            sel_h = (col_h[:, None] == bins_h[None, :]) & key_valid[:, None]
            sel_w = (col_w[:, None] == bins_w[None, :]) & key_valid[:, None]
            ds_low = ds.to(k_t.dtype)
            drh = tl.dot(ds_low, sel_h.to(k_t.dtype), drh, input_precision=DOT_PRECISION)
            drw = tl.dot(ds_low, sel_w.to(k_t.dtype), drw, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_BIAS:
            bias_base += BLOCK_N * stride_bm
        if HAS_REL_POS or REL_POS_GRAD:
            col_w += step_w
            wrap = col_w >= KW
            col_w = tl.where(wrap, col_w - KW, col_w)
            col_h += tl.where(wrap, step_h + 1, step_h)
    return dq, drh, drw


@triton.jit
def flash_attention_bwd_dq_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides
    Out,  # (B, H, N, D) forward output, unit stride in D
    Lse,  # (B*H, N) fp32 forward logsumexp (natural log), -inf on fully masked rows
    Delta,  # (B*H, N) fp32 rowsum(dO * O), written here (the dK/dV and dBias passes read it after)
    dQ,  # (B, H, N, D) query gradient, unit stride in D
    Bias,  # (B|1, H|1, N|1, M|1) attn_mask (HAS_BIAS, else None): uint8 (bool) or float, any strides
    RelH,  # (B|1, H|1, N, kh) rel_pos row table (HAS_REL_POS, else None)
    RelW,  # (B|1, H|1, N, kw) rel_pos column table (HAS_REL_POS, else None)
    dRelH,  # (B*H, N, kh) fp32 per-(batch, head) gradient of rel_h, contiguous (REL_POS_GRAD, else None)
    dRelW,  # (B*H, N, kw) fp32 per-(batch, head) gradient of rel_w, contiguous (REL_POS_GRAD, else None)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on,
    stride_dqb, stride_dqh, stride_dqn,
    stride_bb, stride_bh, stride_bn, stride_bm,  # 0 in the mask's broadcast dims
    stride_rhb, stride_rhh, stride_rhn, stride_rhk,
    stride_rwb, stride_rwh, stride_rwn, stride_rwk,
    H, N, M,
    KH, KW,  # rel_pos grid: M == KH * KW
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program; a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,  # keys per inner step
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
    BIAS_BOOL: tl.constexpr = False,
    HAS_REL_POS: tl.constexpr = False,
    REL_POS_GRAD: tl.constexpr = False,  # write dRelH and dRelW
    KH_PAD: tl.constexpr = 16,  # KH rounded up to a power of two >= 16
    KW_PAD: tl.constexpr = 16,
    REL_POS_MMA: tl.constexpr = False,  # rel_pos by selection-matrix dots (16-bit tables in q's dtype)
    CuSeqQ=None,  # (S+1,) int32 offsets of the packed query sequences (VARLEN, else None)
    CuSeqK=None,  # (S+1,) int32 offsets of the packed key sequences (VARLEN, else None)
    Tiles=None,  # (2, G) int32 tile table of this launch (VARLEN, else None), see _varlen_tile
    VARLEN: tl.constexpr = False,  # packed sequences: Q (T, H, D), K, V (Tk, H, D), Lse (H, T); N = T
    BIAS_ROWS_BCAST: tl.constexpr = False,  # the mask has one row for every query (stride_bn == 0: key
                                            # padding), read as one (1, BLOCK_N) vector per key step
    SYNC_KV: tl.constexpr = False,  # a CTA barrier after each step's K/V loads (dq_syncs_kv)
):
    if VARLEN:
        # -- (head, query tile) of the packed sequences, as in the forward (N came in as T) --
        pid = tl.program_id(0)
        num_tiles = tl.num_programs(0) // H
        off_h = (pid // num_tiles).to(tl.int64)
        start_m, q_row0, n_seq, k_row0, m_seq = _varlen_tile(Tiles, CuSeqQ, CuSeqK, pid % num_tiles, num_tiles)
        total_q = N
        Q += q_row0 * stride_qn
        dOut += q_row0 * stride_don
        Out += q_row0 * stride_on
        dQ += q_row0 * stride_dqn
        K += k_row0 * stride_kn
        V += k_row0 * stride_vn
        N = n_seq
        M = m_seq
        off_b = off_h * 0  # no batch dim (its strides are 0)
    else:
        num_m_blocks = tl.cdiv(N, BLOCK_M)
        pid = tl.program_id(0)
        bh = pid // num_m_blocks
        start_m = (num_m_blocks - 1 - pid % num_m_blocks) * BLOCK_M
        off_b = (bh // H).to(tl.int64)
        off_h = (bh % H).to(tl.int64)

    local_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + local_m
    local_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    row_valid = offs_m < N
    mask = row_valid[:, None] & d_valid[None, :]

    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qn
        + local_m[:, None] * stride_qn + offs_d[None, :],
        mask=mask, other=0.0,
    )
    do = tl.load(
        dOut + off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_don
        + local_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=mask, other=0.0,
    )
    # -- delta = rowsum(dO * O) of these rows, stored for the dK/dV (and dBias) pass launched next --
    o = tl.load(
        Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
        + local_m[:, None] * stride_on + offs_d[None, :],
        mask=mask, other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if VARLEN:
        lse = tl.load(Lse + off_h * total_q + q_row0 + offs_m, mask=row_valid, other=float("inf"))
        tl.store(Delta + off_h * total_q + q_row0 + offs_m, delta, mask=row_valid)
    else:
        lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=row_valid, other=float("inf"))
        tl.store(Delta + bh.to(tl.int64) * N + offs_m, delta, mask=row_valid)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + local_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + local_n[None, :] * stride_vn + offs_d[:, None]
    qk_scale = sm_scale * LOG2E
    # -- with a mask or rel_pos, fully masked rows: lse -> +inf, P = 0 --
    if HAS_BIAS or HAS_REL_POS:
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
    # -- the mask and rel_pos tables: 64-bit bases at this program's first row, int32 row offsets
    #    (rows past N read row N - 1: their P is 0 by lse = +inf, and the loads need no row mask) --
    mask_rows = tl.minimum(offs_m, N - 1) - start_m
    if HAS_BIAS:
        bias_base = Bias + off_b * stride_bb + off_h * stride_bh + start_m.to(tl.int64) * stride_bn
        # a key-padding mask: one row offset, so its tiles are (1, BLOCK_N) and broadcast over the queries
        bias_rows = tl.zeros([1], dtype=tl.int32) if BIAS_ROWS_BCAST else mask_rows * stride_bn
    else:
        bias_base = Bias
        bias_rows = local_m
    if HAS_REL_POS:
        rh_base = RelH + off_b * stride_rhb + off_h * stride_rhh + start_m.to(tl.int64) * stride_rhn
        rw_base = RelW + off_b * stride_rwb + off_h * stride_rwh + start_m.to(tl.int64) * stride_rwn
        rh_rows = mask_rows * stride_rhn
        rw_rows = mask_rows * stride_rwn
    else:
        rh_base = RelH
        rw_base = RelW
        rh_rows = local_m
        rw_rows = local_m
    if REL_POS_MMA:
        # -- this program's rel_h / rel_w rows, held for the whole loop (bins past kh / kw: 0); re-reading
        #    them each step from L1 spilled more (sm_90 D = 64, Triton 3.8: 584-800 B against 96 B at k = 64) --
        bins_h = tl.arange(0, KH_PAD)
        bins_w = tl.arange(0, KW_PAD)
        rh_slab = tl.load(rh_base + rh_rows[:, None] + (bins_h * stride_rhk)[None, :],
                          mask=(bins_h < KH)[None, :], other=0.0)
        rw_slab = tl.load(rw_base + rw_rows[:, None] + (bins_w * stride_rwk)[None, :],
                          mask=(bins_w < KW)[None, :], other=0.0)
    else:
        rh_slab = rh_rows
        rw_slab = rw_rows
    if REL_POS_GRAD:
        drh = tl.zeros([BLOCK_M, KH_PAD], dtype=tl.float32)
        drw = tl.zeros([BLOCK_M, KW_PAD], dtype=tl.float32)
    else:
        drh = 0.0
        drw = 0.0

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    full_end = (M // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, M), N)  # queries i < N see keys j <= i
        unmasked_end = tl.minimum(start_m, full_end)
    else:
        hi = M
        unmasked_end = full_end
    dq, drh, drw = _attention_bwd_dq_inner(
        dq, drh, drw, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, local_n, d_valid,
        0, unmasked_end, M, qk_scale,
        bias_base, rh_base, rw_base, bias_rows, rh_rows, rw_rows, stride_bm, stride_rhk, stride_rwk, KW,
        rh_slab, rw_slab,
        BLOCK_N=BLOCK_N, MASK_KEYS=False, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
        HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS, REL_POS_GRAD=REL_POS_GRAD,
        KH_PAD=KH_PAD, KW_PAD=KW_PAD, REL_POS_MMA=REL_POS_MMA, SYNC_KV=SYNC_KV,
    )
    dq, drh, drw = _attention_bwd_dq_inner(
        dq, drh, drw, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, local_n, d_valid,
        unmasked_end, hi, M, qk_scale,
        bias_base, rh_base, rw_base, bias_rows, rh_rows, rw_rows, stride_bm, stride_rhk, stride_rwk, KW,
        rh_slab, rw_slab,
        BLOCK_N=BLOCK_N, MASK_KEYS=True, CAUSAL_MASK=CAUSAL, DOT_PRECISION=DOT_PRECISION,
        HAS_BIAS=HAS_BIAS, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=HAS_REL_POS, REL_POS_GRAD=REL_POS_GRAD,
        KH_PAD=KH_PAD, KW_PAD=KW_PAD, REL_POS_MMA=REL_POS_MMA, SYNC_KV=SYNC_KV,
    )
    dq = dq * sm_scale
    tl.store(
        dQ + off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqn
        + local_m[:, None] * stride_dqn + offs_d[None, :],
        dq.to(dQ.dtype.element_ty), mask=mask,
    )
    if REL_POS_GRAD:
        # -- this (batch, head)'s partial rel_pos gradients (rows of rows_valid, bins < KH / KW) --
        bins_h = tl.arange(0, KH_PAD)
        bins_w = tl.arange(0, KW_PAD)
        rows64 = offs_m.to(tl.int64)
        tl.store(dRelH + bh.to(tl.int64) * N * KH + rows64[:, None] * KH + bins_h[None, :], drh,
                 mask=row_valid[:, None] & (bins_h < KH)[None, :])
        tl.store(dRelW + bh.to(tl.int64) * N * KW + rows64[:, None] * KW + bins_w[None, :], drw,
                 mask=row_valid[:, None] & (bins_w < KW)[None, :])


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    """The combine of a reduction of two sums at once (``_tile_delta``)."""
    return a0 + b0, a1 + b1


@triton.jit
def _tile_delta(p, dp, FP32: tl.constexpr):
    """delta = rowsum(P dP) (= rowsum(dO O)) where a tile holds every key of its rows (the dBias walk
    with dQ, the short backward); for fp32 inputs divided by rowsum(P). P from lse is off by a
    row-uniform factor 1 + e (lse's rounding, the forward's scores rounded otherwise) that a delta
    from the same P carries too: dS = P (dP - delta) then has rows summing to -e delta, not 0
    (dQ / dK / dmask 1.6-3.8x the tests' budget in the interpreter). Divided, dS rows sum to 0 and
    the gradients keep only P's relative e, as in the passes that read delta from O. Rows without
    a key (sum 0) keep delta 0. 16-bit P is rounded to 2^-8 for its dots, far above e. (One
    reduction of both sums: two tl.sum put 448-544 B on the stack in the short kernel's fp32 64 x 64
    tiles under Triton 3.6.)"""
    if FP32:
        delta, p_sum = tl.reduce((p * dp, p), 1, _add_pairs)
        delta = delta * tl.fdiv(1.0, tl.where(p_sum == 0.0, 1.0, p_sum), ieee_rounding=False)
    else:
        delta = tl.sum(p * dp, axis=1)
    return delta


@triton.jit
def _dbias_p_dp(
    t,  # (BLOCK_M, BLOCK_N) fp32 scores with the mask (and rel_pos) added, in log2 units
    lse,  # (BLOCK_M,) fp32 rows' logsumexp (+inf on fully masked rows)
    do,  # (BLOCK_M, HEAD_DIM_PAD) the rows' output gradients
    v_t,  # (HEAD_DIM_PAD, BLOCK_N) the columns' values, transposed
    valid,  # (BLOCK_M, BLOCK_N) in-range (query, key) pairs; None: t is -inf out of range
    offs_m, offs_n,  # (BLOCK_M,), (BLOCK_N,) query and key indices
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(P, dP): P = exp2(t - lse log2 e) (0 out of range or causally masked), dP = dO V^T."""
    p = tl.math.exp2(t - lse[:, None] * LOG2E)
    if valid is not None:
        p = tl.where(valid, p, 0.0)
    if CAUSAL:
        p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
    return p, tl.dot(do, v_t, input_precision=DOT_PRECISION)


@triton.jit
def flash_attention_bwd_dbias_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides
    Lse,  # (B*H, N) fp32 forward logsumexp (natural log), -inf on fully masked rows
    Delta,  # (B*H, N) fp32 rowsum(dO * O): read, or with WITH_DQ written here (dK/dV reads it after)
    dQ,  # (B, H, N, D) query gradient, contiguous (WITH_DQ, else None)
    dK,  # (B, H, M, D) key gradient, contiguous (WITH_DKDV, else None)
    dV,  # (B, H, M, D) value gradient, contiguous (WITH_DKDV, else None)
    Bias,  # (Bb, Hb, Nb, Mb) float attn_mask, each dim 1 or the full size, any strides
    RelH,  # (B|1, H|1, N, kh) rel_pos row table (HAS_REL_POS, else None)
    RelW,  # (B|1, H|1, N, kw) rel_pos column table (HAS_REL_POS, else None)
    dBias,  # (S, Bb, Hb, Nb, Mb) fp32 partial gradients of the mask, one per batch chunk, contiguous
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_bb, stride_bh, stride_bn, stride_bm,  # 0 in the mask's broadcast dims
    stride_rhb, stride_rhh, stride_rhn, stride_rhk,
    stride_rwb, stride_rwh, stride_rwn, stride_rwk,
    H, N, M,
    KW,  # rel_pos grid width
    BIAS_H,  # Hb: the mask's own number of heads (1 or H)
    BIAS_BH,  # Bb * Hb: the mask's own (batch, head) pairs
    B_LOOP, H_LOOP,  # batches / heads summed into each element: B or 1, H or 1
    B_CHUNK,  # batches one program sums: chunk s of the B_LOOP batches goes to dBias[s]
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per tile
    BLOCK_N: tl.constexpr,  # key columns per tile
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROWS_BCAST: tl.constexpr,  # Nb == 1: sum over all query rows
    COLS_BCAST: tl.constexpr,  # Mb == 1: sum over all key columns
    HAS_REL_POS: tl.constexpr = False,
    REL_POS_MMA: tl.constexpr = False,  # rel_pos by selection-matrix dots (16-bit tables in q's dtype)
    KH_PAD: tl.constexpr = 16,  # kh and kw rounded up to a power of two >= 16 (REL_POS_MMA)
    KW_PAD: tl.constexpr = 16,
    SPLIT_BATCHES: tl.constexpr = False,  # the B_LOOP batches are split into chunks of B_CHUNK (else one)
    TILE_WALK: tl.constexpr = False,  # no rows / columns summed, no rel_pos: one flat (batch, head) loop
    WITH_DQ: tl.constexpr = False,  # TILE_WALK with every key in one column tile: also delta and dQ
    WITH_DKDV: tl.constexpr = False,  # WITH_DQ with every query in one row tile too: also dK and dV
):
    """dBias = sum over the mask's broadcast dims of dS = P * (dP - delta) (no softmax scale).

    One program per tile of the mask's own (Bb, Hb, Nb, Mb) shape and chunk of B_CHUNK batches; it
    loops over the (batch, head, row block, column block) that broadcast onto the tile in a fixed
    order, recomputing P and dP, and accumulates in fp32 registers; the launcher sums the chunks'
    partials in a fixed order: deterministic, no atomics, no (B, H, N, M) buffer.

    WITH_DQ (the flat walk over a table whose every key fits one column tile: Swin's 7 x 7 windows):
    each (batch, head, row block) is visited exactly once, and its P and dP tiles hold all of its
    rows' keys, so the program also computes delta = rowsum(dO * O) as rowsum(P * dP) (O = P V; no
    O read), stores it for dK/dV, and writes dQ = scale * dS K in place of the dQ pass, which then
    is not launched: one launch and the two score dots of a pass fewer. WITH_DKDV (the row tile
    holds every query too): each (batch, head) is one step, which writes dV = P^T dO and
    dK = scale * dS^T Q as well, in place of the dK/dV pass: the window's whole backward in one
    launch, five dots, P and dS formed once.
    """
    GATHER: tl.constexpr = HAS_REL_POS and not REL_POS_MMA  # rel_pos by per-element gathers
    num_col_tiles = 1 if COLS_BCAST else tl.cdiv(M, BLOCK_N)
    num_row_tiles = 1 if ROWS_BCAST else tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    col_tile = pid % num_col_tiles
    row_tile = (pid // num_col_tiles) % num_row_tiles
    own_bh = pid // (num_col_tiles * num_row_tiles)  # (chunk, Bb, Hb) flattened: the output slab
    if SPLIT_BATCHES:
        b_lo = (own_bh // BIAS_BH) * B_CHUNK  # this chunk's first batch of the B_LOOP
        b_hi = tl.minimum(b_lo + B_CHUNK, B_LOOP)
        own_b = (own_bh % BIAS_BH) // BIAS_H
    else:
        b_lo = 0
        b_hi = B_LOOP
        own_b = own_bh // BIAS_H
    own_h = own_bh % BIAS_H
    if ROWS_BCAST:
        row_lo, row_hi = 0, N
    else:
        row_lo = row_tile * BLOCK_M
        row_hi = row_lo + BLOCK_M
    if COLS_BCAST:
        col_lo, col_hi = 0, M
    else:
        col_lo = col_tile * BLOCK_N
        col_hi = col_lo + BLOCK_N

    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    qk_scale = sm_scale * LOG2E
    # -- int32 offsets inside the mask and rel_pos tiles (64-bit bases per (batch, head, row block, column
    #    block); the launcher keeps the offsets < 2^31); the rel_pos column split once per program unless
    #    the columns are summed over --
    bias_offs = (local_m * stride_bn)[:, None] + (local_n * stride_bm)[None, :]
    if HAS_REL_POS:
        rh_rows = local_m * stride_rhn
        rw_rows = local_m * stride_rwn
    if REL_POS_MMA:
        # (BLOCK_M, KH_PAD) / (BLOCK_M, KW_PAD) slabs per row block; one-hot selections of the columns
        bins_h = tl.arange(0, KH_PAD)
        bins_w = tl.arange(0, KW_PAD)
        kh = M // KW  # M == kh * kw
        rh_offs = rh_rows[:, None] + (bins_h * stride_rhk)[None, :]
        rw_offs = rw_rows[:, None] + (bins_w * stride_rwk)[None, :]
        sel_h_t = (bins_h[:, None] == ((col_lo + local_n) // KW)[None, :]).to(Q.dtype.element_ty)
        sel_w_t = (bins_w[:, None] == ((col_lo + local_n) % KW)[None, :]).to(Q.dtype.element_ty)
    elif HAS_REL_POS:
        rh_offs = rh_rows[:, None] + (((col_lo + local_n) // KW) * stride_rhk)[None, :]
        rw_offs = rw_rows[:, None] + (((col_lo + local_n) % KW) * stride_rwk)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TILE_WALK:
        # -- one tile of the mask's own (rows, columns): its bias once (the same for every batch and
        #    head summed here: those are its broadcast dims), then one flat loop over the (batch, head)
        #    pairs, nothing but their q, dO, k, v, lse and delta loaded per step --
        offs_m = row_lo + local_m
        offs_n = col_lo + local_n
        row_valid = offs_m < N
        key_valid = offs_n < M
        valid = row_valid[:, None] & key_valid[None, :]
        mask = row_valid[:, None] & d_valid[None, :]
        kv_mask = d_valid[:, None] & key_valid[None, :]
        bias_tile = (Bias + own_b.to(tl.int64) * stride_bb + own_h.to(tl.int64) * stride_bh
                     + tl.cast(row_lo, tl.int64) * stride_bn + tl.cast(col_lo, tl.int64) * stride_bm)
        if WITH_DQ:
            # (-inf out of range: P = 0 there without a (BLOCK_M, BLOCK_N) predicate held over the loop)
            bias_t = tl.load(bias_tile + bias_offs, mask=valid, other=float("-inf")).to(tl.float32) * LOG2E
            p_valid = None
        else:
            bias_t = tl.load(bias_tile + bias_offs, mask=valid, other=0.0).to(tl.float32) * LOG2E
            p_valid = valid
        q_offs = offs_m[:, None] * stride_qn + offs_d[None, :]
        do_offs = offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
        k_offs = offs_n[None, :] * stride_kn + offs_d[:, None]
        v_offs = offs_n[None, :] * stride_vn + offs_d[:, None]
        if WITH_DQ:
            dq_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        if WITH_DKDV:
            dkv_offs = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
            kd_mask = key_valid[:, None] & d_valid[None, :]
        for i in range(0, (b_hi - b_lo) * H_LOOP):
            off_b = (own_b + b_lo + i // H_LOOP).to(tl.int64)
            off_h = (own_h + i % H_LOOP).to(tl.int64)
            bh = off_b * H + off_h
            q = tl.load(Q + (off_b * stride_qb + off_h * stride_qh) + q_offs, mask=mask, other=0.0)
            do = tl.load(dOut + (off_b * stride_dob + off_h * stride_doh) + do_offs, mask=mask, other=0.0)
            k_t = tl.load(K + (off_b * stride_kb + off_h * stride_kh) + k_offs, mask=kv_mask, other=0.0)
            v_t = tl.load(V + (off_b * stride_vb + off_h * stride_vh) + v_offs, mask=kv_mask, other=0.0)
            lse = tl.load(Lse + bh * N + offs_m, mask=row_valid, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            if not WITH_DQ:
                delta = tl.load(Delta + bh * N + offs_m, mask=row_valid, other=0.0)
            t = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale + bias_t
            p, dp = _dbias_p_dp(t, lse, do, v_t, p_valid, offs_m, offs_n, CAUSAL=CAUSAL, DOT_PRECISION=DOT_PRECISION)
            if WITH_DQ:
                # -- every key of these rows is here: delta = rowsum(dO * O) = rowsum(P * dP) (O = P V),
                #    stored for the dK/dV pass (if one runs) --
                delta = _tile_delta(p, dp, FP32=Q.dtype.element_ty == tl.float32)
                if not WITH_DKDV:
                    tl.store(Delta + bh * N + offs_m, delta, mask=row_valid)
            ds = p * (dp - delta[:, None])
            if WITH_DKDV:
                # -- the tile holds every query too: dV = P^T dO, complete --
                dv = tl.dot(tl.trans(p.to(v_t.dtype)), do, input_precision=DOT_PRECISION)
                tl.store(dV + bh * M * HEAD_DIM + dkv_offs, dv.to(dV.dtype.element_ty),
                         mask=kd_mask)
            acc += ds
            if WITH_DQ:
                # -- the tile holds every key of these rows: dQ = scale * dS K, complete --
                ds_low = ds.to(k_t.dtype)
                dq = tl.dot(ds_low, tl.trans(k_t), input_precision=DOT_PRECISION) * sm_scale
                tl.store(dQ + bh * N * HEAD_DIM + dq_offs, dq.to(dQ.dtype.element_ty),
                         mask=mask)
                if WITH_DKDV:
                    # -- ... and dK = scale * dS^T Q --
                    dk = tl.dot(tl.trans(ds_low), q, input_precision=DOT_PRECISION) * sm_scale
                    tl.store(dK + bh * M * HEAD_DIM + dkv_offs, dk.to(dK.dtype.element_ty),
                             mask=kd_mask)
    else:
        # -- rows or columns summed too, or rel_pos: (batch, head, row block, column block) nested --
        for ib in range(b_lo, b_hi):
            off_b = (own_b + ib).to(tl.int64)
            for ih in range(0, H_LOOP):
                off_h = (own_h + ih).to(tl.int64)
                bh = off_b * H + off_h
                bias_head = Bias + off_b * stride_bb + off_h * stride_bh
                for start_m in range(row_lo, row_hi, BLOCK_M):
                    # -- this row block's queries, output gradients, lse (-inf -> +inf: P = 0) and delta --
                    offs_m = start_m + local_m
                    row_valid = offs_m < N
                    rows64 = offs_m.to(tl.int64)
                    mask = row_valid[:, None] & d_valid[None, :]
                    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qn
                                + offs_d[None, :],
                                mask=mask, other=0.0)
                    do = tl.load(dOut + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_don
                                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
                    lse = tl.load(Lse + bh * N + offs_m, mask=row_valid, other=float("inf"))
                    lse = tl.where(lse == float("-inf"), float("inf"), lse)
                    delta = tl.load(Delta + bh * N + offs_m, mask=row_valid, other=0.0)
                    bias_rows = bias_head + tl.cast(start_m, tl.int64) * stride_bn
                    if HAS_REL_POS:
                        row0 = tl.cast(start_m, tl.int64)
                        rh_base = RelH + off_b * stride_rhb + off_h * stride_rhh + row0 * stride_rhn
                        rw_base = RelW + off_b * stride_rwb + off_h * stride_rwh + row0 * stride_rwn
                    else:
                        rh_base = RelH
                        rw_base = RelW
                    if REL_POS_MMA:
                        rh_slab = tl.load(rh_base + rh_offs, mask=row_valid[:, None] & (bins_h < kh)[None, :],
                                          other=0.0)
                        rw_slab = tl.load(rw_base + rw_offs, mask=row_valid[:, None] & (bins_w < KW)[None, :],
                                          other=0.0)
                    for start_n in range(col_lo, col_hi, BLOCK_N):
                        offs_n = start_n + local_n
                        key_valid = offs_n < M
                        kv_mask = d_valid[:, None] & key_valid[None, :]
                        k_t = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[None, :] * stride_kn
                                      + offs_d[:, None], mask=kv_mask, other=0.0)
                        v_t = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[None, :] * stride_vn
                                      + offs_d[:, None], mask=kv_mask, other=0.0)
                        # -- P = exp(scale * q k^T + bias - lse);  dS = P * (dO V^T - delta) --
                        valid = row_valid[:, None] & key_valid[None, :]
                        if GATHER:
                            if COLS_BCAST:
                                rh_offs = rh_rows[:, None] + ((offs_n // KW) * stride_rhk)[None, :]
                                rw_offs = rw_rows[:, None] + ((offs_n % KW) * stride_rwk)[None, :]
                            rh_ptrs = rh_base + rh_offs
                            rw_ptrs = rw_base + rw_offs
                        else:
                            rh_ptrs = rh_base
                            rw_ptrs = rw_base
                        bias_ptrs = bias_rows + tl.cast(start_n, tl.int64) * stride_bm + bias_offs
                        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
                        if REL_POS_MMA:
                            # -- scale * q k^T + rel_h sel_h^T + rel_w sel_w^T, accumulated onto the scores (one
                            #    non-zero product per element: exact), then in log2 units --
                            if COLS_BCAST:
                                sel_h_t = (bins_h[:, None] == (offs_n // KW)[None, :]).to(Q.dtype.element_ty)
                                sel_w_t = (bins_w[:, None] == (offs_n % KW)[None, :]).to(Q.dtype.element_ty)
                            s = tl.dot(rh_slab, sel_h_t, s * (qk_scale / LOG2E))
                            s = tl.dot(rw_slab, sel_w_t, s) * LOG2E
                        else:
                            s = s * qk_scale
                        # -- log2 units here: natural-log units with log2 e in the exponent's fma (as in the
                        #    other kernels) spilled 24 B with the rel_pos gathers (sm_90 D = 64, Triton 3.8) --
                        t = _add_bias(s, bias_ptrs, rh_ptrs, rw_ptrs, valid,
                                      HAS_BIAS=True, BIAS_BOOL=False, HAS_REL_POS=GATHER, UNIT=LOG2E)
                        p, dp = _dbias_p_dp(t, lse, do, v_t, valid, offs_m, offs_n, CAUSAL=CAUSAL,
                                            DOT_PRECISION=DOT_PRECISION)
                        acc += p * (dp - delta[:, None])
    # -- reduce the broadcast dims of the tile and store it (fp32) --
    out_head = dBias + own_bh.to(tl.int64) * (1 if ROWS_BCAST else N) * (1 if COLS_BCAST else M)
    rows = row_lo + local_m
    cols = col_lo + local_n
    if ROWS_BCAST and COLS_BCAST:
        tl.store(out_head, tl.sum(tl.sum(acc, 1), 0))
    elif ROWS_BCAST:
        tl.store(out_head + cols, tl.sum(acc, 0), mask=cols < M)
    elif COLS_BCAST:
        tl.store(out_head + rows, tl.sum(acc, 1), mask=rows < N)
    elif WITH_DQ:
        # (a 64-bit base at the tile, int32 offsets inside it, BLOCK_M * M < 2^31: the per-element 64-bit
        #    offsets below put 64-120 B on the stack here; the other walks keep those, int32 ones put 8-40 B
        #    on the stack of the rel_pos walks)
        tile_base = out_head + tl.cast(row_lo, tl.int64) * M + col_lo
        tl.store(tile_base + (local_m[:, None] * M + local_n[None, :]), acc,
                 mask=(rows < N)[:, None] & (cols < M)[None, :])
    else:
        tl.store(out_head + rows.to(tl.int64)[:, None] * M + cols[None, :], acc,
                 mask=(rows < N)[:, None] & (cols < M)[None, :])


@triton.jit
def _short_valid(local_m, local_n, offs_d, n_rows, n_keys, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """In-range predicates of one pair's tiles: rows < n_rows, keys < n_keys, head-dim columns < D
    in the first half (offs_d) and the second (HALF + offs_d; unused without SPLIT_D). Returns
    (row_valid, key_valid, (rows, cols), (cols, keys) and (keys, cols) masks, the last three again
    for the second half)."""
    row_valid = local_m < n_rows
    key_valid = local_n < n_keys
    d_valid = offs_d < HEAD_DIM
    hi_valid = (HALF + offs_d) < HEAD_DIM
    return (row_valid, key_valid, row_valid[:, None] & d_valid[None, :], d_valid[:, None] & key_valid[None, :],
            key_valid[:, None] & d_valid[None, :], row_valid[:, None] & hi_valid[None, :],
            hi_valid[:, None] & key_valid[None, :], key_valid[:, None] & hi_valid[None, :])  # fmt: skip


@triton.jit
def _short_store_dv(
    dv_ptrs,  # (BLOCK_N, HALF) pointers into dV's tile (or its second half)
    p,  # (BLOCK_M, BLOCK_N) fp32 probabilities
    do,  # (BLOCK_M, HALF) the rows' output gradients (or their second half)
    kd_mask,  # (BLOCK_N, HALF) in-range (key, column) pairs
    DOT_PRECISION: tl.constexpr,
):
    """dV = P^T dO for every key of the tile, complete: stored in dV's dtype."""
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    tl.store(dv_ptrs, dv.to(dv_ptrs.dtype.element_ty), mask=kd_mask)


@triton.jit
def flash_attention_bwd_short_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides
    Lse,  # (B*H, N) fp32 forward logsumexp (natural log), -inf on fully masked rows
    dQ,  # (B, H, N, D) query gradient, contiguous
    dK,  # (B, H, M, D) key gradient, contiguous
    dV,  # (B, H, M, D) value gradient, contiguous
    Bias,  # (Bb, Hb, N|1, M|1) attn_mask without a gradient (HAS_BIAS, not with VARLEN), any strides
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_bb, stride_bh, stride_bn, stride_bm,  # 0 in the mask's broadcast dims
    H, N, M,
    BH,  # B * H: the (batch, head) pairs
    PAIRS,  # (batch, head) pairs per program: program p takes [p * PAIRS, (p + 1) * PAIRS)
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= N: every query in one row tile
    BLOCK_N: tl.constexpr,  # >= M >= 1: every key in one column tile
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False,
    BIAS_BOOL: tl.constexpr = False,  # the mask is bool (read as uint8, 0 = masked), else float (added)
    SPLIT_D: tl.constexpr = False,  # the head dim in two halves of HEAD_DIM_PAD / 2 (D = 65..128)
    CuSeqQ=None,  # (S+1,) int32 query offsets of the packed sequences (VARLEN)
    CuSeqK=None,  # (S+1,) int32 key offsets (VARLEN)
    VARLEN: tl.constexpr = False,  # packed (T, H, D) sequences: pair = (sequence, head), BH = S * H
):
    """The whole backward of attention over short sequences (windows: Swin's 7 x 7 / 8 x 8 through
    ``window_attention``, Hiera's mask units), one (batch, head) pair per step:

        P = exp2(Q K^T * scale*log2e + mask - lse*log2e),  dP = dO V^T
        delta = rowsum(P * dP)  (= rowsum(dO * O), since O = P V: no O read)
        dS = P * (dP - delta),  dV = P^T dO,  dQ = scale * dS K,  dK = scale * dS^T Q

    Every query fits one row tile and every key one column tile, so each gradient is complete after
    one step and is written once: five dots with P and dS formed once, one launch instead of the dQ
    and dK/dV passes (three and four dots, their score tiles formed twice), deterministic. Each
    program walks a contiguous run of PAIRS pairs, so the loads of the next pair can be in flight
    during this one's dots. SPLIT_D: q, k, v, dO in (rows, D / 2) halves, the score dots accumulating
    over both and each gradient stored half by half, dV's before dP is formed: (64, 64) accumulators
    where (64, 128) ones spilled. VARLEN (packed sequences no longer than the tiles: Qwen-VL's
    windows): a pair is (sequence, head), BH = S * H; q, dO (T, H, D) and k, v (Tk, H, D) with
    batch strides 0, Lse (H, T) with N = T, the gradients contiguous (T, H, D) and (Tk, H, D); each
    step reads its sequence's first query and key and its lengths from cu_seqlens.
    """
    HALF: tl.constexpr = HEAD_DIM_PAD // 2 if SPLIT_D else HEAD_DIM_PAD  # the head-dim columns per tile
    pid = tl.program_id(0)
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HALF)
    if not VARLEN:  # every pair's lengths: N and M
        row_valid, key_valid, mask, kv_mask, kd_mask, mask_hi, kv_mask_hi, kd_mask_hi = _short_valid(
            local_m, local_n, offs_d, N, M, HEAD_DIM, HALF)
    qk_scale = sm_scale * LOG2E
    # -- int32 offsets inside one pair's tiles (a pair's rows: 64-bit bases below); the gradients'
    #    rows are D apart, H * D in the packed (T, H, D) layout --
    q_offs = local_m[:, None] * stride_qn + offs_d[None, :]
    do_offs = local_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    k_offs = local_n[None, :] * stride_kn + offs_d[:, None]
    v_offs = local_n[None, :] * stride_vn + offs_d[:, None]
    if VARLEN:
        dq_offs = local_m[:, None] * (H * HEAD_DIM) + offs_d[None, :]
        dkv_offs = local_n[:, None] * (H * HEAD_DIM) + offs_d[None, :]
    else:
        dq_offs = local_m[:, None] * HEAD_DIM + offs_d[None, :]
        dkv_offs = local_n[:, None] * HEAD_DIM + offs_d[None, :]
    if HAS_BIAS:
        bias_offs = (local_m * stride_bn)[:, None] + (local_n * stride_bm)[None, :]
        valid = row_valid[:, None] & key_valid[None, :]
    first = pid * PAIRS
    for bh in range(first, tl.minimum(first + PAIRS, BH)):
        off_h = tl.cast(bh % H, tl.int64)
        if VARLEN:
            # -- sequence bh // H: its first query and key and its lengths, from cu_seqlens --
            seq = bh // H
            q_start = tl.load(CuSeqQ + seq)
            k_start = tl.load(CuSeqK + seq)
            row_valid, key_valid, mask, kv_mask, kd_mask, mask_hi, kv_mask_hi, kd_mask_hi = _short_valid(
                local_m, local_n, offs_d, tl.load(CuSeqQ + seq + 1) - q_start, tl.load(CuSeqK + seq + 1) - k_start,
                HEAD_DIM, HALF)
            q_start = tl.cast(q_start, tl.int64)
            k_start = tl.cast(k_start, tl.int64)
            q_base = q_start * stride_qn + off_h * stride_qh
            do_base = q_start * stride_don + off_h * stride_doh
            k_base = k_start * stride_kn + off_h * stride_kh
            v_base = k_start * stride_vn + off_h * stride_vh
            row0 = off_h * N + q_start  # Lse (H, T)
            dq_row0 = q_start * H + off_h  # rows of the (T * H, D) gradients
            dkv_row0 = k_start * H + off_h
        else:
            off_b = tl.cast(bh // H, tl.int64)
            q_base = off_b * stride_qb + off_h * stride_qh
            do_base = off_b * stride_dob + off_h * stride_doh
            k_base = off_b * stride_kb + off_h * stride_kh
            v_base = off_b * stride_vb + off_h * stride_vh
            row0 = tl.cast(bh, tl.int64) * N
            dq_row0 = row0
            dkv_row0 = tl.cast(bh, tl.int64) * M
        q_ptrs = Q + q_base + q_offs
        do_ptrs = dOut + do_base + do_offs
        k_ptrs = K + k_base + k_offs
        v_ptrs = V + v_base + v_offs
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        do = tl.load(do_ptrs, mask=mask, other=0.0)
        k_t = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v_t = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if SPLIT_D:
            q_hi = tl.load(q_ptrs + HALF, mask=mask_hi, other=0.0)
            do_hi = tl.load(do_ptrs + HALF * stride_dod, mask=mask_hi, other=0.0)
            k_t_hi = tl.load(k_ptrs + HALF, mask=kv_mask_hi, other=0.0)
            v_t_hi = tl.load(v_ptrs + HALF, mask=kv_mask_hi, other=0.0)
        # -- lse -inf (a fully masked row) -> +inf, so that P = 0 on that row --
        lse = tl.load(Lse + row0 + local_m, mask=row_valid, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        # -- scores in log2 units with the mask; keys past M at -inf (P = 0 there) --
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        if SPLIT_D:
            s = tl.dot(q_hi, k_t_hi, s, input_precision=DOT_PRECISION)
        t = s * qk_scale
        if HAS_BIAS:
            bias_ptrs = Bias + (off_b * stride_bb + off_h * stride_bh) + bias_offs
            t = _add_bias(t, bias_ptrs, None, None, valid, HAS_BIAS=True, BIAS_BOOL=BIAS_BOOL, HAS_REL_POS=False,
                          UNIT=LOG2E)
        t = tl.where(key_valid[None, :], t, float("-inf"))
        p = tl.math.exp2(t - lse[:, None] * LOG2E)
        if CAUSAL:
            p = tl.where(local_m[:, None] >= local_n[None, :], p, 0.0)
        dv_ptrs = dV + dkv_row0 * HEAD_DIM + dkv_offs
        if SPLIT_D:  # dV = P^T dO first, its accumulators gone before dP's is live (after: 32 B spilled, sm_90, 3.6)
            _short_store_dv(dv_ptrs, p, do, kd_mask, DOT_PRECISION)
            _short_store_dv(dv_ptrs + HALF, p, do_hi, kd_mask_hi, DOT_PRECISION)
        # -- every key of every row is here: delta = rowsum(P * dP), dS = P * (dP - delta) --
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if SPLIT_D:
            dp = tl.dot(do_hi, v_t_hi, dp, input_precision=DOT_PRECISION)
        delta = _tile_delta(p, dp, FP32=Q.dtype.element_ty == tl.float32)
        ds = (p * (dp - delta[:, None])).to(k_t.dtype)
        if not SPLIT_D:  # dV = P^T dO after dS (first, a bool mask's D = 64 tiles spilled 24 B on sm_90)
            _short_store_dv(dv_ptrs, p, do, kd_mask, DOT_PRECISION)
        # -- dQ = scale * dS K; dK = scale * dS^T Q: complete, stored once --
        dq_ptrs = dQ + dq_row0 * HEAD_DIM + dq_offs
        dq = tl.dot(ds, tl.trans(k_t), input_precision=DOT_PRECISION) * sm_scale
        tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty), mask=mask)
        if SPLIT_D:
            dq = tl.dot(ds, tl.trans(k_t_hi), input_precision=DOT_PRECISION) * sm_scale
            tl.store(dq_ptrs + HALF, dq.to(dQ.dtype.element_ty), mask=mask_hi)
        ds_t = tl.trans(ds)
        dk_ptrs = dK + dkv_row0 * HEAD_DIM + dkv_offs
        dk = tl.dot(ds_t, q, input_precision=DOT_PRECISION) * sm_scale
        tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=kd_mask)
        if SPLIT_D:
            dk = tl.dot(ds_t, q_hi, input_precision=DOT_PRECISION) * sm_scale
            tl.store(dk_ptrs + HALF, dk.to(dK.dtype.element_ty), mask=kd_mask_hi)


# ---------------------------------------------------------------------------------------------
# Configurations (chosen per architecture from the ahead-of-time register/spill report)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # forward only: keys per step past the last whole key block when they fit (0: one whole block)
    key_tail: int = 0
    # forward only: Q, K, V and the output move by tensor descriptors (Hopper's TMA), see fwd_tma_descriptors
    tma: bool = False
    # ptxas's register cap per thread (Triton's maxnreg), where the default allocation crosses an
    # occupancy cliff that the tiles are sized for
    max_registers: int | None = None
    # dK/dV only: whole query blocks step with no row predicate, the rows past the last one in a
    # predicated step of their own (the kernel's SPLIT_ROWS)
    row_split: bool = False

    def launch_options(self) -> dict[str, int]:
        """The Triton launch options of these tiles."""
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.max_registers:
            options["maxnreg"] = self.max_registers
        return options


# The forward's short last key step. Every ViT length is a square plus class/register tokens
# (197, 257, 577, 785, 1025, 2305): 1-21 keys past the last whole 64-key block, computed in a
# 32-key step instead of a 64-key one (useful share of the 128 x 64 score tiles, the shape model's
# padded_fraction: N = 197 0.59 -> 0.68, 785 0.83 -> 0.86, 2305 0.92 -> 0.94). HGMMA 64x32x16
# there on Hopper; the steady-state loop is unchanged.
KEY_TAIL = 32


# The forward rescales its accumulator lazily (LAZY_RESCALE, _rescale_if_grown) where, with 16-bit inputs,
# it holds at least this many fp32 values per thread: D >= 65 (padded to 128) on the 128 x 32 / 8-warp
# and 64 x 32 / 4-warp tiles, and D = 256. There the multiply of the whole accumulator on every key step
# (64 FMULs a thread, 128 at D = 256) outweighs the CTA-wide test that replaces it (a shuffle reduction,
# one shared-memory exchange and a barrier: ~30 instructions). sm_90 bf16 hot loops, static report,
# Triton 3.8: D = 128 261 -> 228 instructions a step (issue ratio 1.02 -> 0.89), D = 256 326 -> 218;
# at D = 64 (32 values a thread) 292 -> 283 only, not worth the barrier: those stay eager. fp32 inputs
# stay eager too (their dots run on the FMA units, the rescale a sliver of it). UNMEASURED on a GPU.
LAZY_RESCALE_MIN_VALUES = 64


def lazy_rescale(cfg: AttentionConfig, head_dim_pad: int, dtype: torch.dtype) -> bool:
    """Whether a forward launch with these tiles rescales lazily (``LAZY_RESCALE_MIN_VALUES``)."""
    values_per_thread = cfg.block_m * head_dim_pad // (32 * cfg.num_warps)
    return dtype != torch.float32 and values_per_thread >= LAZY_RESCALE_MIN_VALUES


def _with_key_tail(cfg: AttentionConfig) -> AttentionConfig:
    return dataclasses.replace(cfg, key_tail=KEY_TAIL if cfg.block_n > KEY_TAIL else 0)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the lse the forward writes (and autograd saves) for inputs of ``dtype``:
    float32, and float64 for fp32 inputs, so that their backward can undo the rounding of the
    fp32 lse its kernels read (``backward_lse``). The public lse (``return_lse``) is float32.

    Example:
        >>> lse_dtype(torch.bfloat16), lse_dtype(torch.float32)  # (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float32 else torch.float32


def lse_signature(dtype: torch.dtype) -> str:
    """The ahead-of-time signature type of the forward's Lse pointer for inputs of ``dtype``."""
    return "*fp64" if lse_dtype(dtype) == torch.float64 else "*fp32"


# log2(e) as the backward kernels multiply lse by it: the constexpr becomes an fp32 scalar there
_LOG2E_FP32 = struct.unpack("f", struct.pack("f", LOG2E.value))[0]


def backward_lse(
    lse: torch.Tensor, grad_out: torch.Tensor, rows_last: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The lse and the output gradient the backward kernels take, from the forward's lse.

    The kernels recompute P = exp2(t - hi) with hi = fl32(fl32(lse) * log2 e) (their fp32 product)
    where the exact row offset is L = lse * log2 e: each row's P is off by the factor
    c = exp2(hi - L), ~|L| 2^-24 from 1, which the tolerance rule counts against fp32 gradients at
    large logits (exact scores at |lse| ~ 50-130: dq / dk / dv 1.3-2.1x its budget). For fp32 inputs the forward's
    lse is float64 (``lse_dtype``): c is computed here, and dO's rows are multiplied by it. Every
    pass is then exact in c: dV = P'^T (c dO) = P^T dO; delta' = rowsum(c dO * O) = c delta, so
    dS = P' (dP' - delta') = c P' (dP - delta) = P (dP - delta), whence dQ, dK and dBias; the
    short backward's and the dBias walk's in-tile delta is invariant to c. The kernels themselves
    are unchanged; the cost is one fp32 copy of dO and a few (B, H, N) elementwise ops, fp32 only.
    Rows whose lse is not finite (fully masked: -inf; NaN) keep c = 1.

    Args:
        lse: (B, H, N), or (H, T) for packed sequences, float32 or float64 (``lse_dtype``).
        grad_out: (B, H, N, D) or, with ``rows_last=False``, packed (T, H, D).

    Returns:
        (lse as float32, grad_out), both unchanged for a float32 lse (16-bit inputs).
    """
    if lse.dtype != torch.float64:
        return lse, grad_out
    lse32 = lse.to(torch.float32)
    hi = lse32 * _LOG2E_FP32  # fp32, as the kernels round it
    lo = lse * LOG2E.value - hi.to(torch.float64)
    c = torch.where(torch.isfinite(lo), torch.exp2(-lo), 1.0).to(torch.float32)
    c = c[..., None] if rows_last else c.t()[..., None]
    return lse32, grad_out * c


def head_dim_padded(head_dim: int) -> int:
    """The power of two >= 16 that a head dim is padded to in registers."""
    return max(16, next_power_of_2(head_dim))


# Under the interpreter: small tiles, so short test sequences still cross several blocks. The
# forward needs block_m % block_n == 0; the backward needs block_n % block_m == 0 (dK/dV keeps
# block_n keys and steps block_m queries; dQ keeps block_n queries and steps block_m keys).
_INTERPRETER_FWD = AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, key_tail=8)
_INTERPRETER_BWD = AttentionConfig(block_m=16, block_n=32, num_warps=4, num_stages=1, row_split=True)


def fwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int, tma: bool = False,
               causal: bool = False) -> AttentionConfig:  # fmt: skip
    """Forward block sizes for one (architecture, dtype, padded head dim); ``tma``: the inputs
    qualify for tensor descriptors (``fwd_tma_descriptors``), which Hopper's 16-bit tiles up to
    D = 128 then use; ``causal``: the launch is causal (sm_80's register cap differs).

    Picked from the ahead-of-time report (``python -m benchmarks static``): the largest tiles
    that compile without spills on each architecture. Not yet tuned by timing on a GPU. Tiles
    wider than ``KEY_TAIL`` keys end with a ``KEY_TAIL``-key step where the keys left fit in it.

    Hopper with TMA (Triton 3.8 static report, 2026-12-04): the bulk copies need no per-thread
    addresses, so the tiles widen. Up to D = 64: 64 query rows on one warpgroup, 128-key steps,
    two stages, capped at 160 registers (ptxas allocates 180-198 uncapped: 2 CTAs/SM; at 160 no
    spill and the same hot loop, 3 CTAs/SM with 8 registers to the cliff; at 152 it recomputes
    values and the loop grows 453 -> 474 instructions), hot-loop issue ratio 0.89 (the pointer
    loads of the same tiles: 244 registers, 0.96; the 128 x 64 pointer tiles: 126-128 registers,
    1.14: the softmax's ~5.5 instructions per score against a 64-wide K dimension).
    Not modelled: each query row block re-reads every K/V block, so 64-row blocks read K and V
    from L2 twice as often per FLOP as 128-row ones (64 vs 32 bytes per tensor-core cycle per
    SM at the tensor-core peak, D-independent): the first GPU run arbitrates.

    Hopper above D = 64 (to 128): two programs per SM. The 128 x 64 tiles on two warpgroups took
    239-254 registers with pointer loads (159 with TMA): one program per SM, whose warpgroups run
    their MMAs and their softmax in turn with nothing to fill the gaps (loop efficiency 0.58 by the
    static report's model, which the first H200 run bore out: 311 TFLOP/s at N = 4097 against the
    D = 64 tiles' 420 at two programs per SM). Pointer loads now take 128 x 32 tiles over three
    stages under a 128-register cap with a 16-key tail step (plain, causal, varlen, fp16 and bf16:
    no spill, issue ratio 1.02-1.05, loop efficiency ~0.97, 80 KiB of shared memory per program;
    with the lazy rescale (``lazy_rescale``) 0.85-0.89 and 1.0;
    128 x 64 under the cap spills 80 B); TMA keeps 128 x 64 under the same cap (no spill, 0.71,
    loop efficiency 1.0). Static report, Triton 3.8, 2026-12-05; UNMEASURED on a GPU
    (``benchmarks/gpu_checks/attention_configs.py`` times them against the one-program tiles).
    """
    if INTERPRETER:  # no new config per launch unless it differs (the host-time tool times this path)
        return _INTERPRETER_FWD if _INTERPRETER_FWD.tma == tma else dataclasses.replace(_INTERPRETER_FWD, tma=tma)
    return _hardware_fwd_config(arch, dtype, head_dim_pad, tma, causal)


@functools.cache
def _hardware_fwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int, tma: bool,
                         causal: bool = False) -> AttentionConfig:  # fmt: skip
    """``fwd_config`` off the interpreter, computed once per key (it runs on every launch)."""
    hopper16 = 90 <= arch < 100 and dtype != torch.float32
    if tma and hopper16 and head_dim_pad <= 128:
        if head_dim_pad <= 64:
            tiles = AttentionConfig(64, 128, 4, 2, max_registers=160)
        else:
            tiles = AttentionConfig(128, 64, 8, 2, max_registers=128)
        return dataclasses.replace(_with_key_tail(tiles), tma=True)
    if hopper16 and 64 < head_dim_pad <= 128:
        return _HOPPER_FWD_128
    tiles = _with_key_tail(_fwd_tiles(arch, dtype, head_dim_pad))
    if hopper16 and head_dim_pad == 64 and causal:
        # causal D = 64: capped at 128, not 120 (two programs per SM either way): under 120 it put 8 B on
        # the stack with Triton 3.6, the H200 machine's (bf16 and fp16; static report, 2026-12-05)
        return dataclasses.replace(tiles, max_registers=128)
    if arch == 80 and dtype != torch.float32 and 32 <= head_dim_pad <= 64 and not (causal and head_dim_pad == 64):
        # A100: two programs per SM under a 128-register cap, where 142-200 registers ran one (loop
        # efficiency 0.49-0.59 -> 0.94-1.0 at D = 32 and 64, plain and varlen; the causal D = 32
        # tiles take 128 anyway, the causal D = 64 ones spill 16 B under the cap, D = 16 needs no
        # cap; static report, Triton 3.8, 2026-12-05; UNMEASURED on a GPU, and the model's serial
        # term was calibrated on Hopper only)
        return dataclasses.replace(tiles, max_registers=128)
    if arch == 80 and dtype != torch.float32 and 64 < head_dim_pad <= 128:
        # A100 above D = 64 (ViT-H's 80, 128): one warpgroup's 64 rows on 32-key steps, two programs
        # per SM (222-232 registers, plain, causal and varlen, no spill), where 128 x 32 on 8 warps
        # took 202-255 and one (loop efficiency 0.61-0.62 -> 0.99; 128 x 32 under a 128 cap spills
        # 16 B, on 4 warps 24 B). A 64-row query block reads all of K and V: 4.9 TB/s of L2 reads at
        # the A100's 312 TFLOP/s. Static report, Triton 3.8, 2026-12-05; UNMEASURED on a GPU
        return AttentionConfig(64, 32, 4, 3)
    if arch == 89 and dtype != torch.float32 and head_dim_pad == 64 and not causal:
        # Ada (L40S, RTX 4090): the 128 x 64 tiles on 4 warps, 32 rows each, two programs per SM
        # (255 registers, no spill, 96 KiB of shared memory for the two), where 8 warps took 191-194
        # registers and one program (loop efficiency 0.76 -> 1.0; causal spills 32 B on 4 warps;
        # static report, Triton 3.8, 2026-12-05, no register headroom left for other Triton
        # versions: the report of the version in use says; UNMEASURED on a GPU)
        return dataclasses.replace(tiles, num_warps=4)
    return tiles


# Hopper's plain 16-bit forward at D = 65..128: two programs per SM (the 128 x 64 tiles, 239-254
# registers, ran one: see fwd_config), 32-key steps with a 16-key tail step
_HOPPER_FWD_128 = AttentionConfig(128, 32, 8, 3, key_tail=16, max_registers=128)


def _fwd_tiles(arch: int, dtype: torch.dtype, head_dim_pad: int) -> AttentionConfig:
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units and need many registers
        return _FP32_CONFIGS[head_dim_pad]
    if head_dim_pad > 128:
        return _FWD_256_HOPPER if 90 <= arch < 100 else _FWD_256
    small = head_dim_pad <= 64
    if 90 <= arch < 100:  # Hopper: two warpgroups of warpgroup MMA over 128 query rows
        # up to D = 64 capped at 120 registers: two CTAs/SM with 8 to spare (uncapped 118-128, and
        # 180 for fp16 causal; capped: no spill, the same hot loop; Triton 3.8 and 3.6, 2026-12-04).
        # fp16 takes two stages: with three, fp16 causal spills 8 B at the cap (1.13 -> 1.15 issue)
        if small:
            return AttentionConfig(128, 64, 8, 2 if dtype == torch.float16 else 3, max_registers=120)
        return AttentionConfig(128, 64, 8, 2)
    if arch >= 89:  # Ada and consumer Blackwell: ~99 KB of shared memory, no warpgroup MMA
        return AttentionConfig(128, 64, 8, 2) if small else AttentionConfig(64, 32, 4, 2)
    return AttentionConfig(128, 64, 8, 3) if small else AttentionConfig(128, 32, 8, 3)


# Query rows up to which the forward takes one warpgroup's 64-row tiles instead of 128-row ones
SHORT_QUERIES = 64


@functools.cache  # runs on every short launch: computed once per key
def short_query_config(cfg: AttentionConfig, arch: int, float_bias: bool = False) -> AttentionConfig:
    """The forward's tiles for at most ``SHORT_QUERIES`` query rows (Swin's 7 x 7 windows: N = 49;
    Hiera's 8 x 8 mask units: 64) where ``cfg`` spends 128 rows on 8 warps: 64 rows on 4 warps, so
    no warpgroup computes rows that are all padding (at N = 49 the 128 x 64 tiles do 29% useful
    work, 64 x 64 ones 59%) and twice as many programs fit an SM. Up to D = 64, no rel_pos, no TMA
    (the launcher checks). Uncapped: the 120-register cap of Hopper's 128-row tiles puts 32 B on
    the stack here (147 registers uncapped, 3 CTAs/SM). A float bias off Hopper steps 32 keys with
    no key tail (64-key steps put 80 B on the stack on sm_80, 32 B on sm_89). Static report, Triton
    3.8; UNMEASURED on a GPU."""
    short = dataclasses.replace(cfg, block_m=SHORT_QUERIES, num_warps=4, max_registers=None)
    if float_bias and arch < 90:
        short = dataclasses.replace(short, block_n=32, key_tail=0)
    return short


def takes_short_tiles(cfg: AttentionConfig, n_q: int, head_dim_pad: int, rel_pos: bool) -> bool:
    """Whether a forward launch of ``n_q`` query rows takes ``short_query_config``'s tiles."""
    return (n_q <= SHORT_QUERIES and cfg.block_m == 2 * SHORT_QUERIES and not cfg.tma and head_dim_pad <= 64
            and not rel_pos)


def bwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int, causal: bool = False) -> AttentionConfig:
    """Backward block sizes, used by both passes: dK/dV keeps ``block_n`` keys per program and
    steps ``block_m`` queries; dQ keeps ``block_n`` queries and steps ``block_m`` keys; ``causal``:
    the launch is causal (Hopper's dK/dV above D = 64 differs).

    Hopper up to D = 64: one warpgroup (4 warps) per program over 64 kept rows and 32-row steps,
    the tiles sm_80 runs, so that two to four programs share an SM. Why: the first H200 run
    (2026-12-04) measured every kernel at one program per SM far below its static hot-loop ratio
    (the D = 128 forward at 311 TFLOP/s, the backward ~2x cuDNN's) and the D = 64 forward, at two
    programs per SM, above SDPA: a program runs its MMAs and its softmax / dS work in turn and
    only other programs on the SM fill the gaps (the shape model's ``loop_efficiency``). The
    8-warp tiles they replace (64-row steps over 128 kept rows) ran one program per SM (197-232
    registers): loop efficiency 0.58 (dK/dV) and 0.60 (dQ). These (Triton 3.8 static report,
    bf16): dK/dV 143 registers, 3 CTAs/SM, issue 0.91 (causal varlen 172, 2 CTAs/SM); dQ 112,
    4 CTAs/SM, 0.83: loop efficiency 1.0, no spills in any variant (the 64-row step with 64 kept
    rows spilled 16 B in the causal varlen dK/dV at 255 registers). UNMEASURED on a GPU:
    ``benchmarks/gpu_checks/attention_configs.py`` times them against the 8-warp tiles.
    Above D = 64 (to 128) Hopper's dK/dV takes one warpgroup over 64 kept keys, 32-row steps,
    without the row split (233 registers with VARLEN: 2 CTAs/SM, no spill, issue ratio 0.57, loop
    efficiency 1.0; the split's second loop spills 40 B); the causal launches keep 8 warps over 128
    kept keys with the split (one program per SM, loop efficiency 0.68 by the static report's
    model), since one warpgroup spills 32-56 B there at one to three stages and fits only with
    16-row steps (249 registers), a 16-wide HGMMA. With 64 kept rows on 8 warps both warpgroups
    computed every S / dP row. dQ there takes a config of its own (``bwd_dq_config``). Static
    report, Triton 3.8, 2026-12-05; UNMEASURED on a GPU.

    ``row_split`` and ``max_registers`` are dK/dV's (``bwd_dq_config`` clears the cap): 16-bit dK/dV
    steps its whole query blocks with no row predicate and the rows past the last one in a step of
    their own (the mask and rel_pos key columns clamped inside the tables, so their tiles load
    unpredicated too). Static, sm_90 bf16 (issue ratio, same report): D = 64 0.91 -> 0.76 (162
    registers, 3 CTAs/SM), causal 1.02 -> 0.84, D = 128 0.53 -> 0.47, D = 256 1.00 -> 0.92, D = 32
    1.69 -> 1.43; off Hopper at D = 16 / 32 capped at 96 / 128 registers to keep 5 / 4 CTAs/SM.

    Head dims above 128 (padded to 256) take ``_BWD_256`` on every architecture, Hopper included:
    a warpgroup MMA gives each warp 16 rows of its accumulator, so the two (rows, 256) fp32
    accumulators of dK/dV alone are 2 x 128 registers per thread whatever the warp count (every
    wgmma tiling spilled 144-1040 B or replicated rows; 16 warps cap registers at 128 and
    replicate). Tiles of 32 rows are below wgmma's 64 and compile to warp-level MMA (HMMA) there.
    """
    if INTERPRETER:
        return _INTERPRETER_BWD
    if dtype == torch.float32:
        return _FP32_CONFIGS_BWD[head_dim_pad]
    if head_dim_pad > 128:
        return _BWD_256
    small = head_dim_pad <= 64
    if 90 <= arch < 100 and not small:
        return _HOPPER_BWD_WIDE if causal else AttentionConfig(32, 64, 4, 2)
    if not small:
        return AttentionConfig(32, 64, 8, 2, row_split=True)
    # off Hopper at D <= 32 the row split's second loop takes registers past an occupancy cliff:
    # capped (no spill) to keep 5 (D = 16) and, on sm_80, 4 (D = 32) CTAs/SM (sm_89's D = 32 stayed
    # at 3; capped there the causal pass puts 8 B on the stack)
    cap = ({16: 96, 32: 128} if arch < 89 else {16: 96}).get(head_dim_pad) if arch < 90 else None
    return AttentionConfig(32, 64, 4, 2, max_registers=cap, row_split=True)


# Hopper's dK/dV tiles above D = 64 where one warpgroup spills (causal) or leaves no room for a
# mask's or rel_pos's tiles (bwd_mask_configs' starting point): 8 warps over 128 kept keys
_HOPPER_BWD_WIDE = AttentionConfig(32, 128, 8, 2, row_split=True)


# Under the interpreter a test may give dQ tiles of their own (None: ``_INTERPRETER_BWD``'s)
_INTERPRETER_DQ: AttentionConfig | None = None


def dq_syncs_kv(arch: int, dtype: torch.dtype, head_dim_pad: int) -> bool:
    """Whether the dQ pass puts a CTA barrier after each step's K/V loads (its SYNC_KV): wherever
    its dots read their shared-memory operands with plain loads (fp32 FMA dots, sm_80/89 warp MMA),
    not Hopper's 16-bit warpgroup MMA. With the barrier ahead of Q's operand loads, ptxas
    interleaves them with the dot; without it, where the shared buffers happen to fall (since the
    pass also computes delta, 2026-12-05) it loads all of Q first: fp32 D = 128 went 96 -> 255
    registers + 224 B of stack, sm_89 bf16 D = 64 spilled 8 B (barrier: 168 registers, 3 CTAs/SM).
    On Hopper's 16-bit path a barrier changed the pipelined loop (issue 0.82 -> 0.64 at D = 64)
    and is not taken; off Hopper not at 16-bit D = 16 and 256 either, which need none (with it
    sm_89's bf16 D = 256 causal put 8 B on the stack). fp32 takes it at every head dim (without
    it D = 256 put 208-944 B on the stack). Static report, Triton 3.8."""
    if dtype == torch.float32:
        return True
    return not 90 <= arch < 100 and 16 < head_dim_pad < 256


def bwd_dq_config(arch: int, dtype: torch.dtype, head_dim_pad: int) -> AttentionConfig:
    """The dQ pass's block sizes (``block_n`` query rows kept, ``block_m`` keys per step) where
    they differ from ``bwd_config``'s, which dK/dV takes.

    Hopper, 16-bit, D = 65..128: one warpgroup over 64 query rows, 32-key steps: 2 CTAs/SM (193-205
    registers, issue 0.51-0.54, no spill in the plain, causal and varlen kernels; Triton 3.8), hot
    loop efficiency 0.64 -> 1.0 by the shape model against the 8-warp 128-row tiles dK/dV keeps
    (one warpgroup there spills 32-40 B in the causal dK/dV). UNMEASURED on a GPU. A100 (sm_80)
    likewise since 2026-12-05: the same tiles on 4 warps, 241-244 registers, 2 CTAs/SM, no spill
    (plain, causal, varlen), against 8 warps at one (loop efficiency 0.67-0.69 -> 1.0); its dK/dV
    keeps 8 warps (4 spill 40 B)."""
    if INTERPRETER:
        return _INTERPRETER_DQ or _INTERPRETER_BWD
    if dtype != torch.float32 and (90 <= arch < 100 or arch == 80) and 64 < head_dim_pad <= 128:
        return AttentionConfig(32, 64, 4, 2)
    cfg = dataclasses.replace(bwd_config(arch, dtype, head_dim_pad), max_registers=None)  # the cap is dK/dV's
    if dtype == torch.float32 and arch == 80 and head_dim_pad == 16:
        # A100 fp32 D = 16 on 2 warps: on 4 the non-causal pass puts 8 B on the stack with the
        # barrier after the K/V loads and the causal one without it (8-10 CTAs/SM on 2, no spill)
        return dataclasses.replace(cfg, num_warps=2)
    return cfg


def varlen_bwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int, causal: bool = False) -> AttentionConfig:
    """Backward block sizes of the VARLEN kernels: ``bwd_config``'s, except fp32 on 8 warps — with
    the tile table's extra live values the 4-warp fp32 tiles put 8 B on the stack in the causal
    dK/dV (D = 128, sm_80) and dQ (D = 64, sm_89) passes (Triton 3.8, 2026-12-04); 8 warps are clean
    (at D = 256 too, where the dense passes take 16)."""
    cfg = bwd_config(arch, dtype, head_dim_pad, causal)
    if INTERPRETER:
        return cfg
    if dtype != torch.float32:
        # Hopper up to D = 64 without the row split: the tile table's values and the split's second
        # loop take 178 registers, 2 CTAs/SM instead of 3 (a 168 cap spills 8 B)
        return dataclasses.replace(cfg, row_split=False) if 90 <= arch < 100 and head_dim_pad <= 64 else cfg
    return dataclasses.replace(cfg, num_warps=8)


def varlen_bwd_dq_config(arch: int, dtype: torch.dtype, head_dim_pad: int) -> AttentionConfig:
    """The VARLEN dQ pass's block sizes: ``bwd_dq_config``'s for 16-bit inputs, fp32 as
    ``varlen_bwd_config``."""
    if INTERPRETER or dtype != torch.float32:
        return bwd_dq_config(arch, dtype, head_dim_pad)
    return varlen_bwd_config(arch, dtype, head_dim_pad)


def fwd_mask_config(
    arch: int, dtype: torch.dtype, head_dim_pad: int, tma: bool = False, float_bias: bool = False,
    rel_pos_mma_bins: int = 0, rel_pos_gathers: bool = False, key_padding: bool = False,
) -> AttentionConfig:
    """Forward block sizes with an attn_mask or rel_pos (head dims up to ``MAX_MASK_HEAD_DIM``: the
    op runs SDPA above), from the ahead-of-time report; ``tma`` as in ``fwd_config``,
    ``float_bias``: the mask is a float bias (not bool); ``rel_pos_mma_bins``:
    rel_pos by selection-matrix dots (``rel_pos_by_mma``) with kh and kw padded to this many bins;
    ``rel_pos_gathers``: rel_pos by per-element gathers (fp32 tables, or wider grids). The mask and
    gathered rel_pos tiles are read with unsigned int32 offsets from one 64-bit base per table (rows
    past N clamped, so only the key tail is predicated; a float bias's offsets are loop-invariant,
    and its tiles are software-pipelined through shared memory by cp.async; a bool mask enters as
    the first dot's accumulator).

    Static report (sm_90, Triton 3.8, bf16; hot-loop issue ratio). Since 2026-12-05 the report
    compiles the mask's and the rel_pos tables' last-dim stride as the constant 1, as the runtime
    does for a contiguous mask (Triton specialises an integer argument equal to 1): the (rows, keys)
    mask tiles then load coalesced along the keys, with more address arithmetic per element than
    the variable stride the report compiled before (whose figures, quoted below where marked, were
    lower for those tiles). The plain tiles take a mask or rel_pos by dots without spills at every
    head dim (rel_pos by dots with 16 / 64 bins on 128 x 64 at D = 128: 0.75 / 0.68, by gathers
    3.99), except at D = 128 with (rows, keys) mask tiles: a bool mask on one stage (1.42; two put
    8 B on the stack), a float bias on 128 x 32 over three stages (1.36; 128 x 64 puts 8-280 B on
    the stack at one to three stages, with or without the key tail); sm_80's and sm_89's plain tiles
    too (sm_89 with a float bias up to D = 64 without the 32-key tail step, which spills 64 B). With
    the rel_pos gathers, the plain 128 x 64 tiles spill at D > 64 (256-352 B), so BLOCK_N is halved
    there and 8 warps share the tile. Hopper up to D = 64, rel_pos by dots over 16 bins: two stages
    under a 128-register cap with a 16-key tail step (the 32-key one put 8 B on the stack under
    Triton 3.6), two CTAs per SM, no spill, issue ratio 1.26 (uncapped: one CTA; the
    gathers 4.11); the report flags it 2 registers from the cliff, but under the cap the occupancy
    cannot drop (a compiler needing more would spill, a problem the report shows on its own), and
    a 120 cap spills 8 B. With 32 bins the 128 cap spills 8 B, with 64 bins 32 B: those stay
    uncapped (one CTA, issue ratio 0.92 with 64 bins), and since 2026-12-05 take one warpgroup (below).
    The D = 128 figures above are of the 128-row tiles, which since 2026-12-05 are one warpgroup's.

    Hopper up to D = 64 since 2026-12-05 (the report's loop efficiency, which put the 128-row tiles
    at one program per SM taking turns): (rows, keys) masks, rel_pos by dots over more than 16 bins
    and rel_pos by gathers take one warpgroup over 64 query rows (``short_query_config``'s tiles,
    uncapped; rel_pos by dots on two stages): two programs per SM, no spill. Static, bf16, D = 64
    (issue ratio / loop efficiency): a float bias 1.82 / 0.55 (was 1.76 / 0.36 on 128 x 64), a bool
    mask 2.83 / 0.35 (2.71 / 0.27), rel_pos by dots over 64 bins 1.12 / 0.89 (0.93 / 0.52; 32 bins:
    180 registers, 1.22), by gathers 4.07 / 0.25 (4.04 / 0.20); D = 32 a float bias 0.29, a bool
    mask 0.20 (0.23, 0.17). Off Hopper a mask alone up to D = 64 likewise (the 64-row tiles
    ``short_query_config`` gives short sequences there: a float bias on 32-key steps): sm_80 D = 64
    float bias 64 x 32 1.23 / 0.82 (was 1.04 / 0.49 at one program per SM), bool 1.58 / 0.63 (1.52 /
    0.40), D = 32 loop efficiency float 0.49, bool 0.39 (0.37, 0.28); sm_89 D = 64 float bias 0.57 /
    1.0 (0.50 / 0.67), bool 0.78 / 1.0 (0.76 / 0.57); no spill. Above D = 64 (to 128) on Hopper
    likewise, on 32-key steps except rel_pos by dots (64): a float bias 64 x 32 over three stages
    1.40 / 0.71 (1.36 / 0.42 on 128 x 32), a bool mask two stages with a 16-key tail 1.83 / 0.55
    (1.42 / 0.41), rel_pos by dots over 16 / 64 bins 0.86 / 1.0 (16-key tail) and 0.91 / 1.0 (0.75 / 0.57, 0.68 /
    0.60), by gathers 4.00 / 0.25 (3.99 / 0.20); at any D not with key padding (above) nor with a
    float bias and rel_pos together. A 64-row query block reads all of K and V, so the K/V reads per
    FLOP double (in L2 at ViT lengths). UNMEASURED on a GPU.

    ``key_padding``: the mask is one row of keys for every query (``BIAS_ROWS_BCAST``), read as one
    vector per key step. Hopper up to D = 64: two stages under a 120-register cap, two CTAs per SM,
    no spill (bool 1.43, float 1.39, against the (rows, keys) tiles' 2.70 and 1.65 at one CTA; three
    stages under the cap put 8-64 B on the stack). Hopper above D = 64: the plain forward's 128 x 32
    tiles under its 128-register cap, two CTAs per SM (bool issue ratio 1.20, float on three stages
    without the key tail 1.23, where two put 8 B on the stack under Triton 3.6: loop efficiency
    0.81-0.83, against 0.54-0.56 on 128 x 64 at one CTA; static report, 2026-12-05). The (rows,
    keys) tiles and rel_pos spill 16-336 B under that cap and keep one CTA per SM. fp32 at D = 64
    on sm_89/90: 8 warps (4 put 8 B on the stack with a float bias).

    Hopper with TMA, a float bias only, D > 64: the bulk copies take Q, K and V's addresses out of the
    registers (128 x 64: 237 registers, issue ratio 0.90). Not taken elsewhere (variable-stride report): with a
    bool mask or rel_pos every TMA tiling spilled (D = 64: 16-1232 B, D = 128: 168-200 B on
    128 x 64), and a float bias up to D = 64 went 1.77 -> 1.86."""
    if INTERPRETER:
        return fwd_config(arch, dtype, head_dim_pad, tma=tma)
    hopper16 = 90 <= arch < 100 and dtype != torch.float32
    rel_pos = rel_pos_mma_bins > 0 or rel_pos_gathers
    if key_padding and not rel_pos and not tma and hopper16 and head_dim_pad <= 64:
        return dataclasses.replace(fwd_config(arch, dtype, head_dim_pad), num_stages=2, max_registers=120)
    if key_padding and not rel_pos and not tma and hopper16 and head_dim_pad <= 128:
        # the plain forward's two-program tiles; a float one on two stages without the key tail
        # (three with the tail put 16 B on the stack)
        return _HOPPER_FWD_128 if not float_bias else dataclasses.replace(_HOPPER_FWD_128, key_tail=0)
    if key_padding and not rel_pos and dtype == torch.float32 and head_dim_pad == 64 and arch >= 89:
        cfg = fwd_mask_config(arch, dtype, head_dim_pad)
        return dataclasses.replace(cfg, num_warps=8)
    if tma and float_bias and not rel_pos and hopper16 and 64 < head_dim_pad <= 128:
        return dataclasses.replace(_with_key_tail(AttentionConfig(128, 64, 8, 2)), tma=True)
    # the plain tiles without their register cap (sized for their own code, not for the mask's);
    # Hopper above D = 64 from the 128 x 64 tiles, one program per SM (the plain forward's two-program
    # 128 x 32 tiles under a 128-register cap leave no room for a mask's tiles)
    cfg = dataclasses.replace(_with_key_tail(_fwd_tiles(arch, dtype, head_dim_pad)), max_registers=None)
    mask_alone16 = dtype != torch.float32 and head_dim_pad <= 64 and not key_padding and not rel_pos
    if mask_alone16 or (hopper16 and head_dim_pad <= 64 and not key_padding and not (rel_pos and float_bias)
                        and (rel_pos_mma_bins > 16 or rel_pos_gathers)):  # fmt: skip
        # one warpgroup over 64 query rows, uncapped: two programs per SM (the 128-row tiles ran one;
        # not rel_pos with a float bias as well, which the report does not compile); off Hopper a
        # mask alone likewise (below)
        one_group = short_query_config(cfg, arch, float_bias=float_bias)
        return dataclasses.replace(one_group, num_stages=2) if rel_pos_mma_bins else one_group
    if rel_pos_mma_bins and 90 <= arch < 100 and head_dim_pad <= 64:
        if rel_pos_mma_bins <= 16:  # the 32-key tail step put 8 B on the stack under Triton 3.6
            return dataclasses.replace(cfg, num_stages=2, max_registers=128, key_tail=16)
        return dataclasses.replace(cfg, num_stages=2)
    if dtype == torch.float32 and 90 <= arch < 100 and head_dim_pad == 64:
        # one stage: two spill 8 B with a bool mask (sm_90, Triton 3.8); 92-94 registers, not 206-217
        return dataclasses.replace(cfg, num_stages=1)
    if dtype == torch.float32 and head_dim_pad == 32:
        return dataclasses.replace(cfg, num_stages=1)  # two put 24 B on the stack with a bool mask on sm_80
    if float_bias and not rel_pos and 89 <= arch < 90 and dtype != torch.float32 and head_dim_pad <= 64:
        return dataclasses.replace(cfg, key_tail=0)  # the 32-key tail step spills 64 B on sm_89
    if dtype == torch.float32 or head_dim_pad <= 64:
        return cfg
    if hopper16 and not key_padding and not (rel_pos and float_bias):
        # one warpgroup over 64 query rows: two programs per SM, where the 128-row tiles ran one (a
        # float bias on 128 x 32, a bool mask on 128 x 64 over one stage, rel_pos on 128 x 64 / 128 x
        # 32: 128 x 64 spilled 8-280 B with (rows, keys) tiles, and under a 128-register cap every
        # 128-row mask tiling spills 72-336 B)
        if rel_pos_mma_bins:
            # up to 16 bins a 16-key tail step: the 32-key one put 8 B on the stack under Triton 3.6
            return AttentionConfig(64, 64, 4, 2, key_tail=16 if rel_pos_mma_bins <= 16 else KEY_TAIL)
        if rel_pos_gathers:
            return AttentionConfig(64, 32, 4, 2)
        return AttentionConfig(64, 32, 4, 3) if float_bias else AttentionConfig(64, 32, 4, 2, key_tail=16)
    if not rel_pos_gathers:
        return dataclasses.replace(cfg, key_tail=0) if float_bias and hopper16 else cfg
    return _with_key_tail(dataclasses.replace(cfg, block_n=max(16, cfg.block_n // 2), num_warps=8))


def bwd_mask_configs(
    arch: int, dtype: torch.dtype, head_dim_pad: int, rel_pos_grad: bool, rel_pos_mma: bool = False,
    rel_pos: bool = True, key_padding: bool = False, bool_mask: bool = False, causal: bool = False,
    rel_pos_bins: int = 64,
) -> tuple[AttentionConfig, AttentionConfig]:
    """(dK/dV, dQ) block sizes with an attn_mask or rel_pos (head dims up to ``MAX_MASK_HEAD_DIM``),
    from the ahead-of-time report (same conventions as ``bwd_config``). Off Hopper, 16-bit tiles of
    32 x 32 with 8 warps (the plain 32 x 64 spill 240-320 B with the gathered mask tiles), and fp32
    8 warps and two stages (the plain fp32 tiles spill 8-16 B there, not on Hopper).

    Hopper, 16-bit: the dQ pass without the rel_pos gradients takes ``bwd_config``'s tiles. The
    gathered mask and rel_pos tiles take registers from the others: dK/dV up to D = 64 steps 32
    queries, not 64 (64 spills 32 B under Triton 3.6, the GPU machine's); dK/dV above D = 64 and
    the dQ pass with the rel_pos gradients (two more (rows, kh / kw) fp32 accumulators) take
    ``_HOPPER_MASK_BWD``, 64 rows on 8 warps, so S and dP are computed twice (a known problem of
    the static report): 128 rows spill 288-352 B (dK/dV, D = 128) and 112-408 B (dQ), 64 rows on
    4 warps 224-552 B.

    Re-measured (Triton 3.8, 2026-12-04) after the gathers became int32 offsets from one 64-bit
    base with the rel_pos column split carried per key block (no per-element division): sm_90
    dK/dV D = 128 on the plain 32 x 128 tiles, 8 warps, spills 88 B (one stage) / 112 B (two);
    64 keys on 4 warps 192-712 B; 64 x 64 on 8 warps still replicates (a chained S dot takes
    warps [8, 1]) and spills 16-208 B. dQ with the rel_pos gradients on 128 rows x 32 keys,
    8 warps: 24 B (D = 64) and 176-256 B (D = 128); 64 rows on 4 warps 32-832 B. So the tiles
    stay; what is left is the gathers' register use (see the report of issue 15).

    ``rel_pos_mma`` (rel_pos by selection-matrix dots, ``rel_pos_by_mma``; 16 bins): no gathered
    rel_pos tiles, so Hopper takes one warpgroup row per 16 rows in both passes (sm_90, Triton 3.8,
    2026-12-04; bf16, with an fp32 bias; regs / spill / issue ratio): dK/dV on 128 keys x 32
    queries, 8 warps, one stage (D = 64: 215 / 0 / 1.38; D = 128: 252 / 0 / 0.92, against the
    gathers' replicated 32 x 64: 218 / 0 / 1.81; two stages 255 / 0 / 1.04; 64 keys on 4 warps spill
    56 B), dQ with the rel_pos gradients on 128 rows x 32 keys, 8 warps, one stage (D = 64: 246 / 0
    / 1.45; D = 128: 248 / 0 / 0.93, against the gathers' replicated 64 x 32 at 1.91 - 2.96; two
    stages 252-255 / 0 / 1.05-1.68; 128 x 64 spills 16 B, 64 rows on 4 warps 152 B at D = 128).
    Adding the dots' result to the scores as a separate tile spilled 24 B on dK/dV's 32 x 128; they
    accumulate onto the scores. Off Hopper dK/dV keeps its 32 x 32 tiles on 8 warps (sm_80 D = 64:
    128 / 0 / 1.34; sm_89 128 / 0 / 0.63; 64 keys on 4 warps 255 / 0 / 1.04 and 0.52, or 16 B spilled
    with one stage); dQ with the rel_pos gradients takes 64 rows x 32 keys on 4 warps, two stages
    (sm_80 255 / 0 / 1.08, sm_89 255 / 0 / 0.50: 1.08 and 0.50 hot-loop instructions per score
    against 2.8 and 1.4 on 32 x 32 over 8 warps, which put the chained score dots at warps [8, 1],
    every MMA row twice; one stage spills 40-48 B).

    ``rel_pos`` False (a mask alone, nothing gathered but the mask): Hopper takes the plain tiles in
    both passes (sm_90, Triton 3.8, 2026-12-04, bf16, dK/dV regs / spill / issue ratio: a bool mask
    at D = 128 on 32 x 128, 8 warps: 241 / 0 / 1.02, against 164 / 0 / 1.40 on
    ``_HOPPER_MASK_BWD``'s 32 x 64, which computes every MMA row twice and is a 16-wide HGMMA; a
    float bias 245 / 0 / 0.96; D = 64 on 32 x 64 over 4 warps, two CTAs per SM: bool 181 / 0 / 1.79,
    float 183 / 0 / 1.61, against one CTA on 32 x 128, 8 warps at 1.71 / 1.50). Off Hopper the
    plain tiles spill 40-80 B at D = 128 with a bool mask.

    Hopper up to D = 64 since 2026-12-05: dK/dV with rel_pos (by gathers, by dots over 16 or 64
    bins) on one warpgroup over 64 kept keys, two programs per SM (sm_90 bf16, issue ratio / loop
    efficiency: gathers 2.38 / 0.42, was 2.37 / 0.30 on 32 x 128 over 8 warps; dots 1.30 / 0.77 and
    1.45 / 0.69, were 1.40 / 0.42 and 1.22 / 0.45; no spill); dQ with the rel_pos gradients by dots
    over up to 16 bins (``rel_pos_bins``: the padded kh / kw, SAM's 14 x 14 windows) on one
    warpgroup over 64 kept rows, one stage (210 registers, 1.30 / 0.77, was 1.16 / 0.46); with
    more bins and with the gathers it keeps 128 rows on 8 warps (one warpgroup spills 16-88 B).

    ``key_padding`` (a mask alone, one row of keys for every query): the same tiles; a bool mask's
    dK/dV runs the plain loop and zeroes the padded keys' rows. Hopper fp32 at D = 64: dK/dV on 8
    warps and dQ on one stage (4 warps and two stages put 8 B on the stack).

    Hopper, 16-bit, D = 65..128, not causal (2026-12-05, the report's loop efficiency): the passes
    that fit one warpgroup take it, two programs per SM instead of one: with key padding dK/dV on
    64 kept keys without the row split (bool 231 registers, issue ratio 0.56; float 228, 0.63) and
    dQ on 64 kept rows (bool 185 / 0.65, float 204 / 0.60), a (rows, keys) mask's dQ too (bool
    255 / 0.88, float on one stage 190 / 0.62): loop efficiency 0.54-0.68 -> 1.0. The (rows, keys)
    dK/dV keeps the 8-warp tiles (one warpgroup spills 16-56 B). UNMEASURED on a GPU.

    The figures above compiled the mask's key stride as a variable and predicated every dK/dV row
    step. Since 2026-12-05 the report compiles the unit stride the runtime specialises for a
    contiguous mask (see ``fwd_mask_config``), and 16-bit dK/dV splits off its last row step
    (``bwd_config``) with the mask's key columns clamped, and takes a bool mask alone by one select
    on P. There (sm_90 bf16, regs / spill / issue ratio, CTAs/SM): (rows, keys) tiles, dK/dV D = 64
    bool 226 / 0 / 1.47 / 2, float 254 / 0 / 1.44 / 2; D = 128 (no split: it spills 24-40 B) bool
    239 / 0 / 1.02, float 255 / 0 / 0.96; dQ D = 64 bool 144 / 0 / 1.52 / 3, float 176 / 0 / 1.25 / 2,
    D = 128 0.86 / 0.74. Key padding: dK/dV D = 64 bool 146 / 0 / 0.94 / 3 (no split: 178 registers,
    2 CTAs/SM), float 159 / 0 / 0.90 / 3, D = 128 0.47 / 0.55; dQ D = 64 1.06 / 0.97 at 4 CTAs/SM.
    rel_pos by dots (16 bins): dK/dV D = 64 251 / 0 / 1.40, D = 128 on two stages without the split
    255 / 0 / 1.06 (one stage put 16 B on the stack, the split 144 B). Hopper fp32 dK/dV at D = 128
    on two stages; off Hopper, dQ with rel_pos by dots and its gradients steps 16 keys (32 put 8 B
    on the stack on sm_80), fp32 dK/dV with rel_pos one stage, fp32 dQ with the rel_pos gradients
    two stages up to D = 64."""
    cfg = bwd_config(arch, dtype, head_dim_pad)
    if INTERPRETER:
        return cfg, cfg
    hopper = 90 <= arch < 100
    if hopper and dtype != torch.float32 and 64 < head_dim_pad <= 128:
        cfg = _HOPPER_BWD_WIDE  # (not the plain pass's one-warpgroup tiles: no room there for a mask's)
    if dtype == torch.float32:
        if not hopper:
            cfg = dataclasses.replace(cfg, num_warps=8, num_stages=2)
            if not rel_pos:
                # a mask alone: dK/dV on one stage (two spilled 8 B on sm_89 at D = 128 with a float bias),
                # a key-padding one on sm_89 on 4 warps (8 put 8 B on the stack at D = 128; on sm_80 4 put
                # 24 B there)
                warps = 4 if key_padding and 89 <= arch < 90 else 8
                return dataclasses.replace(cfg, num_stages=1, num_warps=warps), cfg
            # dK/dV with rel_pos on one stage (two put 8 B on the stack on sm_80 at D = 128); dQ with
            # the rel_pos gradients: 4 warps, two stages up to D = 64, one above (one put 8 B on the
            # stack on sm_80 at D = 64, two 8-16 B on sm_80/89 at D = 128; on 8 warps ptxas holds 128
            # registers and spilled 8 B on sm_80 at D = 128; 16 warps are clean too, 100-104
            # registers, but spread a 16 x 16 tile over 512 threads; Triton 3.8)
            dkdv = dataclasses.replace(cfg, num_stages=1)
            dq = dataclasses.replace(cfg, num_warps=4, num_stages=2 if head_dim_pad <= 64 else 1)
            return dkdv, dq if rel_pos_grad else cfg
        if not rel_pos and key_padding and head_dim_pad == 64:
            return dataclasses.replace(cfg, num_warps=8), cfg
        # dK/dV at D = 128 on two stages (one put 16 B on the stack with a bool mask or rel_pos)
        dkdv = dataclasses.replace(cfg, num_stages=2) if head_dim_pad == 128 else cfg
        if not rel_pos:
            # a mask alone: dQ on two stages (one spilled 8 B with a bool mask at D = 64, sm_90, Triton 3.8)
            return dkdv, dataclasses.replace(cfg, num_stages=2)
        return dkdv, cfg
    if not hopper and head_dim_pad <= 32 and not rel_pos:
        # up to D = 32 a mask alone takes the plain 32 x 64 tiles on 4 warps, uncapped (sm_80/89 bf16
        # D = 32, dK/dV / dQ issue ratio: float bias 1.38 / 1.09, bool 1.69 / 1.52 on sm_80, 2-5 CTAs/SM,
        # no spill): the 32 x 32 tiles on 8 warps below lay the dots' warps [8, 1] over 32 rows (every
        # MMA row twice) at this head dim and spilled 8-72 B in dK/dV
        plain = dataclasses.replace(cfg, max_registers=None)
        return plain, plain
    if not hopper:
        cfg = dataclasses.replace(cfg, block_n=cfg.block_m, num_warps=8, max_registers=None)
        # dK/dV capped at 128 registers up to D = 64 and with a key-padding mask: the row split took it
        # to 164-232 and one CTA/SM; capped, two without a spill (sm_80 D = 64 float bias 1.30 -> 1.02,
        # bool 1.54 -> 1.46, rel_pos by dots 1.33 -> 1.16; key padding at D = 128 0.65 -> 0.62). The
        # (rows, keys) tiles at D = 128 ran one CTA before the split and spill 8-24 B under the cap
        capped = head_dim_pad <= 64 or key_padding
        dkdv = dataclasses.replace(cfg, max_registers=128) if capped else cfg
        if rel_pos_mma and rel_pos_grad:
            # dQ: 64 rows on 4 warps (the chained score dots put 8 warps over 32 rows at [8, 1]), 16-key
            # steps (32-key steps put 8 B on the stack on sm_80)
            return dkdv, AttentionConfig(16, 64, 4, 2)
        return dkdv, cfg
    if rel_pos_mma:
        # dK/dV at D = 128 on two stages (one put 16 B on the stack), without the row split (with it
        # 144 B on the stack)
        wide = dataclasses.replace(_HOPPER_REL_MMA_BWD, num_stages=2, row_split=False)
        dkdv = wide if head_dim_pad > 64 else _HOPPER_REL_MMA_BWD_SMALL
        narrow = head_dim_pad <= 64 and rel_pos_bins <= REL_POS_MMA_MAX_PAD
        return dkdv, (_HOPPER_REL_MMA_DQ_SMALL if narrow else _HOPPER_REL_MMA_BWD) if rel_pos_grad else cfg
    if not rel_pos:
        if head_dim_pad > 64 and not causal:
            # D = 65..128: one warpgroup where it fits, two programs per SM (dK/dV on 64 kept keys
            # without the row split, dQ on 64 kept rows): key padding in both passes, bool or float
            # (dK/dV 228-231 registers, dQ 185-204), a (rows, keys) mask in dQ (bool 255, float on one
            # stage 190: two or three spill 8-16 B); the (rows, keys) dK/dV (either mask) spills 16-56 B
            # at one to three stages and keeps the 8-warp tiles, one program per SM. Not causal
            # launches (one warpgroup spills in the plain causal dK/dV)
            one_group = AttentionConfig(32, 64, 4, 2)
            dkdv = one_group if key_padding else dataclasses.replace(cfg, row_split=False)
            return dkdv, one_group if key_padding or bool_mask else dataclasses.replace(one_group, num_stages=1)
        # (rows, keys) mask tiles at D = 128 without the row split (with it 24-40 B on the stack); a
        # bool key-padding mask up to D = 64 without it too (178 registers, 2 CTAs/SM against 3; a
        # float one keeps it: 159 registers, 3 CTAs/SM, 1.04 -> 0.90)
        no_split = (head_dim_pad > 64 and not key_padding) or (head_dim_pad <= 64 and key_padding and bool_mask)
        return (dataclasses.replace(cfg, row_split=False) if no_split else cfg), cfg
    dkdv = _HOPPER_MASK_BWD_SMALL if head_dim_pad <= 64 else _HOPPER_MASK_BWD
    return dkdv, _HOPPER_MASK_BWD if rel_pos_grad else cfg


# Head dims 129..256 (padded to 256), 16-bit inputs; masks and rel_pos take no head dim above
# MAX_MASK_HEAD_DIM. Static report, Triton 3.8 (dense, causal and VARLEN; sm_80 / sm_89 / sm_90):
# forward off Hopper, 64 query rows on 8 warps over 32-key tiles, two stages (178-216 registers,
# 68 KiB of shared memory, within sm_89's 99 KB); 4 warps spill 32-288 B, 64-key tiles 32-264 B or
# overflow sm_89's shared memory. Hopper's forward: two warpgroups of wgmma over 128 query rows,
# 32-key tiles, one stage (249-255 registers, 80 KiB); two stages or 64 keys spill 8-80 B.
# Backward (``bwd_config``): 32 x 32 tiles on 8 warps (dK/dV 187-227, dQ 252-255 registers,
# 64 KiB), warp-level MMA everywhere; 64-row tiles spill in dQ (576-1448 B).
_FWD_256 = AttentionConfig(64, 32, 8, 2)
_FWD_256_HOPPER = AttentionConfig(128, 32, 8, 1)
_BWD_256 = AttentionConfig(32, 32, 8, 1, row_split=True)

# Hopper's backward tiles where the mask and rel_pos gathers leave fewer registers (above); up to
# D = 64 the dK/dV on one warpgroup over 64 kept keys (2 programs per SM; 32 x 128 on 8 warps ran one)
_HOPPER_MASK_BWD_SMALL = AttentionConfig(32, 64, 4, 2, row_split=True)
_HOPPER_MASK_BWD = AttentionConfig(32, 64, 8, 2, row_split=True)
# ... and with rel_pos by selection-matrix dots (dK/dV: 128 keys x 32 queries; dQ: 128 rows x 32 keys;
# up to D = 64 the dK/dV on one warpgroup over 64 kept keys)
_HOPPER_REL_MMA_BWD = AttentionConfig(32, 128, 8, 1, row_split=True)
_HOPPER_REL_MMA_BWD_SMALL = AttentionConfig(32, 64, 4, 1, row_split=True)
# ... and its dQ with the rel_pos gradients over up to 16 bins up to D = 64: 64 rows x 32 keys
_HOPPER_REL_MMA_DQ_SMALL = AttentionConfig(32, 64, 4, 1)


def dbias_config(
    dtype: torch.dtype, head_dim_pad: int, rel_pos: bool = False, arch: int = 0, rel_pos_mma: bool = False,
    tile_walk: bool = False,
) -> AttentionConfig:
    """Tiles of the dBias kernel (``block_m`` query rows x ``block_n`` key columns of the mask's
    own tiles), from the ahead-of-time report. Each program holds a q, dO, k and v tile and the
    fp32 accumulator: fp32 (IEEE dots on the FMA units) takes 16 x 16 tiles and 4 warps. 16-bit
    inputs: 64 x 32 tiles on 4 warps — one warpgroup, 16 rows per warp, so no MMA row is computed
    twice, and HGMMA on sm_90 (125-192 registers, no spills on sm_80/89/90). With rel_pos also
    gathered (two more tables per tile; int32 tile offsets, the column split once per program):
    Hopper up to D = 64 takes the same 64 x 32 tiles on 4 warps (255 registers, no spills; 8 warps
    over 32 x 32 computed every MMA row twice). Elsewhere, and at D = 128, those spill (sm_80/89
    D = 64: 24 B; sm_90 D = 128: 80 B), so 8 warps over 32 x 32 tiles (32 x 16 with D = 128), rows
    replicated (static report, Triton 3.8, 2026-12-04). No software pipelining of the nested loops
    (two stages spill 8-240 B).

    ``rel_pos_mma`` (rel_pos by selection-matrix dots, 16 bins; Triton 3.8, 2026-12-04; regs /
    spill / issue ratio): up to D = 64 the 64 x 32 tiles on 4 warps everywhere (sm_90 223 / 0 /
    3.78 against the gathers' 255 / 0 / 5.74; sm_80 254 / 0 / 1.86 and sm_89 245 / 0 / 0.92, where
    the gathers spilled 24 B); 64 x 64 spills 48-272 B. D = 128 keeps 32 x 16 on 8 warps (sm_90
    152 / 0 / 2.37 against 190 / 0 / 2.84): 64 x 32 and 64 x 16 on 4 warps and 128 x 16 / 128 x 32
    on 8 spill 8-64 B on sm_80 and sm_90.

    ``tile_walk`` (the kernel's TILE_WALK: no rows or columns summed, no rel_pos: a (1, H, N, M)
    or (1, 1, N, M) table, BEiT's and Swin's; one flat loop over the (batch, head) pairs, the bias
    tile loaded once): Hopper 16-bit up to D = 64 on 64 x 64 tiles (static, bf16, issue ratio /
    loop efficiency against the nested loops' 64 x 32: D = 64 1.94 / 0.52 from 3.27 / 0.31, D = 32
    3.45 / 0.29 from 6.02 / 0.17; 64 x 64 spills 32-88 B on sm_80/89 and at D = 128); fp32 on 4
    warps at every head dim (2 at D = 128 put 8 B on the stack on sm_90). Two stages would pipeline
    the walk's loads with cp.async (D = 64: 226 registers, 2 CTAs/SM, issue 2.04, loop efficiency
    0.49): the model, blind to load latency, rates them just below one stage; a GPU run should
    arbitrate. Triton 3.8, 2026-12-05; UNMEASURED on a GPU."""
    if INTERPRETER:
        return AttentionConfig(16, 16, 4, 1)
    if dtype == torch.float32:
        # D = 128 on 2 warps (4 put 8 B on the stack on sm_89 with a (B, 1, 1, M) bias, 8 warps 8-32 B
        # elsewhere), D <= 64 on 4 (2 put 16 B on the stack on sm_89)
        return AttentionConfig(16, 16, 2 if head_dim_pad > 64 and not tile_walk else 4, 1)
    if tile_walk and 90 <= arch < 100 and head_dim_pad <= 64:
        return AttentionConfig(64, 64, 4, 1)
    if not rel_pos or (head_dim_pad <= 64 and (rel_pos_mma or 90 <= arch < 100)):
        return AttentionConfig(64, 32, 4, 1)
    if head_dim_pad > 64:
        return AttentionConfig(32, 16, 8, 1)
    return AttentionConfig(32, 32, 8, 1)


def dbias_dq_config(arch: int, dtype: torch.dtype, head_dim_pad: int) -> AttentionConfig:
    """Tiles of the dBias kernel's flat walk with dQ (WITH_DQ, ``dbias_plan``): it runs where every
    key fits one column tile, so 16-bit tiles are 64 keys wide (Swin's 7 x 7 and 8 x 8 windows), with
    delta = rowsum(P dP) from the tile itself (no O read); the rows as the registers allow with a dQ
    tile more (static report, Triton 3.8, 2026-12-05, bf16; registers / loop issue ratio / loop
    efficiency, no spill, none under Triton 3.6 either): Hopper up to D = 64 the walk's 64 x 64 on
    one warpgroup (D = 32 220 / 2.64 / 0.38, D = 64 255 / 1.53 / 0.65, over its two score dots and
    the dS K one; the walk without dQ rates 0.29 and 0.52 over two), above D = 64 32 x 64 on 4
    warps (warp-level MMA, 255 / 2.06 / 0.49; 64 x 64 and 64 x 32 spilled 128-584 B). sm_80 / sm_89:
    D = 32 16 x 64 on 2 warps (192 / 2.17 / 0.46 and 168 / 1.12 / 0.90; 32 x 64 and 64 x 64 spilled
    8-64 B), D = 64 32 x 64 on 4 (216 / 1.35 / 0.74, 200 / 0.70 / 1.0), D = 128 16 x 64 on 4 (255 /
    1.39 / 0.72, 255 / 0.70 / 1.0; 32 x 64 spilled 16-32 B). fp32 on the walk's 16 x 16 tiles, on 2
    warps up to D = 32 (4 put 8 B on the stack on sm_90). UNMEASURED on a GPU. In the interpreter,
    the walk's tiles."""
    walk = dbias_config(dtype, head_dim_pad, arch=arch, tile_walk=True)
    if INTERPRETER:
        return walk
    if dtype == torch.float32:
        # up to D = 32 on 2 warps (4 put 8 B on the stack on sm_90)
        return dataclasses.replace(walk, num_warps=2) if head_dim_pad <= 32 else walk
    if 90 <= arch < 100:
        return walk if head_dim_pad <= 64 else AttentionConfig(32, 64, 4, 1)  # the walk's own 64 x 64 up to D = 64
    if head_dim_pad <= 32:
        return AttentionConfig(16, 64, 2, 1)
    return AttentionConfig(32, 64, 4, 1) if head_dim_pad <= 64 else AttentionConfig(16, 64, 4, 1)


# Under the interpreter: 16 x 16 tiles, so that sequences up to 16 queries and 16 keys take the short
# backward and longer test sequences still cross the passes' blocks
_INTERPRETER_SHORT = AttentionConfig(16, 16, 4, 1)


def short_bwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int, masked: bool = False, varlen: bool = False
                     ) -> AttentionConfig | None:  # fmt: skip
    """Tiles of the one-launch backward of short sequences (``flash_attention_bwd_short_kernel``:
    every query in one row tile, every key in one column tile), or None where none fits;
    ``masked``: with an attn_mask (bool, or float without a gradient); ``varlen``: packed sequences.

    16-bit: 64 x 64 on one warpgroup (Swin's 7 x 7 and 8 x 8 windows, Hiera's 64-token mask units),
    the head dim in two halves above 64 (SPLIT_D). Such a window is memory-bound: per (window, head)
    at D = 32 the five dots are ~1.3 MFLOP (padded tiles) against ~22 KB moved (q, k, v, dO in; dQ,
    dK, dV out), ~60 FLOP/B, well below an H100's ~295; the two passes move ~38 KB (each reads q, k,
    v, dO, the dQ pass O too). So Hopper without a mask up to D = 64 takes two stages: the next
    pair's loads in flight by cp.async during this pair's dots.
    Static report, 2026-12-05, bf16, registers / CTAs per SM / loop efficiency over the five dots,
    Triton 3.8 (3.6 where it differs), no spill: Hopper D = 16 146 / 3 / 0.28 (HGMMA N = 16), D = 32
    167 / 3 / 0.48 (187 / 2 / 0.50), D = 64 255 / 2 / 0.79 (214 / 2 / 0.80); the halves, one stage:
    D = 80 232 / 2 / 1.0, D = 128 222 / 2 / 1.0; a bool mask, one stage: D = 32 184 / 2 / 0.33 (254 /
    2 / 0.24), D = 64 255 / 2 / 0.55 (0.42). sm_80 / sm_89 one stage: D = 32 240 / 2 / 0.88 and 222
    / 2 / 1.0, D = 64 255 / 2 / 1.0; with a mask up to D = 32 (0.50 and 0.94; sm_89 puts 16 B on
    the stack under 3.6). A float mask (a frozen table) at D = 32: sm_90 233 / 2 / 0.36 (8 B on the
    stack under 3.6), sm_80 255 / 2 / 0.64, sm_89 249 / 2 / 1.0. None where they spill: a mask at
    D = 64 off Hopper (32-240 B) and above D = 64 on Hopper (halves: 96-144 B); off Hopper above
    D = 64 (halves: 104-312 B). What made the
    halves fit: dV = P^T dO stored before dP is formed (after it they spilled 32 B on Hopper under
    3.6; at D <= 64 the mask's tiles spill 24 B that way, so those keep dV after dS); whole 128-wide
    tiles spilled 40 B on one stage and ran one program per SM on two (0.54). fp32: 64 x 64 on 8
    warps up to D = 32 (116-128 registers, 158-206 with a mask), 32 x 32 on 4 at D = 64 and 128
    (122-142 and 222-251, halves; with a mask 148-168 and 248-255; 64 x 64 spilled 248 B-8.7 KB at
    D = 64). Packed sequences (VARLEN: lengths and starts per step) take the same tiles: bf16 sm_90
    D = 64 181 / 2 / 0.76, D = 128 218 / 2 / 1.0, sm_80 / sm_89 D = 64 255 / 2 / 1.0; fp32 to D = 64
    (94-128 registers; at D = 128 24 B spilled on sm_90: none).
    UNMEASURED on a GPU: ``benchmarks/gpu_checks/attention_masked.py`` times it against the passes.
    In the interpreter, ``_INTERPRETER_SHORT`` wherever Hopper takes short tiles, None where it does
    not (so the CPU tests see the fallback to the passes too)."""
    if INTERPRETER:
        return _INTERPRETER_SHORT if _hardware_short_bwd_config(90, dtype, head_dim_pad, masked, varlen) else None
    return _hardware_short_bwd_config(arch, dtype, head_dim_pad, masked, varlen)


def _hardware_short_bwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int, masked: bool, varlen: bool
                               ) -> AttentionConfig | None:  # fmt: skip
    """``short_bwd_config`` on a GPU of ``arch``."""
    if dtype == torch.float32:
        # D = 128 on 8 warps: on 4, 255 registers, and with delta divided by rowsum(P) (_tile_delta) 24-32 B
        # on the stack (sm_90 under Triton 3.8, sm_89 under 3.6); on 8, 142-255 and none (3.8 and 3.6)
        return {32: AttentionConfig(64, 64, 8, 1), 64: AttentionConfig(32, 32, 4, 1),
                128: None if varlen else AttentionConfig(32, 32, 8, 1)}.get(max(head_dim_pad, 32))  # fmt: skip
    if 90 <= arch < 100:
        if head_dim_pad <= 64:
            return AttentionConfig(64, 64, 4, 1 if masked else 2)
        return None if masked or head_dim_pad > 128 else AttentionConfig(64, 64, 4, 1)
    return None if head_dim_pad > (32 if masked else 64) else AttentionConfig(64, 64, 4, 1)


_FP32_CONFIGS = {
    16: AttentionConfig(64, 32, 4, 2),
    32: AttentionConfig(32, 32, 4, 2),
    64: AttentionConfig(32, 16, 4, 2),
    128: AttentionConfig(16, 16, 4, 1),
    # two stages: with one, the VARLEN forward spills 8-24 B on sm_80 (8 warps: 8 B, the plain one)
    256: AttentionConfig(16, 16, 4, 2),
}
_FP32_CONFIGS_BWD = {
    16: AttentionConfig(16, 32, 4, 1),
    32: AttentionConfig(16, 32, 4, 1),
    64: AttentionConfig(16, 16, 4, 1),
    128: AttentionConfig(16, 16, 4, 1),
    # 16 warps (60-86 registers): the causal dK/dV pass spills 8-200 B on 4 warps, 8 B on 8 (sm_80)
    256: AttentionConfig(16, 16, 16, 1),
}


# ---------------------------------------------------------------------------------------------
# Launchers (inputs already validated by fastvit.ops.flash_attention)
# ---------------------------------------------------------------------------------------------


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    """Strides of a 4-D view with 0 in its size-1 (broadcast) dims; zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride(), strict=True))


def key_padding(bias: torch.Tensor | None) -> bool:
    """Whether an attn_mask is one row of keys for every query: (B|1, H|1, 1, M), or expanded over
    the queries with stride 0 (a key-padding mask; the kernels' BIAS_ROWS_BCAST)."""
    return bias is not None and _strides4(bias)[2] == 0


# _bias_args of a launch with neither an attn_mask nor rel_pos (the common case, on every call);
# its flags are read-only, as they are shared between calls
_NO_MASK_FLAGS = types.MappingProxyType(
    {"HAS_BIAS": False, "BIAS_BOOL": False, "HAS_REL_POS": False, "BIAS_ROWS_BCAST": False}
)
_NO_MASK_ARGS = ((None, None, None), (0,) * 12, 1, _NO_MASK_FLAGS)


def _bias_args(bias, rel_h, rel_w):
    """(kernel pointer args, stride args, KW, flags) for the optional attn_mask and rel_pos; the
    flags a mapping to read or merge into a new dict."""
    if bias is None and rel_h is None:
        return _NO_MASK_ARGS
    if bias is not None:
        if abs(bias.stride(-1)) * bias.shape[-1] >= 2**31:  # column offsets are int32
            bias = bias.contiguous()
        bias_arg = bias.view(torch.uint8) if bias.dtype == torch.bool else bias
    else:
        bias_arg = None
    kw = 1 if rel_w is None else rel_w.shape[-1]
    strides = (*_strides4(bias), *_strides4(rel_h), *_strides4(rel_w))
    flags = {
        "HAS_BIAS": bias is not None,
        "BIAS_BOOL": bias is not None and bias.dtype == torch.bool,
        "HAS_REL_POS": rel_h is not None,
        "BIAS_ROWS_BCAST": key_padding(bias),
    }
    return (bias_arg, rel_h, rel_w), strides, kw, flags


def out_strides(shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The forward output's strides for a (B, H, N, D) shape: laid out as (B, N, H, D) in memory, so that
    ``out.transpose(1, 2).reshape(B, N, H * D)`` is free; allocated that way (``empty_strided``), out is
    a tensor of its own, not a view, and may be edited in place like SDPA's."""
    _, heads, n_q, head_dim = shape
    return (n_q * heads * head_dim, head_dim, heads * head_dim, 1)


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    *,
    bias: torch.Tensor | None = None,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: (B, H, N, D); k, v: (B, H, M, D); one dtype, unit stride in D.
        scale: softmax scale (> 0).
        causal: top-left aligned causal mask.
        bias: 4-D attn_mask broadcastable to (B, H, N, M), bool (True = attend) or float (added),
            any strides; read in place (size-1 dims get stride 0), never expanded.
        rel_h, rel_w: (B|1, H|1, N, kh), (B|1, H|1, N, kw) with M == kh * kw, any float dtype.

    Returns:
        out (B, H, N, D) in q's dtype, laid out as (B, N, H, D) in memory so that
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is free; lse (B, H, N) in ``lse_dtype``
        (float32; float64 for fp32 inputs), -inf on fully masked rows, whose out is 0.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    q, k, v = (rows_addressable_in_int32(t) for t in (q, k, v))
    out = new_output((batch, heads, n_q, head_dim), dtype=q.dtype, device=q.device, strides=out_strides(q.shape))
    lse = new_output((batch, heads, n_q), dtype=lse_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    pad = head_dim_padded(head_dim)
    masked = bias is not None or rel_h is not None
    bias, rel_h, rel_w = (_tiles_in_int32(t) for t in (bias, rel_h, rel_w))
    arch = arch_of(q.device)
    # the descriptors' strides, computed once: None where TMA is off or a tensor does not qualify
    strides = tma_strides(q, k, v, out) if tma_capable(arch, q.dtype, pad) else None
    tma = strides is not None
    rel_mma = rel_pos_mma_flags(rel_h, rel_w) if rel_pos_by_mma(arch, q.dtype, pad, rel_h, rel_w, forward=True) else {}
    pointers, bias_strides, kw, flags = _bias_args(bias, rel_h, rel_w)
    float_bias = flags["HAS_BIAS"] and not flags["BIAS_BOOL"]
    if masked:
        bins = max(rel_mma["KH_PAD"], rel_mma["KW_PAD"]) if rel_mma else 0
        cfg = fwd_mask_config(arch, q.dtype, pad, tma, float_bias, rel_pos_mma_bins=bins,
                              rel_pos_gathers=rel_h is not None and not rel_mma,
                              key_padding=flags["BIAS_ROWS_BCAST"])
    else:
        cfg = fwd_config(arch, q.dtype, pad, tma=tma, causal=causal)
    if takes_short_tiles(cfg, n_q, pad, rel_h is not None):
        cfg = short_query_config(cfg, arch, float_bias=float_bias)
    grid = (cdiv(n_q, cfg.block_m) * batch * heads,)
    flags = {**flags, **rel_mma}
    qkvo: tuple = (q, k, v, out)
    if cfg.tma:
        qkvo, tails = fwd_tma_descriptors(q, k, v, out, cfg, pad, strides)
        flags = {**flags, **tails, "USE_TMA": True}
    with device_guard(q):
        flash_attention_fwd_kernel[grid](
            *qkvo, lse, *pointers,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            *bias_strides,
            heads, n_q, n_k, kw, scale,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), **flags, BLOCK_TAIL=cfg.key_tail,
            LAZY_RESCALE=lazy_rescale(cfg, pad, q.dtype), **cfg.launch_options(),
        )
    return out, lse


# Under the interpreter the TMA path runs only when a test asks for it (the default follows sm_80/89's)
INTERPRETER_TMA = False


def tma_enabled() -> bool:
    """Whether the forward's tensor-descriptor tiles are asked for: ``FASTVIT_TMA=1`` in the
    environment. Off by default: on an H200 (bf16, 2026-12-04, ``benchmarks/gpu_checks/
    attention_quick.py``) they were slower than the pointer tiles at D = 64 (B=2, H=12, N=4097:
    0.445 vs 0.246 ms) and no faster at D = 128 (0.652 vs 0.664 ms), and their six descriptors
    add host time to every launch."""
    return os.environ.get("FASTVIT_TMA", "0") == "1"


def tma_supported(arch: int, dtype: torch.dtype, head_dim_pad: int) -> bool:
    """Whether the forward has TMA tiles for (architecture, dtype, padded head dim): Hopper,
    fp16/bf16, head dims up to 128 (the static report compiles them whether or not they are on)."""
    return 90 <= arch < 100 and dtype in (torch.float16, torch.bfloat16) and head_dim_pad <= 128


def tma_capable(arch: int, dtype: torch.dtype, head_dim_pad: int) -> bool:
    """Whether the forward takes TMA tiles for (architecture, dtype, padded head dim): where
    ``tma_supported`` and ``tma_enabled()`` (the interpreter: when ``INTERPRETER_TMA``).
    Otherwise every launch takes the pointer tiles."""
    if INTERPRETER:
        return INTERPRETER_TMA
    return tma_supported(arch, dtype, head_dim_pad) and tma_enabled()  # the environment read last


def _tma_strides(t: torch.Tensor) -> list[int] | None:
    """``t``'s strides as a tensor descriptor takes them (16-byte multiples, unit last), with the
    stride of each size-1 dim replaced by a dense one (never used for addressing); None where ``t``
    does not qualify: an empty dim, a base not 16-byte aligned, a broadcast (stride-0) dim, or a
    stride that is not a multiple of 16 bytes."""
    shape, stride = t.shape, t.stride()
    if stride[-1] != 1 or t.data_ptr() % 16 or 0 in shape:
        return None
    elements = 16 // t.element_size()  # a stride must be a multiple of this many elements
    strides, extent = [1], shape[-1]  # extent: elements spanned by the dims inside the current one
    for i in range(len(shape) - 2, -1, -1):
        st = extent if shape[i] == 1 else stride[i]
        if st <= 0 or st % elements:
            return None
        strides.append(st)
        extent = max(extent, st * shape[i])
    return strides[::-1]


def tma_strides(*tensors: torch.Tensor) -> list[list[int]] | None:
    """Each tensor's descriptor strides (``_tma_strides``), or None where any one cannot be read or
    written through a tensor descriptor."""
    strides = [_tma_strides(t) for t in tensors]
    return None if None in strides else strides


# TensorDescriptor's fields with defaults (padding, ...), whatever the Triton version defines
_DESCRIPTOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TensorDescriptor)
                        if f.default is not dataclasses.MISSING}  # fmt: skip


def _descriptor(t: torch.Tensor, strides: list[int], block: list[int]) -> TensorDescriptor:
    """A TensorDescriptor of ``t`` without the constructor's checks, which ``_tma_strides`` already
    made (16-byte base and strides, unit last stride, positive sizes) and the power-of-two boxes
    satisfy: the checks cost more host time than the launch's own descriptor encoding."""
    desc = TensorDescriptor.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=list(t.shape), strides=strides, block_shape=block)
    return desc


def fwd_tma_descriptors(q, k, v, out, cfg: AttentionConfig, pad: int,
                        strides: list | None = None) -> tuple[tuple, dict]:  # fmt: skip
    """The (B, H, rows, D) tensor descriptors of q, k, v and out with the boxes of ``cfg``'s tiles
    (zero-filled past the rows and past D), and the kernel's KTail / VTail (BLOCK_TAIL-key boxes).
    Only for tensors ``tma_strides`` accepts; ``strides``: what it returned for them, if known."""
    q_strides, k_strides, v_strides, o_strides = strides or tma_strides(q, k, v, out)
    qkvo = (_descriptor(q, q_strides, [1, 1, cfg.block_m, pad]),
            _descriptor(k, k_strides, [1, 1, cfg.block_n, pad]),
            _descriptor(v, v_strides, [1, 1, cfg.block_n, pad]),
            _descriptor(out, o_strides, [1, 1, cfg.block_m, pad]))  # fmt: skip
    tails = {}
    if cfg.key_tail:
        tails = {"KTail": _descriptor(k, k_strides, [1, 1, cfg.key_tail, pad]),
                 "VTail": _descriptor(v, v_strides, [1, 1, cfg.key_tail, pad])}  # fmt: skip
    return qkvo, tails


def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
    *,
    bias: torch.Tensor | None = None,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
    bias_grad: bool = False,
    rel_pos_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward passes: dQ (+ delta and the rel_pos partials), dK/dV, and dBias if asked;
    where the dBias kernel's tiles hold every key (``dbias_plan``), it computes delta and dQ as well,
    and runs first in place of the dQ pass; where they hold every query too, dK and dV as well, in
    place of the dK/dV pass. Where one tile holds every query and key, with no rel_pos and no mask
    gradient (``short_backward_config``: windows), the short backward's one launch instead.

    Args:
        grad_out: (B, H, N, D) gradient of ``out``, any strides (stride 0 from ``out.sum()`` is fine).
        q, k, v, out, lse: the forward's inputs and outputs.
        bias, rel_h, rel_w: the forward's attn_mask (4-D) and rel_pos tables, or None.
        bias_grad: compute the gradient of the (float) ``bias``.
        rel_pos_grad: compute the gradients of ``rel_h`` and ``rel_w``.

    Returns:
        dq (B, H, N, D), dk, dv (B, H, M, D) in the inputs' dtype; then dbias (bias's shape and
        dtype) or None, drel_h, drel_w (their tables' shapes and dtypes) or None. dBias comes from
        its own kernel (one program per tile of the mask's own shape, summing its broadcast dims
        in a fixed order); the rel_pos gradients from the dQ pass as per-(batch, head) fp32
        partials, summed over their broadcast dims here. Both are deterministic.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    q, k, v, grad_out = (rows_addressable_in_int32(t) for t in (q, k, v, grad_out))
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    bias_grad = bias_grad and bias is not None
    rel_pos_grad = rel_pos_grad and rel_h is not None
    if n_q == 0:  # no query sees any key: all gradients are zero
        zeros = [torch.zeros_like(t) if wanted else None for t, wanted in
                 ((bias, bias_grad), (rel_h, rel_pos_grad), (rel_w, rel_pos_grad))]
        return dq, dk.zero_(), dv.zero_(), *zeros
    lse, grad_out = backward_lse(lse, grad_out)  # fp32 inputs: dO's rows carry lse's rounding
    pad = head_dim_padded(head_dim)
    bias, rel_h, rel_w = (_tiles_in_int32(t) for t in (bias, rel_h, rel_w))
    arch = arch_of(q.device)
    pointers, bias_strides, kw, flags = _bias_args(bias, rel_h, rel_w)
    short = None if bias_grad or rel_h is not None else short_backward_config(arch, q.dtype, pad, n_q, n_k,
                                                                               masked=bias is not None)
    if short is not None:  # every query and key in one tile: the whole backward in one launch
        with device_guard(q):
            _short_backward(q, k, v, grad_out, lse, (dq, dk, dv), scale, causal, short, bias=pointers[0],
                            bias_strides=bias_strides[:4], bias_bool=flags["BIAS_BOOL"])  # fmt: skip
        return dq, dk, dv, None, None, None
    rel_mma = rel_pos_by_mma(arch, q.dtype, pad, rel_h, rel_w)  # (the passes' rel_pos tiles)
    if bias is not None or rel_h is not None:
        bins = 0 if rel_h is None else max(rel_pos_padded(rel_h.shape[-1]), rel_pos_padded(rel_w.shape[-1]))
        cfg, dq_cfg = bwd_mask_configs(arch, q.dtype, pad, rel_pos_grad, rel_mma, rel_pos=rel_h is not None,
                                       key_padding=flags["BIAS_ROWS_BCAST"], bool_mask=flags["BIAS_BOOL"],
                                       causal=causal, rel_pos_bins=bins)
    else:
        cfg, dq_cfg = bwd_config(arch, q.dtype, pad, causal), bwd_dq_config(arch, q.dtype, pad)
    delta = new_output((batch * heads, n_q), dtype=torch.float32, device=q.device)
    precision = dot_precision(q.dtype)
    kh = 1 if rel_h is None else rel_h.shape[-1]
    mma_flags = rel_pos_mma_flags(rel_h, rel_w) if rel_mma else {}
    if rel_pos_grad:
        drel_parts = [new_output((batch * heads, n_q, n), dtype=torch.float32, device=q.device) for n in (kh, kw)]
    else:
        drel_parts = [None, None]
    with device_guard(q):
        rel_flags = dict(mma_flags)
        if rel_pos_grad:
            rel_flags.update(REL_POS_GRAD=True, KH_PAD=rel_pos_padded(kh), KW_PAD=rel_pos_padded(kw))
        dbias_flags = {**flags, **_dbias_rel_pos_flags(mma_flags)}
        # a dBias walk whose tiles hold every key computes delta and dQ too (no dQ pass), and where
        # they hold every query as well dK and dV (no dK/dV pass): dbias_plan
        plan = dbias_plan(q, n_k, bias, dbias_flags) if bias_grad else None
        dbias = None
        # dQ (or that dBias walk) first: it writes delta, which dK/dV (and dBias) read after it in stream order
        if plan and plan.with_dq:
            dbias = _bias_backward(q, k, v, grad_out, lse, delta, pointers, bias, bias_strides, kw, scale, causal,
                                   dbias_flags, plan, dq=dq, dk=dk, dv=dv)  # fmt: skip
        else:
            flash_attention_bwd_dq_kernel[(cdiv(n_q, dq_cfg.block_n) * batch * heads,)](
                q, k, v, grad_out, out, lse, delta, dq, *pointers, *drel_parts,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride(),
                *out.stride()[:3], *dq.stride()[:3],
                *bias_strides,
                heads, n_q, n_k, kh, kw, scale,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=dq_cfg.block_n, BLOCK_N=dq_cfg.block_m,
                CAUSAL=causal, DOT_PRECISION=precision, **flags, **rel_flags,
                SYNC_KV=dq_syncs_kv(arch, q.dtype, pad), **dq_cfg.launch_options(),
            )
        if not (plan and plan.with_dkdv):
            flash_attention_bwd_dkdv_kernel[(cdiv(n_k, cfg.block_n) * batch * heads,)](
                q, k, v, grad_out, lse, delta, dk, dv, *pointers,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride(),
                *dk.stride()[:3], *dv.stride()[:3],
                *bias_strides,
                heads, n_q, n_k, kw, scale,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                CAUSAL=causal, DOT_PRECISION=precision, **flags, **mma_flags, SPLIT_ROWS=cfg.row_split,
                **cfg.launch_options(),
            )
        if plan and not plan.with_dq:
            dbias = _bias_backward(q, k, v, grad_out, lse, delta, pointers, bias, bias_strides, kw, scale, causal,
                                   dbias_flags, plan)  # fmt: skip
    drel = [None, None]
    if rel_pos_grad:
        for i, (table, part) in enumerate(zip((rel_h, rel_w), drel_parts, strict=True)):
            part = part.view(batch, heads, n_q, -1)
            # fixed-order sum of the per-(batch, head) partials over the table's broadcast dims
            dims = [d for d in (0, 1) if table.shape[d] == 1 and part.shape[d] != 1]
            drel[i] = (part.sum(dim=dims, keepdim=True) if dims else part).to(table.dtype)
    return dq, dk, dv, dbias, *drel


def _tiles_in_int32(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself (an attn_mask or rel_pos table), unless an offset inside one of the kernels'
    tiles of it could overflow int32. The forward and backward kernels address these tables from a 64-bit base
    per (batch, head, block) plus int32 offsets ``row * stride(-2) + col * stride(-1)`` with
    row < 256 (a block of rows) and col < max(256, size(-1)) (a block of keys, or a rel_pos bin):
    exact while ``256 * |stride(-2)| + max(256, size(-1)) * |stride(-1)| < 2**31``. Other views
    are copied once to the contiguous layout."""
    if t is None or abs(t.stride(-2)) * 256 + abs(t.stride(-1)) * max(256, t.shape[-1]) < 2**31:
        return t
    return t.contiguous()


# rel_pos grids whose kh and kw pad to at most this many bins (ViTDet's and SAM's 14 x 14 windows) take the
# backward's selection-matrix dots (REL_POS_MMA) in every backward kernel
REL_POS_MMA_MAX_PAD = 16
# ... and up to this many the forward's, which holds its rows of the tables for the whole key loop: SAM's
# 64 x 64 global attention too (static report, Triton 3.8, 2026-12-04, bf16 64 bins: no spill on
# sm_80/89/90 at D = 64 and 128; sm_90 hot-loop issue ratio 0.92 at D = 64 and 0.70 at D = 128, against
# 3.99 and 4.00 by gathers), and Hopper's dK/dV and dQ up to D = 64 (same report, with a float bias:
# dK/dV 238 registers, issue ratio 1.20 against the gathers' 2.91; dQ with the rel_pos gradients 255, 1.03
# against 2.48; no spill; the dBias kernel spills 128 B there and keeps the gathers, as do sm_80/89's dQ,
# which spill 160-288 B)
REL_POS_FWD_MMA_MAX_PAD = 64


def rel_pos_by_mma(
    arch: int, dtype: torch.dtype, head_dim_pad: int, rel_h: torch.Tensor | None, rel_w: torch.Tensor | None,
    forward: bool = False,
) -> bool:
    """Whether the backward kernels (dK/dV, dQ, dBias), or with ``forward`` the forward kernel, add
    rel_pos with tensor-core dots against one-hot selection matrices (REL_POS_MMA) instead of
    per-element gathers: 16-bit inputs with both tables in q's dtype (each product sums one
    non-zero term in fp32: exact). The backward: kh and kw padded to at most
    ``REL_POS_MMA_MAX_PAD``, and off Hopper head dims up to 64; on Hopper up to D = 64, up to
    ``REL_POS_FWD_MMA_MAX_PAD`` bins (dK/dV and dQ only: the dBias kernel gathers past
    ``REL_POS_MMA_MAX_PAD``, ``_dbias_rel_pos_flags``). The forward: kh and kw padded to at most
    ``REL_POS_FWD_MMA_MAX_PAD``, every architecture and head dim (``fwd_mask_config``).

    Static report (Triton 3.8, 2026-12-04), the dots accumulated onto the scores: with 64 bins
    (SAM's global 64 x 64 grid) sm_90 dQ spills at D = 128 (192 B on its 64 x 32 tiles, 400 B on
    128 x 32) and dK/dV's 32 x 128 tiles spill 136 B at D = 128; off Hopper, dQ at D = 128 spills
    72 B (sm_80) / 32 B (sm_89) even with 16 bins on its 32 x 32 tiles (24 B with one stage)."""
    if rel_h is None or dtype not in (torch.float16, torch.bfloat16):
        return False
    if rel_h.dtype != dtype or rel_w.dtype != dtype:
        return False
    bins = max(rel_pos_padded(rel_h.shape[-1]), rel_pos_padded(rel_w.shape[-1]))
    if forward:
        return bins <= REL_POS_FWD_MMA_MAX_PAD
    if bins <= REL_POS_MMA_MAX_PAD:
        return 90 <= arch < 100 or head_dim_pad <= 64
    return bins <= REL_POS_FWD_MMA_MAX_PAD and 90 <= arch < 100 and head_dim_pad <= 64


def _dbias_rel_pos_flags(mma_flags: dict) -> dict:
    """The dBias kernel's share of the backward's selection-matrix dots: up to ``REL_POS_MMA_MAX_PAD``
    bins (wider tables spill there, so it gathers them)."""
    if mma_flags and max(mma_flags["KH_PAD"], mma_flags["KW_PAD"]) <= REL_POS_MMA_MAX_PAD:
        return mma_flags
    return {}


def rel_pos_mma_flags(rel_h: torch.Tensor, rel_w: torch.Tensor) -> dict:
    """The kernels' constexprs for rel_pos by selection-matrix dots: REL_POS_MMA and the padded widths."""
    return {"REL_POS_MMA": True, "KH_PAD": rel_pos_padded(rel_h.shape[-1]), "KW_PAD": rel_pos_padded(rel_w.shape[-1])}


def rel_pos_padded(n: int) -> int:
    """The power of two >= 16 that a rel_pos table width (kh, kw) is padded to in registers."""
    return max(16, next_power_of_2(n))


# the dBias walk takes dQ (and dK, dV) where its tiles hold every key (and query); False: the dQ and
# dK/dV passes always run (the GPU check benchmarks/gpu_checks/attention_masked.py times both)
DBIAS_WITH_DQ = True


class DbiasPlan(NamedTuple):
    """How the dBias kernel runs in one backward (``dbias_plan``)."""

    config: AttentionConfig
    tile_walk: bool  # TILE_WALK: one flat (batch, head) loop per tile of the table
    with_dq: bool  # WITH_DQ: its tile holds every key; it writes delta and dQ, no dQ pass runs
    with_dkdv: bool  # WITH_DKDV: and every query; it writes dK and dV too, no dK/dV pass runs


def dbias_takes_dkdv(arch: int, dtype: torch.dtype, head_dim_pad: int) -> bool:
    """Whether the walk with dQ also takes dK and dV where its tile holds every query as well: the
    whole backward of a window in one tile, P and dS formed once for the five dots (WITH_DKDV).
    Hopper, 16-bit, up to D = 32 (Swin's): 250 registers, no spill, issue ratio 1.94, loop
    efficiency 0.51 over the five dots (static report, Triton 3.8, 2026-12-05, bf16; Triton 3.6: 246,
    0.53), against 0.38 for the walk with dQ alone (three dots) plus the dK/dV pass (0.37, four); at
    D = 64 it spills 128 B (one warpgroup) or computes every MMA row twice (two), and off Hopper its
    64 x 64 tiles spill 8-576 B. In the interpreter, wherever the tile holds the window. UNMEASURED
    on a GPU."""
    if INTERPRETER:
        return True
    return 90 <= arch < 100 and dtype != torch.float32 and head_dim_pad <= 32


def dbias_plan(q: torch.Tensor, n_k: int, bias: torch.Tensor, flags: dict) -> DbiasPlan:
    """The dBias kernel's plan for a float ``bias`` with ``flags`` (``_bias_args``' and the rel_pos
    ones): the flat walk where no rows or columns are summed and there is no rel_pos (a (1, H, N, M)
    or (1, 1, N, M) table, or one per batch); with it dQ where one column tile of
    ``dbias_dq_config`` holds every key (Swin's windows up to 8 x 8), and dK, dV where one row tile
    holds every query too (``dbias_takes_dkdv``)."""
    n_q, head_dim = q.shape[2:]
    pad = head_dim_padded(head_dim)
    arch = arch_of(q.device)
    tile_walk = bias.shape[-2] != 1 and bias.shape[-1] != 1 and not flags["HAS_REL_POS"]
    if tile_walk and DBIAS_WITH_DQ:
        cfg = dbias_dq_config(arch, q.dtype, pad)
        if n_k <= cfg.block_n:
            whole = n_q <= cfg.block_m and dbias_takes_dkdv(arch, q.dtype, pad)
            return DbiasPlan(cfg, True, True, whole)
    cfg = dbias_config(q.dtype, pad, rel_pos=flags["HAS_REL_POS"], arch=arch,
                       rel_pos_mma=flags.get("REL_POS_MMA", False), tile_walk=tile_walk)
    return DbiasPlan(cfg, tile_walk, False, False)


def _bias_backward(q, k, v, grad_out, lse, delta, pointers, bias, bias_strides, kw, scale, causal, flags,
                   plan: DbiasPlan, dq=None, dk=None, dv=None):  # fmt: skip
    """dBias in the mask's own shape and dtype (fp32 accumulation, deterministic); with ``plan``'s
    WITH_DQ also delta and ``dq`` (launched before dK/dV), with WITH_DKDV ``dk`` and ``dv`` too."""
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    bias_b, bias_h, bias_n, bias_m = bias.shape
    rows_bcast, cols_bcast = bias_n == 1, bias_m == 1
    pad = head_dim_padded(head_dim)
    cfg = plan.config
    tiles = (1 if rows_bcast else cdiv(n_q, cfg.block_m)) * (1 if cols_bcast else cdiv(n_k, cfg.block_n))
    b_loop = batch if bias_b == 1 else 1
    # rel_pos by gathers keeps one chunk: the chunk bounds' registers spilled 24-32 B there (sm_80
    # fp32 D = 128, sm_90 bf16 D = 64; Triton 3.8)
    gathers = flags["HAS_REL_POS"] and not flags.get("REL_POS_MMA", False)
    chunk = b_loop if gathers else dbias_batch_chunk(b_loop, bias_b * bias_h * tiles, sm_count(q.device))
    chunks = max(1, cdiv(b_loop, chunk))  # one (zero-filled) chunk for an empty batch
    parts = new_output((chunks, *bias.shape), dtype=torch.float32, device=q.device)
    flash_attention_bwd_dbias_kernel[(chunks * bias_b * bias_h * tiles,)](
        q, k, v, grad_out, lse, delta, *(t if wanted else None for t, wanted in
                                         ((dq, plan.with_dq), (dk, plan.with_dkdv), (dv, plan.with_dkdv))),
        *pointers, parts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *grad_out.stride(),
        *bias_strides,
        heads, n_q, n_k, kw, bias_h, bias_b * bias_h,
        b_loop, heads if bias_h == 1 else 1, chunk, scale,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype),
        ROWS_BCAST=rows_bcast, COLS_BCAST=cols_bcast, HAS_REL_POS=flags["HAS_REL_POS"], SPLIT_BATCHES=chunks > 1,
        TILE_WALK=plan.tile_walk, WITH_DQ=plan.with_dq, WITH_DKDV=plan.with_dkdv,
        **{n: flags[n] for n in ("REL_POS_MMA", "KH_PAD", "KW_PAD") if n in flags},
        **cfg.launch_options(),
    )
    dbias = parts[0] if chunks == 1 else parts.sum(0)  # fixed-order reduction of the chunks' partials
    return dbias.to(bias.dtype)


SHORT_BACKWARD = True
# above this (padded) head dim the short backward takes the head dim in two halves (its SPLIT_D)
SHORT_SPLIT_D = 64
# the short backward's programs per SM, each walking a contiguous run of (batch, head) pairs: 12 is
# a whole number of waves at 1, 2, 3, 4 or 6 resident programs per SM (its tiles run 1-4), so no
# partial last wave leaves SMs idle for a whole program's run (at 4 per SM, 3 resident: 1.33 waves)
SHORT_PROGRAMS_PER_SM = 12


def short_backward_config(arch: int, dtype: torch.dtype, head_dim_pad: int, n_q: int, n_k: int, masked: bool,
                          varlen: bool = False) -> AttentionConfig | None:  # fmt: skip
    """``short_bwd_config``'s tiles where they hold all ``n_q`` queries and ``n_k`` (>= 1) keys (the
    longest packed sequences with ``varlen``), and ``SHORT_BACKWARD`` is on; else None: the backward
    then runs the dQ and dK/dV passes."""
    cfg = short_bwd_config(arch, dtype, head_dim_pad, masked, varlen) if SHORT_BACKWARD and n_k > 0 else None
    return cfg if cfg is not None and n_q <= cfg.block_m and n_k <= cfg.block_n else None


def _short_backward(q, k, v, grad_out, lse, grads, scale: float, causal: bool, cfg: AttentionConfig, *,
                    bias=None, bias_strides=(0, 0, 0, 0), bias_bool=False, cu_seqlens=None) -> None:  # fmt: skip
    """Launch ``flash_attention_bwd_short_kernel`` over dense (B, H, N, D) inputs, or packed (T, H, D)
    ones with ``cu_seqlens`` = (cu_seqlens_q, cu_seqlens_k): ``grads`` = (dq, dk, dv), contiguous,
    written in one launch, each program walking ``cdiv(pairs, programs)`` (batch or sequence, head)
    pairs. ``bias``: a mask without a gradient (bool ones as uint8, ``bias_bool``) and its strides."""
    if cu_seqlens is None:
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
        strides = (*(s for t in (q, k, v) for s in t.stride()[:3]), *grad_out.stride())
        varlen = {}
    else:
        n_q, heads, head_dim = q.shape
        n_k, batch = k.shape[0], cu_seqlens[0].shape[0] - 1
        strides = (*(s for t in (q, k, v, grad_out) for s in _packed_strides(t)), grad_out.stride(2))
        varlen = {"CuSeqQ": cu_seqlens[0], "CuSeqK": cu_seqlens[1], "VARLEN": True}
    pairs = batch * heads
    if pairs == 0:
        return
    pad = head_dim_padded(head_dim)
    per_program = cdiv(pairs, min(pairs, SHORT_PROGRAMS_PER_SM * sm_count(q.device)))
    flash_attention_bwd_short_kernel[(cdiv(pairs, per_program),)](
        q, k, v, grad_out, lse, *grads, bias, *strides, *bias_strides,
        heads, n_q, n_k, pairs, per_program, scale,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype), HAS_BIAS=bias is not None, BIAS_BOOL=bias_bool,
        SPLIT_D=pad > SHORT_SPLIT_D, **varlen, **cfg.launch_options(),
    )


# the dBias kernel aims at this many programs per SM before it splits the broadcast batches
DBIAS_PROGRAMS_PER_SM = 4


def dbias_batch_chunk(b_loop: int, programs: int, sms: int) -> int:
    """Batches each dBias program sums, so that ``programs`` tiles of the mask's own shape fill
    about ``DBIAS_PROGRAMS_PER_SM`` programs per SM: a (1, H, 49, 49) Swin table under 2048 windows
    is 6 tiles, one per program looping all 2048 batches, with the GPU idle but for 6 SMs; split into
    chunks of at least 2 batches (the partials buffer stays below (B, H, N, M)), summed afterwards.

    Example: ``dbias_batch_chunk(2048, 6, 132)`` is 24 (86 chunks, 516 programs)."""
    want = DBIAS_PROGRAMS_PER_SM * sms
    if programs >= want or b_loop <= 2:
        return max(b_loop, 1)
    chunks = min(b_loop // 2, cdiv(want, programs))
    return cdiv(b_loop, chunks)


# ---------------------------------------------------------------------------------------------
# Packed variable-length launchers (the same kernels with VARLEN=True)
# ---------------------------------------------------------------------------------------------
def varlen_tiles(cu_seqlens: torch.Tensor, total: int, max_seqlen: int, block: int) -> torch.Tensor:
    """The tile table of a VARLEN launch, built on the device without a host sync.

    Sequence s (``cu_seqlens[s+1] - cu_seqlens[s]`` rows) is cut into ``ceil(len / block)`` tiles,
    numbered sequence after sequence. The table has ``G`` columns, G = min(S * ceil(max_seqlen /
    block), (total + S * (block - 1)) // block): from shapes and ``max_seqlen`` alone, at least the
    number of tiles and at most S more (those get sequence -1: their programs do nothing).

    Args:
        cu_seqlens: (S+1,) int32 offsets, 0 to ``total``, non-decreasing.
        total: the packed rows, ``cu_seqlens[-1]``.
        max_seqlen: at least the longest sequence.
        block: rows per tile.

    Returns:
        (2, G) int32: row 0 the sequence of each tile (-1 past the last), row 1 its first row
        within the sequence.
    """
    n_seqs = cu_seqlens.shape[0] - 1
    count = max(0, min(n_seqs * cdiv(max_seqlen, block), (total + n_seqs * (block - 1)) // block))
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    blocks = (lengths + block - 1) // block
    ends = blocks.cumsum(0)  # tiles up to the end of each sequence
    tile = torch.arange(count, device=cu_seqlens.device)
    seq = torch.searchsorted(ends, tile, right=True)  # the first sequence ending after the tile
    live = seq < n_seqs
    seq = seq.clamp(max=n_seqs - 1)
    start = (tile - (ends[seq] - blocks[seq])) * block
    return torch.stack([torch.where(live, seq, -1), torch.where(live, start, 0)]).to(torch.int32)


def _packed_rows_in_int32(t: torch.Tensor, rows_per_block: int = 256) -> torch.Tensor:
    """``rows_addressable_in_int32`` for a packed (T, H, D) tensor, whose rows are dim 0."""
    return t if abs(t.stride(0)) * rows_per_block < 2**31 else t.contiguous()


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a packed (T, H, D) tensor as the kernels take them: no batch."""
    return 0, t.stride(1), t.stride(0)


_NO_BIAS_STRIDES = (0,) * 12  # attn_mask, rel_h, rel_w: absent


def flash_attention_varlen_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel over packed sequences (``VARLEN``): one program per (head,
    query tile) of the tile table.

    Args:
        q: (T, H, D); k, v: (Tk, H, D); one dtype, unit stride in D.
        cu_seqlens_q, cu_seqlens_k: (S+1,) int32 offsets on q's device (valid: checked by the op).
        max_seqlen_q, max_seqlen_k: at least the longest query / key sequence.
        scale: softmax scale (> 0).
        causal: top-left aligned within each sequence.

    Returns:
        out (T, H, D) in q's dtype, contiguous; lse (H, T) in ``lse_dtype`` (-inf for the queries
        of a sequence without keys, whose out is 0).
    """
    total, heads, head_dim = q.shape
    q, k, v = (_packed_rows_in_int32(t) for t in (q, k, v))
    out = new_output((total, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = new_output((heads, total), dtype=lse_dtype(q.dtype), device=q.device)
    pad = head_dim_padded(head_dim)
    cfg = fwd_config(arch_of(q.device), q.dtype, pad, causal=causal)
    tiles = varlen_tiles(cu_seqlens_q, total, max_seqlen_q, cfg.block_m)
    if tiles.shape[1] == 0 or heads == 0:
        return out, lse
    with device_guard(q):
        flash_attention_fwd_kernel[(tiles.shape[1] * heads,)](
            q, k, v, out, lse, None, None, None,
            *_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *_packed_strides(out),
            *_NO_BIAS_STRIDES,
            heads, total, k.shape[0], 1, scale,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype),
            CuSeqQ=cu_seqlens_q, CuSeqK=cu_seqlens_k, Tiles=tiles, VARLEN=True, BLOCK_TAIL=cfg.key_tail,
            LAZY_RESCALE=lazy_rescale(cfg, pad, q.dtype), **cfg.launch_options(),
        )
    return out, lse


def flash_attention_varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward passes over packed sequences (VARLEN): dQ over query tiles (writing
    delta), then dK/dV over key tiles; or, where every sequence fits the short backward's tiles
    (``max_seqlen_*``: Qwen-VL's 64-token windows), that one launch.

    Args:
        grad_out: (T, H, D) gradient of ``out``, any strides with stride 0 or 1 in D.
        q, k, v, out, lse, cu_seqlens_*, max_seqlen_*, scale, causal: as in the forward.

    Returns:
        dq (T, H, D), dk, dv (Tk, H, D) in the inputs' dtype, contiguous. Keys of a sequence
        without queries get zero gradients, as do the queries of a sequence without keys.
    """
    total, heads, head_dim = q.shape
    total_k = k.shape[0]
    q, k, v, grad_out = (_packed_rows_in_int32(t) for t in (q, k, v, grad_out))
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    if total == 0 or total_k == 0 or heads == 0:  # no query sees any key: every gradient is zero
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse, grad_out = backward_lse(lse, grad_out, rows_last=False)  # fp32 inputs: dO's rows carry lse's rounding
    pad = head_dim_padded(head_dim)
    arch = arch_of(q.device)
    short = short_backward_config(arch, q.dtype, pad, max_seqlen_q, max_seqlen_k, masked=False, varlen=True)
    if short is not None:  # every sequence's queries and keys in one tile: the whole backward in one launch
        with device_guard(q):
            _short_backward(q, k, v, grad_out, lse, (dq, dk, dv), scale, causal, short,
                            cu_seqlens=(cu_seqlens_q, cu_seqlens_k))  # fmt: skip
        return dq, dk, dv
    cfg = varlen_bwd_config(arch, q.dtype, pad, causal)
    dq_cfg = varlen_bwd_dq_config(arch, q.dtype, pad)
    precision = dot_precision(q.dtype)
    delta = new_output((heads, total), dtype=torch.float32, device=q.device)
    key_tiles = varlen_tiles(cu_seqlens_k, total_k, max_seqlen_k, cfg.block_n)
    query_tiles = varlen_tiles(cu_seqlens_q, total, max_seqlen_q, dq_cfg.block_n)  # dQ's rows: block_n
    varlen = {"CuSeqQ": cu_seqlens_q, "CuSeqK": cu_seqlens_k, "VARLEN": True}
    do_strides = (*_packed_strides(grad_out), grad_out.stride(2))
    with device_guard(q):
        # dQ first: it writes delta, which dK/dV reads after it in stream order
        if query_tiles.shape[1]:
            flash_attention_bwd_dq_kernel[(query_tiles.shape[1] * heads,)](
                q, k, v, grad_out, out, lse, delta, dq, None, None, None, None, None,
                *_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *do_strides,
                *_packed_strides(out), *_packed_strides(dq), *_NO_BIAS_STRIDES,
                heads, total, total_k, 1, 1, scale,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=dq_cfg.block_n, BLOCK_N=dq_cfg.block_m,
                CAUSAL=causal, DOT_PRECISION=precision, Tiles=query_tiles, **varlen,
                SYNC_KV=dq_syncs_kv(arch, q.dtype, pad), **dq_cfg.launch_options(),
            )
        if key_tiles.shape[1]:
            flash_attention_bwd_dkdv_kernel[(key_tiles.shape[1] * heads,)](
                q, k, v, grad_out, lse, delta, dk, dv, None, None, None,
                *_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *do_strides,
                *_packed_strides(dk), *_packed_strides(dv), *_NO_BIAS_STRIDES,
                heads, total, total_k, 1, scale,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                CAUSAL=causal, DOT_PRECISION=precision, Tiles=key_tiles, **varlen, SPLIT_ROWS=cfg.row_split,
                **cfg.launch_options(),
            )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every configuration the launchers can pick
# ---------------------------------------------------------------------------------------------
# One head dim per padded width (16, 32, 64, 128, 256) and 80, the masked representative of the
# non-powers of two (80 and 96 share the 128-wide registers and differ only in a mask constant).
AOT_HEAD_DIMS = (16, 32, 64, 80, 128, 256)
# fp16 and bf16 share every block configuration and compile to the same code but for the
# conversions; to keep the compile check short, fp16 is compiled for the forward only.
_BWD_AOT_DTYPES = (torch.bfloat16, torch.float32)


def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    """Pointers and strides, which the runtime specialises as 16-divisible for the usual
    contiguous or packed-qkv layouts (D a multiple of 16); unit strides become constants. The
    strides of the mask and the rel_pos tables are not (a (N, M) mask with M = 197, kh = 14)."""
    free = ("stride_b", "stride_rh", "stride_rw")
    return tuple(
        n for n, ty in sig.items()
        if ty != "constexpr" and (ty[0] == "*" or (n.startswith("stride_") and not n.startswith(free)))
    )


# Masks and rel_pos, compiled for the head dims of the ViTs that use them (32: Swin; 64: ViT-B, BEiT, SAM-B;
# 128: ViT-g, SAM-H's 80 pads to 128) and the table widths of SAM's 64 x 64 global attention
# (kh = kw = 64) -- ViTDet's 14 x 14 windows pad to 16, a lighter case.
_MASK_AOT_HEAD_DIMS = (32, 64, 128)
# ... and rel_pos (SAM / ViTDet) at 64 and 128 only
_REL_POS_AOT_HEAD_DIMS = (64, 128)
_MASK_AOT_DTYPES = (torch.bfloat16, torch.float32)
_REL_POS_AOT_PAD = 64


# The packed variable-length arguments, last in the forward, dK/dV and dQ kernels.
_VARLEN_OFF = {"CuSeqQ": None, "CuSeqK": None, "Tiles": None, "VARLEN": False}
# the backward kernels' rel_pos by gathers (no tables, or fp32 ones): no selection-matrix dots
_REL_POS_GATHER = {"REL_POS_MMA": False, "KH_PAD": 16, "KW_PAD": 16}
# VARLEN launches, compiled for bf16 (training) and fp32 at ViT-B's and ViT-g's head dims and the
# widest (256), causal and not.
_VARLEN_AOT_DTYPES = (torch.bfloat16, torch.float32)
_VARLEN_AOT_HEAD_DIMS = (64, 128, 256)


def _launch_constexprs(kernel: str, cfg: AttentionConfig, arch: int, dtype: torch.dtype, head_dim_pad: int) -> dict:
    """The constexprs a kernel's launchers derive from its config and (arch, dtype, head dim): the
    forward's BLOCK_TAIL and LAZY_RESCALE, with the TMA arguments off (``_tma_fwd_spec`` sets them); dK/dV's
    SPLIT_ROWS (its row tail); dQ's SYNC_KV (``dq_syncs_kv``); none for dBias."""
    if kernel == "flash_attention_bwd_dkdv_kernel":
        return {"SPLIT_ROWS": cfg.row_split}
    if kernel == "flash_attention_bwd_dq_kernel":
        return {"SYNC_KV": dq_syncs_kv(arch, dtype, head_dim_pad)}
    if kernel != "flash_attention_fwd_kernel":
        return {}
    return {"BLOCK_TAIL": cfg.key_tail, "USE_TMA": False, "KTail": None, "VTail": None,
            "LAZY_RESCALE": lazy_rescale(cfg, head_dim_pad, dtype)}


def _tail_label(kernel: str, cfg: AttentionConfig) -> str:
    if kernel == "flash_attention_bwd_dkdv_kernel":
        return " split" if cfg.row_split else ""
    return f" tail={cfg.key_tail}" if kernel == "flash_attention_fwd_kernel" and cfg.key_tail else ""


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, head dim, causal, architecture) configuration the launchers use, and
    the attn_mask / rel_pos variants (float and bool masks, rel_pos, their gradients)."""
    plain = {"HAS_BIAS": False, "BIAS_BOOL": False, "HAS_REL_POS": False, "BIAS_ROWS_BCAST": False, **_REL_POS_GATHER,
             "Bias": None, "RelH": None, "RelW": None, "dRelH": None, "dRelW": None, **_VARLEN_OFF}
    # None pointers (the masks, rel_pos tables and varlen tables a plain launch leaves out) and dO's
    # unit stride in D are constants; the other sizes and strides are i32 (aot.signature)
    absent = dict.fromkeys(("Bias", "RelH", "RelW", "dRelH", "dRelW", "CuSeqQ", "CuSeqK", "Tiles", "stride_dod"),
                           "constexpr")  # fmt: skip
    specs = []
    for arch in ARCHS:
        for dtype, ty in AOT_DTYPE_NAMES.items():
            tensors = {**{n: f"*{ty}" for n in ("Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV")},
                       "Lse": "*fp32", "Delta": "*fp32", "sm_scale": "fp32"}  # fmt: skip
            fwd_sig, dkdv_sig, dq_sig = (
                signature(kernel, {n: t for n, t in {**tensors, **absent, **lse}.items() if n in kernel.arg_names})
                for kernel, lse in ((flash_attention_fwd_kernel, {"Lse": lse_signature(dtype)}),
                                    (flash_attention_bwd_dkdv_kernel, {}), (flash_attention_bwd_dq_kernel, {}))
            )  # fmt: skip
            for head_dim in AOT_HEAD_DIMS:
                pad = head_dim_padded(head_dim)
                dq = bwd_dq_config(arch, dtype, pad)
                for causal in (False, True):
                    fwd, bwd = fwd_config(arch, dtype, pad, causal=causal), bwd_config(arch, dtype, pad, causal)
                    common = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "CAUSAL": causal,
                              "DOT_PRECISION": dot_precision(dtype)}
                    label = f"{ty} D={head_dim}{' causal' if causal else ''}"
                    # (kernel, signature, config, BLOCK_M, BLOCK_N) as the launchers pass them
                    launches = (
                        ("flash_attention_fwd_kernel", fwd_sig, fwd, fwd.block_m, fwd.block_n),
                        ("flash_attention_bwd_dkdv_kernel", dkdv_sig, bwd, bwd.block_m, bwd.block_n),
                        ("flash_attention_bwd_dq_kernel", dq_sig, dq, dq.block_n, dq.block_m),
                    )
                    for kernel, sig, cfg, block_m, block_n in launches:
                        if kernel != "flash_attention_fwd_kernel" and dtype not in _BWD_AOT_DTYPES:
                            continue
                        constexprs = {**common, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                      **_launch_constexprs(kernel, cfg, arch, dtype, pad)}
                        constexprs.update({n: v for n, v in plain.items() if n in sig})
                        if "REL_POS_GRAD" in sig:
                            constexprs.update(REL_POS_GRAD=False, KH_PAD=16, KW_PAD=16)
                        if "stride_dod" in sig:
                            constexprs["stride_dod"] = 1
                        fwd16 = dtype != torch.float32 and kernel == "flash_attention_fwd_kernel"
                        specs.append(KernelSpec(
                            f"flash_attention.{kernel}",
                            f"{label} BM={block_m} BN={block_n}{_tail_label(kernel, cfg)} w={cfg.num_warps} "
                            f"s={cfg.num_stages}",
                            sig, constexprs, cfg.num_warps, cfg.num_stages, arch,
                            needs_wgmma=fwd16, divisible_by_16=_aligned(sig),
                            # Hopper's 16-bit forward up to D = 128 is sized for two CTAs per SM,
                            # and so is every one under a register cap (A100's up to D = 64)
                            target_ctas_per_sm=2 if fwd16 and ((arch == 90 and pad <= 128) or cfg.max_registers)
                            else 1,
                            max_registers=cfg.max_registers,
                        ))
                    if tma_supported(arch, dtype, pad):  # FASTVIT_TMA=1's tiles
                        specs.append(_tma_fwd_spec(arch, dtype, ty, head_dim, causal, fwd_sig))
                if dtype in _MASK_AOT_DTYPES and head_dim in _MASK_AOT_HEAD_DIMS:
                    specs.extend(_mask_specs(arch, dtype, ty, head_dim, fwd_sig, dkdv_sig, dq_sig))
                if dtype != torch.float32 and head_dim in _SHORT_AOT_HEAD_DIMS:
                    specs.extend(_short_specs(arch, dtype, ty, head_dim, fwd_sig))
                if dtype in _BWD_AOT_DTYPES:
                    specs.extend(_short_bwd_specs(arch, dtype, ty, head_dim))
                if dtype in _VARLEN_AOT_DTYPES and head_dim in _VARLEN_AOT_HEAD_DIMS:
                    specs.extend(_varlen_specs(arch, dtype, ty, head_dim, fwd_sig, dkdv_sig, dq_sig))
    return specs


def _tma_fwd_spec(arch, dtype, ty, head_dim, causal, fwd_sig, masks=None, label="", cfg=None) -> KernelSpec:
    """The forward with tensor descriptors (Hopper, 16-bit; what the launcher runs when q, k, v
    and out qualify): Q, K, V, Out and the key-tail descriptors typed with their boxes. ``masks``:
    the mask / rel_pos pointer types and flags of a masked variant (``_mask_specs``), run with ``cfg``."""
    pad = head_dim_padded(head_dim)
    cfg = cfg or fwd_config(arch, dtype, pad, tma=True)

    def desc(rows: int) -> str:
        return f"tensordesc<{ty}[1, 1, {rows}, {pad}]>"

    sig = {**fwd_sig, "Q": desc(cfg.block_m), "K": desc(cfg.block_n), "V": desc(cfg.block_n),
           "Out": desc(cfg.block_m)}  # fmt: skip
    if cfg.key_tail:
        sig.update(KTail=desc(cfg.key_tail), VTail=desc(cfg.key_tail))
    flags = masks or {"HAS_BIAS": False, "BIAS_BOOL": False, "HAS_REL_POS": False, "Bias": None, "RelH": None,
                      "RelW": None}  # fmt: skip
    for name, value in flags.items():
        if isinstance(value, str):
            sig[name] = value  # a pointer this variant passes
    constexprs = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "CAUSAL": causal, "DOT_PRECISION": dot_precision(dtype),
                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_TAIL": cfg.key_tail, "USE_TMA": True,
                  "LAZY_RESCALE": lazy_rescale(cfg, pad, dtype),
                  "BIAS_ROWS_BCAST": False, **_REL_POS_GATHER,
                  **{n: v for n, v in flags.items() if not isinstance(v, str)}, **_VARLEN_OFF}  # fmt: skip
    if not cfg.key_tail:
        constexprs.update(KTail=None, VTail=None)
    return KernelSpec(
        "flash_attention.flash_attention_fwd_kernel",
        f"{ty} D={head_dim}{' causal' if causal else ''}{label} tma BM={cfg.block_m} BN={cfg.block_n}"
        f"{_tail_label('flash_attention_fwd_kernel', cfg)} w={cfg.num_warps} s={cfg.num_stages}",
        sig, constexprs, cfg.num_warps, cfg.num_stages, arch,
        needs_wgmma=True, divisible_by_16=_aligned(sig),
        # the plain tiles are sized for three CTAs per SM up to D = 64 (one warpgroup each), two above
        target_ctas_per_sm=(3 if pad <= 64 else 2) if masks is None else 1, max_registers=cfg.max_registers,
    )


def _mask_specs(arch, dtype, ty, head_dim, fwd_sig, dkdv_sig, dq_sig) -> list[KernelSpec]:
    """The attn_mask / rel_pos variants: forward with an fp32 bias (a learnable table under
    autocast), a bool mask, rel_pos (tables in q's dtype, as SAM computes them); dK/dV and dQ with
    a bias and rel_pos, dQ writing the rel_pos gradients; the dBias kernel, per-tile and summed
    over rows (a (B, 1, 1, M) key-padding bias)."""
    pad = head_dim_padded(head_dim)
    fwd = fwd_mask_config(arch, dtype, pad)
    fwd_float = fwd_mask_config(arch, dtype, pad, float_bias=True)
    fwd_gathers = fwd_mask_config(arch, dtype, pad, rel_pos_gathers=True)
    bwd, dq = bwd_mask_configs(arch, dtype, pad, rel_pos_grad=True)
    # dK/dV and dQ with a mask alone (no rel_pos tables): a float bias, a bool mask
    mask_bwd, dq_plain = bwd_mask_configs(arch, dtype, pad, rel_pos_grad=False, rel_pos=False)
    bool_bwd, bool_dq = bwd_mask_configs(arch, dtype, pad, rel_pos_grad=False, rel_pos=False, bool_mask=True)
    common = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "CAUSAL": False, "DOT_PRECISION": dot_precision(dtype)}
    tables = {"RelH": f"*{ty}", "RelW": f"*{ty}"}
    no_tables = {"RelH": None, "RelW": None}
    specs = []

    def add(kernel, label, sig, constexprs, cfg, block_m, block_n, wgmma=False, target_ctas=1):
        if "rel_pos" in label and head_dim not in _REL_POS_AOT_HEAD_DIMS:
            return  # no model takes rel_pos at this head dim
        sig = {n: sig[n] for n in sig}  # keep the argument order
        for name, value in constexprs.items():
            if name in sig and sig[name] == "constexpr" and isinstance(value, str) and value.startswith("*"):
                sig[name] = value  # a pointer that this variant passes
        values = {n: v for n, v in _REL_POS_GATHER.items() if n in sig}
        values.update({n: v for n, v in constexprs.items() if sig.get(n) == "constexpr"})
        values.update({n: v for n, v in _VARLEN_OFF.items() if n in sig})
        values.update(common, BLOCK_M=block_m, BLOCK_N=block_n, **_launch_constexprs(kernel, cfg, arch, dtype, pad))
        if "BIAS_ROWS_BCAST" in sig:
            values.setdefault("BIAS_ROWS_BCAST", False)
        # the mask and rel_pos tables contiguous in their last dim (BEiT's and Swin's gathered tables,
        # SAM's einsum, NaFlex's padding row): the runtime specialises the unit stride to a constant
        for name in ("stride_bm", "stride_rhk", "stride_rwk"):
            if name in sig:
                sig[name] = "constexpr"
                values[name] = 1
        if "stride_dod" in sig:
            values["stride_dod"] = 1
        specs.append(KernelSpec(
            f"flash_attention.{kernel}",
            f"{ty} D={head_dim} {label} BM={block_m} BN={block_n}{_tail_label(kernel, cfg)} w={cfg.num_warps} "
            f"s={cfg.num_stages}",
            sig, values, cfg.num_warps, cfg.num_stages, arch,
            needs_wgmma=wgmma and dtype != torch.float32, divisible_by_16=_aligned(sig),
            target_ctas_per_sm=target_ctas, max_registers=cfg.max_registers,
        ))

    fwd_bias = {"Bias": "*fp32", **no_tables, "HAS_BIAS": True, "BIAS_BOOL": False, "HAS_REL_POS": False}
    fwd_bool = {"Bias": "*u8", **no_tables, "HAS_BIAS": True, "BIAS_BOOL": True, "HAS_REL_POS": False}
    fwd_rel = {"Bias": None, **tables, "HAS_BIAS": False, "BIAS_BOOL": False, "HAS_REL_POS": True}
    add("flash_attention_fwd_kernel", "bias=fp32", fwd_sig, fwd_bias, fwd_float, fwd_float.block_m,
        fwd_float.block_n, True)
    add("flash_attention_fwd_kernel", "mask=bool", fwd_sig, fwd_bool, fwd, fwd.block_m, fwd.block_n, True)
    add("flash_attention_fwd_kernel", "rel_pos", fwd_sig, fwd_rel, fwd_gathers, fwd_gathers.block_m,
        fwd_gathers.block_n, True)
    # the forward's rel_pos by selection-matrix dots: 16-bit tables in q's dtype, 14 x 14 windows (16 bins)
    # and SAM's 64 x 64 global attention (64 bins); the gather row above: fp32 tables, or wider grids
    if dtype != torch.float32:
        for bins in (REL_POS_MMA_MAX_PAD, REL_POS_FWD_MMA_MAX_PAD):
            fwd_mma = fwd_mask_config(arch, dtype, pad, rel_pos_mma_bins=bins)
            add("flash_attention_fwd_kernel", f"rel_pos mma k={bins}", fwd_sig,
                {**fwd_rel, "REL_POS_MMA": True, "KH_PAD": bins, "KW_PAD": bins}, fwd_mma,
                fwd_mma.block_m, fwd_mma.block_n, True, target_ctas=2 if fwd_mma.max_registers else 1)
    tma_cfg = fwd_mask_config(arch, dtype, pad, tma=True, float_bias=True)
    if tma_supported(arch, dtype, pad) and tma_cfg.tma:  # FASTVIT_TMA=1's tiles, when q, k, v, out qualify
        specs.append(_tma_fwd_spec(arch, dtype, ty, head_dim, False, fwd_sig, fwd_bias, " bias=fp32", tma_cfg))
    both = {"Bias": "*fp32", **tables, "HAS_BIAS": True, "BIAS_BOOL": False, "HAS_REL_POS": True}
    add("flash_attention_bwd_dkdv_kernel", "bias=fp32 rel_pos", dkdv_sig, both, bwd, bwd.block_m, bwd.block_n)
    bias_only = {**fwd_bias, "dRelH": None, "dRelW": None, "REL_POS_GRAD": False, "KH_PAD": 16, "KW_PAD": 16}
    add("flash_attention_bwd_dq_kernel", "bias=fp32", dq_sig, bias_only, dq_plain, dq_plain.block_n, dq_plain.block_m)
    # dK/dV with a float bias alone (BEiT's, Swin's gathered tables); a bool mask (key padding, NaFlex's
    # padded patches) in training: dK/dV and dQ
    add("flash_attention_bwd_dkdv_kernel", "bias=fp32", dkdv_sig, fwd_bias, mask_bwd, mask_bwd.block_m,
        mask_bwd.block_n)
    add("flash_attention_bwd_dkdv_kernel", "mask=bool", dkdv_sig, fwd_bool, bool_bwd, bool_bwd.block_m,
        bool_bwd.block_n)
    bool_only = {**bias_only, **fwd_bool}
    add("flash_attention_bwd_dq_kernel", "mask=bool", dq_sig, bool_only, bool_dq, bool_dq.block_n, bool_dq.block_m)
    # key-padding masks, one row of keys for every query (NaFlex's padded patches, HF's expanded
    # (B, 1, N, M) padding masks): forward, dK/dV and dQ read one vector of keys (BIAS_ROWS_BCAST)
    for label, flags, float_bias in (("mask=bool", fwd_bool, False), ("bias=fp32", fwd_bias, True)):
        pad_bwd, pad_dq = bwd_mask_configs(arch, dtype, pad, rel_pos_grad=False, rel_pos=False, key_padding=True,
                                           bool_mask=not float_bias)
        rows = {**flags, "BIAS_ROWS_BCAST": True}
        pad_fwd = fwd_mask_config(arch, dtype, pad, float_bias=float_bias, key_padding=True)
        add("flash_attention_fwd_kernel", f"{label} (B,1,1,M)", fwd_sig, rows, pad_fwd, pad_fwd.block_m,
            pad_fwd.block_n, True, target_ctas=2 if pad_fwd.max_registers else 1)
        add("flash_attention_bwd_dkdv_kernel", f"{label} (B,1,1,M)", dkdv_sig, rows, pad_bwd, pad_bwd.block_m,
            pad_bwd.block_n)
        add("flash_attention_bwd_dq_kernel", f"{label} (B,1,1,M)", dq_sig, {**bias_only, **rows}, pad_dq,
            pad_dq.block_n, pad_dq.block_m)
    rel_grad = {**both, "dRelH": "*fp32", "dRelW": "*fp32", "REL_POS_GRAD": True,
                "KH_PAD": _REL_POS_AOT_PAD, "KW_PAD": _REL_POS_AOT_PAD}
    add("flash_attention_bwd_dq_kernel", f"bias=fp32 rel_pos+grad k={_REL_POS_AOT_PAD}", dq_sig, rel_grad, dq,
        dq.block_n, dq.block_m)
    # the backward's rel_pos by selection-matrix dots: 16-bit tables in q's dtype, 14 x 14 windows (16 bins)
    rel_mma = {"REL_POS_MMA": True, "KH_PAD": REL_POS_MMA_MAX_PAD, "KW_PAD": REL_POS_MMA_MAX_PAD}
    mma = dtype != torch.float32 and (90 <= arch < 100 or pad <= 64)
    if mma:
        bwd_mma, dq_mma = bwd_mask_configs(arch, dtype, pad, rel_pos_grad=True, rel_pos_mma=True,
                                           rel_pos_bins=REL_POS_MMA_MAX_PAD)
        add("flash_attention_bwd_dkdv_kernel", f"bias=fp32 rel_pos mma k={REL_POS_MMA_MAX_PAD}", dkdv_sig,
            {**both, **rel_mma}, bwd_mma, bwd_mma.block_m, bwd_mma.block_n)
        add("flash_attention_bwd_dq_kernel", f"bias=fp32 rel_pos+grad mma k={REL_POS_MMA_MAX_PAD}", dq_sig,
            {**rel_grad, **rel_mma}, dq_mma, dq_mma.block_n, dq_mma.block_m)
    if mma and 90 <= arch < 100 and pad <= 64:  # SAM's 64 x 64 global attention on Hopper
        bwd_mma, dq_mma = bwd_mask_configs(arch, dtype, pad, rel_pos_grad=True, rel_pos_mma=True,
                                           rel_pos_bins=REL_POS_FWD_MMA_MAX_PAD)
        wide = {"REL_POS_MMA": True, "KH_PAD": REL_POS_FWD_MMA_MAX_PAD, "KW_PAD": REL_POS_FWD_MMA_MAX_PAD}
        add("flash_attention_bwd_dkdv_kernel", f"bias=fp32 rel_pos mma k={REL_POS_FWD_MMA_MAX_PAD}", dkdv_sig,
            {**both, **wide}, bwd_mma, bwd_mma.block_m, bwd_mma.block_n)
        add("flash_attention_bwd_dq_kernel", f"bias=fp32 rel_pos+grad mma k={REL_POS_FWD_MMA_MAX_PAD}", dq_sig,
            {**rel_grad, **wide}, dq_mma, dq_mma.block_n, dq_mma.block_m)
    # (rows summed, rel_pos, rel_pos by dots, the walk's share of the other gradients: "", "dq", "dkdv")
    for rows_bcast, rel, rel_dots, grads in ((False, True, False, ""), (False, True, True, ""),
                                             (False, False, False, ""), (False, False, False, "dq"),
                                             (False, False, False, "dkdv"), (True, False, False, "")):  # fmt: skip
        if (rel_dots and not mma) or (grads == "dkdv" and not dbias_takes_dkdv(arch, dtype, pad)):
            continue
        dbias_cfg = dbias_dq_config(arch, dtype, pad) if grads else dbias_config(
            dtype, pad, rel_pos=rel, arch=arch, rel_pos_mma=rel_dots, tile_walk=not rows_bcast and not rel)
        sig = signature(flash_attention_bwd_dbias_kernel, {
            **{n: f"*{ty}" for n in ("Q", "K", "V", "dOut")}, "Lse": "*fp32", "Delta": "*fp32", "Bias": "*fp32",
            "RelH": f"*{ty}" if rel else "constexpr", "RelW": f"*{ty}" if rel else "constexpr", "dBias": "*fp32",
            **{n: f"*{ty}" if wanted else "constexpr" for n, wanted in
               (("dQ", bool(grads)), ("dK", grads == "dkdv"), ("dV", grads == "dkdv"))},
            "stride_dod": "constexpr", "sm_scale": "fp32"})  # fmt: skip
        # a (1, H, N, M) table under a training batch splits its batches (dbias_batch_chunk), except
        # with rel_pos by gathers
        split = not rows_bcast and not (rel and not rel_dots)
        values = {"ROWS_BCAST": rows_bcast, "COLS_BCAST": False, "HAS_REL_POS": rel, "SPLIT_BATCHES": split,
                  "TILE_WALK": not rows_bcast and not rel, "WITH_DQ": bool(grads), "WITH_DKDV": grads == "dkdv",
                  **(rel_mma if rel_dots else {})}  # fmt: skip
        if not rel:
            values.update(RelH=None, RelW=None)
        values.update({n: None for n in ("dQ", "dK", "dV") if sig[n] == "constexpr"})
        label = "dbias (B,1,1,M)" if rows_bcast else "dbias (1,H,N,M)" + (" split" if split else "")
        label += " rel_pos" if rel else ""
        label += {"": "", "dq": " +dq", "dkdv": " +dq+dkdv"}[grads]
        label += f" mma k={REL_POS_MMA_MAX_PAD}" if rel_dots else ""
        add("flash_attention_bwd_dbias_kernel", label, sig, values, dbias_cfg, dbias_cfg.block_m, dbias_cfg.block_n)
    return specs


# Short sequences (``short_query_config``), compiled at Swin's head dim (32) and ViT-B's (64)
_SHORT_AOT_HEAD_DIMS = (32, 64)


def _short_specs(arch, dtype, ty, head_dim, fwd_sig) -> list[KernelSpec]:
    """The forward's short-sequence tiles: plain (fp16 and bf16) and, in bf16, with an fp32 bias
    (Swin's relative-position bias and shift mask), a bool mask and key-padding masks."""
    pad = head_dim_padded(head_dim)
    common = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "CAUSAL": False, "DOT_PRECISION": dot_precision(dtype),
              "RelH": None, "RelW": None, "HAS_REL_POS": False, **_REL_POS_GATHER, **_VARLEN_OFF}
    kinds = [("", {"Bias": None, "HAS_BIAS": False, "BIAS_BOOL": False, "BIAS_ROWS_BCAST": False}, False, False)]
    if dtype == torch.bfloat16:
        for rows, label in ((False, ""), (True, " (B,1,1,M)")):
            kinds += [
                (f" bias=fp32{label}", {"Bias": "*fp32", "HAS_BIAS": True, "BIAS_BOOL": False, "BIAS_ROWS_BCAST": rows},
                 True, rows),
                (f" mask=bool{label}", {"Bias": "*u8", "HAS_BIAS": True, "BIAS_BOOL": True, "BIAS_ROWS_BCAST": rows},
                 False, rows),
            ]
    specs = []
    for label, flags, float_bias, rows in kinds:
        if flags["HAS_BIAS"]:
            base = fwd_mask_config(arch, dtype, pad, float_bias=float_bias, key_padding=rows)
        else:
            base = fwd_config(arch, dtype, pad)
        if not takes_short_tiles(base, SHORT_QUERIES, pad, rel_pos=False):
            continue
        cfg = short_query_config(base, arch, float_bias=float_bias)
        sig = dict(fwd_sig)
        if isinstance(flags["Bias"], str):
            sig["Bias"] = flags["Bias"]
            sig["stride_bm"] = "constexpr"  # a contiguous mask's unit stride, as in _mask_specs
        constexprs = {**common, **{n: v for n, v in flags.items() if not isinstance(v, str)},
                      "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                      **_launch_constexprs("flash_attention_fwd_kernel", cfg, arch, dtype, pad)}
        if flags["HAS_BIAS"]:
            constexprs["stride_bm"] = 1
        specs.append(KernelSpec(
            "flash_attention.flash_attention_fwd_kernel",
            f"{ty} D={head_dim} short{label} BM={cfg.block_m} BN={cfg.block_n}"
            f"{_tail_label('flash_attention_fwd_kernel', cfg)} w={cfg.num_warps} s={cfg.num_stages}",
            sig, constexprs, cfg.num_warps, cfg.num_stages, arch,
            needs_wgmma=True, divisible_by_16=_aligned(sig), max_registers=cfg.max_registers,
        ))
    return specs


def _short_bwd_specs(arch, dtype, ty, head_dim) -> list[KernelSpec]:
    """The one-launch backward of short sequences (``flash_attention_bwd_short_kernel``) at every
    16-bit head dim its tiles take; with a contiguous bool mask (``window_attention``'s shifted
    windows, (windows, 1, N, M)) at Swin's and ViT-B's head dims, a float one at Swin's, causal at
    ViT-B's; fp32 plain and with the bool mask at those and at 128 (the head-dim halves); packed
    sequences (VARLEN) at ViT-B's head dim and at 128 (Qwen-VL's windows, D = 80)."""
    pad = head_dim_padded(head_dim)
    wide = head_dim in _SHORT_AOT_HEAD_DIMS
    if dtype == torch.float32 and head_dim not in (*_SHORT_AOT_HEAD_DIMS, 128):
        return []
    variants = [("", False, False, False)]  # (label, causal, mask: "" / "*u8" / "*fp32", varlen)
    if wide or dtype == torch.float32:
        variants.append((" mask=bool", False, "*u8", False))
    if dtype != torch.float32 and head_dim == 32:  # a frozen float table (Swin's, without its gradient)
        variants.append((" bias=fp32", False, "*fp32", False))
    if dtype != torch.float32 and head_dim == 64:
        variants.append((" causal", True, "", False))
    if head_dim in (64, 128):
        variants.append((" varlen", False, "", True))
    tensors = {**{n: f"*{ty}" for n in ("Q", "K", "V", "dOut", "dQ", "dK", "dV")}, "Lse": "*fp32",
               "sm_scale": "fp32", "stride_dod": "constexpr"}  # fmt: skip
    specs = []
    for label, causal, mask, varlen in variants:
        cfg = short_bwd_config(arch, dtype, pad, masked=bool(mask), varlen=varlen)
        if cfg is None:
            continue
        sig = signature(flash_attention_bwd_short_kernel,
                        {**tensors, "Bias": mask or "constexpr",
                         **({"stride_bm": "constexpr"} if mask else {}),
                         **({"CuSeqQ": "*i32", "CuSeqK": "*i32"} if varlen else {})})  # fmt: skip
        constexprs = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                      "CAUSAL": causal, "DOT_PRECISION": dot_precision(dtype), "HAS_BIAS": bool(mask),
                      "BIAS_BOOL": mask == "*u8",
                      "SPLIT_D": pad > SHORT_SPLIT_D, "VARLEN": varlen,
                      "stride_dod": 1, **({"stride_bm": 1} if mask else {"Bias": None}),
                      **({} if varlen else {"CuSeqQ": None, "CuSeqK": None})}  # fmt: skip
        specs.append(KernelSpec(
            "flash_attention.flash_attention_bwd_short_kernel",
            f"{ty} D={head_dim}{label} BM={cfg.block_m} BN={cfg.block_n} w={cfg.num_warps} s={cfg.num_stages}",
            sig, constexprs, cfg.num_warps, cfg.num_stages, arch, divisible_by_16=_aligned(sig),
            max_registers=cfg.max_registers,
        ))
    return specs


def _varlen_specs(arch, dtype, ty, head_dim, fwd_sig, dkdv_sig, dq_sig) -> list[KernelSpec]:
    """The packed variable-length variants (VARLEN) of the forward, dK/dV and dQ kernels, with the
    plain configurations their launchers pick and int32 cu_seqlens and tile tables."""
    pad = head_dim_padded(head_dim)
    dq = varlen_bwd_dq_config(arch, dtype, pad)
    tables = {"CuSeqQ": "*i32", "CuSeqK": "*i32", "Tiles": "*i32"}
    common = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "DOT_PRECISION": dot_precision(dtype),
              "HAS_BIAS": False, "BIAS_BOOL": False, "HAS_REL_POS": False, "BIAS_ROWS_BCAST": False, "Bias": None,
              "RelH": None, "RelW": None, "VARLEN": True}
    specs = []
    for causal in (False, True):
        fwd, bwd = fwd_config(arch, dtype, pad, causal=causal), varlen_bwd_config(arch, dtype, pad, causal)
        specs += _varlen_causal_specs(arch, dtype, ty, head_dim, causal, tables, common, (
            ("flash_attention_fwd_kernel", fwd_sig, fwd, fwd.block_m, fwd.block_n),
            ("flash_attention_bwd_dkdv_kernel", dkdv_sig, bwd, bwd.block_m, bwd.block_n),
            ("flash_attention_bwd_dq_kernel", dq_sig, dq, dq.block_n, dq.block_m),
        ))
    return specs


def _varlen_causal_specs(arch, dtype, ty, head_dim, causal, tables, common, launches) -> list[KernelSpec]:
    """``_varlen_specs``' rows of one causal flag: (kernel, signature, config, BLOCK_M, BLOCK_N) each."""
    specs = []
    for kernel, sig, cfg, block_m, block_n in launches:
        sig = {**sig, **tables}  # the same argument order, pointers where the plain specs have None
        constexprs = {**common, "CAUSAL": causal, "BLOCK_M": block_m, "BLOCK_N": block_n,
                      **_launch_constexprs(kernel, cfg, arch, dtype, head_dim_padded(head_dim))}
        constexprs.update({n: v for n, v in _REL_POS_GATHER.items() if n in sig})
        if "REL_POS_GRAD" in sig:
            constexprs.update(dRelH=None, dRelW=None, REL_POS_GRAD=False, KH_PAD=16, KW_PAD=16)
        if "stride_dod" in sig:
            constexprs["stride_dod"] = 1
        specs.append(KernelSpec(
            f"flash_attention.{kernel}",
            f"{ty} D={head_dim} varlen{' causal' if causal else ''} BM={block_m} BN={block_n}"
            f"{_tail_label(kernel, cfg)} w={cfg.num_warps} s={cfg.num_stages}",
            sig, constexprs, cfg.num_warps, cfg.num_stages, arch,
            needs_wgmma=dtype != torch.float32 and kernel == "flash_attention_fwd_kernel",
            divisible_by_16=_aligned(sig), max_registers=cfg.max_registers,
        ))
    return specs
