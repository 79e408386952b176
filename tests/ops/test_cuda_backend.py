"""The ``cuda`` backend (the extension fastvit._C) behind the public ops, against the float64
reference: forward and every gradient of ``fastvit.layernorm_mlp`` and ``fastvit.patch_embed``.

On a machine without a GPU these run the extension's CPU loops (the same row math the CUDA
kernels run, and the same composites with ATen's CPU GEMMs); on a GPU, the CUDA kernels and
cuBLAS(Lt). Also: dispatch (what ``cuda`` covers and what it leaves to Triton), autocast,
torch.compile over the TORCH_LIBRARY ops, and the errors when the extension is missing.
"""

from __future__ import annotations

import importlib
import itertools
import warnings

import pytest
import torch

import fastvit
from tests.compile_check import assert_compiled_matches_eager
from tests.ops import test_layernorm_mlp as lnm
from tests.ops import test_patch_embed as pe
from tests.tolerance import ATOL, assert_close_to_reference

backend_module = importlib.import_module("fastvit.backend")  # fastvit.backend is also the function
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

pytestmark = pytest.mark.usefixtures("cuda_extension")


def _mlp(inputs, grad_out=None, **kwargs):
    names = [k for k in lnm.NAMES if inputs[k] is not None]
    with fastvit.backend("cuda"):
        out = lnm._call(inputs, **kwargs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    return out, grad_out, dict(zip(names, grads, strict=True))


# ---------------------------------------------------------------------------------------------
# layernorm_mlp
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,hidden,batch,n_tok,options", lnm.SHAPES,
                         ids=[f"D{s[0]}-H{s[1]}-{s[2]}x{s[3]}" for s in lnm.SHAPES])
def test_layernorm_mlp_shapes_fp32(dim, hidden, batch, n_tok, options):
    build, call = lnm._split(options)
    inputs = lnm._inputs(batch, n_tok, dim, hidden, device=DEVICE, seed=dim + hidden + n_tok, **build)
    out, grad_out, grads = _mlp(inputs, **call)
    lnm._check_against_reference(inputs, out, grad_out, grads, **call)


