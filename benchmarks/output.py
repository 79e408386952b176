"""Writing a run's folder: results.json ({"meta", "records"}), results.csv, summary.md, plots.

The records are annotated with their roofline floor (``roofline.annotate``) against the device
ceilings in ``meta["ceilings"]`` as they are written, so every suite's rows get it. What became
of each suite (``meta["suite_status"]``, ``SUITE_STATUSES``) heads summary.md. A write replaces
the plots of an earlier run into the same folder: plots it does not write are removed.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .plots import plot_all, plot_name
from .records import MODES, RECORD_FIELDS, SUITES, Record
from .report import SLOPE_HEADER, TABLE_HEADER, markdown_table, slope_rows, table_rows
from .roofline import annotate, ceilings_line

__all__ = [
    "SUITE_STATUSES", "default_out_dir", "device_name", "incomplete_suites", "load_results", "meta", "timing_line",
    "write_results",
]  # fmt: skip

# meta["suite_status"][suite] = {"status": one of these, "note": why}: what became of each suite asked for
SUITE_STATUSES = {
    "completed": "ran to the end: every point has a row",
    "time-limit": "ran to the end, but the --time-limit was reached: its later points are timeout rows, not run",
    "failed": "raised an error (the note) before it returned its rows",
    "interrupted": "the run was interrupted during it (Ctrl-C, SIGTERM): the rows measured so far are kept",
    "not-run": "the run ended before it started",
    "not-in-build": "its module is not in this build",
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """ "NVIDIA H100 80GB HBM3" or "AMD EPYC (2 cores)"."""
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the meta says None
        return None


def default_out_dir(device: str, when: datetime.date | None = None) -> Path:
    """``benchmarks/results/<device>-<date>``: device "cpu", or the GPU's model ("h100")."""
    when = when or datetime.date.today()
    slug = device
    if device == "cuda":
        match = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", torch.cuda.get_device_name(0))
        slug = match.group(1).lower() if match else "cuda"
    return Path("benchmarks") / "results" / f"{slug}-{when.isoformat()}"


def _arch(device: str) -> int | None:
    """The GPU's SM architecture (90 for an H100), None on the CPU."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def meta(
    device: str,
    argv: list[str] | None = None,
    settings: dict[str, Any] | None = None,
    ceilings: dict[str, Any] | None = None,
    suite_status: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Where and how the results were produced; ``ceilings`` are the device's measured copy
    bandwidth and matmul throughput (``roofline.measure_ceilings``), the floors' reference;
    ``suite_status`` what became of each suite (``SUITE_STATUSES``), kept when given."""
    argv = sys.argv if argv is None else argv
    run_meta = {
        "device": device,
        "device_name": device_name(device),
        "arch": _arch(device),
        "driver": _driver() if device == "cuda" else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastvit": _version("fastvit"),
        "timm": _version("timm"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *argv[1:]]),
        "settings": settings or {},
        "ceilings": ceilings,
    }
    if suite_status is not None:
        run_meta["suite_status"] = suite_status
    return run_meta


def write_results(out_dir: Path, records: list[Record], run_meta: dict[str, Any], *, plots: bool = True) -> list[Path]:
    """Write results.json, results.csv, summary.md and (with matplotlib) the plots; return the files.

    The records get their roofline columns (``roofline.annotate``, in place) against
    ``run_meta["ceilings"]``. Plots of an earlier run in ``out_dir`` that this write does not
    replace are removed (``_remove_stale_plots``: the harness's plot names only).
    """
    annotate(records, run_meta.get("ceilings"))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in records]
    files = [out_dir / "results.json", out_dir / "results.csv"]
    files[0].write_text(json.dumps({"meta": run_meta, "records": rows}, indent=1, default=str) + "\n")

    extra_columns = sorted({k for row in rows for k in row} - set(RECORD_FIELDS))
    with open(files[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*RECORD_FIELDS, *extra_columns])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})

    images: list[Path] = []
    if plots:
        try:
            images = plot_all(records, out_dir)
        except ImportError as error:  # matplotlib is in the [bench] extra; without it, the rest
            print(f"plots skipped: {error} (pip install matplotlib)", file=sys.stderr)
    _remove_stale_plots(out_dir, records, images)
    files += images
    files.append(_write_summary(out_dir, records, run_meta, images))
    return files


def _remove_stale_plots(out_dir: Path, records: list[Record], written: list[Path]) -> None:
    """Remove the plots an earlier run left in ``out_dir`` that this write did not replace, so that
    every figure beside results.json shows its records: only files named as the harness names
    its plots (``plot_name`` of a suite and a mode), never other files."""
    suites = {*SUITES, *(r.suite for r in records)}
    stale = {plot_name(suite, mode) for suite in suites for mode in MODES} - {p.name for p in written}
    removed = [name for name in sorted(stale) if (out_dir / name).is_file()]
    for name in removed:
        (out_dir / name).unlink()
    if removed:
        print(f"removed the plots of an earlier run in {out_dir}: {', '.join(removed)}", file=sys.stderr)


