"""Autograd plumbing shared by the ops' custom ops (the Triton and ``cuda`` routes).

Each fused op is a forward custom op with ``register_autograd`` whose formula calls one or more
backward custom ops. Two gaps of that design are closed here:

- **Double backward.** The kernels compute first derivatives only. ``no_double_backward`` gives
  each backward custom op an autograd formula that raises an error naming the fastvit op and the
  way out (``fastvit.backend("torch")``: the composite of torch ops has every derivative; for the
  attention ops with SDPA's math backend, as PyTorch's fused SDPA backwards are first order too),
  instead of PyTorch's "no autograd formula was registered". A single backward with
  ``create_graph=True`` still works; only differentiating its result raises.
- **torch.func transforms.** PyTorch's custom-op autograd is not an ``autograd.Function`` that
  ``torch.func.grad`` / ``vjp`` / ``jacrev`` accept. ``function_twin`` builds one from the same
  setup and backward formulas, and ``call`` runs it in place of the custom op while a
  ``torch.func`` transform is active. Its ``vmap`` rule loops over the vmapped dim (``jacrev``
  vmaps the backward); a vmapped forward runs the torch route (``fastvit.backend``).
- **Eager overhead.** The custom-op dispatch costs far more than the kernels at ViT sizes: on an
  H200 a flash_attention call at N=197 spent ~170 us on the host against SDPA's ~17 us, most of it
  in ``torch.library``'s dispatch (on this CPU build: ~90 us per call with inputs that require grad,
  against ~24 us for an ``autograd.Function`` around the same implementation). In plain eager mode
  (no ``torch.compile`` tracing, no ``torch.func`` transform, no dispatch mode such as
  FakeTensorMode, only plain dense tensors or a module's Parameters on a real device) ``call``
  therefore runs the twin's ``eager`` form, which calls the op's implementation directly with the
  same formulas; everywhere else the registered custom op runs, so ``torch.compile``,
  ``torch.export``, fake/meta tensors and ``opcheck`` see it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["call", "double_backward_error", "forward_ad_error", "function_twin", "no_double_backward"]

_ATTENTION_OPS = ("flash_attention", "flash_attention_varlen", "window_attention")


def _torch_route_way_out(op: str) -> str:
    """How to run ``fastvit.<op>`` where every derivative exists: its torch route (for the attention
    ops with SDPA's math backend: PyTorch's fused SDPA kernels have first-order backwards too)."""
    if op in _ATTENTION_OPS:
        return (
            "with fastvit.backend('torch'), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH): "
            f"... fastvit.{op}(...)  (SDPA's math backend has every derivative)"
        )
    return f"with fastvit.backend('torch'): ... fastvit.{op}(...)  (the composite of torch ops)"


def double_backward_error(op: str) -> RuntimeError:
    """The error raised when a gradient of ``fastvit.<op>``'s gradient is asked for on a fused route.

    Example:
        >>> raise double_backward_error("flash_attention")  # RuntimeError naming the torch route
    """
    return RuntimeError(
        f"fastvit.{op}: the fused kernels (the 'triton' and 'cuda' backends) compute first derivatives "
        "only, so this gradient of a gradient (double backward, create_graph=True then backward, "
        "torch.func.grad of torch.func.grad, a gradient penalty) cannot be taken. Run the op on the "
        f"torch route for it: {_torch_route_way_out(op)}"
    )


def forward_ad_error(op: str) -> RuntimeError:
    """The error raised when forward-mode AD (``torch.func.jvp`` / ``jacfwd`` / ``hessian``,
    ``torch.autograd.forward_ad`` dual tensors) reaches ``fastvit.<op>`` on a fused route.

    Example:
        >>> raise forward_ad_error("layernorm_mlp")  # RuntimeError naming the torch route
    """
    return RuntimeError(
        f"fastvit.{op}: the fused kernels (the 'triton' and 'cuda' backends) have reverse-mode "
        "derivatives only, so forward-mode AD (torch.func.jvp, jacfwd, hessian, "
        "torch.autograd.forward_ad dual tensors) cannot run them. Run the op on the torch route for it: "
        f"{_torch_route_way_out(op)}"
    )


def _public_op(custom_op: Any) -> str:
    """The fastvit op a custom op implements: ``fastvit::layernorm_mlp_cuda_bwd`` -> ``layernorm_mlp``."""
    name = custom_op._name.split("::")[-1]
    for suffix in ("_fwd", "_bwd", "_cuda"):
        name = name.removesuffix(suffix)
    return name


def _raise_double_backward(op: str) -> Callable[..., Any]:
    def backward(ctx: Any, *grads: Any) -> Any:
        raise double_backward_error(op)

    return backward


def _no_setup(ctx: Any, inputs: Any, output: Any) -> None:
    """Nothing to keep: the backward of a backward op only raises."""


def no_double_backward(backward_op: Any, op: str) -> type[torch.autograd.Function]:
    """Register, on the backward custom op ``backward_op`` of ``fastvit.<op>``, an autograd formula that
    raises ``double_backward_error(op)``; return its ``function_twin`` for ``call``.

    Example:
        >>> _bwd_fn = no_double_backward(_flash_attention_bwd, "flash_attention")
    """
    backward_op.register_autograd(_raise_double_backward(op), setup_context=_no_setup)
    return function_twin(backward_op, _no_setup, _raise_double_backward(op))


def function_twin(
    custom_op: Any,
    setup_context: Callable[[Any, tuple, Any], None],
    backward: Callable[..., Any],
) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` running ``custom_op`` with the same ``setup_context`` and
    ``backward`` formulas as its ``register_autograd``, usable under ``torch.func`` transforms (it
    defines ``setup_context`` as a staticmethod, which ``torch.func`` requires). A custom op that
    returns a list of tensors returns a tuple here (autograd tracks tuples of outputs).

    Example:
        >>> _fwd_fn = function_twin(_flash_attention_fwd, _setup_context, _backward)
        >>> out, lse = _fwd_fn.apply(q, k, v, 0.125, False, None, None, None)
    """

    def make(run: Callable[..., Any], name: str) -> type[torch.autograd.Function]:
        class Twin(torch.autograd.Function):
            @staticmethod
            def forward(*args: Any) -> Any:
                result = run(*args)
                return tuple(result) if isinstance(result, list) else result

            @staticmethod
            def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
                setup_context(ctx, inputs, output)

            @staticmethod
            def backward(ctx: Any, *grads: Any) -> Any:
                return backward(ctx, *grads)

            @staticmethod
            def vmap(info: Any, in_dims: tuple, *args: Any) -> Any:
                return _loop_batching_rule(Twin, info, in_dims, args)

            @staticmethod
            def jvp(ctx: Any, *tangents: Any) -> Any:
                raise forward_ad_error(op)

        Twin.__name__ = Twin.__qualname__ = name
        return Twin

    def make_eager(run: Callable[..., Any], name: str) -> type[torch.autograd.Function]:
        # the classic form (ctx as forward's first argument, setup done inside it): apply() of a
        # Function with a separate setup_context binds the arguments to forward's signature with
        # inspect on every call, ~17 us of ~24 us per apply on this CPU
        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *args: Any) -> Any:
                result = run(*args)
                result = tuple(result) if isinstance(result, list) else result
                setup_context(ctx, args, result)
                return result

            @staticmethod
            def backward(ctx: Any, *grads: Any) -> Any:
                return backward(ctx, *grads)

            @staticmethod
            def jvp(ctx: Any, *tangents: Any) -> Any:
                raise forward_ad_error(op)

        Eager.__name__ = Eager.__qualname__ = name
        return Eager

    op = _public_op(custom_op)
    twin = make(custom_op, f"{custom_op._name}_function")
    # the implementation itself, when the op has one for every device (no register_kernel override)
    implementation = getattr(custom_op, "_init_fn", None)
    plain = implementation is not None and set(getattr(custom_op, "_backend_fns", {None: None})) <= {None}
    twin.eager = make_eager(implementation, f"{custom_op._name}_eager") if plain else None
    twin.implementation = implementation if plain else None
    return twin


