"""``fastvit.patch_embed``: input checks, autocast rule, backend dispatch and autograd.

The Triton route is a forward custom op (``fastvit::patch_embed_fwd``: the implicit-GEMM kernel
that writes the whole (B, P+N, D) token buffer) and three backward custom ops
(``fastvit::patch_embed_bwd_weight``, ``fastvit::patch_embed_bwd_input`` and
``fastvit::patch_embed_bwd_tokens``), each with a fake implementation, so the op runs under
``torch.compile(fullgraph=True)`` without a graph break. The ``cuda`` route wraps the extension's
``fastvit_C::patch_embed_fwd`` / ``_bwd`` in a second custom-op pair (``fastvit::patch_embed_cuda_fwd``
/ ``_bwd``). The ``torch`` route is the composite it replaces: ``F.conv2d`` + flatten + transpose +
``torch.cat`` + add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import has_static_value, statically_known_true

from fastvit.backend import interpreter_dtype_problem, resolve_backend, warn_once
from fastvit.ops._autograd import call, function_twin, no_double_backward
from fastvit.ops._checks import (
    autocast_dtype,
    check_flags,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    unit_last_stride,
    usable_in_autograd,
)
from fastvit.ops._fx import fx_leaf
from fastvit.tuning import patch_embed_bucket

__all__ = ["patch_embed"]

# dtypes the Triton kernels take; float64 is valid input and runs on the torch route.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)
# The kernels address pixels inside one image with int32 offsets (the batch offset is int64): a
# single image of 2^31 elements or more runs on the torch route (kernels/patch_embed.py); so do
# tokens of one image of 2^31 elements or more ((P+N)*D: the weight gradient reads them in int32).
_MAX_IMAGE_NUMEL = 2**31


# ---------------------------------------------------------------------------------------------
# Triton route: custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::patch_embed_fwd", mutates_args=())
def _patch_embed_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    prefix_tokens: torch.Tensor | None,
    pad: bool,
) -> torch.Tensor:
    from fastvit.kernels.patch_embed import patch_embed_forward

    # the kernels read these as vectors: laid out here, where the real tensors are (a traced graph's
    # layouts come from fake tensors); they hold D or (P+N)*D elements, never the image
    bias, pos_embed, prefix_tokens = (unit_last_stride(t) for t in (bias, pos_embed, prefix_tokens))
    return patch_embed_forward(x, weight, bias, pos_embed, prefix_tokens, pad)


@_patch_embed_fwd.register_fake
def _(x, weight, bias, pos_embed, prefix_tokens, pad):
    from fastvit.kernels.patch_embed import grid_size

    gh, gw = grid_size(x.shape[2], x.shape[3], weight.shape[-1], pad)
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    dtype = next((t.dtype for t in (prefix_tokens, pos_embed) if t is not None), weight.dtype)
    return x.new_empty((x.shape[0], num_prefix + gh * gw, weight.shape[0]), dtype=dtype)


@torch.library.custom_op("fastvit::patch_embed_bwd_weight", mutates_args=())
def _patch_embed_bwd_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pad: bool) -> torch.Tensor:
    from fastvit.kernels.patch_embed import patch_embed_backward_weight

    return patch_embed_backward_weight(grad, x, weight, pad)


@_patch_embed_bwd_weight.register_fake
def _(grad, x, weight, pad):
    from fastvit.kernels.patch_embed import weight_grad_like

    return weight_grad_like(x, weight)


@torch.library.custom_op("fastvit::patch_embed_bwd_input", mutates_args=())
def _patch_embed_bwd_input(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pad: bool) -> torch.Tensor:
    from fastvit.kernels.patch_embed import patch_embed_backward_input

    return patch_embed_backward_input(grad, x, weight, pad)


@_patch_embed_bwd_input.register_fake
def _(grad, x, weight, pad):
    from fastvit.kernels.patch_embed import image_like

    return image_like(x)


@torch.library.custom_op("fastvit::patch_embed_bwd_tokens", mutates_args=())
def _patch_embed_bwd_tokens(grad: torch.Tensor) -> torch.Tensor:
    from fastvit.kernels.patch_embed import patch_embed_backward_tokens

    return patch_embed_backward_tokens(grad)


@_patch_embed_bwd_tokens.register_fake
def _(grad):
    return grad.new_empty(grad.shape[1:], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pos_embed, prefix_tokens, pad = inputs
    ctx.save_for_backward(x, weight)
    ctx.pad = pad
    ctx.num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    ctx.pos_len = None if pos_embed is None else pos_embed.shape[1]
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, pos_embed, prefix_tokens))


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_bias, need_pos, need_prefix = ctx.needs_input_grad[:5]
    dx = call(_patch_embed_bwd_input, _bwd_input_function, grad, x, weight, ctx.pad) if need_x else None
    dw = call(_patch_embed_bwd_weight, _bwd_weight_function, grad, x, weight, ctx.pad) if need_w else None
    dbias = dpos = dprefix = None
    if need_bias or need_pos or need_prefix:
        # (P+N, D) fp32 sums over the batch; the three small gradients are slices of it
        sums = call(_patch_embed_bwd_tokens, _bwd_tokens_function, grad)
        num_prefix = ctx.num_prefix
        bias_dtype, pos_dtype, prefix_dtype = ctx.dtypes
        if need_bias:
            dbias = sums[num_prefix:].sum(0).to(bias_dtype)
        if need_pos:
            rows = sums if ctx.pos_len == sums.shape[0] else sums[num_prefix:]
            dpos = rows.unsqueeze(0).to(pos_dtype)
        if need_prefix:
            # a copy (num_prefix x D): pos_embed's gradient may be a view of the same rows, and
            # autograd keeps both views as .grad, where the next accumulation adds into both at once
            dprefix = sums[:num_prefix].unsqueeze(0).to(prefix_dtype, copy=True)
    return dx, dw, dbias, dpos, dprefix, None


_patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)
# first derivatives only: a double backward raises an error naming the torch route; the twins run
# under torch.func transforms (fastvit.ops._autograd)
_bwd_input_function = no_double_backward(_patch_embed_bwd_input, "patch_embed")
_bwd_weight_function = no_double_backward(_patch_embed_bwd_weight, "patch_embed")
_bwd_tokens_function = no_double_backward(_patch_embed_bwd_tokens, "patch_embed")
_patch_embed_fwd_function = function_twin(_patch_embed_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# cuda route: the extension's fastvit_C::patch_embed_fwd / _bwd inside a custom-op pair defined
# here, at import, with its fake and autograd: torch.compile can trace a call whatever the order
# in which the extension is loaded (the C++ ops have their own fakes for direct use)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::patch_embed_cuda_fwd", mutates_args=())
def _patch_embed_cuda_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None,
    prefix_tokens: torch.Tensor | None,
) -> torch.Tensor:
    bias, pos_embed, prefix_tokens = (unit_last_stride(t) for t in (bias, pos_embed, prefix_tokens))  # as above
    return torch.ops.fastvit_C.patch_embed_fwd(x, weight, bias, pos_embed, prefix_tokens)


@_patch_embed_cuda_fwd.register_fake
def _(x, weight, bias, pos_embed, prefix_tokens):
    patch = weight.shape[-1]
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    dtype = next((t.dtype for t in (pos_embed, prefix_tokens) if t is not None), weight.dtype)
    tokens = (x.shape[2] // patch) * (x.shape[3] // patch)
    return x.new_empty((x.shape[0], num_prefix + tokens, weight.shape[0]), dtype=dtype)


# a fixed tuple, not Tensor[]: PyTorch's batching fallback (is_grads_batched) cannot loop over a list return
_CUDA_GRADS = tuple[(torch.Tensor,) * 5]


@torch.library.custom_op("fastvit::patch_embed_cuda_bwd", mutates_args=())
def _patch_embed_cuda_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, num_prefix: int, pos_len: int, needs: list[bool]
) -> _CUDA_GRADS:
    """(dx, dweight, dbias, dpos_embed, dprefix_tokens); the last three fp32 sums; (0,) where not needed."""
    return tuple(torch.ops.fastvit_C.patch_embed_bwd(grad, x, weight, num_prefix, pos_len, needs))


@_patch_embed_cuda_bwd.register_fake
def _(grad, x, weight, num_prefix, pos_len, needs):
    dim = weight.shape[0]
    shapes = (
        (tuple(x.shape), x.dtype), (tuple(weight.shape), weight.dtype), ((dim,), torch.float32),
        ((1, pos_len, dim), torch.float32), ((1, num_prefix, dim), torch.float32),
    )
    return tuple(
        x.new_empty(shape if need else (0,), dtype=dtype) for (shape, dtype), need in zip(shapes, needs, strict=True)
    )


def _cuda_setup_context(ctx, inputs, output):
    x, weight, bias, pos_embed, prefix_tokens = inputs
    ctx.save_for_backward(x, weight)
    ctx.num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[1]
    ctx.pos_len = 0 if pos_embed is None else pos_embed.shape[1]
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (bias, pos_embed, prefix_tokens))


def _cuda_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    if grad.shape[-1] > 1 and grad.stride(-1) != 1:
        grad = grad.contiguous()  # the GEMMs read D with a unit stride; a broadcast gradient is copied once
    dx, dw, dbias, dpos, dprefix = call(
        _patch_embed_cuda_bwd, _cuda_bwd_function, grad, x, weight, ctx.num_prefix, ctx.pos_len, needs
    )
    # the small gradients come back as fp32 sums; each takes its parameter's dtype
    bias_dtype, pos_dtype, prefix_dtype = ctx.dtypes
    return (
        dx if needs[0] else None,
        dw if needs[1] else None,
        dbias.to(bias_dtype) if needs[2] else None,
        dpos.to(pos_dtype) if needs[3] else None,
        dprefix.to(prefix_dtype) if needs[4] else None,
    )


_patch_embed_cuda_fwd.register_autograd(_cuda_backward, setup_context=_cuda_setup_context)
_cuda_bwd_function = no_double_backward(_patch_embed_cuda_bwd, "patch_embed")
_patch_embed_cuda_fwd_function = function_twin(_patch_embed_cuda_fwd, _cuda_setup_context, _cuda_backward)


# ---------------------------------------------------------------------------------------------
# torch route
# ---------------------------------------------------------------------------------------------
# sizes as torch.fx (Proxy) and torch.jit.trace (0-dim tensors) record them
_RECORDED = (torch.fx.Proxy, torch.Tensor)


def _dynamic(*sizes: int) -> bool:
    """Whether a size is dynamic in a graph torch.compile or torch.export traces, where a branch on
    it is a guard; False for ints, for the static sizes of a traced graph and for the sizes torch.fx
    and torch.jit.trace record."""
    return any(not isinstance(size, _RECORDED) and not has_static_value(size) for size in sizes)


def pad_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Zero-pad the bottom and right of ``x`` to multiples of ``patch`` (timm's dynamic_img_pad)."""
    pad_h = -x.shape[2] % patch
    pad_w = -x.shape[3] % patch
    if _dynamic(pad_h, pad_w):
        # padded as timm pads, without asking whether the pads are zero (a guard on a dynamic size:
        # a recompile when it flips, or torch.export's "Constraints violated")
        return F.pad(x, (0, pad_w, 0, pad_h))
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def crop_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """The rows and columns of ``x`` that whole ``patch`` x ``patch`` patches cover, a view: what
    a patchifying Conv2d (stride = kernel = patch) reads, dropping the partial patch at the bottom
    and right edges (timm's ``PatchEmbed`` at a strict ``img_size`` that is not a multiple of the
    patch, e.g. SigLIP so400m at 384 / 14; Hugging Face's embeddings). While torch.export traces
    dynamic sizes, a copy (``_crop_dynamic`` says why).

    Example:
        >>> crop_to_patches(torch.zeros(2, 3, 384, 390), 14).shape
        torch.Size([2, 3, 378, 378])
    """
    height, width = x.shape[-2], x.shape[-1]
    if isinstance(height, _RECORDED) or isinstance(width, _RECORDED):
        return x[..., : height - height % patch, : width - width % patch]  # sliced in the fx / jit.trace graph
    if _dynamic(height, width):
        return _crop_dynamic(x, height, width, patch)
    if not (height % patch or width % patch) or height < patch or width < patch:
        return x  # already whole; or smaller than one patch: left for the op's error, which names it
    return x[..., : height - height % patch, : width - width % patch]


