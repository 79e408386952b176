"""``fastvit.ops._autograd.call``: plain eager calls skip the custom-op dispatch (its host cost was
~10x the kernel's at ViT sizes on an H200) and run the same implementation and formulas through an
``autograd.Function``; compile, fake/meta tensors and tensor subclasses keep the registered op."""

from __future__ import annotations

import pytest
import torch

import fastvit
import fastvit.ops.flash_attention as attention_module
from fastvit.ops import _autograd
from tests.tolerance import assert_close_to_reference

pytestmark = pytest.mark.interpreter


@pytest.fixture
def custom_op_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls that go through the registered forward custom op."""
    real = attention_module._flash_attention_fwd
    calls: list[int] = []

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(attention_module, "_flash_attention_fwd", spy)
    return calls


def _qkv(requires_grad: bool = True) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 2, 7, 16, generator=g).requires_grad_(requires_grad) for _ in range(3))


def test_plain_eager_calls_skip_the_custom_op_and_keep_the_formulas(custom_op_calls):
    q, k, v = _qkv()
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v, causal=True)
    out.square().sum().backward()
    assert custom_op_calls == []  # the eager twin ran the implementation directly
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=True)
    want.square().sum().backward()
    lowp = torch.nn.functional.scaled_dot_product_attention(*(t.detach() for t in (q, k, v)), is_causal=True)
    assert_close_to_reference(out.detach(), want.detach(), lowp, name="out")
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def test_a_modules_parameters_take_the_eager_form_too(custom_op_calls, monkeypatch):
    # a module's weights are nn.Parameters, which the exact-type check sent through the custom-op
    # dispatch (~90 us against ~24 us per call on this CPU): every module call and patched model paid it
    q, k, v = (torch.nn.Parameter(t.detach()) for t in _qkv())
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v)
    out.sum().backward()
    assert custom_op_calls == [] and q.grad is not None
    mlp = fastvit.nn.FusedLayerNormMLP(16, 24)
    calls = []
    real = _autograd._plain_eager
    monkeypatch.setattr(_autograd, "_plain_eager", lambda args: calls.append(real(args)) or calls[-1])
    with fastvit.backend("triton"):
        mlp(torch.randn(2, 3, 16)).sum().backward()
    assert calls and all(calls)  # the forward op and its backward ops, on the module's Parameters
    assert mlp.fc1.weight.grad is not None


def test_fake_and_meta_tensors_and_compile_use_the_registered_op(custom_op_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fastvit.backend("triton"):
        with FakeTensorMode():
            q, k, v = (torch.empty(2, 2, 7, 16) for _ in range(3))
            assert fastvit.flash_attention(q, k, v).shape == (2, 2, 7, 16)
        assert len(custom_op_calls) == 1
        q, k, v = (torch.empty(2, 2, 7, 16, device="meta") for _ in range(3))
        assert fastvit.flash_attention(q, k, v).is_meta
        assert len(custom_op_calls) == 2
        compiled = torch.compile(lambda a, b, c: fastvit.flash_attention(a, b, c), backend="eager", fullgraph=True)
        compiled(*_qkv(requires_grad=False))
    assert len(custom_op_calls) == 3  # traced once by compile


def test_every_fused_op_has_an_eager_form():
    import fastvit.ops.flash_attention_varlen as varlen
    import fastvit.ops.layernorm_mlp as mlp
    import fastvit.ops.patch_embed as patch

    twins = [attention_module._flash_attention_fwd_function, attention_module._flash_attention_bwd_function,
             varlen._varlen_fwd_function, varlen._varlen_bwd_function, mlp._layernorm_mlp_fwd_function,
             mlp._layernorm_mlp_bwd_function, patch._patch_embed_fwd_function, patch._bwd_input_function]  # fmt: skip
    assert all(issubclass(t.eager, torch.autograd.Function) for t in twins)
    assert _autograd._plain_eager((torch.ones(1), 2.0, None))
    assert not _autograd._plain_eager((torch.ones(1, device="meta"),))
    assert not _autograd._plain_eager((torch.ones(2).to_sparse(),))


class _ZeroTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor of zeros created while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "zero" in str(func) and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def test_outputs_that_never_get_a_gradient_are_not_filled_with_zeros():
    """attention's lse and layernorm_mlp's saved preact / mean / rstd get no gradient: autograd
    used to materialise a zeros tensor for each per backward ((rows, hidden) for preact: an
    allocation and a fill launch on a GPU)."""
    q, k, v = _qkv()
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v)
    with _ZeroTensors() as zeros:
        torch.autograd.grad(out.sum(), (q, k, v))
    assert zeros.shapes == []
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, generator=g, requires_grad=True)
    shapes = ((16,), (16,), (32, 16), (32,), (16, 32), (16,))
    params = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    with fastvit.backend("triton"):
        y = fastvit.layernorm_mlp(x, *params)
    with _ZeroTensors() as zeros:
        torch.autograd.grad(y.sum(), [x, *params])
    assert zeros.shapes == []


def test_grad_mode_off_runs_the_implementation_without_an_autograd_function(monkeypatch):
    """Inference and the backward ops of a first-order backward: nothing is recorded, so no
    autograd.Function is applied (its apply() was host time per call); create_graph=True still
    goes through it, so a double backward still raises the named error."""
    twin = attention_module._flash_attention_fwd_function.eager
    applied, real_apply = [], twin.apply
    monkeypatch.setattr(twin, "apply", lambda *args: applied.append(1) or real_apply(*args))
    q, k, v = _qkv()
    with fastvit.backend("triton"), torch.no_grad():
        out = fastvit.flash_attention(q, k, v)
    assert applied == [] and out.grad_fn is None
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v)
    assert applied == [1] and out.grad_fn is not None
    grads = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grads[0].sum().backward()
