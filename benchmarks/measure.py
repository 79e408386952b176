"""Measuring one point, inside the worker process: warm-up, peak memory, timed repetitions.

A suite describes the work of a point as a ``Workload``: a ``step(i)`` that runs one iteration on
input set ``i`` (sets are rotated so that caches do not flatter small sizes), the FLOPs of one
step, and the label of what really ran. ``measure`` then runs, in this order:

1. **warm-up**: one call (JIT compilation, autotuning, lazy library set-up such as the autograd
   engine's thread, which alone adds tens of MB on the CPU), then more until ``warmup_calls``
   and ``warmup_s`` are reached. The last warm-up call estimates the time of one call. A point
   whose call takes longer than the per-call limit (``budget_s / (2 + min_reps)``: the warm-up,
   the memory pass and ``min_reps`` timed calls must fit in the budget) ends here as
   ``timeout``; the first call may take ``compile_grace_s`` longer, and is then followed by one
   more to re-estimate.
2. **timed repetitions**: enough calls to fill ``target_s`` (between ``min_reps`` and
   ``max_reps``, within the budget). GPU: a pair of CUDA events per call; CPU: ``perf_counter``.
   The result is the median and the 25th/75th percentiles. Then ``Workload.finish``.
   With ``Policy.cuda_graph`` (GPU), each input set's step is first captured as a CUDA graph
   (``capture_graphs``) and the timed calls replay them: the GPU's time without the host's, as
   under ``torch.cuda.graph`` or ``torch.compile(mode="reduce-overhead")``. At ViT sizes an eager
   call's time is mostly host time; replays show the kernels (and how they scale with N).
3. **memory pass**: one more call, untimed, whose peak memory is measured above what is already
   allocated (the inputs). GPU: ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``. CPU: the process's peak resident set (``VmHWM``, reset through
   ``/proc/self/clear_refs``) above its resident set just before the call. For that, glibc must
   not hand out memory that is already resident: ``malloc_trim`` returns the heap's free pages
   first, and a fixed 64 KiB mmap threshold (``mallopt``) makes every larger block fresh pages.
   It runs last because it changes the allocator's settings for the rest of the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "NotCapturable",
    "Policy",
    "Unavailable",
    "Workload",
    "capture_graphs",
    "classify_exception",
    "input_sets",
    "measure",
    "op_step",
    "randn",
    "rotation_count",
]


class Unavailable(Exception):
    """Raised by a suite's ``build`` when an implementation cannot run here (with the reason)."""


class NotCapturable(Exception):
    """Raised by ``capture_graphs`` when a step cannot be captured as a CUDA graph (a host sync,
    a CPU tensor, a library that refuses capture); the point is recorded as an error with why."""


@dataclass(frozen=True)
class Policy:
    """How long and how often to measure one point."""

    budget_s: float  # warm-up call + memory pass + min_reps timed calls must fit in this
    min_reps: int  # timed calls at least
    max_reps: int  # timed calls at most
    target_s: float  # aim for this much timed time
    warmup_calls: int = 1  # warm-up calls at least
    warmup_s: float = 0.0  # and keep warming up this long after the first call
    compile_grace_s: float = 0.0  # the first call may take this much over the per-call limit
    build_timeout_s: float = 120.0  # building the inputs / model
    fresh_process: bool = True  # one worker process per point (CPU: a clean memory baseline)
    slack_s: float = 5.0  # added to every hard time limit (process start-up, scheduling noise)
    threads: int | None = None  # torch.set_num_threads in the worker (None: PyTorch's default)
    cuda_graph: bool = False  # GPU: time CUDA graph replays of each step (no host time), see capture_graphs

    @property
    def call_limit_s(self) -> float:
        """The longest one call may take: warm-up, memory pass and ``min_reps`` calls fill the budget."""
        return self.budget_s / (2 + self.min_reps)


