"""``fastvit.layernorm_mlp``: input checks, autocast rule, backend dispatch and autograd.

The Triton route is a pair of ``torch.library`` custom ops (``fastvit::layernorm_mlp_fwd`` and
``fastvit::layernorm_mlp_bwd``) with fake implementations and an autograd formula, so the op
works under ``torch.compile(fullgraph=True)``. The ``cuda`` route is the extension's pair
(``fastvit_C::layernorm_mlp_fwd`` / ``_bwd``, ``TORCH_LIBRARY`` ops with fakes in
``fastvit.extension``) inside a custom-op pair defined here at import (``fastvit::layernorm_mlp_cuda_fwd``
/ ``_bwd``) with its fake and autograd formula. The ``torch`` route is the
composite of torch ops (``F.layer_norm``, ``F.linear``, ``F.gelu``, multiplies and the residual add).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastvit.backend import interpreter_dtype_problem, resolve_backend, warn_once
from fastvit.ops._autograd import call, function_twin, no_double_backward
from fastvit.ops._checks import (
    autocast_dtype,
    check_flags,
    check_optional_tensor,
    check_same_device,
    check_same_dtype,
    check_tensor,
    usable_in_autograd,
)
from fastvit.ops._fx import fx_leaf
from fastvit.tuning import layernorm_mlp_bucket

__all__ = ["layernorm_mlp"]

# dtypes the Triton kernels take; float64 is valid input and runs on the torch route.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_APPROXIMATE = ("none", "tanh")
_NUM_GRADS = 9  # x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale
# widest rows the extension's LayerNorm kernels take (one row per block, in registers)
_CUDA_MAX_DIM = 8192


# ---------------------------------------------------------------------------------------------
# Triton route: custom ops
# ---------------------------------------------------------------------------------------------
def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (B, N, D) with B = x.shape[0] (the sample_scale axis): a view for (T, D),
    (B, N, D) and any mergeable layout; reshape copies only an unmergeable (>3-D) layout."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


@torch.library.custom_op("fastvit::layernorm_mlp_fwd", mutates_args=())
def _layernorm_mlp_fwd(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    eps: float,
    approximate: str,
    residual: bool,
    out_dtype: torch.dtype,
    save_preact: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvit.kernels.layernorm_mlp import layernorm_mlp_fwd

    y, pre, mean, rstd = layernorm_mlp_fwd(
        _as_tokens(x), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
        sample_scale, eps=eps, approximate=approximate, residual=residual, out_dtype=out_dtype,
        save_preact=save_preact,
    )
    if pre is None:  # inference: nothing kept for a backward
        pre = x.new_empty((0,), dtype=fc1_weight.dtype)
    return y.view(x.shape), pre, mean, rstd


@_layernorm_mlp_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
      eps, approximate, residual, out_dtype, save_preact):
    rows = x.numel() // x.shape[-1]
    pre_shape = (rows, fc1_weight.shape[0]) if save_preact else (0,)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(pre_shape, dtype=fc1_weight.dtype),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
    )


def _fake_grads(needs, *inputs):
    """The fake of a backward op: a contiguous gradient per needed input, (0,) elsewhere."""
    x = inputs[0]
    return [
        torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else x.new_empty((0,))
        for t, need in zip(inputs, needs, strict=True)
    ]


@torch.library.custom_op("fastvit::layernorm_mlp_bwd", mutates_args=())
def _layernorm_mlp_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    preact: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    approximate: str,
    residual: bool,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients for the 9 tensor inputs; an empty (0,) tensor stands for "not computed"."""
    from fastvit.kernels.layernorm_mlp_bwd import layernorm_mlp_bwd

    if grad_out.shape[-1] > 1 and grad_out.stride(-1) not in (0, 1):
        # the kernels take any strides for grad_out, but read D as a vector: a gradient that is
        # neither unit-stride nor broadcast in D is rare enough to copy
        grad_out = grad_out.contiguous()
    grads = layernorm_mlp_bwd(
        _as_tokens(grad_out), _as_tokens(x), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
        fc2_bias, layer_scale, sample_scale, preact, mean, rstd,
        approximate=approximate, residual=residual, needs=tuple(needs),
    )
    if grads[0] is not None:
        grads[0] = grads[0].view(x.shape)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


@_layernorm_mlp_bwd.register_fake
def _(grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
      sample_scale, preact, mean, rstd, approximate, residual, needs):
    return _fake_grads(needs, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
                       sample_scale)


