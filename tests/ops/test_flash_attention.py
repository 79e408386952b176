"""fastvit.flash_attention: the Triton kernels (interpreter on CPU, compiled on a GPU) against the
float64 reference, the torch route, dispatch, autocast, validation and torch.compile."""

from __future__ import annotations

import itertools
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import reference
from tests.compile_check import assert_compiled_matches_eager
from tests.launches import record_launches
from tests.tolerance import assert_close_to_reference
from tests.torch_compat import OPCHECK_UTILS

ON_GPU = torch.cuda.is_available()


def _inputs(batch, heads, n_q, n_k, head_dim, dtype, device, *, packed=False, seed=0):
    """Fresh random q, k, v (leaf tensors). ``packed``: views into one (B, N, 3, H, D) qkv
    projection output, as timm's Attention makes them (non-contiguous, shared storage)."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        assert n_q == n_k
        qkv = torch.randn(batch, n_q, 3, heads, head_dim, generator=gen).to(device, dtype)
        qkv.requires_grad_(True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return (q, k, v), qkv
    tensors = [
        torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype).requires_grad_(True)
        for n in (n_q, n_k, n_k)
    ]
    return tuple(tensors), None


def _reference(q, k, v, grad_out, dtype, *, scale=None, causal=False):
    """(out, lse, dq, dk, dv) of the reference on copies of q, k, v cast to ``dtype`` (on CPU)."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.attention(*leaves, scale=scale, causal=causal)
    out.backward(grad_out.detach().cpu().to(dtype))
    return (out, lse, *(t.grad for t in leaves))


def _check_against_reference(q, k, v, out, lse, grad_out, grads, *, scale=None, causal=False):
    oracle = _reference(q, k, v, grad_out, torch.float64, scale=scale, causal=causal)
    lowp = _reference(q, k, v, grad_out, q.dtype, scale=scale, causal=causal)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, actual, exp64, explow in zip(names, (out, lse, *grads), oracle, lowp, strict=True):
        # lse is fp32 whatever the input dtype: its own budget is the fp32 slack
        assert_close_to_reference(actual.detach().cpu(), exp64, explow, name=name, dtype=q.dtype)


