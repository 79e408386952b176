"""fastvit.rotary_qk: the Triton kernel (interpreter on CPU, compiled on a GPU) against the float64
reference (timm's ``apply_rot_embed_cat`` math), forward and backward, both lane layouts and every
embedding shape timm's Eva passes; the torch route, dispatch, validation, meta tensors,
torch.compile, torch.func, FX and TorchScript."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

import fastvit
from fastvit import reference
from tests.compile_check import assert_compiled_matches_eager
from tests.tolerance import assert_close_to_reference

ON_GPU = torch.cuda.is_available()
kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu
backend_module = importlib.import_module("fastvit.backend")  # fastvit.backend is also the function

# (B, H, N, D): N = 7 and 13 are odd and below one block of rows; D = 6 and 10 pad 3 and 5 lane
# pairs to 4 and 8 (masked lanes in both layouts); 197 = ViT-B/16 at 224 (cls + 14 * 14, prime,
# across blocks of 32 rows) at D = 64
SHAPES = [(2, 3, 7, 6), (1, 2, 13, 16), (2, 2, 9, 10), (1, 2, 197, 64)]
PREFIX = [0, 1, 5]  # none (SAM-style), a class token, class + 4 registers (DINOv3)
# the embedding as Eva hands it to a block: (N - P, 2D) for 'cat' and DINOv3; (H, N - P, 2D) per
# block for mixed RoPE; (B, 1, N - P, 2D) after patch dropout; and a full (B, H, N - P, 2D)
ROPE_LAYOUTS = ["tokens", "heads", "batch", "full"]
# dtypes the interpreter runs right (bf16 is covered on a GPU: the interpreter's bf16 rounding is off)
INTERP_DTYPES = [torch.float32, torch.float16]


def _rope_shape(layout: str, b: int, h: int, rows: int, d: int) -> tuple[int, ...]:
    return {"tokens": (rows, 2 * d), "heads": (h, rows, 2 * d), "batch": (b, 1, rows, 2 * d),
            "full": (b, h, rows, 2 * d)}[layout]  # fmt: skip


def _inputs(b, h, n, d, num_prefix, layout="tokens", *, dtype=torch.float32, rope_dtype=torch.float32,
            device="cpu", seed=0):  # fmt: skip
    """q, k as views of a packed (B, N, 3, H, D) qkv (timm's layout: non-contiguous, unit stride in
    D), and a timm-like embedding: sin and cos of real angles, duplicated within each lane pair."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=gen).to(device, dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    shape = _rope_shape(layout, b, h, n - num_prefix, d)
    angles = torch.rand(*shape[:-1], d // 2, generator=gen, dtype=torch.float64) * 20 - 10
    angles = angles.repeat_interleave(2, -1)  # timm's interleaved layout; the half one is checked alike
    rope = torch.cat([angles.sin(), angles.cos()], -1).to(device, rope_dtype)
    return q, k, rope


def _reference(q, k, rope, num_prefix, half, grads=None):
    """(oracle, lowp): the reference in float64 and in the input dtypes; each (q_rot, k_rot[, dq, dk])."""
    results = []
    for upcast in (True, False):
        qq, kk, rr = (t.detach().cpu().double() if upcast else t.detach().cpu() for t in (q, k, rope))
        qq, kk = qq.requires_grad_(grads is not None), kk.requires_grad_(grads is not None)
        outs = reference.rotary_qk(qq, kk, rr, num_prefix_tokens=num_prefix, rotate_half=half)
        if grads is not None:
            gq, gk = (g.cpu().to(o.dtype) for g, o in zip(grads, outs, strict=True))
            outs = (*outs, *torch.autograd.grad(outs, (qq, kk), (gq, gk)))
        results.append(outs)
    return results


def _check(actual, oracle, lowp, dtype):
    for name, a, o, lo in zip(("q_rot", "k_rot", "dq", "dk"), actual, oracle, lowp, strict=False):
        assert a.dtype == dtype, name
        assert_close_to_reference(a.cpu(), o, lo, name=name)


@kernel_test
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("num_prefix", PREFIX)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(kernel_device, shape, num_prefix, half):
    q, k, rope = _inputs(*shape, num_prefix, device=kernel_device, seed=sum(shape) + num_prefix)
    q, k = q.requires_grad_(), k.requires_grad_()  # views: the leaves are their own tensors
    grads = [torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(kernel_device) for i in (1, 2)]
    with fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=num_prefix, rotate_half=half)
    assert q_rot.shape == k_rot.shape == shape and q_rot.is_contiguous()
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), grads)
    oracle, lowp = _reference(q, k, rope, num_prefix, half, grads)
    _check((q_rot, k_rot, dq, dk), oracle, lowp, torch.float32)
    # the prefix rows are the inputs' own values, bit for bit
    assert torch.equal(q_rot[:, :, :num_prefix], q[:, :, :num_prefix])


