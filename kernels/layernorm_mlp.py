"""Fused LayerNorm + MLP (the second half of a pre-norm ViT block) in Triton: forward kernels,
the shared GEMM helpers and configurations, and the ahead-of-time specs of both directions.

    y = x + ss[b] * ls * (gelu(LN(x) @ W1^T + b1) @ W2^T + b2)        (x: (B, N, D), W1: (HD, D))

Forward, three launches:
    1. ``_ln_stats_kernel``: per-row mean and rstd in fp32 (two passes over the row in registers),
       and the normalised row ``LN(x)`` (fp32, then rounded to the GEMM dtype, as the composite
       rounds LayerNorm's output before its GEMM) written once to a contiguous (T, D) buffer.
    2. ``_fc1_kernel``: ``a = LN(x) @ W1^T + b1``, a plain GEMM over that buffer: no LayerNorm in
       its operand loads (applying it there cost ~360 SASS instructions per thread per K step on
       sm_90, an issue-bound loop), no masks in the loop when D is a multiple of BLOCK_K
       (``EVEN_K``), no integer division (rows and columns past the edge are clamped, not masked,
       on load). The buffer costs one T x D write and read in the GEMM dtype, against the GEMM's
       2 T D HD FLOPs. The epilogue adds b1, rounds ``a`` to the GEMM dtype (as the composite
       does), and writes ``g = gelu(a)`` and, when a backward will run, ``a`` itself.
    3. ``_fc2_kernel``: ``z = g @ W2^T``; the epilogue adds b2, multiplies by the layer scale and
       the per-sample scale (drop-path), adds the residual and writes y once. The same kernel with
       every epilogue flag off computes ``dLN = dA @ W1`` in the backward.

Hidden norm (timm's ``scale_mlp``: ``fc2(LN(g))``): between fc1 and fc2 the statistics kernel runs
over g's (T, HD) rows and writes LN(g) over g in place (each program reads its rows, then writes
them), its statistics kept after the input norm's; the backward is in ``layernorm_mlp_bwd.py``.

Variants, as constexprs of the same kernels: ``ACTIVATION`` ("gelu" erf, "gelu_tanh",
"quick_gelu", "silu") in fc1's epilogue and the dA epilogue; ``RMS`` (RMSNorm: the statistics
kernel stores mean = 0 and rstd = 1 / sqrt(mean(x^2) + eps), so every consumer's
``(x - mean) * rstd`` is unchanged; only the LN backward drops its mean(dxh) term); ``GATED``
(``g = act(a_gate) * a_value``: fc1 runs two accumulators over the same normalised A tiles, with
half-width tiles so the registers match the plain kernel, and saves [a_gate | a_value]).

Backward (``layernorm_mlp_bwd.py``) recomputes LN (from the saved row statistics; the forward's
normalised buffer is not kept) and the activation (from the saved pre-activation) instead of
storing them.

Trade-off, decided here: the backward KEEPS the FC1 pre-activation ``a`` (T x HD, GEMM dtype) plus
mean/rstd (2 x T fp32), and recomputes ``LN(x)`` (a row pass from the saved statistics writes it for
dW1; the LN-backward row pass recomputes xhat) and ``gelu(a)``, ``gelu'(a)`` (in the dA GEMM's
epilogue). Recomputing ``a`` as well would cost one more T x D x HD GEMM in every backward (+25% of
the backward's FLOPs) to save the last 4 x T x D elements. Measured on the CPU with
``saved_tensors_hooks`` (tests/ops/test_layernorm_mlp.py, and the ``saved_bytes`` column of the
``mlp`` benchmark) at mlp_ratio 4: eager keeps LN(x), a and gelu(a), 9 x T x D elements (10 with a
layer scale, which keeps fc2's output too); this op keeps 4 x T x D + 2 x T fp32, 40-45% of eager's.
GPU timings of the alternative: not measured (no GPU was available when this was written).

Conventions: x is read through (B, N, D) strides with a unit stride in D (views of a token buffer
are not copied); weights have the nn.Linear layout with a unit stride in their last dim. Token
row offsets are int64; GEMM tiles are folded into grid axis 0 (grouped for L2 reuse as in
Triton's matmul tutorial; axis 1 holds at most 8 token splits), so no CUDA grid limit applies.
Every load and store is masked, so any D, hidden size and token count work (timm allows any
mlp_ratio). fp16/bf16 use tensor-core dots
with fp32 accumulation; fp32 uses IEEE fp32 dots (no TF32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import triton
import triton.language as tl

from .aot import ARCHS, KernelSpec, signature
from .runtime import AOT_DTYPE_NAMES, INTERPRETER, GemmConfig, arch_of, cdiv, device_guard, dot_precision, new_output

# Widest rows (D) the row kernels hold in registers (8192 spills); wider rows run on the torch route.
MAX_DIM = 4096


# ---------------------------------------------------------------------------------------------
# Tile order and activations (shared by the forward and the backward)
# ---------------------------------------------------------------------------------------------
@triton.jit
def grouped_tile(
    pid, rows_total, cols_total, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr
):
    """(pid_m, pid_n) of program ``pid`` over a rows_total x cols_total output, in GROUP_M-row
    groups that walk each column block together, so the B tiles they share stay in L2."""
    num_n = (cols_total + BLOCK_N - 1) // BLOCK_N
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = tl.minimum((rows_total + BLOCK_M - 1) // BLOCK_M - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows
    return pid_m, pid_n


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): saturates to +-1 without overflow, needs no libdevice (interpreter)
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _sigmoid(u):
    # exp(-u) overflows to inf for u < -88: 1 / inf = 0, no NaN
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def activation(a, ACTIVATION: tl.constexpr):
    """The MLP activation of fp32 ``a``: "gelu" (erf), "gelu_tanh", "quick_gelu" (CLIP's
    a * sigmoid(1.702 a)) or "silu" (a * sigmoid(a))."""
    if ACTIVATION == "gelu_tanh":
        g = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))  # sqrt(2/pi)
    elif ACTIVATION == "quick_gelu":
        g = a * _sigmoid(1.702 * a)
    elif ACTIVATION == "silu":
        g = a * _sigmoid(a)
    else:
        g = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))  # 1/sqrt(2)
    return g


@triton.jit
def activation_and_grad(a, ACTIVATION: tl.constexpr):
    """(act(a), d act / da) of fp32 ``a``, sharing the erf / tanh / sigmoid."""
    if ACTIVATION == "gelu_tanh":
        t = _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))
        g = 0.5 * a * (1.0 + t)
        dg = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
    elif ACTIVATION == "quick_gelu":
        s = _sigmoid(1.702 * a)
        g = a * s
        dg = s + 1.702 * g * (1.0 - s)
    elif ACTIVATION == "silu":
        s = _sigmoid(a)
        g = a * s
        dg = s + g * (1.0 - s)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        g = a * cdf
        dg = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327  # 1/sqrt(2 pi)
    return g, dg


# ---------------------------------------------------------------------------------------------
# Forward kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ln_stats_kernel(
    X,  # (B, N_TOK, D) tokens, unit stride in D
    Mean,  # (T,) fp32 out: row means, T = B * N_TOK (SAVED_STATS: in, the forward's)
    Rstd,  # (T,) fp32 out: 1 / sqrt(var + eps) (RMS: 1 / sqrt(mean(x^2) + eps)) (SAVED_STATS: in)
    XHat,  # (T, D) out: LN(x) = (x - mean) * rstd * w + b in the GEMM dtype, contiguous (WRITE_XHAT)
    NormW, NormB,  # (D,) LayerNorm weight and bias (HAS_NORM_W / HAS_NORM_B)
    T, N_TOK, D,
    stride_xb, stride_xn,
    eps,  # unused with SAVED_STATS
    BLOCK_ROWS: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # D rounded up to a width in ROW_BUCKETS
    RMS: tl.constexpr = False,  # RMSNorm: mean stored as 0, so every consumer's (x - mean) * rstd holds
    WRITE_XHAT: tl.constexpr = False,
    HAS_NORM_W: tl.constexpr = False,
    HAS_NORM_B: tl.constexpr = False,
    SAVED_STATS: tl.constexpr = False,  # read Mean / Rstd (the backward's LN(x) for dW1) instead of computing them
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < D)[None, :]
    b = rows // N_TOK  # token row t = b * N_TOK + n; int64 offsets
    x_rows = b.to(tl.int64) * stride_xb + (rows - b * N_TOK).to(tl.int64) * stride_xn
    x = tl.load(X + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SAVED_STATS:  # the same fp32 statistics as the forward's, so the same LN(x), bit for bit
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    else:
        if RMS:
            mean = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
            var = tl.sum(x * x, axis=1) / D  # the mean square (masked lanes load 0)
        else:
            # two passes over the row in registers: mean, then the centred variance (no cancellation)
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / D
        rstd = tl.math.rsqrt(var + eps)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)
    if WRITE_XHAT:  # the normalised rows fc1 reads as a plain GEMM operand
        col_ok = cols < D
        h = (x - mean[:, None]) * rstd[:, None]
        if HAS_NORM_W:
            h = h * tl.load(NormW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_NORM_B:
            h = h + tl.load(NormB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(XHat + rows.to(tl.int64)[:, None] * D + cols[None, :], h.to(XHat.dtype.element_ty), mask=mask)


@triton.jit
def _fc1_kernel(
    A,  # (T, D) LN(x) in the GEMM dtype, contiguous (written by _ln_stats_kernel)
    W1,  # (HD, D) fc1 weight (GATED: the gate's), unit stride in D
    B1,  # (HD,) fc1 bias (HAS_B1; GATED: the gate's)
    G,  # (T, HD) out: act(a) (GATED: act(a_gate) * a_value) in the GEMM dtype, contiguous
    Pre,  # (T, HD) out: the pre-activation a (GATED: (T, 2 HD), [a_gate | a_value]), contiguous (SAVE_PRE)
    T, D, HD,
    stride_w1h,
    HAS_B1: tl.constexpr,
    SAVE_PRE: tl.constexpr,  # write a for the backward
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32, else "tf32" (ignored by fp16/bf16 dots)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    W1V=None,  # (HD, D) fc1 value weight, unit stride in D (GATED)
    B1V=None,  # (HD,) fc1 value bias (GATED and HAS_B1V)
    stride_w1vh=0,
    ACTIVATION: tl.constexpr = "gelu",  # "gelu" (erf) | "gelu_tanh" | "quick_gelu" | "silu"
    GATED: tl.constexpr = False,  # two accumulators over the same A tiles: gate and value
    EVEN_K: tl.constexpr = False,  # D % BLOCK_K == 0: whole K steps, no masks in the loop
    HAS_B1V: tl.constexpr = False,  # the value projection has a bias (GATED; either bias may be absent)
):
    # -- tile order: GROUP_M row blocks walk each column block together (B tiles stay in L2) --
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, HD, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < HD
    # rows and columns past the edge load the last valid ones (their results are never stored),
    # so the loads need no row or column masks
    a_ptrs = A + tl.minimum(rows, T - 1).to(tl.int64)[:, None] * D + offs_k[None, :]
    w_cols = tl.minimum(cols, HD - 1)
    w_ptrs = W1 + w_cols[None, :] * stride_w1h + offs_k[:, None]  # (BLOCK_K, BLOCK_N) tile of W1^T
    if GATED:
        wv_ptrs = W1V + w_cols[None, :] * stride_w1vh + offs_k[:, None]
        acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            h = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:  # the last step's columns past D load 0 on both sides
            k_ok = offs_k < D - k0
            h = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        if GATED:  # the value half reuses the A tile
            if EVEN_K:  # noqa: SIM108 (constexpr branches: k_ok exists only in the other one)
                wv = tl.load(wv_ptrs)
            else:
                wv = tl.load(wv_ptrs, mask=k_ok[:, None], other=0.0)
            acc_v = tl.dot(h, wv, acc_v, input_precision=DOT_PRECISION)
            wv_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # -- epilogue: bias, round a to the GEMM dtype (as the composite does), activation, write --
    if HAS_B1:
        acc += tl.load(B1 + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    a = acc.to(G.dtype.element_ty)
    mask = row_ok[:, None] & col_ok[None, :]
    g = activation(a.to(tl.float32), ACTIVATION)
    if GATED:
        if HAS_B1V:
            acc_v += tl.load(B1V + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        a_v = acc_v.to(G.dtype.element_ty)
        g = g * a_v.to(tl.float32)
        if SAVE_PRE:
            pre_offs = rows.to(tl.int64)[:, None] * (2 * HD) + cols[None, :]
            tl.store(Pre + pre_offs, a, mask=mask)
            tl.store(Pre + pre_offs + HD, a_v, mask=mask)
    elif SAVE_PRE:
        tl.store(Pre + rows.to(tl.int64)[:, None] * HD + cols[None, :], a, mask=mask)
    tl.store(G + rows.to(tl.int64)[:, None] * HD + cols[None, :], g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _fc2_kernel(
    A,  # (T, K) left operand, contiguous: gelu(a) (forward) or dA (backward, dLN = dA @ W1)
    W,  # (K, N_OUT) right operand by strides: fc2_weight^T (forward) or fc1_weight (backward)
    Bias,  # (N_OUT,) fc2 bias (HAS_BIAS)
    X,  # (B, N_TOK, N_OUT) residual input, unit stride in N_OUT (RESIDUAL)
    LS,  # (N_OUT,) layer scale (HAS_LS)
    SS,  # (B,) per-sample scale (HAS_SS)
    Y,  # (T, N_OUT) out, contiguous
    T, N_TOK, N_OUT, K,
    stride_wk, stride_wn,  # one of them is 1
    stride_xb, stride_xn,
    HAS_BIAS: tl.constexpr, HAS_LS: tl.constexpr, HAS_SS: tl.constexpr, RESIDUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- tile order: GROUP_M row blocks walk each column block together (B tiles stay in L2) --
    pid_m, pid_n = grouped_tile(tl.program_id(0), T, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < N_OUT
    a_ptrs = A + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    # -- epilogue: bias, layer scale, per-sample scale, residual; y written once --
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LS:
        acc *= tl.load(LS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    b = rows // N_TOK  # token row t = b * N_TOK + n
    if HAS_SS:
        acc *= tl.load(SS + b, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        x_rows = b.to(tl.int64) * stride_xb + (rows - b * N_TOK).to(tl.int64) * stride_xn
        acc += tl.load(X + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows.to(tl.int64)[:, None] * N_OUT + cols[None, :], acc.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configurations (per architecture and dtype, from the ahead-of-time register/spill report)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RowConfig:
    block_rows: int
    block_d: int
    num_warps: int


# Under the interpreter the cost is per program, not per element, so tiles are wide (tests pick
# shapes that still cross several tiles in every direction): one config for the token-row GEMMs
# and a wider one for the weight gradients, whose output (D x HD) is the big dimension there.
_INTERPRETER_GEMM = GemmConfig(32, 256, 64, num_warps=4, num_stages=1, group_m=2)
_INTERPRETER_WGRAD = GemmConfig(128, 256, 64, num_warps=4, num_stages=1, group_m=2)

# GEMM kinds: "fc1" (A = LN(x) rows), "fc2" (plain A; also dLN), "fc2_bwd" (dA = dy @ (ls * W2),
# GELU', per-sample scale and the db1 / dss partial sums in the epilogue), "wgrad" (P^T Q over
# token rows, plain tiles).


def gemm_config(arch: int, dtype: torch.dtype, kind: str, gated: bool = False, activation: str = "gelu"
                ) -> GemmConfig:  # fmt: skip
    """Block sizes of one GEMM kind for (architecture, GEMM dtype); ``gated`` and ``activation``:
    the fc2_bwd epilogue of a gated MLP (two pre-activations in, two gradients out) and its
    activation. In the interpreter, its wide tiles; on a GPU ``hardware_gemm_config``'s."""
    if INTERPRETER:
        return _INTERPRETER_WGRAD if kind == "wgrad" else _INTERPRETER_GEMM
    return hardware_gemm_config(arch, dtype, kind, gated, activation)


