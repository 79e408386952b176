"""A short GPU check of fastvit.flash_attention with a mask or rel_pos (fits a minute): compiled
Triton forward + backward against the float64 reference with the tolerance rule (err <= 2 x err of
SDPA in the input dtype + atol), then timings against SDPA given the same mask (rel_pos
materialised as SAM does) in the same run (triton.testing.do_bench, median). The cases are the
kernels' masked paths: a bool key-padding mask (B, 1, 1, N), BEiT's / Swin's learnable float bias
(1, H, N, N) with its gradient (Swin's 7 x 7 windows: the short-sequence tiles and the dBias batch
split), and SAM's decomposed rel_pos on 14 x 14 windows and on its 64 x 64 global grid (tables in
q's dtype: the selection-matrix dots of ``rel_pos_by_mma``). With the learnable bias (D <= 64) it also
checks and times the dBias walk on two stages (``dbias_config``'s candidate: pipelined loads the static
model cannot rate) and the dQ and dK/dV passes in place of the walk that takes them
(``dbias_plan``: Swin's windows) against the default. Windows without a bias gradient (Swin's shifted
windows through ``window_attention``: a bool region mask per window; Hiera's 64-token mask units at
D = 96, no mask; Qwen2.5-VL's 64-token windows packed through ``flash_attention_varlen``) take the
one-launch short backward (``short_backward_config``); those are checked and timed beside the dQ and
dK/dV passes (and, dense, beside the short backward on two stages).

    python benchmarks/gpu_checks/attention_masked.py OUT_DIR [TIME_BUDGET_S]

Without a GPU (TRITON_INTERPRET=1) it runs the same checks on tiny shapes and times nothing: a smoke
test of this script.
"""
import dataclasses
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
from fastvit.kernels import flash_attention as kernels

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
BUDGET_S = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 dots are wrong
ATOL = 1.6e-2
rows, checks, start = [], [], time.time()


