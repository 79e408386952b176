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
  ``torch.func`` transform is active (the custom op everywhere else, so ``torch.compile`` and
  ``opcheck`` see the registered ops unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["call", "double_backward_error", "function_twin", "no_double_backward"]

_ATTENTION_OPS = ("flash_attention", "flash_attention_varlen", "window_attention")


def double_backward_error(op: str) -> RuntimeError:
    """The error raised when a gradient of ``fastvit.<op>``'s gradient is asked for on a fused route.

    Example:
        >>> raise double_backward_error("flash_attention")  # RuntimeError naming the torch route
    """
    if op in _ATTENTION_OPS:
        # PyTorch's fused SDPA kernels (flash, memory-efficient) have first-order backwards too
        way_out = (
            "with fastvit.backend('torch'), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH): "
            f"... fastvit.{op}(...)  (SDPA's math backend has every derivative)"
        )
    else:
        way_out = f"with fastvit.backend('torch'): ... fastvit.{op}(...)  (the composite of torch ops)"
    return RuntimeError(
        f"fastvit.{op}: the fused kernels (the 'triton' and 'cuda' backends) compute first derivatives "
        "only, so this gradient of a gradient (double backward, create_graph=True then backward, "
        "torch.func.grad of torch.func.grad, a gradient penalty) cannot be taken. Run the op on the "
        f"torch route for it: {way_out}"
    )


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

    class Twin(torch.autograd.Function):
        @staticmethod
        def forward(*args: Any) -> Any:
            result = custom_op(*args)
            return tuple(result) if isinstance(result, list) else result

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    Twin.__name__ = Twin.__qualname__ = f"{custom_op._name}_function"
    return Twin


def call(custom_op: Any, twin: type[torch.autograd.Function], *args: Any) -> Any:
    """``custom_op(*args)``, or ``twin.apply(*args)`` while a ``torch.func`` transform (grad, vjp,
    jacrev, ...) is active: PyTorch's custom-op autograd does not run under those.

    Example:
        >>> out, lse = call(_flash_attention_fwd, _fwd_fn, q, k, v, 0.125, False, None, None, None)
    """
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        return twin.apply(*args)
    return custom_op(*args)
