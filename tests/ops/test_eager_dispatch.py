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