def make_case(kind, b, h, n, d, seed):
    """(q, k, v, attn_mask, rel_pos) on the GPU; the float bias and the rel_pos tables need grad."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, grad=True, dtype=DTYPE):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_(grad)

    q, k, v = (randn(b, h, n, d) for _ in range(3))
    mask, rel = None, None
    if kind == "window":  # Swin's shift mask: every other window split into 3 regions that see only themselves
        region = torch.arange(n, device=DEVICE) * 3 // n
        mask = (region[:, None] == region[None, :]).expand(b, 1, n, n).clone()
        mask[::2] = True
    elif kind == "bool":  # key padding: the last ~10% of each sample's keys are padding
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=DEVICE)
        mask[..., n - n // 10:] = False
    elif kind == "bias":  # in q's dtype, as SDPA needs it
        mask = randn(1, h, n, n)
    elif kind == "rel_pos":  # on a side x side grid
        side = int(n**0.5)
        rel = (randn(b, h, n, side), randn(b, h, n, side))
    return q, k, v, mask, rel


def leaves_of(q, k, v, mask, rel):
    leaves = [q, k, v]
    if mask is not None and mask.requires_grad:
        leaves.append(mask)
    return leaves + list(rel or ())


def fastvit_call(q, k, v, mask, rel):
    with fastvit.backend("triton"):
        return fastvit.flash_attention(q, k, v, attn_mask=mask, rel_pos=rel)


def fastvit_varlen_call(q, k, v, mask, rel):
    """The B equal windows of (B, H, n, D) packed end to end, as Qwen-VL's tower hands them to
    ``flash_attention_varlen`` (cu_seqlens every n tokens): (B, H, n, D) back."""
    b, h, n, d = q.shape
    cu = torch.arange(0, b * n + 1, n, dtype=torch.int32, device=q.device)
    packed = [t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v)]
    with fastvit.backend("triton"):
        out = fastvit.flash_attention_varlen(*packed, cu, max_seqlen_q=n)
    return out.view(b, n, h, d).transpose(1, 2)


def sdpa_call(q, k, v, mask, rel):
    if rel is not None:
        mask = (rel[0][..., :, None] + rel[1][..., None, :]).flatten(-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def grads(fn, tensors, grad_out, dtype=None):
    """(out, *grads of the leaves) of fn on detached copies (cast to ``dtype`` when given)."""
    def copy(t):
        if t is None or t.dtype == torch.bool:
            return t
        return t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad)

    copies = [copy(t) for t in tensors[:4]]
    rel = None if tensors[4] is None else tuple(copy(t) for t in tensors[4])
    out = fn(*copies, rel)
    if isinstance(out, tuple):
        out = out[0]
    leaves = leaves_of(*copies, rel)
    return (out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype)))


def time_both(fn, tensors, leaves, grad_out):
    """(forward ms, forward + backward ms), medians of do_bench."""
    fwd = do_bench(lambda: fn(*tensors), warmup=10, rep=50, return_mode="median")
    both = do_bench(lambda: torch.autograd.grad(fn(*tensors), leaves, grad_out), warmup=10, rep=50,
                    return_mode="median")  # fmt: skip
    return fwd, both


def backward_variant(stages=None, whole_walk=True):
    """Make the dBias kernel and the short backward run their launchers' tiles on ``stages`` pipeline
    stages (None: as they are); ``whole_walk`` False: never the walk with dQ (and dK, dV) nor the
    short backward: the dQ and dK/dV passes run. No arguments: as shipped."""
    for name, original in ORIGINAL_CONFIGS.items():
        setattr(kernels, name, original if stages is None else (
            lambda *a, original=original, **kw: (cfg := original(*a, **kw)) and dataclasses.replace(
                cfg, num_stages=stages)))
    kernels.DBIAS_WITH_DQ = kernels.SHORT_BACKWARD = whole_walk


ORIGINAL_CONFIGS = {name: getattr(kernels, name) for name in ("dbias_config", "dbias_dq_config", "short_bwd_config")}


def reference_call(q, k, v, mask, rel):
    return reference.attention(q, k, v, attn_mask=mask, rel_pos=rel)


# the candidates checked and timed beside the default: with the learnable bias (D <= 64) the dQ and
# dK/dV passes in place of the walk that takes them (Swin's 49 x 49 windows fit its tiles, BEiT's 197
# keys do not) and the walk on two stages; windows without a bias gradient, the passes in place of the
# short backward, and the short backward on two stages (one with a mask or above D = 64 on Hopper: the
# loads in flight, which the static model cannot rate, against registers)
SHORT_VARIANTS = [("passes", {"whole_walk": False}), ("short s2", {"stages": 2})]
VARIANTS = {"bias": [("passes", {"whole_walk": False}), ("dbias s2", {"stages": 2})], "window": SHORT_VARIANTS,
            "plain": SHORT_VARIANTS, "varlen": SHORT_VARIANTS[:1]}


def variants_of(kind: str, d: int) -> list:
    return VARIANTS.get(kind, []) if kind != "bias" or d <= 64 else []


CASES = [  # (kind, B, H, N, D): SAM-B's windows are 14 x 14 tokens, its global attention 64 x 64;
    # Swin-T's first stage: 32 images x 64 windows of 7 x 7 tokens, a (1, 3, 49, 49) learnable table,
    # and through window_attention (shifted: a bool mask); Hiera-B's first stage: 32 images x 49 mask
    # units of 64 tokens, one head of D = 96 (the short backward's head-dim halves); Qwen2.5-VL's windowed
    # layers: 64-token windows packed (flash_attention_varlen), 16 heads of D = 80, 1024 windows
    ("bias", 2048, 3, 49, 32), ("window", 2048, 3, 49, 32),
    ("bool", 8, 12, 1025, 64), ("bias", 8, 12, 197, 64), ("rel_pos", 64, 12, 196, 64), ("plain", 1568, 1, 64, 96),
    ("varlen", 1024, 16, 64, 80),
    ("rel_pos", 2, 12, 4096, 64), ("bool", 8, 16, 577, 128), ("bias", 8, 16, 577, 128), ("rel_pos", 2, 16, 4096, 128),
]  # fmt: skip
if DEVICE == "cpu":
    # the bias under 3 batches, 13 x 13: the interpreter's dBias walk with dQ, dK and dV (and the passes beside
    # it); 13 x 13 windows with a region mask, 16-token ones at D = 80, dense and packed: the short backward
    # (and the passes)
    CASES = [("bool", 1, 2, 37, 16), ("bias", 3, 2, 13, 16), ("window", 3, 2, 13, 16), ("plain", 3, 1, 16, 80),
             ("varlen", 3, 2, 16, 80), ("rel_pos", 1, 2, 36, 16), ("rel_pos", 1, 1, 400, 16)]  # fmt: skip
for kind, b, h, n, d in CASES:
    if time.time() - start > BUDGET_S:
        checks.append(f"SKIPPED (budget) {kind} B={b} N={n} D={d}")
        continue
    tensors = make_case(kind, b, h, n, d, seed=n + d)
    grad_out = torch.randn(b, h, n, d, device=DEVICE, dtype=DTYPE)
    label = f"{kind} B={b} H={h} N={n} D={d}"
    try:
        want = grads(reference_call, tensors, grad_out, torch.float64)
        base = grads(sdpa_call, tensors, grad_out)
        for suffix, variant in [("", {})] + [(f" ({tag})", variant) for tag, variant in variants_of(kind, d)]:
            backward_variant(**variant)
            got = grads(fastvit_varlen_call if kind == "varlen" else fastvit_call, tensors, grad_out)
            backward_variant()
            names = [f"tensor {i}" for i in range(len(want))]
            check_within_budget(label + suffix, names, got, want, base, ATOL, checks)
    except Exception as exc:  # a failing case is reported, the next one still runs
        backward_variant()
        checks.append(f"ERROR {label}: {type(exc).__name__}: {exc}")
        continue
    print(checks[-1], flush=True)
    if DEVICE == "cpu":
        continue
    q, k, v, mask, rel = tensors
    leaves = leaves_of(q, k, v, mask, rel)
    flops = 4.0 * b * h * n * n * d
    call = fastvit_varlen_call if kind == "varlen" else fastvit_call
    impls = [("fastvit[triton]", call, {}), ("sdpa", sdpa_call, {})]
    impls[1:1] = [(f"fastvit[{tag}]", call, variant) for tag, variant in variants_of(kind, d)]
    for impl, fn, variant in impls:
        backward_variant(**variant)
        try:
            fwd, both = time_both(fn, tensors, leaves, grad_out)
        except torch.cuda.OutOfMemoryError:  # SDPA's materialised (B, H, N, N) rel_pos bias
            checks.append(f"OOM {impl} {label}")
            torch.cuda.empty_cache()
            continue
        finally:
            backward_variant()
        rows.append({"impl": impl, "kind": kind, "B": b, "H": h, "N": n, "D": d, "dtype": "bfloat16",
                     "fwd_ms": fwd, "fwd_bwd_ms": both, "fwd_tflops": flops / fwd / 1e9,
                     "fwd_bwd_tflops": 3.5 * flops / both / 1e9})  # fmt: skip
        print(f"{impl:16s} {label:32s} fwd {fwd:8.4f} ms ({flops / fwd / 1e9:6.1f} TFLOP/s)  "
              f"fwd+bwd {both:8.4f} ms ({3.5 * flops / both / 1e9:6.1f} TFLOP/s)", flush=True)

device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)"
meta = {"device": device, "torch": torch.__version__, "triton": __import__("triton").__version__}
with open(f"{OUT}/attention_masked.json", "w") as f:
    json.dump({"meta": meta, "checks": checks, "rows": rows}, f, indent=1)
print("\n".join(c for c in checks if not c.startswith("PASS")), meta, f"{time.time() - start:.0f}s")