def _run_kernel(q, k, v, grad_out=None, **kwargs):
    with fastvit.backend("triton"):
        out, lse = fastvit.flash_attention(q, k, v, return_lse=True, **kwargs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, lse, grad_out, grads


kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu


# N, M: 1 (a single row/key), 7 (below every block), 64 (exactly whole blocks), 197 (ViT-B/16 at
# 224: cls + 14*14, prime), 257 (cls + 16*16, one past a power of two); M != N exercises the key
# boundary separately from the query boundary. The forward ends with one short masked step where the
# keys past the last whole block fit in it (the interpreter's 16-key blocks: an 8-key tail, 197 -> 5
# keys), else a whole masked block: 29 and 45 leave 13 keys past a block.
LENGTHS = [(1, 1), (7, 7), (64, 64), (197, 197), (257, 257), (7, 33), (70, 19), (40, 29), (29, 45)]


@kernel_test
@pytest.mark.parametrize("n_q,n_k", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_lengths_fp32(kernel_device, n_q, n_k, causal):
    (q, k, v), _ = _inputs(1, 2, n_q, n_k, 64, torch.float32, kernel_device, seed=n_q * 1000 + n_k)
    out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


# Every supported head dim; 80 (ViT-H/14) and 96 are not powers of two and are masked; 24 pads
# to 32 in registers.
@kernel_test
@pytest.mark.parametrize("head_dim", [16, 24, 32, 64, 80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_head_dims(kernel_device, head_dim, dtype):
    (q, k, v), _ = _inputs(2, 2, 37, 53, head_dim, dtype, kernel_device, seed=head_dim)
    out, lse, grad_out, grads = _run_kernel(q, k, v)
    _check_against_reference(q, k, v, out, lse, grad_out, grads)


# Head dims above 128, padded to 256 in registers: 160 is not a power of two (masked), 256 the
# widest the kernels take; short odd lengths (19 queries, 23 keys) keep the interpreter fast.
@kernel_test
@pytest.mark.parametrize("head_dim", [160, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_large_head_dims(kernel_device, head_dim, causal, dtype):
    (q, k, v), _ = _inputs(1, 2, 19, 23, head_dim, dtype, kernel_device, seed=head_dim)
    out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


@kernel_test
@pytest.mark.parametrize("n_q,n_k", [(197, 197), (50, 77)])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_fp16(kernel_device, n_q, n_k, causal):
    (q, k, v), _ = _inputs(1, 3, n_q, n_k, 64, torch.float16, kernel_device, seed=7)
    out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_packed_qkv_views_are_not_copied(kernel_device, dtype, monkeypatch):
    """timm's ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` views reach the kernel as they are."""
    (q, k, v), _ = _inputs(2, 3, 41, 41, 32, dtype, kernel_device, packed=True, seed=3)
    assert not q.is_contiguous() and q.data_ptr() != k.data_ptr()
    from fastvit.kernels import flash_attention as kernels

    seen = {}
    original = kernels.flash_attention_forward

    def spy(q_, k_, v_, scale, causal, **masks):
        seen.update(q=q_.data_ptr(), k=k_.data_ptr(), v=v_.data_ptr(), strides=q_.stride())
        return original(q_, k_, v_, scale, causal, **masks)

    monkeypatch.setattr(kernels, "flash_attention_forward", spy)
    out, lse, grad_out, grads = _run_kernel(q, k, v)
    assert seen == {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "strides": q.stride()}
    _check_against_reference(q, k, v, out, lse, grad_out, grads)


@kernel_test
def test_kernel_expanded_grad_output(kernel_device):
    """``out.sum().backward()`` hands the op a grad_output with all strides 0."""
    (q, k, v), _ = _inputs(2, 2, 45, 45, 64, torch.float32, kernel_device, seed=11)
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v)
        out.sum().backward()
    grad_out = torch.ones_like(out)
    oracle = _reference(q, k, v, grad_out, torch.float64)
    lowp = _reference(q, k, v, grad_out, torch.float32)
    for name, t, i in (("dq", q, 2), ("dk", k, 3), ("dv", v, 4)):
        assert_close_to_reference(t.grad.cpu(), oracle[i], lowp[i], name=name)


@kernel_test
@pytest.mark.parametrize("n_q,n_k", [(37, 20), (20, 37)])
def test_kernel_causal_odd_head_dim_with_broadcast_grad(kernel_device, n_q, n_k):
    """Causal with N != M both ways, a masked head dim, and a grad_output broadcast along D
    ((B, H, N, 1).expand: stride 0 in the last dim, non-zero row stride)."""
    (q, k, v), _ = _inputs(1, 2, n_q, n_k, 40, torch.float32, kernel_device, seed=n_q)
    grad_out = torch.randn(1, 2, n_q, 1, device=kernel_device).expand(1, 2, n_q, 40)
    out, lse, grad_out, grads = _run_kernel(q, k, v, grad_out=grad_out, causal=True)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=True)


@kernel_test
def test_kernel_production_block_shapes(kernel_device, monkeypatch):
    """The block shapes the GPU launchers pick (not only the small interpreter tiles) give the
    same answers: every distinct (forward, dK/dV, dQ) triple, causal with N != M."""
    if ON_GPU:
        pytest.skip("on a GPU the production shapes are what every test runs")
    from fastvit.kernels import flash_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETER", False)
    # (the causal tiles may differ: both run here, causal)
    triples = {(kernels.fwd_config(a, d, p, tma=tma, causal=c), kernels.bwd_config(a, d, p, c),
                kernels.bwd_dq_config(a, d, p))
               for a, d, p in _config_keys() for tma in (False, True) for c in (False, True)}  # fmt: skip
    monkeypatch.setattr(kernels, "INTERPRETER", True)
    for fwd, bwd, dq in sorted(triples, key=str):
        monkeypatch.setattr(kernels, "_INTERPRETER_FWD", fwd)
        monkeypatch.setattr(kernels, "_INTERPRETER_BWD", bwd)
        monkeypatch.setattr(kernels, "_INTERPRETER_DQ", dq)
        monkeypatch.setattr(kernels, "INTERPRETER_TMA", fwd.tma)
        # fp16 (the TMA tiles are 16-bit only); 64-row query blocks under 128-key steps both ways
        for n_q, n_k in ((150, 70), (70, 150)):
            (q, k, v), _ = _inputs(1, 1, n_q, n_k, 40, torch.float16, kernel_device, seed=n_q)
            out, lse, grad_out, grads = _run_kernel(q, k, v, causal=True)
            _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=True)


@kernel_test
@pytest.mark.parametrize("n_q,n_k", LENGTHS)
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_tma_forward(kernel_device, n_q, n_k, causal, tma_forward):
    """Hopper's forward reads Q, K, V and writes out through tensor descriptors (zero-filled past the
    rows and past D): the interpreter runs that path when asked, with packed-qkv-like strides and a
    masked head dim (40, padded to 64)."""
    (q, k, v), _ = _inputs(1, 2, n_q, n_k, 40, torch.float16, kernel_device, seed=n_q * 7 + n_k)
    out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
    assert tma_forward
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


@kernel_test
@pytest.mark.parametrize("n_q,n_k", [(7, 33), (70, 150), (197, 197)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_lazy_rescale(kernel_device, n_q, n_k, causal, dtype, lazy_rescale):
    """The forward's lazy rescaling (the accumulator rescaled only when a row max grows by 2^8) gives
    the same out, lse and gradients as the reference, with packed-qkv-like strides and a masked head
    dim; the TMA path below takes it too."""
    (q, k, v), _ = _inputs(1, 2, n_q, n_k, 40, dtype, kernel_device, seed=n_q + n_k)
    out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
    assert lazy_rescale and all(lazy_rescale)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


@kernel_test
@pytest.mark.parametrize("ramp", ["jump", "climb"])
def test_kernel_lazy_rescale_rows_whose_max_grows(kernel_device, ramp, lazy_rescale):
    """Scores that grow along the keys: ``jump`` puts the max of every row 23 log2 units above the rest
    in one late key block (a rescale after the first step), ``climb`` raises it ~4 log2 units a block
    (the exponents taken against a max up to 2^8 below the row's, and a rescale every other block);
    rows 0-3 of the second head see no growth at all. fp16: p up to 256 must stay exact enough."""
    gen = torch.Generator().manual_seed(5)
    n_q, n_k, d = 37, 150, 16
    q = torch.randn(1, 2, n_q, d, generator=gen) * 0.3
    k = torch.randn(1, 2, n_k, d, generator=gen) * 0.3
    v = torch.randn(1, 2, n_k, d, generator=gen)
    q[..., 0] = 4.0
    if ramp == "jump":
        k[..., 100:116, 0] = 4.0  # scores 16 (23 log2 units) above the rest, at key block 6
    else:
        k[..., 0] = torch.linspace(0.0, 8.0, n_k)  # up to 32 nats: ~4.6 log2 units a 16-key block
    q[:, 1, :4, 0] = 0.0  # ... and rows that never grow
    q, k, v = (t.to(kernel_device, torch.float16).requires_grad_(True) for t in (q, k, v))
    out, lse, grad_out, grads = _run_kernel(q, k, v, scale=1.0)
    assert lazy_rescale and all(lazy_rescale)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, scale=1.0)


@kernel_test
def test_kernel_lazy_rescale_keeps_nan_rows_to_themselves(kernel_device, lazy_rescale):
    """A NaN in one query row gives NaN in that row only, also when the lazy test of the first step
    compares that row's NaN max (false) against the others' -inf."""
    (q, k, v), _ = _inputs(1, 1, 40, 50, 16, torch.float16, kernel_device, seed=3)
    with torch.no_grad():
        q[0, 0, 5, 2] = float("nan")
        with fastvit.backend("triton"):
            out = fastvit.flash_attention(q, k, v)
    assert lazy_rescale
    assert torch.isnan(out[0, 0, 5]).all()
    rows = torch.arange(40) != 5
    expected = reference.attention(q[:, :, rows].double(), k.double(), v.double())[0]
    assert not torch.isnan(out[0, 0, rows]).any()
    torch.testing.assert_close(out[:, :, rows].double(), expected, atol=2e-3, rtol=0)


def test_tma_takes_only_what_a_descriptor_can_address():
    from fastvit.kernels.flash_attention import _tma_strides, tma_strides

    qkv = torch.zeros(2, 197, 3, 12, 64, dtype=torch.bfloat16)
    q = qkv[:, :, 0].transpose(1, 2)  # timm's packed view: (B, H, N, D) with strides (N*3*H*D, D, 3*H*D, 1)
    assert _tma_strides(q) == list(q.stride())
    single = torch.zeros(1, 12, 197, 64, dtype=torch.bfloat16)
    assert _tma_strides(single)[1:] == [197 * 64, 64, 1]  # the size-1 batch dim gets a dense stride
    assert tma_strides(torch.zeros(2, 12, 197, 20, dtype=torch.bfloat16)) is None  # 40-byte rows
    assert tma_strides(single.expand(3, 12, 197, 64)) is None  # a broadcast batch
    assert tma_strides(torch.zeros(2, 12, 197, 65, dtype=torch.bfloat16)[..., 1:]) is None  # base off 16 bytes
    assert tma_strides(torch.zeros(2, 12, 64, 197, dtype=torch.bfloat16).transpose(-1, -2)) is None  # D not unit
    assert tma_strides(torch.zeros(2, 12, 0, 64, dtype=torch.bfloat16)) is None  # no rows: no descriptor


def test_the_descriptor_path_is_taken_only_with_fastvit_tma_1(monkeypatch):
    """Off by default (slower than the pointer tiles on an H200); FASTVIT_TMA=1 asks for it."""
    from fastvit.kernels import flash_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETER", False)
    monkeypatch.delenv("FASTVIT_TMA", raising=False)
    assert not kernels.tma_capable(90, torch.bfloat16, 64)
    monkeypatch.setenv("FASTVIT_TMA", "1")
    assert kernels.tma_capable(90, torch.bfloat16, 64) and not kernels.tma_capable(80, torch.bfloat16, 64)
    assert not kernels.tma_capable(90, torch.float32, 64) and not kernels.tma_capable(90, torch.bfloat16, 256)
    monkeypatch.setenv("FASTVIT_TMA", "0")
    assert not kernels.tma_capable(90, torch.bfloat16, 64)


def test_unchecked_descriptors_equal_the_checked_ones():
    """The launcher builds descriptors without TensorDescriptor's checks (its own come first): every
    field must equal what the checked constructor gives, on this Triton version."""
    import dataclasses

    from triton.tools.tensor_descriptor import TensorDescriptor

    from fastvit.kernels.flash_attention import _descriptor, _tma_strides

    q = torch.zeros(2, 197, 3, 12, 64, dtype=torch.bfloat16)[:, :, 0].transpose(1, 2)
    strides = _tma_strides(q)
    fast, checked = _descriptor(q, strides, [1, 1, 64, 64]), TensorDescriptor(q, list(q.shape), strides, [1, 1, 64, 64])
    for field in dataclasses.fields(TensorDescriptor):
        if field.name != "base":
            assert getattr(fast, field.name) == getattr(checked, field.name), field.name
    assert fast.base is q and checked.base is q


def _config_keys():
    return [
        (arch, dtype, pad)
        for arch in (80, 86, 89, 90, 100, 120)
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
        for pad in (16, 32, 64, 128, 256)
    ]


def test_block_size_rules_hold_for_every_config(monkeypatch):
    """The backward's causal diagonal split needs block_n % block_m == 0 (dK/dV keeps block_n keys
    and steps block_m queries; dQ the reverse); a config breaking it would give silently wrong
    causal results. The forward takes any pair (its whole-block range rounds down to BLOCK_N),
    and its key tail divides its key block."""
    from fastvit.kernels import flash_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETER", False)
    for arch, dtype, pad in _config_keys():
        for bwd in (kernels.bwd_config(arch, dtype, pad), kernels.bwd_config(arch, dtype, pad, causal=True),
                    kernels.bwd_dq_config(arch, dtype, pad)):
            assert bwd.block_n % bwd.block_m == 0, (arch, dtype, pad, bwd)
            assert min(bwd.block_m, bwd.block_n) >= 16  # tl.dot's minimum
        for fwd in (kernels.fwd_config(arch, dtype, pad), kernels.fwd_config(arch, dtype, pad, tma=True),
                    kernels.fwd_config(arch, dtype, pad, causal=True)):
            assert fwd.key_tail == 0 or (fwd.block_n % fwd.key_tail == 0 and fwd.key_tail >= 16), fwd
            assert min(fwd.block_m, fwd.block_n) >= 16
    assert kernels._INTERPRETER_BWD.block_n % kernels._INTERPRETER_BWD.block_m == 0


@kernel_test
def test_kernel_empty_query_sequence(kernel_device):
    q = torch.randn(2, 3, 0, 16, device=kernel_device, requires_grad=True)
    k = torch.randn(2, 3, 5, 16, device=kernel_device, requires_grad=True)
    v = torch.randn(2, 3, 5, 16, device=kernel_device, requires_grad=True)
    with fastvit.backend("triton"):
        out, lse = fastvit.flash_attention(q, k, v, return_lse=True)
        out.sum().backward()
    assert out.shape == (2, 3, 0, 16) and lse.shape == (2, 3, 0)
    assert q.grad.shape == q.shape
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


@kernel_test
@pytest.mark.parametrize("n_q,n_k,mask", [(33, 20, False), (33, 20, True), (13, 11, False)],
                         ids=["passes", "passes-float-mask", "short-backward"])
def test_kernel_fp32_backward_at_large_logits(kernel_device, n_q, n_k, mask):
    """fp32 gradients at logits of ~50-80 (|lse| up to ~76) stay within the tolerance rule. The
    scores are exact (integer q and k, scale 1/2), so the forward and the backward see the same ones
    and what is left is how each row's softmax offset reaches the backward: its kernels take an fp32
    lse, off by ~|lse| 2^-24, an error of every P of the row that took dq to 1.3-2.1x the budget and
    dv (masked) to 1.3x; the forward's fp64 lse for fp32 inputs lets the launcher fold that
    error into dO's rows (``backward_lse``)."""
    from fastvit.kernels.flash_attention import lse_dtype

    gen = torch.Generator().manual_seed(5)
    head_dim = 32
    q, k = (torch.randint(-4, 5, (1, 2, n, head_dim), generator=gen).float() for n in (n_q, n_k))
    v = torch.randn(1, 2, n_k, head_dim, generator=gen)
    q, k, v = (t.to(kernel_device).requires_grad_(True) for t in (q, k, v))
    bias = torch.randint(-8, 9, (n_q, n_k), generator=gen).float().to(kernel_device) if mask else None
    grad_out = torch.randn(1, 2, n_q, head_dim, generator=gen).to(kernel_device)
    with fastvit.backend("triton"):
        out, lse = fastvit.flash_attention(q, k, v, scale=0.5, attn_mask=bias, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert lse.dtype == torch.float32 and lse_dtype(q.dtype) == torch.float64
    assert lse.abs().max() > 50

    def run(dtype):
        leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (q, k, v)]
        mask_ = None if bias is None else bias.cpu().to(dtype)
        ref_out, ref_lse = reference.attention(*leaves, scale=0.5, attn_mask=mask_)
        return (ref_out, ref_lse, *torch.autograd.grad(ref_out, leaves, grad_out.cpu().to(dtype)))

    oracle, lowp = run(torch.float64), run(torch.float32)
    for name, actual, exp64, exp32 in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), oracle, lowp,
                                          strict=True):
        assert_close_to_reference(actual.detach().cpu(), exp64, exp32, name=name, dtype=torch.float32)


def test_backward_lse_folds_the_fp32_rounding_into_grad_out():
    """``backward_lse``: a float32 lse (16-bit inputs) and its dO pass through untouched; a float64
    one comes back as its float32 rounding with dO's rows multiplied by exp2(hi - lse log2 e),
    hi = fl32(fl32(lse) log2 e) as the kernels form it, and by exactly 1 on rows whose lse is not
    finite (fully masked -inf, NaN); packed (H, T) lse scales (T, H, D) rows."""
    import struct

    from fastvit.kernels.flash_attention import backward_lse

    grad = torch.randn(1, 2, 4, 8)
    lse32 = torch.randn(1, 2, 4)
    same_lse, same_grad = backward_lse(lse32, grad)
    assert same_lse is lse32 and same_grad is grad

    lse = torch.tensor([[[70.123456789, float("-inf"), float("nan"), -3.25], [1e3 / 3, 0.0, 12.0, -99.5]]],
                       dtype=torch.float64)  # fmt: skip
    lse_out, grad_out = backward_lse(lse, grad)
    assert lse_out.dtype == torch.float32
    torch.testing.assert_close(lse_out, lse.float(), rtol=0, atol=0, equal_nan=True)
    log2e = struct.unpack("f", struct.pack("f", math.log2(math.e)))[0]
    hi = (lse.float() * log2e).double()
    c = torch.exp2(hi - lse * math.log2(math.e))
    c = torch.where(torch.isfinite(lse), c, torch.ones_like(c))
    assert not torch.equal(c, torch.ones_like(c))  # the rounding is there to fold
    torch.testing.assert_close(grad_out, grad * c.float()[..., None], rtol=0, atol=0)

    packed = torch.randn(4, 2, 8)  # (T, H, D) with lse (H, T)
    _, packed_out = backward_lse(lse[0], packed, rows_last=False)
    torch.testing.assert_close(packed_out, packed * c[0].t().float()[..., None], rtol=0, atol=0)


@kernel_test
def test_kernel_lse_has_no_gradient_and_nonpositive_scale_falls_back(kernel_device):
    import sys

    (q, k, v), _ = _inputs(1, 2, 9, 9, 16, torch.float32, kernel_device, seed=43)
    with fastvit.backend("triton"):
        out, lse = fastvit.flash_attention(q, k, v, return_lse=True)
        assert out.requires_grad and not lse.requires_grad
        sys.modules["fastvit.backend"]._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            negative = fastvit.flash_attention(q, k, v, scale=-0.5)
    assert [str(w.message) for w in caught if "non-positive scale" in str(w.message)]
    torch.testing.assert_close(negative, reference.attention(q, k, v, scale=-0.5)[0], rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_grad_output_with_odd_strides(kernel_device):
    """A grad_output that is a transposed view (stride 1 not in the last dim)."""
    (q, k, v), _ = _inputs(1, 2, 33, 20, 32, torch.float32, kernel_device, seed=5)
    grad_out = torch.randn(1, 2, 32, 33, device=kernel_device).transpose(-1, -2)
    out, lse, grad_out, grads = _run_kernel(q, k, v, grad_out=grad_out)
    _check_against_reference(q, k, v, out, lse, grad_out, grads)


@kernel_test
def test_kernel_custom_scale_and_output_layout(kernel_device):
    (q, k, v), _ = _inputs(2, 3, 29, 29, 16, torch.float32, kernel_device, seed=13)
    out, lse, grad_out, grads = _run_kernel(q, k, v, scale=0.3)
    _check_against_reference(q, k, v, out, lse, grad_out, grads, scale=0.3)
    # (B, N, H, D) in memory: merging heads after the usual transpose is free
    assert out.transpose(1, 2).is_contiguous()
    # ... allocated in that layout, not a view made inside the op (autograd refuses in-place edits of
    # those with an error about views): an edit before a backward meets SDPA's saved-output check
    assert out._base is None
    with fastvit.backend("triton"), pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(fastvit.flash_attention(q, k, v).mul_(2.0).sum(), q)


@kernel_test
def test_kernel_matches_torch_route(kernel_device):
    (q, k, v), _ = _inputs(2, 2, 40, 40, 64, torch.float32, kernel_device, seed=17)
    with fastvit.backend("triton"):
        fast = fastvit.flash_attention(q, k, v, causal=True)
    with fastvit.backend("torch"):
        slow = fastvit.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_backward_is_two_launches_dq_first_writing_delta(kernel_device, monkeypatch):
    """The backward launches dQ, which writes delta = rowsum(dO * O), then dK/dV, which reads it (no
    pre-pass of its own; outputs start as NaN in tests, so an unwritten delta fails the check);
    with a float bias that needs grad, dBias third; where the dBias kernel's tiles hold every key, it
    writes delta and dQ itself, first, and no dQ pass runs, and where they hold every query too, dK
    and dV as well: one launch (causal too). Dense, masked and packed (varlen) launchers."""
    calls = record_launches(monkeypatch)
    (q, k, v), _ = _inputs(2, 2, 45, 29, 32, torch.float32, kernel_device, seed=41)
    out, lse, grad_out, grads = _run_kernel(q, k, v)
    assert calls == ["fwd", "dq", "dkdv"]
    _check_against_reference(q, k, v, out, lse, grad_out, grads)

    # a float bias needing grad: 29 keys pass the fp32 (and the interpreter's) 16 x 16 dBias tiles, so dBias
    # runs third; 13 keys fit one column tile (the walk writes dQ: no dQ pass); 11 queries fit one row tile
    # too, where the interpreter (not fp32 on a GPU) takes dK and dV in that walk as well
    from fastvit.kernels import flash_attention as kernels

    whole = kernels.dbias_takes_dkdv(0, torch.float32, 32)
    for n_q, n_k, causal in [(45, 29, False), *itertools.product((21, 11), (13,), (False, True))]:
        calls.clear()
        (q, k, v), _ = _inputs(3, 2, n_q, n_k, 32, torch.float32, kernel_device, seed=43)
        bias = torch.randn(1, 2, n_q, n_k, device=kernel_device, requires_grad=True)
        with fastvit.backend("triton"):
            out = fastvit.flash_attention(q, k, v, attn_mask=bias, causal=causal)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, bias), grad_out)
        if n_k > 16:
            assert calls == ["fwd", "dq", "dkdv", "dbias"]
        else:
            assert calls == (["fwd", "dbias"] if n_q <= 16 and whole else ["fwd", "dbias", "dkdv"])
        leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v, bias)]
        keep = torch.ones(n_q, n_k, dtype=torch.bool)
        keep = keep.tril() if causal else keep
        ref = F.scaled_dot_product_attention(*leaves[:3], attn_mask=leaves[3].masked_fill(~keep, float("-inf")))
        expected_grads = torch.autograd.grad(ref, leaves, grad_out.cpu().double())
        for actual, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(actual.cpu().double(), expected, rtol=1e-4, atol=1e-5)

    calls.clear()
    cu = torch.tensor([0, 7, 40, 41], dtype=torch.int32, device=kernel_device)
    qp, kp, vp = (torch.randn(41, 2, 16, device=kernel_device, requires_grad=True) for _ in range(3))
    with fastvit.backend("triton"):
        out = fastvit.flash_attention_varlen(qp, kp, vp, cu)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qp, kp, vp), grad_out)
    assert calls == ["fwd", "dq", "dkdv"]
    for start, end in ((0, 7), (7, 40), (40, 41)):
        leaves = [t[start:end].detach().cpu().transpose(0, 1)[None].double().requires_grad_(True) for t in (qp, kp, vp)]
        ref = F.scaled_dot_product_attention(*leaves)
        ref_grads = torch.autograd.grad(ref, leaves, grad_out[start:end].cpu().transpose(0, 1)[None].double())
        for actual, expected in zip(grads, ref_grads, strict=True):
            actual = actual[start:end].cpu().transpose(0, 1)[None].double()
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _short_tiles(kernels, dtype, head_dim=32) -> tuple[int, int] | None:
    arch = kernels.arch_of(torch.device("cuda" if ON_GPU else "cpu"))
    cfg = kernels.short_bwd_config(arch, dtype, kernels.head_dim_padded(head_dim))
    return None if cfg is None else (cfg.block_m, cfg.block_n)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [24, 80])
