"""The fp32 attention backward kernels round ``lse * log2 e`` to fp32 by itself (ahead-of-time, no
GPU): what ``kernels.flash_attention.backward_lse`` assumes when it folds that rounding into dO's
rows. Were the compiler to fuse the product into the exponent's fma, the fold would be off by up
to half an ulp of it, and fp32 gradients at large logits back at the error it removes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.lse_product_ptx import lse_products

ROOT = Path(__file__).resolve().parents[2]

# a canned PTX excerpt: the Lse pointer (parameter 4) and a predicated row load through it; the
# scale's product (a parameter, not an lse row); an lse product reaching an fma's addend through a
# neg, one by a register holding log2 e through a select; fmas taking an lse row (or its negation)
# and log2 e as their factors (fused); one taking another value and log2 e (the scores' side: fine)
_PTX = """
	ld.param.u64 	%rd1, [k_param_4];
	ld.param.u64 	%rd2, [k_param_14];
	add.s64 	%rd4, %rd1, %rd3;
	ld.param.b32 	%r30, [k_param_9];
	mul.f32 	%r9, %r30, 0f3FB8AA3B;
	mov.b32 	%r83, 2139095040;
	@%p1 ld.global.b32 { %r83 }, [ %rd4 + 0 ];
	ld.global.b32 	%r84, [ %rd2 + 0 ];
	mul.f32 	%r13, %r83, 0f3FB8AA3B;
	neg.f32 	%r14, %r13;
	fma.rn.f32 	%r20, %r9, %r19, %r14;
	mov.b32 	%r66, 0f3FB8AA3B;
	mul.f32 	%r15, %r83, %r66;
	selp.f32 	%r16, 0f7F800000, %r15, %p2;
	fma.rn.f32 	%r21, %r83, 0f3FB8AA3B, %r19;
	fma.rn.f32 	%r22, %r84, %r66, %r16;
	neg.f32 	%r23, %r83;
	fma.rn.f32 	%r24, %r23, %r66, %r19;
"""


def test_lse_products_reads_canned_ptx():
    found = lse_products(_PTX, "_param_4")
    assert [p["uses"] for p in found["products"]] == [["fma-addend"], ["selp.f32"]]
    assert found["fused"] == ["fma.rn.f32 %r21, %r83, 0f3FB8AA3B, %r19", "fma.rn.f32 %r24, %r23, %r66, %r19"]


@pytest.mark.parametrize("arch", [80, 90])
def test_fp32_backward_rounds_the_lse_product_by_itself(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.lse_product_ptx", str(arch)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, found in kernels.items():
        assert not found["fused"], f"{name}: log2 e fused into {found['fused']}"
        assert found["products"], f"{name}: no lse * log2 e product found in its PTX"
        for product in found["products"]:
            # an fma's addend (directly or through a neg), or a select (the -inf -> +inf rows)
            allowed = {"fma-addend", "selp.f32"}
            assert set(product["uses"]) <= allowed and product["uses"], f"{name}: {product}"
