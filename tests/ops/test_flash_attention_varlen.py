"""fastvit.flash_attention_varlen: packed variable-length attention against per-sequence float64
reference attention, on the torch route and (in the interpreter, or compiled on a GPU) the Triton
kernels; lse, cross lengths, empty sequences, strided views, validation and torch.compile."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import fastvit
from fastvit import reference
from tests.compile_check import assert_compiled_matches_eager
from tests.cuda_graphs import capture
from tests.launches import record_launches
from tests.tolerance import assert_close_to_reference
from tests.torch_compat import OPCHECK_UTILS

ON_GPU = torch.cuda.is_available()
kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu

# Lengths of a NaFlex-like batch: 197 (ViT-B/16 at 224, prime), 1 (a single token), 50, 0 (an
# empty sequence between two others), 65 (one past a power of two).
LENGTHS = (197, 1, 50, 0, 65)
# The same shape of batch, small enough for the interpreter: 17 (a block and a bit), 1, 9 (below
# every block), 0, 13.
SMALL_LENGTHS = (17, 1, 9, 0, 13)
# Cross attention: a sequence with queries but no keys (zeros, lse -inf), one with keys but no
# queries (zero key gradients), more keys than queries and the reverse.
CROSS_Q = (5, 9, 0, 3, 20)
CROSS_K = (7, 0, 4, 12, 6)


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 (S+1,) offsets of sequences of the given lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lens_q, lens_k, heads, head_dim, dtype, device, *, packed=False, seed=0):
    """Leaf q (T, H, D), k, v (Tk, H, D) and their cu_seqlens. ``packed``: views into one
    (T, 3, H, D) qkv projection output (non-contiguous, shared storage; needs lens_k == lens_q)."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)
    if packed:
        assert lens_q == lens_k
        qkv = torch.randn(total_q, 3, heads, head_dim, generator=gen).to(device, dtype).requires_grad_(True)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (torch.randn(n, heads, head_dim, generator=gen).to(device, dtype).requires_grad_(True)
                   for n in (total_q, total_k, total_k))
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def _reference(q, k, v, cu_q, cu_k, grad_out, dtype, **kwargs):
    """(out, lse, dq, dk, dv) of the per-sequence reference on CPU copies cast to ``dtype``."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.attention_varlen(*leaves, cu_q.cpu(), cu_k.cpu(), **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.detach().cpu().to(dtype), allow_unused=True)
    return (out, lse, *(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)))


def _check_lse(actual, oracle, lowp, dtype):
    """-inf exactly where a query has no keys; elsewhere the tolerance rule (fp32 slack)."""
    actual = actual.detach().cpu()
    dead = torch.isneginf(oracle)
    assert torch.equal(torch.isneginf(actual), dead), "lse: -inf in the wrong places"
    assert_close_to_reference(actual[~dead], oracle[~dead], lowp[~dead], name="lse", dtype=dtype)


def _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, **kwargs):
    oracle = _reference(q, k, v, cu_q, cu_k, grad_out, torch.float64, **kwargs)
    lowp = _reference(q, k, v, cu_q, cu_k, grad_out, q.dtype, **kwargs)
    _check_lse(lse, oracle[1], lowp[1], q.dtype)
    for name, actual, exp64, explow in zip(("out", "dq", "dk", "dv"), (out, *grads), (oracle[0], *oracle[2:]),
                                           (lowp[0], *lowp[2:]), strict=True):
        assert_close_to_reference(actual.detach().cpu(), exp64, explow, name=name, dtype=q.dtype)


def _run(route, q, k, v, cu_q, cu_k, grad_out=None, **kwargs):
    with fastvit.backend(route):
        out, lse = fastvit.flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kwargs)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32 and not lse.requires_grad
    return out, lse, grad_out, grads


# ---------------------------------------------------------------------------------------------
# Triton kernels (VARLEN): the interpreter on the CPU, compiled on a GPU
# ---------------------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(kernel_device, dtype, causal):
    lengths = LENGTHS if ON_GPU else SMALL_LENGTHS
    q, k, v, cu_q, cu_k = _inputs(lengths, lengths, 2, 32, dtype, kernel_device, seed=11)
    out, lse, grad_out, grads = _run("triton", q, k, v, cu_q, None, causal=causal)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal)


@kernel_test
@pytest.mark.parametrize("lengths", [(40, 0, 23), (13, 9)], ids=["passes", "short-backward"])
def test_kernel_fp32_backward_at_large_logits(kernel_device, lengths):
    """Packed fp32 sequences at logits of ~40-80: exact scores (integer q and k, scale 1/2), so what
    is left is how each row's softmax offset reaches the backward; the forward's fp64 lse for fp32
    inputs lets the launcher fold the fp32 lse's rounding into dO's rows (``backward_lse`` on the
    (H, T) lse and (T, H, D) rows): the two passes, a sequence with no tokens, the short backward."""
    gen = torch.Generator().manual_seed(8)
    total = sum(lengths)
    q, k = (torch.randint(-4, 5, (total, 2, 32), generator=gen).float().to(kernel_device).requires_grad_(True)
            for _ in range(2))  # fmt: skip
    v = torch.randn(total, 2, 32, generator=gen).to(kernel_device).requires_grad_(True)
    cu = cu_seqlens(lengths, kernel_device)
    out, lse, grad_out, grads = _run("triton", q, k, v, cu, None, scale=0.5)
    assert lse.abs().max() > 40
    _check(q, k, v, cu, cu, out, lse, grad_out, grads, scale=0.5)


@kernel_test
@pytest.mark.parametrize("head_dim", [160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_large_head_dims(kernel_device, head_dim, causal):
    """Head dims above 128, padded to 256: 160 masked, 256 the widest; fp32, short sequences."""
    q, k, v, cu_q, cu_k = _inputs((19, 0, 5), (19, 0, 5), 2, head_dim, torch.float32, kernel_device, seed=head_dim)
    out, lse, grad_out, grads = _run("triton", q, k, v, cu_q, None, causal=causal)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal)


@kernel_test
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_cross_lengths(kernel_device, causal):
    """cu_seqlens_k != cu_seqlens_q: queries without keys (zeros, lse -inf, zero dq), keys
    without queries (zero dk, dv), both more and fewer keys than queries; a masked head dim."""
    q, k, v, cu_q, cu_k = _inputs(CROSS_Q, CROSS_K, 2, 40, torch.float32, kernel_device, seed=12)
    out, lse, grad_out, grads = _run("triton", q, k, v, cu_q, cu_k, causal=causal, scale=0.3)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal, scale=0.3)


@kernel_test
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_lazy_rescale(kernel_device, causal, lazy_rescale):
    """The forward's lazy rescaling over packed sequences: queries without keys keep zeros and
    lse -inf (their rows stay at -inf through every step), fp16 and a masked head dim."""
    q, k, v, cu_q, cu_k = _inputs(CROSS_Q, CROSS_K, 2, 40, torch.float16, kernel_device, seed=14)
    out, lse, grad_out, grads = _run("triton", q, k, v, cu_q, cu_k, causal=causal, scale=0.3)
    assert lazy_rescale and all(lazy_rescale)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal, scale=0.3)


@kernel_test
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [16, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_short_sequences_backward_in_one_launch(kernel_device, dtype, head_dim, causal, monkeypatch):
    """Packed sequences no longer than the short backward's tiles (Qwen-VL's 64-token windows; 16 in
    the interpreter) take its one launch, a (sequence, head) pair per step, at D = 80 in head-dim
    halves: queries without keys and keys without queries get zero gradients, the rest the
    reference's; with ``SHORT_BACKWARD`` off the two passes run and agree. Where no short tiles
    fit (fp32 at D = 80: they spill), the passes run."""
    from fastvit.kernels import flash_attention as kernels

    arch = kernels.arch_of(torch.device(kernel_device))
    cfg = kernels.short_bwd_config(arch, dtype, kernels.head_dim_padded(head_dim), varlen=True)
    rows, cols = (16, 16) if cfg is None else (cfg.block_m, cfg.block_n)
    lens_q, lens_k = (5, 9, 0, 3, rows, 1), (7, 0, 4, 12, cols, 1)
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 3, head_dim, dtype, kernel_device, seed=head_dim + causal)
    launched = record_launches(monkeypatch, ("short", "dq", "dkdv"))
    out, lse, grad_out, grads = _run("triton", q, k, v, cu_q, cu_k, causal=causal)
    assert launched == (["dq", "dkdv"] if cfg is None else ["short"])
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal)
    monkeypatch.setattr(kernels, "SHORT_BACKWARD", False)
    launched.clear()
    passes = _run("triton", q, k, v, cu_q, cu_k, grad_out, causal=causal)
    assert launched == ["dq", "dkdv"]
    _check(q, k, v, cu_q, cu_k, *passes, causal=causal)


@kernel_test
def test_kernel_packed_qkv_views_and_expanded_grad_output(kernel_device, monkeypatch):
    """Views of a packed (T, 3, H, D) qkv reach the kernels as they are; ``out.sum()`` hands the
    backward a grad_output with all strides 0."""
    from fastvit.kernels import flash_attention as kernels

    q, k, v, cu_q, cu_k = _inputs(SMALL_LENGTHS, SMALL_LENGTHS, 2, 16, torch.float32, kernel_device,
                                  packed=True, seed=13)
    seen = {}
    original = kernels.flash_attention_varlen_forward

    def spy(q_, k_, v_, *rest):
        seen.update(ptrs=(q_.data_ptr(), k_.data_ptr(), v_.data_ptr()), strides=q_.stride())
        return original(q_, k_, v_, *rest)

    monkeypatch.setattr(kernels, "flash_attention_varlen_forward", spy)
    with fastvit.backend("triton"):
        out, lse = fastvit.flash_attention_varlen(q, k, v, cu_q, return_lse=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert seen == {"ptrs": (q.data_ptr(), k.data_ptr(), v.data_ptr()), "strides": q.stride()}
    _check(q, k, v, cu_q, cu_k, out, lse, torch.ones_like(out), grads)


@kernel_test
def test_kernel_grid_size_and_max_seqlen_do_not_change_results(kernel_device):
    """A generous max_seqlen (more idle tiles) gives bitwise the same results as the exact one,
    and matches the torch route."""
    q, k, v, cu_q, _ = _inputs(SMALL_LENGTHS, SMALL_LENGTHS, 2, 16, torch.float32, kernel_device, seed=14)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(kernel_device)
    exact = _run("triton", q, k, v, cu_q, None, grad_out, causal=True)
    generous = _run("triton", q, k, v, cu_q, None, grad_out, causal=True, max_seqlen_q=64, max_seqlen_k=64)
    for a, b in zip((exact[0], exact[1], *exact[3]), (generous[0], generous[1], *generous[3]), strict=True):
        assert torch.equal(a, b)
    with fastvit.backend("torch"):
        slow = fastvit.flash_attention_varlen(q, k, v, cu_q, causal=True)
    torch.testing.assert_close(exact[0], slow, rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_strided_cu_seqlens_views(kernel_device):
    """cu_seqlens as strided 1-D views (a column of a table of offsets): the kernels read them with
    a unit stride, so the op copies them (S+1 int32s). Before, a strided cu_seqlens_q gave NaN and
    a strided cu_seqlens_k an error of 1.9 (interpreter)."""
    q, k, v, cu_q, cu_k = _inputs(CROSS_Q, CROSS_K, 2, 16, torch.float32, kernel_device, seed=21)
    strided_q, strided_k = (torch.stack([cu, cu + 7], 1)[:, 0] for cu in (cu_q, cu_k))
    assert strided_q.stride() == (2,) and torch.equal(strided_q, cu_q)
    for maxes in ({}, {"max_seqlen_q": max(CROSS_Q), "max_seqlen_k": max(CROSS_K)}):
        out, lse, grad_out, grads = _run("triton", q, k, v, strided_q, strided_k, **maxes)
        _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads)


@pytest.mark.interpreter  # on a GPU the failed check is a device-side assertion, which ends the CUDA context
@pytest.mark.skipif(ON_GPU, reason="a device-side assertion would end the CUDA context of the other GPU tests")
@pytest.mark.parametrize(
    "lengths, overrides",
    [((1, 70, 70), {"max_seqlen_q": 69, "max_seqlen_k": 70}),  # S * max still holds T: not seen from shapes
     ((1, 70, 70), {"max_seqlen_q": 70, "max_seqlen_k": 69}),  # a forward right, a backward wrong before
     ((5, 7, 5), {"max_seqlen_q": 7, "max_seqlen_k": 7, "cu_seqlens_q": (0, 5, 12, 20)}),  # past T
     ((5, 7, 5), {"max_seqlen_q": 7, "cu_seqlens_q": (0, 7, 5, 17)})],  # decreasing
    ids=["max_seqlen_q short", "max_seqlen_k short", "cu_seqlens past the tokens", "cu_seqlens decreasing"],
)
def test_given_max_seqlen_and_cu_seqlens_checked_on_the_device(lengths, overrides):
    """With max_seqlen given, cu_seqlens is not read on the host; what the host would check is
    checked on the device. Before: wrong outputs, gradients of 1e20 (unwritten memory), or a crash."""
    q, k, v, cu_q, _ = _inputs(lengths, lengths, 2, 16, torch.float32, "cpu", seed=22)
    if "cu_seqlens_q" in overrides:
        cu_q = torch.tensor(overrides.pop("cu_seqlens_q"), dtype=torch.int32)
    with fastvit.backend("triton"), pytest.raises(RuntimeError, match="must be at least its longest sequence"):
        out = fastvit.flash_attention_varlen(q, k, v, cu_q, **overrides)
        torch.autograd.grad(out.sum(), (q, k, v))


@pytest.mark.parametrize("short", ["max_seqlen_q", "max_seqlen_k"])
def test_a_short_max_seqlen_is_an_error_on_the_torch_route_too(short):
    # the torch route ignored it (right results on a CPU), where the kernels' device check fails: code
    # that ran on a CPU ended the CUDA context on a GPU
    q, k, v, cu_q, _ = _inputs((3, 5), (3, 5), 2, 16, torch.float32, "cpu", seed=23)
    given = {"max_seqlen_q": 5, "max_seqlen_k": 5, short: 4}
    message = rf"{short} \(4\) must be at least its longest sequence \(5\)"
    with fastvit.backend("torch"), pytest.raises(ValueError, match=message):
        fastvit.flash_attention_varlen(q, k, v, cu_q, **given)
    with fastvit.backend("torch"):
        fastvit.flash_attention_varlen(q, k, v, cu_q, max_seqlen_q=6, max_seqlen_k=5)  # longer: fine, as in the kernels


@kernel_test
def test_kernel_production_block_shapes(kernel_device, monkeypatch):
    """The block shapes the GPU launchers pick (not only the small interpreter tiles): every
    distinct (forward, dK/dV, dQ) triple, causal, cross lengths around them."""
    if ON_GPU:
        pytest.skip("on a GPU the production shapes are what every test runs")
    from fastvit.kernels import flash_attention as kernels

    monkeypatch.setattr(kernels, "INTERPRETER", False)
    triples = {(kernels.fwd_config(a, d, p, causal=c), kernels.varlen_bwd_config(a, d, p, c),
                kernels.varlen_bwd_dq_config(a, d, p))
               for a in (80, 89, 90) for d in (torch.float16, torch.float32) for p in (16, 64, 128, 256)
               for c in (False, True)}  # fmt: skip
    monkeypatch.setattr(kernels, "INTERPRETER", True)
    q, k, v, cu_q, cu_k = _inputs((130, 0, 20), (70, 5, 0), 1, 16, torch.float32, kernel_device, seed=15)
    for fwd, bwd, dq in sorted(triples, key=str):
        monkeypatch.setattr(kernels, "_INTERPRETER_FWD", fwd)
        monkeypatch.setattr(kernels, "_INTERPRETER_BWD", bwd)
        monkeypatch.setattr(kernels, "_INTERPRETER_DQ", dq)
        out, lse, grad_out, grads = _run("triton", q, k, v, cu_q, cu_k, causal=True)
        _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=True)


@kernel_test
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_single_sequence_is_the_dense_kernel(kernel_device, causal):
    """One sequence runs the same tiles and loops as the dense op: the same lse bit for bit, and
    out and the gradients to fp32 rounding (VARLEN normalises through the fully-masked-row guard,
    one approximate reciprocal per row, where the dense op divides)."""
    q, k, v, cu_q, _ = _inputs((37,), (37,), 2, 16, torch.float32, kernel_device, seed=19)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(kernel_device)
    out, lse, _, grads = _run("triton", q, k, v, cu_q, None, grad_out, causal=causal)
    dense = [t.detach().transpose(0, 1)[None].requires_grad_(True) for t in (q, k, v)]  # (1, H, N, D)
    with fastvit.backend("triton"):
        dense_out, dense_lse = fastvit.flash_attention(*dense, causal=causal, return_lse=True)
        dense_grads = torch.autograd.grad(dense_out, dense, grad_out.transpose(0, 1)[None])
    assert torch.equal(lse, dense_lse[0])
    torch.testing.assert_close(out, dense_out[0].transpose(0, 1), rtol=2e-6, atol=1e-6)
    for a, b in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b[0].transpose(0, 1), rtol=2e-6, atol=1e-6)


@kernel_test
def test_kernel_deterministic(kernel_device):
    q, k, v, cu_q, _ = _inputs(SMALL_LENGTHS, SMALL_LENGTHS, 2, 16, torch.float16, kernel_device, seed=16)
    grad_out = torch.ones(q.shape, dtype=q.dtype, device=kernel_device)
    first = _run("triton", q, k, v, cu_q, None, grad_out)
    second = _run("triton", q, k, v, cu_q, None, grad_out)
    for a, b in zip(first[3], second[3], strict=True):
        assert torch.equal(a, b)


@kernel_test
def test_kernel_opcheck(kernel_device):
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom ops."""
    q, k, v, cu_q, cu_k = _inputs(CROSS_Q, CROSS_K, 2, 16, torch.float32, kernel_device, seed=17)
    q, k, v = q.detach(), k.detach(), v.detach()
    args = (q, k, v, cu_q, cu_k, max(CROSS_Q), max(CROSS_K), 0.25)
    with fastvit.backend("triton"):
        for causal in (False, True):
            fwd = torch.ops.fastvit.flash_attention_varlen_fwd.default
            torch.library.opcheck(fwd, (*args, causal), test_utils=OPCHECK_UTILS)
        out, lse = torch.ops.fastvit.flash_attention_varlen_fwd(*args, True)
        for grad_out in (torch.randn_like(out), torch.ones((), device=out.device).expand_as(out)):  # dense and stride 0
            bwd_args = (grad_out, q, k, v, out, lse, cu_q, cu_k, max(CROSS_Q), max(CROSS_K), 0.25, True)
            bwd = torch.ops.fastvit.flash_attention_varlen_bwd.default
            torch.library.opcheck(bwd, bwd_args, test_utils=OPCHECK_UTILS)


