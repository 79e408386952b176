"""The fastvit_C extension on CPU tensors: every block op against float64 math under the tolerance
rule, the composites against fastvit.reference (output and every gradient), the fake
implementations (opcheck), determinism, and the loader's build tag and toolkit probing.

The extension is compiled once per session with ``fastvit.extension.load(build=True)``: the CUDA
build where nvcc is found (CI compiles and links the CUDA side on the CPU machine), else CPU-only.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastvit import extension, reference
from fastvit.cache import cache_dir
from tests.tolerance import assert_close_to_reference

LOWP = (torch.float32, torch.bfloat16, torch.float16)
BLOCKS = ("layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "scaled_residual", "patchify",
          "unpatchify")
COMPOSITES = ("layernorm_mlp_fwd", "layernorm_mlp_bwd", "patch_embed_fwd", "patch_embed_bwd")
MLP_NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "layer_scale",
             "sample_scale")


@pytest.fixture(scope="module")
def ops():
    """torch.ops.fastvit_C, compiled on first use (cached across sessions in the fastvit cache folder)."""
    if not extension.load(build=True):
        reason = extension.unavailable_reason() or ""
        if reason.startswith("no C++ compiler"):
            pytest.skip(reason)
        pytest.fail(f"the extension did not build: {reason}")
    return torch.ops.fastvit_C


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _row_view(rows: int, dim: int, dtype: torch.dtype, gen: torch.Generator, pad: int = 5) -> torch.Tensor:
    """(rows, dim) with a row stride of dim + pad: a view into a wider buffer, as a token slice."""
    return torch.randn(rows, dim + pad, generator=gen).to(dtype)[:, :dim]


# ---------------------------------------------------------------------------------------------
# the build itself
# ---------------------------------------------------------------------------------------------
def test_every_op_has_a_cpu_kernel_and_the_cuda_side_linked_when_built_with_nvcc(ops):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in BLOCKS + COMPOSITES:
        assert has(f"fastvit_C::{name}", "CPU"), name
    if extension.cuda_home() is None:
        assert not extension.has_cuda_kernels()
        pytest.skip("no CUDA toolkit here: the build is CPU-only")
    # the CUDA build registers ops_cuda.cpp's block kernels and the composites for the CUDA key
    assert extension.has_cuda_kernels()
    for name in BLOCKS + COMPOSITES:
        assert has(f"fastvit_C::{name}", "CUDA"), name
    assert extension.unavailable_reason() is None


# ---------------------------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------------------------
LN_SHAPES = [(1, 37), (7, 48), (197, 768)]  # one row; an odd count and a width that is no power of 2; ViT-B


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("rows,dim", LN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_fwd(ops, dtype, rows, dim, affine):
    gen = _gen(rows + dim)
    x = (_row_view(rows, dim, torch.float32, gen) * 2 + 3).to(dtype)  # non-zero mean: centring matters
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype) if affine else None
    b = (0.3 * torch.randn(dim, generator=gen)).to(dtype) if affine else None
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-6, dtype)
    assert y.dtype == dtype and y.is_contiguous() and mean.dtype == rstd.dtype == torch.float32

    def ref(t, wt, bt):
        return F.layer_norm(t, (dim,), wt, bt, 1e-6)

    d = [None if t is None else t.double() for t in (x, w, b)]
    assert_close_to_reference(y, ref(*d), ref(x, w, b), name="y", dtype=dtype)
    var, mu = torch.var_mean(d[0], dim=1, unbiased=False)
    torch.testing.assert_close(mean.double(), mu, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + 1e-6).rsqrt(), rtol=1e-5, atol=0)


def test_layer_norm_fwd_converts_to_out_dtype(ops):
    gen = _gen(3)
    x = _row_view(9, 48, torch.bfloat16, gen)
    w = torch.randn(48, generator=gen)  # fp32 weight beside bf16 rows: any float dtype
    y32, _, _ = ops.layer_norm_fwd(x, w, None, 1e-5, torch.float32)
    y16, _, _ = ops.layer_norm_fwd(x, w, None, 1e-5, torch.bfloat16)
    assert y32.dtype == torch.float32
    assert torch.equal(y32.to(torch.bfloat16), y16)  # computed in fp32 and rounded once
    torch.testing.assert_close(y32.double(), F.layer_norm(x.double(), (48,), w.double(), None, 1e-5), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("rows,dim", LN_SHAPES)
@pytest.mark.parametrize("grad_kind", ["strided", "broadcast", "scalar"])
def test_layer_norm_bwd(ops, dtype, rows, dim, grad_kind):
    gen = _gen(rows * dim)
    x = (_row_view(rows, dim, torch.float32, gen) + 1).to(dtype)
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype)
    b = (0.3 * torch.randn(dim, generator=gen)).to(dtype)
    if grad_kind == "broadcast":  # one row expanded: row stride 0
        gy = torch.randn(dim, generator=gen).to(dtype).expand(rows, dim)
    elif grad_kind == "scalar":  # out.sum()'s gradient: strides (0, 0)
        gy = torch.full((), 0.7, dtype=dtype).expand(rows, dim)
    else:
        gy = _row_view(rows, dim, dtype, gen, pad=3)
    _, mean, rstd = ops.layer_norm_fwd(x, w, b, 1e-6, dtype)
    dx, dw, db = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, True, True])

    def grads(xt, wt, bt, g):
        xt, wt, bt = (t.detach().requires_grad_(True) for t in (xt, wt, bt))
        return torch.autograd.grad(F.layer_norm(xt, (dim,), wt, bt, 1e-6), (xt, wt, bt), g)

    oracle = grads(x.double(), w.double(), b.double(), gy.double())
    lowp = grads(x, w, b, gy)
    for name, got, want, low in zip(("dx", "dweight", "dbias"), (dx, dw, db), oracle, lowp, strict=True):
        assert got.dtype == dtype and got.is_contiguous()
        # dweight / dbias sum `rows` products: the slack grows with the row count
        atol = None if name == "dx" else {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype] * (
            math.sqrt(rows) * max(1.0, want.abs().max().item())
        )
        assert_close_to_reference(got, want, low, name=name, dtype=dtype, atol=atol)


def test_layer_norm_bwd_output_mask_and_no_weight(ops):
    gen = _gen(1)
    x = torch.randn(7, 37, generator=gen)
    gy = torch.randn(7, 37, generator=gen)
    _, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-6, torch.float32)
    dx, dw, db = ops.layer_norm_bwd(gy, x, None, mean, rstd, [True, False, True])
    assert dw.shape == (0,)
    xd = x.double().requires_grad_(True)
    torch.testing.assert_close(dx.double(), torch.autograd.grad(F.layer_norm(xd, (37,), eps=1e-6), xd, gy.double())[0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(db, gy.sum(0))
    dx2, dw2, db2 = ops.layer_norm_bwd(gy, x, None, mean, rstd, [False, True, False])
    assert dx2.shape == db2.shape == (0,) and dw2.shape == (37,)


def _residual_grad(kind: str, rows: int, dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """The skip connection's gradient in one of three layouts."""
    if kind == "broadcast":  # one row expanded (row stride 0): a (B, N, D) gradient broadcast over tokens
        return torch.randn(dim, generator=gen).to(dtype).expand(rows, dim)
    if kind == "strided":  # a padded row stride
        return _row_view(rows, dim, dtype, gen, pad=7)
    return torch.randn(rows, dim, generator=gen).to(dtype)