def test_kernel_short_sequences_backward_in_one_launch(kernel_device, dtype, head_dim, monkeypatch):
    """Where one tile holds every query and every key (windows up to 64 x 64 on a GPU, 16 x 16 in the
    interpreter) and nothing needs a bias gradient, the backward is one launch of the short kernel
    (delta from its own P * dP, dQ, dK, dV each written once), causal or not, N != M both ways,
    with more (batch, head) pairs than programs (each program walks several), and at D = 80 in
    head-dim halves (SPLIT_D); with ``SHORT_BACKWARD`` off, or one key more than the tile, the two
    passes run and agree."""
    from fastvit.kernels import flash_attention as kernels

    tiles = _short_tiles(kernels, dtype, head_dim)
    if tiles is None:
        pytest.skip("no short tiles for this dtype and head dim here")
    rows, cols = tiles
    calls = record_launches(monkeypatch)
    # the full tile on 7 x 9 = 63 pairs: more than the interpreter's 48 programs (12 x 4 SMs): 32
    # programs, the last with one pair, the others two; the partial tiles on 2 x 3 pairs
    for n_q, n_k, causal, batch, heads in [(rows, cols, False, 7, 9), (rows - 3, cols - 5, True, 2, 3),
                                           (2, cols, True, 2, 3), (rows, 1, False, 2, 3)]:  # fmt: skip
        calls.clear()
        (q, k, v), _ = _inputs(batch, heads, n_q, n_k, head_dim, dtype, kernel_device, seed=n_q * 100 + n_k)
        out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
        assert calls == ["fwd", "short"], (n_q, n_k)
        _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)
        monkeypatch.setattr(kernels, "SHORT_BACKWARD", False)
        calls.clear()
        passes = _run_kernel(q, k, v, grad_out=grad_out, causal=causal)
        monkeypatch.setattr(kernels, "SHORT_BACKWARD", True)
        assert calls == ["fwd", "dq", "dkdv"]
        _check_against_reference(q, k, v, *passes, causal=causal)
    calls.clear()
    (q, k, v), _ = _inputs(1, 2, rows, cols + 1, head_dim, dtype, kernel_device, seed=5)
    _run_kernel(q, k, v)
    assert calls == ["fwd", "dq", "dkdv"]


