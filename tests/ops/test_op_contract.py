"""What every public op shares, on every route: NaN query rows, double backward and ``torch.func``,
meta tensors, inference-mode inputs, sparse inputs, dtype-mismatch messages under autocast, and
the backend choice seen from threads.

Routes: ``torch`` (PyTorch's own ops), ``triton`` (the kernels: interpreter on CPU, compiled on a
GPU) and ``cuda`` (the extension fastvit._C for layernorm_mlp and patch_embed, Triton for the
others). Shapes are small and awkward (N = 7 below every block, varlen lengths 3 and 7, a 3 x 3
grid padded to window 2), so the interpreter runs them in seconds.
"""

from __future__ import annotations

import importlib
import sys
import threading

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastvit
from fastvit import reference
from tests.tolerance import assert_close_to_reference
from tests.torch_compat import TORCH_VERSION

backend_module = importlib.import_module("fastvit.backend")  # fastvit.backend is also the function
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
kernel_mark = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu

OPS = ("flash_attention", "flash_attention_varlen", "window_attention", "layernorm_mlp", "patch_embed")
ATTENTION_OPS = OPS[:3]
ROUTES = ["torch", pytest.param("triton", marks=kernel_mark), pytest.param("cuda", marks=kernel_mark)]
FUSED_ROUTES = ROUTES[1:]


def _use_route(route: str, request: pytest.FixtureRequest) -> None:
    """The ``cuda`` route needs the extension (built on first use; see conftest's fixture)."""
    if route == "cuda":
        request.getfixturevalue("cuda_extension")


def _rerun_tolerance(t: torch.Tensor) -> dict[str, float]:
    """Two runs of the same math: bitwise equal on the CPU; on a GPU an input copied by the op
    lands at another alignment, and the kernels (Triton's and SDPA's) specialise on alignment, so
    the same sums may round in another order (seen on an H200: window_attention, 2.4e-7)."""
    return dict(rtol=0, atol=0) if t.device.type == "cpu" else dict(rtol=1e-5, atol=1e-6)