@pytest.mark.parametrize(
    "x_dtype,grad_dtype,res_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16, torch.float32),  # a bf16 stream whose grad_out came back in fp32
        (torch.float32, torch.bfloat16, torch.float32),  # fp32 stream, bf16 GEMM gradient (autocast)
        (torch.float16, torch.float32, torch.bfloat16),  # three different dtypes
    ],
)
@pytest.mark.parametrize("res_kind", ["contiguous", "strided", "broadcast"])
@pytest.mark.parametrize("rows,dim", [(7, 48), (197, 768)])
def test_layer_norm_bwd_residual_grad(ops, x_dtype, grad_dtype, res_dtype, res_kind, rows, dim):
    gen = _gen(rows + dim + len(res_kind))
    x = (_row_view(rows, dim, torch.float32, gen) + 1).to(x_dtype)
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).to(x_dtype)
    gy = _row_view(rows, dim, grad_dtype, gen, pad=3)
    res = _residual_grad(res_kind, rows, dim, res_dtype, gen)
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, 1e-6, x_dtype)
    dx, dw, db = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, True, True], res)
    assert dx.dtype == x_dtype and dx.is_contiguous()
    # the residual touches dx only: dweight / dbias are those of the call without it, bit for bit
    _, dw0, db0 = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, True, True])
    assert torch.equal(dw, dw0) and torch.equal(db, db0)

    def dx_of(xt, wt, g, r):
        xt = xt.detach().requires_grad_(True)
        return torch.autograd.grad(F.layer_norm(xt, (dim,), wt, None, 1e-6), xt, g)[0] + r

    oracle = dx_of(x.double(), w.double(), gy.double(), res.double())
    low = min((x_dtype, grad_dtype, res_dtype), key=lambda d: torch.finfo(d).bits)
    lowp = dx_of(x.to(low), w.to(low), gy.to(low), res.to(low))
    assert_close_to_reference(dx, oracle, lowp, name="dx + residual_grad", dtype=low)
    # one rounding: the fp32 twin of x (same values, same code path) gives fp32 dx + residual, which rounds to dx
    dx32, _, _ = ops.layer_norm_bwd(gy, x.float(), w, mean, rstd, [True, False, False], res)
    assert torch.equal(dx32.to(x_dtype), dx)
    # any layout of the residual reads the same values
    dx_packed, _, _ = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, False, False], res.contiguous())
    assert torch.equal(dx_packed, dx)


