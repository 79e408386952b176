"""``python -m benchmarks tune``: time fastvit's ``triton`` and ``cuda`` backends and PyTorch's own
route (``torch``) per (device, op, shape bucket) and write the table that ``auto`` follows
(``fastvit.tuning``, ``~/.cache/fastvit/tune.json``): where PyTorch is faster, ``auto`` runs it.

    python -m benchmarks tune                          # every op, ViT widths, GPU, bf16
    python -m benchmarks tune --ops layernorm_mlp --quick
    python -m benchmarks tune --print                  # show the table, measure nothing

Each LayerNorm+MLP and patch-embedding shape is built by its suite (``benchmarks.mlp`` /
``benchmarks.patch_embed``: the same inputs and steps as the benchmark rows ``fastvit-triton``,
``fastvit-cuda`` and ``fastvit-torch``); attention shapes are q, k, v of (B, H, N, D) through
``fastvit.flash_attention`` pinned to ``triton`` or to ``torch`` (SDPA, which picks its fastest
backend itself). Each is timed in this process (warm-up, then the median of repeated calls: CUDA
events on a GPU) and the fastest route is stored for the shape's bucket with every timing. A route
that cannot run here, or that fell back to another while timed, is reported and not recorded; a
bucket is recorded when ``triton`` and ``torch`` were both timed (``cuda`` too where the extension
is available). Buckets never measured keep ``auto`` on Triton. ``torch.compile`` forms are not
candidates: ``auto`` cannot run them (the suites time them beside the routes).

Shapes: ``layernorm_mlp`` at ViT-S/B/L/H widths (hidden 4 D) with 197 x {1, 8, 32, 128, 256} token
rows; ``patch_embed`` at 224 px with (D, p) in (384, 16), (768, 16), (1024, 16), (1280, 14) and
batch {1, 8, 64, 256}; ``flash_attention`` at head dims 64, 80 and 128 with N in {197, 577, 1025,
4097} and B x H in {12, 96, 384}; each for inference (``fwd``) and training (``fwd+bwd``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .options import DTYPES, canonical_dtype, torch_dtype
from .records import MODES, Point

__all__ = ["TuneShape", "main", "measure_attention", "measure_backend", "tune_points"]

BACKEND_IMPLS = {"triton": "fastvit-triton", "cuda": "fastvit-cuda", "torch": "fastvit-torch"}
REQUIRED = ("triton", "torch")  # a bucket is recorded only when these were timed
ATTENTION_BACKENDS = ("triton", "torch")  # flash_attention has no cuda backend
OPS = ("layernorm_mlp", "patch_embed", "flash_attention")
MLP_WIDTHS = (384, 768, 1024, 1280)
MLP_SIZES = ((1, 197), (8, 197), (32, 197), (128, 197), (256, 197))
PATCH_SHAPES = ((384, 16), (768, 16), (1024, 16), (1280, 14))
PATCH_BATCHES = (1, 8, 64, 256)
ATTENTION_SHAPES = tuple(
    (d, n, bh) for d in (64, 80, 128) for n in (197, 577, 1025, 4097) for bh in (12, 96, 384)
)  # (head_dim, tokens, batch x heads); heads = 12
QUICK = {"mlp_widths": (768,), "mlp_sizes": ((8, 197), (256, 197)), "patch_shapes": ((768, 16),), "batches": (8, 256),
         "attention": ((64, 197, 96), (64, 1025, 96))}  # fmt: skip


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


@dataclass(frozen=True)
class TuneShape:
    """One bucket to measure: ``measure(backend) -> (median ms or None, note)`` per route."""

    op: str
    key: str
    shape: str
    backends: tuple[str, ...]
    measure: Callable[[str], tuple[float | None, str]]


def _suite_shape(op: str, key: str, point_for: Callable[[str], Point], target_s: float) -> TuneShape:
    point = point_for("fastvit")
    shape = f"batch={point.batch},tokens={point.n_tokens},mode={point.mode}"
    return TuneShape(op, key, shape, tuple(BACKEND_IMPLS),
                     lambda backend: measure_backend(point_for(BACKEND_IMPLS[backend]), target_s=target_s))


def tune_points(args: argparse.Namespace) -> list[TuneShape]:
    """Every shape and mode ``args`` asks for, with how to time each route on it."""
    from fastvit.tuning import attention_bucket, layernorm_mlp_bucket, patch_embed_bucket

    dtype, device = args.dtype, args.device
    out: list[TuneShape] = []
    modes = args.modes
    if "layernorm_mlp" in args.ops:
        for dim in args.widths or (QUICK["mlp_widths"] if args.quick else MLP_WIDTHS):
            for batch, n in args.sizes or (QUICK["mlp_sizes"] if args.quick else MLP_SIZES):
                for mode in modes:
                    key = layernorm_mlp_bucket(dim, 4 * dim, torch_dtype(dtype), batch * n, mode != "fwd")
                    point_for = lambda impl, d=dim, b=batch, n=n, m=mode: _mlp_point(d, b, n, m, dtype, device, impl)
                    out.append(_suite_shape("layernorm_mlp", key, point_for, args.target_s))
    if "patch_embed" in args.ops:
        shapes = args.patch_shapes or (QUICK["patch_shapes"] if args.quick else PATCH_SHAPES)
        for dim, patch in shapes:
            for batch in args.batches or (QUICK["batches"] if args.quick else PATCH_BATCHES):
                for mode in modes:
                    rows = batch * (args.resolution // patch) ** 2
                    key = patch_embed_bucket(3, patch, dim, torch_dtype(dtype), rows, mode != "fwd")
                    point_for = lambda impl, d=dim, p=patch, b=batch, m=mode: _patch_point(
                        d, p, b, args.resolution, m, dtype, device, impl)
                    out.append(_suite_shape("patch_embed", key, point_for, args.target_s))
    if "flash_attention" in args.ops:
        for head_dim, tokens, batch_heads in args.attention_shapes or (
            QUICK["attention"] if args.quick else ATTENTION_SHAPES
        ):
            for mode in modes:
                key = attention_bucket(head_dim, torch_dtype(dtype), tokens, batch_heads, False, False, mode != "fwd")
                shape = f"batch*heads={batch_heads},tokens={tokens},head_dim={head_dim},mode={mode}"
                measure = lambda backend, d=head_dim, n=tokens, bh=batch_heads, m=mode: measure_attention(
                    d, n, bh, m, dtype, device, backend, target_s=args.target_s)
                out.append(TuneShape("flash_attention", key, shape, ATTENTION_BACKENDS, measure))
    return out


def measure_attention(
    head_dim: int, tokens: int, batch_heads: int, mode: str, dtype: str, device: str, backend: str,
    target_s: float = 0.25, max_reps: int = 200,
) -> tuple[float | None, str]:
    """(median ms, note) of ``fastvit.flash_attention`` on (B, H, N, D) q, k, v pinned to
    ``backend`` (``"torch"``: SDPA with its own backend choice), forward or forward + backward;
    None when it fell back to another route or could not run."""
    import fastvit
    from fastvit.backend import FastvitFallbackWarning, every_fallback_warns

    from .measure import classify_exception

    heads = 12 if batch_heads % 12 == 0 else 1
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch_heads // heads, heads, tokens, head_dim, device=device, dtype=torch_dtype(dtype),
                    generator=gen).requires_grad_(mode != "fwd")
        for _ in range(3)
    )  # fmt: skip
    grad = torch.randn(q.shape, device=device, dtype=q.dtype, generator=gen) if mode != "fwd" else None

    def step(_: int) -> None:
        with fastvit.backend(backend):
            out = fastvit.flash_attention(q, k, v)
        if grad is not None:
            out.backward(grad)

    try:
        with warnings.catch_warnings(record=True) as caught, every_fallback_warns():
            warnings.simplefilter("always")  # (a reason said for an earlier bucket is said again)
            step(0)
        fallback = next((w for w in caught if issubclass(w.category, FastvitFallbackWarning)), None)
        if fallback is not None:
            return None, f"fell back: {fallback.message}"
        times = _timed_ms(step, torch.device(device), target_s, max_reps)
    except Exception as exc:
        status, note = classify_exception(exc)
        return None, f"{status}: {note}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return statistics.median(times), ""


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
    from fastvit.backend import every_fallback_warns

    from . import mlp, patch_embed
    from .measure import classify_exception

    suite = mlp if point.suite == mlp.NAME else patch_embed
    try:
        with warnings.catch_warnings(record=True) as caught, every_fallback_warns():
            warnings.simplefilter("always")  # (a reason said for an earlier bucket is said again)
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


# argparse types of the comma-separated options: a malformed value is argparse's one-line error,
# "argument --sizes: expected ...", naming the form expected (not "invalid <lambda> value")
def _positive_ints(text: str) -> list[int]:
    """``--widths``, ``--batches``: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 8,256), got {text!r}")
    return values


