"""``fastvit.layernorm_mlp``: input checks, autocast rule, backend dispatch and autograd.

Variants (the MLPs of today's vision towers): ``activation`` "gelu" (erf), "gelu_tanh",
"quick_gelu" (CLIP), "silu"; ``norm`` "layernorm", "rms" (Pixtral, AIMv2) or "none" (the MLP
alone: post-norm blocks, Swin V2); gated MLPs (SwiGLU: DINOv2-giant, DINOv3, AIMv2), packed or as
two linears; LayerScale (DINOv2/v3, timm). The Triton route covers all of them; the ``cuda`` route
covers the GELU LayerNorm MLP and runs the others on the ``torch`` route with one warning.

The Triton route is a pair of ``torch.library`` custom ops (``fastvit::layernorm_mlp_fwd`` and
``fastvit::layernorm_mlp_bwd``) with fake implementations and an autograd formula, so the op
works under ``torch.compile(fullgraph=True)``. The ``cuda`` route is the extension's pair
(``fastvit_C::layernorm_mlp_fwd`` / ``_bwd``, ``TORCH_LIBRARY`` ops with fakes in
``fastvit.extension``) inside a custom-op pair defined here at import (``fastvit::layernorm_mlp_cuda_fwd``
/ ``_bwd``) with its fake and autograd formula. The ``torch`` route is the
composite of torch ops (``F.layer_norm``, ``F.linear``, ``F.gelu``, multiplies and the residual add).
"""

from __future__ import annotations

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
    is_finite,
    unit_last_stride,
    usable_in_autograd,
)
from fastvit.ops._fx import fx_leaf
from fastvit.tuning import layernorm_mlp_bucket

__all__ = ["layernorm_mlp"]

# dtypes the Triton kernels take; float64 is valid input and runs on the torch route.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}  # the GELU keyword of F.gelu -> activation
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
# other names the same functions go by (Hugging Face's ACT2FN keys, nn.SiLU's old name)
_ACTIVATION_ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "swish": "silu"}
NORMS = ("layernorm", "rms", "none")
HIDDEN_NORMS = ("none", "layernorm")  # a norm between the activation and fc2 (timm's scale_mlp)
# tensor inputs of the Triton custom op: x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
# fc2_bias, layer_scale, sample_scale, fc1_gate_weight, fc1_gate_bias, hidden_norm_weight,
# hidden_norm_bias; the cuda op takes the first 9
_NUM_GRADS = 13
_NUM_GRADS_CUDA = 9
# the backward ops return one tensor per input, a fixed tuple (not Tensor[]: PyTorch's batching
# fallback, which runs is_grads_batched / jacobian(vectorize=True), cannot loop over a list return)
_GRADS = tuple[(torch.Tensor,) * _NUM_GRADS]
_GRADS_CUDA = tuple[(torch.Tensor,) * _NUM_GRADS_CUDA]
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
    fc1_gate_weight: torch.Tensor | None,
    fc1_gate_bias: torch.Tensor | None,
    hidden_norm_weight: torch.Tensor | None,
    hidden_norm_bias: torch.Tensor | None,
    eps: float,
    activation: str,
    norm: str,
    gated: bool,
    residual: bool,
    out_dtype: torch.dtype,
    save_preact: bool,
    hidden_norm: bool,
    hidden_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvit.kernels.layernorm_mlp import layernorm_mlp_fwd

    # the public op lays every input out with a unit last stride; in a traced graph the computed ones
    # may come another way than its fake tensors said (the Parameters do not change layout)
    x, layer_scale, sample_scale = (unit_last_stride(t) for t in (x, layer_scale, sample_scale))
    y, pre, mean, rstd = layernorm_mlp_fwd(
        _as_tokens(x), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
        sample_scale, eps=eps, activation=activation, residual=residual, out_dtype=out_dtype,
        save_preact=save_preact, rms=norm == "rms", gated=gated, fc1_gate_weight=fc1_gate_weight,
        fc1_gate_bias=fc1_gate_bias, no_norm=norm == "none", hidden_norm=hidden_norm,
        hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias, hidden_eps=hidden_eps,
    )
    if pre is None:  # inference: nothing kept for a backward
        pre = x.new_empty((0,), dtype=fc1_weight.dtype)
    # y itself, not a view, where it has x's shape (the public op passes (B, N, D) tokens): a view
    # made inside the op could not be edited in place (a forward hook's o.add_()) before a backward
    return y if y.shape == x.shape else y.view(x.shape), pre, mean, rstd


