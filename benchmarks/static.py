"""The static GPU report: ``python -m benchmarks static [--arch 80,89,90] [--json PATH] [--figures PATH]
[--only triton|csrc] [--match TEXT]``.

One tool in five files: this one (the command, the csrc half, the table), ``static_triton`` (the
Triton compile), ``static_disasm`` (Triton's cubins disassembled in batches), ``static_sass`` /
``static_ttgir`` (reading machine code and Triton's IR) and ``static_model`` (the performance model
and the problems).

Compiles, on this machine (no GPU needed), every Triton kernel configuration the launchers can
pick (each kernel module's ``aot_specs()``, ``fastvit.kernels.aot.KernelSpec``) and every kernel of the CUDA
extension (each ``csrc/*_kernels.cu``, compiled standalone with
``nvcc -cubin -arch=sm_XX -O3 -std=c++17 -I csrc -Xptxas -v``: by contract these files include
only CUDA headers and csrc headers) for sm_80, sm_89 and sm_90, and reports per kernel (per
template instantiation for the .cu files) and architecture:

- ``registers`` per thread, ``stack`` frame bytes and ``local`` memory bytes
  (``cuobjdump --dump-resource-usage``); ``spill_stores`` / ``spill_loads`` bytes (ptxas ``-v``,
  csrc only: Triton runs ptxas itself); ``local_stores`` / ``local_loads``, the STL / LDL
  instructions in the machine code, and (Triton) ``local_in_loops``, those of them inside a loop;
- ``shared``: shared memory per block, static (the cubin's, without sm_90's 1 KiB system
  reservation) plus, for Triton, the dynamic amount its launch requests. The csrc kernels'
  dynamic shared memory (if any) is chosen by their launchers at run time and not counted;
- ``hmma`` / ``hgmma``: the warp-level and warpgroup (sm_90) tensor-core MMA instructions in the
  SASS (``cuobjdump -sass`` of each csrc cubin; Triton's, a batch at a time, by ``nvdisasm``);
- Triton rows only, the performance model (``static_model``; the constants are stated there):
  ``ctas_per_sm`` and ``regs_to_cliff`` (occupancy), ``mma_shapes`` (the MMA histogram),
  ``mma_rows_replicated`` (a dot's MMA layout spans more rows than its tile: rows computed twice;
  ``mma_tiles`` lists every dot's tile and layout), ``loop_issue_ratio`` (the hot loop's issue
  cycles over its tensor-core cycles, with ``loop_instructions``, ``loop_mma_cycles``,
  ``loop_mma_shapes``), ``loop_mufu_ratio`` (its special-function cycles over the same),
  ``async_copy`` (``"tma"``, ``"cp.async"`` or ``"none"``) and
  ``wgmma_wait_pendings`` (the hot loop's wgmma waits, sm_90).

A row has problems (``static_model.problems``) when it does not compile, spills (except a spill of
at most 64 B whose local loads and stores all lie outside every loop: registers saved before a main
loop and restored after it, once per program; its ``stack`` shows in the figures), uses more
shared memory than the architecture allows per block, is an fp16/bf16 matmul-bound kernel
(``KernelSpec.needs_wgmma``; the csrc kernels are memory-bound and never need it) without HGMMA on
sm_90, replicates MMA rows, has an HGMMA narrower than 32 in its hot loop, has a 16-bit MMA hot
loop on sm_90 with an issue ratio above 1, or aims at 2+ CTAs/SM with fewer than 8 registers to the
occupancy cliff. The exit status is 1 when any row has a problem, 2 on a usage error.

``--figures PATH`` writes the Triton rows' figures, keyed by row, in the compact form that
``benchmarks/results/static/`` keeps under review (``static_figures``); with ``--match`` it
replaces only the matching rows of an existing file.

The Triton part runs ``python -m fastvit.benchmarks.static_triton`` in a subprocess with ``TRITON_INTERPRET``
unset (the interpreter replaces ``@triton.jit`` functions at import), on a process pool of
``--jobs`` workers; the nvcc compiles run beside it on as many threads. nvcc is the one of the
toolkit the extension builds with (``fastvit.extension.cuda_home``); without it the csrc part is
skipped (said in the output and in the JSON's meta).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastvit.kernels.aot import ARCHS

from .static_model import SHARED_MEMORY_LIMIT, problems
from .static_sass import parse_ptxas_log, parse_resource_usage, parse_sass

__all__ = [
    "ARCHS",
    "compile_cu",
    "csrc_files",
    "demangle",
    "find_nvcc",
    "main",
    "run_csrc",
    "run_triton",
    "short_name",
    "table_rows",
]

CSRC_DIR = Path(__file__).resolve().parents[1] / "csrc"  # beside benchmarks/ in a checkout
TRITON_TIMEOUT_S = 3600.0
NVCC_TIMEOUT_S = 600.0
TABLE_HEADER = ["kernel", "config", "sm", "REG", "stack B", "spill st/ld B", "STL/LDL", "smem", "HMMA", "HGMMA",
                "CTAs/SM", "to cliff", "issue", "MUFU", "loop eff", "copy", "problems"]  # fmt: skip
# demangled type names -> the short names the Triton rows use
_SHORT_TYPES = (
    (r"\b__nv_bfloat16\b", "bf16"),
    (r"\b__half\b", "fp16"),
    (r"\bfloat\b", "fp32"),
    (r"\bdouble\b", "fp64"),
    (r"\bunsigned int\b", "u32"),
    (r"\(anonymous namespace\)::", ""),
    (r"\bfastvit::", ""),
)


# ---------------------------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """The nvcc of the toolkit the extension builds with (``fastvit.extension.cuda_home``: one
    finder for both); None without one."""
    from fastvit.extension import cuda_home

    home = cuda_home()
    return str(home / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")) if home is not None else None


def _cuobjdump(nvcc: str | None) -> str:
    """The toolkit's cuobjdump beside nvcc, else the one in Triton's wheel."""
    if nvcc:
        candidate = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")
        if os.access(candidate, os.X_OK):
            return candidate
    from .static_triton import tool

    return tool("cuobjdump")


def _demangler(nvcc: str | None) -> str | None:
    """cu++filt beside nvcc or on PATH, else binutils' c++filt (the same Itanium ABI), else None."""
    if nvcc:
        candidate = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cu++filt")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("cu++filt") or shutil.which("c++filt")