@kernel_test
def test_kernel_under_torch_compile(kernel_device):
    """With max_seqlen_q / max_seqlen_k given, nothing reads cu_seqlens on the host: fullgraph."""
    q, k, v, cu_q, cu_k = _inputs(SMALL_LENGTHS, SMALL_LENGTHS, 2, 16, torch.float32, kernel_device, seed=18)

    def block(q, k, v):
        out = fastvit.flash_attention_varlen(q * 1.5, k, v, cu_q, cu_k, max_seqlen_q=17, max_seqlen_k=17)
        return out.flatten(1).square().sum()

    assert_compiled_matches_eager(block, (q, k, v), "triton")


@pytest.mark.parametrize("causal", [False, True])
def test_torch_route_under_torch_compile(causal):
    """The torch route read cu_seqlens on the host for its per-sequence loop, so with both maxima
    given torch.compile(fullgraph=True) still failed on the CPU ("Could not guard on data-dependent
    expression"): while compiling it runs a padded form, checked here against the float64 reference
    (empty query and key sequences, cross lengths, lse)."""
    lens_q, lens_k = (3, 0, 5, 1, 4), (4, 2, 0, 3, 6)
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, 2, 16, torch.float32, "cpu", seed=24)
    grad_out = torch.randn_like(q)

    def block(q, k, v):
        out, lse = fastvit.flash_attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=5, max_seqlen_k=6,
                                                  causal=causal, return_lse=True)  # fmt: skip
        return out, lse

    with fastvit.backend("torch"):
        out, lse = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal)
    eager = _run("torch", q, k, v, cu_q, cu_k, grad_out, max_seqlen_q=5, max_seqlen_k=6, causal=causal)
    for compiled, eager_one in zip((out, lse, *grads), (eager[0], eager[1], *eager[3]), strict=True):
        torch.testing.assert_close(compiled, eager_one)  # (the per-sequence loop, eager)