def _int_tuples(form: str, sep: str, example: str) -> Callable[[str], list[tuple[int, ...]]]:
    """The argparse type of comma-separated ``form`` items (``BATCHxTOKENS``: positive integers
    joined by ``sep``); its error names the form and ``example``."""
    arity = form.count(sep) + 1

    def parse(text: str) -> list[tuple[int, ...]]:
        try:
            values = [tuple(int(x) for x in v.split(sep)) for v in text.replace(" ", "").split(",") if v]
        except ValueError:
            values = []
        if not values or any(len(v) != arity or min(v) < 1 for v in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {form} with positive integers (e.g. {example}), got {text!r}"
            )
        return values

    return parse


def _modes(text: str) -> list[str]:
    """``--modes``: comma-separated choices from ``MODES``, each kept once."""
    values = [v for v in text.replace(" ", "").split(",") if v]
    wrong = [v for v in values if v not in MODES]
    if wrong or not values:
        raise argparse.ArgumentTypeError(
            f"invalid choice {', '.join(wrong) or text!r} (choose from {', '.join(MODES)}, comma-separated)"
        )
    return list(dict.fromkeys(values))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default cuda; cpu only tests the tuner (the cuda backend's CPU loops vs the interpreter); "
                        "with --print, the device an empty table's note describes (default: cuda if visible)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--ops", type=lambda s: [v for v in s.split(",") if v], default=list(OPS),
                   help=f"comma-separated, from {', '.join(OPS)}")
    p.add_argument("--modes", type=_modes, default=list(MODES), metavar="MODES",
                   help=f"comma-separated, from {', '.join(MODES)} (default: both)")
    p.add_argument("--widths", type=_positive_ints, help="layernorm_mlp widths D, comma-separated")
    p.add_argument("--sizes", type=_int_tuples("BATCHxTOKENS", "x", "8x197,256x197"),
                   help="layernorm_mlp sizes BATCHxTOKENS, comma-separated (e.g. 8x197,256x197)")
    p.add_argument("--patch-shapes", type=_int_tuples("D:p", ":", "768:16,1280:14"),
                   help="patch_embed D:p pairs (e.g. 768:16,1280:14)")
    p.add_argument("--batches", type=_positive_ints, help="patch_embed batch sizes, comma-separated")
    p.add_argument("--resolution", type=int, default=224, help="patch_embed image size (default 224)")
    p.add_argument("--attention-shapes", type=_int_tuples("HEAD_DIM:TOKENS:BATCHxHEADS", ":", "64:197:96,64:1025:96"),
                   help="flash_attention HEAD_DIM:TOKENS:BATCHxHEADS triples (e.g. 64:197:96,64:1025:96)")
    p.add_argument("--quick", action="store_true", help="ViT-B width and two sizes only")
    p.add_argument("--target-s", type=float, default=0.25, help="timed seconds per backend and shape")
    p.add_argument("--table", type=Path, help="the table file (default: fastvit.tuning.table_path())")
    p.add_argument("--json", type=Path, help="also write this run's measurements here")
    p.add_argument("--print", dest="show", action="store_true", help="print the table and exit")
    return p


