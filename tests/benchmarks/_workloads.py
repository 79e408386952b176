"""Workloads with known outcomes, built in the harness's worker processes by the tests.

``build(point)`` reads ``point.params["kind"]`` (or ``point.params["kinds"][n_tokens]``): a
module-level function, so the worker can import it.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from fastvit.benchmarks.measure import Unavailable, Workload, randn


def build(point) -> Workload:
    kind = point.params["kinds"][str(point.n_tokens)] if "kinds" in point.params else point.params["kind"]
    if kind == "hang_build":
        time.sleep(60)
    if kind == "unavailable":
        raise Unavailable("not on this machine")
    x = randn((128, 128), dtype=torch.float32, device=point.device)

    def step(i: int) -> None:
        if kind == "ok":
            x @ x
        elif kind == "alloc":  # touches params["mb"] MiB (ones: never time on zeros)
            torch.ones(point.params["mb"] << 18, dtype=torch.float32).add_(1)
        elif kind == "oom_raise":  # the message and type a CUDA out-of-memory error has
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        elif kind == "oom_cpu":  # a real failed CPU allocation (1 PiB)
            torch.empty(1 << 50, dtype=torch.uint8)
        elif kind == "killed":  # what the kernel's OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "slow":  # every call over the per-call limit
            time.sleep(point.params["sleep"])
        elif kind == "sized":  # 0.1 ms per token: time linear in N
            time.sleep(point.n_tokens * 1e-4)
        elif kind == "hang":
            time.sleep(60)
        elif kind == "error":
            raise ValueError("boom")
        else:
            raise AssertionError(kind)

    label = point.params.get("label")  # what "really ran", as fastvit[torch] for fastvit
    return Workload(step=step, flops=2 * 128**3, impl=label, note=f"kind={kind}", extra={"kind": kind})
