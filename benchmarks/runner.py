"""Running points in worker processes, under time limits, and turning every outcome into a record.

Each point runs in a worker process forked from a fork server that has imported torch once (so a
fresh worker starts in milliseconds and owns no thread pools or CUDA context). On the CPU every
point gets a fresh worker, so its peak memory is measured above a clean baseline and an
out-of-memory kill ends the point, not the sweep. On a GPU one worker is reused (CUDA start-up
is slow) and replaced after any failure other than a caught out-of-memory error.

The parent gives each phase of a point a hard time limit: building the inputs
(``build_timeout_s``), the first call (the per-call limit plus ``compile_grace_s``) and the
measurement (twice the budget); a worker over a limit is killed and the point recorded as
``timeout``. A worker killed by SIGKILL (the kernel's OOM killer) makes an ``oom`` record.

Within a group (one implementation and mode at growing sizes, see ``Point.group``), a point that
ran out of memory or time marks the larger sizes the same way without running them, and an
unavailable implementation is not tried again. A point whose time per call, extrapolated from
the group's smaller sizes, is over twice the per-call limit is recorded as ``timeout`` without
running (the note says it was extrapolated): waiting for it to time out would only spend time.
"""

from __future__ import annotations

import atexit
import gc
import math
import multiprocessing as mp
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .measure import Policy, Workload, classify_exception, measure
from .progress import Progress
from .records import Point, Record

__all__ = [
    "TIME_LIMIT_NOTE", "applicable_impls", "call_in_worker", "not_run", "policy_from_args", "run_impls", "run_point",
    "run_points", "set_preload", "shutdown",
]

Build = Callable[[Point], Workload]

_PACKAGE = __package__  # "fastvit.benchmarks"
# imported once by the fork server, so that workers start without importing them (a missing
# module is skipped); the CLI adds the suites it runs
_preload: list[str] = [
    "torch",
    "fastvit",
    "timm",
    f"{_PACKAGE}.measure",
    f"{_PACKAGE}.runner",
    f"{_PACKAGE}.attention",
    f"{_PACKAGE}.model",
]
_context: Any = None
_workers: dict[str, _Worker] = {}


def set_preload(modules: Iterable[str]) -> None:
    """Modules the fork server imports once for every worker (call before the first point)."""
    for name in modules:
        if name not in _preload:
            _preload.append(name)


def _mp_context() -> Any:
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(list(_preload))
    return _context


def policy_from_args(args: Any) -> Policy:
    """The default measurement policy for ``args.device``, ``args.quick``, ``args.budget``,
    ``args.threads`` and (GPU) ``args.cuda_graph``."""
    quick = bool(getattr(args, "quick", False))
    budget = getattr(args, "budget", None)
    threads = getattr(args, "threads", None)
    if args.device == "cuda":
        return Policy(
            budget_s=budget or 20.0,
            min_reps=10,
            max_reps=30 if quick else 100,
            target_s=0.2 if quick else 0.3,
            warmup_calls=3,
            warmup_s=0.05,
            compile_grace_s=120.0,
            fresh_process=False,
            threads=threads,
            cuda_graph=bool(getattr(args, "cuda_graph", False)),
        )
    budget = budget or (8.0 if quick else 60.0)
    return Policy(
        budget_s=budget,
        min_reps=3 if quick else 2,  # 2 cores: a long call is timed twice (4 calls with warm-up and memory)
        max_reps=7 if quick else 25,
        target_s=0.15 if quick else 1.0,
        compile_grace_s=30.0,  # the first call may compile (torch.compile, Triton) or set up lazily
        fresh_process=True,
        threads=threads,
    )


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def _reset_fallback_warnings() -> None:
    # fastvit warns once per process about a fallback; a reused worker must see each point's own.
    backend_module = sys.modules.get("fastvit.backend")
    if backend_module is not None:
        backend_module._warned.clear()


def _run_one(build: Build, point: Point, policy: Policy, send: Callable[[tuple], None]) -> dict[str, Any]:
    _reset_fallback_warnings()
    if policy.threads is not None:
        torch.set_num_threads(policy.threads)
    torch.manual_seed(0)
    workload = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workload = build(point)
            send(("built", {}))
            return measure(workload, point.device, policy, report=lambda phase, info: send((phase, info)))
    except Exception as exc:
        status, note = classify_exception(exc)
        return {"status": status, "note": note, "impl": getattr(workload, "impl", None)}
    finally:
        del workload
        gc.collect()
        if point.device == "cuda":
            torch.cuda.empty_cache()


def _worker_main(conn: Any, fresh: bool) -> None:
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        build, point, policy = message
        result = _run_one(build, point, policy, conn.send)
        conn.send(("result", result))
        if fresh or result["status"] == "error":
            return  # an error may have left the CUDA context unusable: start clean


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, device: str, fresh: bool) -> None:
        ctx = _mp_context()
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, fresh), daemon=True)
        self.proc.start()
        child_conn.close()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()