@dataclass
class Workload:
    """The work of one point, built inside the worker by the suite's ``build(point)``.

    Attributes:
        step: runs one iteration on input set ``i % n_sets``; its return value is dropped.
        flops: floating-point operations of one step (None: no TFLOP/s column).
        impl: the label of what really ran, when it differs from the point's (set it in
            ``after_warmup`` when the warm-up shows a fallback).
        note: added to the record's note.
        context: entered once around all calls (e.g. ``sdpa_kernel(...)``), so that its cost is
            not timed.
        after_warmup: called with the warnings the first call raised.
        finish: called after timing with the median ms; returns extra record fields (e.g. a
            per-component breakdown measured in a separate pass).
        extra: extra record fields; ``extra["input_sets"]`` is how many input sets ``step``
            rotates through (a CUDA graph run captures one graph per set; 1 if absent).
    """

    step: Callable[[int], Any]
    flops: float | None = None
    impl: str | None = None
    note: str = ""
    context: contextlib.AbstractContextManager | None = None
    after_warmup: Callable[[list[warnings.WarningMessage]], None] | None = None
    finish: Callable[[float], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def randn(
    shape: Sequence[int], *, dtype: torch.dtype, device: str | torch.device, requires_grad: bool = False
) -> torch.Tensor:
    """Standard-normal tensor (never time or test on zeros: some kernels skip work on them)."""
    return torch.randn(tuple(shape), dtype=dtype, device=device).requires_grad_(requires_grad)


def relabel_on_fallback(workload: Workload) -> Callable[[list[warnings.WarningMessage]], None]:
    """An ``after_warmup`` hook for a ``fastvit`` workload: if the warm-up raised a
    ``FastvitFallbackWarning`` (the kernels did not take this case and the torch route ran), the
    row is labelled ``<name>[torch]`` (``fastvit[torch]``, ``fastvit+bias[torch]``) and the warning
    becomes its note."""

    def after_warmup(caught: list[warnings.WarningMessage]) -> None:
        from fastvit import FastvitFallbackWarning

        fallbacks = [w for w in caught if issubclass(w.category, FastvitFallbackWarning)]
        if fallbacks:  # "fastvit[triton]" -> "fastvit[torch]", "fastvit+bias[triton]" -> "fastvit+bias[torch]"
            workload.impl = (workload.impl or "fastvit").split("[")[0] + "[torch]"
            workload.note = str(fallbacks[0].message)

    return after_warmup


def cache_bytes(device: str | torch.device) -> int:
    """The largest cache the inputs could sit in: the GPU's L2, or the CPU's last-level cache."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            with contextlib.suppress(OSError, ValueError), open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * mult)
    return max(sizes, default=32 << 20)


def rotation_count(set_bytes: int, device: str | torch.device, *, max_sets: int = 64) -> int:
    """How many input sets to rotate through so that together they are twice the cache."""
    return max(1, min(max_sets, math.ceil(2 * cache_bytes(device) / max(1, set_bytes))))


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def input_sets(make: Callable[[], Any], device: str | torch.device, *, max_sets: int = 64) -> list[Any]:
    """Call ``make()`` for as many input sets as ``rotation_count`` asks for (at least one)."""
    first = make()
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(first))
    return [first] + [make() for _ in range(rotation_count(nbytes, device, max_sets=max_sets) - 1)]


def op_step(
    fn: Callable[..., torch.Tensor],
    sets: Sequence[tuple[torch.Tensor, ...]],
    mode: str,
    grads: Sequence[torch.Tensor] | None = None,
) -> Callable[[int], None]:
    """A ``Workload.step`` for an op ``fn(*inputs) -> Tensor``.

    Args:
        fn: the op; it may return a tuple of outputs (then each ``grads[i]`` is a tuple too).
        sets: input tuples, rotated.
        mode: "fwd" (no autograd) or "fwd+bwd" (forward, then the gradients of every input that
            requires grad, against ``grads[i]``).
        grads: one random grad_output per set (needed for "fwd+bwd"; made by the suite so that
            it is allocated before the memory baseline).
    """
    n = len(sets)
    if mode == "fwd":

        def step(i: int) -> None:
            with torch.no_grad():
                fn(*sets[i % n])

        return step
    if grads is None or len(grads) != n:
        raise ValueError(f"mode 'fwd+bwd' needs one grad_output per input set ({n}), got {grads!r:.60}")
    wrt = [[t for t in s if isinstance(t, torch.Tensor) and t.requires_grad] for s in sets]

    def step(i: int) -> None:
        out = fn(*sets[i % n])
        torch.autograd.grad(out, wrt[i % n], grads[i % n])

    return step


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _fresh_pages_for_large_blocks() -> None:
    """glibc: serve every block of 64 KiB and up from a fresh mmap (never from resident heap)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _trim_cpu_heap() -> None:
    """Return glibc's free heap pages (every arena) to the system, so the resident set is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


class _PeakMemory:
    """Peak bytes allocated by the code inside the block, above what was allocated before it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self.note = ""

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _fresh_pages_for_large_blocks()
        _trim_cpu_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            self._base = _status_kib("VmRSS") * 1024
        except OSError as e:
            self._base = None
            self.note = f"peak memory not measured ({e})"
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.peak = max(0, _status_kib("VmHWM") * 1024 - self._base)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values, q in [0, 1]."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class _Clock:
    """Times calls: CUDA events on a GPU (read after one synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self._pending: list[tuple[Any, Any]] = []

    def call(self, step: Callable[[int], Any], i: int) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            self._pending.append((start, end))
        else:
            t0 = time.perf_counter()
            step(i)
            self._pending.append((t0, time.perf_counter()))

    def collect(self) -> list[float]:
        """Milliseconds of each call since the last collect."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            times = [s.elapsed_time(e) for s, e in self._pending]
        else:
            times = [(e - s) * 1e3 for s, e in self._pending]
        self._pending = []
        return times


def capture_graphs(step: Callable[[int], Any], sets: int, device: torch.device) -> Callable[[int], None]:
    """``step(i)`` for each of the ``sets`` input sets captured as a CUDA graph; the returned step
    replays graph ``i % sets`` (no host work but the replay's launch).

    First one call per set on a side stream, as PyTorch's CUDA graph notes ask before a capture
    (the autograd engine and libraries set up per stream), with PyTorch's sync debug mode set to
    raise: a step that synchronises with the host (``.item()``, ``.tolist()``, ``.cpu()``) fails
    there, before a capture it would break (a broken capture leaves the thread on the capture
    stream and the allocator capturing, under torch 2.11). The graphs share one memory pool: a
    step's tensors are freed by its end, and replays run one after another on one stream, so each
    reuses the same memory. A step that cannot be captured raises ``NotCapturable`` saying why;
    running out of memory raises as it is.
    """
    stream = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(stream)
    graphs: list[torch.cuda.CUDAGraph] = []
    sync_mode = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                for i in range(sets):
                    step(i)
        finally:
            torch.cuda.set_sync_debug_mode(sync_mode)
        stream.wait_stream(side)
        for i in range(sets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=graphs[0].pool() if graphs else None):
                step(i)
            graphs.append(graph)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        torch.cuda.set_stream(stream)  # a capture that failed to end leaves its stream current
        raise NotCapturable(f"not capturable as a CUDA graph: {_why(exc)}"[:300]) from exc

    def replay(i: int) -> None:
        graphs[i % sets].replay()

    return replay


def _why(exc: BaseException) -> str:
    """The first line of ``exc``, and of the error it was raised while handling (a failed capture's
    end raises over the error inside the capture)."""

    def first(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    context = exc.__context__
    return first(exc) + (f" (while handling {first(context)})" if context is not None else "")


def measure(
    workload: Workload,
    device: str | torch.device,
    policy: Policy,
    report: Callable[[str, dict[str, Any]], None] = lambda phase, info: None,
) -> dict[str, Any]:
    """Warm up, measure peak memory, time; return the record fields of an ok or timed-out point.

    ``report(phase, info)`` is told when the warm-up ends (the parent process uses it to apply
    its per-phase time limits).
    """
    device = torch.device(device)
    step, clock = workload.step, _Clock(device)
    limit = policy.call_limit_s
    with workload.context or contextlib.nullcontext():
        # 1. warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clock.call(step, 0)
            first = clock.collect()[0] / 1e3
        if workload.after_warmup is not None:
            workload.after_warmup(list(caught))
        report("warm", {"first_call_s": first})
        if first > limit + policy.compile_grace_s:
            return _timeout(workload, first, policy)
        # more warm-up calls: up to warmup_calls / warmup_s, and one more when the first call was
        # over the limit (it may have paid for compilation or lazy set-up)
        est, warm_start, calls = first, time.perf_counter(), 1
        while (
            calls < policy.warmup_calls
            or time.perf_counter() - warm_start < policy.warmup_s
            or (calls == 1 and est > limit)
        ):
            clock.call(step, calls)
            est = clock.collect()[0] / 1e3
            calls += 1
            if est > limit:
                break
        if est > limit:
            return _timeout(workload, est, policy)

        eager_step, graphed = step, policy.cuda_graph and device.type == "cuda"
        if graphed:
            # the timed calls replay CUDA graphs of the step; the estimate is a replay's
            step = capture_graphs(step, int(workload.extra.get("input_sets", 1)), device)
            clock.call(step, calls)
            est = clock.collect()[0] / 1e3
            calls += 1

        # 2. timed repetitions (the budget keeps one call for the memory pass)
        est = max(est, 1e-7)
        reps = min(policy.max_reps, max(policy.min_reps, round(policy.target_s / est)))
        affordable = (policy.budget_s - (time.perf_counter() - warm_start)) / est - 1
        reps = max(policy.min_reps, min(reps, int(affordable)))
        for r in range(reps):
            clock.call(step, calls + r)
        times = clock.collect()
        calls += reps
        extra = dict(workload.extra)
        if workload.finish is not None:
            extra.update(workload.finish(_percentile(sorted(times), 0.5)))

        # 3. memory pass (an eager call: a replay allocates nothing, its memory was set aside at
        #    capture; the graphs go first, so their pool does not crowd the eager call)
        if graphed:
            step = None
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        with _PeakMemory(device) as mem:
            eager_step(calls)

    times.sort()
    ms = _percentile(times, 0.5)
    notes = [n for n in (workload.note, mem.note) if n]
    return {
        "status": "ok",
        "impl": workload.impl,
        "ms": ms,
        "ms_p25": _percentile(times, 0.25),
        "ms_p75": _percentile(times, 0.75),
        "tflops": workload.flops / (ms * 1e-3) / 1e12 if workload.flops and ms > 0 else None,
        "peak_mem_bytes": mem.peak,
        "note": "; ".join(notes),
        "extra": {"reps": len(times), **extra, **({"cuda_graph": True} if graphed else {})},
    }


def _timeout(workload: Workload, call_s: float, policy: Policy) -> dict[str, Any]:
    note = (
        f"one call took {call_s:.3g} s, over the per-call limit of {policy.call_limit_s:.3g} s "
        f"(budget {policy.budget_s:g} s for the warm-up and {policy.min_reps} timed calls)"
    )
    return {
        "status": "timeout",
        "impl": workload.impl,
        "note": "; ".join(n for n in (note, workload.note) if n),
        "extra": dict(workload.extra),
    }


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(status, note) for an exception raised while building or measuring a point."""
    if isinstance(exc, Unavailable):
        return "unavailable", str(exc)
    if isinstance(exc, NotCapturable):
        return "error", str(exc)
    text = str(exc).strip()
    first_line = text.splitlines()[0] if text else ""
    lowered = text.lower()
    if (
        isinstance(exc, (MemoryError, torch.OutOfMemoryError))
        or "out of memory" in lowered
        or "can't allocate memory" in lowered
    ):
        return "oom", f"{type(exc).__name__}: {first_line}"[:300]
    return "error", f"{type(exc).__name__}: {first_line}"[:300]
