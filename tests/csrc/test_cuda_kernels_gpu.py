"""The fastvit_C CUDA kernels (csrc/*_kernels.cu through ops_cuda.cpp) on a real GPU (skipped without one).

Every block op runs on CUDA tensors and is checked twice: against float64 math under the tolerance rule
(tests/tolerance.py), and against the CPU implementation of the same op (the CPU loops over the same
row_math.h formulas) to within an ulp or two of the output dtype (the summation orders differ; nvcc
contracts a * b + c into an FMA). Shapes are the awkward ones: one row, an odd row count, 3 x 197 tokens;
widths 37 (no vector path), 192, 768, 1024, 4100 (a block per row) and beyond the register kernels;
rows that start one element into a wider buffer (misaligned: the scalar path), padded row strides,
an expanded gradient (row stride 0), channels_last and cropped images, and mixed dtypes.

Outputs are allocated with at::empty inside the ops; the module runs with deterministic algorithms
and fill_uninitialized_memory on, so those allocations start as NaN and an element a kernel never
writes fails the finiteness check. LayerNorm backward speed is measured by the benchmarks, not here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastvit import extension
from tests.tolerance import ATOL, assert_close_to_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROWS = (1, 7, 3 * 197)  # one row; an odd count; three ViT-B/16 images' tokens
WIDTHS = (37, 192, 768, 1024, 4100)  # odd (scalar path), ViT-Ti, ViT-B, ViT-L, wider than a warp's registers


@pytest.fixture(scope="module")
def ops():
    """torch.ops.fastvit_C with its CUDA kernels, compiled here on first use."""
    if not extension.load(build=True):
        pytest.fail(f"the extension did not build: {extension.unavailable_reason()}")
    if not extension.has_cuda_kernels():
        pytest.fail("the extension was built without its CUDA kernels although a GPU is present")
    return torch.ops.fastvit_C


@pytest.fixture(autouse=True)
def _nan_filled_allocations():
    """at::empty inside the ops fills with NaN, so elements a kernel never writes show up."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two dtypes (the one whose slack applies)."""
    return max((a, b), key=lambda d: torch.finfo(d).eps)