@pytest.mark.parametrize("lengths", [(17, 1, 9, 0, 13), (0, 0, 5), (64,), (16, 16, 1)])
@pytest.mark.parametrize("max_extra", [0, 40])
def test_tile_table_covers_every_block_once(lengths, max_extra):
    """The device-built tile table: each (sequence, block) exactly once, in order; the spare
    columns (at most one per sequence) point nowhere."""
    from fastvit.kernels.flash_attention import varlen_tiles

    block = 16
    cu = cu_seqlens(lengths)
    table = varlen_tiles(cu, sum(lengths), max(lengths) + max_extra, block)
    expected = [(s, start) for s, n in enumerate(lengths) for start in range(0, n, block)]
    live = [(s, start) for s, start in table.t().tolist() if s >= 0]
    assert live == expected
    assert table.dtype == torch.int32 and table.shape[1] - len(expected) <= len(lengths)
    assert all(start == 0 for s, start in table.t().tolist() if s < 0)


# ---------------------------------------------------------------------------------------------
# torch route (one SDPA call per sequence)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_route_matches_reference(dtype, causal):
    q, k, v, cu_q, cu_k = _inputs(LENGTHS, LENGTHS, 3, 32, dtype, "cpu", seed=1)
    out, lse, grad_out, grads = _run("torch", q, k, v, cu_q, None, causal=causal)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_route_cross_lengths(causal):
    q, k, v, cu_q, cu_k = _inputs(CROSS_Q, CROSS_K, 2, 16, torch.float32, "cpu", seed=2)
    out, lse, grad_out, grads = _run("torch", q, k, v, cu_q, cu_k, causal=causal, scale=0.3)
    _check(q, k, v, cu_q, cu_k, out, lse, grad_out, grads, causal=causal, scale=0.3)
    no_keys = slice(5, 14)  # the second sequence: 9 queries, 0 keys
    assert torch.equal(out[no_keys], torch.zeros_like(out[no_keys]))
    assert torch.equal(grads[0][no_keys], torch.zeros_like(grads[0][no_keys]))


