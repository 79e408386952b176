"""fastvit.layernorm_mlp: the Triton kernels (interpreter on CPU, compiled on a GPU) against the float64
reference, output and every gradient; the torch route, dispatch, autocast, validation, the custom
ops and torch.compile, and the activation memory the backward keeps."""

from __future__ import annotations

import itertools
import math
import sys
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
GATE_NAMES = ("fc1_gate_weight", "fc1_gate_bias")  # keyword-only; present with gated="split"
HIDDEN_NAMES = ("hidden_norm_weight", "hidden_norm_bias")  # keyword-only; present with hidden_norm=True
ALL_NAMES = NAMES + GATE_NAMES + HIDDEN_NAMES

kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu


def _inputs(batch, n_tok, dim, hidden, *, bias=True, affine=True, layer_scale=False, sample_scale=False,
            gated=None, norm="layernorm", hidden_norm=False, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random leaf tensors (None where absent), scaled like a trained block so every value
    stays O(1) in fp16. x gets a non-zero mean per row (LayerNorm's centring matters); the sample
    scale looks like drop-path's mask / keep_prob, one sample dropped (0) when batch > 1.
    ``gated``: None, "packed" (fc1 (2 hidden, D), [gate; value]) or "split" (fc1_gate_weight beside
    fc1); ``norm="rms"`` leaves out norm_bias, ``norm="none"`` both norm parameters; ``hidden_norm``
    adds the (hidden,) affine parameters of a LayerNorm before fc2 (call with hidden_norm="layernorm")."""
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
        "fc1_gate_weight": None,
        "fc1_gate_bias": None,
        "hidden_norm_weight": 1.0 + 0.2 * randn(hidden) if hidden_norm else None,
        "hidden_norm_bias": 0.2 * randn(hidden) if hidden_norm else None,
    }
    if gated == "packed":
        tensors["fc1_weight"] = randn(2 * hidden, dim) / math.sqrt(dim)
        tensors["fc1_bias"] = 0.2 * randn(2 * hidden) if bias else None
    elif gated == "split":
        tensors["fc1_gate_weight"] = randn(hidden, dim) / math.sqrt(dim)
        tensors["fc1_gate_bias"] = 0.2 * randn(hidden) if bias else None
    if norm == "rms":
        tensors["norm_bias"] = None
    elif norm == "none":  # the MLP alone
        tensors["norm_weight"] = tensors["norm_bias"] = None
    return {k: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True) for k, t in tensors.items()}


def _call(inputs, op=None, **kwargs):
    """``op`` (fastvit.layernorm_mlp by default, or fastvit.reference's) on the tensors of ``inputs``."""
    op = op or fastvit.layernorm_mlp
    gate = {k: inputs[k] for k in GATE_NAMES + HIDDEN_NAMES if inputs.get(k) is not None}
    return op(
        inputs["x"], inputs["norm_weight"], inputs["norm_bias"], inputs["fc1_weight"], inputs["fc1_bias"],
        inputs["fc2_weight"], inputs["fc2_bias"], layer_scale=inputs["layer_scale"],
        sample_scale=inputs["sample_scale"], **gate, **kwargs,
    )


def _run_kernel(inputs, grad_out=None, **kwargs):
    """Output and the gradient of every present input (dict), through the Triton route."""
    names = [k for k in ALL_NAMES if inputs.get(k) is not None]
    with fastvit.backend("triton"):
        out = _call(inputs, **kwargs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    return out, grad_out, dict(zip(names, grads, strict=True))


def _reference(inputs, grad_out, dtype, **kwargs):
    """(out, grads) of fastvit.reference on CPU copies of the inputs cast to ``dtype``."""
    leaves = {k: None if t is None else t.detach().cpu().to(dtype).requires_grad_(True) for k, t in inputs.items()}
    out = _call(leaves, reference.layernorm_mlp, **kwargs)
    out.backward(grad_out.detach().cpu().to(dtype))
    return out, {k: t.grad for k, t in leaves.items() if t is not None}


# The gradients of layer_scale and sample_scale are sums over token rows: a handful of values
# (with batch 1, dsample_scale is one number), for which the low-precision reference's own error
# can be far below that of such a sum by luck. For those two the slack also holds the forward-error
# bound of the sum itself, eps(dtype) * sum |terms| (terms g * scale * branch, in float64).
FEW_VALUED = ("layer_scale", "sample_scale")


def _sum_bound(inputs, grad_out, name, dtype, **kwargs):
    leaves = {k: None if t is None else t.detach().cpu().double() for k, t in inputs.items()}
    leaves.update(layer_scale=None, sample_scale=None)
    branch = _call(leaves, reference.layernorm_mlp, **{**kwargs, "residual": False})
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,hidden,gated", [(768, 2048, "split"), (1024, 2730, "split"), (768, 3072, None)],
                         ids=["eva02-b", "eva02-l", "plain"])
def test_kernel_hidden_norm_low_precision_gpu(dim, hidden, gated, dtype):
    """The hidden norm at EVA02-B / -L widths (SwiGLU with its scale_mlp LayerNorm; 2730: a hidden
    width in the 4096 row bucket, not a multiple of the tiles) on the compiled kernels."""
    build, call = _variant(gated, "layernorm", "silu" if gated else "gelu")
    inputs = _inputs(2, 197, dim, hidden, layer_scale=True, sample_scale=True, hidden_norm=True, dtype=dtype,
                     device="cuda", seed=13, **build)
    call["hidden_norm"] = "layernorm"
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


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
@pytest.mark.parametrize("shape", [(2, 7, 48), (13, 48), (2, 3, 4, 48)], ids=["tokens", "rows", "grid"])
def test_kernel_output_may_be_edited_in_place_before_the_backward(kernel_device, shape):
    """The output is no view made inside the op: a forward hook's in-place edit (activation
    steering, o.add_()) is recorded by autograd and the backward runs, as on the torch route,
    whatever x's rank."""
    gen = torch.Generator().manual_seed(29)
    inputs = _inputs(1, 1, 48, 96, layer_scale=True, device=kernel_device, seed=29)
    inputs["x"] = torch.randn(*shape, generator=gen).to(kernel_device).requires_grad_(True)
    names = [k for k in ALL_NAMES if inputs.get(k) is not None]
    grads = {}
    for route in ("triton", "torch"):
        with fastvit.backend(route):
            out = _call(inputs)
            out.mul_(2.0).add_(0.5)
            grads[route] = torch.autograd.grad(out.square().sum(), [inputs[k] for k in names])
    for name, g, expected in zip(names, grads["triton"], grads["torch"], strict=True):
        torch.testing.assert_close(g, expected, rtol=2e-4, atol=2e-4, msg=lambda m, n=name: f"d{n}: {m}")


@kernel_test
@pytest.mark.parametrize("route", ["triton", "torch"])
def test_fp32_norm_parameters_with_16_bit_x(kernel_device, route):
    """A 16-bit model that keeps its LayerNorms in fp32 (no autocast): F.layer_norm takes fp32
    affine parameters with fp16 x, and so does the op, on both routes: out in fp16, the norm
    parameters' gradients in fp32, all close to the same mix in the reference."""
    inputs = _inputs(2, 9, 48, 96, layer_scale=True, dtype=torch.float16, device=kernel_device, seed=31)
    for name in ("norm_weight", "norm_bias"):
        inputs[name] = inputs[name].detach().float().requires_grad_(True)
    names = [k for k in ALL_NAMES if inputs.get(k) is not None]
    with fastvit.backend(route):
        out = _call(inputs)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    assert out.dtype == torch.float16
    expected, expected_grads = _reference(inputs, grad_out, torch.float64)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=0, atol=2e-2)
    for name, g in zip(names, grads, strict=True):
        assert g.dtype == inputs[name].dtype, name
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(g.double().cpu(), expected_grads[name], rtol=0, atol=2e-2 * max(1.0, scale),
                                   msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip
    with pytest.raises(TypeError, match="same dtype"):  # the linears' weights still take x's dtype
        inputs["fc2_weight"] = inputs["fc2_weight"].detach().float()
        _call(inputs)


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
        assert t.device.type == kernel_device.type  # cuda:0 here, the fixture's is plain "cuda"
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


def _saved_forward(batch, tokens, device, *, seed):
    """(args in NAMES order, pre-activation, mean, rstd) of one kernel forward (D = 48, hidden 128,
    GELU, residual, layer and sample scales), what the backward launcher takes beside grad_out."""
    from fastvit.kernels.layernorm_mlp import layernorm_mlp_fwd

    inputs = _inputs(batch, tokens, 48, 128, layer_scale=True, sample_scale=True, device=device, seed=seed)
    args = [inputs[k].detach() for k in NAMES]
    _, pre, mean, rstd = layernorm_mlp_fwd(*args, eps=1e-6, activation="gelu", residual=True,
                                           out_dtype=args[0].dtype, save_preact=True)
    return args, pre, mean, rstd


@kernel_test
def test_kernel_weight_gradient_token_splits(kernel_device):
    """The weight-gradient GEMMs split over token ranges (chosen automatically on large GPUs);
    forced here: 3 splits of 64 rows over 150 tokens (the last split partial) give the same sums."""
    from fastvit.kernels.layernorm_mlp_bwd import layernorm_mlp_bwd

    args, pre, mean, rstd = _saved_forward(3, 50, kernel_device, seed=41)
    grad_out = torch.randn_like(args[0])
    kw = dict(activation="gelu", residual=True, needs=(True,) * 9)
    one = layernorm_mlp_bwd(grad_out, *args, pre, mean, rstd, wgrad_split=1, **kw)
    three = layernorm_mlp_bwd(grad_out, *args, pre, mean, rstd, wgrad_split=3, **kw)
    for name, a, b in zip(ALL_NAMES, one, three, strict=True):
        if name in GATE_NAMES + HIDDEN_NAMES:  # not gated, no hidden norm: no gradient
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@kernel_test
def test_kernel_grad_out_layouts_give_the_same_gradients(kernel_device):
    """The backward's GEMMs read dy as (T, D) rows in the GEMM dtype: a view when grad_out already
    is one (a slice of wider rows: row stride > D), else one conversion copy (D not the unit
    stride). Either way the gradients are those of the contiguous grad_out, exactly."""
    from fastvit.kernels.layernorm_mlp_bwd import layernorm_mlp_bwd

    args, pre, mean, rstd = _saved_forward(2, 33, kernel_device, seed=43)
    grad_out = torch.randn_like(args[0])
    wide = torch.zeros(2, 33, 64, device=kernel_device)
    wide[..., :48] = grad_out
    transposed = grad_out.transpose(1, 2).contiguous().transpose(1, 2)  # unit stride in N, not D
    kw = dict(activation="gelu", residual=True, needs=(True,) * 9)
    want = layernorm_mlp_bwd(grad_out, *args, pre, mean, rstd, **kw)
    for dy in (wide[..., :48], transposed):
        got = layernorm_mlp_bwd(dy, *args, pre, mean, rstd, **kw)
        for name, a, b in zip(ALL_NAMES, want, got, strict=True):
            assert (a is None) == (b is None), name
            if a is not None:
                assert torch.equal(a, b), name


@kernel_test
def test_kernel_transposed_x_gives_the_contiguous_results(kernel_device):
    """x a transposed view, a conv map's (B, C, N) seen as (B, N, C) tokens (TinyViT's blocks,
    EfficientFormer's after its Flat): copied to a unit D stride, the outputs and every gradient
    exactly those of the contiguous x."""
    inputs = _inputs(1, 33, 48, 64, layer_scale=True, device=kernel_device, seed=45)
    dense = inputs["x"].detach()
    channels_first = dense.transpose(1, 2).contiguous().requires_grad_(True)  # (B, C, N)
    transposed = dict(inputs, x=channels_first.transpose(1, 2))  # (B, N, C), strides (C N, 1, N)
    grad_out = torch.randn_like(dense)
    want_out, _, want = _run_kernel(inputs, grad_out)
    got_out, _, got = _run_kernel(transposed, grad_out)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_weight_gradient_split_heuristic():
    from fastvit.kernels.layernorm_mlp_bwd import wgrad_splits

    assert wgrad_splits(tiles=9456, rows=50432, block_k=64, sms=132) == 1  # the output fills the GPU
    s = wgrad_splits(tiles=144, rows=50432, block_k=64, sms=132)  # ViT-B dW2: 6 x 24 tiles
    assert s > 1 and 144 * s / (-(-144 * s // 132) * 132) >= 0.85
    assert wgrad_splits(tiles=144, rows=100, block_k=64, sms=132) == 1  # too few tokens to split


def _opcheck_both_ops(inputs, activation, norm, gated, residual, hidden_norm, needs):
    """opcheck of the forward op on ``inputs`` (ALL_NAMES order; absent ones None) and of the backward
    op on what that forward saved; returns the forward's statistics (mean, rstd)."""
    args = [inputs.get(k) for k in ALL_NAMES]
    scalars = (1e-6, activation, norm, gated, residual, torch.float32, True, hidden_norm, 1e-5)
    torch.library.opcheck(torch.ops.fastvit.layernorm_mlp_fwd.default, (*args, *scalars))
    out, pre, mean, rstd = torch.ops.fastvit.layernorm_mlp_fwd(*args, *scalars)
    frozen = [t.detach() if t is not None else None for t in args]
    torch.library.opcheck(
        torch.ops.fastvit.layernorm_mlp_bwd.default,
        (torch.randn_like(out), *frozen, pre.detach(), mean.detach(), rstd.detach(), activation, norm, gated,
         residual, needs, hidden_norm),
    )
    return mean, rstd


@kernel_test
def test_kernel_opcheck(kernel_device):
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops."""
    inputs = _inputs(2, 3, 16, 24, layer_scale=True, sample_scale=True, device=kernel_device, seed=43)
    with fastvit.backend("triton"):
        needs = [True, False] * 4 + [True] + [False] * 4
        _opcheck_both_ops(inputs, "gelu_tanh", "layernorm", False, True, False, needs)
        frozen = [inputs[k].detach() if inputs[k] is not None else None for k in NAMES]  # inference: nothing saved
        torch.library.opcheck(
            torch.ops.fastvit.layernorm_mlp_fwd.default, (*frozen[:4], None, frozen[5], *[None] * 7,
                                                          1e-5, "gelu", "layernorm", False, False, torch.float32,
                                                          False, False, 1e-5)
        )
    # gated (two weights), RMSNorm, SiLU: the other schema paths
    gated = _inputs(2, 3, 16, 24, gated="split", norm="rms", device=kernel_device, seed=44)
    with fastvit.backend("triton"):
        _opcheck_both_ops(gated, "silu", "rms", True, True, False, [True] * 13)
    # the MLP alone (norm="none"): no norm parameters, empty statistics
    alone = _inputs(2, 3, 16, 24, sample_scale=True, norm="none", device=kernel_device, seed=45)
    with fastvit.backend("triton"):
        mean, rstd = _opcheck_both_ops(alone, "gelu", "none", False, False, False, [True] * 9 + [False] * 4)
    assert mean.shape == rstd.shape == (0,)
    # a hidden norm (scale_mlp), packed SwiGLU: its two parameters, the statistics of both norms
    scaled = _inputs(2, 3, 16, 24, gated="packed", hidden_norm=True, layer_scale=True, sample_scale=True,
                     device=kernel_device, seed=46)
    with fastvit.backend("triton"):
        mean, rstd = _opcheck_both_ops(scaled, "silu", "layernorm", True, True, True, [True] * 13)
    assert mean.shape == rstd.shape == (12,)  # 6 rows of the input norm, then 6 of the hidden norm


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
def test_kernel_gated_rms_under_torch_compile(kernel_device):
    """A gated (two-weight) RMSNorm SwiGLU through torch.compile(fullgraph=True): the new custom-op
    arguments trace, and every gradient (the gate's included) matches eager."""
    inputs = _inputs(2, 9, 32, 40, gated="split", norm="rms", layer_scale=True, device=kernel_device, seed=49)
    names = [k for k in ALL_NAMES if inputs[k] is not None]

    def block(*tensors):
        t = dict(zip(names, tensors, strict=True))
        y = fastvit.layernorm_mlp(t["x"] * 1.5, t["norm_weight"], None, t["fc1_weight"], t["fc1_bias"],
                                  t["fc2_weight"], t["fc2_bias"], norm="rms", activation="silu",
                                  fc1_gate_weight=t["fc1_gate_weight"], fc1_gate_bias=t["fc1_gate_bias"],
                                  layer_scale=t["layer_scale"])
        return y.square().sum()

    assert_compiled_matches_eager(block, [inputs[k] for k in names], "triton")


@kernel_test
@pytest.mark.parametrize("residual,scales,norm,hidden_norm", [
    (True, True, "layernorm", False), (True, False, "layernorm", False), (False, False, "layernorm", False),
    (True, True, "none", False), (True, True, "layernorm", True), (False, False, "none", True)])
def test_kernel_autocast(kernel_device, residual, scales, norm, hidden_norm):
    """Under autocast with timm's fp32 residual stream and fp32 parameters: the GEMMs run in the
    autocast dtype, LN statistics in fp32, and the output and gradients have the composite's dtypes
    (fp32 through the residual add or an fp32 scale; the autocast dtype for the bare branch).
    norm="none": fc1 reads x's fp32 rows converted once to the autocast dtype. A hidden norm: its
    fp32 parameters over the autocast-dtype hidden rows, statistics in fp32."""
    low = torch.bfloat16 if ON_GPU else torch.float16
    inputs = _inputs(2, 13, 48, 128, layer_scale=scales, sample_scale=scales, norm=norm, hidden_norm=hidden_norm,
                     device=kernel_device, seed=53)
    names = [k for k in ALL_NAMES if inputs[k] is not None]
    leaves = [inputs[k] for k in names]
    call = dict(residual=residual, norm=norm, hidden_norm="layernorm" if hidden_norm else "none")
    with torch.autocast(kernel_device.type, dtype=low):
        with fastvit.backend("triton"):
            out = _call(inputs, **call)
        with fastvit.backend("torch"):
            expected = _call(inputs, **call)
    assert out.dtype == expected.dtype == (torch.float32 if residual or scales else low)
    grad_out = torch.randn(out.shape, device=kernel_device).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    grads_low = torch.autograd.grad(expected, leaves, grad_out)
    out64, grads64 = _reference(inputs, grad_out, torch.float64, **call)
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


@kernel_test
def test_float64_runs_the_torch_route_with_one_warning(kernel_device):
    sys.modules["fastvit.backend"]._warned.clear()  # "once" per process: another test may have warned
    inputs = _inputs(1, 3, 16, 32, dtype=torch.float64, device=kernel_device, seed=67)
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


# ---------------------------------------------------------------------------------------------
# Variants: activations, RMSNorm, gated MLPs (issue 13, item 3)
# ---------------------------------------------------------------------------------------------
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
GATINGS = (None, "packed", "split")


def _variant(gated, norm, activation):
    """Build and call options of one variant: (keyword arguments of _inputs, of the op)."""
    call = dict(activation=activation, norm=norm)
    if gated == "packed":  # "split" is gated by its fc1_gate_weight alone
        call["gated"] = True
    return dict(gated=gated, norm=norm), call


@kernel_test
@pytest.mark.parametrize("norm", ["layernorm", "rms"])
@pytest.mark.parametrize("gated", GATINGS, ids=["plain", "packed", "split"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_variants_fp32(kernel_device, activation, gated, norm):
    """Every activation x gating x norm, output and every gradient, at D=48 (one partial K tile) and
    hidden 72 (not a multiple of the tile: masked columns in both halves of a gated fc1), with the
    layer scale and the per-sample scale on."""
    build, call = _variant(gated, norm, activation)
    inputs = _inputs(2, 7, 48, 72, layer_scale=True, sample_scale=True, device=kernel_device, seed=101, **build)
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


# (activation, gating, norm, bias): each activation, gating and norm in fp16 at least once
FP16_VARIANTS = [
    ("silu", "packed", "rms", True),  # DINOv2-giant's SwiGLU (packed) under RMSNorm
    ("silu", "split", "rms", False),  # AIMv2 / Pixtral: gate_proj / up_proj, no biases, RMSNorm
    ("quick_gelu", None, "layernorm", True),  # CLIP
    ("gelu_tanh", "split", "layernorm", True),
    ("gelu", None, "rms", True),
    ("gelu", None, "none", True),  # a post-norm block's MLP alone (Swin V2): fc1 reads x's own rows
    ("silu", "split", "none", False),
]


@kernel_test
@pytest.mark.parametrize("activation,gated,norm,bias", FP16_VARIANTS,
                         ids=["-".join(map(str, v)) for v in FP16_VARIANTS])
def test_kernel_variants_fp16(kernel_device, activation, gated, norm, bias):
    """fp16 tensor-core dots; 29 tokens (a partial row tile), hidden 80 (masked)."""
    build, call = _variant(gated, norm, activation)
    inputs = _inputs(2, 29, 64, 80, bias=bias, layer_scale=True, sample_scale=True, dtype=torch.float16,
                     device=kernel_device, seed=103, **build)
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


# The dA GEMM's production tiles (the hardware's gemm_config, not the interpreter's): Hopper 16-bit
# plain on one warpgroup's 64 x 64, gated on 128 x 64 over 8 warps, fp32 gated on 64 x 32, off Hopper
# 64 x 64 with 32-deep K steps. Run in fp32 (the interpreter's 16-bit dots are wrong), so only the
# tiling differs from the launcher's choice there.
DA_TILES = [  # arch, dtype of the tiles, gating, activation, (block_m, block_n, block_k, warps) expected
    (90, torch.bfloat16, None, "gelu", (64, 64, 64, 4)),
    (90, torch.bfloat16, "split", "gelu_tanh", (128, 64, 64, 8)),
    (90, torch.bfloat16, "packed", "silu", (64, 64, 64, 4)),
    (90, torch.float32, "packed", "gelu_tanh", (64, 32, 16, 4)),
    (80, torch.bfloat16, "packed", "gelu_tanh", (64, 64, 32, 4)),
]


@kernel_test
@pytest.mark.parametrize("arch,tile_dtype,gated,activation,expected", DA_TILES,
                         ids=[f"sm{a}-{str(d)[6:]}-{g}-{act}" for a, d, g, act, _ in DA_TILES])
def test_kernel_dA_gemm_on_its_production_tiles(kernel_device, monkeypatch, arch, tile_dtype, gated, activation,
                                                expected):  # fmt: skip
    """D = 80 (a partial K step on 64- and 32-deep tiles), hidden 136 (a partial column tile),
    2 x 70 tokens (a partial row tile), every scale on."""
    from fastvit.kernels import layernorm_mlp as forward_kernels
    from fastvit.kernels import layernorm_mlp_bwd as backward_kernels

    real = forward_kernels.gemm_config
    tiles = []

    def production(arch_, dtype, kind, gated_=False, activation_="gelu"):
        if kind != "fc2_bwd":
            return real(arch_, dtype, kind, gated_, activation_)
        tiles.append(forward_kernels.hardware_gemm_config(arch, tile_dtype, kind, gated_, activation_))
        return tiles[-1]

    monkeypatch.setattr(backward_kernels, "gemm_config", production)
    build, call = _variant(gated, "layernorm", activation)
    inputs = _inputs(2, 70, 80, 136, layer_scale=True, sample_scale=True, device=kernel_device, seed=109, **build)
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)
    assert [(t.block_m, t.block_n, t.block_k, t.num_warps) for t in tiles] == [expected]


@kernel_test
@pytest.mark.parametrize("absent", ["fc1_gate_bias", "fc1_bias"])
def test_kernel_separate_gate_with_one_bias(kernel_device, absent):
    """A gate projection beside fc1 where only one of the two has a bias: each bias is added to its
    own half or not at all (the value bias was dropped, or a missing one read, when the kernel took
    one flag for both)."""
    inputs = _inputs(2, 9, 48, 40, gated="split", layer_scale=True, device=kernel_device, seed=113)
    inputs[absent] = None
    out, grad_out, grads = _run_kernel(inputs, activation="silu")
    _check_against_reference(inputs, out, grad_out, grads, activation="silu")


@kernel_test
def test_kernel_variants_odd_shapes(kernel_device):
    """Odd D and hidden (37, 97: no alignment anywhere), 197 tokens (ViT-B/16 at 224, prime), one
    sample, an RMSNorm eps that visibly matters, gated with two weights and no layer scale."""
    inputs = _inputs(1, 197, 37, 97, gated="split", norm="rms", sample_scale=True, device=kernel_device, seed=107)
    call = dict(activation="silu", norm="rms", eps=0.25)
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


@kernel_test
def test_kernel_rms_without_weight_and_partial_grads(kernel_device):
    """RMSNorm with no weight; only some inputs require grad (each gated gradient alone: the
    backward computes just the half of dW1 that is asked for)."""
    inputs = _inputs(2, 7, 48, 40, gated="split", norm="rms", affine=False, device=kernel_device, seed=109)
    _check_partial_grads(inputs, (["fc1_gate_weight"], ["fc1_weight"], ["fc1_gate_bias", "x"]), activation="gelu",
                         norm="rms")  # fmt: skip


def _check_partial_grads(inputs, wanted_sets, **call):
    """For each set of input names, only those require grad: the kernels' gradients of them (the
    backward skips the others' GEMMs and reductions) against the reference by the tolerance rule."""
    for wanted in wanted_sets:
        leaves = {k: None if t is None else t.detach().requires_grad_(k in wanted) for k, t in inputs.items()}
        with fastvit.backend("triton"):
            out = _call(leaves, **call)
        grad_out = torch.randn_like(out)
        grads = dict(zip(wanted, torch.autograd.grad(out, [leaves[k] for k in wanted], grad_out), strict=True))
        _, grads64 = _reference(inputs, grad_out, torch.float64, **call)
        _, gradslow = _reference(inputs, grad_out, torch.float32, **call)
        for k, g in grads.items():
            slack = None
            if k in FEW_VALUED:
                slack = ATOL[torch.float32] + _sum_bound(inputs, grad_out, k, torch.float32, **call)
            assert_close_to_reference(g, grads64[k], gradslow[k], name=f"d{k}", dtype=torch.float32, atol=slack)


@kernel_test
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("gated", [None, "packed"], ids=["plain", "packed"])
def test_kernel_mlp_alone(kernel_device, gated, residual):
    """norm="none": the MLP alone, the branch of a post-norm block (Swin V2's mlp(x), the block
    normalising its output): fc1 reads x's own rows, dx = dLN [+ dy]. Odd D and hidden (37, 97),
    197 tokens, both scales, output and every gradient."""
    build, call = _variant(gated, "none", "gelu")
    inputs = _inputs(2, 197, 37, 97, layer_scale=True, sample_scale=True, device=kernel_device, seed=151, **build)
    out, grad_out, grads = _run_kernel(inputs, **call, residual=residual)
    _check_against_reference(inputs, out, grad_out, grads, **call, residual=residual)


@kernel_test
def test_kernel_mlp_alone_partial_grads(kernel_device):
    """norm="none" with only some inputs requiring grad: x alone (the row pass writes dx = dLN + dy
    and nothing else), fc1's weight alone (dW1 = dA^T x from x's rows), the scales and fc2's bias
    (the row pass with no dx)."""
    inputs = _inputs(2, 7, 48, 40, layer_scale=True, sample_scale=True, norm="none", device=kernel_device, seed=157)
    _check_partial_grads(inputs, (["x"], ["fc1_weight"], ["fc2_bias", "layer_scale", "sample_scale"]), norm="none")


# ---------------------------------------------------------------------------------------------
# A hidden norm (timm's scale_mlp: fc2(LN(act(fc1(norm(x)))))): EVA02-B/L, EVA-CLIP, BEiT / Eva
# ---------------------------------------------------------------------------------------------
HIDDEN_VARIANTS = [  # gating, activation, input norm
    (None, "gelu", "layernorm"),
    ("packed", "silu", "layernorm"),  # Eva's GluMlp
    ("split", "silu", "layernorm"),  # EVA02's SwiGLU (fc1_g / fc1_x)
    ("split", "gelu_tanh", "rms"),
    (None, "quick_gelu", "none"),  # a post-norm block's MLP alone, with its hidden norm
]


@kernel_test
@pytest.mark.parametrize("gated,activation,norm", HIDDEN_VARIANTS, ids=["-".join(map(str, v)) for v in HIDDEN_VARIANTS])
def test_kernel_hidden_norm_fp32(kernel_device, gated, activation, norm):
    """hidden_norm="layernorm": the forward normalises g in place, the backward runs u = dy (ls W2)
    and the hidden-norm row pass. Output and every gradient (the hidden norm's weight and bias
    included) against float64, 29 tokens, hidden 72 (masked columns), both scales on."""
    build, call = _variant(gated, norm, activation)
    inputs = _inputs(2, 29, 48, 72, layer_scale=True, sample_scale=True, hidden_norm=True, device=kernel_device,
                     seed=171, **build)
    call.update(hidden_norm="layernorm", hidden_eps=1e-5)
    out, grad_out, grads = _run_kernel(inputs, **call)
    assert set(HIDDEN_NAMES) <= set(grads)
    _check_against_reference(inputs, out, grad_out, grads, **call)


@kernel_test
def test_kernel_hidden_norm_odd_shapes(kernel_device):
    """Odd D and hidden (37, 97: the hidden rows padded to a 128-wide bucket), 197 tokens, no
    hidden-norm bias, a hidden eps that visibly matters, one sample, no fc biases."""
    inputs = _inputs(1, 197, 37, 97, bias=False, sample_scale=True, hidden_norm=True, device=kernel_device, seed=173)
    inputs["hidden_norm_bias"] = None
    call = dict(activation="gelu", hidden_norm="layernorm", hidden_eps=0.25)
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


@kernel_test
@pytest.mark.parametrize("gated", [None, "split"], ids=["plain", "split"])
def test_kernel_hidden_norm_fp16(kernel_device, gated):
    """fp16 tensor-core dots with the hidden norm: g and LN(g) rounded as the composite rounds them."""
    build, call = _variant(gated, "layernorm", "silu")
    inputs = _inputs(2, 29, 64, 80, layer_scale=True, sample_scale=True, hidden_norm=True, dtype=torch.float16,
                     device=kernel_device, seed=179, **build)
    call["hidden_norm"] = "layernorm"
    out, grad_out, grads = _run_kernel(inputs, **call)
    _check_against_reference(inputs, out, grad_out, grads, **call)


@kernel_test
def test_kernel_hidden_norm_partial_grads(kernel_device):
    """Only some inputs require grad: the hidden norm's weight alone, its bias with x, fc1's bias
    (dA's column sums), the per-sample scale (LN(g) . u row sums), fc2's weight (ss * LN(g))."""
    inputs = _inputs(2, 7, 48, 40, gated="packed", layer_scale=True, sample_scale=True, hidden_norm=True,
                     device=kernel_device, seed=181)
    _check_partial_grads(
        inputs, (["hidden_norm_weight"], ["hidden_norm_bias", "x"], ["fc1_bias"], ["sample_scale"], ["fc2_weight"]),
        activation="silu", gated=True, hidden_norm="layernorm",
    )


@kernel_test
def test_kernel_hidden_norm_under_torch_compile(kernel_device):
    """torch.compile(fullgraph=True) of a SwiGLU with a hidden norm: the custom ops' new tensor and
    scalar arguments trace, every gradient matches eager."""
    inputs = _inputs(2, 9, 32, 40, gated="split", layer_scale=True, hidden_norm=True, device=kernel_device, seed=183)
    names = [k for k in ALL_NAMES if inputs[k] is not None]

    def block(*tensors):
        t = dict(zip(names, tensors, strict=True))
        y = fastvit.layernorm_mlp(t["x"] * 1.5, t["norm_weight"], t["norm_bias"], t["fc1_weight"], t["fc1_bias"],
                                  t["fc2_weight"], t["fc2_bias"], activation="silu",
                                  fc1_gate_weight=t["fc1_gate_weight"], fc1_gate_bias=t["fc1_gate_bias"],
                                  layer_scale=t["layer_scale"], hidden_norm="layernorm",
                                  hidden_norm_weight=t["hidden_norm_weight"], hidden_norm_bias=t["hidden_norm_bias"])
        return y.square().sum()

    assert_compiled_matches_eager(block, [inputs[k] for k in names], "triton")


@kernel_test
def test_kernel_wide_hidden_norm_falls_back_with_a_warning(kernel_device, monkeypatch):
    """A hidden norm wider than the row kernels hold (MAX_DIM; lowered here) runs the composite,
    with one warning naming it; D itself fits."""
    from fastvit.kernels import layernorm_mlp as kernels

    sys.modules["fastvit.backend"]._warned.clear()
    monkeypatch.setattr(kernels, "MAX_DIM", 40)
    inputs = _inputs(1, 3, 32, 48, hidden_norm=True, device=kernel_device, seed=187)
    with fastvit.backend("triton"), pytest.warns(fastvit.FastvitFallbackWarning, match="hidden norm over 48 > 40"):
        out = _call(inputs, hidden_norm="layernorm")
    torch.testing.assert_close(out, _call(inputs, reference.layernorm_mlp, hidden_norm="layernorm"))


@pytest.mark.parametrize("gated", GATINGS, ids=["plain", "packed", "split"])
def test_torch_route_hidden_norm(gated):
    """The composite with a hidden norm against the float64 reference, output and every gradient,
    in fp32. (In fp16 the route is PyTorch's own F.layer_norm, whose CPU backward rounds its
    parameter-gradient sums through fp16: 5.3e-3 off float64 on sums of ~10 here, measured, where
    the written-out fp16 reference is off 2.2e-3; the kernels' fp16 route is checked above.)"""
    build, call = _variant(gated, "layernorm", "silu")
    inputs = _inputs(2, 9, 24, 20, layer_scale=True, sample_scale=True, hidden_norm=True, seed=191, **build)
    _check_torch_route(inputs, **call, hidden_norm="layernorm", hidden_eps=1e-3)


def _check_torch_route(inputs, **call):
    """The torch route's output and the gradient of every present input against the reference."""
    names = [k for k in ALL_NAMES if inputs.get(k) is not None]
    with fastvit.backend("torch"):
        out = _call(inputs, **call)
    grad_out = torch.randn_like(out)
    grads = dict(zip(names, torch.autograd.grad(out, [inputs[k] for k in names], grad_out), strict=True))
    _check_against_reference(inputs, out, grad_out, grads, **call)


def test_hidden_norm_matches_timm_scale_mlp():
    """The convention is timm's: ``Mlp(norm_layer=...)`` / ``SwiGLU(norm_layer=...)`` apply their
    norm after the activation (gating) and dropout, before fc2; hidden_eps None takes eps."""
    timm_mlp = pytest.importorskip("timm.layers.mlp")
    torch.manual_seed(0)
    dim, hidden, x = 16, 24, torch.randn(2, 5, 16)
    norm = torch.nn.LayerNorm(dim, eps=1e-6)
    h = norm(x)
    mlp = timm_mlp.Mlp(dim, hidden, norm_layer=torch.nn.LayerNorm)
    swiglu = timm_mlp.SwiGLU(dim, hidden, norm_layer=torch.nn.LayerNorm)
    for m in (mlp.norm, swiglu.norm):
        with torch.no_grad():
            m.weight.add_(0.1 * torch.randn(hidden))
            m.bias.add_(0.1 * torch.randn(hidden))
    y = fastvit.layernorm_mlp(x, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                              eps=1e-5, hidden_norm="layernorm", hidden_norm_weight=mlp.norm.weight,
                              hidden_norm_bias=mlp.norm.bias, residual=False)
    torch.testing.assert_close(y, mlp(F.layer_norm(x, (dim,), norm.weight, norm.bias, 1e-5)))
    y = fastvit.layernorm_mlp(x, norm.weight, norm.bias, swiglu.fc1_x.weight, swiglu.fc1_x.bias, swiglu.fc2.weight,
                              swiglu.fc2.bias, eps=norm.eps, activation="silu", fc1_gate_weight=swiglu.fc1_g.weight,
                              fc1_gate_bias=swiglu.fc1_g.bias, hidden_norm="layernorm",
                              hidden_norm_weight=swiglu.norm.weight, hidden_norm_bias=swiglu.norm.bias,
                              hidden_eps=swiglu.norm.eps)
    torch.testing.assert_close(y, x + swiglu(h))


@kernel_test
@pytest.mark.parametrize("layout", ["token_strided", "padded_rows", "transposed"])
def test_kernel_mlp_alone_strided_x_gives_the_contiguous_results(kernel_device, layout):
    """norm="none" reads x's rows as fc1's A operand: a view of x when its tokens are GEMM rows, a
    copy otherwise (every other token, rows padded past D, a conv map's transposed view): outputs
    and every gradient exactly those of the contiguous x."""
    inputs = _inputs(2, 9, 48, 64, layer_scale=True, norm="none", device=kernel_device, seed=163)
    dense = inputs["x"].detach()
    if layout == "token_strided":
        base = torch.zeros(2, 18, 48, device=kernel_device)
        base[:, ::2] = dense
        x = base.requires_grad_(True)[:, ::2]
    elif layout == "padded_rows":
        base = torch.zeros(2, 9, 64, device=kernel_device)
        base[..., :48] = dense
        x = base.requires_grad_(True)[..., :48]
    else:
        x = dense.transpose(1, 2).contiguous().requires_grad_(True).transpose(1, 2)
    grad_out = torch.randn_like(dense)
    want_out, _, want = _run_kernel(inputs, grad_out, norm="none")
    got_out, _, got = _run_kernel(dict(inputs, x=x), grad_out, norm="none")
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_mlp_alone_reads_x_rows_without_a_copy():
    """The no-norm GEMM operand is x itself where x's tokens already are (T, D) rows in the GEMM
    dtype (no copy the user did not ask for), and a copy only where they are not."""
    from fastvit.kernels.layernorm_mlp import token_rows

    buf = torch.randn(3, 5, 8)
    for x in (buf, buf[1:], buf[:1, 2:]):
        rows = token_rows(x, torch.float32)
        assert rows.data_ptr() == x.data_ptr() and rows.stride() == (8, 1)
        torch.testing.assert_close(rows, x.reshape(-1, 8), rtol=0, atol=0)
    copied = ((buf[:, ::2], torch.float32), (buf[:, :1], torch.float32), (buf[..., :6], torch.float32),
              (buf.transpose(0, 1), torch.float32), (buf, torch.float16))
    for x, dtype in copied:
        rows = token_rows(x, dtype)
        assert rows.dtype == dtype and rows.stride() == (x.shape[-1], 1) and rows.data_ptr() != buf.data_ptr()
        torch.testing.assert_close(rows, x.reshape(-1, x.shape[-1]).to(dtype), rtol=0, atol=0)


@kernel_test
@pytest.mark.parametrize("layout", ["glu_gate_last", "adjacent_views"])
def test_kernel_gate_and_value_as_views_of_one_weight(kernel_device, layout):
    """No copies for other packings: timm's GluMlp (gate_last=True, fc1 = [value; gate]) passes row
    views ``fc1_weight=W[:H], fc1_gate_weight=W[H:]`` (the backward stacks them once); views in the
    kernel's own order ([gate; value]) are used as one weight. Gradients land in W's layout."""
    hidden = 40
    packed = _inputs(2, 7, 48, hidden, gated="packed", layer_scale=True, device=kernel_device, seed=113)
    w, b = packed["fc1_weight"], packed["fc1_bias"]
    if layout == "glu_gate_last":
        value, gate = (w[:hidden], b[:hidden]), (w[hidden:], b[hidden:])
    else:
        gate, value = (w[:hidden], b[:hidden]), (w[hidden:], b[hidden:])
    with fastvit.backend("triton"):
        out = fastvit.layernorm_mlp(
            packed["x"], packed["norm_weight"], packed["norm_bias"], value[0], value[1], packed["fc2_weight"],
            packed["fc2_bias"], activation="silu", fc1_gate_weight=gate[0], fc1_gate_bias=gate[1],
            layer_scale=packed["layer_scale"],
        )
    grad_out = torch.randn_like(out)
    dw, db, dx = torch.autograd.grad(out, [w, b, packed["x"]], grad_out)
    # the same math through the reference, packed in the order the layout says
    first, second = slice(0, hidden), slice(hidden, None)
    order = [second, first] if layout == "glu_gate_last" else [first, second]  # [gate, value] rows of W
    leaves = {k: None if t is None else t.detach().double().requires_grad_(True) for k, t in packed.items()}
    w64, b64 = leaves["fc1_weight"], leaves["fc1_bias"]
    ref = reference.layernorm_mlp(
        leaves["x"], leaves["norm_weight"], leaves["norm_bias"], w64[order[1]], b64[order[1]],
        leaves["fc2_weight"], leaves["fc2_bias"], activation="silu", fc1_gate_weight=w64[order[0]],
        fc1_gate_bias=b64[order[0]], layer_scale=leaves["layer_scale"],
    )
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw.double(), w64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db.double(), b64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx.double(), leaves["x"].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["layernorm", "rms", "none"])
@pytest.mark.parametrize("gated", GATINGS, ids=["plain", "packed", "split"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_route_variants(activation, gated, norm, dtype):
    """The composite of torch ops (the CPU route, and every fallback) against the float64
    reference with the tolerance rule, output and every gradient."""
    build, call = _variant(gated, norm, activation)
    inputs = _inputs(2, 9, 24, 20, layer_scale=True, sample_scale=True, dtype=dtype, seed=127, **build)
    _check_torch_route(inputs, **call)


def test_variants_match_timm_and_hugging_face_modules():
    """The conventions are the models' own: timm's SwiGLUPacked (fc1 = [gate; value], act on the
    first half) and SwiGLU (fc1_g / fc1_x), Hugging Face's gate_proj / up_proj MLPs (AIMv2, DINOv3,
    DINOv2 SwiGLU) with its RMSNorm, CLIP's quick_gelu."""
    timm_mlp = pytest.importorskip("timm.layers.mlp")
    torch.manual_seed(0)
    dim, hidden, x = 16, 24, torch.randn(2, 5, 16)
    norm = torch.nn.LayerNorm(dim)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(dim))
    h = norm(x)

    packed = timm_mlp.SwiGLUPacked(dim, 2 * hidden)
    y = fastvit.layernorm_mlp(x, norm.weight, norm.bias, packed.fc1.weight, packed.fc1.bias, packed.fc2.weight,
                              packed.fc2.bias, eps=norm.eps, activation="silu", gated=True, residual=False)
    torch.testing.assert_close(y, packed(h))

    glu = timm_mlp.GluMlp(dim, 2 * hidden, act_layer=torch.nn.SiLU)  # gate_last=True: [value; gate]
    w, b = glu.fc1.weight, glu.fc1.bias
    y = fastvit.layernorm_mlp(x, norm.weight, norm.bias, w[:hidden], b[:hidden], glu.fc2.weight, glu.fc2.bias,
                              eps=norm.eps, activation="silu", fc1_gate_weight=w[hidden:], fc1_gate_bias=b[hidden:],
                              residual=False)
    torch.testing.assert_close(y, glu(h))

    split = timm_mlp.SwiGLU(dim, hidden)
    y = fastvit.layernorm_mlp(x, norm.weight, norm.bias, split.fc1_x.weight, split.fc1_x.bias, split.fc2.weight,
                              split.fc2.bias, eps=norm.eps, activation="silu", fc1_gate_weight=split.fc1_g.weight,
                              fc1_gate_bias=split.fc1_g.bias, residual=False)
    torch.testing.assert_close(y, split(h))

    aimv2 = pytest.importorskip("transformers.models.aimv2.modeling_aimv2")
    from transformers import Aimv2VisionConfig

    config = Aimv2VisionConfig(hidden_size=dim, intermediate_size=hidden, hidden_act="silu", mlp_bias=False)
    rms, mlp = aimv2.Aimv2RMSNorm(dim, eps=1e-5), aimv2.Aimv2MLP(config)
    with torch.no_grad():
        rms.weight.add_(0.1 * torch.randn(dim))
    y = fastvit.layernorm_mlp(x, rms.weight, None, mlp.up_proj.weight, None, mlp.down_proj.weight, None, eps=1e-5,
                              norm="rms", activation=config.hidden_act, fc1_gate_weight=mlp.gate_proj.weight)
    torch.testing.assert_close(y, x + mlp(rms(x)))

    clip = pytest.importorskip("transformers.activations")
    fc1, fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
    y = fastvit.layernorm_mlp(x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=norm.eps,
                              activation="quick_gelu")
    torch.testing.assert_close(y, x + fc2(clip.ACT2FN["quick_gelu"](fc1(h))))


def test_approximate_keeps_working_and_maps_to_activation():
    inputs = _inputs(2, 3, 16, 24, seed=131)
    with fastvit.backend("torch"), torch.no_grad():
        for approximate, activation in (("none", "gelu"), ("tanh", "gelu_tanh")):
            torch.testing.assert_close(_call(inputs, approximate=approximate), _call(inputs, activation=activation))
            # both given and agreeing is fine
            torch.testing.assert_close(_call(inputs, approximate=approximate, activation=activation),
                                       _call(inputs, activation=activation))
        torch.testing.assert_close(_call(inputs), _call(inputs, activation="gelu"))  # the default
        torch.testing.assert_close(_call(inputs, activation="swish"), _call(inputs, activation="silu"))
        torch.testing.assert_close(_call(inputs, activation="gelu_pytorch_tanh"), _call(inputs, activation="gelu_tanh"))
        assert not torch.allclose(_call(inputs, activation="silu"), _call(inputs, activation="gelu"))


VARIANT_BAD = [
    (dict(approximate="tanh", activation="silu"), ValueError, "conflicts with activation='silu'"),
    (dict(approximate="none", activation="gelu_tanh"), ValueError, "conflicts"),
    (dict(approximate="exact"), ValueError, "approximate must be one of"),
    (dict(activation="relu"), ValueError, "activation must be one of"),
    (dict(norm="batchnorm"), ValueError, "norm must be one of"),
    (dict(norm="rms"), ValueError, "norm_bias must be None with norm='rms'"),
    (dict(norm="none"), ValueError, "norm_weight and norm_bias must be None with norm='none'"),
    (dict(gated=True), ValueError, r"fc2_weight must have shape \(D=16, hidden=12\)"),
    (dict(gated="yes"), TypeError, "gated must be a bool"),
    (dict(fc1_gate_bias=torch.zeros(24)), ValueError, "fc1_gate_bias was given without fc1_gate_weight"),
    (dict(fc1_gate_weight=torch.zeros(24, 16), gated=False), ValueError, "with gated=False"),
    (dict(fc1_gate_weight=torch.zeros(12, 16)), ValueError, r"fc1_gate_weight must have fc1_weight's shape \(24, 16\)"),
    (dict(fc1_gate_weight=torch.zeros(24, 16), fc1_gate_bias=torch.zeros(12)), ValueError,
     r"fc1_gate_bias must have shape \(24,\)"),
    (dict(fc1_gate_weight=torch.zeros(24, 16, dtype=torch.float16)), TypeError, "dtype"),
    (dict(hidden_norm="rms"), ValueError, "hidden_norm must be one of"),
    (dict(hidden_norm_weight=torch.ones(24)), ValueError, "given with hidden_norm='none'"),
    (dict(hidden_norm="layernorm", hidden_norm_bias=torch.ones(16)), ValueError,
     r"hidden_norm_bias must have shape \(24,\)"),
    (dict(hidden_norm="layernorm", hidden_norm_weight=torch.ones(24, dtype=torch.float16)), TypeError, "dtype"),
    (dict(hidden_norm="layernorm", hidden_eps=0.0), ValueError, "hidden_eps must be a finite number > 0"),
    (dict(hidden_norm="layernorm", hidden_eps="1e-6"), TypeError, "hidden_eps must be a float"),
]


@pytest.mark.parametrize("kwargs,error,pattern", VARIANT_BAD, ids=[p for _, _, p in VARIANT_BAD])
def test_bad_variant_arguments(kwargs, error, pattern):
    inputs = _inputs(2, 3, 16, 24, seed=137)
    with pytest.raises(error, match=pattern):
        _call(inputs, **kwargs)


def test_gated_packed_needs_an_even_fc1():
    inputs = _inputs(2, 3, 16, 24, seed=139)
    inputs["fc1_weight"] = torch.randn(25, 16)
    inputs["fc1_bias"] = None
    inputs["fc2_weight"] = torch.randn(16, 12)
    with pytest.raises(ValueError, match=r"packed as \[gate; value\].*odd rows"):
        _call(inputs, gated=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("activation,gated,norm,hidden_norm", [
    ("silu", "split", "rms", False), ("gelu_tanh", "packed", "layernorm", False), ("quick_gelu", None, "rms", False),
    ("gelu", None, "none", False), ("silu", "split", "layernorm", True), ("gelu", None, "none", True)])
def test_torchscript_form_covers_the_variants(activation, gated, norm, hidden_norm):
    """The TorchScript twin that FX graphs script (fastvit/ops/_torchscript.py) takes the same
    keywords and computes the same variants as the reference."""
    from fastvit.ops import _torchscript

    scripted = torch.jit.script(_torchscript.layernorm_mlp)
    build, call = _variant(gated, norm, activation)
    inputs = {k: None if t is None else t.detach()
              for k, t in _inputs(2, 3, 16, 24, layer_scale=True, hidden_norm=hidden_norm, seed=149, **build).items()}
    if hidden_norm:
        call.update(hidden_norm="layernorm", hidden_eps=1e-3)
    torch.testing.assert_close(_call(inputs, scripted, **call), _call(inputs, reference.layernorm_mlp, **call))