@kernel_test
@pytest.mark.parametrize("layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_kernel_embedding_layouts_and_dtypes(kernel_device, layout, half, dtype):
    """Each broadcast shape of the embedding, fp32 (timm's) beside fp16 q and k; fp16 embeddings too
    (a model cast with .half(): timm would compute in fp16, the kernel computes in fp32)."""
    for rope_dtype in (torch.float32, dtype):
        q, k, rope = _inputs(3, 2, 11, 8, 1, layout, dtype=dtype, rope_dtype=rope_dtype, device=kernel_device, seed=5)
        q, k = q.requires_grad_(), k.requires_grad_()
        grads = [torch.randn(q.shape).to(kernel_device, dtype) for _ in range(2)]
        with fastvit.backend("triton"):
            q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1, rotate_half=half)
        dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), grads)
        oracle, lowp = _reference(q, k, rope, 1, half, grads)
        _check((q_rot, k_rot, dq, dk), oracle, lowp, dtype)


@kernel_test
def test_kernel_strided_embedding_and_inference_tensors(kernel_device):
    """An embedding without a unit last stride (a transposed table) is read through its strides;
    inputs made under inference_mode run too."""
    q, k, rope = _inputs(2, 2, 9, 8, 1, device=kernel_device, seed=43)
    strided = rope.t().contiguous().t()  # (N - P, 2D) with strides (1, N - P)
    with torch.inference_mode(), fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, strided, num_prefix_tokens=1, rotate_half=True)
    oracle, lowp = _reference(q, k, rope, 1, True)
    _check((q_rot, k_rot), oracle, lowp, torch.float32)


@kernel_test
def test_kernel_expanded_and_strided_gradients(kernel_device):
    """grad of q_rot from ``.sum()`` (stride 0 everywhere) and of k_rot a transposed view: read in place."""
    q, k, rope = _inputs(2, 3, 10, 8, 2, "heads", device=kernel_device, seed=7)
    q, k = q.requires_grad_(), k.requires_grad_()
    weight = torch.randn(2, 10, 3, 8).to(kernel_device).transpose(1, 2)  # k_rot's gradient: non-contiguous
    with fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=2, rotate_half=True)
        dq, dk = torch.autograd.grad(q_rot.sum() + (k_rot * weight).sum(), (q, k))
    grads = (torch.ones(q.shape).to(kernel_device), weight)
    oracle, lowp = _reference(q, k, rope, 2, True, grads)
    _check((q_rot, k_rot, dq, dk), oracle, lowp, torch.float32)


@kernel_test
@pytest.mark.parametrize("used", ["q_rot", "k_rot"])
def test_kernel_unused_output_leaves_its_input_without_gradient(kernel_device, used):
    """Only one of q_rot, k_rot in the loss: the other input's .grad stays None, as on the torch
    route (it was a tensor of zeros), and the used one's gradient is the reference's."""
    q, k, rope = _inputs(2, 3, 10, 8, 1, "heads", device=kernel_device, seed=8)
    q, k = q.requires_grad_(), k.requires_grad_()
    with fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    (q_rot if used == "q_rot" else k_rot).square().sum().backward()
    (kept, kept_out), (dropped, _) = ((q, q_rot), (k, k_rot)) if used == "q_rot" else ((k, k_rot), (q, q_rot))
    assert dropped.grad is None and kept.grad is not None
    grads = [torch.zeros(q.shape).to(kernel_device)] * 2
    grads[0 if used == "q_rot" else 1] = 2 * kept_out.detach()
    oracle, lowp = _reference(q, k, rope, 1, False, grads)
    index = 2 if used == "q_rot" else 3
    assert_close_to_reference(kept.grad.cpu(), oracle[index], lowp[index], name="grad")


