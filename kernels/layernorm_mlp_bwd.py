"""Backward of the fused LayerNorm + MLP (``layernorm_mlp.py`` has the forward and the design notes).

With ``h = LN(x)``, ``a = h W1^T + b1``, ``g = gelu(a)``, ``z = g W2^T + b2``,
``y = [x +] s * z`` where ``s[t, d] = ss[b(t)] * ls[d]``, and ``dy`` the incoming gradient:

    u      = dy (ls * W2)                    (T, HD)   } ``_fc2_bwd_kernel``: one plain GEMM, GELU'
    da     = ss * u * gelu'(a)               (T, HD)   } in the epilogue, gelu(a) recomputed
    M2     = (dy * ss)^T g = dy^T (ss * g)   (D, HD)     ``_wgrad_kernel`` (split over tokens)
    dW2    = ls[:, None] * M2                            finished in torch (D x HD, cheap)
    dW1    = da^T LN(x)                      (HD, D)     ``_wgrad_kernel``
    dLN    = da W1                           (T, D)      ``_fc2_kernel`` with no epilogue
    dx     = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat)) [+ dy],  dxh = dLN * w
                                                         ``_ln_bwd_kernel`` (rows in registers)
    db1    = sum_t da;   dw = sum_t dLN * xhat;   db = sum_t dLN;   P = sum_t dy * ss
    db2    = ls * P;     dls = rowsum(W2 * M2) + b2 * P
    dss[b] = sum_{t in b} (rowsum(g * u) + sum_d dy * ls * b2)

Gated (``g = act(a_g) * a_v``): ``da_g = ss * u * a_v * act'(a_g)``, ``da_v = ss * u * act(a_g)``, written
as one (T, 2 HD) dA = [da_g | da_v], so dW1 = dA^T LN(x) and dLN = dA [W_g; W_v] stay single GEMMs
(two separate fc1 weights are stacked once per backward unless they are adjacent rows of one
tensor). RMSNorm: mean = 0 and dx = rstd * (dxh - xhat * mean(dxh * xhat)). Hidden norm (``n = LN_h(g)``
feeds fc2): u = dy (ls W2) is a plain GEMM (the fc2 kernel, fp32 out), then
``_hidden_norm_bwd_kernel`` recomputes g and n, writes ss * n for dW2, dss's row sums n . u, the
norm's dw / db partials, and dA = act'-chain(LN_h backward of ss * u); db1 is dA's column sums (in
torch). No norm (the MLP
alone, a post-norm block's): LN(x) is x, so dW1 = dA^T x (x's rows, a view when they are GEMM-dtype
rows) and the row pass writes dx = dLN [+ dy].

Every GEMM reads plain operand tiles in the GEMM dtype (issue 15: scaling, LayerNorm or dtype
conversion in the operand loads made the sm_90 loops issue-bound, ratios 1.2-2.7): dy as (T, D)
rows (a view of grad_out when it already is one, else one T x D conversion copy: autocast's fp32 dy,
broadcast dy), ``ls * W2`` (D x HD, once per backward), ``ss * g`` written by the dA epilogue, and
LN(x) (T x D in the GEMM dtype) written just before dW1 by the forward's ``_ln_stats_kernel`` in its
SAVED_STATS mode (the saved mean / rstd, no eps: the forward's LN(x) bit for bit). That pass costs
one T x D read of x (x's dtype) and one T x D write in the GEMM dtype; its buffer is allocated after
the fp32 dLN is freed, so the peak transient memory does not rise. (Writing LN(x) from the
LayerNorm-backward row pass instead took its 128 / 512-wide buckets from 3 to 2 CTAs/SM.) The
weight gradients take the token-major P^T operand straight from shared memory (wgmma reads a
transposed 16-bit A there), with no integer division in the loop.

The forward stores neither the fc2 output z nor LN(x) nor gelu(a): the gradients of
the layer scale and the per-sample scale come from M2 and u, which the backward computes anyway.
Every column / row reduction is written as per-program partials and summed in torch afterwards:
deterministic, no atomics. The weight-gradient GEMMs (K = tokens, e.g. 50k) are split over token
ranges when their output has too few tiles to fill the GPU.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .aot import ARCHS, KernelSpec, signature
from .layernorm_mlp import (
    ROW_BUCKETS,
    RowConfig,
    _fc2_kernel,
    _ln_stats_kernel,
    activation_and_grad,
    gemm_config,
    gemm_spec,
    grouped_tile,
    ln_stats_spec,
    row_config,
    token_rows,
)
from .runtime import AOT_DTYPE_NAMES, arch_of, cdiv, device_guard, dot_precision, new_output, sm_count

# Order of the gradients the launcher returns (and of the ``needs`` flags it takes).
GRAD_NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
              "layer_scale", "sample_scale", "fc1_gate_weight", "fc1_gate_bias", "hidden_norm_weight",
              "hidden_norm_bias")


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fc2_bwd_kernel(
    DY,  # (T, D) gradient of y in the GEMM dtype, token rows at stride_dyt, unit stride in D
    W2,  # (D, HD) fc2 weight times the layer scale (ls[:, None] * W2), unit stride in HD
    Pre,  # (T, HD) saved pre-activation a (GATED: (T, 2 HD), [a_gate | a_value]), contiguous
    SS,  # (B,) per-sample scale (HAS_SS)
    DA,  # (T, HD) out: dL/da (GATED: (T, 2 HD), [da_gate | da_value]) in the GEMM dtype, contiguous
    G,  # (T, HD) out: ss * g, g = act(a) (GATED: act(a_gate) * a_value) recomputed, dW2's right
    #     operand (dW2 = dy^T (ss * g)), contiguous (WRITE_G)
    DB1Part,  # (cdiv(T, BLOCK_M), HD or 2 HD) fp32 out: column sums of dA per row block (COMPUTE_DB1)
    DSSPart,  # (T, cdiv(HD, BLOCK_N)) fp32 out: row sums of g * u per column block (COMPUTE_DSS)
    T, N_TOK, D, HD,
    stride_dyt, stride_w2d,
    HAS_SS: tl.constexpr,
    WRITE_G: tl.constexpr, COMPUTE_DB1: tl.constexpr, COMPUTE_DSS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACTIVATION: tl.constexpr = "gelu",  # "gelu" (erf) | "gelu_tanh" | "quick_gelu" | "silu"
    GATED: tl.constexpr = False,  # g = act(a_gate) * a_value
    EVEN_K: tl.constexpr = False,  # D % BLOCK_K == 0: whole K steps, no K masks in the loop
):
    # -- tile order: GROUP_M row blocks walk each column block together (B tiles stay in L2) --
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, HD, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < HD
    # rows past the edge load the last valid one (never stored): no row masks on the A tile
    dy_ptrs = DY + tl.minimum(rows, T - 1).to(tl.int64)[:, None] * stride_dyt + offs_k[None, :]
    w_ptrs = W2 + offs_k[:, None] * stride_w2d + cols[None, :]  # (BLOCK_K, BLOCK_N) tile of ls * W2

    # -- u = dy @ (ls * W2): a plain GEMM (the layer scale is folded into the weight in torch) --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            dz = tl.load(dy_ptrs)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:  # the last step's columns past D load 0 on both sides
            k_ok = offs_k < D - k0
            dz = tl.load(dy_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_w2d

    # -- epilogue: recompute act(a) and act'(a); da = ss * u * act'(a)
    #    (GATED: da_gate = ss * u * a_value * act'(a_gate), da_value = ss * u * act(a_gate)) --
    offs = rows.to(tl.int64)[:, None] * HD + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if GATED:
        pre_offs = rows.to(tl.int64)[:, None] * (2 * HD) + cols[None, :]
        a = tl.load(Pre + pre_offs, mask=mask, other=0.0).to(tl.float32)
        a_v = tl.load(Pre + pre_offs + HD, mask=mask, other=0.0).to(tl.float32)
        s, ds = activation_and_grad(a, ACTIVATION)
        g = (s * a_v).to(DA.dtype.element_ty)  # the g that the forward fed to fc2
    else:
        a = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
        g, dg = activation_and_grad(a, ACTIVATION)
        g = g.to(DA.dtype.element_ty)  # the g that the forward fed to fc2
    if HAS_SS:
        ss = tl.load(SS + rows // N_TOK, mask=row_ok, other=0.0).to(tl.float32)[:, None]  # t = b * N_TOK + n
    if WRITE_G:  # dW2 = (dy * ss)^T g = dy^T (ss * g): the scale rides on the operand written here;
        # the product in the GEMM dtype (an fp32 one kept g live in fp32: 175 registers, not 130)
        tl.store(G + offs, g * ss.to(G.dtype.element_ty) if HAS_SS else g, mask=mask)
    if COMPUTE_DSS:  # sum_j g * u: this column block's share of dL/dss for each row
        part = tl.sum(tl.where(mask, g.to(tl.float32) * acc, 0.0), axis=1)
        tl.store(DSSPart + rows.to(tl.int64) * tl.cdiv(HD, BLOCK_N) + pid_n, part, mask=row_ok)
    if HAS_SS:
        acc *= ss
    if GATED:
        da = (acc * a_v * ds).to(DA.dtype.element_ty)
        da_v = (acc * s).to(DA.dtype.element_ty)
        tl.store(DA + pre_offs, da, mask=mask)
        tl.store(DA + pre_offs + HD, da_v, mask=mask)
        if COMPUTE_DB1:
            part = tl.sum(tl.where(mask, da.to(tl.float32), 0.0), axis=0)
            tl.store(DB1Part + pid_m.to(tl.int64) * (2 * HD) + cols, part, mask=col_ok)
            part = tl.sum(tl.where(mask, da_v.to(tl.float32), 0.0), axis=0)
            tl.store(DB1Part + pid_m.to(tl.int64) * (2 * HD) + HD + cols, part, mask=col_ok)
    else:
        da = (acc * dg).to(DA.dtype.element_ty)
        tl.store(DA + offs, da, mask=mask)
        if COMPUTE_DB1:
            part = tl.sum(tl.where(mask, da.to(tl.float32), 0.0), axis=0)
            tl.store(DB1Part + pid_m.to(tl.int64) * HD + cols, part, mask=col_ok)


@triton.jit
def _hidden_norm_bwd_kernel(
    U,  # (T, HD) fp32: u = dy @ (ls * W2), the gradient of fc2's input before the per-sample scale
    Pre,  # (T, HD) saved pre-activation a (GATED: (T, 2 HD), [a_gate | a_value]), contiguous
    Mean, Rstd,  # (T,) fp32 statistics of the hidden norm (over g's HD columns)
    HNormW, HNormB,  # (HD,) hidden LayerNorm weight and bias (HAS_HNORM_W / HAS_HNORM_B)
    SS,  # (B,) per-sample scale (HAS_SS)
    DA,  # (T, HD) out: dL/da (GATED: (T, 2 HD), [da_gate | da_value]) in the GEMM dtype, contiguous
    NOut,  # (T, HD) out: ss * LN(g), dW2's right operand, in the GEMM dtype, contiguous (WRITE_N)
    DHWPart, DHBPart,  # (num_programs, HD) fp32 out: partial sums of dn * ghat and of dn
    DSSPart,  # (T,) fp32 out: sum_j LN(g) * u per row (COMPUTE_DSS)
    T, N_TOK, HD,
    HAS_HNORM_W: tl.constexpr, HAS_HNORM_B: tl.constexpr, HAS_SS: tl.constexpr,
    WRITE_N: tl.constexpr, COMPUTE_DHW: tl.constexpr, COMPUTE_DHB: tl.constexpr, COMPUTE_DSS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D: HD rounded up to a width in ROW_BUCKETS
    ACTIVATION: tl.constexpr = "gelu",  # "gelu" (erf) | "gelu_tanh" | "quick_gelu" | "silu"
    GATED: tl.constexpr = False,  # g = act(a_gate) * a_value
):
    # The hidden norm's rows (``scale_mlp``: fc2 reads n = LN(g), not g) in registers: recompute g
    # from the saved pre-activation and n from the saved statistics, then dn = ss * u through the
    # LayerNorm backward to dg and through the activation (and gating) to dA.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HD
    if HAS_HNORM_W:
        w = tl.load(HNormW + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_HNORM_B:
        bias = tl.load(HNormB + cols, mask=col_ok, other=0.0).to(tl.float32)
    dhw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dhb = tl.zeros((BLOCK_D,), dtype=tl.float32)

    # each program walks row blocks pid, pid + num_programs, ...: fixed order, deterministic sums
    for blk in range(pid, (T + BLOCK_ROWS - 1) // BLOCK_ROWS, tl.num_programs(0)):
        rows = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * HD + cols[None, :]
        # -- g = act(a) (GATED: act(a_gate) * a_value), rounded as the forward fed it to the norm --
        if GATED:
            pre_offs = rows.to(tl.int64)[:, None] * (2 * HD) + cols[None, :]
            a = tl.load(Pre + pre_offs, mask=mask, other=0.0).to(tl.float32)
            a_v = tl.load(Pre + pre_offs + HD, mask=mask, other=0.0).to(tl.float32)
            s, ds = activation_and_grad(a, ACTIVATION)
            g = (s * a_v).to(DA.dtype.element_ty).to(tl.float32)
        else:
            a = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
            g, dg_da = activation_and_grad(a, ACTIVATION)
            g = g.to(DA.dtype.element_ty).to(tl.float32)
        # -- n = LN(g) from the saved statistics, rounded as fc2 read it --
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        ghat = tl.where(mask, (g - mean[:, None]) * rstd[:, None], 0.0)
        n = ghat
        if HAS_HNORM_W:
            n = n * w[None, :]
        if HAS_HNORM_B:
            n = n + bias[None, :]
        n = n.to(DA.dtype.element_ty)
        u = tl.load(U + offs, mask=mask, other=0.0)
        if COMPUTE_DSS:  # sum_j n * u: the row's share of dL/dss (before the scale itself)
            tl.store(DSSPart + rows, tl.sum(tl.where(mask, n.to(tl.float32) * u, 0.0), axis=1), mask=row_ok)
        if HAS_SS:  # dn = ss * u; dW2 = dy^T (ss * n): the scale rides on the operand written here
            ss = tl.load(SS + rows // N_TOK, mask=row_ok, other=0.0).to(tl.float32)  # t = b * N_TOK + n
            u = u * ss[:, None]
            if WRITE_N:
                tl.store(NOut + offs, n * ss.to(NOut.dtype.element_ty)[:, None], mask=mask)
        elif WRITE_N:
            tl.store(NOut + offs, n, mask=mask)
        if COMPUTE_DHW:
            dhw += tl.sum(u * ghat, axis=0)
        if COMPUTE_DHB:
            dhb += tl.sum(u, axis=0)
        # -- LayerNorm backward over HD: dg = rstd * (dgh - mean(dgh) - ghat * mean(dgh * ghat)) --
        dgh = u * w[None, :] if HAS_HNORM_W else u
        c1 = tl.sum(dgh * ghat, axis=1) / HD
        c0 = tl.sum(dgh, axis=1) / HD
        dg = (dgh - ghat * c1[:, None] - c0[:, None]) * rstd[:, None]
        # -- through the activation (GATED: da_gate = dg * a_value * act'(a_gate), da_value = dg * act(a_gate)) --
        if GATED:
            tl.store(DA + pre_offs, (dg * a_v * ds).to(DA.dtype.element_ty), mask=mask)
            tl.store(DA + pre_offs + HD, (dg * s).to(DA.dtype.element_ty), mask=mask)
        else:
            tl.store(DA + offs, (dg * dg_da).to(DA.dtype.element_ty), mask=mask)

    part = pid.to(tl.int64) * HD + cols
    if COMPUTE_DHW:
        tl.store(DHWPart + part, dhw, mask=col_ok)
    if COMPUTE_DHB:
        tl.store(DHBPart + part, dhb, mask=col_ok)


@triton.jit
def _wgrad_kernel(
    P,  # (T, M) left operand rows in the GEMM dtype, unit stride in M: dy (dW2) or dA (dW1)
    Q,  # (T, N) right operand rows in the GEMM dtype, unit stride in N: ss * g (dW2) or LN(x) (dW1)
    Out,  # (SPLIT_K, M, N) fp32 out: sums over each split's token rows of P[t, m] * Q[t, n]
    T, M, N,
    rows_per_split,  # token rows per split, a multiple of BLOCK_K
    stride_pt, stride_qt,  # token row strides of P and Q
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A plain GEMM over token rows: both operands are tiles of (T, .) row-major buffers, so the
    # P^T tile is read M-major straight into shared memory (wgmma takes a transposed 16-bit A from
    # shared memory); nothing is scaled, normalised or converted on load, no integer division.
    # -- tile order: GROUP_M row blocks walk each column block together (B tiles stay in L2) --
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    t_lo = split * rows_per_split
    t_hi = tl.minimum(t_lo + rows_per_split, T)
    ts = (t_lo + offs_k).to(tl.int64)
    p_ptrs = P + ts[:, None] * stride_pt + offs_m[None, :]  # (BLOCK_K, BLOCK_M) tile of P
    q_ptrs = Q + ts[:, None] * stride_qt + offs_n[None, :]  # (BLOCK_K, BLOCK_N) tile of Q

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_K):
        # token rows past the split load 0 on both sides (the mask costs ~40 instructions a step on
        # sm_90; peeling the last step out of the loop saved them but took 174 registers in the
        # fp32 config on sm_80, against 148 with the mask here)
        t_ok = offs_k < t_hi - t0
        p = tl.load(p_ptrs, mask=t_ok[:, None] & m_ok[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=DOT_PRECISION)
        p_ptrs += BLOCK_K * stride_pt
        q_ptrs += BLOCK_K * stride_qt

    out_ptrs = Out + split.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _ln_bwd_kernel(
    DLN,  # (T, D) fp32 gradient of LN(x), contiguous (COMPUTE_DX / COMPUTE_DNW / COMPUTE_DNB)
    X,  # (B, N_TOK, D) tokens, unit stride in D
    Mean, Rstd,  # (T,) fp32 row statistics of X
    NormW,  # (D,) LayerNorm weight (HAS_NORM_W)
    DY,  # (B, N_TOK, D) gradient of y, any strides (0 where broadcast)
    SS,  # (B,) per-sample scale (HAS_SS)
    LS,  # (D,) layer scale (HAS_LS)
    B2,  # (D,) fc2 bias (COMPUTE_ROWTERM)
    DX,  # (T, D) out: dL/dx in x's dtype, contiguous (COMPUTE_DX)
    DNWPart, DNBPart,  # (num_programs, D) fp32 out: partial sums of dLN * xhat and of dLN
    DPPart,  # (num_programs, D) fp32 out: partial sums of dy * ss (COMPUTE_DP)
    RowTerm,  # (T,) fp32 out: sum_d dy * ls * b2 per row (COMPUTE_ROWTERM)
    T, N_TOK, D,
    stride_xb, stride_xn, stride_dyb, stride_dyn, stride_dyd,
    HAS_NORM_W: tl.constexpr, HAS_SS: tl.constexpr, HAS_LS: tl.constexpr, RESIDUAL: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DNW: tl.constexpr, COMPUTE_DNB: tl.constexpr,
    COMPUTE_DP: tl.constexpr, COMPUTE_ROWTERM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    RMS: tl.constexpr = False,  # RMSNorm (Mean holds zeros): no mean(dxh) term
    NO_NORM: tl.constexpr = False,  # the MLP alone: dx = dLN [+ dy] (X, Mean, Rstd, NormW unused)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_NORM_W:
        w = tl.load(NormW + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_LS:
        ls = tl.load(LS + cols, mask=col_ok, other=0.0).to(tl.float32)
    if COMPUTE_ROWTERM:
        b2 = tl.load(B2 + cols, mask=col_ok, other=0.0).to(tl.float32)
    dnw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dnb = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dp = tl.zeros((BLOCK_D,), dtype=tl.float32)

    # each program walks row blocks pid, pid + num_programs, ...: fixed order, deterministic sums
    for blk in range(pid, (T + BLOCK_ROWS - 1) // BLOCK_ROWS, tl.num_programs(0)):
        rows = blk * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < T
        mask = row_ok[:, None] & col_ok[None, :]
        b = rows // N_TOK  # token row t = b * N_TOK + n; int64 offsets
        n = (rows - b * N_TOK).to(tl.int64)
        dy_ptrs = DY + (b.to(tl.int64) * stride_dyb + n * stride_dyn)[:, None] + cols[None, :] * stride_dyd
        if (COMPUTE_DX and RESIDUAL) or COMPUTE_DP or COMPUTE_ROWTERM:
            dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
        if NO_NORM and COMPUTE_DX:
            dx = tl.load(DLN + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            if RESIDUAL:
                dx += dy
            tl.store(DX + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        elif COMPUTE_DX or COMPUTE_DNW or COMPUTE_DNB:
            dln = tl.load(DLN + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            x_ptrs = X + (b.to(tl.int64) * stride_xb + n * stride_xn)[:, None] + cols[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if COMPUTE_DNW:
                dnw += tl.sum(dln * xhat, axis=0)
            if COMPUTE_DNB:
                dnb += tl.sum(dln, axis=0)
            if COMPUTE_DX:
                # LayerNorm backward: dx = rstd * (dxh - mean(dxh) - xhat * mean(dxh * xhat));
                # RMSNorm's has no mean(dxh) term
                dxh = dln * w[None, :] if HAS_NORM_W else dln
                c1 = tl.sum(dxh * xhat, axis=1) / D
                dx = dxh - xhat * c1[:, None]
                if not RMS:
                    dx -= (tl.sum(dxh, axis=1) / D)[:, None]
                dx = dx * rstd[:, None]
                if RESIDUAL:
                    dx += dy
                tl.store(DX + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DP:
            if HAS_SS:
                ss = tl.load(SS + b, mask=row_ok, other=0.0).to(tl.float32)
                dp += tl.sum(dy * ss[:, None], axis=0)
            else:
                dp += tl.sum(dy, axis=0)
        if COMPUTE_ROWTERM:
            scale = ls * b2 if HAS_LS else b2
            tl.store(RowTerm + rows, tl.sum(dy * scale[None, :], axis=1), mask=row_ok)

    part = pid.to(tl.int64) * D + cols
    if COMPUTE_DNW:
        tl.store(DNWPart + part, dnw, mask=col_ok)
    if COMPUTE_DNB:
        tl.store(DNBPart + part, dnb, mask=col_ok)
    if COMPUTE_DP:
        tl.store(DPPart + part, dp, mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launcher (inputs already validated by fastvit.ops.layernorm_mlp)
# ---------------------------------------------------------------------------------------------
def wgrad_splits(tiles: int, rows: int, block_k: int, sms: int, max_splits: int = 8) -> int:
    """How many token ranges a weight-gradient GEMM with ``tiles`` output tiles is split into.

    The smallest split count whose last wave is at least 85% full (wave quantisation), keeping
    at least 8 K-steps per split; 1 when the output alone fills the GPU.
    """
    best, best_eff = 1, 0.0
    for s in range(1, max_splits + 1):
        if s > 1 and rows < s * 8 * block_k:
            break
        programs = tiles * s
        eff = programs / (cdiv(programs, sms) * sms)
        if eff >= 0.85:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def _wgrad(p: torch.Tensor, q: torch.Tensor, splits: int | None) -> torch.Tensor:
    """sum over token rows of P^T Q as (M, N) fp32 (see ``_wgrad_kernel``): p (T, M), q (T, N),
    both in the GEMM dtype with a unit stride in their last dim."""
    rows, m = p.shape
    n = q.shape[1]
    arch = arch_of(p.device)
    cfg = gemm_config(arch, p.dtype, "wgrad")
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    if splits is None:
        splits = wgrad_splits(tiles, rows, cfg.block_k, sm_count(p.device))
    rows_per_split = cdiv(cdiv(rows, splits), cfg.block_k) * cfg.block_k
    splits = cdiv(rows, rows_per_split)
    out = new_output((splits, m, n), dtype=torch.float32, device=p.device)
    _wgrad_kernel[(tiles, splits)](
        p, q, out, rows, m, n, rows_per_split, p.stride(0), q.stride(0),
        DOT_PRECISION=dot_precision(p.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out[0] if splits == 1 else out.sum(0)


def _stacked(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """[top; bottom] of two (H, D) weights: a view when ``bottom`` follows ``top`` in memory (the
    halves of one packed weight), else a copy (2 H x D elements, once per backward: separate
    gate_proj / up_proj Linears)."""
    h, d = top.shape
    if (top.stride() == bottom.stride() and top.stride(1) == 1 and top.stride(0) >= d
            and bottom.untyped_storage().data_ptr() == top.untyped_storage().data_ptr()
            and bottom.storage_offset() == top.storage_offset() + h * top.stride(0)):
        return top.as_strided((2 * h, d), top.stride())
    return torch.cat((top, bottom))


def hidden_norm_row_config(hidden: int) -> RowConfig:
    """Rows per program and warps of ``_hidden_norm_bwd_kernel`` for hidden width HD: the row
    kernels' buckets, with 8 warps up to 1024 columns. On 4 warps each thread held 16 values of each
    of its ~12 fp32 row tensors: 230-244 registers on sm_80 / 89, 2 CTAs (8 warps) per SM; on 8,
    128 registers, 2 CTAs (16 warps) per SM on sm_80 / 89 / 90 (static figures, Triton 3.8,
    2026-12-06; UNMEASURED on a GPU)."""
    rc = row_config(hidden)
    return dataclasses.replace(rc, num_warps=8) if rc.num_warps < 8 else rc


def _hidden_norm_da(
    dy_rows: torch.Tensor, w2: torch.Tensor, preact: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    hidden_norm_weight: torch.Tensor | None, hidden_norm_bias: torch.Tensor | None,
    sample_scale: torch.Tensor | None, grads: dict[str, torch.Tensor], need: dict[str, bool], n_tok: int,
    activation: str, gated: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Step 1 of the backward with a hidden norm (fc2 reads LN(g)): u = dy @ (ls * W2) as a plain
    GEMM (``_fc2_kernel``, fp32 out: the LayerNorm backward needs row sums of u), then one row pass
    (``_hidden_norm_bwd_kernel``) through the norm and the activation. Writes the hidden norm's
    gradients into ``grads``; returns (dA, ss * LN(g) or None, db1 as a (1, fc1 rows) partial or
    None, the (T, 1) dss partial or None), as the plain dA GEMM's launch gives them.

    The price of the norm: u's T x HD fp32 write and read, which the plain path keeps in registers."""
    rows, dim = dy_rows.shape
    hidden = w2.shape[1]
    device, gemm_dtype = dy_rows.device, dy_rows.dtype
    arch = arch_of(device)
    need_m2 = need["fc2_weight"] or need["layer_scale"]
    if dy_rows.stride(0) != dim:  # the fc2 kernel reads its A operand at row stride K
        dy_rows = dy_rows.contiguous()
    u = new_output((rows, hidden), dtype=torch.float32, device=device)
    c2 = gemm_config(arch, gemm_dtype, "fc2")
    _fc2_kernel[(cdiv(rows, c2.block_m) * cdiv(hidden, c2.block_n),)](
        dy_rows, w2, None, None, None, None, u,
        rows, n_tok, hidden, dim, w2.stride(0), w2.stride(1), 0, 0,
        HAS_BIAS=False, HAS_LS=False, HAS_SS=False, RESIDUAL=False, DOT_PRECISION=dot_precision(gemm_dtype),
        BLOCK_M=c2.block_m, BLOCK_N=c2.block_n, BLOCK_K=c2.block_k, GROUP_M=c2.group_m,
        num_warps=c2.num_warps, num_stages=c2.num_stages,
    )
    rc = hidden_norm_row_config(hidden)
    programs = min(cdiv(rows, rc.block_rows), 4 * sm_count(device))
    da = new_output((rows, preact.shape[1]), dtype=gemm_dtype, device=device)
    n_out = new_output((rows, hidden), dtype=gemm_dtype, device=device) if need_m2 else None
    dhw_part, dhb_part = (
        new_output((programs, hidden), dtype=torch.float32, device=device) if need[k] else None
        for k in ("hidden_norm_weight", "hidden_norm_bias")
    )
    dss_part = new_output((rows, 1), dtype=torch.float32, device=device) if need["sample_scale"] else None
    _hidden_norm_bwd_kernel[(programs,)](
        u, preact, mean, rstd, hidden_norm_weight, hidden_norm_bias, sample_scale, da, n_out,
        dhw_part, dhb_part, dss_part, rows, n_tok, hidden,
        HAS_HNORM_W=hidden_norm_weight is not None, HAS_HNORM_B=hidden_norm_bias is not None,
        HAS_SS=sample_scale is not None, WRITE_N=need_m2, COMPUTE_DHW=need["hidden_norm_weight"],
        COMPUTE_DHB=need["hidden_norm_bias"], COMPUTE_DSS=need["sample_scale"],
        BLOCK_ROWS=rc.block_rows, BLOCK_D=rc.block_d, ACTIVATION=activation, GATED=gated,
        num_warps=rc.num_warps,
    )
    del u
    if need["hidden_norm_weight"]:
        grads["hidden_norm_weight"] = dhw_part.sum(0).to(hidden_norm_weight.dtype)
    if need["hidden_norm_bias"]:
        grads["hidden_norm_bias"] = dhb_part.sum(0).to(hidden_norm_bias.dtype)
    db1_part = None
    if need["fc1_bias"] or need["fc1_gate_bias"]:  # column sums of the rounded dA, accumulated in fp32
        db1_part = da.sum(0, keepdim=True, dtype=torch.float32)
    return da, n_out, db1_part, dss_part


