"""fastvit and transformers' attention interface, without importing transformers: the
registration of ``attn_implementation="fastvit"`` and the two calls ``fastvit.patch`` /
``fastvit.unpatch`` make (``route``, ``restore``; the work is in ``fastvit.patching.transformers``).

Registration needs ``transformers.modeling_utils`` (where ``AttentionInterface`` lives), which costs
~2 s to import: too much to pay in ``import fastvit`` for timm or torchvision users, and fastvit
never imports a model library for nothing. So ``install()`` (run by ``import fastvit``) registers
at once if that module is already imported, else it adds a finder to ``sys.meta_path`` that
registers right after the module finishes loading, and then removes itself. Either way
``from_pretrained(..., attn_implementation="fastvit")`` works in any import order, with no fastvit
call in between. ``fastvit.patch`` registers too, so a failed hook (a transformers without the
interface) shows up in its report instead of an import error.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import torch.nn as nn

from fastvit.patching.report import PatchEntry, PatchReport

if TYPE_CHECKING:
    from fastvit.patching.transformers import InterfaceRouting

__all__ = ["TARGET", "install", "register_now", "restore", "route"]

TARGET = "transformers.modeling_utils"


def register_now() -> str | None:
    """Register fastvit's attention with the imported transformers; the problem, or None if done."""
    try:
        from fastvit.nn import hf_attention
    except (ImportError, AttributeError) as err:  # a transformers without the attention interface
        return f"transformers' AttentionInterface is not available ({err})"
    hf_attention.register()
    return None


class _Loader(importlib.abc.Loader):
    """The module's own loader, which also registers fastvit once the module has executed."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace on the module
        _remove_finder()
        try:
            problem = register_now()
        except Exception as err:  # never fail transformers' own import over fastvit's registration
            problem = repr(err)
        if problem is not None:
            warnings.warn(f"fastvit: attn_implementation='fastvit' is not registered: {problem}", stacklevel=2)

    def __getattr__(self, name: str) -> object:  # get_source, get_filename ... for inspect/linecache
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader the other finders give ``TARGET``."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def _remove_finder() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register now if ``transformers.modeling_utils`` is imported, else when it is (idempotent)."""
    if TARGET in sys.modules:
        register_now()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def route(model: nn.Module, claimed: dict[int, str], report: PatchReport) -> InterfaceRouting | None:
    """``fastvit.patch``'s plan for the attention that goes through transformers' interface (see
    ``fastvit.patching.transformers.find_interface``); None when transformers is not imported or
    its adapter does not load (the report already says why)."""
    if "transformers" not in sys.modules:
        return None
    try:
        from fastvit.patching import transformers as adapter
    except (ImportError, AttributeError):
        return None
    return adapter.find_interface(model, report, claimed)


def restore(model: nn.Module) -> list[PatchEntry]:
    """``fastvit.unpatch``'s half for routed attention: the previous ``attn_implementation``s."""
    if "transformers" not in sys.modules:
        return []
    from fastvit.patching import transformers as adapter

    return adapter.restore_interface(model)
