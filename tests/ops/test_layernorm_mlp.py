"""fastvit.layernorm_mlp: the Triton kernels (interpreter on CPU, compiled on a GPU) against the float64
reference, output and every gradient; the torch route, dispatch, autocast, validation, the custom
ops and torch.compile, and the activation memory the backward keeps."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import reference
from tests.compile_check import assert_compiled_matches_eager
from tests.tolerance import ATOL, assert_close_to_reference

ON_GPU = torch.cuda.is_available()
NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "layer_scale",
         "sample_scale")

kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu


def _inputs(batch, n_tok, dim, hidden, *, bias=True, affine=True, layer_scale=False, sample_scale=False,
            dtype=torch.float32, device="cpu", seed=0):
    """Fresh random leaf tensors (None where absent), scaled like a trained block so every value
    stays O(1) in fp16. x gets a non-zero mean per row (LayerNorm's centring matters); the sample
    scale looks like drop-path's mask / keep_prob, one sample dropped (0) when batch > 1."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    ss = None
    if sample_scale:
        ss = 0.5 + torch.rand(batch, generator=gen) * 1.5
        if batch > 1:
            ss[1] = 0.0
    tensors = {
        "x": randn(batch, n_tok, dim) + randn(batch, n_tok, 1),
        "norm_weight": 1.0 + 0.2 * randn(dim) if affine else None,
        "norm_bias": 0.2 * randn(dim) if affine else None,
        "fc1_weight": randn(hidden, dim) / math.sqrt(dim),
        "fc1_bias": 0.2 * randn(hidden) if bias else None,
        "fc2_weight": randn(dim, hidden) / math.sqrt(hidden),
        "fc2_bias": 0.2 * randn(dim) if bias else None,
        "layer_scale": 0.5 * randn(dim) if layer_scale else None,
        "sample_scale": ss,
    }
    return {k: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True) for k, t in tensors.items()}


def _call(inputs, **kwargs):
    return fastvit.layernorm_mlp(
        inputs["x"], inputs["norm_weight"], inputs["norm_bias"], inputs["fc1_weight"], inputs["fc1_bias"],
        inputs["fc2_weight"], inputs["fc2_bias"], layer_scale=inputs["layer_scale"],
        sample_scale=inputs["sample_scale"], **kwargs,
    )


