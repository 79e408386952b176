"""The base of the fused classes that ``fastvit.patch`` swaps onto a model's own modules.

A fused class subclasses the model's class (timm's ``Attention``, torchvision's ``EncoderBlock``,
Hugging Face's ``ViTLayer`` ...) and overrides ``forward`` only. Patching assigns it to the module's
``__class__``: the module object, its children, Parameters, buffers, hooks and ``state_dict()`` stay
exactly where they were (an optimizer built before patching keeps its Parameters; isinstance checks
against the original class still pass), and unpatching assigns the original class back. The fused
``forward`` reads the module's own tensors at call time and runs the original ``forward``
(``super().forward``) for any call it does not cover (attention masks, dropout in training,
attention weights requested).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from fastvit.backend import warn_once

__all__ = ["FusedModule", "dropout_active", "warn_fallback"]


class FusedModule:
    """Mixin of every fused class: ``class FusedAttention(FusedModule, timm.layers.Attention)``.

    Class attributes:
        fastvit_part: which part of a ViT it fuses: ``"attention"``, ``"mlp"`` or ``"patch_embed"``.
        fastvit_op: the fastvit op its forward calls (``"flash_attention"`` ...).
    """

    fastvit_part: ClassVar[str]
    fastvit_op: ClassVar[str]

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
        module.__class__ = cls
        module._fastvit_attach()

    def swap_out(self) -> None:
        """Restore the original class (and drop anything ``_fastvit_attach`` added)."""
        self._fastvit_detach()
        self.__class__ = type(self).fastvit_original()

    def _fastvit_attach(self) -> None:
        """Per-instance set-up after the class swap (most fused classes need none)."""

    def _fastvit_detach(self) -> None:
        """Undo ``_fastvit_attach``."""

    def extra_repr(self) -> str:
        base = super().extra_repr()  # the original class's
        return f"{base}, fastvit={self.fastvit_op}" if base else f"fastvit={self.fastvit_op}"


def dropout_active(p: float, training: bool) -> bool:
    """Whether a dropout of probability ``p`` changes values (in training, with ``p > 0``)."""
    return training and p > 0.0


def warn_fallback(key: str, message: str) -> None:
    """``warn_once``, except while ``torch.compile`` traces: a warning there would break the graph
    (and the patch report already lists every such fallback)."""
    if not torch.compiler.is_compiling():
        warn_once(key, message)
