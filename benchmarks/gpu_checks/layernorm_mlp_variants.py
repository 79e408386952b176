"""GPU check of layernorm_mlp variants: compiled Triton kernels vs the float64 reference (tolerance
rule: err <= 2 x err(reference in the input dtype) + atol), output and every gradient; then a
timing. Run on an H200 on 2026-12-04 (log in benchmarks/results/h200-2026-12-04/)."""
import itertools
import math
import sys
import time

import torch

sys.path.insert(0, ".")
import fastvit
from fastvit import reference

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "layer_scale",
         "sample_scale", "fc1_gate_weight", "fc1_gate_bias")


def inputs(B, N, D, H, gated, norm, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    fc1_rows = 2 * H if gated == "packed" else H
    t = dict(x=r(B, N, D) + r(B, N, 1), norm_weight=1 + 0.2 * r(D), norm_bias=None if norm == "rms" else 0.2 * r(D),
             fc1_weight=r(fc1_rows, D) / math.sqrt(D), fc1_bias=0.2 * r(fc1_rows), fc2_weight=r(D, H) / math.sqrt(H),
             fc2_bias=0.2 * r(D), layer_scale=0.5 * r(D), sample_scale=0.5 + torch.rand(B, generator=g),
             fc1_gate_weight=r(H, D) / math.sqrt(D) if gated == "split" else None,
             fc1_gate_bias=0.2 * r(H) if gated == "split" else None)
    return {k: None if v is None else v.to("cuda", dtype) for k, v in t.items()}


def run(t, kw, dtype, backend):
    leaves = {k: None if v is None else v.detach().to(dtype).requires_grad_(True) for k, v in t.items()}
    with fastvit.backend(backend):
        out = fastvit.layernorm_mlp(*[leaves[k] for k in NAMES[:7]], layer_scale=leaves["layer_scale"],
                                    sample_scale=leaves["sample_scale"], fc1_gate_weight=leaves["fc1_gate_weight"],
                                    fc1_gate_bias=leaves["fc1_gate_bias"], **kw)
    return out, leaves


def check(B, N, D, H, gated, norm, act, dtype):
    t = inputs(B, N, D, H, gated, norm, dtype, seed=D + H)
    kw = dict(activation=act, norm=norm, gated=gated is not None)
    out, lv = run(t, kw, dtype, "triton")
    gout = torch.randn_like(out)
    names = [k for k in NAMES if lv[k] is not None]
    grads = torch.autograd.grad(out, [lv[k] for k in names], gout)
    res = {}
    for ref_dtype in (torch.float64, dtype):
        o, leaves = run(t, kw, ref_dtype, "torch")
        if ref_dtype != torch.float64:  # the reference math in the input dtype
            leaves = {k: None if v is None else v.detach().requires_grad_(True) for k, v in leaves.items()}
            o = reference.layernorm_mlp(*[leaves[k] for k in NAMES[:7]], layer_scale=leaves["layer_scale"],
                                        sample_scale=leaves["sample_scale"], fc1_gate_weight=leaves["fc1_gate_weight"],
                                        fc1_gate_bias=leaves["fc1_gate_bias"], **kw)
        gs = torch.autograd.grad(o, [leaves[k] for k in names], gout.to(ref_dtype))
        res[ref_dtype] = (o, dict(zip(names, gs, strict=True)))
    worst, fails = 0.0, []
    for name, a, r64, rlow in [("out", out, res[torch.float64][0], res[dtype][0])] + [
            (k, grads[i], res[torch.float64][1][k], res[dtype][1][k]) for i, k in enumerate(names)]:
        err = (a.double() - r64).abs().max().item()
        base = (rlow.double() - r64).abs().max().item()
        slack = ATOL[dtype] * (50 if name in ("layer_scale", "sample_scale") else 1)  # few-valued sums
        ok = math.isfinite(err) and err <= 2 * base + slack
        worst = max(worst, err / (2 * base + slack))
        if not ok:
            fails.append(f"{name}: {err:.2e} > 2x{base:.2e}+{slack:.0e}")
    label = f"{str(dtype)[6:]} D={D} H={H} {gated} {norm} {act}"
    print(f"{'PASS' if not fails else 'FAIL'} {label} worst/budget={worst:.2f} " + "; ".join(fails), flush=True)
    return not fails


ok = True
t0 = time.time()
for act, gated, norm in itertools.product(("gelu", "gelu_tanh", "quick_gelu", "silu"), (None, "packed", "split"),
                                          ("layernorm", "rms")):
    ok &= check(2, 197, 256, 344, gated, norm, act, torch.bfloat16)
for gated, norm, act in ((None, "rms", "quick_gelu"), ("packed", "rms", "silu"), ("split", "layernorm", "gelu")):
    ok &= check(2, 197, 256, 344, gated, norm, act, torch.float16)
    ok &= check(1, 77, 96, 136, gated, norm, act, torch.float32)
print("checks", "ALL PASS" if ok else "SOME FAIL", f"{time.time() - t0:.0f}s", flush=True)


def bench(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


# AIMv2-large-like SwiGLU block: D=1024, H=2816, 8 x 257 tokens, bf16, fwd and fwd+bwd
for gated, norm, act, H in (("split", "rms", "silu", 2816), (None, "layernorm", "gelu", 4096)):
    t = inputs(8, 257, 1024, H, gated, norm, torch.bfloat16, seed=1)
    kw = dict(activation=act, norm=norm, gated=gated is not None)
    for backend in ("triton", "torch"):
        with torch.no_grad():
            f = bench(lambda t=t, kw=kw, backend=backend: run(t, kw, torch.bfloat16, backend))

        def fb(t=t, kw=kw, backend=backend):
            out, _ = run(t, kw, torch.bfloat16, backend)
            out.sum().backward()

        fbm = bench(fb)
        print(f"time {gated} {norm} {act} H={H} {backend}: fwd {f:.3f} ms, fwd+bwd {fbm:.3f} ms", flush=True)
