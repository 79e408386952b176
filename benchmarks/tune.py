"""``python -m benchmarks tune``: time the ``triton`` and ``cuda`` backends per (device, op, shape
bucket) and write the table that ``auto`` follows (``fastvit.tuning``, ``~/.cache/fastvit/tune.json``).

    python -m benchmarks tune                          # every op, ViT widths, GPU, bf16
    python -m benchmarks tune --ops layernorm_mlp --quick
    python -m benchmarks tune --print                  # show the table, measure nothing

Each shape is built by its suite (``benchmarks.mlp`` / ``benchmarks.patch_embed``: the same inputs
and steps as the benchmark rows ``fastvit-triton`` and ``fastvit-cuda``), timed in this process
(warm-up, then the median of repeated calls: CUDA events on a GPU), and the faster backend is
stored for the shape's bucket with both timings. A backend that cannot run here, or that fell back
to another route while timed, is reported and not recorded; a bucket is recorded only when both
backends were timed. Buckets never measured keep ``auto`` on Triton.

Shapes: ``layernorm_mlp`` at ViT-S/B/L/H widths (hidden 4 D) with 197 x {1, 8, 32, 128, 256} token
rows; ``patch_embed`` at 224 px with (D, p) in (384, 16), (768, 16), (1024, 16), (1280, 14) and
batch {1, 8, 64, 256}; each for inference (``fwd``) and training (``fwd+bwd``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .options import DTYPES, canonical_dtype, torch_dtype
from .records import Point

__all__ = ["main", "measure_backend", "tune_points"]

BACKEND_IMPLS = {"triton": "fastvit-triton", "cuda": "fastvit-cuda"}
OPS = ("layernorm_mlp", "patch_embed")
MLP_WIDTHS = (384, 768, 1024, 1280)
MLP_SIZES = ((1, 197), (8, 197), (32, 197), (128, 197), (256, 197))
PATCH_SHAPES = ((384, 16), (768, 16), (1024, 16), (1280, 14))
PATCH_BATCHES = (1, 8, 64, 256)
QUICK = {"mlp_widths": (768,), "mlp_sizes": ((8, 197), (256, 197)), "patch_shapes": ((768, 16),), "batches": (8, 256)}


def _mlp_point(dim: int, batch: int, n: int, mode: str, dtype: str, device: str, impl: str) -> Point:
    from . import mlp

    heads, head_dim = (dim // 64, 64) if dim % 64 == 0 else (1, dim)
    return Point(suite=mlp.NAME, impl=impl, mode=mode, n_tokens=n, batch=batch, heads=heads, head_dim=head_dim,
                 dtype=dtype, device=device, params={"model": f"D={dim}", "dim": dim, "hidden": mlp.MLP_RATIO * dim})


def _patch_point(dim: int, patch: int, batch: int, resolution: int, mode: str, dtype: str, device: str,
                 impl: str) -> Point:
    from . import patch_embed
    from .options import vit_tokens

    heads, head_dim = (dim // 64, 64) if dim % 64 == 0 else (1, dim)
    tokens = vit_tokens(resolution, patch, patch_embed.PREFIX)
    return Point(suite=patch_embed.NAME, impl=impl, mode=mode, n_tokens=tokens, batch=batch, heads=heads,
                 head_dim=head_dim, dtype=dtype, device=device,
                 params={"resolution": resolution, "patch": patch, "in_chans": patch_embed.IN_CHANS, "embed_dim": dim})


def tune_points(args: argparse.Namespace) -> list[tuple[str, str, Callable[[str], Point]]]:
    """(op, bucket, point_for(impl)) for every shape and mode ``args`` asks for."""
    from fastvit.tuning import layernorm_mlp_bucket, patch_embed_bucket

    dtype, device = args.dtype, args.device
    out: list[tuple[str, str, Callable[[str], Point]]] = []
    modes = args.modes
    if "layernorm_mlp" in args.ops:
        for dim in args.widths or (QUICK["mlp_widths"] if args.quick else MLP_WIDTHS):
            for batch, n in args.sizes or (QUICK["mlp_sizes"] if args.quick else MLP_SIZES):
                for mode in modes:
                    key = layernorm_mlp_bucket(dim, 4 * dim, torch_dtype(dtype), batch * n, mode != "fwd")
                    out.append(("layernorm_mlp", key,
                                lambda impl, d=dim, b=batch, n=n, m=mode: _mlp_point(d, b, n, m, dtype, device, impl)))
    if "patch_embed" in args.ops:
        shapes = args.patch_shapes or (QUICK["patch_shapes"] if args.quick else PATCH_SHAPES)
        for dim, patch in shapes:
            for batch in args.batches or (QUICK["batches"] if args.quick else PATCH_BATCHES):
                for mode in modes:
                    rows = batch * (args.resolution // patch) ** 2
                    key = patch_embed_bucket(3, patch, dim, torch_dtype(dtype), rows, mode != "fwd")
                    out.append(("patch_embed", key,
                                lambda impl, d=dim, p=patch, b=batch, m=mode: _patch_point(
                                    d, p, b, args.resolution, m, dtype, device, impl)))
    return out


def _timed_ms(step: Callable[[int], Any], device: torch.device, target_s: float, max_reps: int) -> list[float]:
    """Warm up (three calls), then time calls until ``target_s`` or ``max_reps``; milliseconds each."""
    for i in range(3):
        step(i)
    times: list[float] = []
    start = time.perf_counter()
    i = 3
    while len(times) < 5 or (len(times) < max_reps and time.perf_counter() - start < target_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
        i += 1
    return times


def measure_backend(point: Point, target_s: float = 0.25, max_reps: int = 200) -> tuple[float | None, str]:
    """(median ms, note) of ``point`` (a ``fastvit-triton`` / ``fastvit-cuda`` row of its suite);
    ms is None when it could not run or fell back to another route (the note says why)."""
    from . import mlp, patch_embed
    from .measure import classify_exception

    suite = mlp if point.suite == mlp.NAME else patch_embed
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            workload = suite.build(point)
            if workload.after_warmup is not None:
                workload.step(0)
                workload.after_warmup(list(caught))
        if workload.impl != point.impl:
            return None, f"ran as {workload.impl}: {workload.note}"
        times = _timed_ms(workload.step, torch.device(point.device), target_s, max_reps)
    except Exception as exc:  # a backend that cannot run this shape is reported, not fatal
        status, note = classify_exception(exc)
        return None, f"{status}: {note}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return statistics.median(times), ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default cuda; cpu only tests the tuner (the cuda backend's CPU loops vs the interpreter)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--ops", type=lambda s: [v for v in s.split(",") if v], default=list(OPS),
                   help=f"comma-separated, from {', '.join(OPS)}")
    p.add_argument("--modes", type=lambda s: [v for v in s.split(",") if v], default=["fwd", "fwd+bwd"])
    p.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], help="layernorm_mlp widths D")
    p.add_argument("--sizes", type=lambda s: [tuple(int(x) for x in v.split("x")) for v in s.split(",")],
                   help="layernorm_mlp sizes BATCHxTOKENS, comma-separated (e.g. 8x197,256x197)")
    p.add_argument("--patch-shapes", type=lambda s: [tuple(int(x) for x in v.split(":")) for v in s.split(",")],
                   help="patch_embed D:p pairs (e.g. 768:16,1280:14)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], help="patch_embed batch sizes")
    p.add_argument("--resolution", type=int, default=224, help="patch_embed image size (default 224)")
    p.add_argument("--quick", action="store_true", help="ViT-B width and two sizes only")
    p.add_argument("--target-s", type=float, default=0.25, help="timed seconds per backend and shape")
    p.add_argument("--table", type=Path, help="the table file (default: fastvit.tuning.table_path())")
    p.add_argument("--json", type=Path, help="also write this run's measurements here")
    p.add_argument("--print", dest="show", action="store_true", help="print the table and exit")
    return p


def _show(path: Path) -> int:
    from fastvit.tuning import load_table

    table = load_table(path)
    if not table["entries"]:
        print(f"{path}: no entries (auto runs the Triton kernels everywhere)")
        return 0
    print(path)
    for device, ops in table["entries"].items():
        for op, buckets in ops.items():
            for key, entry in sorted(buckets.items()):
                ms = ", ".join(f"{b} {t:.4g} ms" for b, t in entry["ms"].items())
                print(f"  {device} | {op} | {key} -> {entry['backend']} ({ms}; {entry.get('date', '?')})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks tune``; returns the exit status."""
    from fastvit.tuning import device_name, record, table_path

    args = _parser().parse_args(argv)
    path = args.table or table_path()
    if args.show:
        return _show(path)
    args.dtype = canonical_dtype(args.dtype)
    unknown = set(args.ops) - set(OPS)
    if unknown:
        print(f"unknown ops {sorted(unknown)}; choose from {OPS}")
        return 2
    if args.device is None:
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("tune measures the GPU backends: no CUDA device is visible (use --device cpu only to test the tuner)")
        return 2
    from .backends import backend_unavailable

    blocked = {b: backend_unavailable(impl, args.device) for b, impl in BACKEND_IMPLS.items()}
    for backend, reason in blocked.items():
        if reason:
            print(f"backend {backend}: {reason}")
    if any(blocked.values()):
        print("nothing recorded: both backends must run to compare them")
        return 1
    device = torch.device(args.device)
    name = device_name(device)
    rows = []
    print(f"tuning on {name}, {args.dtype}; table {path}")
    for op, key, point_for in tune_points(args):
        ms, notes = {}, []
        for backend, impl in BACKEND_IMPLS.items():
            t, note = measure_backend(point_for(impl), target_s=args.target_s)
            if t is None:
                notes.append(f"{backend}: {note}")
            else:
                ms[backend] = t
        point = point_for("fastvit")
        shape = f"batch={point.batch},tokens={point.n_tokens},mode={point.mode}"
        winner = record(name, op, key, ms, shape=shape, path=path) if len(ms) == len(BACKEND_IMPLS) else None
        rows.append({"device": name, "op": op, "bucket": key, "shape": shape, "ms": ms, "backend": winner,
                     "note": "; ".join(notes)})
        timing = "  ".join(f"{b} {t:8.4f} ms" for b, t in ms.items())
        print(f"{op:14s} {key:48s} {timing}  -> {winner or 'not recorded: ' + '; '.join(notes)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "dtype": args.dtype, "torch": torch.__version__,
                                         "table": str(path), "rows": rows}, indent=1))
    recorded = sum(r["backend"] is not None for r in rows)
    print(f"{recorded} of {len(rows)} buckets recorded in {path}")
    return 0 if recorded == len(rows) else 1