def _worker_for(device: str, policy: Policy) -> _Worker:
    worker = _workers.get(device)
    if policy.fresh_process or worker is None or not worker.alive():
        if worker is not None:
            worker.kill()
        worker = _workers[device] = _Worker(device, policy.fresh_process)
    return worker


def _drop_worker(device: str) -> None:
    worker = _workers.pop(device, None)
    if worker is not None:
        worker.kill()


def shutdown() -> None:
    """Stop every worker (registered with atexit)."""
    for device in list(_workers):
        _drop_worker(device)


atexit.register(shutdown)


def _death_note(exitcode: int | None, phase: str) -> tuple[str, str]:
    if exitcode == -9:
        return "oom", f"worker killed by SIGKILL while {phase} (the out-of-memory killer, presumably)"
    if exitcode is not None and exitcode < 0:
        return "error", f"worker died from signal {-exitcode} while {phase}"
    return "error", f"worker exited with code {exitcode} while {phase}"


def run_point(point: Point, build: Build, policy: Policy) -> Record:
    """Measure one point in a worker process; never raises for a failing implementation."""
    worker = _worker_for(point.device, policy)
    worker.conn.send((build, point, policy))
    limits = {
        "built": ("building the inputs", policy.build_timeout_s),
        "warm": ("running the first call", policy.call_limit_s + policy.compile_grace_s),
        "result": ("measuring", 2 * policy.budget_s),
    }
    expected, started = "built", time.perf_counter()
    while True:
        phase, limit = limits[expected]
        limit += policy.slack_s
        try:
            ready = worker.conn.poll(limit)
            message = worker.conn.recv() if ready else None
        except (EOFError, OSError):
            worker.proc.join(10)
            _drop_worker(point.device)
            status, note = _death_note(worker.proc.exitcode, phase)
            return Record.from_point(point, status=status, note=note)
        if message is None:
            _drop_worker(point.device)
            note = f"killed after {time.perf_counter() - started:.1f} s: {phase} took over {limit:.3g} s"
            return Record.from_point(point, status="timeout", note=note)
        kind, info = message
        if kind == "result":
            break
        expected = {"built": "warm", "warm": "result"}[kind]
    if policy.fresh_process or info["status"] == "error":
        _drop_worker(point.device)
    fields = {k: info[k] for k in ("ms", "ms_p25", "ms_p75", "tflops", "peak_mem_bytes") if k in info}
    return Record.from_point(
        point,
        status=info["status"],
        note=info.get("note", ""),
        impl=info.get("impl"),
        extra=info.get("extra"),
        **fields,
    )


def _call_and_send(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        conn.send((True, fn(*args)))
    except Exception as exc:
        conn.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def call_in_worker(fn: Callable[..., Any], *args: Any, timeout_s: float = 300.0) -> Any:
    """``fn(*args)`` in a fresh process forked from the fork server (no CUDA context or memory of
    it stays in this one); returns its (picklable) result.

    Raises:
        RuntimeError: ``fn`` raised (its message), or the process died.
        TimeoutError: no result within ``timeout_s`` (the process is killed).
    """
    ctx = _mp_context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_and_send, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} took over {timeout_s:.3g} s")
        ok, value = receive.recv()
    except EOFError:
        proc.join(10)
        raise RuntimeError(f"the worker process died (exit code {proc.exitcode})") from None
    finally:
        receive.close()
        if proc.is_alive():
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    if not ok:
        raise RuntimeError(value)
    return value


def applicable_impls(suite: str, known: Sequence[str], requested: Sequence[str]) -> list[str]:
    """The names of ``--impls`` that ``suite`` has (the command line checked that each name belongs
    to some suite run); none: the suite is skipped, and says so on stderr.

    Example:
        >>> applicable_impls("varlen", IMPLS, ["eager", "fastvit-varlen"])  # ["fastvit-varlen"]
    """
    names = [name for name in requested if name in known]
    if not names:
        print(f"suite {suite!r}: none of --impls {list(requested)} is one of its implementations {tuple(known)}; "
              "skipped", file=sys.stderr)  # fmt: skip
    return names


def not_run(points: Iterable[Point], status: str, note: str, progress: Progress | None = None) -> list[Record]:
    """Records for points that are not run (an implementation that is not installed, say)."""
    out = [Record.from_point(p, status=status, note=note) for p in points]
    if progress is not None:
        progress.add(len(out))
        for r in out:
            progress.advance(f"{r.suite} {r.impl} {r.mode} N={r.n_tokens}: {r.status}", r)
    return out


# The note of a point not run because the run's --time-limit (the suite's share of it) was reached.
TIME_LIMIT_NOTE = "not run: the run's --time-limit was reached"
# A point is not run when the extrapolated time of one call is this many times the per-call limit:
# it would time out after costing up to that limit (plus the compile grace) of waiting.
PREDICTION_MARGIN = 2.0