def hardware_gemm_config(arch: int, dtype: torch.dtype, kind: str, gated: bool = False, activation: str = "gelu"
                         ) -> GemmConfig:  # fmt: skip
    """``gemm_config`` on a GPU of ``arch`` (also asked in the interpreter by the checks of the
    production tiles)."""
    if dtype == torch.float32:  # IEEE fp32 dots run on the FMA units: small tiles, short K steps
        if kind == "fc2_bwd" and gated:
            # half-width tiles: 64 x 64 spilled 104-216 B with the tanh GELU (Triton 3.8 and 3.6); 64 x 32
            # takes 96-166 registers, 3-5 CTAs/SM (static figures, 2026-12-05)
            return GemmConfig(64, 32, 16, num_warps=4, num_stages=2)
        if kind == "wgrad":
            # BK=32: with BK=16 the token-major P^T tile took 148 registers on sm_80 (1 CTA/SM);
            # BK=32 takes 75 / 64 / 68 on sm_80 / 89 / 90 (3 / 4 / 3 CTAs/SM; static figures,
            # Triton 3.8, 2026-12-04)
            return GemmConfig(64, 64, 32, num_warps=8, num_stages=2)
        return GemmConfig(64, 64, 16, num_warps=4, num_stages=2)
    # fc2_bwd keeps a, gelu(a), gelu'(a) and the accumulator live in its epilogue: half-width tiles
    block_n = 64 if kind == "fc2_bwd" else 128
    if kind == "fc2_bwd" and arch < 90:
        # mma.sync: 64 x 64 tiles on 4 warps (each warp 32 x 32 as in 128 x 64 on 8). The epilogue
        # (per-sample scale, ss * g, db1 / dss partials) takes ~165 registers a thread either way;
        # on 4 warps that is 3 CTAs/SM (12 warps), on 8 it was 1 (168 registers). Static figures
        # (Triton 3.8, 2026-12-04): issue ratio 0.63 on sm_80, 0.31 on sm_89 (128 x 64: 0.65 / 0.32
        # at 1 CTA/SM; the old operand-scaling kernel 0.81 / 0.40 at 2)
        return GemmConfig(64, 64, 32, num_warps=4, num_stages=3 if arch >= 89 else 4)
    if arch >= 90:  # warpgroup MMA, two warpgroups of 64 rows; 227 KB of shared memory
        if kind == "fc2_bwd" and gated and activation != "gelu_tanh":
            # gated (SwiGLU's SiLU, GeGLU's erf, quick_gelu) on one warpgroup's 64 x 64 too, 2 CTAs/SM:
            # 242-255 registers under Triton 3.8, 221-242 under 3.6, no spill, issue ratio 0.69 / 0.64;
            # the 128 x 64 tiles on 8 warps held 240-249 and 1 CTA/SM. The tanh GELU keeps those: on
            # 64 x 64 it put 16 B on the stack under 3.8 at any stage count (static figures,
            # 2026-12-05; UNMEASURED)
            return GemmConfig(64, 64, 64, num_warps=4, num_stages=4)
        if kind == "fc2_bwd" and not gated:
            # one warpgroup on 64 x 64, 2-3 CTAs/SM: one's epilogue (the erf GELU and its derivative,
            # ~80 instructions an element, about as long as the 768-deep main loop) overlaps another's
            # main loop. The 128 x 64 tile on 8 warps took 130 registers under Triton 3.8 and 208
            # under 3.6 (the erf: 128-134 with the other activations): 1 CTA/SM, the epilogue alone;
            # capped at 128 it spilled 344 B under 3.6. 64 x 64: 136 registers, 3 CTAs/SM (3.8), 208
            # and 2 (3.6), issue ratio 0.68 / 0.64 on four stages. It does 32 FLOP per byte of dy and
            # W2 read from L2 where 128 x 64 did 43: a GPU run weighs that against the overlap (static
            # figures, 2026-12-05; UNMEASURED)
            return GemmConfig(64, 64, 64, num_warps=4, num_stages=4)
        if kind == "fc2":
            # fc2 (and dLN) aim at 2 CTAs/SM, one's epilogue (residual, LayerScale, drop-path scale)
            # overlapping the other's main loop: a 128 x 64 tile keeps the fp32 accumulator at 32
            # registers a thread (the 128 x 128 one took 174 registers with the epilogue: 1 CTA/SM)
            return GemmConfig(128, 64, 64, num_warps=8, num_stages=3)
        if kind == "fc1":
            # fc1 aims at 3 CTAs/SM, one's epilogue (b1, erf-GELU, a and g written; ~2.5k SASS
            # instructions a thread) overlapping the others' main loops: one warpgroup on a 64 x 128
            # tile (64 x 64 gated, two accumulators). Static figures (Triton 3.8, 2026-12-04): 159
            # registers (gated 155), 3 CTAs/SM (3 x 72 KB of shared memory at 3 stages), issue ratio
            # 0.43 (gated 0.48). The 128 x 128 tile on 8 warps took 171 (1 CTA/SM, 0.39); 128 x 64 on
            # 8 warps 98 (2 CTAs/SM, 0.70); 128 x 128 capped at 128 registers spilled 8 B; 64 x 256
            # on 4 warps spilled 176 B
            return GemmConfig(64, block_n, 64, num_warps=4, num_stages=3)
        # wgrad, and the gated fc2_bwd with the tanh GELU (237-242 registers, 1 CTA/SM)
        return GemmConfig(128, block_n, 64, num_warps=8, num_stages=3)
    if kind == "fc1":
        # as on Hopper, 64 x 128 on 4 warps (gated 64 x 64), several CTAs/SM so that one's GELU epilogue
        # overlaps another's main loop: sm_80 180 registers / 2 CTAs/SM (Triton 3.8; 174 under 3.6),
        # sm_89 166 / 3 (164), gated 168 / 3 on both; issue ratio 0.50 and 0.25. The 128 x 128 tiles on
        # 8 warps took 204 and 174 registers (175 under 3.6), 1 CTA/SM, the epilogue (~40 instructions
        # an element) alone after the main loop. They read each A and W1 tile for 43 FLOP per byte,
        # not 64 (static figures, 2026-12-05; UNMEASURED)
        return GemmConfig(64, block_n, 32, num_warps=4, num_stages=3 if arch >= 89 else 4)
    if arch >= 89:  # 99 KB of shared memory
        return GemmConfig(128, block_n, 32, num_warps=8, num_stages=3)
    return GemmConfig(128, block_n, 32, num_warps=8, num_stages=4)


