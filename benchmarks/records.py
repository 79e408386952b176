"""What a benchmark point is (``Point``) and what it yields (``Record``): the rows of results.json.

A record is flat: the point's fields, the measurement, ``status`` and ``note``, and any
suite-specific fields in ``extra`` (written as top-level columns of the JSON and CSV rows).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KEY_FIELDS", "MODES", "RECORD_FIELDS", "STATUSES", "SUITES", "Point", "Record"]

# Every suite's name: a record's ``suite``, the command line's SUITE, the prefix of its plots.
SUITES = ("attention", "patch-embed", "mlp", "layernorm", "model", "varlen")
STATUSES = ("ok", "oom", "timeout", "error", "unavailable")
MODES = ("fwd", "fwd+bwd")

# The fields that identify a measurement: `compare` matches BASE and NEW rows on these.
KEY_FIELDS = ("suite", "impl", "mode", "n_tokens", "batch", "heads", "head_dim", "dtype")

# Every record has at least these, in this order (the CSV's first columns).
RECORD_FIELDS = (
    *KEY_FIELDS,
    "device",
    "ms",
    "ms_p25",
    "ms_p75",
    "tflops",
    "peak_mem_bytes",
    "status",
    "note",
)


@dataclass(frozen=True)
class Point:
    """One thing to measure: an implementation at one size, in one mode.

    ``params`` holds what the suite's ``build`` needs beyond the common fields (an attention
    grid, a model name, a resolution); it is copied into the record's extra fields.
    """

    suite: str
    impl: str
    mode: str
    n_tokens: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    params: dict[str, Any] = field(default_factory=dict)
    # why this point cannot run, where the suite knows it before running (an attention grid at
    # N = 1): it becomes an "unavailable" row with this note, and the other points still run
    unavailable: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def group(self) -> tuple:
        """Points of one group differ only in size (n_tokens and the suite's params): a group's
        failure at one size (out of memory, over the time budget) predicts it at larger sizes."""
        return (self.suite, self.impl, self.mode, self.batch, self.heads, self.head_dim, self.dtype,
                self.params.get("model"))  # fmt: skip


@dataclass
class Record:
    """A measured (or failed) point. Times in milliseconds, memory in bytes; None when not measured."""

    suite: str
    impl: str
    mode: str
    n_tokens: int
    batch: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    ms: float | None = None
    ms_p25: float | None = None
    ms_p75: float | None = None
    tflops: float | None = None
    peak_mem_bytes: int | None = None
    status: str = "ok"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    @classmethod
    def from_point(
        cls,
        point: Point,
        *,
        status: str,
        note: str = "",
        impl: str | None = None,
        extra: dict[str, Any] | None = None,
        **measured: Any,
    ) -> Record:
        """A record for ``point``.

        Args:
            impl: the implementation that actually ran, when it differs from ``point.impl``
                (``fastvit[torch]`` after a fallback).
            extra: suite-specific fields, added to the point's ``params``.
            measured: any of ms, ms_p25, ms_p75, tflops, peak_mem_bytes.
        """
        return cls(
            suite=point.suite,
            impl=impl or point.impl,
            mode=point.mode,
            n_tokens=point.n_tokens,
            batch=point.batch,
            heads=point.heads,
            head_dim=point.head_dim,
            dtype=point.dtype,
            device=point.device,
            status=status,
            note=note,
            extra={**point.params, **(extra or {})},
            **measured,
        )

    def key(self) -> tuple:
        """The KEY_FIELDS, then the model the shape is taken from (``model`` among the point's
        params): the mlp suite's ViT-B and EVA02-B rows share heads 12 and head dim 64, and
        ``compare`` matched them as one row."""
        return (*(getattr(self, f) for f in KEY_FIELDS), self.extra.get("model"))

    def to_dict(self) -> dict[str, Any]:
        """Flat dict: the RECORD_FIELDS first, then the extra fields (which never override them)."""
        row = {f: getattr(self, f) for f in RECORD_FIELDS}
        row.update({k: v for k, v in self.extra.items() if k not in row})
        return row

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        """Inverse of ``to_dict`` (unknown fields go to ``extra``)."""
        own = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in row.items() if k in own},
            extra={k: v for k, v in row.items() if k not in own},
        )