def _matrix(
    rows: int,
    dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    layout: str,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """A (rows, dim) CUDA matrix with unit last stride in one of three layouts.

    contiguous; padded: row stride dim + 8 (16-byte aligned rows, so the vector path with a row stride
    != dim); misaligned: rows start one element into a wider buffer (the scalar path).
    """
    pad = {"contiguous": 0, "padded": 8, "misaligned": 9}[layout]
    start = 1 if layout == "misaligned" else 0
    buf = (torch.randn(rows, dim + pad, generator=gen) * scale + shift).to(dtype).cuda()
    return buf[:, start : start + dim]


def _assert_agrees_with_cpu(
    got: torch.Tensor,
    cpu: torch.Tensor,
    *,
    name: str,
    ulps: float = 2.0,
    scale: float | torch.Tensor = 1.0,
    atol: float = 0.0,
) -> None:
    """CUDA vs CPU implementation: same dtype and shape, and per element
    |cuda - cpu| <= ulps * eps(dtype) * max(|cpu|, scale) + atol.

    ``scale`` (a number or a tensor of cpu's shape) covers cancellation (GELU's left tail: both sides
    round 1 + erf(x) of a |x| that is large); ``atol`` covers the different fp32 summation orders of
    the reductions (row sums in LayerNorm, column sums of dweight).
    """
    assert got.dtype == cpu.dtype and tuple(got.shape) == tuple(cpu.shape), (
        f"{name}: {got.dtype} {tuple(got.shape)} vs CPU {cpu.dtype} {tuple(cpu.shape)}"
    )
    g, c = got.cpu().double(), cpu.double()
    assert torch.isfinite(g).all(), f"{name}: non-finite values"
    floor = scale.cpu().double() if isinstance(scale, torch.Tensor) else torch.full_like(c, scale)
    bound = ulps * torch.finfo(cpu.dtype).eps * torch.maximum(c.abs(), floor) + atol
    excess = ((g - c).abs() - bound).max().item() if c.numel() else 0.0
    assert excess <= 0, f"{name}: CUDA and CPU differ by more than the bound (excess {excess:.3e})"


def _sum_slack(n: int, magnitude: float) -> float:
    """Room for two fp32 summation orders of n terms of size <= magnitude (a random-walk bound, x8)."""
    return 8 * torch.finfo(torch.float32).eps * math.sqrt(n) * magnitude


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------
def test_every_block_op_has_a_cuda_kernel(ops):
    for name in (
        "layer_norm_fwd",
        "layer_norm_bwd",
        "bias_gelu_fwd",
        "bias_gelu_bwd",
        "scaled_residual",
        "patchify",
        "unpatchify",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvit_C::{name}", "CUDA"), name


# ---------------------------------------------------------------------------------------------
# LayerNorm forward
# ---------------------------------------------------------------------------------------------
def _check_layer_norm_fwd(ops, x, w, b, out_dtype, eps=1e-6):
    y, mean, rstd = ops.layer_norm_fwd(x, w, b, eps, out_dtype)
    dim = x.shape[1]
    assert y.dtype == out_dtype and y.is_contiguous() and y.is_cuda
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0],)
    xc, wc, bc = (None if t is None else t.cpu() for t in (x, w, b))

    def ref(t, wt, bt):
        return F.layer_norm(t, (dim,), wt, bt, eps)

    d = [None if t is None else t.double() for t in (xc, wc, bc)]
    lowp = ref(xc, None if wc is None else wc.to(xc.dtype), None if bc is None else bc.to(xc.dtype)).to(out_dtype)
    assert_close_to_reference(y, ref(*d).cuda(), lowp.cuda(), name="y", dtype=_lower(x.dtype, out_dtype))
    var, mu = torch.var_mean(d[0], dim=1, unbiased=False)
    torch.testing.assert_close(mean.cpu().double(), mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.cpu().double(), (var + eps).rsqrt(), rtol=1e-5, atol=0)
    # CPU: Welford in 4 lanes; CUDA: two passes over registers. Both sum D values in fp32, in different orders.
    y_cpu, mean_cpu, rstd_cpu = ops.layer_norm_fwd(xc, wc, bc, eps, out_dtype)
    x_mag = xc.double().abs().max().item()
    w_mag = 1.0 if wc is None else max(1.0, wc.double().abs().max().item())
    rs_mag = rstd_cpu.abs().max().item()
    _assert_agrees_with_cpu(mean, mean_cpu, name="mean vs CPU", atol=_sum_slack(dim, x_mag))
    _assert_agrees_with_cpu(rstd, rstd_cpu, name="rstd vs CPU", atol=rs_mag * _sum_slack(dim, x_mag * rs_mag))
    _assert_agrees_with_cpu(y, y_cpu, name="y vs CPU", atol=3 * rs_mag * w_mag * _sum_slack(dim, x_mag))
    return y, mean, rstd


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", WIDTHS)
def test_layer_norm_fwd(ops, dtype, rows, dim):
    gen = _gen(rows * 7919 + dim)
    x = _matrix(rows, dim, dtype, gen, "contiguous", scale=2.0, shift=3.0)  # non-zero mean: centring matters
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).cuda()
    b = (0.3 * torch.randn(dim, generator=gen)).cuda()
    _check_layer_norm_fwd(ops, x, w, b, dtype)


@pytest.mark.parametrize("layout", ["padded", "misaligned"])
@pytest.mark.parametrize("dim", [192, 768, 4100])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_fwd_strided_rows_and_no_affine(ops, layout, dim, affine):
    gen = _gen(dim + (layout == "padded"))
    x = _matrix(197, dim, torch.bfloat16, gen, layout, shift=1.0)
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).to(torch.bfloat16).cuda() if affine else None  # bf16 weight
    b = (0.3 * torch.randn(dim, generator=gen)).to(torch.bfloat16).cuda() if affine else None
    _check_layer_norm_fwd(ops, x, w, b, torch.bfloat16)