def test_torch_route_packed_views_and_expanded_grad_output():
    """Views of a packed (T, 3, H, D) qkv and ``out.sum()``'s stride-0 grad_output."""
    q, k, v, cu_q, cu_k = _inputs(LENGTHS, LENGTHS, 2, 16, torch.float32, "cpu", packed=True, seed=3)
    assert not q.is_contiguous()
    with fastvit.backend("torch"):
        out, lse = fastvit.flash_attention_varlen(q, k, v, cu_q, return_lse=True)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    _check(q, k, v, cu_q, cu_k, out, lse, torch.ones_like(out), grads)


def test_torch_route_only_empty_key_sequences_still_has_a_gradient():
    q, k, v, cu_q, cu_k = _inputs((3, 4), (0, 0), 2, 8, torch.float32, "cpu", seed=4)
    with fastvit.backend("torch"):
        out, lse = fastvit.flash_attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert torch.equal(q.grad, torch.zeros_like(q))


def test_auto_backend_on_cpu_is_the_torch_route(monkeypatch):
    from fastvit.ops import flash_attention_varlen as op

    called = []
    monkeypatch.setattr(op, "_torch_route", lambda *a: called.append(a) or a[0])
    q, k, v, cu_q, _ = _inputs((3, 4), (3, 4), 1, 8, torch.float32, "cpu")
    fastvit.flash_attention_varlen(q, k, v, cu_q)
    assert len(called) == 1