def predict_call_s(history: list[tuple[int, float]], n_tokens: int) -> float | None:
    """Seconds one call at ``n_tokens`` should take, from a group's (n_tokens, ms) so far.

    A power law through the last two sizes, its exponent clamped to [1, 3] (cost never grows
    slower than the tokens); None with fewer than two sizes.
    """
    sizes = sorted({n: ms for n, ms in history}.items())
    if len(sizes) < 2 or n_tokens <= sizes[-1][0]:
        return None
    (n0, t0), (n1, t1) = sizes[-2], sizes[-1]
    exponent = min(3.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0))) if t0 > 0 and t1 > 0 else 2.0
    return t1 * (n_tokens / n1) ** exponent / 1e3


def run_points(
    points: list[Point],
    build: Build,
    args: Any,
    progress: Progress,
    *,
    policy: Policy | None = None,
) -> list[Record]:
    """Measure ``points`` in order (each group's points in increasing size); one record each.

    Args:
        points: what to measure.
        build: the suite's module-level ``build(point) -> Workload`` (it runs in the worker).
        args: the parsed command line (device, quick, budget, deadline).
        progress: advanced once per point.
        policy: overrides ``policy_from_args(args)``.
    """
    policy = policy or policy_from_args(args)
    deadline = getattr(args, "deadline", None)
    stopped: dict[tuple, tuple[str, int, str]] = {}  # group -> (status, n_tokens, why)
    trend: dict[tuple, list[tuple[int, float]]] = {}  # group -> (n_tokens, ms) of its ok points
    labels: dict[tuple, str] = {}  # group -> the impl label its points ran as ("fastvit[torch]")
    records = []
    progress.add(len(points))
    for point in points:
        group = point.group()
        why = stopped.get(group)
        predicted = predict_call_s(trend.get(group, []), point.n_tokens)
        if why is not None and (why[0] == "unavailable" or point.n_tokens > why[1]):
            note = why[2] if why[0] == "unavailable" else f"not run: {why[0]} at N={why[1]}"
            record = Record.from_point(point, status=why[0], note=note, impl=labels.get(group))
        elif deadline is not None and time.monotonic() > deadline:
            record = Record.from_point(point, status="timeout", note=TIME_LIMIT_NOTE, impl=labels.get(group))
        elif predicted is not None and predicted > PREDICTION_MARGIN * policy.call_limit_s:
            note = (
                f"not run: one call would take ~{predicted:.3g} s (extrapolated from the smaller N), "
                f"over the per-call limit of {policy.call_limit_s:.3g} s"
            )
            record = Record.from_point(point, status="timeout", note=note, impl=labels.get(group))
            stopped[group] = ("timeout", point.n_tokens, note)
        else:
            record = run_point(point, build, policy)
            labels[group] = record.impl
            if record.status in ("oom", "timeout", "unavailable"):
                stopped[group] = (record.status, point.n_tokens, record.note)
            elif record.status == "ok" and record.ms:
                trend.setdefault(group, []).append((point.n_tokens, record.ms))
        records.append(record)
        progress.advance(f"{record.suite} {record.impl} {record.mode} N={record.n_tokens}: {record.status}", record)
    return records


def run_impls(
    suite: str,
    known: tuple[str, ...],
    requested: Iterable[str] | None,
    not_here: Callable[[str], str | None],
    points: Callable[[str], list[Point]],
    size: Callable[[Point], float],
    build: Build,
    args: Any,
    progress: Progress,
    *,
    default: tuple[str, ...] | None = None,
) -> tuple[list[Record], list[str]]:
    """The body of a suite's ``run``: the implementations asked for that the suite has
    (``applicable_impls``; else ``default``, else ``known``), ``unavailable`` rows for those that
    ``not_here(impl)`` rules out, and the rest measured size-major: every implementation and mode
    advance together, so a --time-limit cuts the largest sizes, not the last implementations (each
    group still runs in increasing size).

    Returns:
        the records (unsorted: each suite orders its own table) and the implementations, in order.

    Example:
        >>> records, impls = run_impls("attention", IMPLS, args.impls, why_not, points_of, lambda p: p.n_tokens,
        ...                            build, args, progress)
    """
    if requested is not None:
        requested = applicable_impls(suite, known, requested)
        if not requested:
            return [], []
    impls = list(requested or default or known)
    records, runnable = [], []
    for impl in impls:
        reason = not_here(impl)
        if reason is not None:
            records += not_run(points(impl), "unavailable", reason, progress)
            continue
        for point in points(impl):
            if point.unavailable:
                records += not_run([point], "unavailable", point.unavailable, progress)
            else:
                runnable.append(point)
    runnable.sort(key=lambda p: (size(p), p.mode, impls.index(p.impl)))  # "fwd" < "fwd+bwd"
    return records + run_points(runnable, build, args, progress), impls
