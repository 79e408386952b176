"""The family adapters and what they find in a model.

Each adapter (``fastvit/patching/<family>.py``) exposes ``find(model) -> list[Finding]``: for each
module it recognises, a ``Swap`` (it can be fused), a ``Skip`` (it is left alone, and why) or a
``Patched`` (an earlier ``patch`` fused it). Finding changes nothing; ``fastvit.patch`` applies the
swaps afterwards. An adapter is consulted only when its library is imported: a model built from a
library implies the library is in ``sys.modules``, and fastvit never imports one for nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch.nn as nn

from fastvit.nn.fused import FusedModule

__all__ = [
    "ADAPTERS",
    "OP_OF_PART",
    "Adapter",
    "Finding",
    "Patched",
    "Skip",
    "Swap",
    "foreign",
    "fused_table",
    "join",
    "loaded_adapters",
    "slot",
]

# The part of a ViT each fused module covers, and the fastvit op it needs.
OP_OF_PART = {"attention": "flash_attention", "mlp": "layernorm_mlp", "patch_embed": "patch_embed"}


@dataclass(frozen=True)
class Swap:
    """``module`` can run ``fused`` (a ``FusedModule`` subclass of its class)."""

    path: str
    part: str
    module: nn.Module
    fused: type[FusedModule]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skip:
    """``path`` is left alone for ``reason``."""

    path: str
    part: str
    reason: str


@dataclass(frozen=True)
class Patched:
    """``module`` already runs ``type(module)``, a fused class."""

    path: str
    part: str
    module: nn.Module


Finding = Swap | Skip | Patched


@dataclass(frozen=True)
class Adapter:
    """A model family: ``library`` is its import name, ``module`` the adapter's module path."""

    family: str
    library: str
    module: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


ADAPTERS = (
    Adapter("timm", "timm", "fastvit.patching.timm"),
    Adapter("torchvision", "torchvision", "fastvit.patching.torchvision"),
    Adapter("Hugging Face transformers", "transformers", "fastvit.patching.transformers"),
)


def loaded_adapters() -> Iterator[Adapter]:
    """The adapters of the families whose library has been imported."""
    for adapter in ADAPTERS:
        if adapter.library in sys.modules:
            yield adapter


def join(path: str, name: str) -> str:
    """``join("blocks.0", "attn") == "blocks.0.attn"``; ``join("", "attn") == "attn"``."""
    return f"{path}.{name}" if path else name


def foreign(module: nn.Module, expected: str) -> str:
    """The reason for leaving alone a slot that holds something other than the family's module."""
    return (
        f"{type(module).__qualname__} is not {expected} (a different module, or one already replaced by "
        "something else): left alone"
    )


def slot(
    path: str,
    module: nn.Module,
    part: str,
    fused: type[FusedModule],
    problems: Callable[[nn.Module], list[str]],
    notes: Callable[[nn.Module], list[str]] | None = None,
) -> Finding:
    """The finding for ``module``, an instance of ``fused``, of exactly ``fused.fastvit_original()``, or
    of another fused class of that original (fused earlier as a block whose MLP has changed kind since).

    Args:
        problems: why this instance cannot be fused (empty: it can). Hooks on the submodules the
            fused forward bypasses are checked after these (``FusedModule.fastvit_hook_problems``).
        notes: what the report should add about a replacement (e.g. dropout fallbacks).
    """
    # fused earlier as this class, or as another of the same original (a block whose MLP changed kind)
    reclassed = type(module) is not fused and isinstance(module, FusedModule)
    replaced = module.fastvit_replaced_submodules() if type(module) is fused or reclassed else []
    if type(module) is fused and not replaced:
        return Patched(path, part, module)
    reasons = problems(module) or fused.fastvit_hook_problems(module)
    if reasons:
        if replaced:
            reasons = [f"fused by an earlier fastvit.patch, then {', '.join(replaced)} replaced", *reasons,
                       "its calls run the original forward"]  # fmt: skip
        return Skip(path, part, "; ".join(reasons))
    found = tuple(notes(module)) if notes else ()
    if replaced or reclassed:  # fused earlier, a bypassed submodule replaced since (set_input_size ...): anew
        kind = f" as {fused.__name__}" if reclassed else ""
        found = (f"fused anew{kind}: {', '.join(replaced) or 'a submodule'} replaced since the earlier fastvit.patch",
                 *found)  # fmt: skip
    return Swap(path, part, module, fused, found)


def fused_table(*fused: type[FusedModule]) -> dict[type, type[FusedModule]]:
    """``{original class: fused class, fused class: fused class}`` for an adapter's lookups."""
    table: dict[type, type[FusedModule]] = {}
    for cls in fused:
        table[cls.fastvit_original()] = cls
        table[cls] = cls
    return table