def _setup_context(ctx, inputs, output):
    """Both routes: keep the 9 tensor inputs and every internal output (preact, mean, rstd, and on
    the cuda route branch) for the backward, and the scalar arguments it needs."""
    ctx.save_for_backward(*inputs[:_NUM_GRADS], *output[1:])
    ctx.eps, ctx.approximate, ctx.residual, _out_dtype, ctx.save_preact = inputs[_NUM_GRADS:]


def _run_backward(ctx, backward_op):
    """Both routes: the gradients ``backward_op(needs)`` computes, None where not needed. The
    internal outputs (preact, mean, rstd, branch) get no gradient: the public op returns y only."""
    if not ctx.save_preact:
        raise RuntimeError(
            "fastvit.layernorm_mlp: the forward ran without saving activations (no input required "
            "grad when it ran), so it cannot be differentiated"
        )
    needs = [bool(n) for n in ctx.needs_input_grad[:_NUM_GRADS]]
    grads = backward_op(needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), None, None, None, None, None)


def _backward(ctx, grad_out, *_internal):
    return _run_backward(ctx, lambda needs: call(
        _layernorm_mlp_bwd, _layernorm_mlp_bwd_function, grad_out, *ctx.saved_tensors, ctx.approximate,
        ctx.residual, needs,
    ))


_layernorm_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)
# first derivatives only: a double backward raises an error naming the torch route; the twins run
# under torch.func transforms (fastvit.ops._autograd)
_layernorm_mlp_bwd_function = no_double_backward(_layernorm_mlp_bwd, "layernorm_mlp")
_layernorm_mlp_fwd_function = function_twin(_layernorm_mlp_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# cuda route: the extension's fastvit_C::layernorm_mlp_fwd / _bwd inside a custom-op pair defined
# here, at import, with its fake and autograd: torch.compile can trace a call whatever the order
# in which the extension is loaded (the C++ ops have their own fakes for direct use)
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::layernorm_mlp_cuda_fwd", mutates_args=())
def _layernorm_mlp_cuda_fwd(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    eps: float,
    approximate: str,
    residual: bool,
    out_dtype: torch.dtype,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, preact, mean, rstd, branch) of ``fastvit_C::layernorm_mlp_fwd``; x is (B, N, D)."""
    return tuple(torch.ops.fastvit_C.layernorm_mlp_fwd(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale, eps,
        approximate, residual, out_dtype, save_for_backward,
    ))


@_layernorm_mlp_cuda_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale, eps,
      approximate, residual, out_dtype, save_for_backward):
    rows, dim, gemm = x.shape[0] * x.shape[1], x.shape[2], fc1_weight.dtype
    keep_branch = save_for_backward and (layer_scale is not None or sample_scale is not None)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty((rows, fc1_weight.shape[0]) if save_for_backward else (0,), dtype=gemm),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows,), dtype=torch.float32),
        x.new_empty((rows, dim) if keep_branch else (0,), dtype=gemm),
    )


@torch.library.custom_op("fastvit::layernorm_mlp_cuda_bwd", mutates_args=())
def _layernorm_mlp_cuda_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    layer_scale: torch.Tensor | None,
    sample_scale: torch.Tensor | None,
    preact: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    branch: torch.Tensor,
    eps: float,
    approximate: str,
    residual: bool,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients of the 9 tensor inputs of ``fastvit_C::layernorm_mlp_bwd``; (0,) where not needed."""
    return list(torch.ops.fastvit_C.layernorm_mlp_bwd(
        grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
        preact, mean, rstd, branch, eps, approximate, residual, needs,
    ))


@_layernorm_mlp_cuda_bwd.register_fake
def _(grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
      preact, mean, rstd, branch, eps, approximate, residual, needs):
    return _fake_grads(needs, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
                       sample_scale)


def _cuda_backward(ctx, grad_out, *_internal):
    if grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
        # the kernels read D as unit-stride vectors (row strides are free, 0 included); a gradient
        # strided or broadcast along D (out.sum() gives one) is copied once
        grad_out = grad_out.contiguous()
    return _run_backward(ctx, lambda needs: call(
        _layernorm_mlp_cuda_bwd, _layernorm_mlp_cuda_bwd_function, grad_out, *ctx.saved_tensors, ctx.eps,
        ctx.approximate, ctx.residual, needs,
    ))


_layernorm_mlp_cuda_fwd.register_autograd(_cuda_backward, setup_context=_setup_context)
_layernorm_mlp_cuda_bwd_function = no_double_backward(_layernorm_mlp_cuda_bwd, "layernorm_mlp")
_layernorm_mlp_cuda_fwd_function = function_twin(_layernorm_mlp_cuda_fwd, _setup_context, _cuda_backward)


# ---------------------------------------------------------------------------------------------
# torch route: the composite
# ---------------------------------------------------------------------------------------------
def _composite(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate,
               residual, layer_scale, sample_scale):
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    h = F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias), approximate=approximate), fc2_weight, fc2_bias)
    if layer_scale is not None:
        h = h * layer_scale
    if sample_scale is not None:
        h = h * sample_scale.reshape((-1,) + (1,) * (x.dim() - 1))
    return x + h if residual else h


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _check_vector(name: str, t: torch.Tensor | None, length: int, what: str) -> None:
    check_optional_tensor(name, t, ndim=1, dtypes=_ALL_DTYPES, shape_hint=f"({what},)")
    if t is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) ({what}), got {tuple(t.shape)}")