def demangle(symbols: list[str], nvcc: str | None = None) -> dict[str, str]:
    """Mangled -> demangled names (each symbol unchanged where no demangler is installed)."""
    tool = _demangler(nvcc)
    if not symbols or tool is None:
        return {s: s for s in symbols}
    try:
        out = subprocess.run([tool], input="\n".join(symbols) + "\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {s: s for s in symbols}
    lines = out.stdout.splitlines()
    if out.returncode != 0 or len(lines) != len(symbols):
        return {s: s for s in symbols}
    return dict(zip(symbols, lines, strict=True))


def _matching_open(text: str, close: int, pair: str) -> int:
    """Index of the bracket that opens the one at ``close`` (``pair`` = "()" or "<>")."""
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == pair[1]:
            depth += 1
        elif text[i] == pair[0]:
            depth -= 1
            if depth == 0:
                return i
    return -1


def short_name(demangled: str) -> tuple[str, str]:
    """(kernel name, template arguments) of a demangled kernel, shortened for the table.

    ``void fastvit::ln_fwd_kernel<__nv_bfloat16, 8, (fastvit::Gelu)1>(__nv_bfloat16 const*, int)``
    -> ``("ln_fwd_kernel", "bf16, 8, Gelu 1")``: no return type, parameters or namespaces.
    """
    text = demangled.strip()
    if text.endswith(")"):  # the parameter list
        start = _matching_open(text, len(text) - 1, "()")
        if start > 0:
            text = text[:start]
    args = ""
    if text.endswith(">"):
        start = _matching_open(text, len(text) - 1, "<>")
        if start > 0:
            text, args = text[:start], text[start + 1 : -1]
    name = text.split(" ")[-1].split("::")[-1] or demangled  # drops "void " and the namespaces
    for pattern, short in _SHORT_TYPES:
        args = re.sub(pattern, short, args)
    args = re.sub(r"\((?:[\w:]+::)?(\w+)\)(-?\d+)", r"\1 \2", args)  # enum values: (ns::Gelu)1 -> Gelu 1
    return name, args


# ---------------------------------------------------------------------------------------------
# csrc: nvcc
# ---------------------------------------------------------------------------------------------
def csrc_files(csrc: Path = CSRC_DIR) -> list[Path]:
    """The extension's kernel files, ``csrc/*_kernels.cu``, sorted."""
    return sorted(Path(csrc).glob("*_kernels.cu"))


def _tail(text: str, limit: int = 2000) -> str:
    return text.strip()[-limit:]


def compile_cu(path: Path, arch: int, nvcc: str, include: Path | None = None) -> list[dict[str, Any]]:
    """Compile one .cu file for one architecture; one row per kernel (template instantiation).

    A file that does not compile, or whose cubin holds no kernel (templates never instantiated),
    gives one row with an ``error``.
    """
    path = Path(path)
    include = Path(include) if include is not None else path.parent
    base = {"source": "csrc", "file": path.name, "arch": arch, "needs_wgmma": False}
    with tempfile.TemporaryDirectory(prefix="fastvit-static-") as tmp:
        cubin = Path(tmp) / f"{path.stem}.sm_{arch}.cubin"
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-I", str(include), "-Xptxas", "-v",
               "-o", str(cubin), str(path)]  # fmt: skip
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return [{**base, "kernel": path.stem, "config": "", "error": f"nvcc took over {NVCC_TIMEOUT_S:.0f} s"}]
        compile_s = round(time.perf_counter() - start, 2)
        if done.returncode != 0 or not cubin.exists():
            error = f"nvcc exit status {done.returncode}: {_tail(done.stderr + done.stdout)}"
            return [{**base, "kernel": path.stem, "config": "", "error": error}]
        cuobjdump = _cuobjdump(nvcc)
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True)
    if usage.returncode != 0 or sass.returncode != 0:
        error = f"cuobjdump failed: {_tail(usage.stderr + sass.stderr)}"
        return [{**base, "kernel": path.stem, "config": "", "error": error}]
    resources, code, ptxas = parse_resource_usage(usage.stdout), parse_sass(sass.stdout), parse_ptxas_log(done.stderr)
    entries = [s for s in resources if ptxas.get(s, {}).get("entry")] or list(resources)
    if not entries:
        return [{**base, "kernel": path.stem, "config": "", "compile_s": compile_s,
                 "error": "no kernel in the cubin (templates never instantiated?)"}]  # fmt: skip
    names = demangle(entries, nvcc)
    rows = []
    for symbol in entries:
        used, log = resources[symbol], ptxas.get(symbol, {})
        name, args = short_name(names[symbol])
        static = log.get("smem", used.get("SHARED", 0))
        rows.append({
            **base,
            "kernel": f"{path.stem}.{name}",
            "config": args,
            "symbol": symbol,
            "demangled": names[symbol],
            "compile_s": compile_s,
            "registers": used.get("REG", log.get("registers", -1)),
            "stack": used.get("STACK", log.get("stack", 0)),
            "local": used.get("LOCAL", 0),
            "spill_stores": log.get("spill_stores"),
            "spill_loads": log.get("spill_loads"),
            "shared_static": static,
            "shared_dynamic": None,  # chosen by the launcher at run time
            "shared": static,
            "shared_cubin": used.get("SHARED", 0),
            "shared_limit": SHARED_MEMORY_LIMIT[arch],
            **code.get(symbol, {"hmma": 0, "hgmma": 0, "local_stores": 0, "local_loads": 0}),
        })  # fmt: skip
    return rows