@pytest.mark.parametrize(
    "x_dtype,out_dtype",
    [
        (torch.float32, torch.bfloat16),  # timm's fp32 residual stream feeding a bf16 GEMM
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),  # no kernel for the pair: upcast to fp32 first
        (torch.bfloat16, torch.float16),
    ],
)
def test_layer_norm_fwd_mixed_dtypes(ops, x_dtype, out_dtype):
    gen = _gen(11)
    x = _matrix(7 * 3, 768, x_dtype, gen, "contiguous", shift=0.5)
    w = torch.randn(768, generator=gen).cuda()
    y, _, _ = _check_layer_norm_fwd(ops, x, w, None, out_dtype)
    # fp32 math, rounded once: the same kernel's fp32 output rounds to y (a 16-bit pair with no kernel
    # runs on x upcast to fp32, so its fp32 twin does too; the register layout, hence the sum order, follows x)
    upcast = {x_dtype, out_dtype} == {torch.float16, torch.bfloat16}
    y32, _, _ = ops.layer_norm_fwd(x.float() if upcast else x, w, None, 1e-6, torch.float32)
    assert torch.equal(y32.to(out_dtype), y)


@pytest.mark.parametrize("dim", [8200, 9001, 20000])
def test_layer_norm_fwd_rows_wider_than_the_registers(ops, dim):
    # 8200: vector path (register kernel up to 16384); 9001: scalar path beyond its 8192 (looped kernel);
    # 20000: looped kernel
    gen = _gen(dim)
    x = _matrix(5, dim, torch.float32, gen, "contiguous", shift=1.0)
    _check_layer_norm_fwd(ops, x, torch.randn(dim, generator=gen).cuda(), None, torch.bfloat16)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_layer_norm_fwd_zero_width_rows(ops, out_dtype):
    # D = 0: nothing to normalise, but mean and rstd (rows,) are still outputs. The CPU loop gives the
    # statistics of an empty row (mean 0, rstd 1 / sqrt(eps)); the CUDA op used to return before any
    # kernel ran and leave them uninitialised (NaN under fill_uninitialized_memory).
    for eps in (1e-6, 1e-5):
        x = torch.empty(5, 0, dtype=torch.bfloat16, device="cuda")
        y, mean, rstd = ops.layer_norm_fwd(x, None, None, eps, out_dtype)
        y_cpu, mean_cpu, rstd_cpu = ops.layer_norm_fwd(x.cpu(), None, None, eps, out_dtype)
        assert y.shape == y_cpu.shape == (5, 0) and y.dtype == out_dtype
        assert torch.equal(mean.cpu(), mean_cpu) and torch.equal(rstd.cpu(), rstd_cpu)


