"""fastvit.window_attention and fastvit.nn.WindowAttention against the masked-attention definition.

The oracle is ``fastvit.reference.window_attention`` (an explicit (N, N) mask over all tokens) in
float64; the error budget is the same reference run in the input dtype (tests/tolerance.py). An
eager transcription of Swin's W-MSA / SW-MSA (roll, window partition, img_mask regions) checks
that the definition is Swin's where Swin defines it. Every route of ``flash_attention`` is run:
``torch`` (SDPA) and ``triton`` (the interpreter on CPU, compiled on a GPU).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from fastvit import reference
from fastvit.ops import window_attention as window_attention_module
from tests.compile_check import assert_compiled_matches_eager
from tests.launches import record_launches
from tests.tolerance import assert_close_to_reference

ON_GPU = torch.cuda.is_available()
kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu

# (batch, heads, grid, window, shift, prefix, head_dim), each awkward in its own way
SHAPES = [
    (2, 2, (4, 4), 2, 0, 0, 16),  # windows tile the grid, no shift: no mask at all
    (1, 3, (4, 6), 2, 1, 1, 16),  # tiled, shifted: the region mask, behind a cls token
    (2, 1, (5, 7), 3, 0, 2, 16),  # padded (5 x 7 -> 6 x 9), no shift: the key-validity mask, cls + register
    (1, 2, (5, 7), (3, 4), (1, 0), 1, 16),  # padded, rectangular window, shifted along the rows only
    (1, 1, (3, 3), 4, 2, 0, 32),  # one window larger than the grid: padded on both sides, shifted
    (1, 2, (5, 5), 3, 2, 1, 16),  # the seam (row 5 - 2 = 3) runs along a window border: padding mask only
]
SHAPE_IDS = ["tiled", "tiled-shift-cls", "padded-2prefix", "padded-rect-shift", "window>grid", "seam-on-border"]


def make_qkv(batch, heads, n, dim, dtype, device="cpu", *, packed=False, seed=0):
    """Random q, k, v (B, H, N, D); packed: views of one (B, N, 3, H, D) qkv, as timm makes them."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(batch, n, 3, heads, dim, generator=gen).to(device, dtype)
        return [t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]
    return [torch.randn(batch, heads, n, dim, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]


def leaf_copies(tensors, dtype):
    return [t.detach().cpu().to(dtype).requires_grad_() for t in tensors]


def check_against_reference(q, k, v, grid, window, grad_out, *, route, shift=0, prefix=0, **kwargs):
    """Forward and gradients on ``route`` against the float64 reference, budget from the input dtype."""
    dtype = q.dtype
    with fastvit.backend(route):
        out = fastvit.window_attention(q, k, v, grid, window, shift=shift, num_prefix_tokens=prefix, **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.dtype == dtype and out.shape == q.shape
    pairs = dict(
        grid=grid,
        window=window_attention_module.int_pair("window", window),
        shift=window_attention_module.int_pair("shift", shift),
    )
    results = {}
    for ref_dtype in (torch.float64, dtype):
        rq, rk, rv = leaf_copies((q, k, v), ref_dtype)
        ref = reference.window_attention(rq, rk, rv, **pairs, num_prefix_tokens=prefix, **kwargs)
        ref_grads = torch.autograd.grad(ref, (rq, rk, rv), grad_out.detach().cpu().to(ref_dtype))
        results[ref_dtype] = (ref, *ref_grads)
    for name, actual, oracle, lowp in zip(
        ("out", "dq", "dk", "dv"), (out, *grads), results[torch.float64], results[dtype], strict=True
    ):
        assert_close_to_reference(actual.detach().cpu(), oracle, lowp, name=name, dtype=dtype)


def run_shape(batch, heads, grid, window, shift, prefix, dim, dtype, device, route):
    n = prefix + grid[0] * grid[1]
    q, k, v = make_qkv(batch, heads, n, dim, dtype, device, seed=n)
    grad_out = torch.randn(batch, heads, n, dim, generator=torch.Generator().manual_seed(n + 1)).to(device, dtype)
    check_against_reference(q, k, v, grid, window, grad_out, route=route, shift=shift, prefix=prefix)


# ---------------------------------------------------------------------------------------------
# torch route (SDPA under flash_attention)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, heads, grid, window, shift, prefix, dim", SHAPES, ids=SHAPE_IDS)
def test_torch_route_matches_the_definition(batch, heads, grid, window, shift, prefix, dim, dtype):
    run_shape(batch, heads, grid, window, shift, prefix, dim, dtype, "cpu", "torch")


# ---------------------------------------------------------------------------------------------
# triton route (bf16 is left out: the interpreter's tl.dot on bf16 is wrong upstream)
# ---------------------------------------------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, heads, grid, window, shift, prefix, dim", SHAPES, ids=SHAPE_IDS)
def test_triton_route_matches_the_definition(kernel_device, batch, heads, grid, window, shift, prefix, dim, dtype):
    run_shape(batch, heads, grid, window, shift, prefix, dim, dtype, kernel_device, "triton")


@kernel_test
@pytest.mark.parametrize("shift", [0, 2])
def test_window_backward_is_one_launch(kernel_device, shift, monkeypatch):
    """Windows that fit the short backward's tile (4 x 4 in the interpreter's 16 x 16 tiles, Swin's 7 x 7
    on a GPU) take it: one launch for the gradients of every window (with the shifted windows' region
    mask), no dQ or dK/dV pass."""
    launched = record_launches(monkeypatch, ("short", "dq", "dkdv"))
    window = 7 if ON_GPU else 4
    grid = (2 * window, 2 * window)
    n = grid[0] * grid[1]
    q, k, v = make_qkv(2, 2, n, 16, torch.float16, kernel_device, seed=n + shift)
    grad_out = torch.randn(2, 2, n, 16, generator=torch.Generator().manual_seed(3)).to(kernel_device, torch.float16)
    check_against_reference(q, k, v, grid, window, grad_out, route="triton", shift=shift)
    assert launched == ["short"]


@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=kernel_test)])
def test_views_of_packed_qkv_and_an_expanded_grad_output(route, kernel_device):
    # the layout timm hands over (strided views, no copies) and out.sum()'s stride-0 gradient,
    # on a padded, shifted grid behind a cls token
    device = kernel_device if route == "triton" else "cpu"
    grid, prefix = (5, 6), 1
    q, k, v = make_qkv(2, 2, prefix + 30, 16, torch.float32, device, packed=True, seed=11)
    assert not q.is_contiguous()
    grad_out = torch.ones(1, device=device).expand(q.shape)
    check_against_reference(q, k, v, grid, 4, grad_out, route=route, shift=(2, 1), prefix=prefix)