def incomplete_suites(run_meta: dict[str, Any]) -> list[str]:
    """One line per suite of the run that did not complete (``meta["suite_status"]``), e.g.
    ``"mlp: failed (ValueError: boom)"``; none for a run whose meta predates the record."""
    return [
        f"{suite}: {s['status']}" + (f" ({s['note']})" if s.get("note") else "")
        for suite, s in (run_meta.get("suite_status") or {}).items()
        if s.get("status") != "completed"
    ]


def _suites_section(records: list[Record], run_meta: dict[str, Any]) -> list[str]:
    """The table of what became of each suite (none for a meta without ``suite_status``)."""
    status = run_meta.get("suite_status")
    if not status:
        return []
    rows = [
        [suite, s["status"], str(sum(r.suite == suite for r in records)), s.get("note", "")]
        for suite, s in status.items()
    ]
    seen = dict.fromkeys(s["status"] for s in status.values())
    legend = "; ".join(f"`{name}`: {SUITE_STATUSES[name]}" for name in seen if name in SUITE_STATUSES)
    return ["## Suites", "", markdown_table(["suite", "status", "rows", "note"], rows), "", legend + ".", ""]


def _write_summary(out_dir: Path, records: list[Record], run_meta: dict[str, Any], images: list[Path]) -> Path:
    lines = [
        f"# fastvit benchmarks: {run_meta['device_name']}",
        "",
        f"`{run_meta['command']}` on {run_meta['date']}: torch {run_meta['torch']}, triton "
        f"{run_meta['triton']}, fastvit {run_meta['fastvit']}"
        + (f", driver {run_meta['driver']}" if run_meta.get("driver") else "")
        + ".",
        "",
        ceilings_line(run_meta.get("ceilings")),
        "",
        timing_line(run_meta),
        "",
        *_suites_section(records, run_meta),
        "## Scaling: log-log slopes against N",
        "",
        markdown_table(SLOPE_HEADER, slope_rows(records)),
        "",
    ]
    lines += _shape_model_section(records, run_meta)
    if images:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    lines += ["## Results", "", markdown_table(TABLE_HEADER, table_rows(records)), ""]
    path = Path(out_dir) / "summary.md"
    path.write_text("\n".join(lines))
    return path


def timing_line(run_meta: dict[str, Any]) -> str:
    """How the run timed its calls: eager calls (host time included) or CUDA graph replays."""
    if run_meta.get("device") != "cuda":
        return "Times: wall clock (perf_counter) around each call."
    if (run_meta.get("settings") or {}).get("policy", {}).get("cuda_graph"):
        return ("Times: CUDA events around replays of CUDA graphs captured from each step (`--cuda-graph`): "
                "the GPU's time without host overhead; a row whose step could not be captured is an error.")
    return ("Times: CUDA events around eager calls; where the host work of a call outlasts its GPU work (small "
            "sizes) the host sets the pace. `--cuda-graph` times CUDA graph replays instead.")


def load_results(path: str | Path) -> tuple[dict[str, Any], list[Record]]:
    """(meta, records) of a results.json."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "records" not in data:
        raise ValueError(f"{path}: not a fastvit results.json (no 'records')")
    return data.get("meta", {}), [Record.from_dict(row) for row in data["records"]]


def _shape_model_section(records: list[Record], run_meta: dict[str, Any]) -> list[str]:
    """The shape model beside the measured fastvit attention forward rows of a GPU run (none on
    the CPU): what the static figures predict, and how far the measurement is from it."""
    from .shape_model import SHAPE_MODEL_HEADER, attention_forward_rows, load_figures, run_arch

    arch = run_arch(run_meta)
    figures_rows, version = load_figures(run_meta.get("triton"))
    rows = attention_forward_rows(records, figures_rows, arch, run_meta.get("ceilings"))
    if not rows:
        return []
    return [
        "## Shape model: fastvit attention forward",
        "",
        f"`benchmarks/shape_model.py` with the sm_{arch} static figures of Triton {version}: the floor over "
        "(useful share of the padded tiles x wave efficiency x hot-loop efficiency x L2 efficiency: the "
        "hot loop's MMAs and other work take turns inside a program and overlap across the programs of an "
        "SM, c / max(c, c r, 1 + r) with r the larger of its issue and MUFU ratios; the K/V reads at the "
        "matmul peak against the measured L2 bandwidth, where the run has it). `ms / model` far above 1 "
        "is time the model does not see (host overhead, memory latency, the epilogue).",
        "",
        markdown_table(SHAPE_MODEL_HEADER, rows),
        "",
    ]
