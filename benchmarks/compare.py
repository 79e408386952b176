"""``python -m benchmarks compare BASE.json NEW.json``: BASE.ms / NEW.ms per matching row.

Rows match on (suite, impl, mode, n_tokens, batch, heads, head_dim, dtype). A ratio above 1
means NEW is faster. Rows where either side is not ``ok`` show both statuses and no ratio; rows
found on one side only are listed after the table; a suite that did not complete in either run
(failed, interrupted, cut by --time-limit: ``meta["suite_status"]``, absent from older runs) is
noted first.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from .output import incomplete_suites, load_results, timing_line
from .records import KEY_FIELDS, Record
from .report import print_table

__all__ = ["Comparison", "compare", "main"]


@dataclass(frozen=True)
class Comparison:
    key: tuple
    base: Record
    new: Record

    @property
    def speedup(self) -> float | None:
        """BASE.ms / NEW.ms (above 1: NEW is faster); None unless both are ok and timed."""
        if self.base.status != "ok" or self.new.status != "ok" or not self.base.ms or not self.new.ms:
            return None
        return self.base.ms / self.new.ms


def compare(base: list[Record], new: list[Record]) -> tuple[list[Comparison], list[Record], list[Record]]:
    """(matched pairs in BASE's order, rows only in BASE, rows only in NEW)."""
    new_by_key: dict[tuple, Record] = {}
    for r in new:
        new_by_key.setdefault(r.key(), r)
    matched, only_base, seen = [], [], set()
    for r in base:
        other = new_by_key.get(r.key())
        if other is None:
            only_base.append(r)
        elif r.key() not in seen:
            seen.add(r.key())
            matched.append(Comparison(r.key(), r, other))
    only_new = [r for r in new if r.key() not in seen and r.key() not in {b.key() for b in base}]
    return matched, only_base, only_new


def _ms(r: Record) -> str:
    return f"{r.ms:.4g}" if r.status == "ok" and r.ms is not None else r.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks compare", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="BASE results.json (or the run's folder holding it)")
    parser.add_argument("new", help="NEW results.json (or the run's folder holding it)")
    args = parser.parse_args(argv)
    loaded = []
    for path in (args.base, args.new):
        if Path(path).is_dir():
            path = Path(path) / "results.json"
        try:
            loaded.append(load_results(path))
        except (OSError, ValueError) as error:  # a missing file, another file, a folder without one
            parser.error(f"{path}: cannot read a fastvit results.json ({error})")
    (base_meta, base), (new_meta, new) = loaded
    if timing_line(base_meta) != timing_line(new_meta):
        print(f"note: the runs timed their calls differently\n  BASE: {timing_line(base_meta)}\n"
              f"  NEW:  {timing_line(new_meta)}")
    for label, run_meta in (("BASE", base_meta), ("NEW", new_meta)):
        for line in incomplete_suites(run_meta):
            print(f"note: {label} suite {line}")
    matched, only_base, only_new = compare(base, new)

    rows = []
    for c in matched:
        s = c.speedup
        key = ("-" if v is None else str(v) for v in c.key)  # KEY_FIELDS, then the model (Record.key)
        rows.append([*key, _ms(c.base), _ms(c.new), "-" if s is None else f"{s:.3f}"])
    title = f"BASE {args.base} vs NEW {args.new} (BASE.ms / NEW.ms: above 1 = NEW faster)"
    print_table(title, [*KEY_FIELDS, "model", "BASE ms", "NEW ms", "BASE/NEW"], rows)

    groups: dict[tuple, list[float]] = {}
    for c in matched:
        if c.speedup is not None:
            groups.setdefault((c.base.suite, c.base.impl, c.base.mode), []).append(c.speedup)
    summary = [
        [*key, str(len(v)), f"{math.exp(sum(math.log(s) for s in v) / len(v)):.3f}"] for key, v in groups.items()
    ]
    print_table("geometric mean of BASE/NEW", ["suite", "impl", "mode", "rows", "BASE/NEW"], summary)
    for label, rs in (("only in BASE", only_base), ("only in NEW", only_new)):
        if rs:
            print(f"{len(rs)} rows {label}: " + ", ".join(f"{r.impl} {r.mode} N={r.n_tokens}" for r in rs[:20]))
    return 0
