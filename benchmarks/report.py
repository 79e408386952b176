"""Reading results: log-log scaling slopes, and the tables printed at the end of a run.

The slope of time (or peak memory) against N is the least-squares fit of log y = a + s log N over
a group's ``ok`` points with y > 0: eager attention's memory grows ~N^2 (s ~ 2), flash
attention's ~N (s ~ 1), axial attention's time ~N^1.5.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .records import Record

__all__ = [
    "Slope",
    "fit_slope",
    "format_bytes",
    "is_fastvit",
    "is_pytorch",
    "print_table",
    "print_tables",
    "pytorch_speedups",
    "series",
    "slope_rows",
    "slopes",
    "table_rows",
    "within_spread",
]


@dataclass(frozen=True)
class Slope:
    """A fitted power law y ~ c * N^slope over ``points`` points spanning ``n_min``..``n_max``."""

    slope: float
    intercept: float  # natural log of c
    points: int
    n_min: int
    n_max: int

    def __str__(self) -> str:
        return f"{self.slope:.2f}"


def fit_slope(ns: Sequence[float], ys: Sequence[float | None]) -> Slope | None:
    """Least-squares slope of log(y) against log(n); None with fewer than two distinct n.

    Points with y None or y <= 0 (not measured, or below the memory counter's resolution) are
    left out.
    """
    pairs = [(float(n), float(y)) for n, y in zip(ns, ys, strict=True) if y is not None and y > 0 and n > 0]
    if len({n for n, _ in pairs}) < 2:
        return None
    xs = [math.log(n) for n, _ in pairs]
    ls = [math.log(y) for _, y in pairs]
    mx, my = sum(xs) / len(xs), sum(ls) / len(ls)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ls, strict=True)) / sxx
    return Slope(slope, my - slope * mx, len(pairs), int(min(n for n, _ in pairs)), int(max(n for n, _ in pairs)))


def series(records: Iterable[Record]) -> dict[tuple, list[Record]]:
    """Records grouped into series (suite, impl, mode, batch, heads, head_dim, dtype, model), N
    ascending: ``model``, the model a suite takes its shapes from (None where it takes none), keeps
    two models of one shape (the mlp suite's ViT-B and EVA02-B) apart.

    Each series is one line in a plot and one row of the slope table.
    """
    out: dict[tuple, list[Record]] = {}
    for r in records:
        key = (r.suite, r.impl, r.mode, r.batch, r.heads, r.head_dim, r.dtype, r.extra.get("model"))
        out.setdefault(key, []).append(r)
    for rs in out.values():
        rs.sort(key=lambda r: r.n_tokens)
    return out


def slopes(records: Iterable[Record]) -> dict[tuple, tuple[Slope | None, Slope | None]]:
    """Per series: (time slope, memory slope), fitted on its ok points."""
    out = {}
    for key, rs in series(records).items():
        ok = [r for r in rs if r.status == "ok"]
        ns = [r.n_tokens for r in ok]
        out[key] = (fit_slope(ns, [r.ms for r in ok]), fit_slope(ns, [r.peak_mem_bytes for r in ok]))
    return out


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


PYTORCH_IMPLS = ("eager", "compiled", "compiled-max-autotune")
# Point parameters that tell two rows of one suite apart beyond (mode, N, batch, heads, dtype).
_SHAPE_KEYS = ("model", "dim", "hidden", "resolution", "patch", "embed_dim", "in_chans")


def _base(impl: str) -> str:
    return impl.split("[")[0]  # "fastvit[torch]" -> "fastvit", "sdpa[flash]" -> "sdpa"


def is_fastvit(record: Record) -> bool:
    """A row fastvit ran: ``fastvit``, ``fastvit-*``, ``fastvit+*`` or a model's ``+fastvit``."""
    base = _base(record.impl)
    return base.startswith("fastvit") or base.endswith("+fastvit")


def is_pytorch(record: Record) -> bool:
    """A row PyTorch ran: eager, compiled, SDPA (any backend), or an unpatched model."""
    base = _base(record.impl)
    if record.suite == "model":
        return not base.endswith("+fastvit")
    return base.split("+")[0] in PYTORCH_IMPLS or base.split("+")[0].startswith("sdpa")


def _group(record: Record) -> tuple:
    base = _base(record.impl)
    variant = "" if record.suite == "model" or "+" not in base else base.split("+", 1)[1]  # +bias, +rel_pos
    shape = tuple(record.extra.get(k) for k in _SHAPE_KEYS)
    return (record.suite, record.mode, record.n_tokens, record.batch, record.heads, record.head_dim, record.dtype,
            record.device, variant, shape)  # fmt: skip


def _best_pytorch(records: Sequence[Record]) -> dict[tuple, Record]:
    """The fastest ok PyTorch row of each ``_group``."""
    best: dict[tuple, Record] = {}
    for r in records:
        if r.status == "ok" and r.ms and is_pytorch(r):
            key = _group(r)
            if key not in best or r.ms < best[key].ms:
                best[key] = r
    return best


def pytorch_speedups(records: Sequence[Record]) -> list[float | None]:
    """Per record: for a fastvit row, the best (fastest) PyTorch row's time over its own, among the
    rows of the same run with the same suite, mode, shape and variant (``fastvit+bias`` against
    ``sdpa+bias``); above 1 fastvit is faster. None for other rows, or without a PyTorch row."""
    best = _best_pytorch(records)
    return [
        best[_group(r)].ms / r.ms if r.status == "ok" and r.ms and is_fastvit(r) and _group(r) in best else None
        for r in records
    ]


def within_spread(records: Sequence[Record]) -> list[bool]:
    """Per record: True for a fastvit row whose middle half of times (p25-p75) overlaps that of
    the best PyTorch row ``pytorch_speedups`` compares it with: the two are not told apart by
    this run (the table marks the speedup with ``~``). False elsewhere, or without both spreads."""
    best = _best_pytorch(records)
    out = []
    for r, speedup in zip(records, pytorch_speedups(records), strict=True):
        other = best.get(_group(r)) if speedup is not None else None
        spreads = other is not None and None not in (r.ms_p25, r.ms_p75, other.ms_p25, other.ms_p75)
        out.append(spreads and r.ms_p25 <= other.ms_p75 and other.ms_p25 <= r.ms_p75)
    return out


def table_rows(records: Iterable[Record]) -> list[list[str]]:
    """The result table: impl, mode, N, ms, p25-p75, TFLOP/s, the roofline floor and the percentage
    of it reached (``roofline.annotate``), each fastvit row's speedup over the best PyTorch row of
    the same shape (``pytorch_speedups``; ``~`` where their p25-p75 overlap: ``within_spread``),
    peak memory, status, note."""
    records = list(records)
    rows = []
    for r, speedup, close in zip(records, pytorch_speedups(records), within_spread(records), strict=True):
        iqr = "-" if r.ms_p25 is None else f"{r.ms_p25:.3g}-{r.ms_p75:.3g}"
        rows.append(
            [
                r.suite,
                r.impl,
                r.mode,
                str(r.n_tokens),
                _fmt(r.ms, ".4g"),
                iqr,
                _fmt(r.tflops, ".3g"),
                _fmt(r.extra.get("floor_ms"), ".3g"),
                _fmt(r.extra.get("pct_of_floor"), ".3g"),
                "-" if speedup is None else f"{speedup:.2f}x" + ("~" if close else ""),
                format_bytes(r.peak_mem_bytes),
                r.status,
                r.note,
            ]
        )
    return rows


TABLE_HEADER = [
    "suite", "impl", "mode", "N", "ms", "ms p25-p75", "TFLOP/s", "floor ms", "% floor", "vs PyTorch", "peak mem",
    "status", "note",
]  # fmt: skip
RIGHT_ALIGNED = (
    "N", "B", "H", "D", "ms", "TFLOP/s", "floor ms", "% floor", "vs PyTorch", "REG", "stack B", "HMMA", "HGMMA",
)  # fmt: skip
SLOPE_HEADER = [
    "suite", "impl", "mode", "B", "H", "D", "dtype", "time slope", "memory slope", "points", "N range",
]  # fmt: skip


def slope_rows(records: Iterable[Record]) -> list[list[str]]:
    """Per series: what it holds fixed (batch B, heads H, head dim D, dtype: ``series``), time
    slope, memory slope, its ok points and their range of N."""
    records = list(records)
    fits = slopes(records)
    rows = []
    for key, rs in series(records).items():
        suite, impl, mode, batch, heads, head_dim, dtype, model = key
        t, m = fits[key]
        ok = sorted(r.n_tokens for r in rs if r.status == "ok")
        span = f"{ok[0]}-{ok[-1]}" if ok else "-"
        fixed = [str(batch), str(heads), str(head_dim), dtype]
        shown = impl if model is None or suite == "model" else f"{impl} ({model})"  # model rows: in impl
        rows.append([suite, shown, mode, *fixed, str(t) if t else "-", str(m) if m else "-", str(len(ok)), span])
    return rows


def print_tables(records: list[Record], *, file=None) -> None:
    """Print the result table and the slope table (rich when installed, else plain text)."""
    print_table("results", TABLE_HEADER, table_rows(records), file)
    print_table("log-log slopes against N (ok points)", SLOPE_HEADER, slope_rows(records), file)


def print_table(title: str, header: list[str], rows: list[list[str]], file=None) -> None:
    """One titled table on ``file`` (stdout by default)."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        print(f"\n{title}", file=file)
        for row in [header, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)), file=file)
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold", justify="right" if h in RIGHT_ALIGNED else "left")
    for row in rows:
        table.add_row(*(Text(c) for c in row))  # Text: "sdpa[flash]" is not rich markup
    Console(file=file, width=200).print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)