# ---------------------------------------------------------------------------------------------
# LayerNorm backward
# ---------------------------------------------------------------------------------------------
def _check_layer_norm_bwd(ops, gy, x, w, mask=(True, True, True), eps=1e-6, residual=None):
    """CUDA layer_norm_bwd (with residual_grad: dx = LN-backward + residual) vs float64 math and vs the CPU op."""
    rows, dim = x.shape
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, eps, x.dtype)
    dx, dw, db = ops.layer_norm_bwd(gy, x, w, mean, rstd, list(mask), residual)
    param_dtype = w.dtype if w is not None else x.dtype
    xc, gc = x.cpu(), gy.cpu()
    wc = w.cpu() if w is not None else None

    def grads(xt, wt, g):
        xt = xt.detach().requires_grad_(True)
        wt = torch.ones(dim, dtype=xt.dtype) if wt is None else wt
        wt = wt.detach().requires_grad_(True)
        bt = torch.zeros(dim, dtype=xt.dtype, requires_grad=True)
        return torch.autograd.grad(F.layer_norm(xt, (dim,), wt, bt, eps), (xt, wt, bt), g)

    oracle = grads(xc.double(), None if wc is None else wc.double(), gc.double())
    lowp = grads(xc, None if wc is None else wc.to(xc.dtype), gc.to(xc.dtype))
    rc = None if residual is None else residual.cpu()  # keeps a row stride of 0
    if rc is not None:
        oracle = (oracle[0] + rc.double(), *oracle[1:])
        lowp = (lowp[0] + rc.to(xc.dtype), *lowp[1:])
    cpu = ops.layer_norm_bwd(gc, xc, wc, mean.cpu(), rstd.cpu(), list(mask), rc)
    xhat = (xc.double() - mean.cpu().double()[:, None]) * rstd.cpu().double()[:, None]
    g_mag = gc.double().abs().max().item() * (1.0 if wc is None else max(1.0, wc.double().abs().max().item()))
    term = g_mag * max(1.0, xhat.abs().max().item())  # |grad * xhat|, |grad * weight| bound
    cpu_slack = {
        "dx": 3 * rstd.abs().max().item() * _sum_slack(dim, term),  # c1, c2: sums over the row
        "dweight": _sum_slack(rows, term),  # sums over the rows, in partial blocks
        "dbias": _sum_slack(rows, term),
    }
    for i, (name, got, want, low) in enumerate(
        zip(("dx", "dweight", "dbias"), (dx, dw, db), oracle, lowp, strict=True)
    ):
        if not mask[i]:
            assert got.shape == (0,), name
            continue
        out_dtype = x.dtype if name == "dx" else param_dtype
        assert got.dtype == out_dtype and got.is_contiguous() and got.is_cuda, name
        atol = None
        if name != "dx":  # a sum over `rows` products: the slack grows with the row count
            scale = math.sqrt(rows) * max(1.0, want.abs().max().item())
            atol = ATOL[_lower(out_dtype, x.dtype)] * scale
        assert_close_to_reference(
            got, want.cuda(), low.to(out_dtype).cuda(), name=name, dtype=_lower(out_dtype, x.dtype), atol=atol
        )
        _assert_agrees_with_cpu(got, cpu[i], name=f"{name} vs CPU", atol=cpu_slack[name])
    return dx, dw, db


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", WIDTHS)
def test_layer_norm_bwd(ops, dtype, rows, dim):
    gen = _gen(rows * 31 + dim)
    x = _matrix(rows, dim, dtype, gen, "contiguous", shift=1.0)
    gy = _matrix(rows, dim, dtype, gen, "contiguous")
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).to(dtype).cuda()
    _check_layer_norm_bwd(ops, gy, x, w)


@pytest.mark.parametrize("grad_kind", ["expanded", "padded", "misaligned"])
@pytest.mark.parametrize("dim", [192, 768, 4100])
def test_layer_norm_bwd_grad_layouts(ops, grad_kind, dim):
    gen = _gen(dim + len(grad_kind))
    rows = 3 * 197
    x = _matrix(rows, dim, torch.bfloat16, gen, "padded", shift=1.0)
    if grad_kind == "expanded":  # out.sum()-style: one row broadcast, row stride 0
        gy = torch.randn(dim, generator=gen).to(torch.bfloat16).cuda().expand(rows, dim)
    else:
        gy = _matrix(rows, dim, torch.bfloat16, gen, grad_kind)
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).cuda()  # fp32 weight: fp32 dweight / dbias
    _, dw, _ = _check_layer_norm_bwd(ops, gy, x, w)
    assert dw.dtype == torch.float32


@pytest.mark.parametrize(
    "x_dtype,grad_dtype",
    [
        (torch.float32, torch.bfloat16),  # fp32 stream under bf16 autocast: the GEMM hands back bf16
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float16),  # no kernel for the pair: the gradient is upcast first
    ],
)
def test_layer_norm_bwd_mixed_dtypes(ops, x_dtype, grad_dtype):
    gen = _gen(5)
    x = _matrix(3 * 197, 768, x_dtype, gen, "contiguous", shift=1.0)
    gy = _matrix(3 * 197, 768, grad_dtype, gen, "contiguous")
    _check_layer_norm_bwd(ops, gy, x, torch.randn(768, generator=gen).cuda())


