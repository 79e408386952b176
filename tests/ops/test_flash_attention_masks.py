"""fastvit.flash_attention with ``attn_mask`` (bool / float, every broadcast pattern, learnable
biases) and ``rel_pos`` (SAM's decomposed 2-D relative position): the Triton kernels (interpreter on
CPU, compiled on a GPU) and the torch route against the float64 reference, fully masked rows, bad
masks, opcheck and torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastvit
from fastvit import reference
from tests.compile_check import assert_compiled_matches_eager
from tests.launches import record_launches
from tests.tolerance import assert_close_to_reference

ON_GPU = torch.cuda.is_available()
kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu
# both routes: the Triton kernels and PyTorch's SDPA (with the chunked rel_pos path)
ROUTES = [pytest.param("triton", marks=kernel_test), "torch"]

# B=2, H=3: broadcast over either; N=33 (one past two 16-row interpreter blocks), M=35 = 5 x 7
# (a rel_pos key grid, and not a multiple of any block); D=16.
B, H, N, M, D = 2, 3, 33, 35, 16
KH, KW = 5, 7

# (mask shape, why): every broadcast pattern SDPA accepts
MASK_SHAPES = [
    ((N, M), "2-D, shared by every batch and head"),
    ((M,), "1-D key padding mask, shared by every row"),
    ((B, 1, 1, M), "per-sample key padding"),
    ((1, H, N, M), "per-head bias (BEiT / Swin relative-position table)"),
    ((B, H, N, M), "full"),
    ((B, 1, N, M), "per-sample, shared by heads"),
    ((H, N, 1), "3-D, broadcast over keys"),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(dtype, device, *, seed=0, n_q=N, n_k=M):
    gen = _gen(seed)
    return [
        torch.randn(B, H, n, D, generator=gen).to(device, dtype).requires_grad_(True) for n in (n_q, n_k, n_k)
    ]


def _mask(shape, kind, device, *, seed=1, dtype=torch.float32, requires_grad=True):
    """A bool mask (~25% masked) or a float bias (N(0, 1) with ~10% -inf), on ``device``."""
    gen = _gen(seed)
    if kind == "bool":
        return (torch.rand(shape, generator=gen) > 0.25).to(device)
    bias = torch.randn(shape, generator=gen)
    bias = bias.masked_fill(torch.rand(shape, generator=gen) < 0.1, float("-inf"))
    return bias.to(device, dtype).requires_grad_(requires_grad)


def _rel_pos(batch, heads, device, *, seed=2, dtype=torch.float32, n_q=N):
    gen = _gen(seed)
    return tuple(
        torch.randn(batch, heads, n_q, k, generator=gen).to(device, dtype).requires_grad_(True) for k in (KH, KW)
    )


def _leaves(q, k, v, attn_mask, rel_pos):
    """The tensors whose gradients are checked: q, k, v, a float mask that requires grad, rel_pos."""
    leaves = [q, k, v]
    if attn_mask is not None and attn_mask.requires_grad:
        leaves.append(attn_mask)
    if rel_pos is not None:
        leaves.extend(rel_pos)
    return leaves


def _run(route, q, k, v, grad_out=None, *, attn_mask=None, rel_pos=None, causal=False):
    """(out, lse, grad_out, grads of _leaves) of ``fastvit.flash_attention`` on ``route``."""
    with fastvit.backend(route):
        out, lse = fastvit.flash_attention(q, k, v, causal=causal, attn_mask=attn_mask, rel_pos=rel_pos,
                                           return_lse=True)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=_gen(99)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, _leaves(q, k, v, attn_mask, rel_pos), grad_out)
    return out, lse, grad_out, grads


def _reference(q, k, v, grad_out, dtype, *, attn_mask=None, rel_pos=None, causal=False):
    """(out, lse, grads) of the reference on CPU copies cast to ``dtype`` (a bool mask stays bool)."""

    def copy(t):
        if t is None:
            return None
        if t.dtype == torch.bool:
            return t.cpu()
        return t.detach().cpu().to(dtype).requires_grad_(t.requires_grad)

    q_, k_, v_, mask_ = (copy(t) for t in (q, k, v, attn_mask))
    rel_ = None if rel_pos is None else tuple(copy(t) for t in rel_pos)
    out, lse = reference.attention(q_, k_, v_, causal=causal, attn_mask=mask_, rel_pos=rel_)
    grads = torch.autograd.grad(out, _leaves(q_, k_, v_, mask_, rel_), grad_out.detach().cpu().to(dtype))
    return out, lse, grads


def _check(q, k, v, result, *, attn_mask=None, rel_pos=None, causal=False):
    """Every output and gradient against the float64 reference, with the budget of the same math
    in q's dtype; lse must be -inf exactly on the fully masked rows and close elsewhere."""
    out, lse, grad_out, grads = result
    kw = {"attn_mask": attn_mask, "rel_pos": rel_pos, "causal": causal}
    oracle = _reference(q, k, v, grad_out, torch.float64, **kw)
    lowp = _reference(q, k, v, grad_out, q.dtype, **kw)
    leaves = _leaves(q, k, v, attn_mask, rel_pos)
    names = ["dq", "dk", "dv", "dmask", "drel_h", "drel_w"]
    if attn_mask is None or not attn_mask.requires_grad:
        names.remove("dmask")
    if rel_pos is None:
        names = names[: len(names) - 2]
    for name, actual, exp64, explow, leaf in zip(["out", *names], (out, *grads), (oracle[0], *oracle[2]),
                                                 (lowp[0], *lowp[2]), (out, *leaves), strict=True):
        assert actual.dtype == leaf.dtype, f"{name} is {actual.dtype}, its tensor {leaf.dtype}"
        assert_close_to_reference(actual.detach().cpu(), exp64, explow, name=name, dtype=q.dtype)
    dead = torch.isneginf(oracle[1])
    assert torch.equal(torch.isneginf(lse.cpu()), dead), "lse must be -inf exactly on the fully masked rows"
    assert_close_to_reference(lse.cpu()[~dead], oracle[1][~dead], lowp[1][~dead], name="lse", dtype=q.dtype)


# ---------------------------------------------------------------------------------------------
# attn_mask: broadcast patterns, bool and float, gradients in the mask's own shape
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", [s for s, _ in MASK_SHAPES], ids=[why.split(",")[0] for _, why in MASK_SHAPES])
def test_mask_broadcast_patterns(kernel_device, route, kind, shape):
    q, k, v = _qkv(torch.float32, kernel_device, seed=len(shape))
    mask = _mask(shape, kind, kernel_device, seed=sum(shape))
    result = _run(route, q, k, v, attn_mask=mask)
    if kind == "float":
        assert result[3][3].shape == mask.shape  # the gradient has the mask's own shape
    _check(q, k, v, result, attn_mask=mask)