@kernel_test
def test_kernel_all_prefix_and_empty_batch(kernel_device):
    """N == P (nothing rotated: an empty embedding) copies q and k; an empty batch returns empties."""
    q, k, rope = _inputs(2, 2, 3, 4, 3, device=kernel_device)
    with fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=3)
        assert torch.equal(q_rot, q) and torch.equal(k_rot, k)
        q, k, rope = _inputs(0, 2, 5, 4, 1, device=kernel_device)
        q_rot, _ = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    assert q_rot.shape == (0, 2, 5, 4)


@kernel_test
@pytest.mark.parametrize("half", [False, True])
def test_kernel_copies_non_finite_prefix_rows(kernel_device, half):
    """A prefix row is copied, not rotated by an identity (inf * 0 would give NaN in its partner lane)."""
    q, k, rope = _inputs(1, 2, 5, 4, 2, device=kernel_device, seed=3)
    q, k = q.clone(), k.clone()
    q[0, 1, 0] = torch.tensor([float("inf"), 1.0, float("-inf"), 2.0])
    k[0, 0, 1] = torch.tensor([float("nan"), 1.0, 3.0, float("inf")])
    with fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=2, rotate_half=half)
    assert torch.equal(q_rot[:, :, :2], q[:, :, :2])
    torch.testing.assert_close(k_rot[:, :, :2], k[:, :, :2], rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(q_rot[:, :, 2:]).all()


@kernel_test
def test_kernel_matches_torch_route(kernel_device):
    q, k, rope = _inputs(2, 2, 9, 16, 1, "batch", device=kernel_device, seed=11)
    with fastvit.backend("triton"):
        fused = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    with fastvit.backend("torch"):
        composite = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    for a, b in zip(fused, composite, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@kernel_test
def test_kernel_opcheck(kernel_device):
    """Schema, fake tensor, autograd registration and AOT dispatch of the two custom ops."""
    q, k, rope = _inputs(2, 3, 7, 6, 1, "heads", device=kernel_device, seed=13)
    ops = torch.ops.fastvit
    torch.library.opcheck(ops.rotary_qk_fwd.default, (q, k, rope, 1, False))
    torch.library.opcheck(ops.rotary_qk_fwd.default, (q.requires_grad_(), k, rope, 0 + 1, True))
    grad = torch.randn(2, 3, 7, 6, device=kernel_device)
    torch.library.opcheck(ops.rotary_qk_bwd.default, (grad, grad.expand(2, 3, 7, 6), rope, 1, False))


@kernel_test
def test_kernel_under_torch_compile(kernel_device):
    q, k, rope = _inputs(2, 2, 9, 8, 1, device=kernel_device, seed=17)
    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]

    def block(q, k):
        q_rot, k_rot = fastvit.rotary_qk(q * 2, k, rope, num_prefix_tokens=1)
        return (q_rot * k_rot).square().sum()

    assert_compiled_matches_eager(block, leaves, "triton")
    with fastvit.backend("triton"):  # torch.compile's eager backend, fullgraph
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(*leaves), block(*leaves))


@kernel_test
def test_kernel_under_torch_func_and_no_double_backward(kernel_device):
    q, k, rope = _inputs(1, 2, 6, 4, 1, device=kernel_device, seed=19)
    q, k = q.detach().clone(), k.detach().clone()

    def loss(q, k):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
        return (q_rot * k_rot).sum()

    with fastvit.backend("triton"):
        dq = torch.func.grad(loss)(q, k)
    qq, kk = q.double().requires_grad_(), k.double()
    expected = torch.autograd.grad(
        (lambda a, b: (a * b).sum())(*reference.rotary_qk(qq, kk, rope.double(), num_prefix_tokens=1)), qq
    )[0]
    torch.testing.assert_close(dq.double(), expected, rtol=1e-5, atol=1e-5)
    q.requires_grad_()
    with fastvit.backend("triton"):
        (dq,) = torch.autograd.grad(loss(q, k), q, create_graph=True)
        with pytest.raises(RuntimeError, match=r"fastvit.rotary_qk: the fused kernels .* first derivatives"):
            dq.sum().backward()