def _show(path: Path, device: str) -> int:
    """``--print``: the table; an empty one says what ``auto`` runs on ``device`` ("cpu" / "cuda")."""
    from fastvit.tuning import device_name, load_table

    table = load_table(path)
    if not table["entries"]:
        if device == "cuda":
            gpu = device_name(torch.device("cuda")) if torch.cuda.is_available() else "a GPU"
            note = f"auto runs the Triton kernels everywhere on {gpu}"
        else:  # fastvit.backend.resolve_backend: auto off CUDA tensors is the torch route, table or not
            note = f"auto runs the torch route on {device} tensors, with or without a table"
        print(f"{path}: no entries ({note})")
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
        return _show(path, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    if any(blocked[b] for b in REQUIRED):
        print(f"nothing recorded: {' and '.join(REQUIRED)} must both run to compare them")
        return 1
    device = torch.device(args.device)
    name = device_name(device)
    rows = []
    print(f"tuning on {name}, {args.dtype}; table {path}")
    for shape in tune_points(args):
        ms, notes = {}, []
        for backend in shape.backends:
            if blocked.get(backend):
                continue
            t, note = shape.measure(backend)
            if t is None:
                notes.append(f"{backend}: {note}")
            else:
                ms[backend] = t
        complete = all(b in ms for b in REQUIRED)
        winner = record(name, shape.op, shape.key, ms, shape=shape.shape, path=path) if complete else None
        rows.append({"device": name, "op": shape.op, "bucket": shape.key, "shape": shape.shape, "ms": ms,
                     "backend": winner, "note": "; ".join(notes)})
        timing = "  ".join(f"{b} {t:8.4f} ms" for b, t in ms.items())
        print(f"{shape.op:15s} {shape.key:52s} {timing}  -> {winner or 'not recorded: ' + '; '.join(notes)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "dtype": args.dtype, "torch": torch.__version__,
                                         "table": str(path), "rows": rows}, indent=1))
    recorded = sum(r["backend"] is not None for r in rows)
    print(f"{recorded} of {len(rows)} buckets recorded in {path}")
    return 0 if recorded == len(rows) else 1