def _crop_dynamic(x: torch.Tensor, height, width, patch: int) -> torch.Tensor:
    """The crop of dynamic sizes while torch.compile or torch.export traces, asking nothing of them:
    a branch on whether they are whole patches would be a guard (a recompile when it flips, where
    the unpatched Conv2d compiles once; torch.export's "Constraints violated" for a dynamic Dim).

    - torch.compile: the view.
    - torch.export: a strided view's contiguity depends on H % p and W % p, and export records it
      as a guard (at export, or as a runtime assertion in the program). Sizes not known to be whole
      are cropped by F.pad with negative pads: a contiguous copy of the cropped images (3 channels:
      small beside the tokens the embedding writes).
    """
    if not torch.compiler.is_exporting():
        return x[..., : height - height % patch, : width - width % patch]
    if not torch.compiler.is_dynamo_compiling() and all(
        statically_known_true(size % patch == 0) for size in (height, width)
    ):
        return x  # non-strict export: a dynamic size known to be whole patches (Dim multiples)
    return F.pad(x, (0, -(width % patch), 0, -(height % patch)))


def _torch_route(x, weight, bias, pos_embed, prefix_tokens, pad):
    patch = weight.shape[-1]
    if pad:
        x = pad_to_patches(x, patch)
    return assemble_tokens(F.conv2d(x, weight, bias, stride=patch), pos_embed, prefix_tokens)