def _run_kernel(inputs, grad_out=None, **kwargs):
    """Output and the gradient of every present input (dict), through the Triton route."""
    names = [k for k in NAMES if inputs[k] is not None]
    with fastvit.backend("triton"):
        out = _call(inputs, **kwargs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    return out, grad_out, dict(zip(names, grads, strict=True))


def _reference(inputs, grad_out, dtype, **kwargs):
    """(out, grads) of fastvit.reference on CPU copies of the inputs cast to ``dtype``."""
    leaves = {k: None if t is None else t.detach().cpu().to(dtype).requires_grad_(True) for k, t in inputs.items()}
    out = reference.layernorm_mlp(
        leaves["x"], leaves["norm_weight"], leaves["norm_bias"], leaves["fc1_weight"], leaves["fc1_bias"],
        leaves["fc2_weight"], leaves["fc2_bias"], layer_scale=leaves["layer_scale"],
        sample_scale=leaves["sample_scale"], **kwargs,
    )
    out.backward(grad_out.detach().cpu().to(dtype))
    return out, {k: t.grad for k, t in leaves.items() if t is not None}


# The gradients of layer_scale and sample_scale are sums over token rows: a handful of values
# (with batch 1, dsample_scale is one number), for which the low-precision reference's own error
# can be far below that of such a sum by luck. For those two the slack also holds the forward-error
# bound of the sum itself, eps(dtype) * sum |terms| (terms g * scale * branch, in float64).
FEW_VALUED = ("layer_scale", "sample_scale")


def _sum_bound(inputs, grad_out, name, dtype, **kwargs):
    leaves = {k: None if t is None else t.detach().cpu().double() for k, t in inputs.items()}
    branch = reference.layernorm_mlp(
        leaves["x"], leaves["norm_weight"], leaves["norm_bias"], leaves["fc1_weight"], leaves["fc1_bias"],
        leaves["fc2_weight"], leaves["fc2_bias"], approximate=kwargs.get("approximate", "none"), residual=False,
        eps=kwargs.get("eps", 1e-6),
    )
    terms = (grad_out.detach().cpu().double() * branch).abs()
    if name == "layer_scale":  # sum over rows of |g * sample_scale * branch|
        if leaves["sample_scale"] is not None:
            terms = terms * leaves["sample_scale"].abs().view(-1, *([1] * (terms.dim() - 1)))
        sums = terms.reshape(-1, terms.shape[-1]).sum(0)
    else:  # per-sample sums of |g * layer_scale * branch|
        if leaves["layer_scale"] is not None:
            terms = terms * leaves["layer_scale"].abs()
        sums = terms.reshape(terms.shape[0], -1).sum(1)
    return torch.finfo(dtype).eps * sums.max().item()


def _check_against_reference(inputs, out, grad_out, grads, **kwargs):
    dtype = inputs["x"].dtype
    out64, grads64 = _reference(inputs, grad_out, torch.float64, **kwargs)
    outlow, gradslow = _reference(inputs, grad_out, dtype, **kwargs)
    assert out.dtype == dtype and out.shape == inputs["x"].shape
    assert_close_to_reference(out.detach().cpu(), out64, outlow.detach(), name="out", dtype=dtype)
    assert set(grads) == set(grads64)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name
        slack = ATOL[dtype] + _sum_bound(inputs, grad_out, name, dtype, **kwargs) if name in FEW_VALUED else None
        assert_close_to_reference(grad.cpu(), grads64[name], gradslow[name], name=f"d{name}", dtype=dtype, atol=slack)


# ---------------------------------------------------------------------------------------------
# Kernels against the float64 reference
# ---------------------------------------------------------------------------------------------
# The widths D with hidden = 4 D and int(8/3 D) (128, 170, 512, 1024, 2048: 170 is not a
# multiple of 16, so the hidden dim is masked), at 1, 7 (below one row tile) and 197 (ViT-B/16's
# cls + 14*14, prime) tokens. Only the narrow widths run 197 tokens (interpreter time); the options
# rotate so every flag meets small and large widths.
SHAPES = [
    # dim, hidden, batch, tokens, options
    (48, 192, 2, 197, dict(approximate="none", layer_scale=True, sample_scale=True)),
    (48, 128, 1, 7, dict(approximate="tanh", bias=False, residual=False)),
    (64, 256, 3, 1, dict(approximate="tanh", sample_scale=True, affine=False)),
    (64, 170, 2, 197, dict(approximate="none", bias=False, layer_scale=True, sample_scale=True)),
    (192, 768, 2, 7, dict(approximate="none", residual=False, layer_scale=True)),
    (192, 512, 3, 7, dict(approximate="tanh", sample_scale=True)),
    (384, 1536, 1, 7, dict(approximate="tanh", layer_scale=True, sample_scale=True)),
    (384, 1024, 2, 1, dict(approximate="none", bias=False)),
    (768, 3072, 1, 7, dict(approximate="none", layer_scale=True, sample_scale=True)),
    (768, 2048, 2, 1, dict(approximate="tanh", residual=False, sample_scale=True)),
]


def _split(options):
    build = {k: options[k] for k in ("bias", "affine", "layer_scale", "sample_scale") if k in options}
    call = {k: options[k] for k in ("approximate", "residual", "eps") if k in options}
    return build, call


@kernel_test
@pytest.mark.parametrize("dim,hidden,batch,n_tok,options", SHAPES,
                         ids=[f"D{s[0]}-H{s[1]}-{s[2]}x{s[3]}" for s in SHAPES])
def test_kernel_shapes_fp32(kernel_device, dim, hidden, batch, n_tok, options):
    build, call = _split(options)
    inputs = _inputs(batch, n_tok, dim, hidden, device=kernel_device, seed=dim + hidden + n_tok, **build)
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


@kernel_test
@pytest.mark.parametrize(
    "bias,residual,layer_scale,sample_scale,approximate",
    list(itertools.product([True, False], [True, False], [True, False], [True, False], ["none", "tanh"])),
)
def test_kernel_options(kernel_device, bias, residual, layer_scale, sample_scale, approximate):
    """Every combination of the optional parts, at D=48 (one partial K tile) and hidden 170 (masked)."""
    inputs = _inputs(2, 7, 48, 170, bias=bias, layer_scale=layer_scale, sample_scale=sample_scale,
                     device=kernel_device, seed=3)
    out, grad_out, grads = _run_kernel(inputs, residual=residual, approximate=approximate)
    _check_against_reference(inputs, out, grad_out, grads, residual=residual, approximate=approximate)


@kernel_test
@pytest.mark.parametrize("eps", [1e-12, 1e-6, 0.5])
def test_kernel_eps(kernel_device, eps):
    """timm's 1e-6, Hugging Face's 1e-12, and a large eps that visibly changes the normalisation;
    x nearly constant per row, so var + eps is dominated by eps at the large value."""
    inputs = _inputs(2, 5, 37, 97, device=kernel_device, seed=5)  # odd D and hidden: no alignment
    with torch.no_grad():
        inputs["x"].mul_(0.3)
    out, grad_out, grads = _run_kernel(inputs, eps=eps)
    _check_against_reference(inputs, out, grad_out, grads, eps=eps)


@kernel_test
def test_kernel_fp16(kernel_device):
    """fp16 tensor-core dots with fp32 accumulation (the interpreter has fp16; bf16 is GPU-only)."""
    inputs = _inputs(2, 29, 64, 170, layer_scale=True, sample_scale=True, dtype=torch.float16,
                     device=kernel_device, seed=7)
    out, grad_out, grads = _run_kernel(inputs)
    _check_against_reference(inputs, out, grad_out, grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,hidden,n_tok", [(384, 1536, 197), (768, 3072, 197), (768, 2048, 50), (1024, 4096, 7)])
def test_kernel_low_precision_gpu(dim, hidden, n_tok, dtype):
    inputs = _inputs(4, n_tok, dim, hidden, layer_scale=True, sample_scale=True, dtype=dtype, device="cuda", seed=11)
    out, grad_out, grads = _run_kernel(inputs)
    _check_against_reference(inputs, out, grad_out, grads)


@pytest.mark.gpu
@pytest.mark.slow
def test_kernel_int64_offsets_gpu():
    """tokens x hidden past 2^31 (3600 x 197 ViT-B rows: the (T, 3072) pre-activation, gelu and dA
    buffers hold 2.18e9 elements): the last rows, the only ones with a non-zero gradient, match
    the reference run on those rows alone (~25 GB of GPU memory)."""
    batch, n_tok, dim, hidden, tail = 3600, 197, 768, 3072, 5
    assert batch * n_tok * hidden > 2**31
    inputs = _inputs(1, 1, dim, hidden, layer_scale=True, dtype=torch.bfloat16, device="cuda", seed=101)
    gen = torch.Generator(device="cuda").manual_seed(101)
    x = torch.randn(batch, n_tok, dim, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    grad_out = torch.zeros_like(x)
    grad_out[-1, -tail:] = torch.randn(tail, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    inputs["x"] = x
    out, _, grads = _run_kernel(inputs, grad_out)
    tail_inputs = dict(inputs, x=x.detach()[-1:, -tail:].clone().requires_grad_(True))
    tail_grads = dict(grads, x=grads["x"][-1:, -tail:])
    _check_against_reference(tail_inputs, out[-1:, -tail:], grad_out[-1:, -tail:], tail_grads)
    assert torch.equal(grads["x"][:-1], grad_out[:-1])  # residual only where the branch got no gradient


@kernel_test
def test_kernel_views_and_expanded_grad(kernel_device):
    """x a strided view of a token buffer (the patch tokens after a cls token, D a slice of a
    wider row): read in place, not copied; grad_output from ``out.sum()``: stride 0 everywhere."""
    inputs = _inputs(2, 9, 48, 128, layer_scale=True, sample_scale=True, device=kernel_device, seed=13)
    buffer = torch.randn(2, 10, 64, device=kernel_device)
    buffer[:, 1:, :48] = inputs["x"].detach()
    buffer.requires_grad_(True)
    inputs["x"] = buffer[:, 1:, :48]
    assert not inputs["x"].is_contiguous()
    grad_out = torch.ones(2, 9, 48, device=kernel_device).expand(2, 9, 48)
    with fastvit.backend("triton"):
        out = _call(inputs)
        names = [k for k in NAMES if inputs[k] is not None]
        grads = torch.autograd.grad(out.sum(), [inputs[k] for k in names])
    _check_against_reference(inputs, out, grad_out, dict(zip(names, grads, strict=True)))


@kernel_test
def test_kernel_transposed_weight_views(kernel_device):
    """Weights that are transposed views (fc2 stored as its (hidden, D) transpose): valid, copied."""
    inputs = _inputs(1, 11, 48, 96, device=kernel_device, seed=17)
    w2t = inputs["fc2_weight"].detach().t().contiguous().requires_grad_(True)
    inputs["fc2_weight"] = w2t.t()
    out, grad_out, grads = _run_kernel(inputs)
    _check_against_reference(inputs, out, grad_out, grads)


@kernel_test
@pytest.mark.parametrize("shape", [(13, 48), (48,), (2, 3, 4, 48)], ids=["tokens", "one-row", "grid"])
def test_kernel_input_ranks(kernel_device, shape):
    """x as (T, D) (sample_scale per token row), a single (D,) row, and (B, H, W, D)."""
    gen = torch.Generator().manual_seed(19)
    inputs = _inputs(1, 1, 48, 96, layer_scale=True, device=kernel_device, seed=19)
    inputs["x"] = torch.randn(*shape, generator=gen).to(kernel_device).requires_grad_(True)
    if len(shape) > 1:
        inputs["sample_scale"] = torch.rand(shape[0], generator=gen).to(kernel_device).requires_grad_(True)
    out, grad_out, grads = _run_kernel(inputs)
    _check_against_reference(inputs, out, grad_out, grads)


@kernel_test
def test_kernel_partial_requires_grad(kernel_device):
    """Frozen weights (only x needs a gradient) and a frozen input (only the weights): the other
    gradients are skipped, the requested ones still match."""
    inputs = _inputs(2, 7, 48, 96, layer_scale=True, sample_scale=True, device=kernel_device, seed=23)
    grad_out = torch.randn(2, 7, 48, device=kernel_device)
    _, grads64 = _reference(inputs, grad_out, torch.float64)
    _, grads32 = _reference(inputs, grad_out, torch.float32)
    for wanted in (["x"], [k for k in NAMES if k != "x"], ["layer_scale", "fc2_bias"], ["sample_scale"]):
        for k in NAMES:
            inputs[k].requires_grad_(k in wanted)
        with fastvit.backend("triton"):
            out = _call(inputs)
            grads = torch.autograd.grad(out, [inputs[k] for k in wanted], grad_out)
        for k, g in zip(wanted, grads, strict=True):
            slack = ATOL[torch.float32] + _sum_bound(inputs, grad_out, k, torch.float32) if k in FEW_VALUED else None
            assert_close_to_reference(g.cpu(), grads64[k], grads32[k], name=f"d{k}", atol=slack)


@kernel_test
def test_kernel_launches_under_the_device_guard(kernel_device, monkeypatch):
    """Triton launches on the *current* GPU: both launchers must make x's device current first
    (``model.to("cuda:1")`` with cuda:0 current). Checked by recording the guard on one device."""
    import contextlib

    from fastvit.kernels import layernorm_mlp as fwd_module
    from fastvit.kernels import layernorm_mlp_bwd as bwd_module

    guarded: list[str] = []

    def recording_guard(t):
        guarded.append("fwd" if len(guarded) == 0 else "bwd")
        assert t.device == kernel_device
        return contextlib.nullcontext()

    monkeypatch.setattr(fwd_module, "device_guard", recording_guard)
    monkeypatch.setattr(bwd_module, "device_guard", recording_guard)
    inputs = _inputs(1, 3, 16, 32, device=kernel_device, seed=97)
    _run_kernel(inputs)
    assert guarded == ["fwd", "bwd"]


@kernel_test
def test_kernel_inference_keeps_nothing(kernel_device):
    """Without grad, the forward saves no pre-activation and gives the same output."""
    inputs = _inputs(2, 7, 48, 96, layer_scale=True, device=kernel_device, seed=29)
    with fastvit.backend("triton"):
        with torch.no_grad():
            y_nograd = _call(inputs)
        y_grad = _call(inputs)
    assert not y_nograd.requires_grad
    torch.testing.assert_close(y_nograd, y_grad.detach(), rtol=0, atol=0)


def _saved_bytes(fn, inputs):
    """Bytes of the tensors autograd keeps for the backward, not counting the inputs themselves."""
    keep = {t.untyped_storage().data_ptr() for t in inputs.values() if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in keep:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@kernel_test
def test_kernel_saves_less_than_half_of_eager(kernel_device):
    """The issue's bound: what the backward keeps is <= 55% of the eager composite's (mlp_ratio 4,
    layer scale on, as timm's ViTs with LayerScale): the pre-activation and two fp32 statistics
    per token, against eager's LN(x), fc1's output, GELU's output and fc2's output."""
    inputs = _inputs(4, 33, 64, 256, layer_scale=True, device=kernel_device, seed=31)
    with fastvit.backend("triton"):
        fused = _saved_bytes(lambda: _call(inputs), inputs)
    with fastvit.backend("torch"):
        eager = _saved_bytes(lambda: _call(inputs), inputs)
    tokens = 4 * 33
    assert fused == tokens * 256 * 4 + 2 * tokens * 4  # a (fp32) + mean + rstd
    assert fused <= 0.55 * eager, (fused, eager)


@kernel_test
def test_kernel_deterministic(kernel_device):
    inputs = _inputs(2, 19, 48, 128, layer_scale=True, sample_scale=True, device=kernel_device, seed=37)
    grad_out = torch.randn(2, 19, 48, device=kernel_device)
    first = _run_kernel(inputs, grad_out)
    second = _run_kernel(inputs, grad_out)
    assert torch.equal(first[0], second[0])
    for k in first[2]:
        assert torch.equal(first[2][k], second[2][k]), k


@kernel_test
def test_kernel_weight_gradient_token_splits(kernel_device):
    """The weight-gradient GEMMs split over token ranges (chosen automatically on large GPUs);
    forced here: 3 splits of 64 rows over 150 tokens (the last split partial) give the same sums."""
    from fastvit.kernels.layernorm_mlp import layernorm_mlp_fwd
    from fastvit.kernels.layernorm_mlp_bwd import layernorm_mlp_bwd

    inputs = _inputs(3, 50, 48, 128, layer_scale=True, sample_scale=True, device=kernel_device, seed=41)
    args = [inputs[k].detach() for k in NAMES]
    x = args[0]
    _, pre, mean, rstd = layernorm_mlp_fwd(*args, eps=1e-6, approximate="none", residual=True,
                                           out_dtype=x.dtype, save_preact=True)
    grad_out = torch.randn_like(x)
    kw = dict(approximate="none", residual=True, needs=(True,) * 9)
    one = layernorm_mlp_bwd(grad_out, *args, pre, mean, rstd, wgrad_split=1, **kw)
    three = layernorm_mlp_bwd(grad_out, *args, pre, mean, rstd, wgrad_split=3, **kw)
    for name, a, b in zip(NAMES, one, three, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_weight_gradient_split_heuristic():
    from fastvit.kernels.layernorm_mlp_bwd import wgrad_splits

    assert wgrad_splits(tiles=9456, rows=50432, block_k=64, sms=132) == 1  # the output fills the GPU
    s = wgrad_splits(tiles=144, rows=50432, block_k=64, sms=132)  # ViT-B dW2: 6 x 24 tiles
    assert s > 1 and 144 * s / (-(-144 * s // 132) * 132) >= 0.85
    assert wgrad_splits(tiles=144, rows=100, block_k=64, sms=132) == 1  # too few tokens to split


@kernel_test
def test_kernel_opcheck(kernel_device):
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops."""
    inputs = _inputs(2, 3, 16, 24, layer_scale=True, sample_scale=True, device=kernel_device, seed=43)
    args = [inputs[k] for k in NAMES]
    with fastvit.backend("triton"):
        torch.library.opcheck(
            torch.ops.fastvit.layernorm_mlp_fwd.default, (*args, 1e-6, "tanh", True, torch.float32, True)
        )
        frozen = [t.detach() for t in args]  # inference: nothing saved, nothing to differentiate
        torch.library.opcheck(
            torch.ops.fastvit.layernorm_mlp_fwd.default, (*frozen[:4], None, frozen[5], None, None, None, 1e-5,
                                                          "none", False, torch.float32, False)
        )
        out, pre, mean, rstd = torch.ops.fastvit.layernorm_mlp_fwd(*args, 1e-6, "none", True, torch.float32, True)
        torch.library.opcheck(
            torch.ops.fastvit.layernorm_mlp_bwd.default,
            (torch.randn_like(out), *frozen, pre.detach(), mean.detach(), rstd.detach(), "none", True,
             [True, False] * 4 + [True]),
        )


@kernel_test
def test_kernel_under_torch_compile(kernel_device):
    inputs = _inputs(2, 9, 32, 80, layer_scale=True, sample_scale=True, device=kernel_device, seed=47)
    names = [k for k in NAMES if inputs[k] is not None]

    def block(*tensors):
        t = dict(zip(names, tensors, strict=True))
        y = fastvit.layernorm_mlp(t["x"] * 1.5, t["norm_weight"], t["norm_bias"], t["fc1_weight"], t["fc1_bias"],
                                  t["fc2_weight"], t["fc2_bias"], layer_scale=t["layer_scale"],
                                  sample_scale=t["sample_scale"])
        return y.square().sum()

    leaves = [inputs[k] for k in names]
    assert_compiled_matches_eager(block, leaves, "triton")


@kernel_test
@pytest.mark.parametrize("residual,scales", [(True, True), (True, False), (False, False)])
def test_kernel_autocast(kernel_device, residual, scales):
    """Under autocast with timm's fp32 residual stream and fp32 parameters: the GEMMs run in the
    autocast dtype, LN statistics in fp32, and the output and gradients have the composite's dtypes
    (fp32 through the residual add or an fp32 scale; the autocast dtype for the bare branch)."""
    low = torch.bfloat16 if ON_GPU else torch.float16
    inputs = _inputs(2, 13, 48, 128, layer_scale=scales, sample_scale=scales, device=kernel_device, seed=53)
    names = [k for k in NAMES if inputs[k] is not None]
    leaves = [inputs[k] for k in names]
    with torch.autocast(kernel_device.type, dtype=low):
        with fastvit.backend("triton"):
            out = _call(inputs, residual=residual)
        with fastvit.backend("torch"):
            expected = _call(inputs, residual=residual)
    assert out.dtype == expected.dtype == (torch.float32 if residual or scales else low)
    grad_out = torch.randn(out.shape, device=kernel_device).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_low = torch.autograd.grad(expected, leaves, grad_out)
    out64, grads64 = _reference(inputs, grad_out, torch.float64, residual=residual)
    assert_close_to_reference(out.float().cpu(), out64, expected.float().cpu(), name="out", dtype=low)
    for name, g, g_low in zip(names, grads, grads_low, strict=True):
        assert g.dtype == inputs[name].dtype == torch.float32
        assert_close_to_reference(g.cpu(), grads64[name], g_low.cpu(), name=f"d{name}", dtype=low)


# ---------------------------------------------------------------------------------------------
# Dispatch, fallbacks and the torch route (no kernels involved)
# ---------------------------------------------------------------------------------------------
def test_torch_route_matches_reference():
    inputs = _inputs(2, 11, 24, 40, layer_scale=True, sample_scale=True, seed=59)
    names = [k for k in NAMES if inputs[k] is not None]
    with fastvit.backend("torch"):
        out = _call(inputs, approximate="tanh", eps=1e-5)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    _check_against_reference(inputs, out, grad_out, dict(zip(names, grads, strict=True)), approximate="tanh",
                             eps=1e-5)


def test_auto_backend_on_cpu_is_the_torch_route(monkeypatch):
    from fastvit.kernels import layernorm_mlp as kernels

    def boom(*args, **kwargs):
        raise AssertionError("the Triton launcher ran")

    monkeypatch.setattr(kernels, "layernorm_mlp_fwd", boom)
    inputs = _inputs(1, 3, 16, 32, seed=61)
    with fastvit.backend("auto"):
        out = _call(inputs)
    torch.testing.assert_close(out, reference.layernorm_mlp(*[inputs[k] for k in NAMES[:7]]))


def test_float64_runs_the_torch_route_with_one_warning():
    inputs = _inputs(1, 3, 16, 32, dtype=torch.float64, seed=67)
    with fastvit.backend("triton"), pytest.warns(fastvit.FastvitFallbackWarning, match="float64"):
        out = _call(inputs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.layernorm_mlp(*[inputs[k] for k in NAMES[:7]]))
    with fastvit.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error")
        _call(inputs)  # the second time: no warning


def test_gradcheck_through_the_float64_route():
    inputs = _inputs(2, 2, 4, 6, layer_scale=True, sample_scale=True, dtype=torch.float64, seed=71)
    with fastvit.backend("torch"):
        assert torch.autograd.gradcheck(
            lambda *t: fastvit.layernorm_mlp(*t[:7], layer_scale=t[7], sample_scale=t[8]),
            [inputs[k] for k in NAMES],
        )


@kernel_test
def test_wide_rows_fall_back_with_a_warning(kernel_device, monkeypatch):
    """Rows wider than the row kernels hold (MAX_DIM; lowered here) run the composite."""
    from fastvit.kernels import layernorm_mlp as kernels

    monkeypatch.setattr(kernels, "MAX_DIM", 40)
    inputs = _inputs(1, 3, 44, 32, device=kernel_device, seed=73)
    with fastvit.backend("triton"), pytest.warns(fastvit.FastvitFallbackWarning, match="D = 44 > 40"):
        out = _call(inputs)
    torch.testing.assert_close(out, reference.layernorm_mlp(*[inputs[k] for k in NAMES[:7]]))


@kernel_test
def test_empty_batch(kernel_device):
    inputs = _inputs(1, 1, 16, 32, device=kernel_device, seed=79)
    inputs["x"] = torch.randn(0, 5, 16, device=kernel_device, requires_grad=True)
    with fastvit.backend("triton"):
        out = _call(inputs)
        out.sum().backward()
    assert out.shape == (0, 5, 16)
    assert torch.equal(inputs["fc1_weight"].grad, torch.zeros_like(inputs["fc1_weight"]))


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError / TypeError naming the argument
# ---------------------------------------------------------------------------------------------
def _bad(**changes):
    inputs = _inputs(2, 3, 8, 16, layer_scale=True, sample_scale=True, seed=83)
    inputs = {k: None if v is None else v.detach() for k, v in inputs.items()}
    kwargs = {}
    for k, v in changes.items():
        if k in inputs:
            inputs[k] = v(inputs[k]) if callable(v) else v
        else:
            kwargs[k] = v
    return inputs, kwargs


BAD = [
    (dict(x=lambda t: t.long()), TypeError, "x must have dtype"),
    (dict(x="tokens"), TypeError, "x must be a torch.Tensor"),
    (dict(x=lambda t: t[..., :0]), ValueError, "D >= 1"),
    (dict(fc1_weight=lambda t: t[:, :7]), ValueError, "fc1_weight must have shape \\(hidden, D=8\\)"),
    (dict(fc1_weight=lambda t: t[0]), ValueError, "fc1_weight must have 2 dimensions"),
    (dict(fc2_weight=lambda t: t.t()), ValueError, "fc2_weight must have shape \\(D=8, hidden=16\\)"),
    (dict(fc1_bias=lambda t: t[:15]), ValueError, "fc1_bias must have shape \\(16,\\)"),
    (dict(fc2_bias=lambda t: t[:7]), ValueError, "fc2_bias must have shape \\(8,\\)"),
    (dict(norm_weight=lambda t: t[:7]), ValueError, "norm_weight must have shape \\(8,\\)"),
    (dict(norm_bias=lambda t: t[None]), ValueError, "norm_bias must have 1 dimensions"),
    (dict(layer_scale=lambda t: t[:5]), ValueError, "layer_scale must have shape \\(8,\\)"),
    (dict(sample_scale=lambda t: torch.ones(3)), ValueError, "sample_scale must have shape \\(2,\\)"),
    (dict(fc1_weight=lambda t: t.half()), TypeError, "same dtype"),
    (dict(sample_scale=lambda t: t.int()), TypeError, "sample_scale must have dtype"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=-1e-6), ValueError, "eps must be a finite number > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
    (dict(eps="1e-6"), TypeError, "eps must be a float"),
    (dict(approximate="relu"), ValueError, "approximate must be one of"),
    (dict(residual=1), TypeError, "residual must be a bool"),
]


@pytest.mark.parametrize("changes,error,pattern", BAD, ids=[p for _, _, p in BAD])
def test_bad_input(changes, error, pattern):
    inputs, kwargs = _bad(**changes)
    with pytest.raises(error, match=pattern):
        _call(inputs, **kwargs)


def test_sample_scale_needs_a_batch_dim():
    inputs, _ = _bad()
    inputs["x"] = inputs["x"][0, 0]
    with pytest.raises(ValueError, match="sample_scale needs x with a leading batch dim"):
        _call(inputs)


@pytest.mark.skipif(not ON_GPU, reason="mixed devices need a GPU")
def test_mixed_devices():
    inputs, _ = _bad()
    inputs["fc1_weight"] = inputs["fc1_weight"].cuda()
    with pytest.raises(ValueError, match=r"same device.*fc1_weight on cuda"):
        _call(inputs)


def test_mixed_devices_meta():
    """A meta-device weight beside CPU tensors stands in for a GPU one on machines without a GPU."""
    inputs, _ = _bad()
    inputs["fc2_bias"] = inputs["fc2_bias"].to("meta")
    with pytest.raises(ValueError, match=r"same device.*fc2_bias on meta"):
        _call(inputs)


def test_composite_semantics_of_the_torch_route_under_autocast():
    """The torch route is the composite itself: under CPU autocast its dtype rules are PyTorch's."""
    inputs = _inputs(2, 3, 16, 32, layer_scale=True, seed=89)
    with fastvit.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(inputs)
        h = F.layer_norm(inputs["x"], (16,), inputs["norm_weight"], inputs["norm_bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, inputs["fc1_weight"], inputs["fc1_bias"])), inputs["fc2_weight"],
                     inputs["fc2_bias"])
        expected = inputs["x"] + h * inputs["layer_scale"]
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected)


@kernel_test
@pytest.mark.parametrize("with_norm_bias", [False, True])
def test_kernel_no_norm_weight_with_a_constant_row_in_fp16(kernel_device, with_norm_bias):
    """No LayerNorm weight, D not a multiple of the K tile: the padded columns must not carry
    -mean * rstd (a constant row of 100 gives -1e5, -inf in fp16, and -inf * 0 = NaN)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.full((1, 2, 8), 100.0, dtype=torch.float16)
    x[0, 1] = torch.randn(8, generator=gen).half()
    w1, w2 = torch.randn(16, 8, generator=gen).half(), torch.randn(8, 16, generator=gen).half()
    norm_b = torch.randn(8, generator=gen).half() if with_norm_bias else None
    args = [t.to(kernel_device) if t is not None else None for t in (x, None, norm_b, w1, None, w2, None)]
    with fastvit.backend("triton"):
        y = fastvit.layernorm_mlp(*args, eps=1e-6)
    expected = reference.layernorm_mlp(*[t.double() if t is not None else None for t in (x, None, norm_b, w1,
                                                                                        None, w2, None)], eps=1e-6)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu().double(), expected, atol=0.5, rtol=2e-2)