@_layernorm_mlp_fwd.register_fake
def _(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
      fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias, eps, activation, norm, gated, residual,
      out_dtype, save_preact, hidden_norm, hidden_eps):
    rows = x.numel() // x.shape[-1]
    pre_shape = (rows, 2 * fc2_weight.shape[1] if gated else fc2_weight.shape[1]) if save_preact else (0,)
    stat_rows = (0 if norm == "none" else rows) + (rows if hidden_norm else 0)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(pre_shape, dtype=fc1_weight.dtype),
        x.new_empty((stat_rows,), dtype=torch.float32),
        x.new_empty((stat_rows,), dtype=torch.float32),
    )


def _fake_grads(needs, *inputs):
    """The fake of a backward op: a contiguous gradient per needed input, (0,) elsewhere."""
    x = inputs[0]
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else x.new_empty((0,))
        for t, need in zip(inputs, needs, strict=True)
    )


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
    fc1_gate_weight: torch.Tensor | None,
    fc1_gate_bias: torch.Tensor | None,
    hidden_norm_weight: torch.Tensor | None,
    hidden_norm_bias: torch.Tensor | None,
    preact: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    activation: str,
    norm: str,
    gated: bool,
    residual: bool,
    needs: list[bool],
    hidden_norm: bool,
) -> _GRADS:
    """Gradients for the 13 tensor inputs; an empty (0,) tensor stands for "not computed"."""
    from fastvit.kernels.layernorm_mlp_bwd import layernorm_mlp_bwd

    if grad_out.shape[-1] > 1 and grad_out.stride(-1) not in (0, 1):
        # the kernels take any strides for grad_out, but read D as a vector: a gradient that is
        # neither unit-stride nor broadcast in D is rare enough to copy
        grad_out = grad_out.contiguous()
    x_tokens = _as_tokens(unit_last_stride(x))  # x as saved: a traced graph's real layout may differ
    grads = layernorm_mlp_bwd(
        _as_tokens(grad_out), x_tokens, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight,
        fc2_bias, layer_scale, sample_scale, preact, mean, rstd,
        activation=activation, residual=residual, needs=tuple(needs), rms=norm == "rms", gated=gated,
        fc1_gate_weight=fc1_gate_weight, fc1_gate_bias=fc1_gate_bias, no_norm=norm == "none",
        hidden_norm=hidden_norm, hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias,
    )
    if grads[0] is not None:
        grads[0] = grads[0].view(x.shape)
    return tuple(g if g is not None else x.new_empty((0,)) for g in grads)


@_layernorm_mlp_bwd.register_fake
def _(grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
      sample_scale, fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias, preact, mean, rstd,
      activation, norm, gated, residual, needs, hidden_norm):
    return _fake_grads(needs, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
                       sample_scale, fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias)


def _setup_context(ctx, inputs, output):
    """Triton route: keep the 13 tensor inputs and the internal outputs (preact, mean, rstd) for
    the backward, and the scalar arguments it needs."""
    ctx.num_grads = _NUM_GRADS
    ctx.save_for_backward(*inputs[:_NUM_GRADS], *output[1:])
    # the internal outputs never get a gradient: no zeros of preact's (rows, hidden) per backward
    ctx.set_materialize_grads(False)
    (_eps, ctx.activation, ctx.norm, ctx.gated, ctx.residual, _out_dtype, ctx.save_preact, ctx.hidden_norm,
     _hidden_eps) = inputs[_NUM_GRADS:]


def _cuda_setup_context(ctx, inputs, output):
    """cuda route: keep the 9 tensor inputs and the internal outputs (preact, mean, rstd, branch)."""
    ctx.num_grads = _NUM_GRADS_CUDA
    ctx.save_for_backward(*inputs[:_NUM_GRADS_CUDA], *output[1:])
    ctx.set_materialize_grads(False)  # the internal outputs never get a gradient (see _setup_context)
    ctx.eps, ctx.approximate, ctx.residual, _out_dtype, ctx.save_preact = inputs[_NUM_GRADS_CUDA:]