@kernel_test
@pytest.mark.parametrize("n_q,n_k,head_dim,amplitude", [(14, 9, 16, 8.0), (16, 16, 80, 5.0)])
def test_kernel_fp32_short_backward_normalises_its_rows(kernel_device, n_q, n_k, head_dim, amplitude,
                                                        monkeypatch):
    """The short backward takes delta = rowsum(P dP) from its own P, which, taken from lse, is off by
    a row-uniform factor (lse's rounding, and here the interpreter's forward dots, rounded otherwise
    than the backward's): dS's rows then do not sum to 0, and dk was 1.9-2.7x the budget at logits
    of ~10-30 (D = 80: the head-dim halves, SPLIT_D). fp32 delta is divided by rowsum(P) there
    (``_tile_delta``): dk 0.3-0.7x."""
    calls = record_launches(monkeypatch)
    gen = torch.Generator().manual_seed(21)
    q = (torch.randn(3, 2, n_q, head_dim, generator=gen) * amplitude).to(kernel_device).requires_grad_(True)
    k, v = (torch.randn(3, 2, n_k, head_dim, generator=gen).to(kernel_device).requires_grad_(True) for _ in "kv")
    out, lse, grad_out, grads = _run_kernel(q, k, v)
    assert calls == ["fwd", "short"]
    _check_against_reference(q, k, v, out, lse, grad_out, grads)


