"""The layer classes a model names by class name (``_no_split_modules``), kept true across a patch.

Hugging Face models list the classes whose instances must stay whole, by class name, in
``_no_split_modules`` (``["ViTEmbeddings", "ViTLayer"]``): ``device_map="auto"`` (accelerate) keeps
each such module on one device, and the Trainer's FSDP wraps them, looking each name up among the
model's modules (and raising when a name matches none). A patched layer is an instance of its fused
class (``FusedViTLayer``), so after ``fastvit.patch`` the list names the fused classes beside, or
instead of, the originals they replaced; ``fastvit.unpatch`` puts back the list the model had.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

__all__ = ["rename_no_split", "restore_no_split"]

_PREVIOUS = "_fastvit_previous_no_split_modules"
# the model had no instance attribute (the class's list, if any, applied); a string, so that it
# survives copy.deepcopy and torch.save of a patched model
_UNSET = "unset"


def rename_no_split(model: nn.Module, fused_classes: Iterable[type]) -> None:
    """Add each fused class of ``fused_classes`` beside its original's name in every
    ``_no_split_modules`` of ``model`` and its submodules, and drop an original's name that no
    module of the model has any more (the lookups by name would raise on it).

    Example:
        >>> rename_no_split(model, [FusedViTLayer])  # {"ViTLayer"} -> {"FusedViTLayer"}
    """
    renames = {cls.fastvit_original().__name__: cls.__name__ for cls in fused_classes}
    present = {type(m).__name__ for m in model.modules()}
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if not names or not any(name in renames for name in names):
            continue
        kept = [name for name in names if name not in renames or name in present]
        added = [renames[name] for name in names if name in renames and renames[name] not in names]
        if _PREVIOUS not in vars(module):
            vars(module)[_PREVIOUS] = vars(module).get("_no_split_modules", _UNSET)
        updated = list(dict.fromkeys([*kept, *added]))
        module._no_split_modules = type(names)(updated) if isinstance(names, (list, set, tuple)) else updated


def restore_no_split(model: nn.Module) -> None:
    """Undo ``rename_no_split`` on ``model`` and its submodules."""
    for module in model.modules():
        previous = vars(module).pop(_PREVIOUS, None)
        if previous is None:
            continue
        if previous == _UNSET:
            vars(module).pop("_no_split_modules", None)
        else:
            module._no_split_modules = previous