def _run_backward(ctx, backward_op):
    """Both routes: the gradients ``backward_op(needs)`` computes, None where not needed. The
    internal outputs (preact, mean, rstd, branch) get no gradient: the public op returns y only."""
    if not ctx.save_preact:
        raise RuntimeError(
            "fastvit.layernorm_mlp: the forward ran without saving activations (no input required "
            "grad when it ran), so it cannot be differentiated"
        )
    needs = [bool(n) for n in ctx.needs_input_grad[:ctx.num_grads]]
    grads = backward_op(needs)
    scalars = len(ctx.needs_input_grad) - ctx.num_grads
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)), *(None,) * scalars)


def _backward(ctx, grad_out, *_internal):
    if grad_out is None:  # not materialised (see _setup_context): no gradient reached y
        return (None,) * len(ctx.needs_input_grad)
    return _run_backward(ctx, lambda needs: call(
        _layernorm_mlp_bwd, _layernorm_mlp_bwd_function, grad_out, *ctx.saved_tensors, ctx.activation,
        ctx.norm, ctx.gated, ctx.residual, needs, ctx.hidden_norm,
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
) -> _GRADS_CUDA:
    """Gradients of the 9 tensor inputs of ``fastvit_C::layernorm_mlp_bwd``; (0,) where not needed."""
    return tuple(torch.ops.fastvit_C.layernorm_mlp_bwd(
        grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
        preact, mean, rstd, branch, eps, approximate, residual, needs,
    ))


@_layernorm_mlp_cuda_bwd.register_fake
def _(grad_out, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
      preact, mean, rstd, branch, eps, approximate, residual, needs):
    return _fake_grads(needs, x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
                       sample_scale)


def _cuda_backward(ctx, grad_out, *_internal):
    if grad_out is None:  # not materialised (see _cuda_setup_context): no gradient reached y
        return (None,) * len(ctx.needs_input_grad)
    if grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
        # the kernels read D as unit-stride vectors (row strides are free, 0 included); a gradient
        # strided or broadcast along D (out.sum() gives one) is copied once
        grad_out = grad_out.contiguous()
    return _run_backward(ctx, lambda needs: call(
        _layernorm_mlp_cuda_bwd, _layernorm_mlp_cuda_bwd_function, grad_out, *ctx.saved_tensors, ctx.eps,
        ctx.approximate, ctx.residual, needs,
    ))


_layernorm_mlp_cuda_fwd.register_autograd(_cuda_backward, setup_context=_cuda_setup_context)
_layernorm_mlp_cuda_bwd_function = no_double_backward(_layernorm_mlp_cuda_bwd, "layernorm_mlp")
_layernorm_mlp_cuda_fwd_function = function_twin(_layernorm_mlp_cuda_fwd, _cuda_setup_context, _cuda_backward)


# ---------------------------------------------------------------------------------------------
# torch route: the composite
# ---------------------------------------------------------------------------------------------
def activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation named by ``resolve_activation`` ("gelu", "gelu_tanh", "quick_gelu", "silu"),
    elementwise on any tensor, as the ``torch`` route computes it.

    Example:
        >>> activate(torch.zeros(3), "silu")
        tensor([0., 0., 0.])
    """
    if activation == "quick_gelu":
        return a * torch.sigmoid(1.702 * a)
    if activation == "silu":
        return F.silu(a)
    return F.gelu(a, approximate="tanh" if activation == "gelu_tanh" else "none")


def _composite(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, activation, norm,
               gated, fc1_gate_weight, fc1_gate_bias, residual, layer_scale, sample_scale, hidden_norm="none",
               hidden_norm_weight=None, hidden_norm_bias=None, hidden_eps=1e-6):
    if norm == "none":
        h = x
    elif norm == "rms":
        h = F.rms_norm(x, (x.shape[-1],), norm_weight, eps)
    else:
        h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    a = F.linear(h, fc1_weight, fc1_bias)
    if not gated:
        h = activate(a, activation)
    elif fc1_gate_weight is not None:  # two linears: fc1 is the value (up) projection
        h = activate(F.linear(h, fc1_gate_weight, fc1_gate_bias), activation) * a
    else:  # packed [gate; value]
        gate, value = a.chunk(2, dim=-1)
        h = activate(gate, activation) * value
    if hidden_norm == "layernorm":
        h = F.layer_norm(h, (h.shape[-1],), hidden_norm_weight, hidden_norm_bias, hidden_eps)
    h = F.linear(h, fc2_weight, fc2_bias)
    if layer_scale is not None:
        h = h * layer_scale
    if sample_scale is not None:
        h = h * sample_scale.reshape((-1,) + (1,) * (x.dim() - 1))
    return x + h if residual else h


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _check_vector(name: str, t: torch.Tensor | None, length: int, what: str) -> None:
    check_optional_tensor(name, t, ndim=1, dtypes=_ALL_DTYPES, shape_hint=f"({what},)")
    if t is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) ({what}), got {tuple(t.shape)}")


def resolve_activation(approximate: str | None, activation: str | None) -> str:
    """The activation named by ``activation`` and the older GELU keyword ``approximate`` together.

    ``approximate="none"`` means ``"gelu"`` and ``"tanh"`` means ``"gelu_tanh"``; both may be given
    when they agree. Neither given: ``"gelu"``. Hugging Face's names ``"gelu_pytorch_tanh"`` and
    ``"gelu_new"`` mean ``"gelu_tanh"``, ``"swish"`` means ``"silu"``.

    Example:
        >>> resolve_activation("tanh", None), resolve_activation(None, "quick_gelu")
        ('gelu_tanh', 'quick_gelu')
    """
    if approximate is not None and approximate not in _APPROXIMATE:
        raise ValueError(
            f"approximate must be one of {tuple(_APPROXIMATE)} (GELU flavour) or None, got {approximate!r}"
        )
    if activation is not None:
        if not isinstance(activation, str) or _ACTIVATION_ALIASES.get(activation, activation) not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        activation = _ACTIVATION_ALIASES.get(activation, activation)
    if approximate is None:
        return activation or "gelu"
    if activation is not None and activation != _APPROXIMATE[approximate]:
        raise ValueError(
            f"approximate={approximate!r} means activation={_APPROXIMATE[approximate]!r}, which conflicts "
            f"with activation={activation!r}; pass activation alone"
        )
    return _APPROXIMATE[approximate]


def _fp32_norm_of_16bit_x(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None) -> bool:
    """fp16 / bf16 x with fp32 norm parameters: F.layer_norm takes that mix outside autocast."""
    params = [t for t in (norm_weight, norm_bias) if t is not None]
    return x.dtype in (torch.float16, torch.bfloat16) and bool(params) and all(t.dtype == torch.float32 for t in params)


def _validate(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, norm, gated,
              fc1_gate_weight, fc1_gate_bias, residual, layer_scale, sample_scale, hidden_norm, hidden_norm_weight,
              hidden_norm_bias, hidden_eps) -> None:
    check_tensor("x", x, dtypes=_ALL_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    dim = x.shape[-1]
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool or None, got {type(gated).__name__}")
    if fc1_gate_weight is not None and not gated:
        raise ValueError("fc1_gate_weight was given with gated=False; a gate weight makes the MLP gated")
    if fc1_gate_bias is not None and fc1_gate_weight is None:
        raise ValueError("fc1_gate_bias was given without fc1_gate_weight")
    check_tensor("fc1_weight", fc1_weight, ndim=2, dtypes=_ALL_DTYPES, shape_hint="(hidden, D)")
    fc1_rows = fc1_weight.shape[0]
    if fc1_weight.shape[1] != dim or fc1_rows == 0:
        raise ValueError(
            f"fc1_weight must have shape (hidden, D={dim}) with hidden >= 1 (nn.Linear layout), "
            f"got {tuple(fc1_weight.shape)} for x of shape {tuple(x.shape)}"
        )
    hidden = fc1_rows
    if gated and fc1_gate_weight is None:
        if fc1_rows % 2:
            raise ValueError(
                f"gated=True with one fc1_weight needs it packed as [gate; value], (2 * hidden, D={dim}); "
                f"got {tuple(fc1_weight.shape)} (odd rows)"
            )
        hidden = fc1_rows // 2
    if fc1_gate_weight is not None:
        check_tensor("fc1_gate_weight", fc1_gate_weight, ndim=2, dtypes=_ALL_DTYPES, shape_hint="(hidden, D)")
        if fc1_gate_weight.shape != fc1_weight.shape:
            raise ValueError(
                f"fc1_gate_weight must have fc1_weight's shape {tuple(fc1_weight.shape)} (gate_proj beside "
                f"up_proj), got {tuple(fc1_gate_weight.shape)}"
            )
    check_tensor("fc2_weight", fc2_weight, ndim=2, dtypes=_ALL_DTYPES, shape_hint="(D, hidden)")
    if tuple(fc2_weight.shape) != (dim, hidden):
        what = " (gated: half of fc1's rows)" if gated and fc1_gate_weight is None else ""
        raise ValueError(
            f"fc2_weight must have shape (D={dim}, hidden={hidden}){what} (nn.Linear layout), "
            f"got {tuple(fc2_weight.shape)}"
        )
    if norm == "none" and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight and norm_bias must be None with norm='none' (the MLP alone)")
    _check_vector("norm_weight", norm_weight, dim, "D")
    if norm == "rms" and norm_bias is not None:
        raise ValueError("norm_bias must be None with norm='rms' (RMSNorm has no bias)")
    _check_vector("norm_bias", norm_bias, dim, "D")
    _check_vector("fc1_bias", fc1_bias, fc1_rows, "fc1_weight.shape[0]")
    _check_vector("fc1_gate_bias", fc1_gate_bias, fc1_rows, "fc1_gate_weight.shape[0]")
    _check_vector("fc2_bias", fc2_bias, dim, "D")
    _check_vector("layer_scale", layer_scale, dim, "D")
    if sample_scale is not None:
        if x.dim() < 2:
            raise ValueError(f"sample_scale needs x with a leading batch dim, got x of shape {tuple(x.shape)}")
        _check_vector("sample_scale", sample_scale, x.shape[0], "x.shape[0]")
    if hidden_norm not in HIDDEN_NORMS:
        raise ValueError(f"hidden_norm must be one of {HIDDEN_NORMS}, got {hidden_norm!r}")
    if hidden_norm == "none" and (hidden_norm_weight is not None or hidden_norm_bias is not None):
        raise ValueError("hidden_norm_weight and hidden_norm_bias were given with hidden_norm='none'; pass "
                         "hidden_norm='layernorm' for a norm between the activation and fc2")
    _check_vector("hidden_norm_weight", hidden_norm_weight, hidden, "hidden, fc2_weight.shape[1]")
    _check_vector("hidden_norm_bias", hidden_norm_bias, hidden, "hidden, fc2_weight.shape[1]")
    check_same_device(x=x, norm_weight=norm_weight, norm_bias=norm_bias, fc1_weight=fc1_weight,
                      fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias, layer_scale=layer_scale,
                      sample_scale=sample_scale, fc1_gate_weight=fc1_gate_weight, fc1_gate_bias=fc1_gate_bias,
                      hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias)
    for name, value in (("eps", eps), ("hidden_eps", hidden_eps)):
        if value is None and name == "hidden_eps":  # the input norm's eps
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not (is_finite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
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
    approximate: str | None = None,
    activation: str | None = None,
    norm: str = "layernorm",
    gated: bool | None = None,
    fc1_gate_weight: torch.Tensor | None = None,
    fc1_gate_bias: torch.Tensor | None = None,
    residual: bool = True,
    layer_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
    hidden_norm: str = "none",
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
    hidden_eps: float | None = None,
) -> torch.Tensor:
    """The norm + MLP half of a pre-norm ViT block, fused.

    ``x + sample_scale * layer_scale * fc2(act(fc1(norm(x))))`` over the last dim, written once;
    gated: ``fc2(act(gate) * value)``; with a hidden norm: ``fc2(LN(act(...)))``. The backward
    recomputes the norms and the activation (it keeps only fc1's pre-activation and two fp32
    statistics per token and norm).

    Args:
        x: (..., D) tokens, e.g. (B, N, D) or (T, D); any strides (a transposed view, such as a
            conv map's (B, C, H*W) seen as tokens, is copied once to a unit stride in D).
        norm_weight, norm_bias: (D,) norm affine parameters, or None (``norm_bias`` None for RMSNorm);
            in x's dtype, or fp32 with fp16 / bf16 x (F.layer_norm's mix: a 16-bit model keeping its
            norms in fp32). Outside autocast every other tensor has x's dtype.
        fc1_weight: (hidden, D), fc1_bias: (hidden,) or None -- nn.Linear layout. Gated with one
            fc1 (timm's ``SwiGLUPacked``, Hugging Face's ``Dinov2SwiGLUFFN`` ``weights_in``):
            (2 * hidden, D) packed as [gate; value], ``act(first half) * second half``. Gated with
            ``fc1_gate_weight``: fc1 is the value (``up_proj``, timm ``SwiGLU.fc1_x``).
        fc2_weight: (D, hidden), fc2_bias: (D,) or None.
        eps: norm epsilon (> 0; timm uses 1e-6, Hugging Face ViT 1e-12).
        approximate: F.gelu's keyword, kept working: ``"none"`` means ``activation="gelu"``,
            ``"tanh"`` means ``"gelu_tanh"``; an error if it contradicts ``activation``.
        activation: ``"gelu"`` (erf; the default), ``"gelu_tanh"``, ``"quick_gelu"`` (CLIP's
            ``a * sigmoid(1.702 a)``) or ``"silu"`` (SwiGLU); Hugging Face's ``"gelu_pytorch_tanh"``,
            ``"gelu_new"`` and ``"swish"`` are accepted as aliases.
        norm: ``"layernorm"``, ``"rms"`` (RMSNorm: ``x * rsqrt(mean(x^2) + eps) * norm_weight``,
            Pixtral, AIMv2) or ``"none"``: the MLP alone, ``fc2(act(fc1(x)))`` (norm_weight and
            norm_bias None; eps unused) -- the MLP of a post-norm block (Swin V2's
            ``x + drop_path(norm(mlp(x)))``: the block applies its norm to the ``residual=False``
            branch).
        gated: gated MLP (GLU family); None (default) means "gated iff ``fc1_gate_weight`` is given".
        fc1_gate_weight: (hidden, D) gate projection (``gate_proj``, timm ``SwiGLU.fc1_g``), or None;
            fc1_gate_bias: (hidden,) or None. timm's ``GluMlp`` (gate_last=True, [value; gate])
            passes row views: ``fc1_weight=W[:hidden], fc1_gate_weight=W[hidden:]`` (no copies).
        residual: add x to the branch (False returns the branch alone).
        layer_scale: (D,) LayerScale gamma (timm, DINOv2/v3 ``lambda1``), or None.
        sample_scale: (x.shape[0],) per-sample factor on the branch (drop-path's mask / keep_prob
            in training), or None.
        hidden_norm: ``"none"`` (default) or ``"layernorm"``: a LayerNorm over the hidden
            activations between the activation (gating) and fc2, ``fc2(LN(act(fc1(norm(x)))))``
            -- timm's ``scale_mlp`` (EVA02-B/L, EVA-CLIP, BEiT / Eva with ``scale_mlp=True``), the
            ``norm`` of timm's ``Mlp`` / ``GluMlp`` / ``SwiGLU``. The Triton route takes hidden
            widths up to ``MAX_DIM`` (4096); wider ones run the ``torch`` route with one warning.
        hidden_norm_weight, hidden_norm_bias: (hidden,) its affine parameters, or None; any float
            dtype (an fp32 norm beside 16-bit weights is fine).
        hidden_eps: its epsilon; None (default) means ``eps``.

    Returns:
        Tensor of x's shape. dtype: x's outside autocast; under autocast the composite's (fp32
        for timm's fp32 residual stream, the autocast dtype for ``residual=False`` with no fp32
        scale).

    Routes: fp16, bf16 and fp32 run the Triton kernels (fp32 with IEEE fp32 dots, no TF32), every
    activation, norm, gating and hidden norm included; float64, rows wider than 4096 (``MAX_DIM``)
    and hidden norms wider than that run the ``torch`` route with one warning. The ``cuda`` backend
    covers LayerNorm with GELU (either form), ungated; RMSNorm, ``norm="none"``, the other
    activations, gated MLPs and hidden norms run the ``torch`` route there with one warning. Under
    autocast the linears run in the autocast dtype (weights cast like ``F.linear``), norm statistics
    in fp32. Differentiable in every tensor argument.

    Example:
        >>> from torch import nn
        >>> mlp = nn.ModuleDict(dict(norm=nn.LayerNorm(768, eps=1e-6), fc1=nn.Linear(768, 3072),
        ...                          fc2=nn.Linear(3072, 768))).cuda().bfloat16()
        >>> x = torch.randn(8, 197, 768, device="cuda", dtype=torch.bfloat16)
        >>> y = fastvit.layernorm_mlp(x, mlp.norm.weight, mlp.norm.bias, mlp.fc1.weight, mlp.fc1.bias,
        ...                           mlp.fc2.weight, mlp.fc2.bias)   # (8, 197, 768)
        >>> # SwiGLU with RMSNorm (AIMv2): gate_proj / up_proj as two weights
        >>> glu = nn.ModuleDict(dict(rms=nn.RMSNorm(768, eps=1e-5), gate=nn.Linear(768, 2048, bias=False),
        ...                          up=nn.Linear(768, 2048, bias=False),
        ...                          down=nn.Linear(2048, 768, bias=False))).cuda().bfloat16()
        >>> y = fastvit.layernorm_mlp(x, glu.rms.weight, None, glu.up.weight, None, glu.down.weight, None,
        ...                           eps=1e-5, norm="rms", activation="silu", fc1_gate_weight=glu.gate.weight)
        >>> # EVA02-B's MLP half (timm SwiGLU with scale_mlp: a LayerNorm before fc2)
        >>> blk = timm.create_model("eva02_base_patch14_224").blocks[0].cuda().bfloat16()
        >>> y = fastvit.layernorm_mlp(x, blk.norm2.weight, blk.norm2.bias, blk.mlp.fc1_x.weight, blk.mlp.fc1_x.bias,
        ...                           blk.mlp.fc2.weight, blk.mlp.fc2.bias, activation="silu",
        ...                           fc1_gate_weight=blk.mlp.fc1_g.weight, fc1_gate_bias=blk.mlp.fc1_g.bias,
        ...                           hidden_norm="layernorm", hidden_norm_weight=blk.mlp.norm.weight,
        ...                           hidden_norm_bias=blk.mlp.norm.bias)
    """
    activation = resolve_activation(approximate, activation)
    gated = fc1_gate_weight is not None if gated is None else gated
    _validate(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, norm, gated,
              fc1_gate_weight, fc1_gate_bias, residual, layer_scale, sample_scale, hidden_norm, hidden_norm_weight,
              hidden_norm_bias, hidden_eps)
    hidden_eps = float(eps if hidden_eps is None else hidden_eps)
    device = x.device
    (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
     fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias) = usable_in_autograd(
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
        fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias,
    )
    tensors = dict(x=x, norm_weight=norm_weight, norm_bias=norm_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                   fc2_weight=fc2_weight, fc2_bias=fc2_bias, layer_scale=layer_scale, sample_scale=sample_scale,
                   fc1_gate_weight=fc1_gate_weight, fc1_gate_bias=fc1_gate_bias,
                   hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias)
    cast_to = autocast_dtype(device)
    if cast_to is None or any(t is not None and t.dtype == torch.float64 for t in tensors.values()):
        # F.layer_norm's mixed precision (a 16-bit model that keeps its norms in fp32): the
        # statistics and affine in fp32, the normalised rows in x's dtype, as the kernels do
        mixed = {k for pair in (("norm_weight", "norm_bias"), ("hidden_norm_weight", "hidden_norm_bias"))
                 if _fp32_norm_of_16bit_x(x, *(tensors[k] for k in pair)) for k in pair}
        check_same_dtype(**{k: t for k, t in tensors.items() if k not in mixed})
        cast_to = None

    gemm_dtype = fc1_weight.dtype if cast_to is None else cast_to
    hidden = fc2_weight.shape[1]
    save_preact = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values())
    route = resolve_backend(
        device, "layernorm_mlp",
        lambda: layernorm_mlp_bucket(x.shape[-1], 2 * hidden if gated else hidden, gemm_dtype,
                                     x.numel() // x.shape[-1], save_preact),
    )
    if route in ("triton", "cuda"):
        from fastvit.kernels.layernorm_mlp import MAX_DIM

        max_dim = MAX_DIM if route == "triton" else _CUDA_MAX_DIM
        reason = None
        if x.dtype == torch.float64:
            reason = "dtype float64"
        elif x.shape[-1] > max_dim:
            reason = f"D = {x.shape[-1]} > {max_dim}"
        elif route == "triton" and hidden_norm != "none" and hidden > MAX_DIM:
            reason = f"a hidden norm over {hidden} > {MAX_DIM} columns"
        elif route == "triton" and interpreter_dtype_problem(device, gemm_dtype):
            reason = interpreter_dtype_problem(device, gemm_dtype)
        elif route == "cuda" and (gated or norm != "layernorm" or activation not in _APPROXIMATE.values()
                                  or hidden_norm != "none"):
            # the extension's composite has LayerNorm and GELU row kernels only
            reason = ("gated MLPs" if gated else "RMSNorm" if norm == "rms" else "norm='none'" if norm == "none"
                      else "a hidden norm" if hidden_norm != "none" else f"activation {activation!r}")  # fmt: skip
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
            # the norm in fp32 under autocast, as CUDA's autocast runs F.layer_norm; CPU autocast
            # leaves it alone, and it rejects affine parameters of a dtype other than x's or fp32
            norm_weight, norm_bias = (
                t if t is None or t.dtype == x.dtype else t.float() for t in (norm_weight, norm_bias)
            )
            hidden_norm_weight, hidden_norm_bias = (  # over the hidden rows, in the autocast dtype
                t if t is None or t.dtype == cast_to else t.float() for t in (hidden_norm_weight, hidden_norm_bias)
            )
        return _composite(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps),
                          activation, norm, gated, fc1_gate_weight, fc1_gate_bias, residual, layer_scale,
                          sample_scale, hidden_norm, hidden_norm_weight, hidden_norm_bias, hidden_eps)

    # -- autocast rule (F.linear's): the GEMMs in the autocast dtype; norm statistics in fp32; the
    #    output in the composite's dtype (its scale multiplies and residual add promote) --
    if cast_to is not None:
        fc1_weight, fc2_weight = fc1_weight.to(cast_to), fc2_weight.to(cast_to)
        fc1_bias, fc2_bias, fc1_gate_weight, fc1_gate_bias = (
            t.to(cast_to) if t is not None else None for t in (fc1_bias, fc2_bias, fc1_gate_weight, fc1_gate_bias)
        )
    out_dtype = gemm_dtype
    for t in (layer_scale, sample_scale, x if residual else None):
        if t is not None:
            out_dtype = torch.promote_types(out_dtype, t.dtype)

    # the kernels read every last dim with a unit stride (x's other strides are free: views of a
    # token buffer are not copied); a transposed weight or strided vector is rare enough to copy
    (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
     fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias) = (
        unit_last_stride(t)
        for t in (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
                  fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias)
    )
    if route == "cuda":
        y = call(
            _layernorm_mlp_cuda_fwd, _layernorm_mlp_cuda_fwd_function,
            _as_tokens(x), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale,
            sample_scale, float(eps), "tanh" if activation == "gelu_tanh" else "none", residual, out_dtype,
            save_preact,
        )[0]
        return y.view(x.shape)
    # the op on (B, N, D) tokens, reshaped outside it (as on the cuda route): its output is then no
    # view of anything, so a user may edit it in place (a forward hook's o.add_()) before a backward
    y, _, _, _ = call(
        _layernorm_mlp_fwd, _layernorm_mlp_fwd_function,
        _as_tokens(x), norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, layer_scale, sample_scale,
        fc1_gate_weight, fc1_gate_bias, hidden_norm_weight, hidden_norm_bias, float(eps), activation, norm, gated,
        residual, out_dtype, save_preact, hidden_norm != "none", hidden_eps,
    )
    return y if y.shape == x.shape else y.view(x.shape)