@kernel_test
def test_kernel_short_backward_takes_views_and_expanded_grads(kernel_device):
    """The short kernel takes packed-qkv views and a grad_output with stride 0 (``out.sum()``), and
    gives contiguous gradients of the views' shape."""
    from fastvit.kernels import flash_attention as kernels

    n = _short_tiles(kernels, torch.float32)[0] - 1
    (q, k, v), _ = _inputs(3, 2, n, n, 16, torch.float32, kernel_device, packed=True, seed=21)
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))  # (the views of the packed qkv)
    oracle = _reference(q, k, v, torch.ones_like(out), torch.float64)
    lowp = _reference(q, k, v, torch.ones_like(out), torch.float32)
    for name, grad, i in zip(("dq", "dk", "dv"), grads, (2, 3, 4), strict=True):
        assert grad.shape == q.shape and grad.is_contiguous()
        assert_close_to_reference(grad.cpu(), oracle[i], lowp[i], name=name)


@kernel_test
def test_kernel_short_backward_production_tiles(kernel_device, monkeypatch):
    """Every tiling ``short_bwd_config`` gives a GPU, run in the interpreter: a 7 x 7 window (49
    queries and keys) in the 64 x 64 tiles, 27 x 30 in the 32 x 32 ones, at D = 40 and, where a
    head dim above 64 takes the tiling (its halves), at D = 96; causal too."""
    if ON_GPU:
        pytest.skip("on a GPU the production tiles are what every test runs")
    from fastvit.kernels import flash_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETER", False)
    tilings = {(cfg, 96 if p > kernels.SHORT_SPLIT_D else 40) for a, d, p in _config_keys() for masked in (False, True)
               if (cfg := kernels.short_bwd_config(a, d, p, masked)) is not None}  # fmt: skip
    monkeypatch.setattr(kernels, "INTERPRETER", True)
    calls = record_launches(monkeypatch)
    for cfg, head_dim in sorted(tilings, key=str):
        monkeypatch.setattr(kernels, "_INTERPRETER_SHORT", cfg)
        n_q, n_k = (49, 49) if cfg.block_m >= 49 else (cfg.block_m - 5, cfg.block_n - 2)
        for causal in (False, True):
            calls.clear()
            (q, k, v), _ = _inputs(1, 2, n_q, n_k, head_dim, torch.float16, kernel_device, seed=n_q + causal)
            out, lse, grad_out, grads = _run_kernel(q, k, v, causal=causal)
            assert calls == ["fwd", "short"], cfg
            _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


