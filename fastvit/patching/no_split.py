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
    ``_no_split_modules`` of ``model`` and its submodules, and drop the name of an original, or of a
    fused class of the same original (an MLP kind fused earlier), that no module below that list has
    any more (the lookups by name would raise on it). A list names the fused classes found below
    it: an original with two fused classes (DINOv2's plain and gated layers) may have both.

    Example:
        >>> rename_no_split(model, [FusedViTLayer])  # {"ViTLayer"} -> {"FusedViTLayer"}
    """
    renames: dict[str, list[str]] = {}  # original's name -> the fused classes' names
    for cls in fused_classes:
        renames.setdefault(cls.fastvit_original().__name__, []).append(cls.__name__)
    origin = {name: original for original, fused in _fused_names(renames).items() for name in fused}
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if not names or not any(name in renames or name in origin for name in names):
            continue
        present = {type(m).__name__ for m in module.modules()}
        covered = {name if name in renames else origin.get(name) for name in names} & renames.keys()
        kept = [name for name in names if (name not in renames and name not in origin) or name in present]
        added = [fused for original in sorted(covered) for fused in sorted(renames[original]) if fused in present]
        if _PREVIOUS not in vars(module):
            vars(module)[_PREVIOUS] = vars(module).get("_no_split_modules", _UNSET)
        updated = list(dict.fromkeys([*kept, *added]))
        module._no_split_modules = type(names)(updated) if isinstance(names, (list, set, tuple)) else updated


def _fused_names(renames: dict[str, list[str]]) -> dict[str, set[str]]:
    """For each original name in ``renames``, the names of every fused class fastvit declares for it."""
    from fastvit.nn.fused import FusedModule

    found: dict[str, set[str]] = {original: set() for original in renames}
    pending = list(FusedModule.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        original = vars(cls).get("_fastvit_original_class")
        if original is not None and original.__name__ in found:
            found[original.__name__].add(cls.__name__)
    return found


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