def layernorm_mlp_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    preact: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    activation: str,
    residual: bool,
    needs: tuple[bool, ...],
    rms: bool = False,
    gated: bool = False,
    fc1_gate_weight: torch.Tensor | None = None,
    fc1_gate_bias: torch.Tensor | None = None,
    wgrad_split: int | None = None,
    no_norm: bool = False,
    hidden_norm: bool = False,
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """Launch the backward and finish the small reductions in torch.

    Args:
        grad_out: (B, N, D) gradient of y, any strides (stride 0 from ``y.sum()`` is fine).
        x, norm_weight, ..., sample_scale, fc1_gate_weight, fc1_gate_bias: the forward's inputs
            (x (B, N, D), unit stride in D; see ``layernorm_mlp_fwd`` for the gated layouts).
        preact: (B*N, HD) saved pre-activation (gated: (B*N, 2 HD'), [a_gate | a_value]);
            mean, rstd: fp32 saved statistics, the input norm's B*N rows (``no_norm``: none), then
            (``hidden_norm``) the hidden norm's B*N rows.
        activation, rms, gated, no_norm, hidden_norm, hidden_norm_weight, hidden_norm_bias: as in
            the forward.
        needs: one flag per entry of ``GRAD_NAMES`` (fewer: the last ones not needed);
            gradients not needed (or of None inputs) come back as None and their GEMMs /
            reductions are skipped.
        wgrad_split: force the token-split count of the weight-gradient GEMMs (tests).

    Returns:
        The gradients in ``GRAD_NAMES`` order, each in its input's dtype and shape, or None.
    """
    inputs = (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
              fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias)
    needs = tuple(needs) + (False,) * (len(GRAD_NAMES) - len(needs))
    need = {k: bool(flag) and t is not None for k, flag, t in zip(GRAD_NAMES, needs, inputs, strict=True)}
    batch, n_tok, dim = x.shape
    split_fc1 = gated and fc1_gate_weight is not None  # two fc1 weights: gate and value
    hidden = fc2_weight.shape[1]  # g's width (gated: each half's)
    fc1_rows = 2 * hidden if gated else hidden  # dA's width: [gate | value] when gated
    rows = batch * n_tok
    device, gemm_dtype = x.device, fc1_weight.dtype
    grads: dict[str, torch.Tensor] = {}
    if rows == 0:  # no tokens: parameter gradients are zeros, x's is empty
        return [torch.zeros_like(t) if need[k] else None for k, t in zip(GRAD_NAMES, inputs, strict=True)]
    # Triton launches on the current device, which need not hold x (model.to('cuda:1'))
    with device_guard(x):
        arch = arch_of(device)
        precision = dot_precision(gemm_dtype)
        dy_strides = grad_out.stride()

        # -- 0. the GEMM operands: dy as (T, D) rows in the GEMM dtype (a view when grad_out already
        #    is one; else one conversion copy, T x D in the GEMM dtype: autocast's fp32 dy, broadcast
        #    or strided dy), and ls * W2, so that the dA GEMM and dW2 load plain tiles --
        dy_rows = grad_out.reshape(rows, dim) if grad_out.dtype == gemm_dtype else None
        if dy_rows is None or dy_rows.stride(1) != 1 or dy_rows.stride(0) < dim:
            dy_rows = new_output((rows, dim), dtype=gemm_dtype, device=device)
            dy_rows.view(batch, n_tok, dim).copy_(grad_out)
        w2 = fc2_weight
        if layer_scale is not None:  # u = (dy * ls) @ W2 = dy @ (ls * W2): D x HD, once per backward
            w2 = (fc2_weight.float() * layer_scale.float()[:, None]).to(gemm_dtype)

        # -- 1. dA = ss * (dy @ (ls * W2)) * gelu'(a); ss * gelu(a); db1 and dss partials --
        need_m2 = need["fc2_weight"] or need["layer_scale"]
        need_dss = need["sample_scale"]
        need_db1 = need["fc1_bias"] or need["fc1_gate_bias"]
        if hidden_norm:
            da, g, db1_part, dss_part = _hidden_norm_da(
                dy_rows, w2, preact, mean[(0 if no_norm else rows):], rstd[(0 if no_norm else rows):],
                hidden_norm_weight, hidden_norm_bias, sample_scale, grads, need, n_tok, activation, gated,
            )
        else:
            cfg = gemm_config(arch, gemm_dtype, "fc2_bwd", gated, activation)
            num_m, num_n = cdiv(rows, cfg.block_m), cdiv(hidden, cfg.block_n)
            da = new_output((rows, fc1_rows), dtype=gemm_dtype, device=device)
            g = new_output((rows, hidden), dtype=gemm_dtype, device=device) if need_m2 else None
            db1_part = new_output((num_m, fc1_rows), dtype=torch.float32, device=device) if need_db1 else None
            dss_part = new_output((rows, num_n), dtype=torch.float32, device=device) if need_dss else None
            _fc2_bwd_kernel[(num_m * num_n,)](
                dy_rows, w2, preact, sample_scale, da, g, db1_part, dss_part,
                rows, n_tok, dim, hidden, dy_rows.stride(0), w2.stride(0),
                HAS_SS=sample_scale is not None,
                WRITE_G=need_m2, COMPUTE_DB1=need_db1, COMPUTE_DSS=need_dss, DOT_PRECISION=precision,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                ACTIVATION=activation, GATED=gated, EVEN_K=dim % cfg.block_k == 0,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        del w2
        if need_db1:
            db1 = db1_part.sum(0)  # gated: [gate | value]
            if split_fc1:  # separate tensors (a custom op's outputs may not alias each other)
                if need["fc1_gate_bias"]:
                    grads["fc1_gate_bias"] = db1[:hidden].to(fc1_gate_bias.dtype, copy=True)
                if need["fc1_bias"]:
                    grads["fc1_bias"] = db1[hidden:].to(fc1_bias.dtype, copy=True)
            else:
                grads["fc1_bias"] = db1.to(fc1_bias.dtype)

        # -- 2. M2 = (dy * ss)^T g = dy^T (ss * g)  ->  dW2 = ls * M2 (and dls below) --
        m2 = None
        if need_m2:
            m2 = _wgrad(dy_rows, g, wgrad_split)
            del g
            if need["fc2_weight"]:
                w2_grad = m2 * layer_scale.float()[:, None] if layer_scale is not None else m2
                grads["fc2_weight"] = w2_grad.to(fc2_weight.dtype)
        del dy_rows

        # -- 3. dLN = dA @ W1 (fp32; gated: W1 = [W_gate; W_value]) --
        need_dln = need["x"] or need["norm_weight"] or need["norm_bias"]
        dln = None
        if need_dln:
            w1 = fc1_weight
            if split_fc1:
                w1 = _stacked(fc1_gate_weight, fc1_weight)
            dln = new_output((rows, dim), dtype=torch.float32, device=device)
            c2 = gemm_config(arch, gemm_dtype, "fc2")
            _fc2_kernel[(cdiv(rows, c2.block_m) * cdiv(dim, c2.block_n),)](
                da, w1, None, None, None, None, dln,
                rows, n_tok, dim, fc1_rows, w1.stride(0), w1.stride(1), 0, 0,
                HAS_BIAS=False, HAS_LS=False, HAS_SS=False, RESIDUAL=False, DOT_PRECISION=precision,
                BLOCK_M=c2.block_m, BLOCK_N=c2.block_n, BLOCK_K=c2.block_k, GROUP_M=c2.group_m,
                num_warps=c2.num_warps, num_stages=c2.num_stages,
            )

        # -- 4. row pass: dx (LN backward + residual), dw / db / P partials, dss row term --
        need_dp = need["fc2_bias"] or need["layer_scale"]
        need_rowterm = need_dss and fc2_bias is not None
        if need_dln or need_dp or need_rowterm:
            rc = row_config(dim)
            programs = min(cdiv(rows, rc.block_rows), 4 * sm_count(device))
            dx = new_output((batch, n_tok, dim), dtype=x.dtype, device=device) if need["x"] else None
            dnw_part = new_output((programs, dim), dtype=torch.float32, device=device) if need["norm_weight"] else None
            dnb_part = new_output((programs, dim), dtype=torch.float32, device=device) if need["norm_bias"] else None
            dp_part = new_output((programs, dim), dtype=torch.float32, device=device) if need_dp else None
            rowterm = new_output((rows,), dtype=torch.float32, device=device) if need_rowterm else None
            _ln_bwd_kernel[(programs,)](
                dln, x, mean, rstd, norm_weight, grad_out, sample_scale, layer_scale, fc2_bias,
                dx, dnw_part, dnb_part, dp_part, rowterm,
                rows, n_tok, dim, x.stride(0), x.stride(1), *dy_strides,
                HAS_NORM_W=norm_weight is not None, HAS_SS=sample_scale is not None, HAS_LS=layer_scale is not None,
                RESIDUAL=residual, COMPUTE_DX=need["x"], COMPUTE_DNW=need["norm_weight"],
                COMPUTE_DNB=need["norm_bias"], COMPUTE_DP=need_dp, COMPUTE_ROWTERM=need_rowterm,
                BLOCK_ROWS=rc.block_rows, BLOCK_D=rc.block_d, RMS=rms, NO_NORM=no_norm, num_warps=rc.num_warps,
            )
            del dln
            if need["x"]:
                grads["x"] = dx
            if need["norm_weight"]:
                grads["norm_weight"] = dnw_part.sum(0).to(norm_weight.dtype)
            if need["norm_bias"]:
                grads["norm_bias"] = dnb_part.sum(0).to(norm_bias.dtype)
            if need_dp:
                p_sum = dp_part.sum(0)  # sum_t dy * ss
                if need["fc2_bias"]:
                    b2_grad = p_sum * layer_scale.float() if layer_scale is not None else p_sum
                    grads["fc2_bias"] = b2_grad.to(fc2_bias.dtype)
                if need["layer_scale"]:
                    ls_grad = (fc2_weight.float() * m2).sum(1)
                    if fc2_bias is not None:
                        ls_grad += fc2_bias.float() * p_sum
                    grads["layer_scale"] = ls_grad.to(layer_scale.dtype)
        if need_dss:
            per_row = dss_part.sum(1)
            if need_rowterm:
                per_row += rowterm
            grads["sample_scale"] = per_row.view(batch, n_tok).sum(1).to(sample_scale.dtype)

        # -- 5. LN(x) in the GEMM dtype from the saved statistics (the forward's statistics kernel in
        #    its SAVED_STATS mode: the same LN(x) as the forward's, bit for bit; one T x D read of x
        #    and one T x D write, allocated after dLN is freed); then dW1 = dA^T LN(x)
        #    (gated: [dW_gate; dW_value], one GEMM, or the half needed) --
        ln_rows = None
        if (need["fc1_weight"] or need["fc1_gate_weight"]) and no_norm:  # x's rows themselves
            ln_rows = token_rows(x, gemm_dtype)
        elif need["fc1_weight"] or need["fc1_gate_weight"]:
            ln_rows = new_output((rows, dim), dtype=gemm_dtype, device=device)
            rc = row_config(dim)
            _ln_stats_kernel[(cdiv(rows, rc.block_rows),)](
                x, mean, rstd, ln_rows, norm_weight, norm_bias, rows, n_tok, dim, x.stride(0), x.stride(1), 0.0,
                BLOCK_ROWS=rc.block_rows, BLOCK_D=rc.block_d, WRITE_XHAT=True, SAVED_STATS=True,
                HAS_NORM_W=norm_weight is not None, HAS_NORM_B=norm_bias is not None, num_warps=rc.num_warps,
            )
        if split_fc1 and need["fc1_weight"] != need["fc1_gate_weight"]:
            first = 0 if need["fc1_gate_weight"] else hidden
            name = "fc1_gate_weight" if need["fc1_gate_weight"] else "fc1_weight"
            grads[name] = _wgrad(da[:, first:first + hidden], ln_rows, wgrad_split).to(fc1_weight.dtype)
        elif need["fc1_weight"]:
            dw1 = _wgrad(da, ln_rows, wgrad_split)
            if split_fc1:  # separate tensors (a custom op's outputs may not alias each other)
                grads["fc1_gate_weight"] = dw1[:hidden].to(fc1_gate_weight.dtype, copy=True)
                grads["fc1_weight"] = dw1[hidden:].to(fc1_weight.dtype, copy=True)
            else:
                grads["fc1_weight"] = dw1.to(fc1_weight.dtype)
    return [grads.get(k) for k in GRAD_NAMES]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs: every configuration the backward launcher can pick
# ---------------------------------------------------------------------------------------------
def backward_specs(arch: int, dtype: torch.dtype, x_dtype: torch.dtype, *, with_gemms: bool = True) -> list[KernelSpec]:
    """The backward GEMM configurations for one GEMM dtype (x and dy in ``x_dtype``).

    Only the dA GEMM's epilogue reads an input in x's dtype (the per-sample scale): dy reaches
    the GEMMs as (T, D) rows in the GEMM dtype and LN(x) is written in it by its own row pass, so the
    weight gradients and dLN are the same code for any x dtype (``with_gemms=False``: only dA)."""
    ty, xty = AOT_DTYPE_NAMES[dtype], AOT_DTYPE_NAMES[x_dtype]
    label = f"{ty}" if dtype == x_dtype else f"{ty} (x {xty}, autocast)"
    specs = []
    # the dA GEMM: the erf GELU (the heaviest plain epilogue); gated with the tanh GELU (the heaviest
    # gated one) and, where the tiles differ (Hopper 16-bit), gated with the erf GELU (the heaviest of
    # the others: SwiGLU's SiLU takes as many registers or fewer)
    variants = [(False, "gelu")]
    if with_gemms:
        variants.append((True, "gelu_tanh"))
        if gemm_config(arch, dtype, "fc2_bwd", True, "gelu") != gemm_config(arch, dtype, "fc2_bwd", True, "gelu_tanh"):
            variants.append((True, "gelu"))
    for gated, activation in variants:
        cfg = gemm_config(arch, dtype, "fc2_bwd", gated, activation)
        spec = gemm_spec(
            "layernorm_mlp_bwd._fc2_bwd_kernel", _fc2_bwd_kernel,
            f"fc2 bwd (dA) {f'gated {activation} ' if gated else ''}{label}",
            {"DY": f"*{ty}", "W2": f"*{ty}", "Pre": f"*{ty}", "SS": f"*{xty}", "DA": f"*{ty}",
             "G": f"*{ty}", "DB1Part": "*fp32", "DSSPart": "*fp32"},
            {"HAS_SS": True, "WRITE_G": True, "COMPUTE_DB1": True, "COMPUTE_DSS": True,
             "EVEN_K": True,  # ViT widths are multiples of BLOCK_K
             "GATED": gated, "ACTIVATION": activation},
            cfg, arch, dtype,
            ("DY", "W2", "Pre", "SS", "DA", "G", "DB1Part", "DSSPart", "D", "HD", "stride_dyt", "stride_w2d"),
        )
        if arch == 90 and dtype != torch.float32 and cfg.num_warps == 4:  # one's epilogue overlaps another's loop
            spec = dataclasses.replace(spec, target_ctas_per_sm=2)
        specs.append(spec)
    if not with_gemms:
        return specs
    cfg = gemm_config(arch, dtype, "wgrad")
    # dW2 (P = dy, Q = ss * g) and dW1 (P = dA, Q = LN(x)) run the same code: one spec
    specs.append(gemm_spec(
        "layernorm_mlp_bwd._wgrad_kernel", _wgrad_kernel, f"wgrad dW1 dW2 {label}",
        {"P": f"*{ty}", "Q": f"*{ty}", "Out": "*fp32"}, {},
        cfg, arch, dtype, ("P", "Q", "Out", "M", "N", "rows_per_split", "stride_pt", "stride_qt"),
    ))
    cfg = gemm_config(arch, dtype, "fc2")
    specs.append(gemm_spec(  # dLN = dA @ W1: the fc2 kernel with no epilogue, fp32 out
        "layernorm_mlp._fc2_kernel", _fc2_kernel, f"dLN {label}",
        {"A": f"*{ty}", "W": f"*{ty}", "Bias": "constexpr", "X": "constexpr", "LS": "constexpr",
         "SS": "constexpr", "Y": "*fp32", "stride_wn": "constexpr"},
        {"Bias": None, "X": None, "LS": None, "SS": None, "stride_wn": 1, "HAS_BIAS": False, "HAS_LS": False,
         "HAS_SS": False, "RESIDUAL": False},
        cfg, arch, dtype, ("A", "W", "Y", "N_OUT", "K", "stride_wk"),
    ))
    return specs


def ln_bwd_spec(arch: int, rc: RowConfig) -> KernelSpec:
    """The LayerNorm-backward row kernel for one width bucket (bf16 x and dy, every output on)."""
    sig = signature(_ln_bwd_kernel, {
        "DLN": "*fp32", "X": "*bf16", "Mean": "*fp32", "Rstd": "*fp32", "NormW": "*bf16", "DY": "*bf16", "SS": "*bf16",
        "LS": "*bf16", "B2": "*bf16", "DX": "*bf16", "DNWPart": "*fp32", "DNBPart": "*fp32", "DPPart": "*fp32",
        "RowTerm": "*fp32", "stride_dyd": "constexpr"})  # fmt: skip
    flags = {"HAS_NORM_W": True, "HAS_SS": True, "HAS_LS": True, "RESIDUAL": True, "COMPUTE_DX": True,
             "COMPUTE_DNW": True, "COMPUTE_DNB": True, "COMPUTE_DP": True, "COMPUTE_ROWTERM": True,
             "BLOCK_ROWS": rc.block_rows, "BLOCK_D": rc.block_d}
    return KernelSpec(
        "layernorm_mlp_bwd._ln_bwd_kernel", f"ln bwd bf16 BLOCK_D={rc.block_d} rows={rc.block_rows} w={rc.num_warps}",
        sig, {"stride_dyd": 1, **flags}, rc.num_warps, 1, arch,
        divisible_by_16=("DLN", "X", "Mean", "Rstd", "NormW", "DY", "SS", "LS", "B2", "DX", "DNWPart", "DNBPart",
                         "DPPart", "RowTerm", "stride_xb", "stride_xn", "stride_dyb", "stride_dyn"),
    )


def hidden_norm_bwd_spec(arch: int, rc: RowConfig) -> KernelSpec:
    """The hidden-norm backward row kernel for one width bucket of the hidden size: bf16, gated with
    the tanh GELU (two pre-activation halves and the heaviest activation), every output on."""
    sig = signature(_hidden_norm_bwd_kernel, {
        "U": "*fp32", "Pre": "*bf16", "Mean": "*fp32", "Rstd": "*fp32", "HNormW": "*bf16", "HNormB": "*bf16",
        "SS": "*bf16", "DA": "*bf16", "NOut": "*bf16", "DHWPart": "*fp32", "DHBPart": "*fp32", "DSSPart": "*fp32"})
    flags = {"HAS_HNORM_W": True, "HAS_HNORM_B": True, "HAS_SS": True, "WRITE_N": True, "COMPUTE_DHW": True,
             "COMPUTE_DHB": True, "COMPUTE_DSS": True, "GATED": True, "ACTIVATION": "gelu_tanh",
             "BLOCK_ROWS": rc.block_rows, "BLOCK_D": rc.block_d}
    return KernelSpec(
        "layernorm_mlp_bwd._hidden_norm_bwd_kernel",
        f"hidden norm bwd gated gelu_tanh bf16 BLOCK_D={rc.block_d} rows={rc.block_rows} w={rc.num_warps}",
        sig, flags, rc.num_warps, 1, arch,
        divisible_by_16=("U", "Pre", "Mean", "Rstd", "HNormW", "HNormB", "SS", "DA", "NOut", "DHWPart", "DHBPart",
                         "DSSPart", "HD"),
    )


def aot_specs() -> list[KernelSpec]:
    """Every backward (kernel, GEMM dtype, row width bucket, architecture) configuration the
    launcher uses: bf16 and fp32 GEMMs, the bf16 dA GEMM beside an fp32 x and dy (autocast with
    timm's fp32 residual stream; its epilogue reads the per-sample scale in x's dtype; the other
    GEMMs see only GEMM-dtype operands, so only their bf16 ones), and, for each width bucket (bf16),
    the LayerNorm-backward row kernel, the statistics kernel's SAVED_STATS pass (LN(x) for dW1) and
    the hidden-norm backward row kernel (``scale_mlp``; the forward's hidden norm is the statistics
    kernel's forward spec, and the backward's u GEMM the dLN spec: the same code).
    As for the forward, fp16 compiles to the bf16 code but for conversions and is left out; each
    spec is the heaviest variant."""
    specs = []
    for arch in ARCHS:
        for dtype in (torch.bfloat16, torch.float32):
            specs += backward_specs(arch, dtype, dtype)
        specs += backward_specs(arch, torch.bfloat16, torch.float32, with_gemms=False)
        specs += [ln_bwd_spec(arch, row_config(block_d)) for block_d in ROW_BUCKETS]
        specs += [ln_stats_spec(arch, block_d, saved_stats=True) for block_d in ROW_BUCKETS]
        specs += [hidden_norm_bwd_spec(arch, hidden_norm_row_config(block_d)) for block_d in ROW_BUCKETS]
    return specs
