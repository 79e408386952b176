"""The base of the fused classes that ``fastvit.patch`` swaps onto a model's own modules.

A fused class subclasses the model's class (timm's ``Attention``, torchvision's ``EncoderBlock``,
Hugging Face's ``ViTLayer`` ...) and overrides ``forward`` only. Patching assigns it to the module's
``__class__``: the module object, its children, Parameters, buffers, hooks and ``state_dict()`` stay
exactly where they were (an optimizer built before patching keeps its Parameters; isinstance checks
against the original class still pass), and unpatching assigns the original class back. The fused
``forward`` reads the module's own tensors at call time and runs the original ``forward``
(``super().forward``) for any call it does not cover (attention masks, dropout in training,
attention weights requested).

A fused forward reads some submodules' tensors without calling them (``fastvit_bypassed``: the
MLP's ``fc1``, the patch embedding's ``proj`` ...). Their hooks would not run and a replacement
(a LoRA wrapper, a parametrization) would be ignored, so: a module whose bypassed submodules have
hooks is not patched (the report says why), and a call finding a hook, a replaced submodule or a
global module hook added since patching runs the original forward (``_fastvit_intact``).
"""

from __future__ import annotations

import types
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_state

from fastvit.backend import warn_once

__all__ = ["FusedModule", "dropout_active", "hook_kinds", "warn_attention_dropout", "warn_fallback"]


def hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` itself (empty: none)."""
    kinds = {
        "forward pre-hook": module._forward_pre_hooks,
        "forward hook": module._forward_hooks,
        "backward pre-hook": module._backward_pre_hooks,
        "backward hook": module._backward_hooks,
    }
    found = [kind for kind, hooks in kinds.items() if hooks]
    if "forward" in module.__dict__:  # accelerate's hooks and monkeypatching replace it per instance
        found.append("forward replaced on the instance")
    return found


def _global_hooks_registered() -> bool:
    """Whether ``torch.nn.modules.module.register_module_*_hook`` hooks exist (they run on every
    module call, so also on the calls a fused forward leaves out)."""
    return bool(
        _module_state._global_forward_pre_hooks
        or _module_state._global_forward_hooks
        or _module_state._global_backward_pre_hooks
        or _module_state._global_backward_hooks
    )


class FusedModule:
    """Mixin of every fused class: ``class FusedAttention(FusedModule, timm.layers.Attention)``.

    Class attributes:
        fastvit_part: which part of a ViT it fuses: ``"attention"``, ``"mlp"`` or ``"patch_embed"``.
        fastvit_op: the fastvit op its forward calls (``"flash_attention"`` ...).
        fastvit_bypassed: dotted paths of the submodules whose tensors the fused forward reads
            without calling them (each listed on its own: ``("mlp", "mlp.fc1", ...)``).
    """

    fastvit_part: ClassVar[str]
    fastvit_op: ClassVar[str]
    fastvit_bypassed: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        """Give each fused class ``_fastvit_original_<name>``: the original class's method under
        another name, for the TorchScript branch of the fused methods (``super()`` and
        ``Base.forward(self, ...)`` do not compile in TorchScript; a renamed alias does)."""
        super().__init_subclass__(**kwargs)
        original = next((b for b in cls.__mro__ if not issubclass(b, FusedModule)), object)
        for name in _SCRIPTED_METHODS:
            method = getattr(original, name, None)
            if callable(method):
                setattr(cls, f"_fastvit_original_{name}", _renamed(method, f"_fastvit_original_{name}"))

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles the original modules' math: TorchScript cannot call the
        Triton kernels. Said once; ``torch.compile`` and ``torch.export`` keep the fused ops."""
        warn_once(
            "torchscript-original-math",
            "fastvit: torch.jit.script of a patched model compiles the original PyTorch math of its "
            "patched modules (TorchScript cannot call fastvit's kernels); torch.compile and "
            "torch.export keep the fused ops",
        )
        return self

    @classmethod
    def fastvit_hook_problems(cls, module: nn.Module) -> list[str]:
        """Why ``module`` cannot be fused because of hooks (report reasons; empty: it can)."""
        if _global_hooks_registered():
            return ["global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"]
        problems = []
        for path in cls.fastvit_bypassed:
            kinds = hook_kinds(module.get_submodule(path))
            if kinds:
                problems.append(
                    f"{path} has a {' and a '.join(kinds)} (a user hook, torch.nn.utils.prune, weight_norm, "
                    "accelerate): the fused forward does not call it, so that would not run"
                )
        return problems

    @classmethod
    def fastvit_original(cls) -> type[nn.Module]:
        """The model class this fused class was derived from (what ``unpatch`` restores)."""
        for base in cls.__bases__:
            if not issubclass(base, FusedModule):
                return base
        raise TypeError(f"{cls.__name__} has no original (non-fused) base class")

    @classmethod
    def swap_in(cls, module: nn.Module) -> None:
        """Make ``module`` (an instance of exactly ``fastvit_original()``) run the fused forward."""
        original = cls.fastvit_original()
        if type(module) is not original:
            raise TypeError(f"{cls.__name__} replaces {original.__name__}, got {type(module).__name__}")
        watched = []
        for path in cls.fastvit_bypassed:
            parent_path, _, name = path.rpartition(".")
            parent = module.get_submodule(parent_path)
            child = parent._modules[name]
            watched.append((parent, name, child, type(child)))
        module.__class__ = cls
        try:
            module.__dict__["_fastvit_watched"] = tuple(watched)
            module._fastvit_attach()
        except BaseException:
            module.__dict__.pop("_fastvit_watched", None)
            module.__class__ = original  # all or nothing
            raise

    def swap_out(self) -> None:
        """Restore the original class (and drop anything ``_fastvit_attach`` added)."""
        self._fastvit_detach()
        self.__dict__.pop("_fastvit_watched", None)
        self.__class__ = type(self).fastvit_original()

    def _fastvit_unfused(self, kind: str, *, sdpa_dropout: bool = True) -> bool:
        """Whether this call of a fused timm attention runs the original forward: a hook on or a
        replacement of a bypassed submodule (``_fastvit_intact``), or attention dropout that timm's
        own forward would apply in this call (the op has none; ``warn_attention_dropout(kind)``).
        ``sdpa_dropout=False`` for an attention whose SDPA path never drops (XCiT's ``XCA``)."""
        if not self._fastvit_intact():
            return True
        p = self._fastvit_timm_attention_dropout(sdpa_dropout)
        if p > 0.0:
            warn_attention_dropout(kind, p)
            return True
        return False

    def _fastvit_timm_attention_dropout(self, sdpa_dropout: bool) -> float:
        """The attention dropout probability timm's forward applies in this call. Its SDPA path
        (``fused_attn``) passes ``attn_drop.p if self.training else 0``; its eager path calls
        ``attn_drop``, which drops while that Dropout is in training, whatever the attention's own
        mode (Monte Carlo dropout: ``model.eval()``, then only the Dropout modules ``train()``)."""
        drop = self.attn_drop
        sdpa_path = getattr(self, "fused_attn", False)  # Swin V2 has no SDPA path (nor the attribute)
        active = (sdpa_dropout and self.training) if sdpa_path else drop.training
        return drop.p if active else 0.0

    def _fastvit_intact(self) -> bool:
        """Whether the fused forward still computes what the original would: every bypassed
        submodule is the one seen at patch time, of the same class, without hooks, and no global
        module hook exists. A few dict and identity checks per call (traced by torch.compile
        without a graph break). False also warns once, naming the module's class."""
        broken = "a global module hook" if _global_hooks_registered() else None
        watched = () if broken else zip(self.fastvit_bypassed, self._fastvit_watched, strict=True)
        for path, (parent, name, child, cls) in watched:
            if parent._modules.get(name) is not child or type(child) is not cls:
                broken = f"{path} replaced or wrapped"
            elif (
                child._forward_pre_hooks
                or child._forward_hooks
                or child._backward_pre_hooks
                or child._backward_hooks
                or "forward" in child.__dict__
            ):
                broken = f"a hook on {path}"
            if broken:
                break
        intact = broken is None
        if not intact:
            name = type(self).fastvit_original().__name__
            warn_fallback(
                f"patched-not-intact:{name}",
                f"fastvit: a patched {name} found {broken} (its fused forward reads that submodule "
                "without calling it); such calls run its original forward until that is undone",
            )
        return intact

    def _fastvit_attach(self) -> None:
        """Per-instance set-up after the class swap (most fused classes need none)."""

    def _fastvit_detach(self) -> None:
        """Undo ``_fastvit_attach``."""

    def extra_repr(self) -> str:
        base = super().extra_repr()  # the original class's
        return f"{base}, fastvit={self.fastvit_op}" if base else f"fastvit={self.fastvit_op}"


# The methods a fused class may override whose TorchScript branch runs the original.
_SCRIPTED_METHODS = ("forward", "forward_features")


def _renamed(function: object, name: str) -> object:
    """A copy of ``function`` (same code, globals, defaults, closure) called ``name``: TorchScript
    names a compiled method after ``__name__``, and the original's ``forward`` is taken."""
    function = getattr(function, "__func__", function)
    copy = types.FunctionType(
        function.__code__, function.__globals__, name, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__annotations__ = dict(function.__annotations__)
    copy.__qualname__ = f"{function.__qualname__.rpartition('.')[0]}.{name}".lstrip(".")
    copy.__module__ = function.__module__
    return copy


def dropout_active(p: float, training: bool) -> bool:
    """Whether a dropout of probability ``p`` changes values (in training, with ``p > 0``)."""
    return training and p > 0.0


def warn_fallback(key: str, message: str) -> None:
    """``warn_once``, except while ``torch.compile`` traces: a warning there would break the graph
    (and the patch report already lists every such fallback)."""
    if not torch.compiler.is_compiling():
        warn_once(key, message)


def warn_attention_dropout(kind: str, p: float) -> None:
    """Warn once that a patched attention with dropout ``p`` in training runs its original forward."""
    warn_fallback(
        f"patched-attention-dropout:{kind}",
        f"fastvit: a patched {kind} applies attention dropout p={p} in this call (training mode); "
        "fastvit.flash_attention has no dropout, so these calls run the module's original PyTorch "
        "forward (model.eval() or p=0 runs the fused op)",
    )