@kernel_test
def test_kernel_deterministic(kernel_device):
    (q, k, v), _ = _inputs(1, 2, 70, 70, 32, torch.float16, kernel_device, seed=19)
    first = _run_kernel(q, k, v, grad_out=torch.ones(1, 2, 70, 32, dtype=torch.float16, device=kernel_device))
    second = _run_kernel(q, k, v, grad_out=torch.ones(1, 2, 70, 32, dtype=torch.float16, device=kernel_device))
    for a, b in zip(first[3], second[3], strict=True):
        assert torch.equal(a, b)


@kernel_test
def test_kernel_opcheck(kernel_device):
    """Schema, fake tensor, autograd registration and AOT dispatch of the custom ops."""
    (q, k, v), _ = _inputs(1, 2, 19, 23, 16, torch.float32, kernel_device, seed=23)
    with fastvit.backend("triton"):
        fwd = torch.ops.fastvit.flash_attention_fwd.default
        torch.library.opcheck(fwd, (q, k, v, 0.25, False), test_utils=OPCHECK_UTILS)
        torch.library.opcheck(fwd, (q, k, v, 0.25, True), test_utils=OPCHECK_UTILS)
        out, lse = torch.ops.fastvit.flash_attention_fwd(q, k, v, 0.25, True)
        out, lse = out.detach(), lse.detach()
        for grad_out in (torch.randn_like(out), torch.ones((), device=out.device).expand_as(out)):  # dense and stride 0
            args = (grad_out, q.detach(), k.detach(), v.detach(), out, lse, 0.25, True)
            torch.library.opcheck(torch.ops.fastvit.flash_attention_bwd.default, args, test_utils=OPCHECK_UTILS)