def _case(op: str, device: torch.device | str = DEVICE, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(call, tensors): ``call(*tensors)`` runs ``fastvit.<op>`` on fresh random float tensors (every
    differentiable input, in the op's argument order), shaped to hit boundaries."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)

    if op == "flash_attention":
        # N = 7 queries, M = 9 keys: below every block, and M != N
        return (lambda q, k, v: fastvit.flash_attention(q, k, v)), [rand(2, 3, 7, 16), rand(2, 3, 9, 16),
                                                                     rand(2, 3, 9, 16)]
    if op == "flash_attention_varlen":
        cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=device)  # two sequences, lengths 3 and 7
        return (lambda q, k, v: fastvit.flash_attention_varlen(q, k, v, cu)), [rand(10, 2, 16) for _ in range(3)]
    if op == "window_attention":
        # a cls token and a 3 x 3 grid in windows of 2 (padded to 4 x 4), shifted: the region mask
        def window(q, k, v):
            return fastvit.window_attention(q, k, v, (3, 3), 2, shift=1, num_prefix_tokens=1)

        return window, [rand(2, 2, 10, 16) for _ in range(3)]
    if op == "layernorm_mlp":
        # D = 24, hidden 40: neither a power of two; weights scaled like a trained block
        def mlp(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
            return fastvit.layernorm_mlp(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)

        return mlp, [rand(2, 5, 24), 1 + rand(24, scale=0.1), rand(24, scale=0.1), rand(40, 24, scale=0.2),
                     rand(40, scale=0.1), rand(24, 40, scale=0.15), rand(24, scale=0.1)]
    if op == "patch_embed":
        # 8 x 12 images, patch 4: a 2 x 3 grid, one cls token, pos_embed over cls + patches
        def embed(x, weight, bias, pos_embed, prefix_tokens):
            return fastvit.patch_embed(x, weight, bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)

        return embed, [rand(2, 3, 8, 12), rand(16, 3, 4, 4, scale=0.2), rand(16, scale=0.1), rand(1, 7, 16),
                       rand(1, 1, 16)]
    raise ValueError(f"unknown op {op!r}")


def _leaves(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------------------------------------
# NaN in a query row (issue 17, item 9)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES[:2])
@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_a_nan_in_a_query_row_gives_that_row_nan_on_every_route(op, route):
    """The math (the float64 reference, SDPA's math backend, the kernels) gives NaN in a query row
    holding a NaN; PyTorch's CPU flash SDPA gave zeros there. Other rows are untouched."""
    call, (q, k, v) = _case(op, seed=1)
    # row 0: the first query (window_attention: the cls token, attending globally without a mask);
    # row 4: a middle query (window_attention: a grid token in a masked window; varlen: sequence 2)
    rows = (0, 4)
    rows_dim = 0 if q.dim() == 3 else 2  # varlen's (T, H, D): the token is the row
    q_nan = q.clone()
    for row in rows:
        q_nan.select(rows_dim, row)[..., 5] = float("nan")
    with fastvit.backend(route):
        out = call(q_nan, k, v)
        clean = call(q, k, v)
    nan_rows = torch.isnan(out).any(-1)
    expected = torch.zeros_like(nan_rows)
    for row in rows:
        assert torch.isnan(out.select(rows_dim, row)).all(), f"row {row} holds a NaN: it must be NaN, as the math gives"
        expected.select(rows_dim, row).fill_(True)
    assert torch.equal(nan_rows, expected), "only the rows holding a NaN may be NaN"
    keep = ~expected
    torch.testing.assert_close(out[keep], clean[keep], rtol=0, atol=0)


@pytest.mark.parametrize("route", ROUTES[:2])
def test_a_nan_query_row_that_is_fully_masked_still_gives_zeros(route, kernel_device):
    """The contract's fully masked rows (zeros, never NaN) win over a NaN in the row, as in the reference."""
    device = kernel_device if route == "triton" else torch.device("cpu")
    _, (q, k, v) = _case("flash_attention", device=device, seed=2)
    q[0, 1, 3, 0] = float("nan")
    q[0, 1, 5, 2] = float("nan")
    keep = torch.ones(7, 9, dtype=torch.bool, device=device)
    keep[3] = False  # row 3 attends to nothing
    with fastvit.backend(route):
        out = fastvit.flash_attention(q, k, v, attn_mask=keep)
    expected, _ = reference.attention(*(t.double().cpu() for t in (q, k, v)), attn_mask=keep.cpu())
    assert torch.equal(out[0, 1, 3].cpu(), torch.zeros(16))
    assert torch.isnan(out[0, 1, 5]).all() and torch.isnan(expected[0, 1, 5]).all()


# ---------------------------------------------------------------------------------------------
# Double backward and torch.func (issue 17, item 11)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", FUSED_ROUTES)
@pytest.mark.parametrize("op", OPS)
def test_double_backward_on_a_fused_route_names_fastvit_and_the_torch_route(op, route, request):
    """A first backward with create_graph=True works; differentiating it raises an error naming the
    op and the torch route (with SDPA's math backend for attention), which then computes it."""
    _use_route(route, request)
    call, tensors = _case(op, seed=3)
    leaves = _leaves(tensors)
    named = "flash_attention" if op == "window_attention" else op  # window attention runs flash_attention
    with fastvit.backend(route):
        out = call(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        with pytest.raises(RuntimeError, match=rf"fastvit\.{named}: .*first derivatives only.*backend\('torch'\)"):
            torch.autograd.grad(penalty, leaves)
    with fastvit.backend("torch"), sdpa_kernel(SDPBackend.MATH):  # the way out the message gives
        out = call(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves, allow_unused=True)
    assert any(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in second)


@pytest.mark.parametrize("route", FUSED_ROUTES)
@pytest.mark.parametrize("op", OPS)
def test_forward_mode_ad_on_a_fused_route_names_fastvit_and_the_torch_route(op, route, request):
    """torch.func.jvp (and forward_ad dual tensors) on a fused route raises an error naming the op and
    the torch route (with SDPA's math backend for attention), which then computes the jvp."""
    _use_route(route, request)
    call, tensors = _case(op, seed=5)
    tensors = tuple(tensors)
    named = "flash_attention" if op == "window_attention" else op  # window attention runs flash_attention
    tangents = tuple(torch.randn_like(t) for t in tensors)
    message = rf"fastvit\.{named}: .*reverse-mode derivatives only.*backend\('torch'\)"
    with fastvit.backend(route), pytest.raises(RuntimeError, match=message):
        torch.func.jvp(call, tensors, tangents)
    with fastvit.backend("torch"), sdpa_kernel(SDPBackend.MATH):  # the way out the message gives
        _, jvp_out = torch.func.jvp(call, tensors, tangents)
    assert torch.isfinite(jvp_out).all() and jvp_out.abs().sum() > 0


@pytest.mark.parametrize("route", FUSED_ROUTES)
@pytest.mark.parametrize("op", OPS)
def test_torch_func_grad_on_a_fused_route_matches_autograd(op, route, request):
    """torch.func.grad runs the kernels' backward (the same numbers as torch.autograd.grad); its grad
    of a grad raises the double-backward error."""
    _use_route(route, request)
    call, tensors = _case(op, seed=4)
    argnums = tuple(range(len(tensors)))

    def loss(*ts):
        return call(*ts).square().sum()

    with fastvit.backend(route):
        func_grads = torch.func.grad(loss, argnums=argnums)(*tensors)
        leaves = _leaves(tensors)
        autograd_grads = torch.autograd.grad(loss(*leaves), leaves)
        for got, expected in zip(func_grads, autograd_grads, strict=True):
            torch.testing.assert_close(got, expected, **_rerun_tolerance(got))

        def first_grad_norm(t0):
            return torch.func.grad(loss)(t0, *tensors[1:]).square().sum()

        with pytest.raises(RuntimeError, match=r"first derivatives only"):
            torch.func.grad(first_grad_norm)(tensors[0])


@pytest.mark.parametrize("route", FUSED_ROUTES)
@pytest.mark.parametrize("op", OPS)
def test_torch_func_jacrev_on_a_fused_route_matches_autograd(op, route, request):
    """torch.func.jacrev vmaps the backward over the Jacobian's rows: the kernels have no batched
    form, so their twins loop over the vmapped dim (it raised "does not have vmap support" before).
    Each row equals the gradient of that output element by torch.autograd.grad."""
    _use_route(route, request)
    call, tensors = _case(op, seed=5)

    def some_outputs(first):
        return call(first, *tensors[1:]).sum(-1).flatten()[:5]

    with fastvit.backend(route):
        jacobian = torch.func.jacrev(some_outputs)(tensors[0])
        (leaf,) = _leaves(tensors[:1])
        outputs = some_outputs(leaf)
        for i in range(outputs.numel()):
            (row,) = torch.autograd.grad(outputs[i], leaf, retain_graph=True)
            torch.testing.assert_close(jacobian[i], row, **_rerun_tolerance(row))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("op", OPS)
def test_batched_gradients_match_a_loop_of_gradients(op, route, request):
    """torch.autograd.grad(is_grads_batched=True) and torch.autograd.functional.jacobian(vectorize=True)
    hand the backward PyTorch's (legacy) batched tensors: the fused routes ran their kernels on them
    ("Cannot access storage of BatchedTensorImpl"), or could not be looped over (layernorm_mlp's backward
    returned a list). Every differentiable input's batched gradient equals one backward per vector."""
    _use_route(route, request)
    call, tensors = _case(op, seed=6)
    with fastvit.backend(route):
        leaves = _leaves(tensors)
        out = call(*leaves)
        vectors = torch.randn(3, *out.shape, generator=torch.Generator().manual_seed(7)).to(out)
        batched = torch.autograd.grad(out, leaves, vectors, retain_graph=True, is_grads_batched=True)
        for i, vector in enumerate(vectors):
            looped = torch.autograd.grad(out, leaves, vector, retain_graph=True)
            for got, expected in zip(batched, looped, strict=True):  # (the composite's batched matmuls
                torch.testing.assert_close(got[i], expected, rtol=1e-5, atol=1e-6)  # sum in another order)

        def some_outputs(first):
            return call(first, *tensors[1:]).sum(-1).flatten()[:4]

        vectorized = torch.autograd.functional.jacobian(some_outputs, tensors[0], vectorize=True)
        looped = torch.autograd.functional.jacobian(some_outputs, tensors[0])
        torch.testing.assert_close(vectorized, looped, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Meta tensors (issue 17, item 12)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_meta_inputs_give_meta_outputs_and_gradients(op, name):
    """FSDP and torch.compile build on the meta device: every op gives meta outputs of the real
    shape and dtype (through the custom ops' fake implementations on the fused routes, with no
    interpreter or extension needed), and meta gradients."""
    call, tensors = _case(op, device="cpu", seed=5)
    with fastvit.backend("torch"):
        real = call(*tensors)
    call, meta = _case(op, device="meta", seed=5)
    leaves = [t.requires_grad_(True) for t in meta]
    with fastvit.backend(name):
        out = call(*leaves)
        grads = torch.autograd.grad(out.sum(), leaves)
    assert out.device.type == "meta"
    assert out.shape == real.shape and out.dtype == real.dtype
    for g, t in zip(grads, leaves, strict=True):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype


def test_meta_varlen_needs_no_sequence_lengths_and_returns_lse():
    q = torch.empty(10, 2, 16, device="meta")
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    for name in ("auto", "torch", "triton"):
        with fastvit.backend(name):
            out, lse = fastvit.flash_attention_varlen(q, q, q, cu, return_lse=True)
        assert (out.shape, lse.shape, lse.dtype) == ((10, 2, 16), (2, 10), torch.float32)
        assert out.device.type == lse.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Inference-mode inputs, autocast, sparse inputs, messages (issue 17, item 13)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("op", OPS)
def test_an_inference_mode_input_beside_a_weight_that_requires_grad(op, route, request):
    """An input made under torch.inference_mode() (a frozen feature extractor's output) with a
    trainable weight: the op runs and the weight's gradient is the one a normal input gives."""
    _use_route(route, request)
    call, tensors = _case(op, seed=6)
    with torch.inference_mode():
        first = tensors[0].clone()  # an inference tensor
    assert first.is_inference()
    leaves = _leaves(tensors[1:])
    with fastvit.backend(route):
        out = call(first, *leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        expected_out = call(tensors[0], *leaves)
        expected = torch.autograd.grad(expected_out.square().sum(), leaves)
    torch.testing.assert_close(out, expected_out, **_rerun_tolerance(out))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, **_rerun_tolerance(got))


def test_cpu_autocast_with_an_fp32_stream_and_fp16_layernorm_parameters():
    """timm's fp32 residual stream beside fp16 LayerNorm parameters under CPU autocast: the torch
    route runs LayerNorm in fp32 (as CUDA autocast does; PyTorch's CPU layer_norm raised "mixed
    dtype") and matches the reference; the parameters' gradients keep their dtype."""
    call, tensors = _case("layernorm_mlp", device="cpu", seed=7)
    tensors[1], tensors[2] = tensors[1].half(), tensors[2].half()  # norm_weight, norm_bias
    leaves = _leaves(tensors)
    with fastvit.backend("torch"), torch.autocast("cpu", dtype=torch.float16):
        out = call(*leaves)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), leaves)
    assert grads[1].dtype == grads[2].dtype == torch.float16
    out64 = reference.layernorm_mlp(*(t.detach().double() for t in tensors))
    out16 = reference.layernorm_mlp(*(t.detach().half() for t in tensors))
    assert_close_to_reference(out.detach(), out64, out16, name="out", dtype=torch.float16)


@pytest.mark.parametrize("op", OPS)
def test_a_sparse_input_is_told_to_densify_naming_the_argument(op):
    call, tensors = _case(op, device="cpu", seed=8)
    first = "q" if op in ATTENTION_OPS else "x"
    with pytest.raises(TypeError, match=rf"^{first} must be a dense \(strided\) tensor, got layout sparse_coo; "
                                        r"call \.to_dense\(\)"):
        call(tensors[0].to_sparse(), *tensors[1:])


def test_a_sparse_mask_or_cu_seqlens_is_told_to_densify():
    _, (q, k, v) = _case("flash_attention", device="cpu", seed=9)
    with pytest.raises(TypeError, match=r"^attn_mask must be a dense \(strided\) tensor"):
        fastvit.flash_attention(q, k, v, attn_mask=torch.ones(7, 9).to_sparse())
    cu = torch.tensor([0, 3, 10], dtype=torch.int32).to_sparse()
    t = torch.randn(10, 2, 16)
    with pytest.raises(TypeError, match=r"^cu_seqlens_q must be a dense \(strided\) tensor"):
        fastvit.flash_attention_varlen(t, t, t, cu)


def test_a_nested_input_is_rejected_naming_the_argument():
    nested = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"^x must be a dense tensor, got a nested tensor"):
        fastvit.layernorm_mlp(nested, None, None, torch.randn(8, 16), None, torch.randn(16, 8), None)


@pytest.mark.parametrize("op", ["flash_attention", "window_attention", "layernorm_mlp"])
def test_a_dtype_mismatch_under_autocast_does_not_claim_to_be_outside_it(op):
    """float64 is the one dtype autocast leaves alone: the mismatch message says so under autocast,
    and keeps "(outside autocast)" outside it."""
    call, tensors = _case(op, device="cpu", seed=10)
    mixed = [tensors[0].double(), *tensors[1:]]
    mismatch = r"same dtype after autocast's casts .*leaves float64"
    with torch.autocast("cpu", dtype=torch.bfloat16), fastvit.backend("torch"), pytest.raises(TypeError,
                                                                                            match=mismatch) as info:
        call(*mixed)
    assert "outside autocast" not in str(info.value)
    with fastvit.backend("torch"), pytest.raises(TypeError, match=r"same dtype \(outside autocast\)"):
        call(*mixed)


def test_the_backend_block_reaches_threads_started_inside_it(monkeypatch):
    """nn.DataParallel runs its replicas in new threads, which do not inherit context variables:
    they follow the most recent block open in the process (over FASTVIT_BACKEND), and stop when it
    closes, whatever order blocks in different threads close in."""
    monkeypatch.setenv("FASTVIT_BACKEND", "triton")
    seen: dict[str, str] = {}

    def look(key: str) -> None:
        seen[key] = backend_module.resolve_backend(torch.device("cpu")) if key == "route" else fastvit.current_backend()

    def in_thread(key: str) -> None:
        thread = threading.Thread(target=look, args=(key,))
        thread.start()
        thread.join()

    with fastvit.backend("torch"):
        in_thread("inside")
        in_thread("route")  # "torch": no interpreter check, whatever the environment says
        entered, leave = threading.Event(), threading.Event()

        def other_block() -> None:
            with fastvit.backend("auto"):
                entered.set()
                leave.wait(timeout=30)

        other = threading.Thread(target=other_block)
        other.start()
        entered.wait(timeout=30)
        in_thread("latest")  # the block opened last, in the other thread
        assert fastvit.current_backend() == "torch"  # this thread's own block still rules here
    in_thread("after own block closed")  # the other thread's block is still open
    leave.set()
    other.join()
    in_thread("after all closed")
    assert seen == {
        "inside": "torch", "route": "torch", "latest": "auto", "after own block closed": "auto",
        "after all closed": "triton",
    }


@pytest.mark.parametrize("reads_context_vars", [True, False], ids=["contextvar", "open-blocks"])
def test_backend_blocks_rule_inside_torch_compile(reads_context_vars, monkeypatch):
    """Under torch.compile the innermost backend() block picks the route, also where dynamo cannot
    read context variables (torch < 2.14, simulated here): there the open blocks decide."""
    if reads_context_vars and TORCH_VERSION < (2, 14):
        pytest.skip("this torch's dynamo cannot trace ContextVar.get")
    backend_module = sys.modules["fastvit.backend"]
    monkeypatch.setattr(backend_module, "_DYNAMO_READS_CONTEXT_VARS", reads_context_vars)
    torch._dynamo.reset()
    seen = []

    def record(x):
        seen.append(fastvit.current_backend())  # runs while dynamo traces
        return x * 2

    compiled = torch.compile(record, backend="eager", fullgraph=True)
    with fastvit.backend("torch"), fastvit.backend("triton"):
        compiled(torch.ones(3))
    assert seen == ["triton"]
    torch._dynamo.reset()


def test_autocast_dtype_inside_torch_compile():
    """The autocast rule is read while dynamo traces, without a graph break (torch 2.11's dynamo
    cannot trace torch.amp.is_autocast_available, so it is not asked there)."""
    from fastvit.ops._checks import autocast_dtype

    torch._dynamo.reset()

    def dtype_code(x):
        dtype = autocast_dtype(x.device)
        return x * (2 if dtype is None else 3)

    compiled = torch.compile(dtype_code, backend="eager", fullgraph=True)
    assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compiled(torch.ones(2)).tolist() == [3.0, 3.0]
    torch._dynamo.reset()


def _strided_like(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values with a non-unit stride in the last dim (its last two dims stored transposed)."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@kernel_mark
def test_custom_ops_take_the_strided_last_dim_a_traced_graph_may_hand_them():
    """An exported or compiled graph decides its layouts while tracing, from fake tensors, and a
    real tensor may come another way: PyTorch's CPU convolution of a batch of one returns NCHW
    where its fake said channels_last, so Florence-2's token view, which the public op saw with a
    unit channel stride, reached the layernorm_mlp kernels strided (the exported tower was off by
    3.7). Each custom op's real implementation takes what it was handed; its output matches the
    unit-stride call's."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE)

    ops = torch.ops.fastvit
    x, d, hd = rand(2, 6, 16), 16, 32
    weights = (rand(d), rand(d), rand(hd, d), rand(hd), rand(d, hd), rand(d))
    scale = rand(d)
    tail = (None, None, None, None, None, 1e-6, "gelu", "layernorm", False, True, torch.float32, True, False, 1e-6)
    want = ops.layernorm_mlp_fwd(x, *weights, scale, *tail)
    strided_scale = torch.stack((scale, scale), -1)[:, 0]  # (d,) at stride 2
    got = ops.layernorm_mlp_fwd(_strided_like(x), *weights, strided_scale, *tail)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    grad = rand(2, 6, 16)
    bwd_args = (*weights, scale, *tail[:5], *want[1:], "gelu", "layernorm", False, True, [True] * 13, False)
    torch.testing.assert_close(ops.layernorm_mlp_bwd(grad, _strided_like(x), *bwd_args),
                               ops.layernorm_mlp_bwd(grad, x, *bwd_args), rtol=0, atol=0)  # fmt: skip

    q, k, v = rand(1, 2, 5, 16), rand(1, 2, 7, 16), rand(1, 2, 7, 16)
    out, lse = ops.flash_attention_fwd(q, k, v, 0.25, False)
    strided = [_strided_like(t) for t in (q, k, v)]
    torch.testing.assert_close(ops.flash_attention_fwd(*strided, 0.25, False), (out, lse), rtol=0, atol=0)
    grad = rand(1, 2, 5, 16)
    got = ops.flash_attention_bwd(grad, *strided, out, lse, 0.25, False)[:3]
    torch.testing.assert_close(got, ops.flash_attention_bwd(grad, q, k, v, out, lse, 0.25, False)[:3], rtol=0, atol=0)

    tokens = rand(9, 2, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    varlen = (cu, cu, 5, 5, 0.25, False)
    want = ops.flash_attention_varlen_fwd(tokens, tokens, tokens, *varlen)
    strided = _strided_like(tokens)
    torch.testing.assert_close(ops.flash_attention_varlen_fwd(strided, strided, strided, *varlen), want, rtol=0, atol=0)

    images, weight, pos = rand(2, 3, 8, 8), rand(16, 3, 4, 4), rand(1, 4, 16)
    want = ops.patch_embed_fwd(images, weight, None, pos, None, False)
    torch.testing.assert_close(ops.patch_embed_fwd(images, weight, None, _strided_like(pos), None, False), want,
                               rtol=0, atol=0)  # fmt: skip
