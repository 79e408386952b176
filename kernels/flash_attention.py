"""Flash attention (FlashAttention-2 style) forward and backward in Triton.

Forward, per (query block, batch*head) program: stream key/value blocks through SRAM, keep the
running row max ``m`` and row sum ``l`` of the online softmax in fp32, rescale the accumulator when
the max grows, and write ``out = acc / l`` and the natural-log ``lse = (m + log2 l) * ln 2`` once.
``exp2`` is used throughout, with ``log2(e)`` folded into the softmax scale. Nothing N x M is ever
written to memory.

Backward (FlashAttention-2, no atomics, deterministic):
    1. ``delta_i = sum_d dO_id * O_id``                      (pre-pass, fp32)
    2. per key block:   ``P^T = exp2(K Q^T * scale*log2e - lse*log2e)``
                        ``dV += P^T dO``; ``dS^T = P^T * (V dO^T - delta)``; ``dK += dS^T Q``
    3. per query block: ``P = exp2(Q K^T * scale*log2e - lse*log2e)``
                        ``dS = P * (dO V^T - delta)``; ``dQ += dS K``
    with ``dK`` and ``dQ`` multiplied by the softmax scale at the end.

Conventions: q (B, H, N, D), k and v (B, H, M, D), any strides with unit stride in D (views of a
packed qkv reach the kernels as they are). Head dims are padded to the next power of two
(>= 16) in registers and masked in every load and store. Causal masking is top-left aligned like
SDPA's ``is_causal`` (query i sees keys j <= i). The batch*head index is folded into grid axis 0
(no grid y/z limit), and every (batch, head) base offset is computed in int64; inside one head,
pointers advance block by block, so no int32 product of a row index and a stride can overflow.

Precision: fp16/bf16 inputs use tensor-core dots with fp32 accumulation (P is rounded to the
input dtype before the P V product, as in FlashAttention); fp32 inputs use IEEE fp32 dots (no
TF32), so fp32 results are accurate to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from .aot import ARCHS, KernelSpec
from .runtime import INTERPRETER, arch_of, device_guard, new_output, rows_addressable_in_int32

LOG2E = math.log2(math.e)

# Largest head dim the kernels cover (padded to a power of two in registers).
MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(
    acc, l_i, m_i,  # running output (BLOCK_M, HEAD_DIM_PAD) fp32, row sum, row max (log2 units)
    q,  # (BLOCK_M, HEAD_DIM_PAD) query tile
    k_head, v_head,  # scalar pointers to key 0 of this (batch, head) in K and V
    stride_kn, stride_vn,
    offs_m,  # (BLOCK_M,) query rows of this program
    offs_n,  # (BLOCK_N,) 0..BLOCK_N-1
    offs_d,  # (HEAD_DIM_PAD,) 0..HEAD_DIM_PAD-1
    lo, hi,  # key range [lo, hi) to visit, lo a multiple of BLOCK_N
    M,  # number of keys
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # the range holds key columns >= M
    CAUSAL_MASK: tl.constexpr,  # the range crosses the causal diagonal
    DOT_PRECISION: tl.constexpr,
):
    # only scalar block pointers are carried through the loop; tile offsets are cheap to rebuild
    k_block = k_head + tl.cast(lo, tl.int64) * stride_kn
    v_block = v_head + tl.cast(lo, tl.int64) * stride_vn
    d_valid = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        # -- s = q k^T for this key block (fp32) --
        if MASK_KEYS:
            key_valid = offs_n < M - start_n
            k = tl.load(k_block + offs_n[None, :] * stride_kn + offs_d[:, None],
                        mask=d_valid[:, None] & key_valid[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_block + offs_n[None, :] * stride_kn + offs_d[:, None])
        else:
            k = tl.load(k_block + offs_n[None, :] * stride_kn + offs_d[:, None], mask=d_valid[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if MASK_KEYS:
            s = tl.where(key_valid[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], s, float("-inf"))
        # -- online softmax: new row max, rescale the old sum and accumulator --
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        # -- acc += p v --
        if MASK_KEYS:
            v = tl.load(v_block + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=key_valid[:, None] & d_valid[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_block + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_block + offs_n[:, None] * stride_vn + offs_d[None, :], mask=d_valid[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        k_block += BLOCK_N * stride_kn
        v_block += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def flash_attention_fwd_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    Out,  # (B, H, N, D) output, unit stride in D
    Lse,  # (B*H, N) fp32 natural-log logsumexp of scale * q.k, contiguous
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, M,  # heads, queries, keys
    sm_scale,  # softmax scale (> 0)
    HEAD_DIM: tl.constexpr,  # D
    HEAD_DIM_PAD: tl.constexpr,  # D rounded up to a power of two >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step; divides BLOCK_M
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (unused by fp16/bf16 dots)
):
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

    # -- base pointers of this (batch, head) in int64, local offsets in int32 --
    q_base = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qn
    k_head = K + off_b * stride_kb + off_h * stride_kh
    v_head = V + off_b * stride_vb + off_h * stride_vh
    local_m = tl.arange(0, BLOCK_M)
    q = tl.load(
        q_base + local_m[:, None] * stride_qn + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2 e)

    # -- key ranges: whole blocks off the diagonal need no mask; the rest is masked --
    full_end = (M // BLOCK_N) * BLOCK_N  # keys in whole blocks
    if CAUSAL:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, M), N)  # queries i < N see keys j <= i
        unmasked_end = tl.minimum(start_m, full_end)
    else:
        hi = M
        unmasked_end = full_end
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        0, unmasked_end, M, qk_scale,
        HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_N,
        MASK_KEYS=False, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
    )
    acc, l_i, m_i = _attention_fwd_inner(
        acc, l_i, m_i, q, k_head, v_head, stride_kn, stride_vn, offs_m, offs_n, offs_d,
        unmasked_end, hi, M, qk_scale,
        HEAD_DIM=HEAD_DIM, HEAD_DIM_PAD=HEAD_DIM_PAD, BLOCK_N=BLOCK_N,
        MASK_KEYS=True, CAUSAL_MASK=CAUSAL, DOT_PRECISION=DOT_PRECISION,
    )

    # -- epilogue: normalise, write out and the natural-log lse --
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # ln(2)
    o_base = Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
    tl.store(
        o_base + local_m[:, None] * stride_on + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=row_valid[:, None] & d_valid[None, :],
    )
    tl.store(Lse + bh.to(tl.int64) * N + offs_m, lse, mask=row_valid)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def flash_attention_bwd_delta_kernel(
    Out,  # (B, H, N, D) forward output, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides (an expanded gradient has stride 0)
    Delta,  # (B*H, N) fp32 rowsum(dO * O), contiguous
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    start_m = (pid % num_m_blocks) * BLOCK_M
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (start_m + local_m < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_on
        + local_m[:, None] * stride_on + offs_d[None, :],
        mask=mask, other=0.0,
    )
    do = tl.load(
        dOut + off_b * stride_dob + off_h * stride_doh + start_m.to(tl.int64) * stride_don
        + local_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
        mask=mask, other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * N + start_m + local_m, delta, mask=start_m + local_m < N)


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
    BLOCK_M: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_ptrs += tl.cast(lo, tl.int64) * stride_qn
    do_ptrs += tl.cast(lo, tl.int64) * stride_don
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + local_m
        row_valid = offs_m < N
        q_t = tl.load(q_ptrs, mask=d_valid[:, None] & row_valid[None, :], other=0.0)
        # lse = +inf on missing query rows makes their P exactly 0
        lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=float("inf"))
        # -- P^T = exp(scale * k q^T - lse) --
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :] * 1.4426950408889634)
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        do = tl.load(do_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        # -- dV += P^T dO --
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # -- dS^T = P^T * (V dO^T - delta);  dK += dS^T Q --
        delta = tl.load(delta_ptr + offs_m, mask=row_valid, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
    return dk, dv


@triton.jit
def flash_attention_bwd_dkdv_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides
    Lse,  # (B*H, N) fp32 forward logsumexp (natural log)
    Delta,  # (B*H, N) fp32 rowsum(dO * O)
    dK,  # (B, H, M, D) key gradient, unit stride in D
    dV,  # (B, H, M, D) value gradient, unit stride in D
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N, M,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program; a multiple of BLOCK_M
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
    kv_mask = (offs_n < M)[:, None] & d_valid[None, :]

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
    lse_ptr = Lse + bh.to(tl.int64) * N
    delta_ptr = Delta + bh.to(tl.int64) * N
    qk_scale = sm_scale * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    if CAUSAL:
        # queries i >= start_n see these keys; those below start_n + BLOCK_N cross the diagonal
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(start_n + BLOCK_N, N)
        dk, dv = _attention_bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
            offs_n, local_m, d_valid, lo, diag_end, N, qk_scale,
            BLOCK_M=BLOCK_M, CAUSAL_MASK=True, DOT_PRECISION=DOT_PRECISION,
        )
        lo = diag_end
    else:
        lo = 0
    dk, dv = _attention_bwd_dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
        offs_n, local_m, d_valid, lo, N, N, qk_scale,
        BLOCK_M=BLOCK_M, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
    )

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
    q, do,  # (BLOCK_M, HEAD_DIM_PAD) this program's queries and output gradients
    lse, delta,  # (BLOCK_M,) fp32
    k_ptrs,  # (HEAD_DIM_PAD, BLOCK_N) pointers to K^T at key 0 of this head
    v_ptrs,  # (HEAD_DIM_PAD, BLOCK_N) pointers to V^T at key 0 of this head
    stride_kn, stride_vn,
    offs_m, local_n, d_valid,
    lo, hi,  # key range [lo, hi)
    M,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,  # keys >= M or past the causal diagonal are in the range
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    k_ptrs += tl.cast(lo, tl.int64) * stride_kn
    v_ptrs += tl.cast(lo, tl.int64) * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + local_n
        key_valid = offs_n < M
        if MASK_KEYS:
            k_t = tl.load(k_ptrs, mask=d_valid[:, None] & key_valid[None, :], other=0.0)
            v_t = tl.load(v_ptrs, mask=d_valid[:, None] & key_valid[None, :], other=0.0)
        else:
            k_t = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
            v_t = tl.load(v_ptrs, mask=d_valid[:, None], other=0.0)
        # -- P = exp(scale * q k^T - lse) --
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None] * 1.4426950408889634)
        if MASK_KEYS:
            p = tl.where(key_valid[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        # -- dS = P * (dO V^T - delta);  dQ += dS K --
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def flash_attention_bwd_dq_kernel(
    Q,  # (B, H, N, D) queries, unit stride in D
    K,  # (B, H, M, D) keys, unit stride in D
    V,  # (B, H, M, D) values, unit stride in D
    dOut,  # (B, H, N, D) output gradient, any strides
    Lse,  # (B*H, N) fp32 forward logsumexp (natural log)
    Delta,  # (B*H, N) fp32 rowsum(dO * O)
    dQ,  # (B, H, N, D) query gradient, unit stride in D
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, M,
    sm_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program; a multiple of BLOCK_N
    BLOCK_N: tl.constexpr,  # keys per inner step
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
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
    lse = tl.load(Lse + bh.to(tl.int64) * N + offs_m, mask=row_valid, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * N + offs_m, mask=row_valid, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + local_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + local_n[None, :] * stride_vn + offs_d[:, None]
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    full_end = (M // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, M), N)  # queries i < N see keys j <= i
        unmasked_end = tl.minimum(start_m, full_end)
    else:
        hi = M
        unmasked_end = full_end
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, local_n, d_valid,
        0, unmasked_end, M, qk_scale,
        BLOCK_N=BLOCK_N, MASK_KEYS=False, CAUSAL_MASK=False, DOT_PRECISION=DOT_PRECISION,
    )
    dq = _attention_bwd_dq_inner(
        dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, local_n, d_valid,
        unmasked_end, hi, M, qk_scale,
        BLOCK_N=BLOCK_N, MASK_KEYS=True, CAUSAL_MASK=CAUSAL, DOT_PRECISION=DOT_PRECISION,
    )
    dq = dq * sm_scale
    tl.store(
        dQ + off_b * stride_dqb + off_h * stride_dqh + start_m.to(tl.int64) * stride_dqn
        + local_m[:, None] * stride_dqn + offs_d[None, :],
        dq.to(dQ.dtype.element_ty), mask=mask,
    )


# ---------------------------------------------------------------------------------------------
# Configurations (chosen per architecture from the ahead-of-time register/spill report)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def head_dim_padded(head_dim: int) -> int:
    """The power of two >= 16 that a head dim is padded to in registers."""
    return max(16, triton.next_power_of_2(head_dim))


# Under the interpreter: small tiles, so short test sequences still cross several blocks. The
# forward needs block_m % block_n == 0; the backward needs block_n % block_m == 0 (dK/dV keeps
# block_n keys and steps block_m queries; dQ keeps block_n queries and steps block_m keys).
_INTERPRETER_FWD = AttentionConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
_INTERPRETER_BWD = AttentionConfig(block_m=16, block_n=32, num_warps=4, num_stages=1)


def fwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int) -> AttentionConfig:
    """Forward block sizes for one (architecture, dtype, padded head dim).

    Picked from the ahead-of-time report (``python -m fastvit.kernels.aot``): the largest tiles
    that compile without spills on each architecture. Not yet tuned by timing on a GPU.
    """
    if INTERPRETER:
        return _INTERPRETER_FWD
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units and need many registers
        return _FP32_CONFIGS[head_dim_pad]
    small = head_dim_pad <= 64
    if 90 <= arch < 100:  # Hopper: two warpgroups of warpgroup MMA over 128 query rows
        return AttentionConfig(128, 64, 8, 3) if small else AttentionConfig(128, 64, 8, 2)
    if arch >= 89:  # Ada and consumer Blackwell: ~99 KB of shared memory, no warpgroup MMA
        return AttentionConfig(128, 64, 8, 2) if small else AttentionConfig(64, 32, 4, 2)
    return AttentionConfig(128, 64, 8, 3) if small else AttentionConfig(128, 32, 8, 3)


def bwd_config(arch: int, dtype: torch.dtype, head_dim_pad: int) -> AttentionConfig:
    """Backward block sizes, used by both passes: dK/dV keeps ``block_n`` keys per program and
    steps ``block_m`` queries; dQ keeps ``block_n`` queries and steps ``block_m`` keys."""
    if INTERPRETER:
        return _INTERPRETER_BWD
    if dtype == torch.float32:
        return _FP32_CONFIGS_BWD[head_dim_pad]
    small = head_dim_pad <= 64
    if 90 <= arch < 100:
        return AttentionConfig(32, 128, 8, 2) if small else AttentionConfig(32, 64, 8, 2)
    return AttentionConfig(32, 64, 4, 2) if small else AttentionConfig(32, 64, 8, 2)


_FP32_CONFIGS = {
    16: AttentionConfig(64, 32, 4, 2),
    32: AttentionConfig(32, 32, 4, 2),
    64: AttentionConfig(32, 16, 4, 2),
    128: AttentionConfig(16, 16, 4, 1),
}
_FP32_CONFIGS_BWD = {
    16: AttentionConfig(16, 32, 4, 1),
    32: AttentionConfig(16, 32, 4, 1),
    64: AttentionConfig(16, 16, 4, 1),
    128: AttentionConfig(16, 16, 4, 1),
}


# ---------------------------------------------------------------------------------------------
# Launchers (inputs already validated by fastvit.ops.flash_attention)
# ---------------------------------------------------------------------------------------------
DELTA_BLOCK_M = 32  # rows per program of the delta pre-pass (memory-bound, 4 warps)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q: (B, H, N, D); k, v: (B, H, M, D); one dtype, unit stride in D.
        scale: softmax scale (> 0).
        causal: top-left aligned causal mask.

    Returns:
        out (B, H, N, D) in q's dtype, laid out as (B, N, H, D) in memory so that
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is free; lse (B, H, N) float32.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    q, k, v = (rows_addressable_in_int32(t) for t in (q, k, v))
    out = new_output((batch, n_q, heads, head_dim), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = new_output((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    pad = head_dim_padded(head_dim)
    cfg = fwd_config(arch_of(q.device), q.dtype, pad)
    grid = (triton.cdiv(n_q, cfg.block_m) * batch * heads,)
    with device_guard(q):
        flash_attention_fwd_kernel[grid](
            q, k, v, out, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            heads, n_q, n_k, scale,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward passes: delta, dK/dV, dQ.

    Args:
        grad_out: (B, H, N, D) gradient of ``out``, any strides (stride 0 from ``out.sum()`` is fine).
        q, k, v, out, lse: the forward's inputs and outputs.

    Returns:
        dq (B, H, N, D), dk, dv (B, H, M, D) in the inputs' dtype.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    q, k, v, grad_out = (rows_addressable_in_int32(t) for t in (q, k, v, grad_out))
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    if n_q == 0:  # no query sees any key: all gradients are zero
        return dq, dk.zero_(), dv.zero_()
    pad = head_dim_padded(head_dim)
    cfg = bwd_config(arch_of(q.device), q.dtype, pad)
    delta = new_output((batch * heads, n_q), dtype=torch.float32, device=q.device)
    precision = _dot_precision(q.dtype)
    with device_guard(q):
        flash_attention_bwd_delta_kernel[(triton.cdiv(n_q, DELTA_BLOCK_M) * batch * heads,)](
            out, grad_out, delta,
            out.stride(0), out.stride(1), out.stride(2),
            *grad_out.stride(),
            heads, n_q,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=DELTA_BLOCK_M,
        )
        flash_attention_bwd_dkdv_kernel[(triton.cdiv(n_k, cfg.block_n) * batch * heads,)](
            q, k, v, grad_out, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *grad_out.stride(),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            heads, n_q, n_k, scale,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            CAUSAL=causal, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        flash_attention_bwd_dq_kernel[(triton.cdiv(n_q, cfg.block_n) * batch * heads,)](
            q, k, v, grad_out, lse, delta, dq,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *grad_out.stride(),
            dq.stride(0), dq.stride(1), dq.stride(2),
            heads, n_q, n_k, scale,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pad, BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_m,
            CAUSAL=causal, DOT_PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every configuration the launchers can pick
# ---------------------------------------------------------------------------------------------
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# One head dim per padded width (16, 32, 64, 128) and 80, the masked representative of the
# non-powers of two (80 and 96 share the 128-wide registers and differ only in a mask constant).
AOT_HEAD_DIMS = (16, 32, 64, 80, 128)
# fp16 and bf16 share every block configuration and compile to the same code but for the
# conversions; to keep the compile check short, fp16 is compiled for the forward only.
_BWD_AOT_DTYPES = (torch.bfloat16, torch.float32)


def _strides(prefix: str, dims: str) -> dict[str, str]:
    return {f"stride_{prefix}{c}": "i32" for c in dims}


def _aligned(signature: dict[str, str]) -> tuple[str, ...]:
    """Pointers and strides, which the runtime specialises as 16-divisible for the usual
    contiguous or packed-qkv layouts (D a multiple of 16); unit strides become constants."""
    return tuple(n for n, ty in signature.items() if ty != "constexpr" and (ty[0] == "*" or n.startswith("stride_")))


def aot_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, head dim, causal, architecture) configuration the launchers use."""
    meta = {name: "constexpr" for name in ("HEAD_DIM", "HEAD_DIM_PAD", "BLOCK_M", "BLOCK_N", "CAUSAL", "DOT_PRECISION")}
    sizes = {"H": "i32", "N": "i32", "M": "i32", "sm_scale": "fp32"}
    specs = []
    for arch in ARCHS:
        for dtype, ty in _TL_DTYPE.items():
            qkv = {"Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}"}
            qkv_strides = {**_strides("q", "bhn"), **_strides("k", "bhn"), **_strides("v", "bhn")}
            do_strides = {**_strides("do", "bhn"), "stride_dod": "constexpr"}  # dO unit-stride in D
            fwd_sig = {**qkv, "Out": f"*{ty}", "Lse": "*fp32", **qkv_strides, **_strides("o", "bhn"), **sizes, **meta}
            dkdv_sig = {**qkv, "dOut": f"*{ty}", "Lse": "*fp32", "Delta": "*fp32", "dK": f"*{ty}", "dV": f"*{ty}",
                        **qkv_strides, **do_strides, **_strides("dk", "bhn"), **_strides("dv", "bhn"), **sizes, **meta}
            dq_sig = {**qkv, "dOut": f"*{ty}", "Lse": "*fp32", "Delta": "*fp32", "dQ": f"*{ty}",
                      **qkv_strides, **do_strides, **_strides("dq", "bhn"), **sizes, **meta}
            delta_sig = {"Out": f"*{ty}", "dOut": f"*{ty}", "Delta": "*fp32", **_strides("o", "bhn"),
                         **_strides("do", "bhnd"), "H": "i32", "N": "i32",
                         "HEAD_DIM": "constexpr", "HEAD_DIM_PAD": "constexpr", "BLOCK_M": "constexpr"}
            for head_dim in AOT_HEAD_DIMS:
                pad = head_dim_padded(head_dim)
                # the delta pre-pass reads dO with any strides (stride 0 included): no alignment
                if dtype in _BWD_AOT_DTYPES:
                    specs.append(KernelSpec(
                        "flash_attention.flash_attention_bwd_delta_kernel", f"{ty} D={head_dim} BM={DELTA_BLOCK_M} w=4",
                        delta_sig, {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "BLOCK_M": DELTA_BLOCK_M}, 4, 1, arch,
                        divisible_by_16=("Out", "Delta", "stride_ob", "stride_oh", "stride_on"),
                    ))
                fwd, bwd = fwd_config(arch, dtype, pad), bwd_config(arch, dtype, pad)
                for causal in (False, True):
                    common = {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": pad, "CAUSAL": causal,
                              "DOT_PRECISION": _dot_precision(dtype)}
                    label = f"{ty} D={head_dim}{' causal' if causal else ''}"
                    # (kernel, signature, config, BLOCK_M, BLOCK_N) as the launchers pass them
                    launches = (
                        ("flash_attention_fwd_kernel", fwd_sig, fwd, fwd.block_m, fwd.block_n),
                        ("flash_attention_bwd_dkdv_kernel", dkdv_sig, bwd, bwd.block_m, bwd.block_n),
                        ("flash_attention_bwd_dq_kernel", dq_sig, bwd, bwd.block_n, bwd.block_m),
                    )
                    for kernel, sig, cfg, block_m, block_n in launches:
                        if kernel != "flash_attention_fwd_kernel" and dtype not in _BWD_AOT_DTYPES:
                            continue
                        constexprs = {**common, "BLOCK_M": block_m, "BLOCK_N": block_n}
                        if "stride_dod" in sig:
                            constexprs["stride_dod"] = 1
                        specs.append(KernelSpec(
                            f"flash_attention.{kernel}",
                            f"{label} BM={block_m} BN={block_n} w={cfg.num_warps} s={cfg.num_stages}",
                            sig, constexprs, cfg.num_warps, cfg.num_stages, arch,
                            needs_wgmma=dtype != torch.float32 and kernel == "flash_attention_fwd_kernel",
                            divisible_by_16=_aligned(sig),
                        ))
    return specs
