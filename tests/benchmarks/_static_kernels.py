"""Hand-made kernels whose static figures are known, for tests/benchmarks/test_static_model.py.

``tile_dot_kernel`` is a plain GEMM main loop: C (BM, BN) += A (BM, BK) @ B (BK, BN) over K, fully
pipelined loads and one dot per step. ``CHAINED`` makes it attention's shape: S = A @ B is a
(BM, BN) tile that feeds a second dot, C (BM, BK) += S @ B^T — Triton then lays every warp along
M, as in the attention kernels (two warpgroups over 64 rows: each row computed twice).
``INT_HEAVY`` recomputes A's addresses every step with an integer division and a remainder by
run-time values (a patch gather's ``ts // N_TOK``) on every element, which puts many integer
instructions into the loop beside one small dot.

Compiled ahead of time only (by the test, in a subprocess without TRITON_INTERPRET).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastvit.kernels.aot import KernelSpec


@triton.jit
def tile_dot_kernel(
    A,  # (M, K) bf16, row-major
    B,  # (K, N) bf16, row-major
    C,  # (M, N) fp32
    K, N, div, mod,  # sizes; div and mod are run-time divisors of the INT_HEAVY gather
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    INT_HEAVY: tl.constexpr, CHAINED: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    acc = tl.zeros([BM, BK if CHAINED else BN], dtype=tl.float32)
    for k in range(0, K, BK):
        if INT_HEAVY:
            flat = offs_m[:, None] * K + (k + offs_k)[None, :]
            a_off = (flat // div) * mod + (flat % mod) + (flat // mod) % div
        else:
            a_off = offs_m[:, None] * K + (k + offs_k)[None, :]
        a = tl.load(A + a_off)
        b = tl.load(B + (k + offs_k)[:, None] * N + offs_n[None, :])
        if CHAINED:
            acc += tl.dot(tl.dot(a, b).to(tl.bfloat16), tl.trans(b))
        else:
            acc += tl.dot(a, b)
    if CHAINED:
        tl.store(C + offs_m[:, None] * BK + offs_k[None, :], acc)
    else:
        tl.store(C + offs_m[:, None] * N + offs_n[None, :], acc)


_SIGNATURE = {"A": "*bf16", "B": "*bf16", "C": "*fp32", "K": "i32", "N": "i32", "div": "i32", "mod": "i32",
              "BM": "constexpr", "BN": "constexpr", "BK": "constexpr", "INT_HEAVY": "constexpr",
              "CHAINED": "constexpr"}  # fmt: skip
_ALIGNED = ("A", "B", "C", "K", "N")
KERNEL = "tests.benchmarks._static_kernels.tile_dot_kernel"


def spec(name: str, bm: int, bn: int, bk: int, num_warps: int, *, int_heavy: bool = False, chained: bool = False,
         arch: int = 90) -> KernelSpec:  # fmt: skip
    """A spec of ``tile_dot_kernel`` labelled ``name``."""
    constexprs = {"BM": bm, "BN": bn, "BK": bk, "INT_HEAVY": int_heavy, "CHAINED": chained}
    return KernelSpec(KERNEL, name, dict(_SIGNATURE), constexprs, num_warps, 3, arch, needs_wgmma=True,
                      divisible_by_16=_ALIGNED)  # fmt: skip


# label -> spec: attention's chained 64-row tile on 8 warps (two warpgroups over 64 rows:
# replicated), on 4 warps and as 128 rows on 8 warps (one warpgroup per 64 rows: clean), a plain
# 128 x 128 GEMM tile on 8 warps (clean), and the integer-heavy loop
SPECS = {
    "chained 64 rows on 8 warps": spec("chained 64 rows on 8 warps", 64, 64, 64, 8, chained=True),
    "chained 64 rows on 4 warps": spec("chained 64 rows on 4 warps", 64, 64, 64, 4, chained=True),
    "chained 128 rows on 8 warps": spec("chained 128 rows on 8 warps", 128, 64, 64, 8, chained=True),
    "128x128 on 8 warps": spec("128x128 on 8 warps", 128, 128, 64, 8),
    "integer-heavy loop": spec("integer-heavy loop", 64, 64, 64, 4, int_heavy=True),
}
