"""What the configuration sweeps beside it share (``attention_configs.py``, ``mlp_configs.py``; a
script's own folder is on ``sys.path``): their command line, where they run, and device time per
kernel from the PyTorch profiler.

On a GPU they run bf16; off one, fp32 in Triton's interpreter (a check of the script)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
REPS = 10  # launches per profiled kernel time


def sweep_args(default_budget_s: float) -> tuple[str, float]:
    """(OUT_DIR, TIME_BUDGET_S) from ``script.py [OUT_DIR] [TIME_BUDGET_S]``."""
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    return out, float(sys.argv[2]) if len(sys.argv) > 2 else default_budget_s


def kernel_times(fn: Callable[[], object], kernels: Mapping[str, str], reps: int) -> dict[str, float]:
    """Mean device microseconds per call of ``fn`` spent in each kernel: ``kernels`` maps a short
    name to the prefix of a kernel's name in the profiler (``{"fc1": "_fc1_kernel"}``). One warm-up
    call first (compiles). Off a GPU, the wall time of one call under ``"wall"``.

    Example:
        >>> kernel_times(lambda: op(x), {"fwd": "flash_attention_fwd_kernel"}, reps=10)
        {'fwd': 41.3}
    """
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        fn()
        return {"wall": (time.perf_counter() - start) * 1e6}
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        for short, name in kernels.items():
            if event.key.startswith(name):
                total = getattr(event, "self_device_time_total", None) or event.self_cuda_time_total
                times[short] = times.get(short, 0.0) + total / reps
    return times


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def record(row: dict, run: Callable[[], dict], log: TextIO, title: str) -> dict:
    """``row`` with what ``run()`` measured (``rel_err``, ``ok``, ``us``), or ``ok: False`` and the
    error of a candidate that does not compile or launch; appended to the JSON-lines ``log`` and
    printed as one line after ``title``."""
    try:
        row.update(run())
    except Exception as exc:  # recorded, and the sweep goes on
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    log.write(json.dumps(row) + "\n")
    log.flush()
    us = " ".join(f"{k}={t:.1f}" for k, t in row.get("us", {}).items())
    status = f"{'ok' if row['ok'] else 'FAIL'} {row.get('rel_err', float('nan')):.1e}"
    print(f"{title} {status} {us} {row.get('error', '')}", flush=True)
    return row