def test_custom_scale():
    torch.manual_seed(2)
    q, k, v = make_qkv(1, 2, 1 + 12, 16, torch.float32)
    check_against_reference(q, k, v, (3, 4), 2, torch.randn_like(q), route="torch", shift=1, prefix=1, scale=0.3)


# ---------------------------------------------------------------------------------------------
# the definition, checked from the outside
# ---------------------------------------------------------------------------------------------
def swin_window_attention(q, k, v, grid, window, shift):
    """Swin's W-MSA / SW-MSA as its reference code writes it (grids that are multiples of the
    window, no prefix tokens): roll by -shift, partition, the img_mask region labels from three
    slices per axis, masked softmax per window, reverse the partition, roll back."""
    batch, heads, _, dim = q.shape
    (gh, gw), ws, s = grid, window, shift

    def partition(t):  # (B, H, N, D) -> (B, H, nW, ws * ws, D)
        t = torch.roll(t.reshape(batch, heads, gh, gw, dim), shifts=(-s, -s), dims=(2, 3))
        t = t.reshape(batch, heads, gh // ws, ws, gw // ws, ws, dim).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(batch, heads, -1, ws * ws, dim)

    qw, kw, vw = (partition(t) for t in (q, k, v))
    scores = qw @ kw.transpose(-2, -1) * dim**-0.5
    if s > 0:
        img_mask = torch.zeros(gh, gw)
        label = 0
        for rows in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for cols in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img_mask[rows, cols] = label
                label += 1
        labels = img_mask.reshape(gh // ws, ws, gw // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        apart = labels[:, None, :] != labels[:, :, None]  # (nW, queries, keys)
        scores = scores.masked_fill(apart, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vw
    out = out.reshape(batch, heads, gh // ws, gw // ws, ws, ws, dim).permute(0, 1, 2, 4, 3, 5, 6)
    out = torch.roll(out.reshape(batch, heads, gh, gw, dim), shifts=(s, s), dims=(2, 3))
    return out.reshape(batch, heads, gh * gw, dim)


@pytest.mark.parametrize("grid, window, shift", [((8, 8), 4, 2), ((6, 9), 3, 1), ((4, 4), 2, 0)])
def test_is_swin_window_attention_where_swin_defines_it(grid, window, shift):
    q, k, v = make_qkv(2, 3, grid[0] * grid[1], 8, torch.float64, seed=3)
    with fastvit.backend("torch"):
        out = fastvit.window_attention(q, k, v, grid, window, shift=shift)
    torch.testing.assert_close(out, swin_window_attention(q, k, v, grid, window, shift))


def test_a_window_covering_the_grid_is_full_attention():
    # one 4 x 8 window over a 3 x 5 grid: all padding must be masked out to give plain attention
    q, k, v = make_qkv(1, 2, 1 + 15, 16, torch.float64, seed=4)
    with fastvit.backend("torch"):
        out = fastvit.window_attention(q, k, v, (3, 5), (4, 8), num_prefix_tokens=1)
    torch.testing.assert_close(out, reference.attention(q, k, v)[0])


def test_the_seam_keeps_wrapped_regions_apart():
    # 4 x 4 grid, 2 x 2 windows, shift 1: the rolled window at the bottom right holds the four
    # corners of the image, one per region, so each corner attends only to itself: out = v
    q, k, v = make_qkv(1, 2, 16, 8, torch.float64, seed=5)
    with fastvit.backend("torch"):
        out = fastvit.window_attention(q, k, v, (4, 4), 2, shift=1)
    corners = [0, 3, 12, 15]
    torch.testing.assert_close(out[:, :, corners], v[:, :, corners])


def test_prefix_tokens_attend_to_every_token_and_every_token_to_them():
    q, k, v = make_qkv(1, 2, 2 + 12, 8, torch.float64, seed=6)
    with fastvit.backend("torch"):
        out = fastvit.window_attention(q, k, v, (3, 4), 2, num_prefix_tokens=2)
        # a token's window is its 2 x 2 block: token (0, 0) sees grid tokens (0,0),(0,1),(1,0),(1,1)
        keys = [0, 1, 2, 3, 6, 7]  # the 2 prefix tokens, then those four (2 + r * 4 + c)
        expected = reference.attention(q[:, :, 2:3], k[:, :, keys], v[:, :, keys])[0]
    torch.testing.assert_close(out[:, :, :2], reference.attention(q[:, :, :2], k, v)[0])
    torch.testing.assert_close(out[:, :, 2:3], expected)


@pytest.mark.parametrize("shift", [0, 1])
def test_tokens_outside_a_window_do_not_change_its_outputs(shift):
    # 6 x 6 grid in 3 x 3 windows: change every token outside the (rolled) top-left window
    grid, window = (6, 6), 3
    q, k, v = (t.detach() for t in make_qkv(1, 2, 36, 8, torch.float64, seed=7))
    rows, cols = torch.arange(36) // 6, torch.arange(36) % 6
    inside = ((rows - shift) % 6 < 3) & ((cols - shift) % 6 < 3)
    q2, k2, v2 = (torch.where(inside[:, None], t, torch.randn_like(t)) for t in (q, k, v))
    with fastvit.backend("torch"):
        out = fastvit.window_attention(q, k, v, grid, window, shift=shift)
        out2 = fastvit.window_attention(q2, k2, v2, grid, window, shift=shift)
    assert torch.equal(out[:, :, inside], out2[:, :, inside])
    assert not torch.isclose(out[:, :, ~inside], out2[:, :, ~inside]).any()


def test_cost_is_window_local(monkeypatch):
    # every flash_attention call window_attention makes: its (queries x keys) and its mask size;
    # a 12 x 12 grid, 3 x 3 windows, shifted, with a cls token
    calls = []
    real = window_attention_module.flash_attention

    def recording(q, k, v, **kwargs):
        mask = kwargs.get("attn_mask")
        calls.append((q.shape, k.shape, None if mask is None else mask.numel()))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(window_attention_module, "flash_attention", recording)
    batch, heads, grid, window, prefix = 2, 3, (12, 12), 3, 1
    n = prefix + 144
    q, k, v = make_qkv(batch, heads, n, 8, torch.float32, seed=8)
    with fastvit.backend("torch"):
        fastvit.window_attention(q, k, v, grid, window, shift=1, num_prefix_tokens=prefix)
    (wq, wk, wmask), (pq, pk, pmask) = calls
    assert tuple(wq) == (16, batch * heads, 9, 8) and tuple(wk) == (16, batch * heads, 9 + prefix, 8)
    assert wmask == 16 * 9 * (9 + prefix)  # one (nW, 1, w^2, w^2 + P) mask, shared by batch and heads
    assert tuple(pq) == (batch, heads, prefix, 8) and tuple(pk) == (batch, heads, n, 8) and pmask is None
    scores = sum(qs[0] * qs[1] * qs[2] * ks[2] for qs, ks, _ in calls)
    assert scores == batch * heads * (144 * (9 + prefix) + prefix * n)  # O(N w^2), not N^2


def test_masks_only_where_needed():
    cpu = torch.device("cpu")
    layout = window_attention_module.window_layout
    assert layout((4, 4), (2, 2), (0, 0), 1, cpu).mask is None  # tiled, no shift
    assert layout((5, 4), (2, 2), (0, 0), 1, cpu).mask.shape == (6, 1, 1, 5)  # padded: key validity
    assert layout((4, 4), (2, 2), (1, 0), 0, cpu).mask.shape == (4, 1, 4, 4)  # a seam inside windows
    assert layout((5, 5), (3, 3), (2, 2), 0, cpu).mask.shape == (4, 1, 1, 9)  # seam on a border


def test_autocast_casts_like_sdpa():
    # timm's qk_norm gives fp32 q and k beside a bf16 v: autocast casts all three to bf16
    q, k = (t.detach() for t in make_qkv(1, 2, 1 + 16, 16, torch.float32, seed=9)[:2])
    v = torch.randn(1, 2, 1 + 16, 16, dtype=torch.bfloat16)
    with fastvit.backend("torch"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastvit.window_attention(q, k, v, (4, 4), 3, shift=1, num_prefix_tokens=1)
    assert out.dtype == torch.bfloat16
    args = dict(grid=(4, 4), window=(3, 3), shift=(1, 1), num_prefix_tokens=1)
    expected = reference.window_attention(q.double(), k.double(), v.double(), **args)
    lowp = reference.window_attention(q.bfloat16(), k.bfloat16(), v, **args)
    assert_close_to_reference(out, expected, lowp, name="out")


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grid, window, kwargs, error, match",
    [
        ((2, 3), 2, {"num_prefix_tokens": 1}, ValueError, r"expected 1 \+ 2 \* 3 = 7"),  # 6 tokens given
        ((2, 3), 2, {"num_prefix_tokens": -1}, ValueError, "num_prefix_tokens must be >= 0"),
        ((2, 3), 2, {"num_prefix_tokens": 1.0}, TypeError, "num_prefix_tokens must be an int"),
        ((0, 6), 2, {}, ValueError, "positive sides"),
        (6, 2, {}, TypeError, r"grid must be a pair of ints \(h, w\)"),
        ((2, 3), 0, {}, ValueError, r"window must be >= 1 along both axes, got 0"),
        ((2, 3), (2, 0), {}, ValueError, r"window must be >= 1 along both axes, got \(2, 0\)"),
        ((2, 3), 2.0, {}, TypeError, r"window must be an int or a pair of ints \(rows, cols\), got 2.0"),
        ((2, 3), (1, 2, 3), {}, TypeError, "window must be an int or a pair of ints"),
        ((2, 3), 2, {"shift": 2}, ValueError, r"shift must lie in \[0, window\).*got shift 2 for window \(2, 2\)"),
        ((2, 3), 2, {"shift": (0, -1)}, ValueError, r"shift must lie in \[0, window\)"),
        ((2, 3), 2, {"shift": True}, TypeError, "shift must be an int or a pair of ints"),
        ((2, 3), 2, {"scale": float("nan")}, TypeError, "scale must be a finite float"),
    ],
)
def test_bad_arguments_are_named(grid, window, kwargs, error, match):
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    with pytest.raises(error, match=match):
        fastvit.window_attention(q, k, v, grid, window, **kwargs)


def test_bad_tensors_are_named():
    q = torch.randn(1, 2, 7, 8)
    with pytest.raises(TypeError, match=r"q must be a torch\.Tensor"):
        fastvit.window_attention("q", q, q, (2, 3), 2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"q must have 4 dimensions \(batch, heads, tokens, head_dim\)"):
        fastvit.window_attention(q[0], q[0], q[0], (2, 3), 2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="k must have q's shape"):
        fastvit.window_attention(q, q[:, :1], q, (2, 3), 2, num_prefix_tokens=1)
    with pytest.raises(TypeError, match="same dtype"):
        fastvit.window_attention(q, q.double(), q, (2, 3), 2, num_prefix_tokens=1)
    with pytest.raises(TypeError, match="q must have dtype in"):
        fastvit.window_attention(q.int(), q.int(), q.int(), (2, 3), 2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="same device"):
        fastvit.window_attention(q, q.to("meta"), q, (2, 3), 2, num_prefix_tokens=1)
    strided = torch.randn(1, 2, 7, 16)[..., ::2]
    with pytest.raises(ValueError, match="v must have a unit stride in its last dimension"):
        fastvit.window_attention(q, q, strided, (2, 3), 2, num_prefix_tokens=1)


# ---------------------------------------------------------------------------------------------
# fastvit.nn.WindowAttention
# ---------------------------------------------------------------------------------------------
def test_module_is_qkv_swin_window_attention_proj():
    torch.manual_seed(10)
    module = fastvit.nn.WindowAttention(24, num_heads=3, window=4, shift=2).double()
    x = torch.randn(2, 8 * 8, 24, dtype=torch.float64)
    with fastvit.backend("torch"):
        out = module(x)  # the 8 x 8 grid is inferred
    qkv = module.qkv(x).reshape(2, 64, 3, 3, 8).permute(2, 0, 3, 1, 4)
    eager = swin_window_attention(qkv[0], qkv[1], qkv[2], (8, 8), 4, 2)
    torch.testing.assert_close(out, module.proj(eager.transpose(1, 2).reshape(2, 64, 24)))


def eager_module(module, x, dtype):
    """The module's math in ``dtype`` on the CPU (qkv, the reference definition, proj): its output
    and the gradients of ``out.sum()`` for x and for each parameter, by name."""
    twin = copy.deepcopy(module).cpu().to(dtype)
    twin.zero_grad(set_to_none=True)
    x = x.detach().cpu().to(dtype).requires_grad_()
    batch, n, dim = x.shape
    heads = twin.num_heads
    qkv = twin.qkv(x).reshape(batch, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    ref = reference.window_attention(
        qkv[0], qkv[1], qkv[2], twin.grid_size, twin.window, shift=twin.shift,
        num_prefix_tokens=twin.num_prefix_tokens,
    )
    out = twin.proj(ref.transpose(1, 2).reshape(batch, n, dim))
    out.sum().backward()
    return out, x.grad, {name: p.grad for name, p in twin.named_parameters()}


@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=kernel_test)])
def test_module_with_prefix_and_padding_and_its_gradients(route, kernel_device):
    device = kernel_device if route == "triton" else "cpu"
    torch.manual_seed(11)
    # a 3 x 4 grid in 2 x 3 windows (padded to 4 x 6), behind a cls token, shifted by (1, 2): the
    # row seam (3 - 1 = 2) runs along a window border, the column seam (4 - 2 = 2) cuts windows
    module = fastvit.nn.WindowAttention(32, 2, (2, 3), shift=(1, 2), num_prefix_tokens=1, grid_size=(3, 4))
    module = module.to(device)
    x = torch.randn(2, 1 + 12, 32, device=device, requires_grad=True)
    with fastvit.backend(route):
        out = module(x)
        out.sum().backward()
    oracle, lowp = (eager_module(module, x, dtype) for dtype in (torch.float64, torch.float32))
    assert_close_to_reference(out.detach().cpu(), oracle[0], lowp[0], name="out")
    assert_close_to_reference(x.grad.cpu(), oracle[1], lowp[1], name="dx")
    for name, p in module.named_parameters():
        assert_close_to_reference(p.grad.cpu(), oracle[2][name], lowp[2][name], name=f"d{name}")


def test_module_grid_from_constructor_or_call():
    torch.manual_seed(12)
    module = fastvit.nn.WindowAttention(16, num_heads=2, window=2, grid_size=(2, 6))
    x = torch.randn(1, 12, 16)
    with fastvit.backend("torch"):
        assert module(x).shape == (1, 12, 16)
        torch.testing.assert_close(module(x), module(x, grid=(2, 6)))
        assert not torch.allclose(module(x), module(x, grid=(6, 2)))  # the grid changes the model
    text = repr(module)
    assert "window=(2, 2)" in text and "shift=(0, 0)" in text and "grid_size=(2, 6)" in text


def test_module_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        fastvit.nn.WindowAttention(10, num_heads=3)
    with pytest.raises(ValueError, match=r"shift must lie in \[0, window\)"):
        fastvit.nn.WindowAttention(16, 2, window=4, shift=4)
    with pytest.raises(ValueError, match="num_prefix_tokens must be >= 0"):
        fastvit.nn.WindowAttention(16, 2, num_prefix_tokens=-1)
    module = fastvit.nn.WindowAttention(16, num_heads=2, window=2)
    with pytest.raises(ValueError, match="cannot infer a square grid from 11 tokens"):
        module(torch.randn(1, 11, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, 16\)"):
        module(torch.randn(1, 10, 8))


@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=kernel_test)])
def test_under_torch_compile_fullgraph(route, kernel_device):
    """The gathers, the mask and both flash_attention calls trace into one graph, forward and backward."""
    device = kernel_device if route == "triton" else torch.device("cpu")
    q, k, v = make_qkv(2, 2, 1 + 5 * 7, 16, torch.float32, device, seed=31)

    def block(q, k, v):
        out = fastvit.window_attention(q * 1.5, k, v, (5, 7), 3, shift=1, num_prefix_tokens=1)
        return out.square().sum()

    assert_compiled_matches_eager(block, (q, k, v), route)