@pytest.mark.parametrize(
    "mask", [(True, False, True), (False, True, False), (False, False, True), (True, False, False)]
)
@pytest.mark.parametrize("with_weight", [True, False])
def test_layer_norm_bwd_output_mask(ops, mask, with_weight):
    gen = _gen(sum(mask) + 2 * with_weight)
    x = _matrix(7, 37, torch.float16, gen, "misaligned", shift=1.0)
    gy = _matrix(7, 37, torch.float16, gen, "contiguous")
    w = torch.randn(37, generator=gen).to(torch.float16).cuda() if with_weight else None
    _check_layer_norm_bwd(ops, gy, x, w, mask)


@pytest.mark.parametrize("dim", [8200, 12000])
def test_layer_norm_bwd_rows_wider_than_the_registers(ops, dim):
    # > 8192: the looped backward (a block per row, partial sums accumulated in place in the workspace)
    gen = _gen(dim)
    x = _matrix(9, dim, torch.float32, gen, "contiguous", shift=1.0)
    gy = _matrix(9, dim, torch.float32, gen, "contiguous")
    _check_layer_norm_bwd(ops, gy, x, torch.randn(dim, generator=gen).cuda())


@pytest.mark.parametrize(
    "x_dtype,grad_dtype,res_dtype",
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # the composite in bf16
        (torch.bfloat16, torch.bfloat16, torch.float32),  # a wider residual: 8 fp32 values per pack (two loads)
        (torch.float32, torch.bfloat16, torch.float32),  # fp32 stream under bf16 autocast
        (torch.float32, torch.float32, torch.float16),  # a narrower residual: 4 fp16 values per pack
        (torch.float16, torch.bfloat16, torch.float32),  # no kernel for the x/grad pair: grad upcast first
    ],
)
@pytest.mark.parametrize("res_kind", ["contiguous", "expanded", "padded", "misaligned"])
@pytest.mark.parametrize("dim", [37, 768, 4100, 8200])
def test_layer_norm_bwd_residual_grad(ops, x_dtype, grad_dtype, res_dtype, res_kind, dim):
    # residual_grad in each layout: packed; one row broadcast (row stride 0, as grad_out of out.sum() over
    # tokens); a padded row stride; rows one element off alignment (the vector path falls back to scalar).
    # 37: scalar path; 768, 4100: register kernels; 8200: the looped kernel.
    gen = _gen(dim + 3 * len(res_kind))
    rows = 3 * 197
    x = _matrix(rows, dim, x_dtype, gen, "contiguous", shift=1.0)
    gy = _matrix(rows, dim, grad_dtype, gen, "contiguous")
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).cuda()
    if res_kind == "expanded":
        res = torch.randn(dim, generator=gen).to(res_dtype).cuda().expand(rows, dim)
    else:
        res = _matrix(rows, dim, res_dtype, gen, res_kind)
    dx, dw, db = _check_layer_norm_bwd(ops, gy, x, w, residual=res)
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, 1e-6, x_dtype)
    # dweight / dbias do not see the residual: the same bits as without it
    _, dw0, db0 = ops.layer_norm_bwd(gy, x, w, mean, rstd, [False, True, True])
    assert torch.equal(dw, dw0) and torch.equal(db, db0)
    if res_kind == "expanded":  # row stride 0 reads what its materialised copy holds (same kernel path)
        packed, _, _ = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, False, False], res.contiguous())
        assert torch.equal(packed, dx)


