"""What ``fastvit.patch`` / ``fastvit.unpatch`` did: the modules replaced, skipped (with the reason)
and already patched, printable as a short table."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["PatchEntry", "PatchReport"]


@dataclass(frozen=True)
class PatchEntry:
    """One module of the model.

    Attributes:
        path: dotted path from the model (``"blocks.3.attn"``; ``""`` is the model itself).
        part: ``"attention"``, ``"mlp"`` (the LayerNorm+MLP half of a block), ``"patch_embed"``,
            or ``"model"`` for notes about the whole model.
        detail: for a replacement, ``"Attention -> FusedAttention"`` plus any note; for a skip,
            the reason.

    Example:
        >>> import timm
        >>> report = fastvit.patch(timm.create_model("vit_tiny_patch16_224"))
        >>> [(e.where, e.part) for e in report.replaced[:3]]
        [('(model)', 'patch_embed'), ('blocks.0', 'mlp'), ('blocks.0.attn', 'attention')]
        >>> [e.path for e in report.skipped if e.part == "attention"]  # each with its reason in e.detail
        []
    """

    path: str
    part: str
    detail: str

    @property
    def where(self) -> str:
        """The path as the report prints it: ``"(model)"`` for the model itself.

        Example:
            >>> PatchEntry("", "model", "no ViT block found").where
            '(model)'
        """
        return self.path or "(model)"


@dataclass
class PatchReport:
    """The outcome of ``fastvit.patch(model)`` (``action="patch"``) or ``fastvit.unpatch(model)``.

    Attributes:
        model: the model's class name.
        action: ``"patch"`` or ``"unpatch"``.
        replaced: modules now running fused ops (for unpatch: the modules restored).
        skipped: modules left as they are, each with its reason.
        already_patched: modules a previous ``patch`` call had replaced and that this call left as
            they are (one whose bypassed submodule was replaced since is fused anew: ``replaced``).

    Example:
        >>> import timm
        >>> report = fastvit.patch(timm.create_model("vit_base_patch16_224"))
        >>> print(report)  # the header line, then one row per group of modules
        fastvit.patch(VisionTransformer): 25 replaced, 0 skipped
          replaced:
            patch_embed  (model)              VisionTransformer -> FusedVisionTransformer (fastvit.patch_embed)
            attention    blocks.*.attn (x12)  Attention -> FusedAttention (fastvit.flash_attention)
            mlp          blocks.* (x12)       Block -> FusedBlock (fastvit.layernorm_mlp)
        >>> report.counts(), [e.path for e in report.replaced][:3]
        ({'patch_embed': 1, 'mlp': 12, 'attention': 12}, ['', 'blocks.0', 'blocks.0.attn'])
    """

    model: str
    action: str = "patch"
    replaced: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)
    already_patched: list[PatchEntry] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many modules were replaced (restored, for unpatch) per part.

        Example:
            >>> import timm
            >>> fastvit.patch(timm.create_model("vit_base_patch16_224")).counts()
            {'patch_embed': 1, 'mlp': 12, 'attention': 12}
        """
        return dict(Counter(entry.part for entry in self.replaced))

    def __str__(self) -> str:
        verb = "restored" if self.action == "unpatch" else "replaced"
        counts = [f"{len(self.replaced)} {verb}"]
        if self.action == "patch" or self.skipped:
            counts.append(f"{len(self.skipped)} skipped")
        if self.already_patched:
            counts.append(f"{len(self.already_patched)} already patched")
        sections = (verb, self.replaced), ("skipped", self.skipped), ("already patched", self.already_patched)
        grouped = [(title, _group(entries)) for title, entries in sections if entries]
        width = max((len(where) for _, rows in grouped for _, where, _ in rows), default=0)
        lines = [f"fastvit.{self.action}({self.model}): {', '.join(counts)}"]
        for title, rows in grouped:
            lines.append(f"  {title}:")
            lines.extend(f"    {part:<12} {where:<{width}}  {detail}" for part, where, detail in rows)
        return "\n".join(lines)


_PART_ORDER = {"model": 0, "patch_embed": 1, "attention": 2, "mlp": 3}


def _group(entries: list[PatchEntry]) -> list[tuple[str, str, str]]:
    """(part, where, detail) rows, one per (part, path pattern, detail): the 12 blocks of a ViT-B
    are one row, ``blocks.*.attn (x12)``. Rows go in model order: embedding, attention, MLP."""
    groups: dict[tuple[str, str, str], list[PatchEntry]] = {}
    for entry in entries:
        pattern = re.sub(r"\d+(?=\.|$)", "*", entry.where)  # blocks.3.attn -> blocks.*.attn
        groups.setdefault((entry.part, pattern, entry.detail), []).append(entry)
    rows = []
    for (part, pattern, detail), members in groups.items():
        where = members[0].where if len(members) == 1 else f"{pattern} (x{len(members)})"
        rows.append((part, where, detail))
    return sorted(rows, key=lambda row: _PART_ORDER.get(row[0], len(_PART_ORDER)))