def test_layer_norm_bwd_residual_grad_is_checked(ops):
    x = torch.randn(7, 48)
    _, mean, rstd = ops.layer_norm_fwd(x, None, None, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match=r"residual_grad must have shape \(7, 48\)"):
        ops.layer_norm_bwd(x, x, None, mean, rstd, [True, False, False], torch.randn(7, 47))
    with pytest.raises(RuntimeError, match="residual_grad must be float16, bfloat16 or float32"):
        ops.layer_norm_bwd(x, x, None, mean, rstd, [True, False, False], x.double())


def test_layer_norm_bwd_is_deterministic_across_thread_counts(ops):
    gen = _gen(2)
    rows, dim = 1000, 96  # many 64-row chunks
    x = torch.randn(rows, dim, generator=gen)
    w = torch.randn(dim, generator=gen)
    gy = torch.randn(rows, dim, generator=gen)
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, 1e-6, torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, True, True]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# bias + GELU, scaled residual
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,hidden", [(1, 97), (7, 97), (197, 3072)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(ops, dtype, approximate, rows, hidden, with_bias):
    gen = _gen(rows + hidden)
    pre = (2 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    bias = torch.randn(hidden, generator=gen).to(dtype) if with_bias else None
    grad = torch.randn(hidden, generator=gen).to(dtype).expand(rows, hidden)  # row stride 0

    def fwd(p, bt):
        return F.gelu(p + bt if bt is not None else p, approximate=approximate)

    def bwd(p, bt, g):
        p = p.detach().requires_grad_(True)
        return torch.autograd.grad(fwd(p, bt), p, g)[0]

    d = [None if t is None else t.double() for t in (pre, bias, grad)]
    y = ops.bias_gelu_fwd(pre, bias, approximate)
    assert y.dtype == dtype and y.shape == pre.shape
    assert_close_to_reference(y, fwd(d[0], d[1]), fwd(pre, bias), name="gelu", dtype=dtype)
    dpre = ops.bias_gelu_bwd(grad, pre, bias, approximate)
    assert dpre.dtype == dtype
    assert_close_to_reference(dpre, bwd(d[0], d[1], d[2]), bwd(pre, bias, grad), name="dgelu", dtype=dtype)


def test_gelu_forms_match_pytorch_in_fp32(ops):
    # the row_math.h formulas over a wide range (both tails, where 1 + erf cancels), both forms, against
    # float64 with the budget of PyTorch's own fp32 kernels
    x = torch.linspace(-12, 12, 4001).unsqueeze(0)
    g = torch.ones_like(x)

    def value_and_grad(t, approximate):
        t = t.clone().requires_grad_(True)
        y = F.gelu(t, approximate=approximate)
        return y.detach(), torch.autograd.grad(y, t, torch.ones_like(t))[0]

    for approximate in ("none", "tanh"):
        y64, d64 = value_and_grad(x.double(), approximate)
        y32, d32 = value_and_grad(x, approximate)
        assert_close_to_reference(ops.bias_gelu_fwd(x, None, approximate), y64, y32, name=f"gelu {approximate}",
                                  atol=1e-6)
        assert_close_to_reference(ops.bias_gelu_bwd(g, x, None, approximate), d64, d32, name=f"dgelu {approximate}",
                                  atol=1e-6)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("terms", ["all", "residual", "layer_scale", "sample_scale", "none"])
def test_scaled_residual(ops, dtype, terms):
    gen = _gen(5)
    batch, tokens, dim = 3, 7, 48
    branch = _row_view(batch * tokens, dim, dtype, gen)
    residual = _row_view(batch * tokens, dim, torch.float32, gen, pad=2) if terms in ("all", "residual") else None
    ls = torch.randn(dim, generator=gen).to(dtype) if terms in ("all", "layer_scale") else None
    ss = torch.rand(batch, generator=gen) if terms in ("all", "sample_scale") else None
    out = ops.scaled_residual(branch, residual, ls, ss, tokens, dtype)
    assert out.dtype == dtype and out.is_contiguous()
    want = branch.double()
    if ls is not None:
        want = want * ls.double()
    if ss is not None:
        want = want * ss.double().repeat_interleave(tokens)[:, None]
    if residual is not None:
        want = want + residual.double()
    # fp32 math rounded once: the error is the output rounding
    assert_close_to_reference(out, want, want.to(dtype), name="scaled_residual", dtype=dtype)
    out32 = ops.scaled_residual(branch, residual, ls, ss, tokens, torch.float32)
    torch.testing.assert_close(out32.double(), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# patchify / unpatchify
# ---------------------------------------------------------------------------------------------
def _patchify_ref(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b * (h // p) * (w // p), c * p * p)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape,p", [((2, 3, 32, 48), 16), ((1, 1, 14, 21), 7), ((3, 5, 8, 8), 2), ((1, 3, 4, 4), 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_patchify_unpatchify_round_trip(ops, dtype, shape, p, layout):
    gen = _gen(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a crop of a larger image batch
        b, c, h, w = shape
        x = torch.randn(b, c + 1, h + 3, w + 2, generator=gen).to(dtype)[:, 1:, 2 : 2 + h, 1 : 1 + w]
    cols = ops.patchify(x, p, dtype)
    assert cols.is_contiguous()
    assert torch.equal(cols, _patchify_ref(x, p))
    back = ops.unpatchify(cols, list(shape), p, dtype)
    assert back.is_contiguous() and torch.equal(back, x)
    # conversion on the way: exactly one rounding
    other = torch.float32 if dtype != torch.float32 else torch.bfloat16
    assert torch.equal(ops.patchify(x, p, other), _patchify_ref(x, p).to(other))
    assert torch.equal(ops.unpatchify(cols, list(shape), p, other), x.to(other))


# ---------------------------------------------------------------------------------------------
# composites: LayerNorm + MLP
# ---------------------------------------------------------------------------------------------
def _mlp_inputs(batch, tokens, dim, hidden, *, bias, affine, ls, ss, dtype, seed=0):
    gen = _gen(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    sample = None
    if ss:
        sample = 0.5 + torch.rand(batch, generator=gen)
        sample[-1] = 0.0  # a dropped sample
    t = {
        "x": randn(batch, tokens, dim) + randn(batch, tokens, 1),
        "norm_weight": 1 + 0.2 * randn(dim) if affine else None,
        "norm_bias": 0.2 * randn(dim) if affine else None,
        "fc1_weight": randn(hidden, dim) / math.sqrt(dim),
        "fc1_bias": 0.2 * randn(hidden) if bias else None,
        "fc2_weight": randn(dim, hidden) / math.sqrt(hidden),
        "fc2_bias": 0.2 * randn(dim) if bias else None,
        "layer_scale": 0.5 * randn(dim) if ls else None,
        "sample_scale": sample,
    }
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def _mlp_reference(t, grad_out, approximate, residual):
    """(y, the nine gradients) of fastvit.reference.layernorm_mlp in t's dtype."""
    leaves = {k: None if v is None else v.detach().requires_grad_(True) for k, v in t.items()}
    y = reference.layernorm_mlp(
        leaves["x"], leaves["norm_weight"], leaves["norm_bias"], leaves["fc1_weight"], leaves["fc1_bias"],
        leaves["fc2_weight"], leaves["fc2_bias"], eps=1e-6, approximate=approximate, residual=residual,
        layer_scale=leaves["layer_scale"], sample_scale=leaves["sample_scale"],
    )
    present = [k for k in MLP_NAMES if leaves[k] is not None]
    grads = dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], grad_out), strict=True))
    return y.detach(), grads


MLP_CASES = [
    # (bias, affine, layer_scale, sample_scale, residual, approximate)
    (True, True, False, False, True, "none"),  # timm ViT
    (True, True, True, True, True, "tanh"),  # LayerScale + drop-path, tanh GELU
    (False, False, True, False, False, "none"),  # no biases, no affine, branch only
    (True, True, False, True, False, "tanh"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", MLP_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("batch,tokens,dim,hidden", [(2, 7, 48, 97), (1, 197, 64, 256)])
def test_layernorm_mlp_composite(ops, dtype, case, batch, tokens, dim, hidden):
    bias, affine, ls, ss, residual, approximate = case
    t = _mlp_inputs(batch, tokens, dim, hidden, bias=bias, affine=affine, ls=ls, ss=ss, dtype=dtype)
    grad_out = torch.randn(batch, tokens, dim, generator=_gen(9)).to(dtype)
    args = [t[k] for k in MLP_NAMES]
    y, preact, mean, rstd, branch = ops.layernorm_mlp_fwd(*args, 1e-6, approximate, residual, dtype, True)
    assert y.shape == (batch, tokens, dim) and y.dtype == dtype
    assert preact.shape == (batch * tokens, hidden) and mean.shape == rstd.shape == (batch * tokens,)
    assert branch.shape == ((batch * tokens, dim) if (ls or ss) else (0,))
    grads = ops.layernorm_mlp_bwd(grad_out, *args, preact, mean, rstd, branch, 1e-6, approximate, residual, [True] * 9)

    y64, g64 = _mlp_reference({k: None if v is None else v.double() for k, v in t.items()}, grad_out.double(),
                              approximate, residual)
    ylow, glow = _mlp_reference(t, grad_out, approximate, residual)
    assert_close_to_reference(y, y64, ylow, name="y", dtype=dtype)
    for name, got in zip(MLP_NAMES, grads, strict=True):
        if t[name] is None:
            assert got.shape == (0,), name
            continue
        assert got.shape == t[name].shape and got.dtype == dtype, name
        # parameter gradients sum over B*N rows: slack grows like sqrt(rows) * magnitude
        atol = None
        if name != "x":
            unit = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
            atol = unit * math.sqrt(batch * tokens) * max(1.0, g64[name].abs().max().item())
        assert_close_to_reference(got, g64[name], glow[name], name=name, dtype=dtype, atol=atol)


def test_layernorm_mlp_inference_paths_and_needs(ops):
    t = _mlp_inputs(2, 7, 48, 97, bias=True, affine=True, ls=True, ss=True, dtype=torch.float32, seed=4)
    args = [t[k] for k in MLP_NAMES]
    for approximate in ("none", "tanh"):  # without saving (on CUDA, tanh takes cuBLASLt's GELU epilogue)
        y, preact, mean, rstd, branch = ops.layernorm_mlp_fwd(*args, 1e-6, approximate, True, torch.float32, False)
        assert preact.shape == branch.shape == (0,)
        want = reference.layernorm_mlp(*args[:7], eps=1e-6, approximate=approximate, layer_scale=t["layer_scale"],
                                       sample_scale=t["sample_scale"])
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # only fc2's gradients, from a broadcast grad_out (out.sum()): the rest are (0,) and not computed
    _, preact, mean, rstd, branch = ops.layernorm_mlp_fwd(*args, 1e-6, "none", True, torch.float32, True)
    grad_out = torch.ones(1, 1, 48).expand(2, 7, 48)
    needs = [False] * 5 + [True, True, False, False]
    grads = ops.layernorm_mlp_bwd(grad_out, *args, preact, mean, rstd, branch, 1e-6, "none", True, needs)
    _, g64 = _mlp_reference({k: v.double() for k, v in t.items()}, grad_out.double(), "none", True)
    for i, name in enumerate(MLP_NAMES):
        if needs[i]:
            torch.testing.assert_close(grads[i].double(), g64[name], rtol=1e-5, atol=1e-5)
        else:
            assert grads[i].shape == (0,), name
    # every gradient from out.sum()'s gradient (strides (0, 0, 0)), twice: the same bits
    grad_out = torch.ones(()).expand(2, 7, 48)
    first = ops.layernorm_mlp_bwd(grad_out, *args, preact, mean, rstd, branch, 1e-6, "none", True, [True] * 9)
    again = ops.layernorm_mlp_bwd(grad_out, *args, preact, mean, rstd, branch, 1e-6, "none", True, [True] * 9)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    _, g64 = _mlp_reference({k: v.double() for k, v in t.items()}, grad_out.double(), "none", True)
    for name, got in zip(MLP_NAMES, first, strict=True):
        torch.testing.assert_close(got.double(), g64[name], rtol=1e-4, atol=1e-4)


def test_layernorm_mlp_fp32_stream_with_bf16_gemms(ops):
    # timm under autocast: fp32 x, scales and output, GEMMs (weights) in bf16
    t = _mlp_inputs(2, 7, 48, 97, bias=True, affine=True, ls=True, ss=False, dtype=torch.float32, seed=6)
    for k in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
        t[k] = t[k].to(torch.bfloat16)
    args = [t[k] for k in MLP_NAMES]
    y, preact, _, _, branch = ops.layernorm_mlp_fwd(*args, 1e-6, "none", True, torch.float32, True)
    assert y.dtype == torch.float32 and preact.dtype == branch.dtype == torch.bfloat16
    y64, _ = _mlp_reference({k: None if v is None else v.double() for k, v in t.items()}, torch.ones(2, 7, 48,
                            dtype=torch.float64), "none", True)
    low = {k: None if v is None else v.to(torch.bfloat16) for k, v in t.items()}
    ylow, _ = _mlp_reference(low, torch.ones(2, 7, 48, dtype=torch.bfloat16), "none", True)
    assert_close_to_reference(y, y64, ylow, name="y", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# composites: patch embedding
# ---------------------------------------------------------------------------------------------
PE_CASES = [
    # (num_prefix, pos_embed: None / "full" / "patches", bias, channels_last)
    (1, "full", True, False),  # timm ViT: cls token, pos_embed over all tokens
    (5, "patches", True, True),  # cls + 4 registers, no_embed_class, channels_last images
    (0, "full", False, False),  # no prefix: pos_embed of N rows
    (2, None, True, False),  # DeiT-distilled prefix, no pos_embed
    (0, None, True, False),  # a bare Conv2d + flatten
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PE_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("shape,p,dim", [((2, 3, 32, 48), 16, 40), ((3, 1, 14, 21), 7, 24)])
def test_patch_embed_composite(ops, dtype, case, shape, p, dim):
    num_prefix, pos_kind, with_bias, channels_last = case
    gen = _gen(num_prefix + dim)
    b, c, h, w = shape
    n = (h // p) * (w // p)
    x = torch.randn(shape, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = {
        "x": x,
        "weight": (torch.randn(dim, c, p, p, generator=gen) / math.sqrt(c * p * p)).to(dtype),
        "bias": (0.2 * torch.randn(dim, generator=gen)).to(dtype) if with_bias else None,
        "pos_embed": None if pos_kind is None else torch.randn(
            1, n + (num_prefix if pos_kind == "full" else 0), dim, generator=gen).to(dtype),
        "prefix_tokens": torch.randn(1, num_prefix, dim, generator=gen).to(dtype) if num_prefix else None,
    }
    out = ops.patch_embed_fwd(t["x"], t["weight"], t["bias"], t["pos_embed"], t["prefix_tokens"])
    assert out.shape == (b, num_prefix + n, dim) and out.dtype == dtype
    grad = torch.randn(b, num_prefix + n, dim, generator=gen).to(dtype)
    pos_len = 0 if t["pos_embed"] is None else t["pos_embed"].shape[1]
    needs = [True, True, with_bias, pos_kind is not None, num_prefix > 0]
    grads = ops.patch_embed_bwd(grad, t["x"], t["weight"], num_prefix, pos_len, needs)

    def run(tensors, g):
        leaves = {k: None if v is None else v.detach().requires_grad_(True) for k, v in tensors.items()}
        y = reference.patch_embed(leaves["x"], leaves["weight"], leaves["bias"], pos_embed=leaves["pos_embed"],
                                  prefix_tokens=leaves["prefix_tokens"])
        present = [k for k in leaves if leaves[k] is not None]
        return y.detach(), dict(zip(present, torch.autograd.grad(y, [leaves[k] for k in present], g), strict=True))

    y64, g64 = run({k: None if v is None else v.double() for k, v in t.items()}, grad.double())
    ylow, glow = run(t, grad)
    assert_close_to_reference(out, y64, ylow, name="tokens", dtype=dtype)
    for i, name in enumerate(("x", "weight", "bias", "pos_embed", "prefix_tokens")):
        if not needs[i]:
            assert grads[i].shape == (0,), name
            continue
        got = grads[i]
        want_dtype = dtype if i < 2 else torch.float32  # the small sums come back in fp32
        assert got.dtype == want_dtype and got.shape == t[name].shape, name
        atol = None
        if name != "x":
            unit = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
            atol = unit * math.sqrt(b * n) * max(1.0, g64[name].abs().max().item())
        assert_close_to_reference(got, g64[name], glow[name], name=name, dtype=dtype, atol=atol)
    again = ops.patch_embed_bwd(grad, t["x"], t["weight"], num_prefix, pos_len, needs)
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))  # deterministic
    # out.sum()'s gradient (strides (0, 0, 0)) gives what its materialised copy gives
    ones = torch.ones((), dtype=dtype).expand_as(grad)
    for a, b in zip(ops.patch_embed_bwd(ones, t["x"], t["weight"], num_prefix, pos_len, needs),
                    ops.patch_embed_bwd(ones.contiguous(), t["x"], t["weight"], num_prefix, pos_len, needs),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# fake implementations (torch.compile) and bad input
# ---------------------------------------------------------------------------------------------
def _opcheck_cases():
    gen = _gen(11)
    x = _row_view(7, 37, torch.bfloat16, gen)
    w = torch.randn(37, generator=gen)
    mean = torch.randn(7, generator=gen)
    rstd = torch.rand(7, generator=gen) + 0.5
    pre = torch.randn(7, 97, generator=gen).to(torch.bfloat16)
    img = torch.randn(2, 3, 8, 12, generator=gen).contiguous(memory_format=torch.channels_last)
    t = _mlp_inputs(2, 7, 48, 97, bias=True, affine=True, ls=True, ss=True, dtype=torch.float32, seed=12)
    mlp = [t[k] for k in MLP_NAMES]
    pre_m, mean_m, rstd_m, branch_m = torch.ops.fastvit_C.layernorm_mlp_fwd(*mlp, 1e-6, "none", True,
                                                                            torch.float32, True)[1:]
    pw = torch.randn(16, 3, 4, 4, generator=gen)
    return [
        ("layer_norm_fwd", (x, w, None, 1e-6, torch.float32)),
        ("layer_norm_bwd", (x.float().expand(7, 37), x, w, mean, rstd, [True, False, True])),
        ("layer_norm_bwd", (x, x, w, mean, rstd, [True, True, False],
                            torch.randn(37, generator=gen).half().expand(7, 37))),  # residual_grad, row stride 0
        ("bias_gelu_fwd", (pre, None, "tanh")),
        ("bias_gelu_bwd", (pre, pre, torch.randn(97, generator=gen), "none")),
        ("scaled_residual", (x, x.float(), w, torch.rand(7, generator=gen), 1, torch.bfloat16)),
        ("patchify", (img, 4, torch.bfloat16)),
        ("unpatchify", (torch.randn(12, 48, generator=gen), [2, 3, 8, 12], 4, torch.float32)),
        ("layernorm_mlp_fwd", (*mlp, 1e-6, "tanh", True, torch.float32, True)),
        ("layernorm_mlp_fwd", (*mlp, 1e-6, "tanh", False, torch.float32, False)),
        ("layernorm_mlp_bwd", (torch.randn(2, 7, 48, generator=gen), *mlp, pre_m, mean_m, rstd_m, branch_m, 1e-6,
                               "none", True, [True, False, True, True, False, True, True, True, True])),
        ("patch_embed_fwd", (img, pw, torch.randn(16, generator=gen), torch.randn(1, 7, 16, generator=gen),
                             torch.randn(1, 1, 16, generator=gen))),
        ("patch_embed_bwd", (torch.randn(2, 7, 16, generator=gen), img, pw, 1, 6, [True, True, True, True, True])),
    ]


def test_opcheck_every_op(ops):
    """Schema, fake tensor and AOT-dispatch checks (opcheck) for every op: the fakes agree with the kernels on
    shape, dtype and strides, so torch.compile traces the ops."""
    cases = _opcheck_cases()
    assert {name for name, _ in cases} == set(BLOCKS + COMPOSITES)
    for name, args in cases:
        torch.library.opcheck(getattr(ops, name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_bad_input_is_a_clear_error(ops):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="unit last-dim stride"):
        ops.layer_norm_fwd(x.t(), None, None, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.layer_norm_fwd(x.double(), None, None, 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="approximate"):
        ops.bias_gelu_fwd(x, None, "sigmoid")
    with pytest.raises(RuntimeError, match="multiples of patch"):
        ops.patchify(torch.randn(1, 3, 10, 12), 4, torch.float32)


# ---------------------------------------------------------------------------------------------
# the loader: sources, tag, toolkit probing
# ---------------------------------------------------------------------------------------------
def test_load_is_thread_safe_and_adopts_a_library_loaded_by_other_means(ops, tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(extension.load())) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [True] * 4
    cuda = extension.has_cuda_kernels()
    library = extension._library_path(cache_dir() / "extension" / extension.build_tag(extension.sources(cuda), cuda))
    if not library.is_file():
        pytest.skip("the extension came from an ahead-of-time fastvit._C build")
    script = textwrap.dedent(
        f"""
        import torch
        torch.ops.load_library({str(library)!r})
        import fastvit.extension as ext
        assert ext.load(build=False) and ext.unavailable_reason() is None
        assert torch._library.simple_registry.singleton.find("fastvit_C::patchify").fake_impl.kernel is not None
        print("adopted")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and "adopted" in out.stdout, out.stderr[-2000:]


def test_cuda_backend_without_a_build_says_how_to_build_not_that_load_has_not_run(tmp_path):
    """A fresh process with an empty cache and no GPU: ``backend("cuda")`` runs ``load()``, which finds
    no build and does not compile; the error gives that reason (and how to build), not the
    placeholder "load() has not run" that stood before ``load()`` ran."""
    script = textwrap.dedent(
        """
        import importlib.util
        import torch
        import fastvit
        from fastvit import extension
        if importlib.util.find_spec("fastvit._C") is not None:
            print("ahead-of-time build")
            raise SystemExit(0)
        x = torch.randn(2, 3, 8)
        try:
            with fastvit.backend("cuda"):
                fastvit.layernorm_mlp(x, None, None, torch.randn(16, 8), None, torch.randn(8, 16), None)
        except RuntimeError as exc:
            print("ERROR:", exc)
            print("REASON:", extension.unavailable_reason())
        """
    )
    env = {**os.environ, "FASTVIT_CACHE_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    if "ahead-of-time build" in out.stdout:
        pytest.skip("fastvit._C is installed ahead of time: nothing is left unbuilt")
    assert "ERROR: fastvit backend 'cuda' needs the C++/CUDA extension" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "has not run" not in out.stdout
    assert "not built: no fastvit._C module and no cached build in" in out.stdout
    assert "fastvit.extension.load(build=True)" in out.stdout
    assert str(tmp_path) in out.stdout


def test_sources_are_found_next_to_the_package():
    cpu = extension.sources(cuda=False)
    assert [p.name for p in cpu] == ["cpu_loops.cpp", "ops.cpp", "module.cpp"]
    assert all(p.is_file() and p.is_absolute() for p in cpu)
    cuda = extension.sources(cuda=True)
    assert cuda[:3] == cpu and "ops_cuda.cpp" in [p.name for p in cuda]
    assert any(p.suffix == ".cu" for p in cuda)


def test_build_tag_changes_with_sources_headers_and_device_side(tmp_path):
    for name in ("ops.cpp", "cpu_loops.cpp", "row_math.h"):
        (tmp_path / name).write_text(f"// {name}\n")
    files = [tmp_path / "ops.cpp", tmp_path / "cpu_loops.cpp"]
    tag = extension.build_tag(files, cuda=False)
    assert tag == extension.build_tag(files, cuda=False)  # stable
    assert tag.startswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch")
    assert torch.__version__.replace("+", "_") in tag and tag.split("-")[-2] == "cpu"
    assert extension.build_tag(files, cuda=True) != tag
    (tmp_path / "ops.cpp").write_text("// ops.cpp, edited\n")
    edited = extension.build_tag(files, cuda=False)
    assert edited != tag
    (tmp_path / "row_math.h").write_text("// a header edit rebuilds too\n")
    assert extension.build_tag(files, cuda=False) not in (tag, edited)


def _fake_toolkit(root: Path, *, cudart: bool) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("\n")
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so").write_text("\n")
    return root


def test_cuda_home_skips_folders_without_cudart(tmp_path, monkeypatch):
    if torch.version.cuda is None:
        assert extension.cuda_home() is None
        return
    wrapper = _fake_toolkit(tmp_path / "wrapper", cudart=False)  # like /usr/local with a bin/nvcc wrapper
    real = _fake_toolkit(tmp_path / "real", cudart=True)
    monkeypatch.setenv("CUDA_HOME", str(wrapper))
    monkeypatch.setenv("CUDA_PATH", str(real))
    assert extension.cuda_home() == real
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert extension.cuda_home() == real
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH")
    found = extension.cuda_home()
    if found is not None:  # whatever is found has nvcc, the runtime header and cudart (never a wrapper's folder)
        assert (found / "include" / "cuda_runtime.h").is_file() and (found / "bin" / "nvcc").is_file()
        assert (found / "lib64" / "libcudart.so").exists() or (found / "lib" / "libcudart.so").exists()
