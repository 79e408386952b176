"""The static report's figures under review: a compact JSON of every Triton row, kept in
``benchmarks/results/static/`` per Triton version, and the comparison of a fresh report with it.

The file is written by the tool, never by hand::

    python -m benchmarks static --only triton --figures benchmarks/results/static/figures-triton-3.8.0.json

``tests/benchmarks/test_static.py`` runs the report and fails on any problem the committed file
does not list (a new problem) and on any figure that differs from it: a change of registers,
occupancy, MMA shapes or issue ratio then shows in review as a diff of this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "FIGURES_DIR", "FIGURE_FIELDS", "compare", "figures", "figures_path", "figures_version", "row_key", "write_figures",
]

FIGURES_DIR = Path(__file__).resolve().parent / "results" / "static"
# the figures kept per row: resources, MMA, the performance model, the problems
FIGURE_FIELDS = (
    "num_warps", "num_stages", "registers", "stack", "shared", "hmma", "hgmma", "ctas_per_sm", "regs_to_cliff",
    "target_ctas_per_sm", "mma_shapes", "mma_tiles", "mma_rows_replicated", "loop_issue_ratio",
    "loop_mufu_ratio", "loop_efficiency", "loop_serial", "loop_instructions", "loop_conditional_instructions",
    "loop_mma_shapes", "async_copy",
    "wgmma_wait_pendings", "problems",
)  # fmt: skip


def row_key(row: dict[str, Any]) -> str:
    """``"sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=64 BM=128 BN=64 w=8 s=3]"``."""
    return f"sm_{row['arch']} {row['kernel']} [{row['config']}]"


def figures(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Triton rows' figures, keyed by ``row_key`` and sorted."""
    out = {}
    for row in rows:
        if row.get("source", "triton") != "triton":
            continue
        out[row_key(row)] = {k: row.get(k) for k in FIGURE_FIELDS}
    return dict(sorted(out.items()))


def figures_path(triton_version: str | None) -> Path:
    """The committed figures of one Triton version (Triton's code generation differs per version)."""
    return FIGURES_DIR / f"figures-triton-{triton_version}.json"


def figures_version(path: Path | str) -> str | None:
    """The Triton version a figures file was written with; None where there is no such file."""
    try:
        return json.loads(Path(path).read_text())["meta"]["triton"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_figures(path: Path, rows: list[dict[str, Any]], triton_version: str | None, match: str | None = None,
                  archs: tuple[int, ...] | None = None) -> None:  # fmt: skip
    """Write ``figures(rows)`` with the Triton version and the command that made them.

    With ``match`` (the report's ``--match``: rows whose ``kernel [config]`` contains it, on
    ``archs``), only those rows of an existing file of the same Triton version are replaced, added
    or dropped; the others are kept as they are.
    """
    path = Path(path)
    meta = {"triton": triton_version,
            "command": f"python -m benchmarks static --only triton --figures {path}"}  # fmt: skip
    fresh = figures(rows)
    if match is not None and path.exists():
        old = json.loads(path.read_text())
        if old["meta"]["triton"] == triton_version:
            def selected(key: str) -> bool:
                arch, rest = key.split(" ", 1)
                return match in rest and (archs is None or int(arch.removeprefix("sm_")) in archs)

            fresh = dict(sorted({**{k: v for k, v in old["rows"].items() if not selected(k)}, **fresh}.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": fresh}, indent=1) + "\n")


def compare(fresh: dict[str, dict[str, Any]], committed: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """What differs between fresh figures and committed ones: ``new_problems`` (a problem the
    committed row does not list, or any problem of a row it lacks), ``changed`` (a figure that
    differs), ``added`` and ``removed`` rows."""
    out: dict[str, list[str]] = {"new_problems": [], "changed": [], "added": [], "removed": []}
    for key, row in fresh.items():
        old = committed.get(key)
        known = set(old["problems"]) if old else set()
        out["new_problems"] += [f"{key}: {p}" for p in row["problems"] if p not in known]
        if old is None:
            out["added"].append(key)
            continue
        out["changed"] += [f"{key}: {f} {old.get(f)!r} -> {row.get(f)!r}" for f in FIGURE_FIELDS
                           if f != "problems" and old.get(f) != row.get(f)]  # fmt: skip
    out["removed"] = [key for key in committed if key not in fresh]
    return out