def assemble_tokens(
    grid: torch.Tensor, pos_embed: torch.Tensor | None, prefix_tokens: torch.Tensor | None
) -> torch.Tensor:
    """The patch conv's (B, D, h, w) output -> (B, P+N, D) tokens: flattened, the prefix tokens
    before the patches, pos_embed added (over P+N tokens, or over the N patches alone), as the
    ``torch`` route computes it.

    Example:
        >>> assemble_tokens(torch.zeros(2, 8, 3, 4), torch.ones(1, 13, 8), torch.zeros(1, 1, 8)).shape
        torch.Size([2, 13, 8])
    """
    tokens = grid.flatten(2).transpose(1, 2)  # NCHW -> NLC
    if pos_embed is not None and pos_embed.shape[1] == tokens.shape[1]:
        tokens = tokens + pos_embed  # patches only (also the P == 0 case)
        pos_embed = None
    if prefix_tokens is not None:
        tokens = torch.cat([prefix_tokens.expand(grid.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _validate(x, weight, bias, pos_embed, prefix_tokens, pad) -> None:
    check_tensor("x", x, ndim=4, dtypes=_ALL_DTYPES, shape_hint="(batch, channels, height, width)")
    check_tensor("weight", weight, ndim=4, dtypes=_ALL_DTYPES, shape_hint="(embed_dim, channels, patch, patch)")
    check_optional_tensor("bias", bias, ndim=1, dtypes=_ALL_DTYPES, shape_hint="(embed_dim,)")
    check_optional_tensor("pos_embed", pos_embed, ndim=3, dtypes=_ALL_DTYPES, shape_hint="(1, tokens, embed_dim)")
    check_optional_tensor(
        "prefix_tokens", prefix_tokens, ndim=3, dtypes=_ALL_DTYPES, shape_hint="(1, num_prefix, embed_dim)"
    )
    check_same_device(x=x, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    _, chans, height, width = x.shape
    dim, w_chans, kh, kw = weight.shape
    if chans == 0 or height == 0 or width == 0:
        raise ValueError(f"x must have at least one channel, row and column, got shape {tuple(x.shape)}")
    if dim == 0:
        raise ValueError(f"weight must have at least one output channel (embed_dim), got shape {tuple(weight.shape)}")
    if kh != kw:
        raise ValueError(f"weight must be a square (embed_dim, channels, p, p) kernel, got shape {tuple(weight.shape)}")
    if kh == 0:
        raise ValueError(f"weight must have a patch size of at least 1, got shape {tuple(weight.shape)}")
    if w_chans != chans:
        raise ValueError(
            f"x has {chans} channels but weight expects {w_chans}: x is {tuple(x.shape)} (B, C, H, W), "
            f"weight is {tuple(weight.shape)} (D, C, p, p)"
        )
    if bias is not None and bias.shape[0] != dim:
        raise ValueError(
            f"bias must have shape ({dim},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}"
        )
    patch = kh
    if not pad and (height % patch or width % patch):
        raise ValueError(
            f"x's height and width must be multiples of the patch size {patch}, got x {tuple(x.shape)}; "
            "pass dynamic_img_pad=True to zero-pad the bottom and right edges"
        )
    grid_h, grid_w = -(-height // patch), -(-width // patch)
    n = grid_h * grid_w
    num_prefix = 0
    if prefix_tokens is not None:
        if prefix_tokens.shape[0] != 1 or prefix_tokens.shape[2] != dim:
            raise ValueError(
                f"prefix_tokens must have shape (1, P, {dim}) (embed_dim from weight {tuple(weight.shape)}), "
                f"got {tuple(prefix_tokens.shape)}"
            )
        num_prefix = prefix_tokens.shape[1]
    if pos_embed is not None and (
        pos_embed.shape[0] != 1 or pos_embed.shape[2] != dim or pos_embed.shape[1] not in (n, num_prefix + n)
    ):
        lengths = f"{n} or {num_prefix + n}" if num_prefix else f"{n}"
        raise ValueError(
            f"pos_embed must have shape (1, L, {dim}) with L = {lengths} ({n} patches of x {tuple(x.shape)} "
            f"with patch size {patch}, {num_prefix} prefix tokens), got {tuple(pos_embed.shape)}"
        )


def _num_tokens(x: torch.Tensor, patch: int, prefix_tokens: torch.Tensor | None) -> int:
    """P + N tokens per image (with dynamic padding's ceil grid: the larger of the two)."""
    return (0 if prefix_tokens is None else prefix_tokens.shape[1]) + -(-x.shape[2] // patch) * -(-x.shape[3] // patch)


@fx_leaf  # one node in torch.fx graphs
def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    prefix_tokens: torch.Tensor | None = None,
    dynamic_img_pad: bool = False,
) -> torch.Tensor:
    """A ViT's patch embedding in one kernel: Conv2d(stride = kernel = p), flatten, transpose,
    prefix-token concat and position-embedding add.

    Args:
        x: (B, C, H, W) images, contiguous or channels_last (any strides; never copied).
        weight: (D, C, p, p) Conv2d weight (timm ``PatchEmbed.proj.weight``, torchvision
            ``conv_proj.weight``, Hugging Face ``ViTPatchEmbeddings.projection.weight``).
        bias: (D,) Conv2d bias, or None.
        pos_embed: (1, P+N, D), added to every token after the prefix tokens are prepended, or
            (1, N, D), added to the patch tokens only (timm's ``no_embed_class``); or None.
        prefix_tokens: (1, P, D) cls, distillation and register tokens, in that order; or None.
        dynamic_img_pad: zero-pad the bottom and right edges of x to multiples of p (timm's
            ``dynamic_img_pad``; the padding is masked in the kernel, never materialised). Without
            it, H and W must be multiples of p.

    Returns:
        (B, P+N, D) tokens, N = (H/p) * (W/p), in the dtype the composite would give: the inputs'
        dtype, or under autocast the autocast dtype, promoted with that of prefix_tokens and
        pos_embed (fp32 model parameters give fp32 tokens, as torch.cat and + would).

    dtypes: fp16, bf16 and fp32 run the kernels (fp32 with IEEE fp32 dots, no TF32); float64 runs
    the ``torch`` route. Under autocast the GEMM runs in the autocast dtype like F.conv2d (fp32
    images are rounded in registers, not copied). Differentiable in every tensor argument.

    Example:
        >>> x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        >>> conv = torch.nn.Conv2d(3, 768, 16, stride=16, device="cuda", dtype=torch.bfloat16)
        >>> cls = torch.zeros(1, 1, 768, device="cuda", dtype=torch.bfloat16)
        >>> pos = torch.zeros(1, 197, 768, device="cuda", dtype=torch.bfloat16)
        >>> fastvit.patch_embed(x, conv.weight, conv.bias, pos_embed=pos, prefix_tokens=cls).shape
        torch.Size([8, 197, 768])
    """
    check_flags(dynamic_img_pad=dynamic_img_pad)
    pad = dynamic_img_pad
    _validate(x, weight, bias, pos_embed, prefix_tokens, pad)
    if prefix_tokens is not None and prefix_tokens.shape[1] == 0:
        prefix_tokens = None  # nothing to prepend (and, like the composite, no dtype promotion)
    x, weight, bias, pos_embed, prefix_tokens = usable_in_autograd(x, weight, bias, pos_embed, prefix_tokens)
    device = x.device
    cast_to = autocast_dtype(device)
    train = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, pos_embed, prefix_tokens)
    )
    patch = weight.shape[-1]
    route = resolve_backend(
        device, "patch_embed",
        lambda: patch_embed_bucket(x.shape[1], patch, weight.shape[0], cast_to or weight.dtype,
                                   x.shape[0] * -(-x.shape[2] // patch) * -(-x.shape[3] // patch), train),
    )
    if route == "cuda" and pad:
        # the extension does not cover dynamic padding (the Triton kernel masks it): run what an op
        # outside the extension runs under this backend
        route = resolve_backend(device)
    if route in ("triton", "cuda"):
        dtypes = {t.dtype for t in (x, weight, bias, pos_embed, prefix_tokens) if t is not None}
        if not dtypes <= set(_KERNEL_DTYPES) or (cast_to is not None and cast_to not in _KERNEL_DTYPES):
            warn_once(
                "patch_embed:float64",
                f"fastvit.patch_embed: the {route} backend takes fp16, bf16 and fp32; running the torch "
                f"composite for dtypes {sorted(str(d) for d in dtypes)}",
            )
            route = "torch"
        elif route == "triton" and interpreter_dtype_problem(device, cast_to or weight.dtype):
            problem = interpreter_dtype_problem(device, cast_to or weight.dtype)
            warn_once(f"patch_embed:{problem}", f"fastvit.patch_embed: the triton backend does not cover {problem}; "
                      "running the torch composite instead")
            route = "torch"
        elif x.shape[1] * x.shape[2] * x.shape[3] >= _MAX_IMAGE_NUMEL:
            warn_once(
                "patch_embed:huge-image",
                f"fastvit.patch_embed: one image of x {tuple(x.shape)} has 2^31 elements or more, past "
                "the kernels' int32 offsets; running the torch composite",
            )
            route = "torch"
        elif _num_tokens(x, patch, prefix_tokens) * weight.shape[0] >= _MAX_IMAGE_NUMEL:
            warn_once(
                "patch_embed:huge-tokens",
                f"fastvit.patch_embed: the tokens of one image of x {tuple(x.shape)} hold 2^31 elements or "
                "more (tokens x embed dim), past the kernels' int32 offsets; running the torch composite",
            )
            route = "torch"
    if route == "torch":
        if autocast_dtype(device) is None:
            check_same_dtype(x=x, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
        return _torch_route(x, weight, bias, pos_embed, prefix_tokens, pad)

    cast_to = autocast_dtype(device)
    if cast_to is None:
        check_same_dtype(x=x, weight=weight, bias=bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens)
    else:
        # F.conv2d's rule: the GEMM in the autocast dtype. fp32 images stay fp32 (the kernel rounds
        # them as it loads them); the tokens take the dtype torch.cat / + would promote to.
        weight = weight.to(cast_to)
        bias = None if bias is None else bias.to(cast_to)
        if x.dtype not in (torch.float32, cast_to):
            x = x.to(cast_to)
        out_dtype = cast_to
        for t in (pos_embed, prefix_tokens):
            if t is not None:
                out_dtype = torch.promote_types(out_dtype, t.dtype)
        pos_embed = None if pos_embed is None else pos_embed.to(out_dtype)
        prefix_tokens = None if prefix_tokens is None else prefix_tokens.to(out_dtype)
    if route == "cuda":
        return call(_patch_embed_cuda_fwd, _patch_embed_cuda_fwd_function, x, weight, bias, pos_embed, prefix_tokens)
    return call(_patch_embed_fwd, _patch_embed_fwd_function, x, weight, bias, pos_embed, prefix_tokens, pad)