def _loop_batching_rule(function: type[torch.autograd.Function], info: Any, in_dims: tuple, args: tuple) -> Any:
    """``torch.func.vmap``'s rule for a twin: the kernels have no batched form, so one call per
    entry of the vmapped dim, stacked. ``torch.func.jacrev`` vmaps the backward op over the rows
    of the Jacobian this way; a vmapped forward never gets here (``resolve_backend`` sends the ops
    to their torch route under vmap)."""
    per_entry = []
    for i in range(info.batch_size):
        # in_dims holds an int for each vmapped tensor, None (or a pytree of Nones: a list of
        # flags) for the rest
        sliced = [arg.select(dim, i) if isinstance(dim, int) else arg for arg, dim in zip(args, in_dims, strict=True)]
        per_entry.append(function.apply(*sliced))
    if isinstance(per_entry[0], torch.Tensor):
        return torch.stack(per_entry), 0
    stacked = tuple(torch.stack(outputs) for outputs in zip(*per_entry, strict=True))
    return stacked, (0,) * len(stacked)


# a module's weights are nn.Parameters: a subclass whose __torch_function__ is disabled, a plain
# tensor to the implementation (UninitializedParameter, FakeTensor, DTensor ... are not these types)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool:
    """No dispatch mode is active and every tensor argument is a dense ``torch.Tensor`` or
    ``nn.Parameter`` (not another subclass: FakeTensor, DTensor ...) on a real device, and not one
    of the batched tensors of ``is_grads_batched`` / ``jacobian(vectorize=True)`` (PyTorch's
    batching fallback loops over the registered op for those; the implementation cannot read their
    storage)."""
    if torch._C._len_torch_dispatch_stack():
        return False
    for arg in args:
        if isinstance(arg, torch.Tensor) and (
            type(arg) not in _PLAIN_TYPES or arg.is_meta or arg.layout != torch.strided
            or torch._C._functorch.is_legacy_batchedtensor(arg)
        ):
            return False
    return True


def call(custom_op: Any, twin: type[torch.autograd.Function], *args: Any) -> Any:
    """Run ``custom_op(*args)``: as the registered op while ``torch.compile`` or ``torch.jit.trace``
    traces (and wherever the arguments are not plain eager tensors), as ``twin`` while a
    ``torch.func`` transform (grad, vjp, jacrev, ...) is active (PyTorch's custom-op autograd does
    not run under those), and as
    ``twin.eager`` (the implementation called directly, no custom-op dispatch) in plain eager mode
    — without even the ``autograd.Function`` when grad mode is off (inference, and the backward
    ops inside a first-order backward).

    Example:
        >>> out, lse = call(_flash_attention_fwd, _fwd_fn, q, k, v, 0.125, False, None, None, None)
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # torch.jit.trace records the registered op as one node (its implementation then runs with
        # int sizes; traced Python code sees sizes as tensors, and a launch would not be recorded)
        return custom_op(*args)
    if torch._C._are_functorch_transforms_active():
        return twin.apply(*args)
    if twin.eager is not None and _plain_eager(args):
        if not torch.is_grad_enabled():
            # nothing is recorded (inference, or a first-order backward): the implementation
            # itself, without the autograd.Function around it
            result = twin.implementation(*args)
            return tuple(result) if isinstance(result, list) else result
        return twin.eager.apply(*args)
    return custom_op(*args)