def run_csrc(
    archs: tuple[int, ...] = ARCHS, jobs: int | None = None, csrc: Path = CSRC_DIR, nvcc: str | None = None
) -> list[dict[str, Any]]:
    """Every ``csrc/*_kernels.cu`` for every architecture, ``jobs`` nvcc processes at a time."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)")
    tasks = [(path, arch) for path in csrc_files(csrc) for arch in archs]
    with ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda t: compile_cu(t[0], t[1], nvcc, Path(csrc)), tasks))
    return [row for rows in results for row in rows]


# ---------------------------------------------------------------------------------------------
# Triton: fastvit.benchmarks.static_triton in a subprocess without TRITON_INTERPRET
# ---------------------------------------------------------------------------------------------
def _start_triton(archs: tuple[int, ...], jobs: int | None, out: Path, log: Any, match: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastvit.benchmarks.static_triton", "--json", str(out), "--archs", *map(str, archs)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    if match:
        cmd += ["--match", match]
    # the per-configuration lines go nowhere: this module prints its own table from the JSON
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)


def _triton_rows(proc: subprocess.Popen, out: Path, log_path: Path) -> list[dict[str, Any]]:
    try:
        proc.wait(timeout=TRITON_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if not out.exists():
        why = f"exit status {proc.returncode}: {_tail(log_path.read_text(errors='replace'), 3000)}"
        return [{"source": "triton", "kernel": "triton", "config": "", "arch": 0, "needs_wgmma": False,
                 "error": f"the Triton AOT compile did not finish ({why})"}]  # fmt: skip
    return [{"source": "triton", **row} for row in json.loads(out.read_text())]


def run_triton(archs: tuple[int, ...] = ARCHS, jobs: int | None = None, match: str | None = None
               ) -> list[dict[str, Any]]:  # fmt: skip
    """Every Triton kernel configuration for ``archs`` whose ``kernel [config]`` contains ``match``
    (``python -m fastvit.benchmarks.static_triton``)."""
    with tempfile.TemporaryDirectory(prefix="fastvit-static-") as tmp:
        out, log_path = Path(tmp) / "triton.json", Path(tmp) / "triton.log"
        with open(log_path, "w") as log:
            proc = _start_triton(archs, jobs, out, log, match)
        return _triton_rows(proc, out, log_path)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def _pair(a: Any, b: Any) -> str:
    return "-" if a is None and b is None else f"{a if a is not None else '-'}/{b if b is not None else '-'}"


def _model_cells(row: dict[str, Any]) -> list[str]:
    if "ctas_per_sm" not in row:  # a csrc row: launch sizes unknown here
        return ["-"] * 6
    ratio, mufu = row.get("loop_issue_ratio"), row.get("loop_mufu_ratio")
    eff = "-" if row.get("loop_efficiency") is None else f"{row['loop_efficiency']:.2f}"
    return [str(row["ctas_per_sm"]), str(row["regs_to_cliff"]), "-" if ratio is None else f"{ratio:.2f}",
            "-" if mufu is None else f"{mufu:.2f}", eff, row["async_copy"]]  # fmt: skip


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The printed table: kernel, config, sm, registers, stack, spills, STL/LDL, smem, MMA, the model's
    CTAs/SM, registers to the cliff, hot-loop issue and MUFU ratios, the hot loop's tensor-core
    share (the row's ``loop_efficiency``, ``static_model.loop_efficiency``: MMA and other work in
    turn within a program, overlapped across the programs of an SM), async copy, problems."""
    from .report import format_bytes

    out = []
    for r in rows:
        if "error" in r:
            why = " ".join("; ".join(r["problems"]).split())  # one line
            out.append([r["kernel"], r["config"], str(r["arch"]), *["-"] * 12, why[:300]])
            continue
        out.append([
            r["kernel"],
            r["config"],
            str(r["arch"]),
            str(r["registers"]),
            str(r["stack"]),
            _pair(r.get("spill_stores"), r.get("spill_loads")),
            _pair(r.get("local_stores"), r.get("local_loads")),
            format_bytes(r["shared"]),
            str(r["hmma"]),
            str(r["hgmma"]),
            *_model_cells(r),
            "; ".join(r["problems"]),
        ])  # fmt: skip
    return out


