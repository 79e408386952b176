"""The command line: ``python -m benchmarks [SUITE ...] [options]`` (also ``fastvit-bench``).

    python -m benchmarks                          # attention, then model (with timm): GPU if any
    python -m benchmarks attention --quick --device cpu --out /tmp/smoke
    python -m benchmarks model --model vit_base_patch16_224 --resolutions 224,384,512,1024
    python -m benchmarks model --model scaling    # ViT-B, EVA02-B, SAM-B: time and memory against N
    python -m benchmarks all --out DIR            # every suite
    python -m benchmarks attention --cuda-graph   # GPU: replays of captured graphs, no host time
    python -m benchmarks compare BASE.json NEW.json
    python -m benchmarks static [--arch 80,89,90] [--json PATH] [--only triton|csrc]
    python -m benchmarks tune [options]           # measure the triton and cuda backends per shape
    python -m benchmarks host [--json PATH]       # host time of fastvit's layers per op call (CPU)

Suites are modules of this package, registered below by name; a registered suite whose module
is not in this build yet is skipped with a message. Commands (``compare``, ``static``, ``tune``, ``host``)
are modules with ``main(argv) -> int``, imported only when asked for.

Every run measures the device's ceilings once (a large copy and a large matmul, see
``roofline.py``) and reports each time against the roofline floor of its op and shape.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from . import roofline, runner
from .options import DTYPES, canonical_dtype
from .output import default_out_dir, incomplete_suites, meta, write_results
from .progress import Progress
from .records import SUITES as SUITE_NAMES
from .report import print_tables

__all__ = ["SUITES", "main", "parse_args"]

# command-line name (a record's suite) -> module of this package; "all" runs every one that exists
SUITES = {name: name.replace("-", "_") for name in SUITE_NAMES}
DEFAULT_SUITES = ("attention", "model")
# a --time-limit is shared among the suites in these proportions (what is left over carries on)
WEIGHTS = {"attention": 4.0, "patch-embed": 1.0, "mlp": 1.0, "layernorm": 1.0, "model": 1.5, "varlen": 1.5}
# without --time-limit: the default job on a CPU stays within the 10 minutes it promises, and
# `all` on a GPU within one 10-minute GPU session call
DEFAULT_TIME_LIMIT_MIN = {"cpu-default": 9.0, "cuda-all": 8.0}
_PACKAGE = __package__  # "fastvit.benchmarks"
CEILINGS_TIMEOUT_S = 300.0  # a CUDA context and ~2.5 GiB on a GPU: seconds, unless something is wrong
# command-line name -> (module of this package with main(argv) -> int, what it does)
COMMANDS = {
    "compare": ("compare", "compare two runs: BASE.json NEW.json"),
    "static": ("static", "compile every kernel for sm_80/89/90 and report registers, spills, shared memory, MMA"),
    "tune": ("tune", "measure the triton and cuda backends per op and shape; `auto` then uses the table"),
    "shape-model": ("shape_model", "the shape model beside a run's fastvit attention rows: RESULTS.json"),
    "host": ("host_time", "host time per op call of fastvit's own layers and Triton's argument binding (CPU)"),
}


def _module_exists(name: str) -> bool:
    return importlib.util.find_spec(f"{_PACKAGE}.{SUITES[name]}") is not None


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  python -m benchmarks {name:<8} {what}" for name, (_, what) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="fastvit benchmarks: time and peak memory against N, % of the roofline floor, tables,\n"
        "JSON/CSV and plots.",
        epilog=f"other commands (each has its own --help):\n{commands}",
    )
    p.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"{', '.join(SUITES)} or all (default: attention, then model when timm is installed)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument(
        "--seq-lens",
        type=_ints,
        help="tokens N, comma-separated (default: ViT lengths, 197 up); the model suite runs each model at "
        "the image size giving it about N tokens, N = prefix + (size/patch)^2 (197: 224 px at patch 16, 196 px "
        "at patch 14)",
    )
    p.add_argument("--batch", type=int, help="batch size (default: per suite and device)")
    p.add_argument("--heads", type=int, help="attention heads (default 12)")
    p.add_argument("--head-dim", type=int, help="head dim (default 64)")
    p.add_argument("--mode", choices=("fwd", "fwd+bwd", "both"), default="both", help="default: both")
    p.add_argument(
        "--out", type=Path,
        help="output folder (default: benchmarks/results/<device>-<date>); the run's files and plots replace those "
        "of an earlier run there (its plots that this run does not write are removed)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true", help="few small sizes and short budgets (CI smoke test)")
    p.add_argument("--budget", type=float, help="seconds per point (default: 60 cpu, 20 cuda, 8 --quick cpu)")
    p.add_argument(
        "--threads", type=int, help="CPU threads per worker (default: PyTorch's; 1 is steadier on a busy machine)"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="minutes for the whole run from its start, shared among the suites (each gets a share of what is left "
        "when it starts); checked before each point starts: points past it are recorded as timeout without "
        "running, but a point already running finishes (within about its --budget, plus its build and first "
        "call), so the run can end that much later, then writes its results and plots (default: 9 for the "
        "default CPU run, 8 for `all` on a GPU, else none)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="GPU: capture each point's step as CUDA graphs after the warm-up and time their replays: the "
        "kernels' time without host overhead, as under torch.cuda.graph or torch.compile(mode='reduce-overhead') "
        "(eager calls at ViT sizes are mostly host time); a step that cannot be captured is an error row",
    )
    p.add_argument(
        "--impls", type=_names,
        help="implementations to run, comma-separated (default: all); each suite runs those it has (the model "
        "suite runs its rows whatever this says)",
    )  # fmt: skip
    p.add_argument(
        "--model",
        help="model suite: comma-separated timm model names, zoo names (hf-clip-vit-b16, hf-siglip-base-p16, "
        "hf-dinov2-vit-b14, hf-swin-b, hf-sam-vit-b, tv-swin-b) or the group scaling (vit_base_patch16_224, "
        "eva02_base_patch14_224, samvit_base_patch16 against N: 197, 577, 1025, 4097 tokens on a GPU, "
        "50, 197, 577 on the CPU, unless --seq-lens or --resolutions say otherwise); default: "
        "vit_base_patch16_224, eva02_base_patch14_224, vit_base_patch16_rope_reg1_gap_256, "
        "swin_base_patch4_window7_224, samvit_base_patch16 (at 1024), beitv2_base_patch16_224, "
        "each at its native size, and the zoo",
    )
    p.add_argument(
        "--resolutions",
        type=_ints,
        help="image sizes for the model and patch-embed suites, comma-separated (the model suite: every model at "
        "each size, instead of --seq-lens)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-point lines")
    return p


def _check_impls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each --impls name must be an implementation of some suite run (each suite then runs the
    names it has); one line naming the choices otherwise. The model suite runs its rows whatever
    --impls says."""
    known: dict[str, tuple[str, ...]] = {}
    for name in args.suites:
        if name != "model" and _module_exists(name):
            known[name] = tuple(importlib.import_module(f".{SUITES[name]}", _PACKAGE).IMPLS)
    unknown = [impl for impl in args.impls if not any(impl in impls for impls in known.values())]
    if known and unknown:  # (the model suite alone: nothing to check)
        choices = "; ".join(f"{suite}: {', '.join(impls)}" for suite, impls in known.items())
        parser.error(f"--impls {unknown} are not implementations of the suites run ({choices})")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and resolve the defaults that depend on the machine (device, dtype, suites)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to PyTorch")
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph times CUDA graph replays: it needs --device cuda (a CUDA GPU)")
    args.dtype = canonical_dtype(args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    for name in ("batch", "heads", "head_dim", "budget", "time_limit", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")

    unknown = [s for s in args.suites if s not in SUITES and s != "all"]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {[*SUITES, 'all']}")
    has_timm = importlib.util.find_spec("timm") is not None
    if args.time_limit is None:
        if not args.suites and args.device == "cpu":
            args.time_limit = DEFAULT_TIME_LIMIT_MIN["cpu-default"]
        elif "all" in args.suites and args.device == "cuda":
            args.time_limit = DEFAULT_TIME_LIMIT_MIN["cuda-all"]
    if not args.suites:
        args.suites = [s for s in DEFAULT_SUITES if s != "model" or has_timm]
    elif "all" in args.suites:
        args.suites = list(SUITES)
    args.suites = list(dict.fromkeys(args.suites))
    if args.impls is not None and not args.impls:  # (it measured nothing, exit 0)
        parser.error("--impls names no implementation; leave it out to run them all")
    if args.impls:
        _check_impls(parser, args)
    if "model" in args.suites and args.model and _module_exists("model"):
        model = importlib.import_module(f".{SUITES['model']}", _PACKAGE)
        unknown = model.unknown_names(args)
        if unknown:  # (a run of error rows, exit 0)
            parser.error(
                f"--model {unknown}: not timm models, the zoo's ({', '.join(model.ZOO)}) or the group scaling"
            )
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; it must be a folder (made if missing)")
    if args.out is not None:  # before any suite is measured: the results are written after each
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            parser.error(f"--out {args.out}: cannot make the folder ({error.strerror or error})")
        if not os.access(args.out, os.W_OK | os.X_OK):
            parser.error(f"--out {args.out}: the folder is not writable")
    args.deadline = time.monotonic() + 60 * args.time_limit if args.time_limit else None
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``fastvit-bench``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], argv[1:])
    args = parse_args(argv)
    suites = []
    status: dict[str, dict[str, str]] = {}  # suite -> {"status", "note"}: output.SUITE_STATUSES
    for name in args.suites:
        if _module_exists(name):
            suites.append(name)
            status[name] = {"status": "not-run", "note": "the run ended before this suite started"}
        else:
            status[name] = {"status": "not-in-build", "note": f"no module {_PACKAGE}.{SUITES[name]}"}
            print(f"suite {name!r} is not in this build yet ({status[name]['note']}); skipped", file=sys.stderr)
    out_dir = args.out or default_out_dir(args.device)
    runner.set_preload(["fastvit", *(f"{_PACKAGE}.{SUITES[s]}" for s in suites)])
    if "model" in suites:
        runner.set_preload(["timm"])
    ceilings = measure_ceilings(args)

    def write(records: list, *, plots: bool) -> list[Path]:
        settings = {
            "suites": suites,
            "time_limit_min": args.time_limit,
            "policy": runner.policy_from_args(args).__dict__,
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        run_meta = meta(args.device, [sys.argv[0], *argv], settings, ceilings, status)
        return write_results(out_dir, records, run_meta, plots=plots and not args.no_plots)

    records, interrupted, name = [], False, None
    started = time.monotonic()
    run_deadline = args.deadline
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM
    progress = Progress(enabled=not args.no_progress)
    try:
        with progress:
            for i, name in enumerate(suites):
                if run_deadline is not None:  # share what is left of --time-limit among the suites left
                    share = WEIGHTS.get(name, 1.0) / sum(WEIGHTS.get(s, 1.0) for s in suites[i:])
                    args.deadline = time.monotonic() + (run_deadline - time.monotonic()) * share
                module = importlib.import_module(f".{SUITES[name]}", _PACKAGE)
                try:
                    suite_records = module.run(args, progress)
                except Exception as exc:
                    status[name] = {"status": "failed", "note": _one_line(exc)}
                    print(f"suite {name!r} failed:\n{traceback.format_exc()}", file=sys.stderr)
                else:
                    records += suite_records
                    status[name] = _finished(suite_records)
                write(records, plots=False)  # a run killed later still leaves these
    except KeyboardInterrupt as stop:
        interrupted = True
        records = progress.records  # every point measured so far, the interrupted suite's too
        if name is not None and status[name]["status"] == "not-run":  # (not if it came while writing)
            status[name] = {"status": "interrupted", "note": f"the run was stopped by {stop or 'Ctrl-C'}"}
        print(f"\ninterrupted: writing the {len(records)} records measured so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        runner.shutdown()

    roofline.annotate(records, ceilings)
    print_tables(records)
    print(roofline.ceilings_line(ceilings))
    files = write(records, plots=True)
    print(f"\nwrote {len(records)} records to {out_dir}: " + ", ".join(f.name for f in files))
    for line in incomplete_suites({"suite_status": status}):
        print(f"suite {line}", file=sys.stderr)
    failed = any(s["status"] == "failed" for s in status.values())
    return 130 if interrupted else 1 if failed else 0


def _one_line(exc: BaseException) -> str:
    """``"ValueError: boom"``: the exception's type and the first line of its message."""
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    return text.splitlines()[0]


def _finished(records: list) -> dict[str, str]:
    """The status of a suite that returned ``records``: ``completed``, or ``time-limit`` where the
    run's --time-limit left some of its points not run."""
    cut = sum(r.note == runner.TIME_LIMIT_NOTE for r in records)
    if cut:
        note = f"{cut} of its {len(records)} points not run: the --time-limit was reached"
        return {"status": "time-limit", "note": note}
    return {"status": "completed", "note": ""}


def measure_ceilings(args: argparse.Namespace) -> dict:
    """The device's copy bandwidth and matmul throughput (``roofline.measure_ceilings``), measured
    once per run in a worker process; ``{"error": ...}`` when that fails (the run goes on without
    a roofline floor)."""
    try:
        return runner.call_in_worker(
            roofline.measure_ceilings, args.device, [args.dtype], args.threads, timeout_s=CEILINGS_TIMEOUT_S
        )
    except Exception as exc:  # the benchmark is still worth running
        print(f"could not measure the device's ceilings ({exc}); no roofline floor", file=sys.stderr)
        return {"error": str(exc)}


def run_command(name: str, argv: list[str]) -> int:
    """Import the command's module lazily and return its ``main(argv)``; exit status 2 with a
    message when the module is not in this build."""
    module_name = f"{_PACKAGE}.{COMMANDS[name][0]}"
    if importlib.util.find_spec(module_name) is None:
        print(f"`{name}` is not in this build yet (no module {module_name})", file=sys.stderr)
        return 2
    return int(importlib.import_module(module_name).main(argv) or 0)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum} ({signal.Signals(signum).name})")
