"""Structural checks the adapters share. Each returns the problems it found, as report reasons
naming the submodule (empty list: fine). Types are compared exactly: a subclass may change the math.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

__all__ = [
    "class_name", "exact_type", "layernorm_problems", "linear_problems", "missing_attributes", "patch_conv_problems",
    "unclamped_linear_problems",
]


def class_name(cls: type) -> str:
    """``cls`` as a report names it: its qualified name, with its module where that name is also a
    different ``torch.nn`` class's and the class is another of torch's (a dynamically quantized
    ``Linear`` from ``torch.ao``), which the report would otherwise seem to name."""
    if getattr(nn, cls.__name__, cls) is not cls and cls.__module__.startswith("torch."):
        return f"{cls.__module__}.{cls.__qualname__}"
    return cls.__qualname__



def exact_type(module: object, name: str, allowed: Iterable[type], what: str) -> list[str]:
    """``[]`` if ``type(module)`` is one of ``allowed``, else ``["<name> is X, not <what>"]``."""
    if type(module) in tuple(allowed):
        return []
    return [f"{name} is {class_name(type(module))}, not {what}"]


def linear_problems(module: nn.Module, names: Iterable[str]) -> list[str]:
    """Each of ``names`` (dotted paths below ``module``) must be an ``nn.Linear``."""
    return [p for name in names for p in exact_type(module.get_submodule(name), name, (nn.Linear,), "nn.Linear")]


def missing_attributes(module: nn.Module, names: Iterable[str], family: str) -> list[str]:
    """A problem if ``module`` lacks attributes the fused forward reads (another library version)."""
    missing = [n for n in names if not hasattr(module, n)]
    if not missing:
        return []
    return [f"{class_name(type(module))} has no {', '.join(missing)} (a {family} version fastvit does not know)"]


def layernorm_problems(norm: object, name: str, allowed: Iterable[type] = (nn.LayerNorm,)) -> list[str]:
    """``norm`` must be a LayerNorm over the last dim only."""
    problems = exact_type(norm, name, allowed, "nn.LayerNorm")
    if not problems and len(norm.normalized_shape) != 1:
        problems.append(f"{name} normalizes over {tuple(norm.normalized_shape)}, not the last dim only")
    return problems


def patch_conv_problems(conv: object, name: str) -> list[str]:
    """``conv`` must be a patchify Conv2d: square kernel p, stride p, no padding/dilation/groups."""
    problems = exact_type(conv, name, (nn.Conv2d,), "nn.Conv2d")
    if problems:
        return problems
    kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
    if kernel[0] != kernel[1] or stride != kernel:
        needs = "the fused op needs square patches, stride = kernel"
        problems.append(f"{name} has kernel {kernel} and stride {stride}; {needs}")
    if conv.padding not in ((0, 0), "valid") or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        problems.append(f"{name} has padding {conv.padding}, dilation {conv.dilation}, groups {conv.groups}")
    return problems


def unclamped_linear_problems(
    mlp: nn.Module, prefix: str, wrapper: type, flag: str, names: Iterable[str] = ("gate_proj", "up_proj", "down_proj")
) -> list[str]:
    """Each of ``names`` in ``mlp`` (named ``prefix`` in the reasons) must be a ``wrapper`` (Gemma 4's
    ``Gemma4ClippableLinear``: an ``nn.Linear`` named ``linear``, optionally clamping its input and
    output) whose clamps are off (its bool attribute ``flag``): the op has no clamps."""
    problems = []
    for name in names:
        layer = getattr(mlp, name)
        wrong = exact_type(layer, f"{prefix}.{name}", (wrapper,), wrapper.__name__)
        if not wrong and getattr(layer, flag):
            wrong.append(f"{prefix}.{name} clamps its input and output (use_clipped_linears); the op has no clamps")
        problems += wrong or exact_type(layer.linear, f"{prefix}.{name}.linear", (nn.Linear,), "nn.Linear")
    return problems
