"""Writing a run's folder: results.json ({"meta", "records"}), results.csv, summary.md, plots.

The records are annotated with their roofline floor (``roofline.annotate``) against the device
ceilings in ``meta["ceilings"]`` as they are written, so every suite's rows get it.
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

from .records import RECORD_FIELDS, Record
from .report import SLOPE_HEADER, TABLE_HEADER, markdown_table, slope_rows, table_rows
from .roofline import annotate, ceilings_line

__all__ = ["default_out_dir", "device_name", "load_results", "meta", "timing_line", "write_results"]


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
) -> dict[str, Any]:
    """Where and how the results were produced; ``ceilings`` are the device's measured copy
    bandwidth and matmul throughput (``roofline.measure_ceilings``), the floors' reference."""
    argv = sys.argv if argv is None else argv
    return {
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


def write_results(out_dir: Path, records: list[Record], run_meta: dict[str, Any], *, plots: bool = True) -> list[Path]:
    """Write results.json, results.csv, summary.md and (with matplotlib) the plots; return the files.

    The records get their roofline columns (``roofline.annotate``, in place) against
    ``run_meta["ceilings"]``.
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
            from .plots import plot_all
        except ImportError as error:  # matplotlib is in the [bench] extra; without it, the rest
            print(f"plots skipped: {error} (pip install matplotlib)", file=sys.stderr)
        else:
            images = plot_all(records, out_dir)
    files += images
    files.append(_write_summary(out_dir, records, run_meta, images))
    return files


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