@pytest.mark.skipif(ON_GPU, reason="needs the interpreter")
def test_unsupported_head_dim_falls_back_with_one_warning():
    sys.modules["fastvit.backend"]._warned.clear()
    q, k, v, cu_q, _ = _inputs((5, 3), (5, 3), 2, 257, torch.float32, "cpu", seed=5)  # one past the widest
    with fastvit.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fastvit.flash_attention_varlen(q, k, v, cu_q, max_seqlen_q=5)
        fastvit.flash_attention_varlen(q, k, v, cu_q, max_seqlen_q=5)
    fallback = [w for w in caught if issubclass(w.category, fastvit.FastvitFallbackWarning)]
    assert len(fallback) == 1 and "head_dim 257 > 256" in str(fallback[0].message)
    torch.testing.assert_close(out, reference.attention_varlen(q, k, v, cu_q)[0])


def test_float64_runs_the_torch_route_exactly():
    q, k, v, cu_q, _ = _inputs((6, 0, 11), (6, 0, 11), 2, 8, torch.float64, "cpu", seed=6)
    out, lse = fastvit.flash_attention_varlen(q, k, v, cu_q, causal=True, return_lse=True)
    ref_out, ref_lse = reference.attention_varlen(q, k, v, cu_q, causal=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse.float())