@kernel_test
def test_embedding_that_requires_grad_runs_the_composite(kernel_device):
    """timm's mixed RoPE learns its frequencies: the embedding's gradient comes from the torch route."""
    q, k, rope = _inputs(2, 2, 7, 8, 1, "heads", device=kernel_device, seed=23)
    rope.requires_grad_()
    with fastvit.backend("triton"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    (drope,) = torch.autograd.grad((q_rot * k_rot).sum(), rope)
    rr = rope.detach().cpu().double().requires_grad_()
    qr, kr = reference.rotary_qk(q.cpu().double(), k.cpu().double(), rr, num_prefix_tokens=1)
    (expected,) = torch.autograd.grad((qr * kr).sum(), rr)
    torch.testing.assert_close(drope.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), fastvit.backend("triton"):  # no gradient asked: the kernel runs
        q_rot2, _ = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    torch.testing.assert_close(q_rot2, q_rot.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("half", [False, True])
def test_gpu_bf16_with_fp32_embedding(half):
    q, k, rope = _inputs(4, 12, 197, 64, 1, dtype=torch.bfloat16, device="cuda", seed=29)
    q, k = q.requires_grad_(), k.requires_grad_()
    grads = [torch.randn(q.shape, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1, rotate_half=half)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), grads)
    oracle, lowp = _reference(q, k, rope, 1, half, grads)
    _check((q_rot, k_rot, dq, dk), oracle, lowp, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# torch route, dispatch, meta tensors, FX, TorchScript
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("layout", ROPE_LAYOUTS)
def test_torch_route_is_timms_math(layout, half):
    timm_layers = pytest.importorskip("timm.layers")
    q, k, rope = _inputs(2, 3, 9, 8, 1, layout, dtype=torch.float64, rope_dtype=torch.float64, seed=31)
    with fastvit.backend("torch"):
        q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1, rotate_half=half)
    for x, out in ((q, q_rot), (k, k_rot)):
        timm = torch.cat([x[:, :, :1], timm_layers.apply_rot_embed_cat(x[:, :, 1:], rope, half=half)], dim=2)
        torch.testing.assert_close(out, timm, rtol=0, atol=0)
        ref = reference.rotary_qk(x, x, rope, num_prefix_tokens=1, rotate_half=half)[0]
        torch.testing.assert_close(ref, timm, rtol=0, atol=0)


def test_torch_route_computes_in_fp32_and_returns_q_dtype():
    q, k, rope = _inputs(1, 2, 5, 4, 1, dtype=torch.bfloat16, rope_dtype=torch.bfloat16, seed=37)
    with fastvit.backend("torch"):
        q_rot, _ = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    expected = reference.rotary_qk(q.float(), k.float(), rope.float(), num_prefix_tokens=1)[0].bfloat16()
    assert q_rot.dtype == torch.bfloat16
    torch.testing.assert_close(q_rot, expected, rtol=0, atol=0)


def test_auto_backend_on_cpu_is_the_torch_route(monkeypatch):
    rotary = importlib.import_module("fastvit.ops.rotary")
    monkeypatch.setattr(rotary, "_rotary_qk_fwd", None)  # the Triton route would fail
    q, k, rope = _inputs(1, 2, 5, 4, 1)
    fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)


@pytest.mark.skipif(ON_GPU, reason="needs the interpreter")
def test_float64_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend_module, "_warned", set())
    q, k, rope = _inputs(1, 2, 5, 4, 1, dtype=torch.float64)
    with fastvit.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
        fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    assert [str(w.message) for w in caught if issubclass(w.category, fastvit.FastvitFallbackWarning)] == [
        "fastvit.rotary_qk: the triton backend takes fp16, bf16 and fp32; running the torch composite for "
        "q float64, rope float32"
    ]
    assert out[0].dtype == torch.float64


