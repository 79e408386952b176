"""A short GPU check of fastvit.flash_attention (fits a few device minutes): compiled Triton
forward + backward vs a float64 reference with the tolerance rule (err <= 2 x err of SDPA in the
input dtype + atol), then timings against SDPA in the same run (triton.testing.do_bench, median).
On Hopper both forward paths are checked and timed: the pointer tiles the launcher takes by
default, and the tensor-descriptor (TMA) tiles that ``FASTVIT_TMA=1`` asks for (off by default
since this script's H200 run of 2026-12-04 measured them slower).

    python benchmarks/gpu_checks/attention_quick.py OUT_DIR [TIME_BUDGET_S]
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, ".")
from within_budget import check_within_budget

import fastvit

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
BUDGET_S = float(sys.argv[2]) if len(sys.argv) > 2 else 150.0
ATOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
rows, checks, start = [], [], time.time()


def reference(q, k, v, causal, grad):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
    out.backward(grad.double())
    return out, q64.grad, k64.grad, v64.grad


def run(fn, q, k, v, causal, grad):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, causal)
    out.backward(grad)
    return out, *(t.grad for t in leaves)


def time_both(fn, q, k, v, grad):
    """(forward ms, forward + backward ms), medians of do_bench."""
    fwd = do_bench(lambda: fn(q, k, v, False), warmup=25, rep=100, return_mode="median")
    both = do_bench(lambda: fn(q, k, v, False).backward(grad), warmup=25, rep=100, return_mode="median")
    return fwd, both


def fastvit_attention(q, k, v, causal):
    with fastvit.backend("triton"):
        return fastvit.flash_attention(q, k, v, causal=causal)


def fastvit_tma_tiles(q, k, v, causal):
    """The forward's tensor-descriptor tiles where the inputs qualify (FASTVIT_TMA=1)."""
    os.environ["FASTVIT_TMA"] = "1"
    try:
        return fastvit_attention(q, k, v, causal)
    finally:
        del os.environ["FASTVIT_TMA"]


IMPLS = (("fastvit[triton]", fastvit_attention), ("fastvit[triton, tma]", fastvit_tma_tiles))


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


for d, n, causal in [(64, 197, False), (80, 197, False), (128, 197, False), (64, 1025, True), (128, 577, True)]:
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(d + n)
    q, k, v = (torch.randn(2, 12, n, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    grad = torch.randn(2, 12, n, d, device="cuda", dtype=dtype, generator=g)
    want = reference(q, k, v, causal, grad)
    base = run(sdpa, q, k, v, causal, grad)
    for impl, fn in IMPLS:
        got = run(fn, q, k, v, causal, grad)
        check_within_budget(f"{impl} D={d} N={n} causal={causal}", ("out", "dq", "dk", "dv"), got, want, base,
                            ATOL[dtype], checks)  # fmt: skip
print("\n".join(checks), flush=True)

for d in (64, 128):
    for b, n in ((64, 197), (8, 1025), (2, 4097)):  # a ViT-B training batch, then longer sequences
        if time.time() - start > BUDGET_S:
            break
        q, k, v = (torch.randn(b, 12, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        for impl, fn in (*IMPLS, ("sdpa", sdpa)):
            fwd, both = time_both(fn, q, k, v, grad)
            flops = 4.0 * b * 12 * n * n * d
            rows.append({
                "impl": impl, "B": b, "H": 12, "N": n, "D": d, "dtype": "bfloat16", "fwd_ms": fwd, "fwd_bwd_ms": both,
                "fwd_tflops": flops / fwd / 1e9, "fwd_bwd_tflops": 3.5 * flops / both / 1e9,
            })  # fmt: skip
            print(f"{impl:25s} B={b:2d} N={n:5d} D={d:3d} fwd {fwd:8.4f} ms ({flops / fwd / 1e9:6.1f} TFLOP/s)  "
                  f"fwd+bwd {both:8.4f} ms ({3.5 * flops / both / 1e9:6.1f} TFLOP/s)", flush=True)

meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__}
with open(f"{OUT}/attention_quick.json", "w") as f:
    json.dump({"meta": meta, "checks": checks, "rows": rows}, f, indent=1)
print(meta, f"{time.time() - start:.0f}s")
