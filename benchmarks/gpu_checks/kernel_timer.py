"""Device time per kernel from the PyTorch profiler, for the configuration sweeps beside it
(``attention_configs.py``, ``mlp_configs.py``; a script's own folder is on ``sys.path``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


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