@pytest.mark.parametrize(
    "bias,residual,layer_scale,sample_scale,approximate",
    list(itertools.product([True, False], [True, False], [True, False], [True, False], ["none", "tanh"])),
)
def test_layernorm_mlp_options(bias, residual, layer_scale, sample_scale, approximate):
    """Every combination of the optional parts, at odd widths (D=37, hidden 97: no vector path)."""
    inputs = lnm._inputs(3, 5, 37, 97, bias=bias, layer_scale=layer_scale, sample_scale=sample_scale,
                         device=DEVICE, seed=11)
    out, grad_out, grads = _mlp(inputs, residual=residual, approximate=approximate)
    lnm._check_against_reference(inputs, out, grad_out, grads, residual=residual, approximate=approximate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_mlp_low_precision(dtype):
    inputs = lnm._inputs(2, 29, 64, 170, layer_scale=True, sample_scale=True, dtype=dtype, device=DEVICE, seed=7)
    out, grad_out, grads = _mlp(inputs)
    lnm._check_against_reference(inputs, out, grad_out, grads)


def test_layernorm_mlp_inference_tanh_uses_the_gelu_epilogue_route():
    """Without autograd the tanh form takes the fused GEMM+GELU (cuBLASLt's epilogue on a GPU):
    still the reference's numbers, and nothing kept."""
    inputs = lnm._inputs(2, 7, 48, 192, device=DEVICE, seed=13)
    with torch.no_grad(), fastvit.backend("cuda"):
        out = lnm._call(inputs, approximate="tanh")
    grad_out = torch.randn_like(out)
    out64, _ = lnm._reference(inputs, grad_out, torch.float64, approximate="tanh")
    out32, _ = lnm._reference(inputs, grad_out, torch.float32, approximate="tanh")
    assert_close_to_reference(out.cpu(), out64, out32.detach(), name="out")


def test_layernorm_mlp_views_and_expanded_grad():
    """x a strided view of a wider token buffer, grad_output from out.sum() (stride 0 everywhere)."""
    inputs = lnm._inputs(2, 9, 40, 96, device=DEVICE, seed=17)
    wide = torch.randn(2, 9, 64, device=DEVICE)
    with torch.no_grad():
        wide[..., 8:48].copy_(inputs["x"])
    x = wide[..., 8:48].requires_grad_(False)
    view_inputs = dict(inputs, x=x.detach().requires_grad_(True))
    out, grad_out, grads = _mlp(view_inputs, grad_out=torch.ones(2, 9, 40, device=DEVICE).expand(2, 9, 40))
    plain = dict(inputs, x=x.detach().contiguous().requires_grad_(True))
    lnm._check_against_reference(plain, out, grad_out, grads)
    with fastvit.backend("cuda"):
        out2 = lnm._call(view_inputs)
        (g,) = torch.autograd.grad(out2.sum(), [view_inputs["x"]])
    torch.testing.assert_close(g, grads["x"])


def test_layernorm_mlp_partial_requires_grad():
    """Frozen parts (a frozen LayerNorm and fc1, only x, only the scales): the requested gradients
    still match, the others are not asked for."""
    inputs = lnm._inputs(2, 7, 48, 96, layer_scale=True, sample_scale=True, device=DEVICE, seed=19)
    grad_out = torch.randn(2, 7, 48, device=DEVICE)
    _, grads64 = lnm._reference(inputs, grad_out, torch.float64)
    _, grads32 = lnm._reference(inputs, grad_out, torch.float32)
    frozen_ln_fc1 = [k for k in lnm.NAMES if k not in ("norm_weight", "norm_bias", "fc1_weight")]
    for wanted in (["x"], frozen_ln_fc1, ["layer_scale", "fc2_bias"], ["sample_scale"]):
        for k in lnm.NAMES:
            inputs[k].requires_grad_(k in wanted)
        with fastvit.backend("cuda"):
            grads = torch.autograd.grad(lnm._call(inputs), [inputs[k] for k in wanted], grad_out)
        for k, g in zip(wanted, grads, strict=True):
            slack = None
            if k in lnm.FEW_VALUED:
                slack = ATOL[torch.float32] + lnm._sum_bound(inputs, grad_out, k, torch.float32)
            assert_close_to_reference(g.cpu(), grads64[k], grads32[k], name=f"d{k}", atol=slack)


def test_layernorm_mlp_deterministic():
    inputs = lnm._inputs(3, 33, 64, 256, layer_scale=True, device=DEVICE, seed=23)
    grad_out = torch.randn(3, 33, 64, device=DEVICE)
    first = _mlp(inputs, grad_out)
    second = _mlp(inputs, grad_out)
    assert torch.equal(first[0], second[0])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_layernorm_mlp_autocast_keeps_the_fp32_residual_stream():
    dtype = torch.bfloat16
    inputs = lnm._inputs(2, 7, 48, 192, layer_scale=True, device=DEVICE, seed=29)
    with torch.autocast(DEVICE.type, dtype=dtype):
        out, grad_out, grads = _mlp(inputs)
        with fastvit.backend("torch"):
            composite = lnm._call(inputs)
    assert out.dtype == composite.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    out64, _ = lnm._reference(inputs, grad_out, torch.float64)
    assert_close_to_reference(out.detach().cpu(), out64, composite.detach().cpu(), name="out", dtype=dtype)


def test_layernorm_mlp_under_torch_compile():
    inputs = lnm._inputs(2, 7, 48, 192, layer_scale=True, device=DEVICE, seed=31)
    leaves = [inputs[k] for k in lnm.NAMES if inputs[k] is not None]

    def block(x, nw, nb, w1, b1, w2, b2, ls):
        return fastvit.layernorm_mlp(x * 2, nw, nb, w1, b1, w2, b2, layer_scale=ls).square().sum()

    assert_compiled_matches_eager(block, leaves, "cuda")


# ---------------------------------------------------------------------------------------------
# patch_embed
# ---------------------------------------------------------------------------------------------
def _patch(inputs, grad_out=None):
    names = [k for k in pe.NAMES if inputs[k] is not None]
    with fastvit.backend("cuda"):
        out = pe._call(inputs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, [inputs[k] for k in names], grad_out)
    return out, grad_out, dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("shape", pe.SHAPES, ids=lambda s: "B{}C{}H{}W{}p{}D{}P{}-{}".format(*s))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_patch_embed_fp32(shape, channels_last):
    inputs = pe._inputs(*shape, device=DEVICE, channels_last=channels_last, seed=sum(shape[:7]))
    out, grad_out, grads = _patch(inputs)
    pe._check(inputs, out, grad_out, grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patch_embed_low_precision(dtype):
    inputs = pe._inputs(2, 3, 32, 48, 16, 40, 1, "all", dtype=dtype, device=DEVICE, seed=37)
    out, grad_out, grads = _patch(inputs)
    pe._check(inputs, out, grad_out, grads)


def test_patch_embed_without_bias_and_strided_image():
    inputs = pe._inputs(2, 3, 24, 40, 8, 24, 0, "patches", bias=False, device=DEVICE, seed=41)
    big = torch.randn(2, 5, 30, 44, device=DEVICE)
    with torch.no_grad():
        big[:, 1:4, 3:27, 2:42].copy_(inputs["x"])
    inputs["x"] = big[:, 1:4, 3:27, 2:42].detach().requires_grad_(True)
    out, grad_out, grads = _patch(inputs)
    pe._check(inputs, out, grad_out, grads)


def test_patch_embed_autocast_follows_the_composite():
    dtype = torch.bfloat16
    inputs = pe._inputs(2, 3, 24, 16, 8, 32, 1, "all", device=DEVICE, seed=43)
    with torch.autocast(DEVICE.type, dtype=dtype), fastvit.backend("cuda"):
        out = pe._call(inputs)
        with fastvit.backend("torch"):
            composite = pe._call(inputs)
    assert out.dtype == composite.dtype == torch.float32
    oracle, _ = pe._reference(inputs, torch.randn_like(out), torch.float64)
    assert_close_to_reference(out.detach().cpu(), oracle, composite.detach().cpu(), name="tokens", dtype=dtype)


def test_patch_embed_dynamic_padding_runs_the_triton_kernel(monkeypatch):
    """The extension does not cover dynamic_img_pad: that call runs what an uncovered op runs."""
    calls = []
    monkeypatch.setattr(torch.ops.fastvit_C, "patch_embed_fwd", lambda *a: calls.append(a))
    inputs = pe._inputs(1, 3, 20, 20, 8, 16, 1, None, device=DEVICE, seed=47)
    if not ON_GPU:
        from fastvit.kernels.runtime import INTERPRETER

        assert INTERPRETER  # conftest runs the kernels in the interpreter on CPU
    with fastvit.backend("cuda"):
        out = pe._call(inputs, pad=True)
    assert out.shape == (1, 1 + 9, 16) and not calls


def test_patch_embed_under_torch_compile():
    inputs = pe._inputs(2, 3, 16, 16, 8, 16, 1, "all", device=DEVICE, seed=53)
    leaves = [inputs[k] for k in pe.NAMES]

    def stem(x, weight, bias, pos, cls):
        return fastvit.patch_embed(x * 2, weight, bias, pos_embed=pos, prefix_tokens=cls).square().sum()

    with fastvit.backend("cuda"):
        loss = torch.compile(stem, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(*leaves)
        grads = torch.autograd.grad(loss, leaves)
        eager = stem(*leaves)
        eager_grads = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(loss, eager)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


# variants the extension's composite does not cover: each runs the torch route with one warning
CUDA_FALLBACKS = [
    # (gated, norm, activation, what the warning names)
    ("split", "layernorm", "silu", "gated MLPs"),
    ("packed", "rms", "silu", "gated MLPs"),
    (None, "rms", "gelu", "RMSNorm"),
    (None, "layernorm", "quick_gelu", "activation 'quick_gelu'"),
    (None, "layernorm", "silu", "activation 'silu'"),
]


@pytest.mark.parametrize("gated,norm,activation,reason", CUDA_FALLBACKS, ids=[f[3] for f in CUDA_FALLBACKS])
def test_layernorm_mlp_variants_fall_back_with_one_warning(monkeypatch, gated, norm, activation, reason):
    """Gated MLPs, RMSNorm and the non-GELU activations: the torch route under ``cuda``, one
    FastvitFallbackWarning naming what is not covered, results and gradients still right."""
    monkeypatch.setattr(backend_module, "_warned", set())
    build, call = lnm._variant(gated, norm, activation)
    inputs = lnm._inputs(2, 5, 24, 40, layer_scale=True, device=DEVICE, seed=17, **build)
    names = [k for k in lnm.ALL_NAMES if inputs.get(k) is not None]
    with fastvit.backend("cuda"), pytest.warns(fastvit.FastvitFallbackWarning, match=reason):
        out = lnm._call(inputs, **call)
    grad_out = torch.randn_like(out)
    grads = dict(zip(names, torch.autograd.grad(out, [inputs[k] for k in names], grad_out), strict=True))
    lnm._check_against_reference(inputs, out, grad_out, grads, **call)
    with fastvit.backend("cuda"), warnings.catch_warnings():
        warnings.simplefilter("error")
        lnm._call(inputs, **call)  # the second time: no warning


def test_layernorm_mlp_gelu_activation_names_run_the_extension():
    """``activation="gelu"`` / ``"gelu_tanh"`` are the extension's two GELU forms: no fallback."""
    inputs = lnm._inputs(2, 5, 24, 40, device=DEVICE, seed=19)
    for activation in ("gelu", "gelu_tanh"):
        with fastvit.backend("cuda"), warnings.catch_warnings():
            warnings.simplefilter("error")
            out, grad_out, grads = _mlp(inputs, activation=activation)
        lnm._check_against_reference(inputs, out, grad_out, grads, activation=activation)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def test_flash_attention_under_cuda_runs_the_triton_kernels(monkeypatch):
    """The extension has no attention kernel: under ``cuda`` attention runs its Triton route."""
    assert backend_module.CUDA_OPS == ("layernorm_mlp", "patch_embed")
    with fastvit.backend("cuda"):
        assert backend_module.resolve_backend(DEVICE, "flash_attention") == "triton"
        assert backend_module.resolve_backend(DEVICE, "layernorm_mlp") == "cuda"
    q = torch.randn(1, 2, 7, 16, device=DEVICE)
    with fastvit.backend("cuda"):
        out = fastvit.flash_attention(q, q, q)
    with fastvit.backend("torch"):
        torch.testing.assert_close(out, fastvit.flash_attention(q, q, q), atol=1e-5, rtol=1e-5)


def test_cuda_backend_without_the_extension_says_why(monkeypatch):
    from fastvit import extension

    monkeypatch.setattr(extension, "load", lambda build=None: False)
    monkeypatch.setattr(extension, "unavailable_reason", lambda: "no compiler in this test")
    inputs = lnm._inputs(1, 3, 16, 64, device=DEVICE)
    with fastvit.backend("cuda"), pytest.raises(RuntimeError, match="no compiler in this test"):
        lnm._call(inputs)
