"""The public ops as leaves of ``torch.fx`` graphs.

``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` and timm's FX feature
extraction call a model's code with ``Proxy`` objects in place of tensors. The ops validate and
dispatch on real tensors, so under tracing each public op records itself as one ``call_function``
node instead (what ``torch.fx.wrap`` does for a function called from one module's globals, but for
every tracer and every caller). The ``GraphModule`` then calls the op on real tensors: the fused
kernels, their autograd and their fallbacks run exactly as in eager mode. A leaf also carries
its TorchScript form (``fastvit/ops/_torchscript.py``), so that such a graph can be scripted.

A fused module's part that decides per call (a block's MLP half: hooks, dropout in training)
records itself as one ``call_method`` node (``method_leaf``), so the graph makes that choice when
it runs, as the unpatched graph's leaf modules do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch.fx

from fastvit.ops import _torchscript

__all__ = ["fx_leaf", "method_leaf"]

Op = TypeVar("Op", bound=Callable)


def _first_proxy(args: tuple, kwargs: dict) -> torch.fx.Proxy | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.fx.Proxy):
            return value
        if isinstance(value, (tuple, list)):  # rel_pos=(rel_h, rel_w)
            for item in value:
                if isinstance(item, torch.fx.Proxy):
                    return item
    return None


def fx_leaf(op: Op) -> Op:
    """``op``, recorded as a single ``call_function`` node when called with ``torch.fx`` proxies.

    Example:
        >>> flash_attention = fx_leaf(flash_attention)
        >>> graph = torch.fx.symbolic_trace(model)  # one flash_attention node per attention call
    """

    @functools.wraps(op)
    def leaf(*args, **kwargs):
        proxy = _first_proxy(args, kwargs)
        if proxy is None:
            return op(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)

    scriptable = _torchscript.SCRIPTABLE.get(op.__name__)
    if scriptable is not None:  # torch.jit.script of a graph calling the leaf compiles this instead
        _torchscript.EAGER[op.__name__] = op
        setattr(leaf, "__original_fn", scriptable)
        setattr(leaf, "__script_if_tracing_wrapper", True)
    return leaf


def method_leaf(module: torch.nn.Module, method: str, *args: object) -> torch.fx.Proxy | None:
    """Under ``torch.fx`` tracing (a proxy among ``args``): ``module.<method>(*args)`` recorded as
    one ``call_method`` node on ``module`` (a ``get_attr`` node of it), so that the ``GraphModule``
    calls the method on real tensors and the method decides then what it runs; else None.

    For the fused part of a module whose original reads submodules that are leaves of the unpatched
    graph (``nn.Linear``, ``nn.Dropout``, ``nn.LayerNorm``: their hooks and their training mode
    count when that graph runs): the fused part then decides when the graph runs too (hooks added
    after tracing, ``train()`` / ``eval()`` of the graph), not once while it was traced. The method
    needs a TorchScript branch (``torch.jit.is_scripting()``): scripting the graph compiles it.

    Example:
        >>> traced = method_leaf(self, "_fastvit_mlp_half", x)
        >>> if traced is not None:
        ...     return traced  # the GraphModule calls self._fastvit_mlp_half(x)
    """
    proxy = _first_proxy(args, {})
    if proxy is None:
        return None
    tracer = proxy.tracer
    try:
        path = tracer.path_of_module(module)
    except NameError:  # a module outside the traced root (a function tracing it): traced through
        return None
    if not path:  # the root itself, which the GraphModule replaces: traced through
        return None
    return tracer.create_proxy("call_method", method, (module, *args), {})