# Row kernels: D is padded to one of a few widths (each a separate compile; the row kernels are
# memory-bound, so masked lanes cost little). Wider rows than the last run on the torch route.
ROW_BUCKETS = (128, 512, 1024, 2048, 4096)


def row_config(dim: int) -> RowConfig:
    """Rows per program and warps of the row kernels (LN statistics, LN backward) for width D."""
    block_d = next(b for b in ROW_BUCKETS if b >= dim)
    block_rows = max(1, min(16, 2048 // block_d))
    # the LN backward keeps three (BLOCK_D,) fp32 column accumulators beside its row tiles: at
    # 2048 / 4096 with 4 / 8 warps that is 16 values each per thread and ~230 registers on
    # Triton 3.8 (too close to 255); 8 warps at 2048 spill 8 B on sm_90; 16 warps are clean
    # (82 / 128 registers, 128 being the cap at 512 threads)
    num_warps = 4 if block_d <= 1024 else 16
    return RowConfig(block_rows, block_d, num_warps)


# ---------------------------------------------------------------------------------------------
# Forward launcher (inputs already validated by fastvit.ops.layernorm_mlp)
# ---------------------------------------------------------------------------------------------
def layernorm_mlp_fwd(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    *,
    eps: float,
    activation: str,
    residual: bool,
    out_dtype: torch.dtype,
    save_preact: bool,
    rms: bool = False,
    gated: bool = False,
    fc1_gate_weight: torch.Tensor | None = None,
    fc1_gate_bias: torch.Tensor | None = None,
    no_norm: bool = False,
    hidden_norm: bool = False,
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
    hidden_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch the forward: norm statistics, fc1 (+activation, gating), [hidden LayerNorm,] fc2
    (+scales, residual).

    Args:
        x: (B, N, D) tokens, unit stride in D, any dtype the kernels take.
        norm_weight, norm_bias: (D,) or None, any float dtype (norm_bias None when ``rms``).
        fc1_weight: (HD, D), fc1_bias: (HD,) or None; fc2_weight: (D, HD'), fc2_bias: (D,) or
            None; all in the GEMM dtype, unit stride in the last dim. Gated: HD' = HD / 2 and
            fc1 is packed [gate; value] (timm's SwiGLUPacked), or, with ``fc1_gate_weight`` /
            ``fc1_gate_bias`` (HD', D) / (HD',), fc1 is the value (up) projection alone.
        layer_scale: (D,) or None; sample_scale: (B,) or None; any float dtype.
        activation: "gelu" | "gelu_tanh" | "quick_gelu" | "silu".
        out_dtype: dtype of y.
        save_preact: also return the pre-activation for the backward.
        rms: RMSNorm instead of LayerNorm.
        gated: g = act(a_gate) * a_value.
        no_norm: the MLP alone (fc1 reads x itself; norm_weight / norm_bias None, eps unused).
        hidden_norm: a LayerNorm over g (HD' <= MAX_DIM) before fc2 (timm's ``scale_mlp``), with
            ``hidden_norm_weight`` / ``hidden_norm_bias`` (HD',) or None and ``hidden_eps``.

    Returns:
        y (B, N, D) contiguous in ``out_dtype``; the pre-activation (B*N, HD) (gated: (B*N, 2 HD'),
        [a_gate | a_value]) in the GEMM dtype, or None; mean (zeros for RMSNorm) and rstd float32:
        (B*N,) rows of the input norm (``no_norm``: none), then, with ``hidden_norm``, B*N rows of
        the hidden norm's.
    """
    batch, n_tok, dim = x.shape
    w_gate, b_gate, w_value, b_value = fc1_weight, fc1_bias, None, None
    if gated:  # the kernel takes gate and value as two (HD', D) operands: views, no copies
        if fc1_gate_weight is None:
            half = fc1_weight.shape[0] // 2
            w_gate, w_value = fc1_weight[:half], fc1_weight[half:]
            if fc1_bias is not None:
                b_gate, b_value = fc1_bias[:half], fc1_bias[half:]
        else:
            w_gate, b_gate, w_value, b_value = fc1_gate_weight, fc1_gate_bias, fc1_weight, fc1_bias
    hidden = w_gate.shape[0]
    rows = batch * n_tok
    device, gemm_dtype = x.device, fc1_weight.dtype
    stat_rows = 0 if no_norm else rows
    mean = new_output((stat_rows + (rows if hidden_norm else 0),), dtype=torch.float32, device=device)
    rstd = new_output((stat_rows + (rows if hidden_norm else 0),), dtype=torch.float32, device=device)
    # fc1's A operand: LN(x) written by the statistics pass, or (no norm) x's rows themselves
    xhat = token_rows(x, gemm_dtype) if no_norm else new_output((rows, dim), dtype=gemm_dtype, device=device)
    g = new_output((rows, hidden), dtype=gemm_dtype, device=device)
    pre_cols = 2 * hidden if gated else hidden
    pre = new_output((rows, pre_cols), dtype=gemm_dtype, device=device) if save_preact else None
    y = new_output((batch, n_tok, dim), dtype=out_dtype, device=device)
    if rows == 0:
        return y, pre, mean, rstd
    arch = arch_of(device)
    precision = dot_precision(gemm_dtype)

    # Triton launches on the current device, which need not hold x (model.to('cuda:1'))
    with device_guard(x):
        if not no_norm:
            rc = row_config(dim)
            _ln_stats_kernel[(cdiv(rows, rc.block_rows),)](
                x, mean, rstd, xhat, norm_weight, norm_bias, rows, n_tok, dim, x.stride(0), x.stride(1), eps,
                BLOCK_ROWS=rc.block_rows, BLOCK_D=rc.block_d, RMS=rms, WRITE_XHAT=True,
                HAS_NORM_W=norm_weight is not None, HAS_NORM_B=norm_bias is not None, num_warps=rc.num_warps,
            )
        c1 = gemm_config(arch, gemm_dtype, "fc1")
        if gated:  # two accumulators: half-width tiles hold the registers of one full tile
            c1 = dataclasses.replace(c1, block_n=c1.block_n // 2)
        _fc1_kernel[(cdiv(rows, c1.block_m) * cdiv(hidden, c1.block_n),)](
            xhat, w_gate, b_gate, g, pre,
            rows, dim, hidden, w_gate.stride(0),
            HAS_B1=b_gate is not None, SAVE_PRE=save_preact, DOT_PRECISION=precision,
            BLOCK_M=c1.block_m, BLOCK_N=c1.block_n, BLOCK_K=c1.block_k, GROUP_M=c1.group_m,
            W1V=w_value, B1V=b_value, HAS_B1V=b_value is not None, stride_w1vh=w_value.stride(0) if gated else 0,
            ACTIVATION=activation, GATED=gated, EVEN_K=dim % c1.block_k == 0,
            num_warps=c1.num_warps, num_stages=c1.num_stages,
        )
        if hidden_norm:  # LN(g) over HD', written over g (each program reads its rows, then writes them)
            rc = row_config(hidden)
            _ln_stats_kernel[(cdiv(rows, rc.block_rows),)](
                g, mean[stat_rows:], rstd[stat_rows:], g, hidden_norm_weight, hidden_norm_bias, rows, rows,
                hidden, 0, hidden, hidden_eps,
                BLOCK_ROWS=rc.block_rows, BLOCK_D=rc.block_d, WRITE_XHAT=True,
                HAS_NORM_W=hidden_norm_weight is not None, HAS_NORM_B=hidden_norm_bias is not None,
                num_warps=rc.num_warps,
            )
        c2 = gemm_config(arch, gemm_dtype, "fc2")
        _fc2_kernel[(cdiv(rows, c2.block_m) * cdiv(dim, c2.block_n),)](
            g, fc2_weight, fc2_bias, x if residual else None, layer_scale, sample_scale, y,
            rows, n_tok, dim, hidden, fc2_weight.stride(1), fc2_weight.stride(0), x.stride(0), x.stride(1),
            HAS_BIAS=fc2_bias is not None, HAS_LS=layer_scale is not None, HAS_SS=sample_scale is not None,
            RESIDUAL=residual, DOT_PRECISION=precision,
            BLOCK_M=c2.block_m, BLOCK_N=c2.block_n, BLOCK_K=c2.block_k, GROUP_M=c2.group_m,
            num_warps=c2.num_warps, num_stages=c2.num_stages,
        )
    return y, pre, mean, rstd


def token_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (B, N, D) as the (B*N, D) rows a GEMM reads as its A operand (row stride D) in ``dtype``:
    a view when x already is one; else one T x D copy (another dtype: autocast's fp32 x; strided
    tokens: the GEMMs read A with a fixed row stride)."""
    batch, n_tok, dim = x.shape
    if x.dtype == dtype:
        view = x.reshape(batch * n_tok, dim)  # a view where the tokens merge (reshape copies otherwise)
        if view.stride() == (dim, 1):
            return view
    rows = new_output((batch * n_tok, dim), dtype=dtype, device=x.device)
    rows.view(batch, n_tok, dim).copy_(x)
    return rows


# ---------------------------------------------------------------------------------------------
# Ahead-of-time specs of the forward (the backward's are in layernorm_mlp_bwd.aot_specs)
# ---------------------------------------------------------------------------------------------
def gemm_spec(kernel: str, fn: Any, label: str, types: dict[str, str], constexprs: dict, cfg: GemmConfig,
              arch: int, dtype: torch.dtype, divisible_by_16: tuple[str, ...]) -> KernelSpec:
    """A KernelSpec for one GEMM kernel configuration (block sizes filled in from ``cfg``): ``kernel``
    names the ``@triton.jit`` function ``fn`` as ``"module.function"``; the signature is
    ``aot.signature`` of ``fn`` with ``types`` (pointers, constant arguments)."""
    constexprs = {**constexprs, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                  "GROUP_M": cfg.group_m, "DOT_PRECISION": dot_precision(dtype)}
    return KernelSpec(
        kernel, f"{label} BM={cfg.block_m} BN={cfg.block_n} BK={cfg.block_k} w={cfg.num_warps} s={cfg.num_stages}",
        signature(fn, types), constexprs, cfg.num_warps, cfg.num_stages, arch,
        needs_wgmma=dtype != torch.float32, divisible_by_16=divisible_by_16,
    )


def _forward_specs(arch: int, dtype: torch.dtype, x_dtype: torch.dtype) -> list[KernelSpec]:
    ty, xty = AOT_DTYPE_NAMES[dtype], AOT_DTYPE_NAMES[x_dtype]
    label = f"{ty}" if dtype == x_dtype else f"{ty} (x {xty}, autocast)"
    # every optional input present (the heaviest variant); unit strides as the runtime specialises
    c1 = gemm_config(arch, dtype, "fc1")
    fc1 = gemm_spec(
        "layernorm_mlp._fc1_kernel", _fc1_kernel, f"fc1 {ty}",
        {"A": f"*{ty}", "W1": f"*{ty}", "B1": f"*{ty}", "G": f"*{ty}", "Pre": f"*{ty}"},
        {"HAS_B1": True, "SAVE_PRE": True, "EVEN_K": True},  # ViT widths are multiples of BLOCK_K
        c1, arch, dtype, ("A", "W1", "B1", "G", "Pre", "D", "HD", "stride_w1h"),
    )
    # gated (SwiGLU-style: act(a_gate) * a_value): two accumulators on half-width tiles, as launched
    fc1_gated = gemm_spec(
        "layernorm_mlp._fc1_kernel", _fc1_kernel, f"fc1 gated {ty}",
        {"A": f"*{ty}", "W1": f"*{ty}", "B1": f"*{ty}", "G": f"*{ty}", "Pre": f"*{ty}", "W1V": f"*{ty}",
         "B1V": f"*{ty}"},
        {"HAS_B1": True, "HAS_B1V": True, "SAVE_PRE": True, "EVEN_K": True, "GATED": True},
        dataclasses.replace(c1, block_n=c1.block_n // 2), arch, dtype,
        ("A", "W1", "B1", "G", "Pre", "W1V", "B1V", "D", "HD", "stride_w1h", "stride_w1vh"),
    )
    c2 = gemm_config(arch, dtype, "fc2")
    fc2 = gemm_spec(
        "layernorm_mlp._fc2_kernel", _fc2_kernel, f"fc2 {label}",
        {"A": f"*{ty}", "W": f"*{ty}", "Bias": f"*{ty}", "X": f"*{xty}", "LS": f"*{xty}", "SS": f"*{xty}",
         "Y": f"*{xty}", "stride_wk": "constexpr"},
        {"stride_wk": 1, "HAS_BIAS": True, "HAS_LS": True, "HAS_SS": True, "RESIDUAL": True},
        c2, arch, dtype,
        ("A", "W", "Bias", "X", "LS", "SS", "Y", "N_OUT", "K", "stride_wn", "stride_xb", "stride_xn"),
    )
    if arch == 90 and dtype != torch.float32:  # 2+ CTAs/SM: one's epilogue overlaps another's main loop
        fc1 = dataclasses.replace(fc1, target_ctas_per_sm=3)
        fc1_gated = dataclasses.replace(fc1_gated, target_ctas_per_sm=3)
        fc2 = dataclasses.replace(fc2, target_ctas_per_sm=2)
    elif dtype != torch.float32:  # sm_80 / sm_89: fc1 aims at 2 (sm_89 fits 3)
        fc1 = dataclasses.replace(fc1, target_ctas_per_sm=2)
        fc1_gated = dataclasses.replace(fc1_gated, target_ctas_per_sm=2)
    # fc1 reads LN(x) in the GEMM dtype, which the statistics pass writes: x's dtype never reaches it;
    # the gated fc1 in bf16 only (fp32 takes the same FMA tiles)
    if dtype != x_dtype:
        return [fc2]
    return [fc1, fc1_gated, fc2] if dtype != torch.float32 else [fc1, fc2]


def ln_stats_spec(arch: int, block_d: int, *, saved_stats: bool = False) -> KernelSpec:
    """The statistics kernel for one width bucket (bf16 x and LN(x), affine on): the forward's, or
    (``saved_stats``) the backward's pass that writes LN(x) from the saved statistics for dW1."""
    rc = row_config(block_d)
    name = "ln apply (saved stats)" if saved_stats else "ln stats"
    return KernelSpec(
        "layernorm_mlp._ln_stats_kernel", f"{name} bf16 BLOCK_D={block_d} rows={rc.block_rows} w={rc.num_warps}",
        signature(_ln_stats_kernel, {"X": "*bf16", "Mean": "*fp32", "Rstd": "*fp32", "XHat": "*bf16",
                                     "NormW": "*bf16", "NormB": "*bf16", "eps": "fp32"}),
        {"BLOCK_ROWS": rc.block_rows, "BLOCK_D": rc.block_d, "WRITE_XHAT": True, "HAS_NORM_W": True,
         "HAS_NORM_B": True, **({"SAVED_STATS": True} if saved_stats else {})}, rc.num_warps, 1, arch,
        divisible_by_16=("X", "Mean", "Rstd", "XHat", "NormW", "NormB", "D", "stride_xb", "stride_xn"),
    )


def _row_specs(arch: int) -> list[KernelSpec]:
    return [ln_stats_spec(arch, block_d) for block_d in ROW_BUCKETS]


def aot_specs() -> list[KernelSpec]:
    """Every forward (kernel, GEMM dtype, row width bucket, architecture) configuration the launcher
    uses (``layernorm_mlp_bwd.aot_specs`` has the backward's).

    GEMMs: bf16 and fp32; bf16 GEMMs beside an fp32 x (autocast with timm's fp32 residual stream).
    fp16 takes the bf16 configurations and compiles to the same code but for the conversion
    instructions, so it is left out to keep the compile time down. Each spec is the heaviest
    variant (every optional input present); the gated fc1 (two accumulators) is a spec of its own
    in bf16. Row kernels: each width bucket, bf16.
    """
    specs = []
    for arch in ARCHS:
        for dtype in (torch.bfloat16, torch.float32):
            specs += _forward_specs(arch, dtype, dtype)
        specs += _forward_specs(arch, torch.bfloat16, torch.float32)
        specs += _row_specs(arch)
    return specs