@pytest.mark.parametrize("dim", [768, 1024, 8200])
def test_layer_norm_bwd_is_deterministic_and_sums_many_rows(ops, dim):
    # 64 images of 197 tokens: many rows per partial-sum block; bitwise equal across runs
    gen = _gen(dim)
    rows = 64 * 197 if dim < 8192 else 1000
    x = _matrix(rows, dim, torch.bfloat16, gen, "contiguous", shift=1.0)
    gy = _matrix(rows, dim, torch.bfloat16, gen, "contiguous")
    w = (1 + 0.3 * torch.randn(dim, generator=gen)).cuda()
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, 1e-6, torch.bfloat16)
    first = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, True, True])
    for _ in range(2):
        again = ops.layer_norm_bwd(gy, x, w, mean, rstd, [True, True, True])
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)
    # dweight / dbias against float64 sums of the same products
    xhat = (x.double() - mean.double()[:, None]) * rstd.double()[:, None]
    want_dw = (gy.double() * xhat).sum(0)
    want_db = gy.double().sum(0)
    for got, want in ((first[1], want_dw), (first[2], want_db)):
        tol = 1e-5 * (gy.double().abs() * xhat.abs().clamp_min(1)).sum(0).max().item()
        assert (got.double() - want).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------
# bias + GELU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,hidden", [(1, 97), (7, 97), (3 * 197, 3072), (5, 4100), (3, 4)])
@pytest.mark.parametrize("bias_kind", ["same", "fp32", "none"])
def test_bias_gelu(ops, dtype, approximate, rows, hidden, bias_kind):
    gen = _gen(rows * 13 + hidden + len(bias_kind))
    pre = (2 * torch.randn(rows, hidden, generator=gen)).to(dtype).cuda()
    bias = None
    if bias_kind != "none":
        bias = torch.randn(hidden, generator=gen).to(dtype if bias_kind == "same" else torch.float32).cuda()
    grad = torch.randn(rows, hidden, generator=gen).to(dtype).cuda()

    def fwd(p, bt):
        return F.gelu(p + bt if bt is not None else p, approximate=approximate)

    def bwd(p, bt, g):
        p = p.detach().requires_grad_(True)
        return torch.autograd.grad(fwd(p, bt), p, g)[0]

    pc, bc, gc = pre.cpu(), None if bias is None else bias.cpu(), grad.cpu()
    d = [None if t is None else t.double() for t in (pc, bc, gc)]
    b_low = None if bc is None else bc.to(dtype)
    y = ops.bias_gelu_fwd(pre, bias, approximate)
    assert y.dtype == dtype and y.shape == pre.shape and y.is_contiguous()
    assert_close_to_reference(y, fwd(d[0], d[1]).cuda(), fwd(pc, b_low).cuda(), name="gelu", dtype=dtype)
    arg = (d[0] + d[1]) if d[1] is not None else d[0]  # |pre + bias|: the left tail's cancellation scale
    _assert_agrees_with_cpu(y, ops.bias_gelu_fwd(pc, bc, approximate), name="gelu vs CPU", scale=arg.abs())
    dpre = ops.bias_gelu_bwd(grad, pre, bias, approximate)
    assert dpre.dtype == dtype and dpre.is_contiguous()
    assert_close_to_reference(dpre, bwd(d[0], d[1], d[2]).cuda(), bwd(pc, b_low, gc).cuda(), name="dgelu", dtype=dtype)
    _assert_agrees_with_cpu(
        dpre,
        ops.bias_gelu_bwd(gc, pc, bc, approximate),
        name="dgelu vs CPU",
        scale=(arg.abs() * d[2].abs()).clamp_min(1.0),
        # the derivative chains erff/expf (tanhf): CUDA's have up to 2 ulp each, so two libms may
        # land ~2.5 ulp apart in fp32 (H200, 2026-12-04: 1.1e-7 past a 2-ulp bound at |x g| ~ 10)
        ulps=4.0,
    )


