"""A short GPU check of fastvit.rotary_qk (fits a few device minutes), the measurement behind issue
14's RoPE choice (one pass over q and k, or the rotation fused into the attention kernel's loads):

1. compiled Triton forward + backward, both lane layouts, vs the float64 reference with the
   tolerance rule (err <= 2 x err of timm's math in bf16 + atol);
2. timings (triton.testing.do_bench, median) on bf16 views of a packed qkv with a cls token and
   timm's fp32 (N - 1, 2D) embedding: the rotation alone (``rotary_qk`` vs timm's
   ``apply_rot_embed_cat`` + ``torch.cat`` on q and k, with its achieved GB/s), and attention with
   and without it (``fastvit+rope`` vs ``fastvit``, ``sdpa+rope`` vs ``sdpa``). ``fastvit+rope``
   minus ``fastvit`` is the most that fusing the rotation into the attention's loads could save.

    python benchmarks/gpu_checks/rope_quick.py OUT_DIR
"""

import json
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, ".")
from within_budget import check_within_budget

import fastvit
from fastvit import reference

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
ATOL = 1.6e-2  # bf16 (tests/tolerance.py)
P = 1  # one cls token, unrotated
rows, checks, start = [], [], time.time()

try:
    from timm.layers import apply_rot_embed_cat
except ImportError:  # the same math, op for op

    def apply_rot_embed_cat(x, emb, half=False):
        return reference.rotary_qk(x, x, emb, rotate_half=half)[0]


def inputs(b, h, n, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    angles = (torch.rand(n - P, d // 2, device="cuda", generator=g) * 20).repeat_interleave(2, -1)
    return qkv, torch.cat([angles.sin(), angles.cos()], -1)


def views(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def timm_rotation(q, k, rope, half=False):
    q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], 2)
    k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], 2)
    return q, k


def fused_rotation(q, k, rope, half=False):
    with fastvit.backend("triton"):
        return fastvit.rotary_qk(q, k, rope, num_prefix_tokens=P, rotate_half=half)


# 1. correctness: rotary_qk vs float64, the budget from timm's math in bf16
for d, n, half in [(64, 197, False), (64, 197, True), (128, 577, False), (80, 257, True)]:
    qkv, rope = inputs(2, 12, n, d, seed=d + n)
    grads = [torch.randn(2, 12, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    q, k, _ = views(qkv)
    got = fused_rotation(q, k, rope, half)
    got = (*got, *torch.autograd.grad(got, qkv, grads)[0].permute(2, 0, 3, 1, 4)[:2])
    results = []
    for upcast in (True, False):
        qq, kk = (t.detach().double() if upcast else t.detach() for t in (q, k))
        qq, kk = qq.requires_grad_(True), kk.requires_grad_(True)
        outs = timm_rotation(qq, kk, rope.double() if upcast else rope, half)
        results.append((*outs, *torch.autograd.grad(outs, (qq, kk), [g.to(outs[0].dtype) for g in grads])))
    want, lowp = results
    check_within_budget(f"D={d} N={n} half={half}", ("q_rot", "k_rot", "dq", "dk"), got, want, lowp, ATOL, checks)
print("\n".join(checks), flush=True)


# 2. timings
def attention(rotate, sdpa):
    def fn(qkv, rope):
        q, k, v = views(qkv)
        if rotate is not None:
            q, k = rotate(q, k, rope)
            q, k = q.type_as(v), k.type_as(v)
        if sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        with fastvit.backend("triton"):
            return fastvit.flash_attention(q, k, v)

    return fn


def rotation_only(rotate):
    def fn(qkv, rope):
        q, k, _ = views(qkv)
        return torch.stack(rotate(q, k, rope))  # one output for backward (the stack is timed alike for both)

    return fn


def time_both(fn, qkv, rope, grad):
    """(forward ms without autograd, as the attention suite times "fwd"; forward + backward ms)."""

    def inference():
        with torch.no_grad():
            return fn(qkv, rope)

    fwd = do_bench(inference, warmup=25, rep=100, return_mode="median")
    both = do_bench(lambda: torch.autograd.grad(fn(qkv, rope), qkv, grad), warmup=25, rep=100, return_mode="median")
    return fwd, both


IMPLS = {
    "rotary_qk": rotation_only(fused_rotation),
    "timm rotation": rotation_only(timm_rotation),
    "fastvit+rope": attention(fused_rotation, sdpa=False),
    "fastvit": attention(None, sdpa=False),
    "sdpa+rope": attention(timm_rotation, sdpa=True),
    "sdpa": attention(None, sdpa=True),
}
for b, h, n, d in [(8, 12, 197, 64), (8, 12, 577, 64), (8, 12, 1025, 64), (4, 16, 1025, 128), (2, 12, 4097, 64)]:
    if time.time() - start > 200:
        break
    qkv, rope = inputs(b, h, n, d)
    for impl, fn in IMPLS.items():
        out = fn(qkv, rope)
        grad = torch.randn_like(out)
        fwd, both = time_both(fn, qkv, rope, grad)
        # the rotation's own traffic: q, k read and written (bf16), the fp32 table read
        moved = 2 * 2 * 2 * b * h * n * d + 4 * (n - P) * 2 * d
        row = {"impl": impl, "B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16", "fwd_ms": fwd, "fwd_bwd_ms": both}
        if impl in ("rotary_qk", "timm rotation"):
            row["fwd_gbps"] = moved / fwd / 1e6
        rows.append(row)
        gbps = f" ({row['fwd_gbps']:7.1f} GB/s)" if "fwd_gbps" in row else ""
        print(f"{impl:14s} B={b} H={h} N={n:5d} D={d:3d} fwd {fwd:8.4f} ms{gbps}  fwd+bwd {both:8.4f} ms", flush=True)

meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": __import__("triton").__version__}
with open(f"{OUT}/rope_quick.json", "w") as f:
    json.dump({"meta": meta, "checks": checks, "rows": rows}, f, indent=1)
print(meta, f"{time.time() - start:.0f}s")
