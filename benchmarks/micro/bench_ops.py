"""pytest-benchmark micro-benchmarks of each fastvit op against its plain-PyTorch reference.

Not part of the test run (the file name does not match ``test_*.py``); run it explicitly:

    python -m pytest benchmarks/micro/bench_ops.py --benchmark-only [--benchmark-compare]

One ViT-B/16 layer at 224 px (B=8 on a GPU, B=1 on the CPU: 197 tokens, 12 heads of 64, width
768), forward and forward+backward, grouped per op so that each fastvit row sits next to its
reference. Ops this build does not have yet are skipped.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from fastvit import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BATCH = 8 if DEVICE == "cuda" else 1
TOKENS, HEADS, HEAD_DIM, PATCH, IMAGE = 197, 12, 64, 16, 224
DIM = HEADS * HEAD_DIM
MODES = ["fwd", "fwd+bwd"]


def randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)


def op_or_skip(name):
    if not hasattr(fastvit, name):
        pytest.skip(f"fastvit.{name} is not in this build")
    return getattr(fastvit, name)


def run(benchmark, fn, inputs, mode):
    """Time fn(*inputs) (fwd) or fn + backward against a random grad_output (fwd+bwd)."""
    grad_out = torch.randn_like(fn(*inputs)) if mode == "fwd+bwd" else None
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        if grad_out is None:
            with torch.no_grad():
                fn(*inputs)
        else:
            torch.autograd.grad(fn(*inputs), wrt, grad_out)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastvit", "reference"])
def test_flash_attention(benchmark, impl, mode):
    op = op_or_skip("flash_attention") if impl == "fastvit" else (lambda q, k, v: reference.attention(q, k, v)[0])
    benchmark.group = f"flash_attention {mode}"
    run(benchmark, op, [randn(BATCH, HEADS, TOKENS, HEAD_DIM, grad=mode != "fwd") for _ in range(3)], mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastvit", "reference"])
def test_axial_attention(benchmark, impl, mode):
    op = fastvit.axial_attention if impl == "fastvit" else reference.axial_attention
    benchmark.group = f"axial_attention {mode}"
    qkv = [randn(BATCH, HEADS, TOKENS, HEAD_DIM, grad=mode != "fwd") for _ in range(3)]
    run(benchmark, lambda q, k, v: op(q, k, v, (14, 14), 1), qkv, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastvit", "reference"])
def test_patch_embed(benchmark, impl, mode):
    op = op_or_skip("patch_embed") if impl == "fastvit" else reference.patch_embed
    benchmark.group = f"patch_embed {mode}"
    grad = mode != "fwd"
    x = randn(BATCH, 3, IMAGE, IMAGE)
    weight, bias = randn(DIM, 3, PATCH, PATCH, grad=grad), randn(DIM, grad=grad)
    pos, cls = randn(1, TOKENS, DIM, grad=grad), randn(1, 1, DIM, grad=grad)
    run(benchmark, lambda x, w, b, p, c: op(x, w, b, pos_embed=p, prefix_tokens=c), [x, weight, bias, pos, cls], mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["fastvit", "reference"])
def test_layernorm_mlp(benchmark, impl, mode):
    op = op_or_skip("layernorm_mlp") if impl == "fastvit" else reference.layernorm_mlp
    benchmark.group = f"layernorm_mlp {mode}"
    grad = mode != "fwd"
    inputs = [
        randn(BATCH, TOKENS, DIM, grad=grad),
        randn(DIM, grad=grad),
        randn(DIM, grad=grad),
        randn(4 * DIM, DIM, grad=grad) * DIM**-0.5,
        randn(4 * DIM, grad=grad),
        randn(DIM, 4 * DIM, grad=grad) * (4 * DIM) ** -0.5,
        randn(DIM, grad=grad),
    ]
    inputs = [t.detach().requires_grad_(grad) for t in inputs]  # leaves after the scaling
    run(benchmark, op, inputs, mode)