@pytest.mark.parametrize("maxima,why", [({}, "max_seqlen_q not given"),
                                         ({"max_seqlen_q": 6, "max_seqlen_k": 6}, "the torch route")])
def test_host_read_inside_a_cuda_graph_capture_says_what_to_pass(monkeypatch, maxima, why):
    # a .tolist() of cu_seqlens inside a capture would break it with an opaque CUDA error; the op
    # says instead which arguments spare the read (the capture state is faked: no GPU here)
    from fastvit.ops import flash_attention_varlen as op

    monkeypatch.setattr(op, "stream_capturing", lambda device: True)
    q, k, v, cu_q, _ = _inputs((4, 6), (4, 6), 2, 8, torch.float32, "cpu")
    with fastvit.backend("torch"), pytest.raises(RuntimeError, match=rf"reads cu_seqlens_q on the host here \({why}.*"
                                                 r"CUDA graph capture.*pass max_seqlen_q and max_seqlen_k"):
        fastvit.flash_attention_varlen(q, k, v, cu_q, **maxima)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_kernel_captured_in_a_cuda_graph_matches_eager():
    # with both maxima the Triton route never reads cu_seqlens on the host: forward and backward
    # capture as one CUDA graph, and replays on new values in the same buffers match eager calls
    q, k, v, cu_q, _ = _inputs(LENGTHS, LENGTHS, 4, 64, torch.bfloat16, "cuda", seed=11)
    grad_out = torch.randn_like(q)
    kwargs = {"max_seqlen_q": max(LENGTHS), "max_seqlen_k": max(LENGTHS)}

    def step():
        out = fastvit.flash_attention_varlen(q, k, v, cu_q, **kwargs)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    graph, captured = capture(step)
    with torch.no_grad():
        for t in (q, k, v, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    for got, want in zip(captured, step(), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    with torch.cuda.graph(torch.cuda.CUDAGraph()), pytest.raises(RuntimeError, match="max_seqlen_q not given"):
        q.detach().mul(2)  # (the graph is not empty: no warning at its end)
        fastvit.flash_attention_varlen(q, k, v, cu_q)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
def _bad(**overrides):
    base = {
        "q": torch.randn(10, 2, 8),
        "k": torch.randn(10, 2, 8),
        "v": torch.randn(10, 2, 8),
        "cu_seqlens_q": torch.tensor([0, 4, 10], dtype=torch.int32),
    }
    base.update(overrides)
    return base


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        (_bad(q=torch.randn(1, 10, 2, 8)), ValueError, r"q must have 3 dimensions \(total_tokens, heads, head_dim\)"),
        (_bad(k=torch.randn(10, 3, 8)), ValueError, r"k must match q in heads and head_dim"),
        (_bad(v=torch.randn(10, 2, 4)), ValueError, r"v must match q"),
        (_bad(v=torch.randn(9, 2, 8)), ValueError, r"k and v must have the same number of tokens"),
        (_bad(k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8)), ValueError, r"cu_seqlens_k=None.*q's total tokens"),
        (_bad(k=torch.randn(10, 8, 2).transpose(1, 2)), ValueError, r"k must have a unit stride"),
        (_bad(v=torch.randn(10, 2, 8, dtype=torch.float16)), TypeError, r"same dtype.*v float16"),
        (_bad(q=torch.randint(0, 3, (10, 2, 8))), TypeError, r"q must have dtype in"),
        (_bad(cu_seqlens_q=[0, 4, 10]), TypeError, r"cu_seqlens_q must be a torch.Tensor"),
        (_bad(cu_seqlens_q=torch.tensor([0.0, 4.0, 10.0])), TypeError, r"cu_seqlens_q must have dtype int32.*float32"),
        (_bad(cu_seqlens_q=torch.tensor([0, 4, 10])), TypeError, r"cu_seqlens_q must have dtype int32.*int64"),
        (_bad(cu_seqlens_q=_i32(0, 4, 10)[None]), ValueError, r"cu_seqlens_q must be 1-D.*\(1, 3\)"),
        (_bad(cu_seqlens_q=_i32(0)), ValueError, r"cu_seqlens_q must be 1-D with S \+ 1 >= 2 entries"),
        (_bad(cu_seqlens_q=_i32(0, 4, 10).to("meta")), ValueError, r"cu_seqlens_q must be on q's device cpu"),
        (_bad(cu_seqlens_q=_i32(1, 4, 10)), ValueError, r"cu_seqlens_q must start at 0, got cu_seqlens_q\[0\] = 1"),
        (_bad(cu_seqlens_q=_i32(0, 6, 4, 10)), ValueError, r"cu_seqlens_q must be non-decreasing.*\[2\] = 4 < "),
        (_bad(cu_seqlens_q=_i32(0, 4, 9)), ValueError, r"cu_seqlens_q\[-1\] must equal the total tokens of q \(10\)"),
        (_bad(cu_seqlens_k=_i32(0, 10)), ValueError, r"cu_seqlens_k must describe as many sequences"),
        (_bad(cu_seqlens_k=_i32(0, 3, 11)), ValueError, r"cu_seqlens_k\[-1\] must equal the total tokens of k"),
        (_bad(cu_seqlens_k=_i32(0, 3, 10).float()), TypeError, r"cu_seqlens_k must have dtype int32"),
        (_bad(max_seqlen_q=6.0), TypeError, r"max_seqlen_q must be an int or None, got float"),
        (_bad(max_seqlen_k=-1), ValueError, r"max_seqlen_k must be >= 0"),
        (_bad(max_seqlen_q=4), ValueError, r"max_seqlen_q \(4\) must be at least the longest sequence: 2 sequences"),
        (_bad(max_seqlen_q=0), ValueError, r"max_seqlen_q \(0\) must be at least the longest sequence"),
        (_bad(max_seqlen_q=6, max_seqlen_k=4), ValueError, r"cannot hold k's 10"),
        (_bad(scale="0.5"), TypeError, r"scale must be a finite float"),
    ],
)
def test_bad_input(args, error, pattern):
    with pytest.raises(error, match=pattern):
        fastvit.flash_attention_varlen(**args)