@pytest.mark.parametrize("route", ROUTES)
def test_mask_stride0_expanded_view(kernel_device, route, monkeypatch):
    """A (1, H, N, M) bias expanded to (B, H, N, M) (stride 0 over B) is read in place, not copied;
    its gradient reaches the (1, H, N, M) leaf summed over the batch."""
    q, k, v = _qkv(torch.float32, kernel_device, seed=3)
    table = _mask((1, H, N, M), "float", kernel_device, seed=4)
    expanded = table.expand(B, H, N, M)
    assert expanded.stride(0) == 0
    if route == "triton":
        from fastvit.kernels import flash_attention as kernels

        seen = []
        original = kernels.flash_attention_forward

        def spy(*args, bias=None, **kwargs):
            seen.append((bias.data_ptr(), bias.stride()))
            return original(*args, bias=bias, **kwargs)

        monkeypatch.setattr(kernels, "flash_attention_forward", spy)
    result = _run(route, q, k, v, attn_mask=expanded)
    if route == "triton":
        assert seen == [(table.data_ptr(), expanded.stride())]
    _check(q, k, v, result, attn_mask=expanded)
    (grad_table,) = torch.autograd.grad(expanded, table, result[3][3])
    oracle = _reference(q, k, v, result[2], torch.float64, attn_mask=expanded)[2][3].sum(0, keepdim=True)
    torch.testing.assert_close(grad_table.cpu().double(), oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("n_q,n_k", [(40, 21), (21, 40)])  # causal with N != M both ways
def test_mask_with_causal(kernel_device, route, kind, n_q, n_k):
    q, k, v = _qkv(torch.float32, kernel_device, seed=n_q, n_q=n_q, n_k=n_k)
    mask = _mask((1, H, n_q, n_k), kind, kernel_device, seed=n_k)
    result = _run(route, q, k, v, attn_mask=mask, causal=True)
    _check(q, k, v, result, attn_mask=mask, causal=True)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows(kernel_device, route, kind, causal):
    """Rows that may attend to no key: zeros, zero gradients, lse -inf, no NaN anywhere. Row 0
    is killed only by mask + causal (it keeps every key but key 0, the only one causal allows)."""
    q, k, v = _qkv(torch.float32, kernel_device, seed=5)
    mask = _mask((B, 1, N, M), kind, kernel_device, seed=6, requires_grad=False)
    dead_rows = [3, 17, 32]
    masked, open_ = (False, True) if kind == "bool" else (float("-inf"), 0.0)
    with torch.no_grad():
        mask[:, :, dead_rows] = masked
        if causal:
            mask[:, :, 0, 0] = masked
            mask[:, :, 0, 1:] = open_
    if kind == "float":
        mask.requires_grad_(True)
    result = _run(route, q, k, v, attn_mask=mask, causal=causal)
    out, lse, _, grads = result
    dead = dead_rows + ([0] if causal else [])
    assert torch.equal(out[:, :, dead], torch.zeros_like(out[:, :, dead]))
    assert torch.isneginf(lse[:, :, dead]).all() and torch.isfinite(lse[:, :, [1, 2]]).all()
    assert torch.equal(grads[0][:, :, dead], torch.zeros_like(grads[0][:, :, dead]))  # dq
    if kind == "float":
        assert torch.equal(grads[3][:, :, dead], torch.zeros_like(grads[3][:, :, dead]))  # dmask
    for t in (out, *grads):
        assert not torch.isnan(t).any()
    _check(q, k, v, result, attn_mask=mask, causal=causal)


@kernel_test
@pytest.mark.parametrize("kind", ["bool", "float", "key-padding", "rel_pos"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_lazy_rescale_with_masks(kernel_device, kind, causal, lazy_rescale):
    """The forward's lazy rescaling where rows start at -inf: rows 5-9 see nothing in the first key
    block (a row turning finite later forces the rescale of the whole tile), rows 3 and 17 nothing at
    all (zeros, lse -inf); a key-padding mask; rel_pos with a float mask."""
    q, k, v = _qkv(torch.float32, kernel_device, seed=11)
    rel_pos = None
    if kind == "key-padding":
        mask = (torch.rand(B, 1, 1, M, generator=_gen(12)) > 0.3).to(kernel_device)
        mask[..., 20] = True  # every row keeps a key
    else:
        mask_kind = "bool" if kind == "bool" else "float"
        mask = _mask((B, 1, N, M), mask_kind, kernel_device, seed=12, requires_grad=False)
        masked, open_ = (False, True) if mask_kind == "bool" else (float("-inf"), 0.0)
        with torch.no_grad():
            mask[:, :, 5:10, :16] = masked
            mask[:, :, 5:10, 16:] = open_
            mask[:, :, [3, 17]] = masked
        if mask_kind == "float":
            mask.requires_grad_(True)
        if kind == "rel_pos":
            rel_pos = _rel_pos(B, H, kernel_device, seed=13)
    result = _run("triton", q, k, v, attn_mask=mask, rel_pos=rel_pos, causal=causal)
    assert lazy_rescale and all(lazy_rescale)
    _check(q, k, v, result, attn_mask=mask, rel_pos=rel_pos, causal=causal)


@kernel_test
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("expanded", [False, True], ids=["B11M", "expanded-over-N"])
def test_kernel_key_padding_mask(kernel_device, kind, causal, expanded, monkeypatch):
    """A key-padding mask, (B, 1, 1, M) or expanded over the queries (stride 0), is read as one row
    of keys for every query (BIAS_ROWS_BCAST: one vector per key step; a bool one leaves dK/dV's
    loop unmasked and zeroes the masked keys' rows). Sample 0 pads every key (every row dead),
    sample 1 the interpreter's first 32-key block (its dK/dV program skips its loop) and one more."""
    from fastvit.kernels import flash_attention as kernels

    flags = []
    original = kernels._bias_args

    def spy(*args):
        result = original(*args)
        flags.append(result[3]["BIAS_ROWS_BCAST"])
        return result

    monkeypatch.setattr(kernels, "_bias_args", spy)
    q, k, v = _qkv(torch.float32, kernel_device, seed=14)
    keep = torch.ones(B, 1, 1, M, dtype=torch.bool)
    keep[0] = False
    keep[1, ..., :32] = False
    keep[1, ..., 33] = False
    if kind == "bool":
        mask = keep.to(kernel_device)
    else:
        values = torch.randn(B, 1, 1, M, generator=_gen(15)).masked_fill(~keep, float("-inf"))
        mask = values.to(kernel_device).requires_grad_(True)
    attn_mask = mask.expand(B, 1, N, M) if expanded else mask
    result = _run("triton", q, k, v, attn_mask=attn_mask, causal=causal)
    assert flags and all(flags), "the key-padding mask took the (rows, keys) tiles"
    out, lse, _, grads = result
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    for t in (out, *grads):
        assert not torch.isnan(t).any()
    padded = ~keep[1, 0, 0].to(kernel_device)
    assert torch.equal(grads[1][1][:, padded], torch.zeros_like(grads[1][1][:, padded]))  # dk
    assert torch.equal(grads[2][1][:, padded], torch.zeros_like(grads[2][1][:, padded]))  # dv
    _check(q, k, v, result, attn_mask=attn_mask, causal=causal)


@kernel_test
@pytest.mark.parametrize("shape", [(B, 1, "N", "M"), (1, H, "N", "M"), ("N", "M"), (B, 1, 1, "M")],
                         ids=["shifted-windows", "per-head", "2-D", "key-padding"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_short_backward_with_masks(kernel_device, shape, kind, causal, monkeypatch):
    """Masks without a gradient (window_attention's shift mask, a frozen bias, key padding) in the
    one-launch backward of short sequences, read through their broadcast strides, with rows that
    attend to no key (zero gradients, never NaN); a float mask that needs grad keeps the passes
    and the dBias kernel."""
    from fastvit.kernels import flash_attention as kernels

    cfg = kernels.short_bwd_config(kernels.arch_of(torch.device(kernel_device)), torch.float32, D, masked=True)
    n_q, n_k = cfg.block_m - 3, cfg.block_n - 1
    sizes = {"N": n_q, "M": n_k}
    shape = tuple(sizes.get(s, s) for s in shape)
    q, k, v = _qkv(torch.float32, kernel_device, seed=80, n_q=n_q, n_k=n_k)
    mask = _mask(shape, kind, kernel_device, seed=81, requires_grad=False)
    if shape[-2] != 1:
        with torch.no_grad():
            mask[..., 2, :] = False if kind == "bool" else float("-inf")  # a row that sees no key
    launched = record_launches(monkeypatch, ("short", "dq", "dkdv"))
    result = _run("triton", q, k, v, attn_mask=mask, causal=causal)
    assert launched == ["short"]
    for t in (result[0], *result[3]):
        assert not torch.isnan(t).any()
    _check(q, k, v, result, attn_mask=mask, causal=causal)
    if kind == "float":
        launched.clear()
        _run("triton", q, k, v, attn_mask=mask.requires_grad_(True), causal=causal)
        assert "short" not in launched


@kernel_test
@pytest.mark.parametrize("kind", [None, "bool", "float", "key-padding"])
def test_kernel_short_sequences_take_64_row_tiles(kernel_device, kind, monkeypatch):
    """Up to 64 query rows (Swin's 7 x 7 windows, N = 49) the forward swaps 128-row tiles on 8 warps
    for one warpgroup's 64 rows (short_query_config), plain or masked, and gives the reference's
    answers through those tiles."""
    from fastvit.kernels import flash_attention as kernels

    if not ON_GPU:  # the interpreter's own tiles are small: give the launcher the 128-row ones to swap
        monkeypatch.setattr(kernels, "fwd_config", lambda *a, **kw: kernels.AttentionConfig(128, 64, 8, 2, key_tail=32))
        monkeypatch.setattr(kernels, "fwd_mask_config", lambda *a, **kw: kernels.AttentionConfig(128, 64, 8, 2))
    taken = []
    original = kernels.short_query_config

    def spy(*args, **kwargs):
        cfg = original(*args, **kwargs)
        taken.append(cfg)
        return cfg

    monkeypatch.setattr(kernels, "short_query_config", spy)
    n = 49
    q, k, v = _qkv(torch.float16, kernel_device, seed=16, n_q=n, n_k=n)
    mask = None
    if kind == "key-padding":
        mask = (torch.arange(n) < 40).view(1, 1, 1, n).expand(B, 1, 1, n).to(kernel_device)
    elif kind is not None:
        mask = _mask((1, H, n, n), kind, kernel_device, seed=17)
    result = _run("triton", q, k, v, attn_mask=mask)
    assert taken and taken[0].block_m == 64 and taken[0].num_warps == 4
    _check(q, k, v, result, attn_mask=mask)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_fp16(kernel_device, route, kind):
    """fp16 q, k, v with an fp16 bias (its gradient in fp16) or a bool mask."""
    q, k, v = _qkv(torch.float16, kernel_device, seed=7)
    mask = _mask((1, H, N, M), kind, kernel_device, seed=8, dtype=torch.float16)
    result = _run(route, q, k, v, attn_mask=mask)
    _check(q, k, v, result, attn_mask=mask)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("q_dtype,mask_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mask_dtype_differs_from_q(kernel_device, route, q_dtype, mask_dtype):
    """A float mask of another dtype than q (SDPA needs q's dtype: the torch route casts a copy);
    its gradient still reaches it in its own dtype and shape."""
    q, k, v = _qkv(q_dtype, kernel_device, seed=9)
    mask = _mask((B, 1, 1, M), "float", kernel_device, seed=10, dtype=mask_dtype)
    result = _run(route, q, k, v, attn_mask=mask)
    assert result[3][3].dtype == mask_dtype and result[3][3].shape == mask.shape
    _check(q, k, v, result, attn_mask=mask)


@kernel_test
def test_kernel_mask_gradient_is_deterministic_and_never_full_size(kernel_device, monkeypatch):
    """dBias of a (1, H, N, M) bias sums over the batch without an (B, H, N, M) buffer, and
    twice the same inputs give bit-identical gradients (no atomics)."""
    from fastvit.kernels import flash_attention as kernels

    sizes = []
    original = kernels.new_output

    def spy(shape, **kwargs):
        sizes.append(int(torch.Size(shape).numel()))
        return original(shape, **kwargs)

    monkeypatch.setattr(kernels, "new_output", spy)
    q, k, v = _qkv(torch.float16, kernel_device, seed=11)
    mask = _mask((1, H, N, M), "float", kernel_device, seed=12)
    rel_pos = _rel_pos(1, H, kernel_device, seed=13)
    grad_out = torch.ones(B, H, N, D, dtype=torch.float16, device=kernel_device)
    first = _run("triton", q, k, v, grad_out, attn_mask=mask, rel_pos=rel_pos)
    second = _run("triton", q, k, v, grad_out, attn_mask=mask, rel_pos=rel_pos)
    for a, b in zip(first[3], second[3], strict=True):
        assert torch.equal(a, b)
    assert sizes and max(sizes) < B * H * N * M


@kernel_test
@pytest.mark.parametrize("n_q,n_k,head_dim", [(40, 7, 32), (40, 3, 24)])
def test_kernel_fp32_mask_gradient_walk_normalises_its_rows(kernel_device, n_q, n_k, head_dim, monkeypatch):
    """A learnable fp32 mask over fewer keys than the dBias kernel's column tile: its walk computes dQ
    and delta = rowsum(P dP) from the tile. Its P, taken from lse, is off by a row-uniform factor
    (lse's rounding; the forward's scores rounded otherwise, as in the interpreter's dots), which
    that delta does not cancel: dS's rows no longer sum to 0, and dq, dk and dmask were 1.6-3.8x the
    tolerance budget (dk 3.6-3.8x). fp32 delta is divided by rowsum(P) there (``_tile_delta``): dk
    ~0.5x."""
    from fastvit.kernels import flash_attention as kernels

    gen = _gen(21)
    q = (torch.randn(2, 2, n_q, head_dim, generator=gen) * 4).to(kernel_device).requires_grad_(True)
    k, v = (torch.randn(2, 2, n_k, head_dim, generator=gen).to(kernel_device).requires_grad_(True) for _ in "kv")
    mask = torch.randn(n_q, n_k, generator=gen).to(kernel_device).requires_grad_(True)
    plans = []
    original = kernels.dbias_plan

    def spy(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(kernels, "dbias_plan", spy)
    _check(q, k, v, _run("triton", q, k, v, attn_mask=mask), attn_mask=mask)
    assert [plan.with_dq for plan in plans] == [True]


@kernel_test
def test_kernel_small_bias_under_many_batches_splits_its_gradient(kernel_device, monkeypatch):
    """Swin's case: a small learnable (1, H, 7, 7) table under many windows. The dBias kernel, one
    program per tile of the table's shape, splits the batches into chunks (more programs than tiles)
    and sums the chunks' partials after: the gradient matches the reference and is bit-identical
    from run to run."""
    from fastvit.kernels import flash_attention as kernels

    chunks = []
    original = kernels.dbias_batch_chunk

    def spy(b_loop, programs, sms):
        chunk = original(b_loop, programs, sms)
        chunks.append(-(-b_loop // chunk))
        return chunk

    monkeypatch.setattr(kernels, "dbias_batch_chunk", spy)
    windows, heads, n = 9, 2, 7
    gen = _gen(18)
    q, k, v = (torch.randn(windows, heads, n, D, generator=gen).to(kernel_device, torch.float16).requires_grad_(True)
               for _ in range(3))  # fmt: skip
    table = torch.randn(1, heads, n, n, generator=gen).to(kernel_device).requires_grad_(True)
    grad_out = torch.randn(windows, heads, n, D, generator=gen).to(kernel_device, torch.float16)
    first = _run("triton", q, k, v, grad_out, attn_mask=table)
    assert chunks and chunks[0] > 1, "the batches were not split"
    second = _run("triton", q, k, v, grad_out, attn_mask=table)
    assert torch.equal(first[3][3], second[3][3])
    _check(q, k, v, first, attn_mask=table)


@kernel_test
def test_kernel_bias_gradient_of_an_empty_batch(kernel_device):
    """A learnable (1, H, N, M) table under an empty batch gets a zero gradient of its own shape (the
    dBias launcher's one chunk with nothing to sum), not an error."""
    q = torch.randn(0, H, N, D).to(kernel_device, torch.float16).requires_grad_(True)
    k, v = (torch.randn(0, H, M, D).to(kernel_device, torch.float16) for _ in range(2))
    table = _mask((1, H, N, M), "float", kernel_device, seed=19)
    with fastvit.backend("triton"):
        out = fastvit.flash_attention(q, k, v, attn_mask=table)
    (grad,) = torch.autograd.grad(out.sum(), table)
    assert grad.shape == table.shape and torch.equal(grad, torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------
# rel_pos: SAM / ViTDet decomposed relative position
# ---------------------------------------------------------------------------------------------
# (rel_h batch, rel_h heads, rel_w batch, rel_w heads): per sample and head (SAM computes them from
# q), shared by the batch, shared by everything, and rel_h and rel_w broadcast differently
REL_POS_PATTERNS = [(B, H, B, H), (1, H, 1, H), (1, 1, 1, 1), (B, H, 1, 1)]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("pattern", REL_POS_PATTERNS, ids=["BH", "1H", "11", "mixed"])
def test_rel_pos_broadcast_patterns(kernel_device, route, pattern):
    q, k, v = _qkv(torch.float32, kernel_device, seed=14)
    rel_h = _rel_pos(pattern[0], pattern[1], kernel_device, seed=15)[0]
    rel_w = _rel_pos(pattern[2], pattern[3], kernel_device, seed=16)[1]
    result = _run(route, q, k, v, rel_pos=(rel_h, rel_w))
    assert result[3][3].shape == rel_h.shape and result[3][4].shape == rel_w.shape
    _check(q, k, v, result, rel_pos=(rel_h, rel_w))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_rel_pos_with_mask_and_causal(kernel_device, route, kind):
    """rel_pos plus an attn_mask (added / applied together), with causal, and a dead row."""
    q, k, v = _qkv(torch.float32, kernel_device, seed=17)
    mask = _mask((N, M), kind, kernel_device, seed=18, requires_grad=False)
    with torch.no_grad():
        mask[9] = False if kind == "bool" else float("-inf")
    mask.requires_grad_(kind == "float")
    rel_pos = _rel_pos(1, H, kernel_device, seed=19)
    result = _run(route, q, k, v, attn_mask=mask, rel_pos=rel_pos, causal=True)
    assert torch.isneginf(result[1][:, :, 9]).all()
    _check(q, k, v, result, attn_mask=mask, rel_pos=rel_pos, causal=True)


@pytest.mark.parametrize("route", ROUTES)
def test_rel_pos_equals_its_materialised_bias(kernel_device, route):
    """rel_pos computed in the kernels gives what the same route gives with the (B, H, N, M) bias
    materialised and passed as attn_mask, gradients of the tables included."""
    q, k, v = _qkv(torch.float32, kernel_device, seed=32)
    rel_h, rel_w = _rel_pos(1, H, kernel_device, seed=33)
    grad_out = torch.randn(B, H, N, D, generator=_gen(34)).to(kernel_device)
    decomposed = _run(route, q, k, v, grad_out, rel_pos=(rel_h, rel_w), causal=True)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # (1, H, N, kh * kw)
    with fastvit.backend(route):
        out = fastvit.flash_attention(q, k, v, attn_mask=bias, causal=True)
    materialised = torch.autograd.grad(out, (q, k, v, rel_h, rel_w), grad_out)
    torch.testing.assert_close(decomposed[0], out, rtol=1e-5, atol=1e-5)
    for a, b in zip(decomposed[3], materialised, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("route", ROUTES)
def test_rel_pos_fp16(kernel_device, route):
    q, k, v = _qkv(torch.float16, kernel_device, seed=20)
    rel_pos = _rel_pos(B, H, kernel_device, seed=21, dtype=torch.float16)
    result = _run(route, q, k, v, rel_pos=rel_pos)
    _check(q, k, v, result, rel_pos=rel_pos)


@kernel_test
@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(N, M), (M,)], ids=["tiles", "key-padding"])
def test_kernel_bool_mask_ignores_non_finite_scores_at_masked_keys(kernel_device, dtype, shape):
    """In the kernels a key that a bool mask hides scores -inf whatever q k^T is there: NaN and inf
    in a masked key's k leave its rows finite and equal to the reference's (q k^T + -inf alone would
    be NaN), with the mask read as (rows, keys) tiles or as one row of keys (key padding). The torch
    route gives NaN there, as SDPA does: it adds a bool mask as a -inf bias."""
    route = "triton"
    q, k, v = _qkv(dtype, kernel_device, seed=70)
    with torch.no_grad():
        k[0, 1, 4] = float("nan")
        k[1, 2, 6] = float("inf")
    mask = torch.ones(shape, dtype=torch.bool)
    mask[..., 4] = False
    mask[..., 6] = False
    with fastvit.backend(route), torch.no_grad():
        out = fastvit.flash_attention(q, k, v, attn_mask=mask.to(kernel_device))
    expected, _ = reference.attention(*(t.detach().double().cpu() for t in (q, k, v)), attn_mask=mask)
    lowp, _ = reference.attention(*(t.detach().cpu().to(dtype) for t in (q, k, v)), attn_mask=mask)
    assert torch.isfinite(out).all()
    assert_close_to_reference(out.cpu(), expected, lowp, name="out", dtype=dtype)


@kernel_test
@pytest.mark.parametrize("mask_shape", [(1, H, N, M), (H, N, 1)], ids=["per-head", "keys-broadcast"])
def test_kernel_rel_pos_by_mma_with_mask_gradient(kernel_device, mask_shape, monkeypatch):
    """16-bit rel_pos tables in q's dtype take the selection-matrix dots (REL_POS_MMA) in the forward,
    dK/dV, dQ and dBias (per tile, and summed over the key columns), with a non-square 5 x 7 grid
    (neither a power of two nor a divisor of a block), causal, and a float mask that needs grad;
    the same tables in fp32 with 16-bit q keep the gathers and give the same answers (fp16: the
    interpreter's bf16 dots are wrong, so bf16 runs only on the GPU)."""
    from fastvit.kernels import flash_attention as kernels

    seen = []
    real = kernels.rel_pos_by_mma
    monkeypatch.setattr(kernels, "rel_pos_by_mma",
                        lambda *a, **kw: seen.append((kw.get("forward", False), real(*a, **kw))) or seen[-1][1])
    dtype = torch.float16
    q, k, v = _qkv(dtype, kernel_device, seed=50)
    mask = _mask(mask_shape, "float", kernel_device, seed=51)
    for table_dtype in (dtype, torch.float32):
        rel_pos = _rel_pos(1, H, kernel_device, seed=52, dtype=table_dtype)
        result = _run("triton", q, k, v, attn_mask=mask, rel_pos=rel_pos, causal=True)
        _check(q, k, v, result, attn_mask=mask, rel_pos=rel_pos, causal=True)
    assert seen == [(True, True), (False, True), (True, False), (False, False)]


@kernel_test
@pytest.mark.parametrize(("kh", "kw", "dots"), [(3, 20, (True, True)), (2, 70, (False, False))],
                         ids=["32-bins-dots", "over-64-bins-gathers"])
def test_kernel_rel_pos_wide_grids(kernel_device, kh, kw, dots, monkeypatch):
    """A key grid wider than 16 bins: up to 64 the forward takes the selection-matrix dots, and so
    do dK/dV and dQ on Hopper up to D = 64 (the interpreter stands for sm_90) while the dBias kernel
    gathers; past 64 bins everything gathers. Causal, a float mask that needs grad, a fully masked
    row (fp16: the interpreter's bf16 dots are wrong)."""
    from fastvit.kernels import flash_attention as kernels

    seen = []
    real = kernels.rel_pos_by_mma
    monkeypatch.setattr(kernels, "rel_pos_by_mma",
                        lambda *a, **kw: seen.append((kw.get("forward", False), real(*a, **kw))) or seen[-1][1])
    dtype, n_q = torch.float16, 37
    q, k, v = _qkv(dtype, kernel_device, seed=60, n_q=n_q, n_k=kh * kw)
    gen = _gen(61)
    rel_pos = tuple(torch.randn(1, H, n_q, n, generator=gen).to(kernel_device, dtype).requires_grad_(True)
                    for n in (kh, kw))
    mask = torch.randn(B, 1, n_q, kh * kw, generator=gen)
    mask[0, 0, 5] = float("-inf")
    mask = mask.to(kernel_device).requires_grad_(True)
    result = _run("triton", q, k, v, attn_mask=mask, rel_pos=rel_pos, causal=True)
    _check(q, k, v, result, attn_mask=mask, rel_pos=rel_pos, causal=True)
    assert seen == [(True, dots[0]), (False, dots[1])]


# interpreter only: on a GPU the launcher takes the descriptors for a float bias above D = 64 alone,
# and these tensors (D = 16) never qualify there
@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["float", "bool", "rel_pos"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_masked_tma_forward(kernel_device, kind, causal, tma_forward):
    """The masked forward with Q, K, V and out moved by tensor descriptors (Hopper's TMA; on a GPU
    only a float bias above D = 64 takes it, the interpreter runs every mask through it when asked):
    the gathers' clamped rows and the key tail, with a fully masked row."""
    q, k, v = _qkv(torch.float16, kernel_device, seed=40)
    mask = rel_pos = None
    if kind == "rel_pos":
        rel_pos = _rel_pos(B, 1, kernel_device, seed=41, dtype=torch.float16)
    else:
        mask = _mask((1, H, N, M), kind, kernel_device, seed=42, dtype=torch.float16, requires_grad=False)
        with torch.no_grad():
            mask[:, :, 5] = False if kind == "bool" else float("-inf")
        mask.requires_grad_(kind == "float")
    result = _run("triton", q, k, v, attn_mask=mask, rel_pos=rel_pos, causal=causal)
    assert tma_forward
    if mask is not None:
        assert torch.isneginf(result[1][:, :, 5]).all()
    _check(q, k, v, result, attn_mask=mask, rel_pos=rel_pos, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_torch_route_blocks_of_rows(monkeypatch, causal):
    """The torch route's row blocks (here 4 rows: 9 blocks for N = 33, the last one short) give the
    reference's answers, with causal rows offset by the block start and the checkpointed rel_pos."""
    from fastvit.ops import flash_attention as op

    monkeypatch.setattr(op, "TORCH_ROUTE_BLOCK_ELEMENTS", B * H * M * 4)
    q, k, v = _qkv(torch.float32, "cpu", seed=22)
    mask = _mask((B, 1, N, M), "float", "cpu", seed=23)
    rel_pos = _rel_pos(B, 1, "cpu", seed=24)
    result = _run("torch", q, k, v, attn_mask=mask, rel_pos=rel_pos, causal=causal)
    _check(q, k, v, result, attn_mask=mask, rel_pos=rel_pos, causal=causal)


# ---------------------------------------------------------------------------------------------
# custom ops: opcheck and torch.compile with a mask and rel_pos
# ---------------------------------------------------------------------------------------------
@kernel_test
def test_kernel_masked_opcheck(kernel_device):
    """Schema, fake tensors, autograd and AOT dispatch of the custom ops with the optional tensors."""
    gen = _gen(25)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(kernel_device) for n in (9, 12, 12))
    bias = torch.randn(1, 2, 9, 12, generator=gen).to(kernel_device).requires_grad_(True)
    keep = (torch.rand(1, 1, 1, 12, generator=gen) > 0.3).to(kernel_device)
    rel_h = torch.randn(1, 2, 9, 3, generator=gen).to(kernel_device).requires_grad_(True)
    rel_w = torch.randn(1, 1, 9, 4, generator=gen).to(kernel_device).requires_grad_(True)
    fwd, bwd = torch.ops.fastvit.flash_attention_fwd.default, torch.ops.fastvit.flash_attention_bwd.default
    with fastvit.backend("triton"):
        for masks in ((bias, None, None), (keep, rel_h, rel_w), (bias, rel_h, rel_w)):
            torch.library.opcheck(fwd, (q, k, v, 0.25, True, *masks))
        out, lse = fwd(q, k, v, 0.25, False, bias.detach(), rel_h.detach(), rel_w.detach())
        args = (torch.randn_like(out), q, k, v, out, lse, 0.25, False, bias.detach(), rel_h.detach(),
                rel_w.detach(), True, True)
        torch.library.opcheck(bwd, args)


@kernel_test
def test_kernel_masked_under_torch_compile(kernel_device):
    q, k, v = _qkv(torch.float32, kernel_device, seed=26)
    mask = _mask((1, H, N, M), "float", kernel_device, seed=27)
    rel_pos = _rel_pos(1, H, kernel_device, seed=28)

    def block(q, k, v, mask, rel_h, rel_w):
        out = fastvit.flash_attention(q * 1.5, k, v, attn_mask=mask * 0.5, rel_pos=(rel_h, rel_w))
        return out.square().sum()

    assert_compiled_matches_eager(block, (q, k, v, mask, *rel_pos), "triton")


# ---------------------------------------------------------------------------------------------
# Bad masks: errors naming attn_mask / rel_pos, with what they got and what they need
# ---------------------------------------------------------------------------------------------
def _bad_call(**overrides):
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 6, 16), torch.randn(2, 3, 6, 16)
    kwargs = {"attn_mask": None, "rel_pos": None, **overrides}
    fastvit.flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "overrides,error,pattern",
    [
        ({"attn_mask": torch.ones(1, 2, 3, 5, 6, dtype=torch.bool)}, ValueError,
         r"attn_mask must have at most 4 dimensions.*\(1, 2, 3, 5, 6\)"),
        ({"attn_mask": torch.ones(5, 7)}, ValueError,
         r"attn_mask of shape \(5, 7\) is not broadcastable to \(B, H, N, M\) = \(2, 3, 5, 6\)"),
        ({"attn_mask": torch.ones(2, 4, 5, 6)}, ValueError, r"attn_mask of shape \(2, 4, 5, 6\) is not broadcastable"),
        ({"attn_mask": torch.ones(3, 2, 6)}, ValueError, r"attn_mask of shape \(3, 2, 6\) is not broadcastable"),
        ({"attn_mask": torch.ones(5, 6, dtype=torch.int32)}, TypeError, r"attn_mask must be bool .*got dtype int32"),
        ({"attn_mask": torch.ones(5, 6, dtype=torch.uint8)}, TypeError, r"attn_mask must be bool .*got dtype uint8"),
        ({"attn_mask": torch.ones(5, 6, device="meta")}, ValueError, r"attn_mask must be on q's device cpu, got meta"),
        ({"attn_mask": [[True]]}, TypeError, r"attn_mask must be a torch.Tensor or None, got list"),
        ({"rel_pos": (torch.randn(2, 3, 5, 2), torch.randn(2, 3, 5, 4))}, ValueError,
         r"rel_pos needs M == kh \* kw.*kh \* kw = 8, M = 6"),
        ({"rel_pos": (torch.randn(2, 3, 4, 2), torch.randn(2, 3, 5, 3))}, ValueError,
         r"rel_pos rel_h must have shape \(B\|1, H\|1, N, k\).*got \(2, 3, 4, 2\)"),
        ({"rel_pos": (torch.randn(2, 2, 5, 2), torch.randn(2, 3, 5, 3))}, ValueError, r"rel_pos rel_h must have shape"),
        ({"rel_pos": (torch.randn(2, 3, 5, 2), torch.randn(3, 5, 3))}, ValueError,
         r"rel_pos rel_w must have 4 dimensions.*\(3, 5, 3\)"),
        ({"rel_pos": (torch.ones(2, 3, 5, 2, dtype=torch.int64), torch.randn(2, 3, 5, 3))}, TypeError,
         r"rel_pos rel_h must have dtype in .*got int64"),
        ({"rel_pos": (torch.randn(2, 3, 5, 2), torch.randn(2, 3, 5, 3, device="meta"))}, ValueError,
         r"rel_pos rel_w must be on q's device cpu, got meta"),
        ({"rel_pos": torch.randn(2, 3, 5, 6)}, TypeError, r"rel_pos must be a pair \(rel_h, rel_w\).*got Tensor"),
    ],
)
def test_bad_masks(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _bad_call(**overrides)


def test_bad_masks_are_rejected_before_any_route():
    """Validation does not depend on the backend: the Triton route rejects the same inputs."""
    with fastvit.backend("triton"), pytest.raises(ValueError, match="attn_mask of shape"):
        _bad_call(attn_mask=torch.ones(2, 3, 5, 5))


# ---------------------------------------------------------------------------------------------
# The block shapes the GPU launchers pick with masks (not only the small interpreter tiles)
# ---------------------------------------------------------------------------------------------
def _mask_configs(kernels, monkeypatch):
    """Every distinct (forward, dK/dV, dQ, dBias) configuration over architectures, dtypes and
    padded head dims, with and without the rel_pos gradients, with (rows, keys) and key-padding masks."""
    monkeypatch.setattr(kernels, "INTERPRETER", False)
    found = {"fwd": set(), "bwd": set(), "dbias": set(), "dbias_dq": set()}
    for arch in (80, 86, 89, 90, 100, 120):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for pad in (16, 32, 64, 128):
                for bins in (0, 16, 32, 64):
                    found["fwd"].add(kernels.fwd_mask_config(arch, dtype, pad, rel_pos_mma_bins=bins))
                found["fwd"].add(kernels.fwd_mask_config(arch, dtype, pad, rel_pos_gathers=True))
                for float_bias in (False, True):
                    for key_padding in (False, True):
                        cfg = kernels.fwd_mask_config(arch, dtype, pad, float_bias=float_bias, key_padding=key_padding)
                        found["fwd"].add(cfg)
                        if kernels.takes_short_tiles(cfg, kernels.SHORT_QUERIES, pad, rel_pos=False):
                            found["fwd"].add(kernels.short_query_config(cfg, arch, float_bias=float_bias))
                for rel_pos_grad in (False, True):
                    found["bwd"].add(kernels.bwd_mask_configs(arch, dtype, pad, rel_pos_grad))
                    for bins in (16, 64):  # rel_pos by selection-matrix dots
                        found["bwd"].add(kernels.bwd_mask_configs(arch, dtype, pad, rel_pos_grad, rel_pos_mma=True,
                                                                  rel_pos_bins=bins))  # fmt: skip
                for key_padding, bool_mask, causal in itertools.product((False, True), repeat=3):
                    found["bwd"].add(kernels.bwd_mask_configs(arch, dtype, pad, False, rel_pos=False,
                                                              key_padding=key_padding, bool_mask=bool_mask,
                                                              causal=causal))  # fmt: skip
                for rel_pos in (False, True):
                    found["dbias"].add(kernels.dbias_config(dtype, pad, rel_pos, arch=arch))
                found["dbias"].add(kernels.dbias_config(dtype, pad, arch=arch, tile_walk=True))
                found["dbias_dq"].add(kernels.dbias_dq_config(arch, dtype, pad))
    monkeypatch.setattr(kernels, "INTERPRETER", True)
    return {name: sorted(configs, key=str) for name, configs in found.items()}


def test_mask_block_size_rules_hold_for_every_config(monkeypatch):
    """The causal diagonal split needs the forward's BLOCK_M % BLOCK_N == 0 and the backward's
    block_n % block_m == 0 (in both passes); tl.dot needs 16."""
    from fastvit.kernels import flash_attention as kernels

    configs = _mask_configs(kernels, monkeypatch)
    for fwd in configs["fwd"]:
        assert fwd.block_m % fwd.block_n == 0 and min(fwd.block_m, fwd.block_n) >= 16, fwd
    for pair in configs["bwd"]:
        for bwd in pair:
            assert bwd.block_n % bwd.block_m == 0 and min(bwd.block_m, bwd.block_n) >= 16, pair
    for dbias in configs["dbias"] + configs["dbias_dq"]:
        assert min(dbias.block_m, dbias.block_n) >= 16, dbias


def _distinct_tilings(configs: list) -> list:
    """The first of each group of configurations (or dK/dV, dQ pairs) that differ only in what the
    interpreter does not run: warps, pipeline stages and the register cap are launch options, and
    lazy rescaling (which reads the warps) is 16-bit only, so the fp32 test below runs each tiling
    once (about half the configurations)."""
    def tiling(cfg):
        if isinstance(cfg, tuple):
            return tuple(tiling(c) for c in cfg)
        return cfg.block_m, cfg.block_n, cfg.key_tail, cfg.tma, cfg.row_split

    first: dict = {}
    for cfg in configs:
        first.setdefault(tiling(cfg), cfg)
    return list(first.values())


@kernel_test
def test_kernel_mask_production_block_shapes(kernel_device, monkeypatch):
    """Each production configuration of the masked kernels (forward, dK/dV, dQ with the rel_pos
    reduction, dBias with unequal tiles) gives the reference's answers: causal, N != M, a masked
    head dim, a float bias summed over the batch and rel_pos shared by the batch; then each dBias
    tiling with the bias alone (its flat walk over the (batch, head) pairs, TILE_WALK), and each
    tiling of that walk with dQ (WITH_DQ: fewer keys than its column tile), and with dK and dV too
    (WITH_DKDV: fewer queries than its row tile as well)."""
    if ON_GPU:
        pytest.skip("on a GPU the production shapes are what every test runs")
    from fastvit.kernels import flash_attention as kernels

    configs = {name: _distinct_tilings(found) for name, found in _mask_configs(kernels, monkeypatch).items()}
    runs = max(len(c) for c in configs.values())
    gen = _gen(29)
    n_q, n_k = 150, 70  # 70 keys = a 7 x 10 grid
    q, k, v = (torch.randn(2, 1, n, 40, generator=gen).to(kernel_device).requires_grad_(True)
               for n in (n_q, n_k, n_k))
    bias = torch.randn(1, 1, n_q, n_k, generator=gen).to(kernel_device).requires_grad_(True)
    rel_pos = tuple(torch.randn(1, 1, n_q, n, generator=gen).to(kernel_device).requires_grad_(True) for n in (7, 10))
    for i in range(runs):
        fwd = configs["fwd"][i % len(configs["fwd"])]
        bwd = configs["bwd"][i % len(configs["bwd"])]
        dbias = configs["dbias"][i % len(configs["dbias"])]
        monkeypatch.setattr(kernels, "fwd_mask_config", lambda *a, fwd=fwd, **kw: fwd)
        monkeypatch.setattr(kernels, "bwd_mask_configs", lambda *a, bwd=bwd, **kw: bwd)
        monkeypatch.setattr(kernels, "dbias_config", lambda *a, dbias=dbias, **kw: dbias)
        result = _run("triton", q, k, v, attn_mask=bias, rel_pos=rel_pos, causal=True)
        _check(q, k, v, result, attn_mask=bias, rel_pos=rel_pos, causal=True)
    for dbias in configs["dbias"]:  # the bias alone: the dBias kernel's flat (batch, head) walk
        monkeypatch.setattr(kernels, "dbias_config", lambda *a, dbias=dbias, **kw: dbias)
        result = _run("triton", q, k, v, attn_mask=bias)
        _check(q, k, v, result, attn_mask=bias)
    # ... with dQ: every key in one column tile (no dQ pass); and with dK and dV where every query is in
    # one row tile too (no dK/dV pass either); causal too
    for with_dq in configs["dbias_dq"]:
        monkeypatch.setattr(kernels, "dbias_dq_config", lambda *a, cfg=with_dq, **kw: cfg)
        keys = min(n_k, with_dq.block_n - 3)
        for rows, causal in ((n_q, False), (with_dq.block_m - 5, True)):
            qs, ks, vs, table = q[:, :, :rows], k[:, :, :keys], v[:, :, :keys], bias[:, :, :rows, :keys]
            result = _run("triton", qs, ks, vs, attn_mask=table, causal=causal)
            _check(qs, ks, vs, result, attn_mask=table, causal=causal)


def test_aot_specs_cover_the_mask_variants_with_every_argument():
    """The ahead-of-time list holds, per architecture, the forward with a float bias, a bool mask
    and rel_pos, the backward with a bias and rel_pos (dQ with the rel_pos gradients) and the dBias
    kernel; every spec names its kernel's arguments in order (a drifted signature would only show
    as a compile error in the slow static report)."""
    from fastvit.kernels import flash_attention as kernels
    from fastvit.kernels.aot import ARCHS

    specs = kernels.aot_specs()
    for spec in specs:
        fn = getattr(kernels, spec.kernel.split(".")[-1])
        assert list(spec.signature) == list(fn.arg_names), spec.config
        constexprs = [n for n, ty in spec.signature.items() if ty == "constexpr"]
        assert set(constexprs) <= set(spec.constexprs), (spec.config, set(constexprs) - set(spec.constexprs))
    for arch in ARCHS:
        flags = [(s.kernel.split(".")[-1], s.constexprs) for s in specs if s.arch == arch]
        assert any(k == "flash_attention_fwd_kernel" and c["HAS_BIAS"] and not c["BIAS_BOOL"] for k, c in flags)
        assert any(k == "flash_attention_fwd_kernel" and c["BIAS_BOOL"] for k, c in flags)
        assert any(k == "flash_attention_fwd_kernel" and c["HAS_REL_POS"] for k, c in flags)
        assert any(k == "flash_attention_bwd_dkdv_kernel" and c["HAS_BIAS"] and c["HAS_REL_POS"] for k, c in flags)
        assert any(k == "flash_attention_bwd_dq_kernel" and c.get("REL_POS_GRAD") for k, c in flags)
        assert {c["ROWS_BCAST"] for k, c in flags if k == "flash_attention_bwd_dbias_kernel"} == {False, True}



def test_aot_mask_specs_compile_the_tiles_the_launchers_pick(monkeypatch):
    """For each mask kind (a float bias or a bool mask; (rows, keys) tiles or key padding) the
    report's forward, dK/dV and dQ rows compile the configurations the launchers take for it (the
    bool rows once compiled the float bias's backward tiles), so the figures describe what runs."""
    from fastvit.kernels import flash_attention as kernels
    from fastvit.kernels.aot import ARCHS

    monkeypatch.setattr(kernels, "INTERPRETER", False)  # the report's configurations, not the interpreter's
    specs = kernels.aot_specs()

    def tiles(spec):
        c = spec.constexprs
        return (c["BLOCK_M"], c["BLOCK_N"], spec.num_warps, spec.num_stages, spec.max_registers,
                c.get("BLOCK_TAIL"), c.get("SPLIT_ROWS"))  # fmt: skip

    checked = 0
    for arch, dtype, head_dim in itertools.product(ARCHS, kernels._MASK_AOT_DTYPES, kernels._MASK_AOT_HEAD_DIMS):
        pad = kernels.head_dim_padded(head_dim)
        for bool_mask, key_padding in itertools.product((False, True), repeat=2):
            fwd = kernels.fwd_mask_config(arch, dtype, pad, float_bias=not bool_mask, key_padding=key_padding)
            dkdv, dq = kernels.bwd_mask_configs(arch, dtype, pad, False, rel_pos=False, key_padding=key_padding,
                                                bool_mask=bool_mask)  # fmt: skip
            expected = {
                "flash_attention_fwd_kernel": (fwd.block_m, fwd.block_n, fwd.num_warps, fwd.num_stages,
                                               fwd.max_registers, fwd.key_tail, None),
                "flash_attention_bwd_dkdv_kernel": (dkdv.block_m, dkdv.block_n, dkdv.num_warps, dkdv.num_stages,
                                                    dkdv.max_registers, None, dkdv.row_split),
                "flash_attention_bwd_dq_kernel": (dq.block_n, dq.block_m, dq.num_warps, dq.num_stages,
                                                  dq.max_registers, None, None),
            }  # fmt: skip
            for spec in specs:
                c, kernel = spec.constexprs, spec.kernel.split(".")[-1]
                if (spec.arch, c.get("HEAD_DIM"), kernel) != (arch, head_dim, kernel) or kernel not in expected:
                    continue
                if spec.signature["Q"] != f"*{'bf16' if dtype == torch.bfloat16 else 'fp32'}":
                    continue
                if not c.get("HAS_BIAS") or c.get("HAS_REL_POS") or c.get("USE_TMA") or " short" in spec.config:
                    continue
                if (c["BIAS_BOOL"], c.get("BIAS_ROWS_BCAST", False)) != (bool_mask, key_padding):
                    continue
                assert tiles(spec) == expected[kernel], (spec.arch, spec.kernel, spec.config)
                checked += 1
    assert checked >= len(ARCHS) * len(kernels._MASK_AOT_HEAD_DIMS) * 4 * 3