def test_bias_gelu_misaligned_bias_and_mixed_grad(ops):
    gen = _gen(3)
    pre = torch.randn(197, 768, generator=gen).to(torch.bfloat16).cuda()
    bias = torch.randn(769, generator=gen).to(torch.bfloat16).cuda()[1:]  # one element in: no 16-byte loads
    y = ops.bias_gelu_fwd(pre, bias, "none")
    arg = (pre.double() + bias.double()).abs()
    _assert_agrees_with_cpu(y, ops.bias_gelu_fwd(pre.cpu(), bias.cpu(), "none"), name="gelu vs CPU", scale=arg)
    grad = torch.randn(197, 768, generator=gen).cuda()  # fp32 grad beside bf16 pre: fp32 math, pre's dtype out
    dpre = ops.bias_gelu_bwd(grad, pre, bias, "tanh")
    assert dpre.dtype == torch.bfloat16
    _assert_agrees_with_cpu(
        dpre,
        ops.bias_gelu_bwd(grad.cpu(), pre.cpu(), bias.cpu(), "tanh"),
        name="dgelu vs CPU",
        scale=(arg * grad.double().abs()).clamp_min(1.0),
    )


def test_gelu_tails_match_pytorch_in_fp32(ops):
    # both tails (1 + erf cancels on the left), both forms, against float64 with PyTorch fp32's budget
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64).unsqueeze(0)
    for approximate in ("none", "tanh"):
        t64 = x.clone().requires_grad_(True)
        y64 = F.gelu(t64, approximate=approximate)
        (d64,) = torch.autograd.grad(y64, t64, torch.ones_like(t64))
        t32 = x.float().cuda().requires_grad_(True)
        y32 = F.gelu(t32, approximate=approximate)
        (d32,) = torch.autograd.grad(y32, t32, torch.ones_like(t32))
        xc = x.float().cuda()
        assert_close_to_reference(
            ops.bias_gelu_fwd(xc, None, approximate),
            y64.detach().cuda(),
            y32.detach(),
            name=f"gelu {approximate}",
            atol=1e-6,
        )
        assert_close_to_reference(
            ops.bias_gelu_bwd(torch.ones_like(xc), xc, None, approximate),
            d64.cuda(),
            d32,
            name=f"dgelu {approximate}",
            atol=1e-6,
        )


# ---------------------------------------------------------------------------------------------
# scaled residual
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "branch_dtype,residual_dtype,out_dtype",
    [
        (torch.bfloat16, torch.float32, torch.float32),  # timm AMP: bf16 branch, fp32 stream
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float16),
        (torch.float32, torch.float32, torch.float32),
        (torch.float32, torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.bfloat16),  # no kernel: exact fp32 upcasts first
    ],
)
@pytest.mark.parametrize("terms", ["all", "residual", "layer_scale", "sample_scale", "none"])
@pytest.mark.parametrize("dim,layout", [(768, "contiguous"), (768, "padded"), (37, "misaligned")])
def test_scaled_residual(ops, branch_dtype, residual_dtype, out_dtype, terms, dim, layout):
    gen = _gen(dim + len(terms))
    batch, tokens = 3, 197
    rows = batch * tokens
    branch = _matrix(rows, dim, branch_dtype, gen, layout)
    residual = _matrix(rows, dim, residual_dtype, gen, "padded") if terms in ("all", "residual") else None
    ls = torch.randn(dim, generator=gen).to(torch.bfloat16).cuda() if terms in ("all", "layer_scale") else None
    ss = torch.rand(batch, generator=gen).cuda() if terms in ("all", "sample_scale") else None
    out = ops.scaled_residual(branch, residual, ls, ss, tokens, out_dtype)
    assert out.dtype == out_dtype and out.is_contiguous() and out.shape == (rows, dim)
    want = branch.cpu().double()
    if ls is not None:
        want = want * ls.cpu().double()
    if ss is not None:
        want = want * ss.cpu().double().repeat_interleave(tokens)[:, None]
    if residual is not None:
        want = want + residual.cpu().double()
    # fp32 math rounded once: the error is the output rounding
    assert_close_to_reference(out, want.cuda(), want.to(out_dtype).cuda(), name="scaled_residual", dtype=out_dtype)
    cpu = ops.scaled_residual(
        branch.cpu(),
        None if residual is None else residual.cpu(),
        None if ls is None else ls.cpu(),
        None if ss is None else ss.cpu(),
        tokens,
        out_dtype,
    )
    # one rounding of the output, after fp32 math that may differ by an fp32 ulp of the terms (FMA on the GPU)
    terms = (want - (0 if residual is None else residual.cpu().double())).abs() + (
        0 if residual is None else residual.cpu().double().abs()
    )
    _assert_agrees_with_cpu(
        out, cpu, name="scaled_residual vs CPU", ulps=1, atol=2 * torch.finfo(torch.float32).eps * terms.max().item()
    )