def _validate(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate,
              residual, layer_scale, sample_scale) -> None:
    check_tensor("x", x, dtypes=_ALL_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    check_tensor("fc1_weight", fc1_weight, ndim=2, dtypes=_ALL_DTYPES, shape_hint="(hidden, D)")
    hidden = fc1_weight.shape[0]
    if fc1_weight.shape[1] != dim or hidden == 0:
        raise ValueError(
            f"fc1_weight must have shape (hidden, D={dim}) with hidden >= 1 (nn.Linear layout), "
            f"got {tuple(fc1_weight.shape)} for x of shape {tuple(x.shape)}"
        )
    check_tensor("fc2_weight", fc2_weight, ndim=2, dtypes=_ALL_DTYPES, shape_hint="(D, hidden)")
    if tuple(fc2_weight.shape) != (dim, hidden):
        raise ValueError(
            f"fc2_weight must have shape (D={dim}, hidden={hidden}) (nn.Linear layout), "
            f"got {tuple(fc2_weight.shape)}"
        )
    _check_vector("norm_weight", norm_weight, dim, "D")
    _check_vector("norm_bias", norm_bias, dim, "D")
    _check_vector("fc1_bias", fc1_bias, hidden, "hidden")
    _check_vector("fc2_bias", fc2_bias, dim, "D")
    _check_vector("layer_scale", layer_scale, dim, "D")
    if sample_scale is not None:
        if x.dim() < 2:
            raise ValueError(f"sample_scale needs x with a leading batch dim, got x of shape {tuple(x.shape)}")
        _check_vector("sample_scale", sample_scale, x.shape[0], "x.shape[0]")
    check_same_device(x=x, norm_weight=norm_weight, norm_bias=norm_bias, fc1_weight=fc1_weight,
                      fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias, layer_scale=layer_scale,
                      sample_scale=sample_scale)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if approximate not in _APPROXIMATE:
        raise ValueError(f"approximate must be one of {_APPROXIMATE} (GELU flavour), got {approximate!r}")
    check_flags(residual=residual)


@fx_leaf  # one node in torch.fx graphs
def layernorm_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    layer_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LayerNorm + MLP half of a pre-norm ViT block, fused.

    ``x + sample_scale * layer_scale * fc2(gelu(fc1(layer_norm(x))))`` over the last dim, written
    once; the backward recomputes LayerNorm and GELU (it keeps only fc1's pre-activation and two
    fp32 statistics per token).

    Args:
        x: (..., D) tokens, e.g. (B, N, D) or (T, D).
        norm_weight, norm_bias: (D,) LayerNorm affine parameters, or None.
        fc1_weight: (hidden, D), fc1_bias: (hidden,) or None -- nn.Linear layout.
        fc2_weight: (D, hidden), fc2_bias: (D,) or None.
        eps: LayerNorm epsilon (> 0; timm uses 1e-6, Hugging Face ViT 1e-12).
        approximate: GELU flavour, ``"none"`` (erf) or ``"tanh"``.
        residual: add x to the branch (False returns the branch alone).
        layer_scale: (D,) timm LayerScale gamma, or None.
        sample_scale: (x.shape[0],) per-sample factor on the branch (drop-path's mask / keep_prob
            in training), or None.

    Returns:
        Tensor of x's shape. dtype: x's outside autocast; under autocast the composite's (fp32
        for timm's fp32 residual stream, the autocast dtype for ``residual=False`` with no fp32
        scale).

    dtypes: fp16, bf16 and fp32 run the kernels (fp32 with IEEE fp32 dots, no TF32); float64
    runs the ``torch`` route, as do rows wider than 4096 (``MAX_DIM``), with one warning. Under autocast the
    linears run in the autocast dtype (weights cast like ``F.linear``), LayerNorm statistics in
    fp32. Differentiable in every tensor argument.

    Example:
        >>> mlp = torch.nn.ModuleDict(dict(norm=nn.LayerNorm(768, eps=1e-6), fc1=nn.Linear(768, 3072),
        ...                                fc2=nn.Linear(3072, 768))).cuda().bfloat16()
        >>> x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16)
        >>> y = fastvit.layernorm_mlp(x, mlp.norm.weight, mlp.norm.bias, mlp.fc1.weight, mlp.fc1.bias,
        ...                           mlp.fc2.weight, mlp.fc2.bias)   # (8, 197, 768)
    """
    _validate(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate,
              residual, layer_scale, sample_scale)
    device = x.device
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale = (
        usable_in_autograd(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
                           sample_scale)
    )
    tensors = dict(x=x, norm_weight=norm_weight, norm_bias=norm_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                   fc2_weight=fc2_weight, fc2_bias=fc2_bias, layer_scale=layer_scale, sample_scale=sample_scale)
    cast_to = autocast_dtype(device)
    if cast_to is None or any(t is not None and t.dtype == torch.float64 for t in tensors.values()):
        check_same_dtype(**tensors)
        cast_to = None

    gemm_dtype = fc1_weight.dtype if cast_to is None else cast_to
    save_preact = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values())
    route = resolve_backend(
        device, "layernorm_mlp",
        lambda: layernorm_mlp_bucket(x.shape[-1], fc1_weight.shape[0], gemm_dtype, x.numel() // x.shape[-1],
                                     save_preact),
    )
    if route in ("triton", "cuda"):
        from fastvit.kernels.layernorm_mlp import MAX_DIM

        max_dim = MAX_DIM if route == "triton" else _CUDA_MAX_DIM
        reason = None
        if x.dtype == torch.float64:
            reason = "dtype float64"
        elif x.shape[-1] > max_dim:
            reason = f"D = {x.shape[-1]} > {max_dim}"
        elif route == "triton" and interpreter_dtype_problem(device, gemm_dtype):
            reason = interpreter_dtype_problem(device, gemm_dtype)
        if reason is not None:
            warn_once(
                f"layernorm_mlp:{route}:{reason}",
                f"fastvit.layernorm_mlp: the {route} backend does not cover {reason}; running the composite "
                "of torch ops instead",
            )
            route = "torch"
        elif x.numel() == 0:
            route = "torch"  # nothing to compute; the composite gives the empty result and its grads
    if route == "torch":
        if cast_to is not None:
            # LayerNorm in fp32 under autocast, as CUDA's autocast runs F.layer_norm; CPU autocast
            # leaves it alone, and it rejects affine parameters of a dtype other than x's or fp32
            norm_weight, norm_bias = (
                t if t is None or t.dtype == x.dtype else t.float() for t in (norm_weight, norm_bias)
            )
        return _composite(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps),
                          approximate, residual, layer_scale, sample_scale)

    # -- autocast rule (F.linear's): the GEMMs in the autocast dtype; LN statistics in fp32; the
    #    output in the composite's dtype (its scale multiplies and residual add promote) --
    if cast_to is not None:
        fc1_weight, fc2_weight = fc1_weight.to(cast_to), fc2_weight.to(cast_to)
        fc1_bias = fc1_bias.to(cast_to) if fc1_bias is not None else None
        fc2_bias = fc2_bias.to(cast_to) if fc2_bias is not None else None
    out_dtype = gemm_dtype
    for t in (layer_scale, sample_scale, x if residual else None):
        if t is not None:
            out_dtype = torch.promote_types(out_dtype, t.dtype)

    # the kernels read every last dim with a unit stride (x's other strides are free: views of a
    # token buffer are not copied); a transposed weight or strided vector is rare enough to copy
    x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale = (
        _unit_last_stride(t)
        for t in (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale)
    )
    if route == "cuda":
        y = call(
            _layernorm_mlp_cuda_fwd, _layernorm_mlp_cuda_fwd_function,
            _as_tokens(x), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
            sample_scale, float(eps), approximate, residual, out_dtype, save_preact,
        )[0]
        return y.view(x.shape)
    y, _, _, _ = call(
        _layernorm_mlp_fwd, _layernorm_mlp_fwd_function,
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
        float(eps), approximate, residual, out_dtype, save_preact,
    )
    return y