def test_a_layout_built_inside_a_cuda_graph_capture_is_not_cached(monkeypatch):
    # its tensors would hold their values only when the graph replays: an eager call reading them
    # from the cache would get garbage (the capture state is faked: no GPU here)
    window_attention_module._LAYOUT_CACHE.clear()
    monkeypatch.setattr(window_attention_module, "stream_capturing", lambda device: True)
    q, k, v = make_qkv(1, 2, 4 * 6, 16, torch.float32, seed=43)
    fastvit.window_attention(q, k, v, (4, 6), 2, shift=1)
    assert not window_attention_module._LAYOUT_CACHE
    monkeypatch.setattr(window_attention_module, "stream_capturing", lambda device: False)
    fastvit.window_attention(q, k, v, (4, 6), 2, shift=1)
    assert len(window_attention_module._LAYOUT_CACHE) == 1


def test_layouts_are_reused_and_serve_training_after_inference_mode():
    """The layout of a (grid, window, shift, P, device) is built once; one first built under
    inference_mode still serves a training call (its indices are saved for the backward)."""
    window_attention_module._LAYOUT_CACHE.clear()
    q, k, v = make_qkv(1, 2, 1 + 4 * 6, 16, torch.float32, seed=41)
    with torch.inference_mode():
        expected = fastvit.window_attention(q, k, v, (4, 6), 2, shift=1, num_prefix_tokens=1)
    (layout,) = window_attention_module._LAYOUT_CACHE.values()
    out = fastvit.window_attention(q, k, v, (4, 6), 2, shift=1, num_prefix_tokens=1)
    assert list(window_attention_module._LAYOUT_CACHE.values()) == [layout]
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