def _sort_key(row: dict[str, Any]) -> tuple:
    return (row["source"] != "triton", row["kernel"], row["config"], row["arch"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks static",
        description="Compile every Triton kernel configuration and every csrc/*_kernels.cu kernel for the given "
        "architectures (no GPU needed) and report registers, spills, shared memory, MMA instructions and a "
        "static performance model (occupancy, replicated MMA rows, the hot loop's issue ratio); exit status 1 "
        "when any kernel has a problem (see the module docstring of benchmarks/static.py).",
    )
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="SM architectures, comma-separated "
                   "(default: 80,89,90)")  # fmt: skip
    p.add_argument("--json", type=Path, help="write the rows (and the run's meta) to this file")
    p.add_argument("--figures", type=Path, help="write the Triton rows' figures, keyed by row, to this file (the "
                   "form benchmarks/results/static/ keeps)")  # fmt: skip
    p.add_argument("--only", choices=("triton", "csrc"), help="only the Triton kernels or only the CUDA extension's")
    p.add_argument("--match", help="only the Triton configurations whose 'kernel [config]' contains this text "
                   "(implies --only triton)")  # fmt: skip
    p.add_argument("--jobs", type=int, help="parallel compiles (default: the CPU count)")
    p.add_argument("--csrc", type=Path, default=CSRC_DIR, help=f"the .cu files' folder (default: {CSRC_DIR})")
    p.add_argument("--no-table", action="store_true", help="print only the summary and the rows with problems")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks static``: compile, print the table and summary, write the JSON."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        archs = tuple(dict.fromkeys(int(a) for a in args.arch.replace(" ", "").split(",") if a))
    except ValueError:
        parser.error(f"--arch: expected comma-separated integers such as 80,89,90, got {args.arch!r}")
    unknown = [a for a in archs if a not in SHARED_MEMORY_LIMIT]
    if not archs or unknown:
        parser.error(f"--arch: choose from {sorted(SHARED_MEMORY_LIMIT)}, got {args.arch!r}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be positive, got {args.jobs}")
    jobs = args.jobs or os.cpu_count() or 1
    if args.match:
        args.only = "triton"
    if args.figures and args.match:  # a --match run updates the file's matching rows only
        from .static_figures import figures_version

        written = figures_version(args.figures)
        if written not in (None, _version("triton")):
            parser.error(f"--figures {args.figures} holds the figures of Triton {written}: a --match run with "
                         f"Triton {_version('triton')} would replace them with its matching rows alone; write "
                         "to another file, or run without --match")  # fmt: skip

    started = time.monotonic()
    nvcc = find_nvcc()
    csrc_skipped = None
    if args.only != "triton":
        if nvcc is None:
            csrc_skipped = "nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH): csrc kernels not compiled"
        elif not csrc_files(args.csrc):
            csrc_skipped = f"no *_kernels.cu in {args.csrc}"
        if csrc_skipped and args.only == "csrc":
            print(f"static: {csrc_skipped}", file=sys.stderr)
            return 2
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as waiter:  # the Triton subprocess compiles beside nvcc
        triton = waiter.submit(run_triton, archs, jobs, args.match) if args.only != "csrc" else None
        if args.only != "triton" and csrc_skipped is None:
            rows += run_csrc(archs, jobs, args.csrc, nvcc)
        if triton is not None:
            rows += triton.result()
    for row in rows:
        row["problems"] = problems(row)
    rows.sort(key=_sort_key)
    elapsed = time.monotonic() - started

    from .report import print_table

    bad = [r for r in rows if r["problems"]]
    if not args.no_table:
        print_table("static report: machine code per kernel and architecture", TABLE_HEADER, table_rows(rows))
    if bad:
        print_table("rows with problems", TABLE_HEADER, table_rows(bad))
    summary = _summary(rows, archs, elapsed)
    if csrc_skipped:
        summary.append(f"csrc skipped: {csrc_skipped}")
    print("\n" + "\n".join(summary))
    if args.match and not rows:  # said, not an empty table and exit 0
        print(f"--match {args.match!r}: no kernel configuration contains it; nothing compiled or written",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.figures:
        from .static_figures import write_figures

        write_figures(args.figures, rows, _version("triton"), args.match, archs)
        print(f"wrote the figures of the Triton rows to {args.figures}")
    if args.json:
        meta = {
            "archs": list(archs),
            "jobs": jobs,
            "elapsed_s": round(elapsed, 1),
            "nvcc": nvcc,
            "nvcc_version": _nvcc_version(nvcc),
            "triton": _version("triton"),
            "csrc_dir": str(args.csrc),
            "csrc_files": [p.name for p in csrc_files(args.csrc)],
            "csrc_skipped": csrc_skipped,
            "only": args.only,
            "summary": summary,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 1 if bad else 0


def _summary(rows: list[dict[str, Any]], archs: tuple[int, ...], elapsed: float) -> list[str]:
    lines = [f"{len(rows)} rows ({', '.join(f'sm_{a}' for a in archs)}) in {elapsed:.0f} s"]
    for source in ("triton", "csrc"):
        part = [r for r in rows if r["source"] == source]
        if not part:
            continue
        ok = [r for r in part if "error" not in r]
        kinds = {
            "compile errors": sum("error" in r for r in part),
            "spills": sum(any("spills" in p for p in r["problems"]) for r in part),
            "over the shared memory limit": sum(any("shared memory" in p for p in r["problems"]) for r in part),
            "matmuls without HGMMA on sm_90": sum(any("without warpgroup MMA" in p for p in r["problems"])
                                                  for r in part),
            "replicated MMA rows": sum(any("replicated MMA rows" in p for p in r["problems"]) for r in part),
            "narrow hot-loop HGMMA": sum(any("N < 32" in p for p in r["problems"]) for r in part),
            "issue-bound hot loops": sum(any("issue-bound" in p for p in r["problems"]) for r in part),
            "below the occupancy aim": sum(any("CTAs/SM" in p for p in r["problems"]) for r in part),
        }
        max_regs = max((r["registers"] for r in ok), default=0)
        lines.append(
            f"{source}: {len(part)} rows, {len({r['kernel'] for r in part})} kernels, max {max_regs} registers, "
            f"HGMMA in {sum(r['hgmma'] > 0 for r in ok if r['arch'] == 90)} sm_90 rows; problems: "
            + (", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "none")
        )
    return lines


def _nvcc_version(nvcc: str | None) -> str | None:
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release ([\d.]+)", out)
    return match.group(1) if match else None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed or broken: the meta says None
        return None


if __name__ == "__main__":
    sys.exit(main())
