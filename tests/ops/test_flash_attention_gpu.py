"""fastvit.flash_attention compiled on a real GPU (skipped without CUDA): bf16, long sequences,
more batch*heads than a grid's y/z axis holds, agreement with SDPA, torch.compile with Inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import reference
from tests.tolerance import assert_close_to_reference

pytestmark = pytest.mark.gpu


def _qkv(batch, heads, n, head_dim, dtype, seed=0, requires_grad=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, generator=gen).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_against_float64_reference(head_dim, causal):
    q, k, v = _qkv(2, 3, 197, head_dim, torch.bfloat16, seed=head_dim)
    out, lse = fastvit.flash_attention(q, k, v, causal=causal, return_lse=True)
    grad_out = torch.randn_like(out)
    grads = _grads(out, (q, k, v), grad_out)
    results = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    for dtype_name, dtype in (("oracle", torch.float64), ("lowp", torch.bfloat16)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        ref_out, ref_lse = reference.attention(*leaves, causal=causal)
        ref_out.backward(grad_out.to(dtype))
        refs = {"out": ref_out, "lse": ref_lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
        if dtype_name == "oracle":
            oracle = refs
        else:
            lowp = refs
    for name, actual in results.items():
        assert_close_to_reference(actual, oracle[name], lowp[name], name=name, dtype=torch.bfloat16)


def test_long_sequence_bf16_matches_sdpa():
    """N = 16385 (a 2048 x 2048 image at patch 16, plus cls): forward and backward."""
    q, k, v = _qkv(1, 2, 16385, 64, torch.bfloat16, seed=1)
    out = fastvit.flash_attention(q, k, v)
    grad_out = torch.randn_like(out)
    grads = _grads(out, (q, k, v), grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q32, k32, v32)
    expected_grads = _grads(expected, (q32, k32, v32), grad_out.float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_more_batch_heads_than_grid_y_limit():
    """B*H = 66000 > 65535: batch*heads is folded into grid axis 0."""
    q, k, v = _qkv(4125, 16, 17, 32, torch.float16, seed=2, requires_grad=True)
    out = fastvit.flash_attention(q, k, v)
    with fastvit.backend("torch"):
        expected = fastvit.flash_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=2e-3, atol=2e-3)
    grads = _grads(out.float().sum(), (q, k, v), None)
    expected_grads = _grads(expected.float().sum(), (q, k, v), None)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_packed_qkv_bf16_matches_sdpa():
    x = torch.randn(8, 577, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(
        fastvit.flash_attention(q, k, v).float(), F.scaled_dot_product_attention(q, k, v).float(), rtol=2e-2, atol=2e-2
    )


def test_torch_compile_inductor():
    q, k, v = _qkv(2, 4, 197, 64, torch.bfloat16, seed=3)

    def attention_block(q, k, v):
        out = fastvit.flash_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    compiled = torch.compile(attention_block, fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, attention_block(q, k, v))
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_int64_offsets_large_tensor():
    """B*H*N*D > 2^31 elements in one tensor (the last heads sit past 2^31 elements)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GB of free GPU memory")
    q = torch.randn(2, 256, 65537, 80, device="cuda", dtype=torch.bfloat16)  # 2.7e9 elements, 5.4 GB
    assert q.numel() > 2**31
    out = fastvit.flash_attention(q[:, :, :1024], q, q)  # queries from the start, keys over all
    with fastvit.backend("torch"):
        expected = fastvit.flash_attention(q[:, -1:, :1024], q[:, -1:], q[:, -1:])
    torch.testing.assert_close(out[:, -1:].float(), expected.float(), rtol=2e-2, atol=2e-2)