@kernel_test
def test_kernel_under_torch_compile(kernel_device):
    (q, k, v), _ = _inputs(1, 2, 19, 19, 32, torch.float32, kernel_device, seed=29)

    def block(q, k, v):
        return fastvit.flash_attention(q * 1.5, k, v).transpose(1, 2).flatten(2).square().sum()

    assert_compiled_matches_eager(block, (q, k, v), "triton")


@kernel_test
def test_kernel_autocast_casts_like_sdpa(kernel_device):
    """Under autocast, fp32 q and k (timm's qk_norm) beside a low-precision v are cast to the
    autocast dtype; the output has that dtype, like SDPA's."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    (q, k, v), _ = _inputs(1, 2, 24, 24, 32, torch.float32, kernel_device, seed=31)
    v_low = v.detach().to(dtype)
    with fastvit.backend("triton"), torch.autocast(kernel_device.type, dtype=dtype):
        out = fastvit.flash_attention(q, k, v_low)
        expected = F.scaled_dot_product_attention(q, k, v_low)
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------------
# Dispatch, fallbacks and the torch route (no kernels involved)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_torch_route_matches_reference_with_lse(causal):
    (q, k, v), _ = _inputs(2, 3, 31, 47, 24, torch.float32, "cpu", seed=37)
    with fastvit.backend("torch"):
        out, lse = fastvit.flash_attention(q, k, v, causal=causal, return_lse=True)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert not lse.requires_grad
    _check_against_reference(q, k, v, out, lse, grad_out, grads, causal=causal)


def test_auto_backend_on_cpu_is_the_torch_route(monkeypatch):
    from fastvit.ops import flash_attention as op

    called = []
    monkeypatch.setattr(op, "_torch_route", lambda *a: called.append(a) or a[0])
    q = torch.randn(1, 1, 4, 8)
    fastvit.flash_attention(q, q, q)
    assert len(called) == 1


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("FASTVIT_BACKEND", "torch")
    assert fastvit.current_backend() == "torch"
    with fastvit.backend("triton"):
        assert fastvit.current_backend() == "triton"
    monkeypatch.setenv("FASTVIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTVIT_BACKEND"):
        fastvit.current_backend()
    with pytest.raises(ValueError, match="backend name"):
        fastvit.backend("cudnn").__enter__()
    for unset in ("", "  "):  # blanks read as unset (they raised "got ''")
        monkeypatch.setenv("FASTVIT_BACKEND", unset)
        assert fastvit.current_backend() == "auto"
    monkeypatch.setenv("FASTVIT_BACKEND", " Torch\n")
    assert fastvit.current_backend() == "torch"


@pytest.mark.skipif(ON_GPU, reason="CPU-only: the interpreter message")
def test_triton_on_cpu_without_interpreter_says_so():
    import subprocess
    import sys

    code = (
        "import torch, fastvit\n"
        "q = torch.randn(1, 1, 4, 16)\n"
        "for name in ('triton', 'cuda'):\n"
        "    try:\n"
        "        with fastvit.backend(name):\n"
        "            fastvit.flash_attention(q, q, q)\n"
        "    except RuntimeError as e:\n"
        "        print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    triton_says, cuda_says = result.stdout.splitlines()
    assert "TRITON_INTERPRET=1" in triton_says and "before" in triton_says
    # under 'cuda' the message named backend 'triton': it says why the Triton kernels run
    assert cuda_says.startswith("fastvit backend 'cuda' runs flash_attention's Triton kernels (the extension does not")
    assert "TRITON_INTERPRET=1" in cuda_says


@pytest.mark.skipif(ON_GPU, reason="needs the interpreter")
def test_unsupported_head_dim_falls_back_with_one_warning():
    import sys

    sys.modules["fastvit.backend"]._warned.clear()  # the module; fastvit.backend is the context manager
    q = torch.randn(1, 2, 9, 257)  # D = 257: one past the widest head dim the kernels cover
    with fastvit.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastvit.flash_attention(q, q, q)
        fastvit.flash_attention(q, q, q)
    fallback = [w for w in caught if issubclass(w.category, fastvit.FastvitFallbackWarning)]
    assert len(fallback) == 1 and "head_dim 257 > 256" in str(fallback[0].message)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


@pytest.mark.skipif(ON_GPU, reason="needs the interpreter")
def test_masked_head_dim_above_128_falls_back_with_its_reason():
    """Head dims 129..256 run the kernels without a mask; with an attn_mask (or rel_pos) they
    have no configurations and run SDPA, with a warning that says so."""
    import sys

    sys.modules["fastvit.backend"]._warned.clear()
    q = torch.randn(1, 2, 9, 160)
    keep = torch.rand(9, 9) > 0.3
    keep[:, 0] = True  # no fully masked row: SDPA's answer is defined
    with fastvit.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastvit.flash_attention(q, q, q, attn_mask=keep)
    fallback = [w for w in caught if issubclass(w.category, fastvit.FastvitFallbackWarning)]
    assert len(fallback) == 1 and "head_dim 160 > 128 with attn_mask or rel_pos" in str(fallback[0].message)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, attn_mask=keep))


def test_empty_query_sequence():
    q = torch.randn(2, 3, 0, 16, requires_grad=True)
    k = torch.randn(2, 3, 5, 16, requires_grad=True)
    out = fastvit.flash_attention(q, k, k)
    assert out.shape == (2, 3, 0, 16)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
def _bad(**overrides):
    base = {"q": torch.randn(2, 3, 5, 16), "k": torch.randn(2, 3, 7, 16), "v": torch.randn(2, 3, 7, 16)}
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        (_bad(q=torch.randn(3, 5, 16)), ValueError, r"q must have 4 dimensions.*\(3, 5, 16\)"),
        (_bad(k=torch.randn(2, 4, 7, 16)), ValueError, r"k must match q in batch, heads and head_dim"),
        (_bad(v=torch.randn(1, 3, 7, 16)), ValueError, r"v must match q"),
        (_bad(k=torch.randn(2, 3, 7, 8)), ValueError, r"k must match q.*head_dim"),
        (_bad(v=torch.randn(2, 3, 6, 16)), ValueError, r"k and v must have the same number of keys"),
        (_bad(k=torch.randn(2, 3, 0, 16), v=torch.randn(2, 3, 0, 16)), ValueError, r"at least one key"),
        (_bad(v=torch.randn(2, 3, 7, 16, dtype=torch.float16)), TypeError, r"same dtype.*v float16"),
        (_bad(q=torch.randint(0, 5, (2, 3, 5, 16))), TypeError, r"q must have dtype in .*got int64"),
        (_bad(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
        (_bad(k=torch.randn(2, 3, 16, 7).transpose(-1, -2)), ValueError, r"k must have a unit stride"),
        (_bad(q=torch.randn(2, 3, 5, 16, device="meta")), ValueError, r"same device.*q on meta"),
    ],
)
def test_bad_input(args, error, pattern):
    with pytest.raises(error, match=pattern):
        fastvit.flash_attention(**args)


def test_bad_scale():
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(TypeError, match="scale"):
        fastvit.flash_attention(q, q, q, scale=math.inf)
    with pytest.raises(TypeError, match="scale"):
        fastvit.flash_attention(q, q, q, scale="0.5")
    with pytest.raises(TypeError, match="scale"):
        fastvit.flash_attention(q, q, q, scale=np.float32("nan"))


@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_numpy_scale_is_taken_as_sdpa_takes_it(route):
    # SDPA takes a NumPy float (a scale read from a config array); fastvit raised TypeError on np.float32
    q = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(3))
    with fastvit.backend(route):
        want = fastvit.flash_attention(q, q, q, scale=0.3)
        for scale in (np.float32(0.3), np.float64(0.3)):
            torch.testing.assert_close(fastvit.flash_attention(q, q, q, scale=scale), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fastvit.window_attention(q, q, q, (1, 5), (1, 5), scale=np.float32(0.3)),
                                   want, rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_route_lse_is_computed_in_fp32(dtype):
    """q.k in the input dtype overflows fp16 (q = k = 40, D = 64: 102400 > 65504) and rounds the
    logits; the torch route's lse comes from fp32 scores, like the kernels'."""
    q = torch.full((1, 1, 3, 64), 40.0, dtype=dtype)
    with fastvit.backend("torch"):
        _, lse = fastvit.flash_attention(q, q, q, return_lse=True)
    expected = 40.0 * 40.0 * 64 / 8 + math.log(3)  # scale 1/8, three equal logits
    torch.testing.assert_close(lse, torch.full_like(lse, expected))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 33, 64, generator=gen).to(dtype) for _ in range(3))
    with fastvit.backend("torch"):
        _, lse = fastvit.flash_attention(q, k, v, return_lse=True)
    _, lse_ref = reference.attention(q.double(), k.double(), v.double())
    assert (lse.double() - lse_ref).abs().max() < 1e-4  # fp32 arithmetic on the same (rounded) inputs


@pytest.mark.parametrize("flag", ["causal", "return_lse"])
@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_flags_must_be_bools(flag, value):
    """A truthy non-bool (causal="False") would silently turn the flag on: every route rejects it."""
    q, k, v = torch.randn(3, 1, 1, 5, 16).unbind(0)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        fastvit.flash_attention(q, k, v, **{flag: value})
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        fastvit.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu,
                                       **{flag: value})


def test_torch_route_copies_self_overlapping_inputs():
    """PyTorch's CPU SDPA gives garbage (different on every call) for q, k, v whose elements share
    memory; the torch route copies exactly those, and never a packed-qkv view or a broadcast."""
    from fastvit.ops._checks import may_overlap

    q = torch.randn(64, dtype=torch.float64).float().unfold(0, 8, 1)[:5].reshape(1, 1, 5, 8)
    assert may_overlap(q)
    with fastvit.backend("torch"):
        outs = [fastvit.flash_attention(q, q, q) for _ in range(2)]
    expected, _ = reference.attention(q.double(), q.double(), q.double())
    for out in outs:
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    packed = torch.randn(2, 197, 3, 12, 64).permute(2, 0, 3, 1, 4)
    assert not any(may_overlap(t) for t in packed.unbind(0))
    assert not may_overlap(torch.randn(1, 4, 40, 64).expand(3, -1, -1, -1))