# ---------------------------------------------------------------------------------------------
# patchify / unpatchify
# ---------------------------------------------------------------------------------------------
def _patchify_ref(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b * (h // p) * (w // p), c * p * p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,p",
    [
        ((2, 3, 32, 48), 16),
        ((1, 1, 14, 21), 7),
        ((3, 5, 8, 8), 2),
        ((1, 3, 4, 4), 1),
        ((4, 3, 224, 224), 16),
        ((2, 3, 224, 224), 14),
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
def test_patchify_unpatchify(ops, dtype, shape, p, layout):
    gen = _gen(sum(shape) + p)
    b, c, h, w = shape
    if layout == "cropped":  # a crop of a larger image batch: every stride unusual
        x = torch.randn(b, c + 1, h + 3, w + 2, generator=gen).to(dtype).cuda()[:, 1:, 2 : 2 + h, 1 : 1 + w]
    else:
        x = torch.randn(shape, generator=gen).to(dtype).cuda()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    want = _patchify_ref(x, p)
    cols = ops.patchify(x, p, dtype)
    assert cols.is_contiguous() and torch.equal(cols, want)
    assert torch.equal(cols.cpu(), ops.patchify(x.cpu(), p, dtype))
    back = ops.unpatchify(cols, list(shape), p, dtype)
    assert back.is_contiguous() and torch.equal(back, x)
    # conversion on the way: exactly one rounding
    for other in DTYPES:
        assert torch.equal(ops.patchify(x, p, other), want.to(other))
        assert torch.equal(ops.unpatchify(cols, list(shape), p, other), x.to(other))


def test_unpatchify_reads_a_strided_patch_matrix(ops):
    gen = _gen(1)
    x = torch.randn(2, 3, 32, 32, generator=gen).cuda()
    wide = torch.randn(2 * 4, 3 * 16 * 16 + 5, generator=gen).cuda()
    cols = wide[:, 2 : 2 + 3 * 16 * 16]
    cols.copy_(_patchify_ref(x, 16))
    assert torch.equal(ops.unpatchify(cols, [2, 3, 32, 32], 16, torch.float32), x)


# ---------------------------------------------------------------------------------------------
# streams and devices
# ---------------------------------------------------------------------------------------------
def test_ops_run_on_the_current_stream(ops):
    gen = _gen(4)
    x = torch.randn(591, 768, generator=gen).to(torch.bfloat16).cuda()
    w = torch.randn(768, generator=gen).cuda()
    want, _, _ = ops.layer_norm_fwd(x, w, None, 1e-6, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got, _, _ = ops.layer_norm_fwd(x, w, None, 1e-6, torch.bfloat16)
        gelu = ops.bias_gelu_fwd(got, None, "none")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    assert torch.equal(gelu, ops.bias_gelu_fwd(want, None, "none"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_the_inputs_device(ops):
    x = torch.randn(7, 192, device="cuda:1")
    with torch.cuda.device(0):
        y, mean, _ = ops.layer_norm_fwd(x, None, None, 1e-6, torch.float32)
    assert y.device == mean.device == x.device
    torch.testing.assert_close(y, F.layer_norm(x, (192,), eps=1e-6), rtol=1e-5, atol=1e-5)
