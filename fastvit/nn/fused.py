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
global module hook added since patching runs the original forward (``_fastvit_intact``). So does a
call finding a method the fused forward replaces or bypasses overridden, on the module or on the
original class (``_fastvit_overridden``).
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_state

from fastvit.backend import warn_once

__all__ = [
    "FusedModule",
    "conv_settings",
    "conv_takes",
    "declare_fused",
    "dropout_active",
    "global_module_hooks",
    "hook_kinds",
    "regularisation_fallback",
    "submodules_called_problem",
    "unfused_class",
    "warn_attention_dropout",
    "warn_fallback",
]


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


def global_module_hooks() -> bool:
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
    # The model class a fused class was declared for; None on the mixins the fused classes share.
    # Set in each fused class's own namespace only: a class derived from a fused class on the fly
    # (parametrize's ``ParametrizedFusedX``, FSDP2's ``FSDPFusedX``) inherits it.
    _fastvit_original_class: ClassVar[type[nn.Module] | None] = None
    # Methods of the original class that its forward calls and the fused forward does not (timm's
    # ``VisionTransformer._pos_embed``): overriding one sends the calls to the original forward.
    fastvit_bypassed_methods: ClassVar[tuple[str, ...]] = ()
    # (original, name, method) for each method the fused class overrides or bypasses, as the
    # original class had it when fastvit declared the fused class; see ``_fastvit_overridden``.
    _fastvit_methods: ClassVar[tuple[tuple[type, str, object], ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        """Record a fused class's original (its first non-fused base) and give it
        ``_fastvit_original_<name>``: the original class's method under another name, for the
        TorchScript branch of the fused methods (``super()`` and ``Base.forward(self, ...)`` do
        not compile in TorchScript; a renamed alias does). A class derived from a fused class after
        patching inherits both from it."""
        super().__init_subclass__(**kwargs)
        if _derives_from_a_fused_class(cls):
            return
        original = next((b for b in cls.__bases__ if not issubclass(b, FusedModule)), None)
        if original is None:
            return  # a mixin the fused classes share
        cls._fastvit_original_class = original
        cls._fastvit_methods = _method_snapshot(cls, original)
        # TorchScript types a module's attributes from its class's own annotations (timm's
        # ``attention_bias_cache: Dict[str, Tensor]``, ``fused_attn: Final[bool]``), which a
        # subclass does not inherit: without them an empty dict attribute does not script
        cls.__annotations__ = {**inspect.get_annotations(original), **inspect.get_annotations(cls)}
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
        if global_module_hooks():
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
        """The model class this fused class was derived from (what ``unpatch`` restores; for a
        class derived from a fused class after patching, its fused base's original)."""
        original = cls._fastvit_original_class
        if original is None:
            raise TypeError(f"{cls.__name__} has no original (non-fused) base class")
        return original

    @classmethod
    def fastvit_fused_class(cls) -> type[FusedModule]:
        """The fused class fastvit declared that ``cls`` is or derives from."""
        return next(c for c in cls.__mro__ if "_fastvit_original_class" in vars(c))

    @classmethod
    def swap_in(cls, module: nn.Module) -> None:
        """Make ``module`` (an instance of exactly ``fastvit_original()``) run the fused forward."""
        original = cls.fastvit_original()
        if type(module) is not original:
            raise TypeError(f"{cls.__name__} replaces {original.__name__}, got {type(module).__name__}")
        watched = cls._fastvit_watch(module)
        module.__class__ = cls
        try:
            module.__dict__["_fastvit_watched"] = watched
            if _fx_leaf_class(original):
                # torch.fx's tracers take a module whose __module__ is torch.nn's as a leaf (one
                # call_module node; the graph calls the module, its hooks run then, once): the
                # fused class lives in fastvit, so the instance names its original's module, and a
                # patched model traces to the unpatched graph (an instance attribute: the class,
                # its pickling and torch.compile's view of the class are untouched)
                module.__dict__["__module__"] = original.__module__
            module._fastvit_attach()
        except BaseException:
            module.__dict__.pop("_fastvit_watched", None)
            module.__dict__.pop("__module__", None)
            module.__class__ = original  # all or nothing
            raise

    @classmethod
    def _fastvit_watch(cls, module: nn.Module) -> tuple:
        """(parent, name, child, class, forward, conv settings) of each bypassed submodule of
        ``module`` as it is now: what ``_fastvit_submodules_intact`` compares each call against."""
        watched = []
        for path in cls.fastvit_bypassed:
            parent_path, _, name = path.rpartition(".")
            parent = module.get_submodule(parent_path)
            child = parent._modules[name]
            watched.append((parent, name, child, type(child), type(child).forward, conv_settings(child)))
        return tuple(watched)

    def fastvit_replaced_submodules(self) -> list[str]:
        """The bypassed submodules replaced (another object or class in their slot) since this
        module was fused: its calls run the original forward, and ``fastvit.patch`` called again
        fuses it anew over the new submodules where they qualify. Quiet: no warning."""
        return [
            path
            for path, (parent, name, child, cls, _, _) in zip(self.fastvit_bypassed, self._fastvit_watched, strict=True)
            if parent._modules.get(name) is not child or type(child) is not cls
        ]

    def fastvit_fuse_anew(self) -> tuple:
        """Fuse this (already fused) module anew over its current submodules (``fastvit.patch``
        called again after ``fastvit_replaced_submodules``); returns the earlier snapshot, which
        ``fastvit_unfuse_anew`` puts back."""
        earlier = self._fastvit_watched
        self.__dict__["_fastvit_watched"] = type(self)._fastvit_watch(self)
        return earlier

    def fastvit_unfuse_anew(self, earlier: tuple) -> None:
        """Undo ``fastvit_fuse_anew``: the earlier snapshot back (a later swap of the same
        ``fastvit.patch`` call failed)."""
        self.__dict__["_fastvit_watched"] = earlier

    def swap_out(self, restored: type[nn.Module] | None = None) -> None:
        """Give the module back its original class (``unfused_class``, unless ``restored`` is
        given: ``fastvit.unpatch`` works them all out before changing any) and drop anything
        ``_fastvit_attach`` added."""
        restored = unfused_class(type(self)) if restored is None else restored  # raises before any change
        self._fastvit_detach()
        self.__dict__.pop("_fastvit_watched", None)
        if _fx_leaf_class(type(self).fastvit_original()):
            self.__dict__.pop("__module__", None)
        self.__class__ = restored

    def _fastvit_unfused(self, kind: str | None = None, *, sdpa_dropout: bool = True) -> bool:
        """Whether this call of a fused timm attention runs the original forward: a hook on or a
        replacement of a bypassed submodule (``_fastvit_intact``), or attention dropout that timm's
        own forward would apply in this call (the op has none; ``warn_attention_dropout(kind)``,
        ``kind`` "timm <original class>" unless given). ``sdpa_dropout=False`` for an attention
        whose SDPA path never drops (XCiT's ``XCA``)."""
        if not self._fastvit_intact():
            return True
        p = self._fastvit_timm_attention_dropout(sdpa_dropout)
        if p > 0.0:
            warn_attention_dropout(kind or f"timm {type(self).fastvit_original().__name__}", p)
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

    def _fastvit_overridden(self) -> bool:
        """Whether a method the fused forward replaces or bypasses has been overridden since fastvit
        declared the fused class: on the original class (``Attention.forward``,
        ``VisionTransformer._pos_embed``: the fused class's own method hides such a monkeypatch)
        or, for the bypassed ones, on this instance (``model._pos_embed = ...``). Then calls run
        the original forward, which calls the override; said once per override. An identity check
        per method, and per bypassed method one of the bound method's function: ``torch.compile``
        guards that attribute lookup, so a compiled model recompiles when an override appears (a
        test of ``self.__dict__`` it does not guard; ``getattr`` with a default, or ``hasattr``,
        on a bound method it answers wrongly)."""
        bypassed = self.fastvit_bypassed_methods
        for original, name, method in self._fastvit_methods:
            if getattr(original, name, None) is not method:
                return self._fastvit_override_found(f"{original.__name__}.{name} replaced on the class")
            if name in bypassed and not _bound_to(getattr(self, name), method):
                return self._fastvit_override_found(f"{name} replaced on the instance")
        return False

    def _fastvit_override_found(self, override: str) -> bool:
        """Warn once that calls run the original forward because of ``override``; True."""
        name = type(self).fastvit_original().__name__
        warn_fallback(
            f"patched-overridden:{name}:{override}",
            f"fastvit: a patched {name} found {override} (its fused forward would not call it); "
            "such calls run its original forward until that is undone",
        )
        return True

    def _fastvit_intact(self) -> bool:
        """Whether the fused forward still computes what the original would: no method it
        replaces or bypasses is overridden (``_fastvit_overridden``) and its bypassed submodules
        are as at patch time (``_fastvit_submodules_intact``). False also warns once."""
        return not self._fastvit_overridden() and self._fastvit_submodules_intact()

    def _fastvit_submodules_intact(self) -> bool:
        """Whether every bypassed submodule is the one seen at patch time, of the same class with
        the same ``forward``, without hooks, a conv with the stride, padding, dilation and groups it
        had (the fused embeddings compute the patchifying conv ``fastvit.patch`` checked), and no
        global module hook exists (what a block's MLP half checks once its forward has checked
        ``_fastvit_overridden``). A few dict and identity checks per call (traced by torch.compile
        without a graph break). False also warns once, naming the module's class."""
        broken = "a global module hook" if global_module_hooks() else None
        watched = () if broken else zip(self.fastvit_bypassed, self._fastvit_watched, strict=True)
        for path, (parent, name, child, cls, forward, settings) in watched:
            if parent._modules.get(name) is not child or type(child) is not cls:
                broken = f"{path} replaced or wrapped"
            elif cls.forward is not forward:  # a class-level monkeypatch, e.g. of timm's Mlp.forward
                broken = f"{cls.__name__}.forward replaced (on {path}'s class)"
            elif has_hooks(child):
                broken = f"a hook on {path}"
            elif not _bound_to(child.forward, forward):
                broken = f"{path}.forward replaced on the instance"
            elif settings is not None and conv_settings(child) != settings:
                broken = f"{path}'s stride, padding, dilation or groups changed"
            if broken:
                break
        intact = broken is None
        if not intact:
            name = type(self).fastvit_original().__name__
            anew = " (or fastvit.patch, called again, fuses it anew)" if broken.endswith("replaced or wrapped") else ""
            warn_fallback(
                f"patched-not-intact:{name}:{broken}",
                f"fastvit: a patched {name} found {broken} (its fused forward reads that submodule "
                f"without calling it); such calls run its original forward until that is undone{anew}",
            )
        return intact

    def _fastvit_attach(self) -> None:
        """Per-instance set-up after the class swap (most fused classes need none)."""

    def _fastvit_detach(self) -> None:
        """Undo ``_fastvit_attach``."""

    def extra_repr(self) -> str:
        base = super().extra_repr()  # the original class's
        return f"{base}, fastvit={self.fastvit_op}" if base else f"fastvit={self.fastvit_op}"


def conv_takes(x: torch.Tensor, conv: nn.Module, cast: bool = False) -> bool:
    """Whether the patch projection ``conv`` (a Conv2d, or NaFlex's Linear) takes x as it is: for a
    Conv2d a 4-D batch with its input channels, and x in the weight's dtype or under autocast on x's
    device (which casts both), or any dtype where the caller casts x to the weight's (``cast``, as
    Hugging Face's CLIP and DINOv2 do). A fused embedding runs its original forward otherwise, which
    raises its own error (the op's would be another). True while torch.fx traces (x a Proxy, of no
    shape or dtype yet: the op checks them when the graph runs).

    Example:
        >>> conv_takes(torch.zeros(1, 3, 16, 16, dtype=torch.float64), nn.Conv2d(3, 8, 16, stride=16))
        False
    """
    if isinstance(x, torch.fx.Proxy):
        return True
    if isinstance(conv, nn.Conv2d) and (x.ndim != 4 or x.shape[1] != conv.in_channels):
        return False
    return cast or x.dtype == conv.weight.dtype or torch.is_autocast_enabled(x.device.type)


def conv_settings(module: nn.Module) -> tuple | None:
    """What a convolution computes besides its weight and bias (stride, padding, dilation, groups,
    padding mode), None for any other module: ``fastvit.patch`` checks a patch embedding's conv
    once, and its fused forward reads only the weight and bias.

    Example:
        >>> conv_settings(nn.Conv2d(3, 8, 16, stride=16))
        ((16, 16), (0, 0), (1, 1), 1, 'zeros')
    """
    if isinstance(module, nn.modules.conv._ConvNd):
        return (module.stride, module.padding, module.dilation, module.groups, module.padding_mode)
    return None


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has a forward (pre-)hook or a backward (pre-)hook of its own, which a fused
    op that reads its parameters without calling it would skip (old-style ``weight_norm`` and
    ``prune`` recompute the weight in a forward pre-hook).

    Example:
        >>> fc = torch.nn.Linear(4, 4)
        >>> handle = fc.register_forward_pre_hook(lambda m, args: None)
        >>> has_hooks(fc)
        True
    """
    # an `or` of the dicts, which torch.compile guards on (any() of them was not guarded: a hook added
    # after compiling went unseen)
    forward = module._forward_pre_hooks or module._forward_hooks
    return bool(forward or module._backward_pre_hooks or module._backward_hooks)


def submodules_called_problem(
    owner: nn.Module, submodules: Iterable[tuple[str, nn.Module | None]], problem: str | None = None
) -> str | None:
    """Why a standalone fused module (``FusedLayerNormMLP``, ``FusedPatchEmbed``) must call its
    ``submodules`` ((name, module) pairs; None entries are skipped) rather than read their
    parameters: ``problem`` (the caller's own finding), a global module hook, or a forward /
    backward hook on one of them (old-style ``weight_norm`` and ``prune`` recompute the weight in a
    pre-hook), said once per reason with a ``FastvitFallbackWarning``; None where the fused op
    computes what the calls would.

    Example:
        >>> mlp = fastvit.nn.FusedLayerNormMLP(64)
        >>> handle = mlp.fc1.register_forward_hook(lambda m, i, o: o * 2)
        >>> submodules_called_problem(mlp, [("fc1", mlp.fc1)])  # warns once
        'a hook on fc1'
    """
    if problem is None and global_module_hooks():
        problem = "a global module hook"
    for name, child in () if problem else submodules:
        if child is not None and has_hooks(child):
            problem = f"a hook on {name}"
            break
    if problem is not None:
        cls = type(owner).__name__
        warn_fallback(
            f"standalone-submodules-called:{cls}:{problem}",
            f"fastvit: {cls} found {problem} (its fused op reads the submodules' parameters without calling "
            "them); such calls run its submodules one by one until that is undone",
        )
    return problem


def _fx_leaf_class(cls: type[nn.Module]) -> bool:
    """Whether torch.fx's default tracer takes instances of ``cls`` as leaves
    (``torch.fx.Tracer.is_leaf_module``: ``torch.nn``'s own modules, except ``Sequential``), as
    torchvision's and timm's tracers do for what they do not list themselves."""
    return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not issubclass(cls, nn.Sequential)


def _bound_to(bound: object, function: object) -> bool:
    """Whether ``bound`` (an attribute looked up on an instance) is ``function`` bound to it, not an
    override set on the instance; in the form torch.compile traces and guards (see
    ``FusedModule._fastvit_overridden``)."""
    return isinstance(bound, types.MethodType) and bound.__func__ is function


# The methods a fused class may override whose TorchScript branch runs the original.
_SCRIPTED_METHODS = ("forward", "forward_features")


def _method_snapshot(fused: type, original: type) -> tuple[tuple[type, str, object], ...]:
    """(original, name, method) for each method of ``original`` that ``fused`` (or a fastvit
    mixin of it) overrides, or lists in ``fastvit_bypassed_methods``. ``extra_repr`` computes
    nothing; a method whose lookup gives a new object each time (a classmethod) is left out."""
    mixins = [c for c in fused.__mro__ if issubclass(c, FusedModule) and c is not FusedModule]
    overridden = {
        name
        for c in mixins
        for name, value in vars(c).items()
        if callable(value) and not name.startswith(("__", "_fastvit", "fastvit")) and name != "extra_repr"
    }
    names = sorted((overridden | set(fused.fastvit_bypassed_methods)) & set(dir(original)))
    return tuple(
        (original, name, getattr(original, name) if _defined_by(original, name) else _REPLACED_BEFORE_DECLARATION)
        for name in names
        if getattr(original, name) is getattr(original, name)  # identity is what the check compares
    )


# What the snapshot records for a method that was already replaced when the fused class was declared
# (on the first fastvit.patch): no lookup is this object, so every call finds the override.
_REPLACED_BEFORE_DECLARATION = object()


def _defined_by(original: type, name: str) -> bool:
    """Whether ``original.name`` is still the function a class of its MRO defined (its qualified
    name ``<Class>.<name>`` in that class's module), not one assigned to it afterwards, e.g. a
    monkeypatch of ``timm...Attention.forward`` made before the first ``fastvit.patch`` declared
    the fused class; that one's fused forward would not call it."""
    function = getattr(getattr(original, name), "__func__", getattr(original, name))
    qualname, module = getattr(function, "__qualname__", None), getattr(function, "__module__", None)
    return any(qualname == f"{c.__qualname__}.{name}" and module == c.__module__ for c in original.__mro__)


def _derives_from_a_fused_class(cls: type) -> bool:
    """Whether ``cls`` derives from a fused class (not only from the mixins they share): a class
    another library made on the fly from a patched module's class, or a user's subclass."""
    return any(issubclass(b, FusedModule) and b._fastvit_original_class is not None for b in cls.__bases__)


# Each class derived from a fused class, with the namespace it was rebuilt from and the rebuilt
# class: modules sharing a derived class (FSDP2 shares one per class) share the rebuilt one too.
_REBUILT: weakref.WeakKeyDictionary[type, tuple[dict[str, object], type]] = weakref.WeakKeyDictionary()


def unfused_class(cls: type[FusedModule]) -> type[nn.Module]:
    """The class ``fastvit.unpatch`` gives a module of class ``cls``.

    A fused class gives its original. A class derived from one after patching, such as
    ``torch.nn.utils.parametrize``'s ``ParametrizedFusedVisionTransformer`` (bases
    ``(FusedVisionTransformer,)``) or FSDP2's ``FSDPFusedBlock`` (bases ``(FSDPModule, FusedBlock)``),
    gives the same derivation of the original: ``ParametrizedVisionTransformer`` with bases
    ``(VisionTransformer,)`` and the same namespace (parametrize's properties), so what that
    library did keeps working and its own undo (``remove_parametrizations``) lands on the original.

    Raises:
        TypeError: ``cls`` cannot be derived again (its methods are bound to it by ``super()``,
            it derives from a fastvit mixin only, or Python refuses the new bases).

    Example:
        >>> unfused_class(FusedBlock) is Block
        True
    """
    if "_fastvit_original_class" in vars(cls):
        return cls._fastvit_original_class
    namespace = _own_namespace(cls)
    cached = _REBUILT.get(cls)
    if cached is not None and _same_namespace(cached[0], namespace):
        return cached[1]
    rebuilt = _rebuild_on_the_original(cls, namespace)
    _REBUILT[cls] = (namespace, rebuilt)
    return rebuilt


def _own_namespace(cls: type) -> dict[str, object]:
    """What ``cls`` itself defines, as ``type(name, bases, namespace)`` takes it."""
    return {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}


def _same_namespace(a: dict[str, object], b: dict[str, object]) -> bool:
    """The same names bound to the same objects (identity: a value's ``==`` may not give a bool)."""
    return a.keys() == b.keys() and all(a[name] is b[name] for name in a)


def _rebuild_on_the_original(cls: type, namespace: dict[str, object]) -> type:
    """``cls`` made again with each fused base replaced by its unfused class."""
    fused = cls.fastvit_fused_class()
    original = fused.fastvit_original()
    bound = sorted(name for name, value in namespace.items() if _uses_class_cell(value))
    if bound:
        raise TypeError(
            f"its class {cls.__qualname__} was derived from {fused.__name__} after patching and its "
            f"{', '.join(bound)} call super() (bound to {cls.__name__} itself), so no class with "
            f"{original.__name__} in place of {fused.__name__} can run them"
        )
    bases = []
    for base in cls.__bases__:
        if issubclass(base, FusedModule) and base._fastvit_original_class is None:
            raise TypeError(f"its class {cls.__qualname__} derives from fastvit's mixin {base.__name__}")
        bases.append(unfused_class(base) if issubclass(base, FusedModule) else base)
    name = cls.__name__.replace(fused.__name__, original.__name__)
    try:
        rebuilt = type(cls)(name, tuple(bases), namespace)
    except (TypeError, ValueError) as err:  # e.g. a layout or MRO conflict with the new bases
        raise TypeError(f"its class {cls.__qualname__} cannot be rebuilt on {original.__name__}: {err}") from err
    rebuilt.__qualname__ = cls.__qualname__.replace(fused.__name__, original.__name__)
    return rebuilt


def _uses_class_cell(value: object) -> bool:
    """Whether a class attribute is (or wraps) a function using ``super()`` / ``__class__``."""
    if isinstance(value, property):
        return any(_uses_class_cell(f) for f in (value.fget, value.fset, value.fdel))
    function = getattr(value, "__func__", value)  # staticmethod, classmethod
    code = getattr(function, "__code__", None)
    return code is not None and "__class__" in code.co_freevars


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


def declare_fused(original: type, base: type, namespace: dict, doc: str, name: str | None = None, **attributes) -> type:
    """A fused class made from a table entry: ``base``'s fused forward on ``original``, named ``name``
    (``Fused<original>`` by default) and declared in the module whose ``globals()`` is ``namespace``,
    so that a patched model pickles (pickle finds the class by module and name). ``attributes`` are
    its class attributes (``fastvit_mlp``, ``fastvit_bypassed`` ...).

    Example:
        >>> FusedOwlViTEncoderLayer = declare_fused(OwlViTEncoderLayer, _SiglipLayoutForward, globals(),
        ...                                         "OWL-ViT's layer ...", fastvit_mlp=_SIGLIP_LAYOUT)
    """
    name = name or f"Fused{original.__name__}"
    cls = type(name, (base, original), {
        "__doc__": doc, "__module__": namespace["__name__"], "__qualname__": name, **attributes,
    })  # fmt: skip
    namespace[name] = cls
    return cls


def dropout_active(p: float, training: bool) -> bool:
    """Whether a dropout of probability ``p`` changes values (in training, with ``p > 0``)."""
    return training and p > 0.0


def warn_fallback(key: str, message: str) -> None:
    """``warn_once``, except while ``torch.compile`` traces: a warning there would break the graph
    (and the patch report already lists every such fallback)."""
    if not torch.compiler.is_compiling():
        warn_once(key, message)


def regularisation_fallback(
    library: str, name: str, dropouts: Iterable[nn.Module], drop_path: nn.Module | None
) -> bool:
    """True, with a warning once per class, while one of ``dropouts`` (``nn.Dropout``) or ``drop_path``
    (a module with ``drop_prob``, or an Identity) would change values in this training call:
    ``fastvit.layernorm_mlp`` has neither, so the caller runs the library's modules for its MLP half.
    ``name`` is the original class's (``"TimesformerLayer"``)."""
    active = any(dropout_active(d.p, d.training) for d in dropouts) or (
        drop_path is not None and dropout_active(getattr(drop_path, "drop_prob", 0.0), drop_path.training)
    )
    if active:
        warn_fallback(
            f"patched-mlp-dropout:{name}",
            f"fastvit: a patched {library} {name} has hidden dropout or drop path > 0 and is in training mode; "
            f"fastvit.layernorm_mlp has neither, so its MLP half runs {library}'s modules",
        )
    return active


def mlp_dropout_fallback(library: str, name: str, *drops: nn.Module) -> bool:
    """True, with a warning once per (library, class), while one of ``drops`` (``nn.Dropout``) is
    active in training: ``fastvit.layernorm_mlp`` has no dropout, so the caller runs the library's
    modules for its MLP half. ``name`` is the original class's (``"EncoderBlock"``)."""
    if not any(dropout_active(drop.p, drop.training) for drop in drops):
        return False
    warn_fallback(
        f"patched-mlp-dropout:{library}-{name}",
        f"fastvit: a patched {library} {name} has MLP dropout > 0 and is in training mode; "
        f"fastvit.layernorm_mlp has no dropout, so its MLP half runs {library}'s modules",
    )
    return True


def warn_attention_dropout(kind: str, p: float) -> None:
    """Warn once per (kind, p) that a patched attention with dropout ``p`` in training runs its
    original forward."""
    warn_fallback(
        f"patched-attention-dropout:{kind}:{p}",
        f"fastvit: a patched {kind} applies attention dropout p={p} in this call (training mode); "
        "fastvit.flash_attention has no dropout, so these calls run the module's original PyTorch "
        "forward (model.eval() or p=0 runs the fused op)",
    )
