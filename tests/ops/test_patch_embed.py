"""fastvit.patch_embed: the Triton kernels (interpreter on CPU, compiled on a GPU) against the float64
reference, forward and every gradient; the torch route, dispatch, autocast, validation and
torch.compile."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastvit
from fastvit import reference
from fastvit.kernels.patch_embed import _divide, _magic_divisor
from tests.compile_check import assert_compiled_matches_eager
from tests.tolerance import assert_close_to_reference

ON_GPU = torch.cuda.is_available()
NAMES = ("x", "weight", "bias", "pos_embed", "prefix_tokens")

kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu


def _inputs(
    batch, chans, height, width, patch, dim, num_prefix, pos, *, bias=True, dtype=torch.float32,
    device="cpu", channels_last=False, seed=0,
):
    """Fresh random leaf tensors (None where absent). ``pos``: "all" (1, P+N, D), "patches"
    (1, N, D, timm's no_embed_class) or None. The weight is scaled like a trained patch embedding so
    fp16 tokens stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    n = -(-height // patch) * -(-width // patch)
    x = torch.randn(batch, chans, height, width, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    tensors = {
        "x": x,
        "weight": torch.randn(dim, chans, patch, patch, generator=gen) / (chans * patch * patch) ** 0.5,
        "bias": torch.randn(dim, generator=gen) if bias else None,
        "pos_embed": None if pos is None else torch.randn(1, n + num_prefix * (pos == "all"), dim, generator=gen),
        "prefix_tokens": torch.randn(1, num_prefix, dim, generator=gen) if num_prefix else None,
    }
    return {
        k: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True) for k, t in tensors.items()
    }


def _call(inputs, *, pad=False):
    return fastvit.patch_embed(
        inputs["x"], inputs["weight"], inputs["bias"], pos_embed=inputs["pos_embed"],
        prefix_tokens=inputs["prefix_tokens"], dynamic_img_pad=pad,
    )


def _run_kernel(inputs, grad_out=None, *, pad=False):
    """Tokens and the gradient of every input (dict), through the Triton route."""
    with fastvit.backend("triton"):
        out = _call(inputs, pad=pad)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        leaves = [inputs[k] for k in NAMES if inputs[k] is not None]
        grads = torch.autograd.grad(out, leaves, grad_out)
    names = [k for k in NAMES if inputs[k] is not None]
    return out, grad_out, dict(zip(names, grads, strict=True))


def _reference(inputs, grad_out, dtype, *, pad=False):
    """(tokens, grads) of fastvit.reference on CPU copies of the inputs cast to ``dtype``."""
    leaves = {k: None if t is None else t.detach().cpu().to(dtype).requires_grad_(True) for k, t in inputs.items()}
    x = leaves["x"]
    if pad:
        p = leaves["weight"].shape[-1]
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
    out = reference.patch_embed(
        x, leaves["weight"], leaves["bias"], pos_embed=leaves["pos_embed"], prefix_tokens=leaves["prefix_tokens"]
    )
    out.backward(grad_out.detach().cpu().to(dtype))
    return out, {k: t.grad for k, t in leaves.items() if t is not None}


def _check(inputs, out, grad_out, grads, *, pad=False, dtype=None):
    dtype = dtype or inputs["x"].dtype
    oracle, oracle_grads = _reference(inputs, grad_out, torch.float64, pad=pad)
    lowp, lowp_grads = _reference(inputs, grad_out, dtype, pad=pad)
    assert_close_to_reference(out.detach().cpu(), oracle, lowp, name="tokens", dtype=dtype)
    assert set(grads) == set(oracle_grads)
    for name, grad in grads.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        assert_close_to_reference(grad.cpu(), oracle_grads[name], lowp_grads[name], name=f"d{name}", dtype=dtype)


# (B, C, H, W, p, D, P, pos): every grid is small and awkward; see each comment.
SHAPES = [
    # 3x5 patches of 8 (non-square grid, N = 15 crosses no tile edge evenly), D = 40 cuts the
    # second embed-dim tile, one cls token, pos_embed over all tokens
    (2, 3, 24, 40, 8, 40, 1, "all"),
    # 2x2 patches of 14 (p not a power of two: runs of 14 masked to 16), no prefix
    (3, 3, 28, 28, 14, 24, 0, "patches"),
    # four channels (RGBA), 2x1 grid of 16, cls + distillation tokens
    (1, 4, 32, 16, 16, 36, 2, "all"),
    # one channel, p = 32 (two runs per patch row), 2x1 grid, cls + 4 registers, no_embed_class
    (2, 1, 64, 32, 32, 20, 5, "patches"),
    # no pos_embed, one prefix token; B*N = 42 rows cross the 32-row tile
    (7, 3, 16, 24, 8, 33, 1, None),
]


@kernel_test
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}p{}D{}P{}-{}".format(*s))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernel_fp32(kernel_device, shape, channels_last):
    inputs = _inputs(*shape, device=kernel_device, channels_last=channels_last, seed=sum(shape[:6]))
    out, grad_out, grads = _run_kernel(inputs)
    assert out.shape == (shape[0], shape[6] + (shape[2] // shape[4]) * (shape[3] // shape[4]), shape[5])
    _check(inputs, out, grad_out, grads)
    if channels_last and shape[1] > 1:  # the image gradient keeps the image's layout
        assert grads["x"].is_contiguous(memory_format=torch.channels_last)


@kernel_test
@pytest.mark.parametrize(
    "shape,channels_last",
    [(SHAPES[0], False), (SHAPES[3], False), (SHAPES[1], True), (SHAPES[2], True)],
    # p = 14 channels_last: pixel rows of 42 values, the last run of each masked
    ids=["p8", "p32", "p14-channels_last", "C4-p16-channels_last"],
)
def test_kernel_fp16(kernel_device, shape, channels_last):
    inputs = _inputs(*shape, dtype=torch.float16, device=kernel_device, channels_last=channels_last, seed=5)
    out, grad_out, grads = _run_kernel(inputs)
    _check(inputs, out, grad_out, grads)


@kernel_test
def test_kernel_without_bias(kernel_device):
    inputs = _inputs(2, 3, 16, 16, 8, 24, 1, "all", bias=False, device=kernel_device, seed=7)
    out, grad_out, grads = _run_kernel(inputs)
    _check(inputs, out, grad_out, grads)


@kernel_test
def test_kernel_strided_image_view(kernel_device):
    """An image that is a transposed view (unit stride along H, not W) and a channel slice: the
    kernels read it through its strides, with no copy."""
    inputs = _inputs(2, 3, 16, 24, 8, 20, 1, "all", device=kernel_device, seed=9)
    base = torch.randn(2, 5, 24, 16, device=kernel_device, requires_grad=True)
    x = base[:, 1:4].transpose(2, 3)  # (2, 3, 16, 24), strides (1920, 384, 1, 16)
    inputs["x"] = x
    from fastvit.kernels import patch_embed as kernels

    seen = {}
    original = kernels.patch_embed_forward

    def spy(x_, *args):
        seen.update(ptr=x_.data_ptr(), strides=x_.stride())
        return original(x_, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "patch_embed_forward", spy)
        out, grad_out, grads = _run_kernel(inputs)
    assert seen == {"ptr": x.data_ptr(), "strides": x.stride()}
    _check(inputs, out, grad_out, grads)


@kernel_test
def test_kernel_expanded_grad_output(kernel_device):
    """``out.sum().backward()`` hands the op a grad_output with all strides 0."""
    inputs = _inputs(2, 3, 24, 16, 8, 24, 2, "all", device=kernel_device, seed=11)
    with fastvit.backend("triton"):
        _call(inputs).sum().backward()
    out = _call(inputs)  # the torch route on CPU / the kernel on GPU: only its shape is used
    _, oracle_grads = _reference(inputs, torch.ones_like(out), torch.float64)
    _, lowp_grads = _reference(inputs, torch.ones_like(out), torch.float32)
    for name in NAMES:
        assert_close_to_reference(inputs[name].grad.cpu(), oracle_grads[name], lowp_grads[name], name=f"d{name}")


@kernel_test
@pytest.mark.parametrize(
    "height,width,num_prefix,pos,channels_last",
    [
        (21, 35, 1, "all", False),  # both edges padded
        (16, 19, 1, "all", False),  # the right edge only
        (13, 30, 2, "patches", True),  # pixel rows: the mask is on pos // C; no_embed_class
        (5, 6, 0, "all", False),  # the image is smaller than one patch: a 1x1 grid, mostly padding
    ],
    ids=["both-edges", "right-edge", "channels_last", "sub-patch"],
)
def test_kernel_dynamic_img_pad(kernel_device, height, width, num_prefix, pos, channels_last):
    """H, W not multiples of p: the bottom/right padding is masked in the kernels, the image
    gradient has the image's shape, and pixels of the padding get none."""
    inputs = _inputs(2, 3, height, width, 8, 24, num_prefix, pos, device=kernel_device,
                     channels_last=channels_last, seed=height)
    out, grad_out, grads = _run_kernel(inputs, pad=True)
    assert out.shape[1] == num_prefix + (-(-height // 8)) * (-(-width // 8))
    _check(inputs, out, grad_out, grads, pad=True)


@kernel_test
def test_kernel_matches_torch_route(kernel_device):
    inputs = _inputs(2, 3, 16, 32, 16, 48, 1, "all", device=kernel_device, seed=13)
    with fastvit.backend("triton"):
        fast = _call(inputs)
    with fastvit.backend("torch"):
        slow = _call(inputs)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@kernel_test
def test_kernel_backward_is_deterministic_and_split_invariant(kernel_device):
    """The weight and token gradients are split reductions summed in a fixed order: the same bits
    on every run, and (up to rounding) the same values for any number of splits."""
    from fastvit.kernels import patch_embed as kernels

    inputs = _inputs(5, 3, 24, 24, 8, 32, 1, "all", device=kernel_device, seed=17)
    grad_out = torch.randn(5, 10, 32, device=kernel_device)
    first = _run_kernel(inputs, grad_out)[2]
    second = _run_kernel(inputs, grad_out)[2]
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name
    x, w = inputs["x"].detach(), inputs["weight"].detach()
    one = kernels.patch_embed_backward_weight(grad_out, x, w, False, splits=1)
    many = kernels.patch_embed_backward_weight(grad_out, x, w, False, splits=4)
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        kernels.patch_embed_backward_tokens(grad_out, splits=1), kernels.patch_embed_backward_tokens(grad_out, splits=3)
    )


@kernel_test
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernel_weight_gradient_walks_image_tiles(kernel_device, channels_last):
    """N a multiple of the weight gradient's row tile (4x8 patches of 8: N = 32, the interpreter's
    step): it walks row tiles of one image each (``dw_image_tiles``), the other walk of the tests
    above; checked against the reference, split-invariant, and equal to the flat walk's sum."""
    from fastvit.kernels import patch_embed as kernels

    inputs = _inputs(3, 3, 32, 64, 8, 24, 1, "all", device=kernel_device, channels_last=channels_last, seed=23)
    assert kernels.dw_image_tiles(32, kernels.gemm_config("dw", 0, torch.float32, "vec").block_k)
    out, grad_out, grads = _run_kernel(inputs)
    _check(inputs, out, grad_out, grads)
    x, w = inputs["x"].detach(), inputs["weight"].detach()
    one = kernels.patch_embed_backward_weight(grad_out, x, w, False, splits=1)
    torch.testing.assert_close(one, kernels.patch_embed_backward_weight(grad_out, x, w, False, splits=2))
    flat = kernels.dw_image_tiles
    try:
        kernels.dw_image_tiles = lambda patches, block_m: False
        torch.testing.assert_close(one, kernels.patch_embed_backward_weight(grad_out, x, w, False, splits=1))
    finally:
        kernels.dw_image_tiles = flat


@kernel_test
@pytest.mark.parametrize("pos", ["all", "patches"])
def test_kernel_gradients_accumulate_into_separate_buffers(kernel_device, pos):
    # pos_embed over the prefix rows and the prefix tokens' gradients came from overlapping views of
    # one buffer: autograd kept both as .grad, and the second backward (gradient accumulation over
    # micro-batches) added every prefix row into both, doubling the accumulated gradients there
    inputs = _inputs(2, 3, 32, 32, 16, 8, 2, pos, device=kernel_device)
    grad_out = torch.randn(2, 2 + 4, 8, device=kernel_device)
    with fastvit.backend("triton"):
        _call(inputs).backward(grad_out)
        once = {k: t.grad.clone() for k, t in inputs.items()}
        _call(inputs).backward(grad_out)
    for name, t in inputs.items():
        torch.testing.assert_close(t.grad, 2 * once[name], msg=name)
    storages = {t.grad.untyped_storage().data_ptr() for t in inputs.values()}
    assert len(storages) == len(inputs)  # no two gradients share memory


def test_kernel_empty_batch_and_empty_prefix(kernel_device):
    inputs = _inputs(0, 3, 16, 16, 8, 12, 2, "all", device=kernel_device, seed=19)
    with fastvit.backend("triton"):
        assert _call(inputs).shape == (0, 6, 12)
    inputs = _inputs(2, 3, 16, 16, 8, 12, 0, "all", device=kernel_device, seed=19)
    inputs["prefix_tokens"] = torch.randn(1, 0, 12, device=kernel_device)  # P = 0: nothing prepended
    with fastvit.backend("triton"):
        out = _call(inputs)
    assert out.shape == (2, 4, 12)


@kernel_test
def test_kernel_empty_batch_gradients(kernel_device):
    """No images: empty tokens and image gradient, zero weight, bias, pos and prefix gradients."""
    inputs = _inputs(0, 3, 16, 16, 8, 12, 2, "all", device=kernel_device, seed=19)
    with fastvit.backend("triton"):
        out = _call(inputs)
        grads = torch.autograd.grad(out, [inputs[k] for k in NAMES], torch.randn_like(out))
    for name, grad in zip(NAMES, grads, strict=True):
        assert grad.shape == inputs[name].shape and not grad.count_nonzero(), name


@kernel_test
def test_kernel_views_of_images_and_parameters(kernel_device):
    """A batch-minor image (permuted from (C, B, H, W): the batch stride is the smallest), prefix
    tokens that are a strided slice (row stride 2*D) and a pos_embed stored transposed (stride L
    along D: the op copies that small tensor); gradients reach the underlying leaves."""
    gen = torch.Generator().manual_seed(59)
    batch, chans, height, width, patch, dim, num_prefix = 3, 3, 16, 24, 8, 20, 2
    tokens = num_prefix + (height // patch) * (width // patch)
    leaves = {
        "x_base": torch.randn(chans, batch, height, width, generator=gen),
        "weight": torch.randn(dim, chans, patch, patch, generator=gen) / (chans * patch * patch) ** 0.5,
        "bias": torch.randn(dim, generator=gen),
        "pos_base": torch.randn(1, dim, tokens, generator=gen),
        "prefix_base": torch.randn(1, 2 * num_prefix, dim, generator=gen),
    }

    def stem(t):
        return fastvit.patch_embed(
            t["x_base"].permute(1, 0, 2, 3), t["weight"], t["bias"],
            pos_embed=t["pos_base"].transpose(1, 2), prefix_tokens=t["prefix_base"][:, ::2],
        )

    def grads_of(dtype, device, route):
        t = {k: v.to(device=device, dtype=dtype).requires_grad_(True) for k, v in leaves.items()}
        with fastvit.backend(route):
            out = stem(t)
            grads = torch.autograd.grad(out, list(t.values()), grad_out.to(device=device, dtype=dtype))
        return out, dict(zip(t, grads, strict=True))

    grad_out = torch.randn(batch, tokens, dim, generator=gen)
    out, grads = grads_of(torch.float32, kernel_device, "triton")
    oracle, oracle_grads = grads_of(torch.float64, "cpu", "torch")
    lowp, lowp_grads = grads_of(torch.float32, "cpu", "torch")
    assert_close_to_reference(out.detach().cpu(), oracle, lowp, name="tokens")
    for name, grad in grads.items():
        assert_close_to_reference(grad.cpu(), oracle_grads[name], lowp_grads[name], name=f"d{name}")


def test_image_offsets_stay_int32():
    """Offsets inside one image are int32 in the kernels: a view whose channel or row stride would
    pass 2^31 is copied (in its own layout) before the launch; ordinary images are not."""
    from fastvit.kernels.patch_embed import gather_plan, image_addressable_in_int32

    image = torch.empty(2, 3, 16, 16, device="meta")
    assert image_addressable_in_int32(image) is image
    cl = image.to(memory_format=torch.channels_last)
    assert image_addressable_in_int32(cl) is cl
    batch_minor = torch.empty_strided((2, 3, 16, 16), (1, 2**30, 32, 2), device="meta")
    copied = image_addressable_in_int32(batch_minor)
    assert copied.is_contiguous() and not gather_plan(copied, 8).pixel_rows
    pixel_rows = torch.empty_strided((2, 3, 16, 16), (1, 1, 2**28, 3), device="meta")
    assert gather_plan(pixel_rows, 8).pixel_rows
    copied = image_addressable_in_int32(pixel_rows)
    assert copied.is_contiguous(memory_format=torch.channels_last) and gather_plan(copied, 8).pixel_rows


def test_token_offsets_stay_int32():
    """The weight gradient reads one image's token gradient with int32 offsets: a view whose token
    or dim stride would pass 2^31 is copied before the launch; ordinary gradients (and the expanded
    one of out.sum()) are not."""
    from fastvit.kernels.patch_embed import tokens_addressable_in_int32

    grad = torch.empty(2, 197, 768, device="meta")
    assert tokens_addressable_in_int32(grad) is grad
    expanded = torch.empty(1, 1, 1, device="meta").expand(2, 197, 768)
    assert tokens_addressable_in_int32(expanded) is expanded
    strided = torch.empty_strided((2, 197, 768), (1, 2**24, 2), device="meta")
    assert tokens_addressable_in_int32(strided).is_contiguous()


@kernel_test
def test_huge_token_buffers_take_the_torch_route(kernel_device, monkeypatch):
    """(P+N)*D of 2^31 or more per image: past the weight gradient's int32 token offsets, so the op
    runs the composite, once warned (the limit is lowered here)."""
    from fastvit.ops import patch_embed as op

    monkeypatch.setattr(op, "_MAX_IMAGE_NUMEL", 100)  # an image: 64 elements; its tokens: (1 + 4) x 20
    inputs = _inputs(2, 1, 8, 8, 4, 20, 1, "all", device=kernel_device, seed=3)
    with fastvit.backend("triton"), pytest.warns(UserWarning, match="tokens of one image"):
        out = _call(inputs)
    assert out.shape == (2, 5, 20)


@pytest.mark.parametrize(
    "patch,chans,channels_last,walk,copied",
    [
        (16, 3, False, "vec", False),  # rows of 16: whole runs, the weight is a view
        (14, 3, False, "aligned", True),  # rows of 14 padded to 16 (DINOv2, EVA02, ViT-H/14)
        (8, 3, False, "vec", False),  # runs of 8
        (16, 3, True, "vec", False),  # pixel rows of 48
        (14, 3, True, "aligned", True),  # pixel rows of 42 padded to 48
    ],
)
def test_weight_in_virtual_order_and_walks(patch, chans, channels_last, walk, copied):
    """The weight the forward and dx read: rows of whole runs (padded with zeros where a patch row
    is not a multiple of RUN), a view where nothing is padded; and the walk each layout takes."""
    from fastvit.kernels.patch_embed import _weight_in_virtual_order, gather_plan, walk_kind

    x = torch.zeros(2, chans, patch * 16, patch * 16)  # rows of 16*p pixels: 16-divisible strides
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(32, chans, patch, patch)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    plan = gather_plan(x, patch)
    assert walk_kind(x, plan, patch, 32) == walk
    w = _weight_in_virtual_order(weight, plan)
    assert w.shape == (32, plan.virtual_cols) and w.stride(1) == 1 and plan.virtual_cols % 16 == 0
    assert (w.data_ptr() != weight.data_ptr()) == copied
    order = weight.permute(0, 2, 3, 1) if plan.pixel_rows else weight
    rows = w.view(32, plan.rows, plan.runs * plan.run)
    torch.testing.assert_close(rows[..., : plan.row_len], order.reshape(32, plan.rows, plan.row_len), rtol=0, atol=0)
    assert not rows[..., plan.row_len:].any()
    view = torch.empty_strided(x.shape, (x.stride(0), x.stride(1), x.stride(2), 2)) if not channels_last else None
    if view is not None:
        assert walk_kind(view, gather_plan(view, patch), patch, 32) == "gather"


@triton.jit
def _divide_kernel(Num, Den, Out, count, BLOCK: tl.constexpr):
    """Out[d, :] = Num // Den[d] through the weight gradient's magic-number division."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    magic, shift = _magic_divisor(tl.load(Den + row))
    num = tl.load(Num + offs, mask=offs < count, other=0)
    tl.store(Out + row * BLOCK + offs, _divide(num, magic, shift), mask=offs < count)


@kernel_test
def test_magic_division_is_exact_over_int31(kernel_device):
    """The weight gradient splits patch rows m < 2^31 into (image, patch) by the runtime N and GW
    with a multiply-high: exact for every divisor, checked at the edges of each quotient, at 2^31 - 1
    and at powers of two (d = 1, where the magic number is 2^31; d = 2^30 + 1, where it is largest)."""
    top = 2**31 - 1
    divisors = [1, 2, 3, 7, 14, 16, 17, 196, 197, 577, 4096, 65535, 2**30 - 1, 2**30, 2**30 + 1, top]
    gen = torch.Generator().manual_seed(0)
    nums = [0, 1, 13, 14, 15, 195, 196, 197, 2**30, 2**31 - 2, top]
    nums += [q * d + r for d in divisors for q in (1, top // d) for r in (-1, 0) if 0 <= q * d + r <= top]
    nums += torch.randint(0, top, (64,), generator=gen).tolist()
    num = torch.tensor(nums, dtype=torch.int32, device=kernel_device)
    den = torch.tensor(divisors, dtype=torch.int32, device=kernel_device)
    block = triton.next_power_of_2(len(nums))
    out = torch.full((len(divisors), block), -1, dtype=torch.int32, device=kernel_device)
    _divide_kernel[(len(divisors),)](num, den, out, len(nums), BLOCK=block)
    expected = num.long()[None, :] // den.long()[:, None]
    torch.testing.assert_close(out[:, : len(nums)].long().cpu(), expected.cpu(), rtol=0, atol=0)


@kernel_test
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_kernel_copies_views_past_int32_in_their_layout(kernel_device, monkeypatch, channels_last):
    """The copy a huge-stride view gets (forced here by lowering the limit) keeps the image's
    layout, so the forward, the weight gradient's layout (the fake impl's) and dx all agree."""
    from fastvit.kernels import patch_embed as kernels

    monkeypatch.setattr(kernels, "INT32_SPAN", 1)
    inputs = _inputs(2, 3, 16, 24, 8, 20, 1, "all", device=kernel_device, channels_last=channels_last, seed=71)
    out, grad_out, grads = _run_kernel(inputs)
    _check(inputs, out, grad_out, grads)
    assert grads["weight"].stride() == kernels.weight_grad_like(inputs["x"], inputs["weight"]).stride()


@kernel_test
def test_every_launch_runs_under_the_device_guard(kernel_device, monkeypatch):
    """Triton launches on the current device: every launcher must enter ``device_guard`` of its
    tensors first (checked here by recording; ``test_gpu_tensors_on_a_non_current_device`` runs
    it for real where there are two GPUs)."""
    import contextlib

    from fastvit.kernels import patch_embed as kernels

    state = {"inside": 0, "launches": []}

    @contextlib.contextmanager
    def guard(t):
        state["inside"] += 1
        try:
            yield
        finally:
            state["inside"] -= 1

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                state["launches"].append((self.name, state["inside"] > 0))
                return self.kernel[grid](*args, **kwargs)

            return launch

    names = [n for n in dir(kernels) if n.endswith("_kernel") and hasattr(getattr(kernels, n), "fn")]
    assert len(names) == 5, names
    for name in names:
        monkeypatch.setattr(kernels, name, Recorder(name, getattr(kernels, name)))
    monkeypatch.setattr(kernels, "device_guard", guard)
    inputs = _inputs(2, 3, 16, 16, 8, 16, 1, "all", device=kernel_device, seed=61)
    _run_kernel(inputs)
    assert {name for name, _ in state["launches"]} == set(names)
    assert all(inside for _, inside in state["launches"]), state["launches"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_tensors_on_a_non_current_device():
    """Tensors on cuda:1 while cuda:0 is current: the launch must follow the tensors."""
    inputs = _inputs(2, 3, 32, 48, 16, 64, 1, "all", device="cuda:1", seed=67)
    with torch.cuda.device(0):
        out, grad_out, grads = _run_kernel(inputs)
    torch.cuda.synchronize(1)
    _check(inputs, out, grad_out, grads)


@kernel_test
def test_kernel_opcheck(kernel_device):
    """Schema, fake tensor, autograd registration and AOT dispatch of the four custom ops."""
    t = {k: v.detach() for k, v in _inputs(2, 3, 16, 24, 8, 16, 1, "patches", device=kernel_device, seed=23).items()}
    cl = t["x"].to(memory_format=torch.channels_last)
    grad = torch.randn(2, 7, 16, device=kernel_device)
    ops = torch.ops.fastvit
    args = (t["x"], t["weight"], t["bias"], t["pos_embed"], t["prefix_tokens"], False)
    torch.library.opcheck(ops.patch_embed_fwd.default, args)
    torch.library.opcheck(ops.patch_embed_fwd.default, (cl[..., :21], t["weight"], None, None, None, True))
    torch.library.opcheck(ops.patch_embed_bwd_weight.default, (grad, cl, t["weight"], False))
    torch.library.opcheck(ops.patch_embed_bwd_input.default, (grad, cl, t["weight"], False))
    torch.library.opcheck(ops.patch_embed_bwd_tokens.default, (grad,))


@kernel_test
def test_kernel_under_torch_compile(kernel_device):
    inputs = _inputs(2, 3, 16, 16, 8, 16, 1, "all", device=kernel_device, seed=29)

    def stem(x, weight, bias, pos, cls):
        return fastvit.patch_embed(x * 2, weight, bias, pos_embed=pos, prefix_tokens=cls).square().sum()

    leaves = [inputs[k] for k in NAMES]
    assert_compiled_matches_eager(stem, leaves, "triton")


@kernel_test
def test_kernel_autocast_follows_the_composite(kernel_device):
    """Under autocast: fp32 images and fp32 parameters, a low-precision GEMM like F.conv2d, fp32
    tokens like torch.cat + add with fp32 cls/pos (timm's stem), fp32 gradients for fp32 leaves."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16  # bf16 dots are wrong in the interpreter
    inputs = _inputs(2, 3, 24, 16, 8, 32, 1, "all", device=kernel_device, seed=31)
    with torch.autocast(kernel_device.type, dtype=dtype):
        out, grad_out, grads = _run_kernel(inputs)
        with fastvit.backend("torch"):
            composite = _call(inputs)
    assert out.dtype == composite.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    # the budget: the composite's own error under autocast (its conv runs in `dtype`)
    oracle, oracle_grads = _reference(inputs, grad_out, torch.float64)
    assert_close_to_reference(out.detach().cpu(), oracle, composite.detach().cpu(), name="tokens", dtype=dtype)
    with torch.autocast(kernel_device.type, dtype=dtype), fastvit.backend("torch"):
        lowp_grads = torch.autograd.grad(_call(inputs), [inputs[k] for k in NAMES], grad_out)
    for name, lowp in zip(NAMES, lowp_grads, strict=True):
        assert_close_to_reference(grads[name].cpu(), oracle_grads[name], lowp.cpu(), name=f"d{name}", dtype=dtype)
    # without prefix tokens or pos_embed the tokens stay in the autocast dtype, like F.conv2d's;
    # fp32 prefix tokens alone promote them to fp32, as torch.cat does
    with torch.autocast(kernel_device.type, dtype=dtype), fastvit.backend("triton"):
        assert fastvit.patch_embed(inputs["x"], inputs["weight"], inputs["bias"]).dtype == dtype
        with_cls = fastvit.patch_embed(inputs["x"], inputs["weight"], prefix_tokens=inputs["prefix_tokens"])
        with fastvit.backend("torch"):
            composite = fastvit.patch_embed(inputs["x"], inputs["weight"], prefix_tokens=inputs["prefix_tokens"])
    assert with_cls.dtype == composite.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("patch,channels_last", [(16, False), (16, True), (14, False)])
def test_gpu_bf16_vit_stem(patch, channels_last):
    """ViT-B/16 (and /14) stem in bf16 on the GPU: the vector and the gather walks, every gradient."""
    size = 224
    inputs = _inputs(3, 3, size, size, patch, 768, 1, "all", dtype=torch.bfloat16, device="cuda",
                     channels_last=channels_last, seed=37)
    out, grad_out, grads = _run_kernel(inputs)
    _check(inputs, out, grad_out, grads)


@pytest.mark.gpu
def test_gpu_bf16_autocast_timm_stem():
    inputs = _inputs(4, 3, 224, 224, 16, 384, 1, "all", device="cuda", seed=41)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grad_out, grads = _run_kernel(inputs)
        with fastvit.backend("torch"):
            composite = _call(inputs)
    assert out.dtype == composite.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    oracle, _ = _reference(inputs, grad_out, torch.float64)
    assert_close_to_reference(out.detach().cpu(), oracle, composite.detach().cpu(), name="tokens", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Dispatch, fallbacks and the torch route (no kernels involved)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["all", "patches", None])
def test_torch_route_matches_reference(pos):
    inputs = _inputs(2, 3, 16, 24, 8, 20, 2, pos, seed=43)
    with fastvit.backend("torch"):
        out = _call(inputs)
        grad_out = torch.randn_like(out)
        names = [k for k in NAMES if inputs[k] is not None]
        grads = dict(zip(names, torch.autograd.grad(out, [inputs[k] for k in names], grad_out), strict=True))
    _check(inputs, out, grad_out, grads)


def test_torch_route_dynamic_img_pad():
    inputs = _inputs(2, 3, 13, 17, 8, 12, 1, "patches", seed=47)
    with fastvit.backend("torch"):
        out = _call(inputs, pad=True)
        grad_out = torch.randn_like(out)
        grads = dict(zip(NAMES, torch.autograd.grad(out, [inputs[k] for k in NAMES], grad_out), strict=True))
    _check(inputs, out, grad_out, grads, pad=True)


def test_auto_backend_on_cpu_is_the_torch_route(monkeypatch):
    from fastvit.ops import patch_embed as op

    called = []
    monkeypatch.setattr(op, "_torch_route", lambda *a: called.append(a) or a[0])
    fastvit.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8))
    assert len(called) == 1


@pytest.mark.skipif(ON_GPU, reason="needs the interpreter")
def test_float64_falls_back_with_one_warning():
    import sys

    sys.modules["fastvit.backend"]._warned.clear()
    inputs = {k: v.detach() for k, v in _inputs(1, 3, 16, 16, 8, 8, 1, "all", dtype=torch.float64, seed=53).items()}
    with fastvit.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _call(inputs)
        _call(inputs)
    fallback = [w for w in caught if issubclass(w.category, fastvit.FastvitFallbackWarning)]
    assert len(fallback) == 1 and "float64" in str(fallback[0].message)
    torch.testing.assert_close(out, _reference(inputs, torch.zeros_like(out), torch.float64)[0])


@pytest.mark.skipif(ON_GPU, reason="CPU-only: the interpreter message")
def test_triton_on_cpu_without_interpreter_says_so():
    import subprocess
    import sys

    code = (
        "import torch, fastvit\n"
        "with fastvit.backend('triton'):\n"
        "    fastvit.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0 and "TRITON_INTERPRET=1" in result.stderr


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument and the shapes
# ---------------------------------------------------------------------------------------------
def _bad(**overrides):
    base = {
        "x": torch.randn(2, 3, 32, 48),
        "weight": torch.randn(8, 3, 16, 16),
        "bias": torch.randn(8),
        "pos_embed": torch.randn(1, 7, 8),
        "prefix_tokens": torch.randn(1, 1, 8),
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "args,error,pattern",
    [
        (_bad(x=torch.randn(3, 32, 48)), ValueError, r"x must have 4 dimensions.*\(3, 32, 48\)"),
        (_bad(weight=torch.randn(8, 3, 16)), ValueError, r"weight must have 4 dimensions"),
        (_bad(x=torch.randn(2, 4, 32, 48)), ValueError, r"x has 4 channels but weight expects 3.*\(8, 3, 16, 16\)"),
        (_bad(weight=torch.randn(8, 3, 16, 8)), ValueError, r"square.*\(8, 3, 16, 8\)"),
        (_bad(pos_embed=torch.randn(1, 9, 8)), ValueError, r"shape \(1, L, 8\) with L = 6 or 7.*\(1, 9, 8\)"),
        (_bad(pos_embed=torch.randn(2, 7, 8)), ValueError, r"pos_embed must have shape"),
        (_bad(pos_embed=torch.randn(7, 8)), ValueError, r"pos_embed must have 3 dimensions"),
        (_bad(prefix_tokens=torch.randn(1, 1, 6)), ValueError, r"prefix_tokens must have shape \(1, P, 8\).*\(1, 1, 6"),
        (_bad(prefix_tokens=torch.randn(2, 1, 8)), ValueError, r"prefix_tokens must have shape \(1, P, 8\).*\(2, 1, 8"),
        (_bad(bias=torch.randn(7)), ValueError, r"bias must have shape \(8,\).*\(7,\)"),
        (_bad(x=torch.randn(2, 3, 30, 48)), ValueError, r"multiples of the patch size 16.*30, 48.*dynamic_img_pad"),
        (_bad(x=torch.randn(2, 3, 0, 48)), ValueError, r"x must have at least one channel, row and column.*0, 48"),
        (_bad(x=torch.randn(2, 0, 32, 48), weight=torch.randn(8, 0, 16, 16)), ValueError, r"at least one channel"),
        (_bad(weight=torch.randn(0, 3, 16, 16), bias=None, pos_embed=None, prefix_tokens=None), ValueError,
         r"weight must have at least one output channel \(embed_dim\).*\(0, 3, 16, 16\)"),
        (_bad(bias=torch.randn(8, dtype=torch.float16)), TypeError, r"same dtype.*bias float16"),
        (_bad(x=torch.randint(0, 5, (2, 3, 32, 48))), TypeError, r"x must have dtype in .*got int64"),
        (_bad(weight=[[1.0]]), TypeError, r"weight must be a torch.Tensor, got list"),
        (_bad(pos_embed=torch.randn(1, 7, 8, device="meta")), ValueError, r"same device.*pos_embed on meta"),
    ],
)
def test_bad_input(args, error, pattern):
    x = args.pop("x")
    weight = args.pop("weight")
    bias = args.pop("bias")
    with pytest.raises(error, match=pattern):
        fastvit.patch_embed(x, weight, bias, **args)


@pytest.mark.parametrize("value", ["False", 0, 1, None])
def test_dynamic_img_pad_must_be_a_bool(value):
    """A truthy non-bool (dynamic_img_pad="False") would silently pad: rejected on every route."""
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
    with pytest.raises(TypeError, match="dynamic_img_pad must be a bool"):
        fastvit.patch_embed(x, w, dynamic_img_pad=value)