@pytest.mark.parametrize("route", ["auto", "triton", "torch"])
def test_meta_tensors(route):
    q = torch.empty(2, 8, 3, 12, 64, device="meta").permute(2, 0, 3, 1, 4)[0]  # a packed-qkv view
    rope = torch.empty(7, 128, device="meta")
    with fastvit.backend(route):
        q_rot, k_rot = fastvit.rotary_qk(q, q, rope, num_prefix_tokens=1)
    assert q_rot.device.type == "meta" and q_rot.shape == k_rot.shape == (2, 12, 8, 64)
    assert q_rot.dtype == torch.float32


def test_fx_leaf_and_torchscript():
    class Rotate(torch.nn.Module):
        def forward(self, q, k, rope):
            q_rot, k_rot = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1, rotate_half=True)
            return q_rot + k_rot

    graph = torch.fx.symbolic_trace(Rotate())
    called = [n.target.__name__ for n in graph.graph.nodes if n.op == "call_function"]
    assert called == ["rotary_qk", "getitem", "getitem", "add"]  # one leaf node, its two outputs
    q, k, rope = _inputs(2, 2, 6, 8, 1, seed=41)
    expected = Rotate()(q, k, rope)
    torch.testing.assert_close(graph(q, k, rope), expected, rtol=0, atol=0)
    scripted = torch.jit.script(graph)
    torch.testing.assert_close(scripted(q, k, rope), expected, rtol=1e-6, atol=1e-6)


def _bad(**overrides):
    q, k, rope = _inputs(2, 3, 7, 8, 1)
    args = {"q": q, "k": k, "rope": rope, "num_prefix_tokens": 1, "rotate_half": False} | overrides
    return args


@pytest.mark.parametrize(
    "args, error, pattern",
    [
        (_bad(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
        (_bad(q=torch.randn(2, 7, 8)), ValueError, r"q must have 4 dimensions \(batch, heads, tokens, head_dim\)"),
        (_bad(k=torch.randn(2, 3, 6, 8)), ValueError, r"k must have q's shape.*\(2, 3, 6, 8\)"),
        (_bad(k=torch.randn(2, 3, 7, 8, dtype=torch.float16)), TypeError, r"same dtype, got q float32, k float16"),
        (_bad(q=torch.randn(2, 3, 7, 7), k=torch.randn(2, 3, 7, 7)), ValueError, r"head_dim must be even"),
        (_bad(q=torch.zeros(2, 3, 7, 8, dtype=torch.int32)), TypeError, r"q must have dtype in"),
        (_bad(rope=torch.randn(7, 16)), ValueError, r"rope must be timm's \[sin, cos\] embedding of the 6 rotated"),
        (_bad(rope=torch.randn(6, 8)), ValueError, r"\(N - P, 2D\).*got \(6, 8\)"),
        (_bad(rope=torch.randn(2, 2, 6, 16)), ValueError, r"broadcastable \(B\|1, H\|1, N - P, 2D\)"),
        (_bad(rope=torch.randn(1, 1, 1, 6, 16)), ValueError, r"got \(1, 1, 1, 6, 16\)"),
        (_bad(rope=torch.randn(6, 16, device="meta")), ValueError, r"same device.*rope on meta"),
        (_bad(num_prefix_tokens=8), ValueError, r"num_prefix_tokens must be in \[0, N\] = \[0, 7\]"),
        (_bad(num_prefix_tokens=1.0), TypeError, r"num_prefix_tokens must be an int"),
        (_bad(rotate_half="no"), TypeError, r"rotate_half must be a bool"),
    ],
)
def test_bad_input(args, error, pattern):
    with pytest.raises(error, match=pattern):
        fastvit.rotary_qk(args.pop("q"), args.pop("k"), args.pop("rope"), **args)


def test_plain_eager_has_an_eager_form():
    """Plain eager calls run the implementation directly (fastvit.ops._autograd.call), both passes."""
    rotary = importlib.import_module("fastvit.ops.rotary")
    for twin in (rotary._rotary_qk_fwd_function, rotary._bwd_function):
        assert issubclass(twin.eager, torch.autograd.Function)
