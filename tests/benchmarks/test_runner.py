"""The runner turns every outcome of a point into a record, never an exception: out of memory
(raised, or the worker killed), over the time budget (seen by the worker, or the worker killed),
errors, unavailable implementations; and it stops a group after a failure."""

from __future__ import annotations

import dataclasses
import re
import time
from types import SimpleNamespace

import pytest

from fastvit.benchmarks import runner
from fastvit.benchmarks.measure import Policy
from fastvit.benchmarks.progress import Progress
from fastvit.benchmarks.records import Point

from . import _workloads

# Short limits: per-call limit 2 / (2 + 2) = 0.5 s; a hung phase is killed 3 s after its limit
# (slack for a busy machine, as is the generous build limit: a worker imports this module).
POLICY = Policy(budget_s=2.0, min_reps=2, max_reps=4, target_s=0.05, build_timeout_s=30.0, slack_s=3.0)
ARGS = SimpleNamespace(device="cpu", quick=True, budget=None, deadline=None)


def point(kind: str | None = None, n: int = 8, **params) -> Point:
    if kind is not None:
        params["kind"] = kind
    return Point("test", "impl", "fwd", n, 1, 1, 8, "float32", "cpu", params)


def run(kind: str, **params):
    return runner.run_point(point(kind, **params), _workloads.build, POLICY)


def test_ok_point_is_measured():
    r = run("ok")
    assert r.status == "ok", r.note
    assert 0 < r.ms_p25 <= r.ms <= r.ms_p75
    assert r.extra["reps"] >= POLICY.min_reps
    assert r.tflops == pytest.approx(2 * 128**3 / (r.ms * 1e-3) / 1e12)
    assert r.note == "kind=ok" and r.extra["kind"] == "ok"


def test_peak_memory_is_measured_above_the_inputs():
    r = run("alloc", mb=64)
    assert r.status == "ok", r.note
    # the 64 MiB the step touches (to within the resident-set noise of a few pages), not the process
    assert 0.97 * (64 << 20) <= r.peak_mem_bytes < 80 << 20


@pytest.mark.parametrize("kind", ["oom_raise", "oom_cpu"])
def test_out_of_memory_error_is_an_oom_record(kind):
    r = run(kind)
    assert r.status == "oom", r.note
    assert r.ms is None and r.peak_mem_bytes is None


def test_worker_killed_by_sigkill_is_an_oom_record():
    r = run("killed")
    assert r.status == "oom"
    assert "SIGKILL" in r.note


def test_call_over_the_per_call_limit_is_a_timeout_record():
    r = run("slow", sleep=0.8)  # > 0.5 s per call
    assert r.status == "timeout"
    assert "per-call limit" in r.note


def test_hung_call_is_killed_and_recorded_as_timeout():
    start = time.monotonic()
    r = run("hang")
    assert r.status == "timeout"
    assert "killed" in r.note and "first call" in r.note
    assert time.monotonic() - start < 20  # killed at 0.5 + 3 s, not after the 60 s sleep


def test_hung_build_is_killed_and_recorded_as_timeout():
    policy = dataclasses.replace(POLICY, build_timeout_s=1.0)
    r = runner.run_point(point("hang_build"), _workloads.build, policy)
    assert r.status == "timeout"
    assert "building the inputs" in r.note


def test_error_and_unavailable_are_records_with_their_reason():
    r = run("error")
    assert r.status == "error" and "ValueError: boom" in r.note
    r = run("unavailable")
    assert r.status == "unavailable" and r.note == "not on this machine"


def test_a_failure_stops_the_larger_sizes_of_its_group():
    # N=16 runs out of memory; N=32 would raise if it ran: it must be recorded as oom, not run
    kinds = {"8": "ok", "16": "oom_raise", "32": "error"}
    points = [point(n=n, kinds=kinds, label="impl[route]") for n in (8, 16, 32)]
    other = Point(  # another group: not stopped
        "test", "other", "fwd", 32, 1, 1, 8, "float32", "cpu", {"kind": "ok"}
    )
    records = runner.run_points([*points, other], _workloads.build, ARGS, Progress(enabled=False), policy=POLICY)
    assert [r.status for r in records] == ["ok", "oom", "oom", "ok"]
    assert records[2].note == "not run: oom at N=16"
    assert [r.impl for r in records] == ["impl[route]"] * 3 + ["other"]  # not run: labelled as it ran


def test_unavailable_stops_every_size_of_its_group():
    points = [point(n=n, kinds={"8": "unavailable", "16": "error"}) for n in (8, 16)]
    records = runner.run_points(points, _workloads.build, ARGS, Progress(enabled=False), policy=POLICY)
    assert [r.status for r in records] == ["unavailable", "unavailable"]
    assert records[1].note == "not on this machine"


def test_points_after_the_deadline_are_not_run():
    args = SimpleNamespace(**{**vars(ARGS), "deadline": time.monotonic() - 1})
    records = runner.run_points([point("error")], _workloads.build, args, Progress(enabled=False), policy=POLICY)
    assert records[0].status == "timeout" and "--time-limit" in records[0].note


def test_not_run_records():
    records = runner.not_run([point("ok"), point("ok", n=16)], "unavailable", "not installed")
    assert [(r.status, r.note, r.n_tokens) for r in records] == [
        ("unavailable", "not installed", 8),
        ("unavailable", "not installed", 16),
    ]


def test_a_point_extrapolated_over_the_limit_is_not_run():
    # 10 ms at N=100, 20 ms at N=200: N=20000 would take ~2 s, over twice the 0.5 s per-call limit
    points = [point("sized", n=n) for n in (100, 200, 20000)]
    records = runner.run_points(points, _workloads.build, ARGS, Progress(enabled=False), policy=POLICY)
    assert [r.status for r in records] == ["ok", "ok", "timeout"]
    match = re.fullmatch(
        r"not run: one call would take ~(.+) s \(extrapolated from the smaller N\), "
        r"over the per-call limit of 0\.5 s",
        records[2].note,
    )
    assert match and float(match.group(1)) > 2 * POLICY.call_limit_s  # ~2 s (sleep jitter: more)


def test_predict_call_s():
    assert runner.predict_call_s([], 100) is None
    assert runner.predict_call_s([(100, 10.0)], 200) is None  # one size: no trend
    assert runner.predict_call_s([(100, 10.0), (200, 40.0)], 400) == pytest.approx(0.16)  # N^2
    assert runner.predict_call_s([(100, 10.0), (200, 10.0)], 400) == pytest.approx(0.02)  # at least N^1
    assert runner.predict_call_s([(100, 1.0), (200, 100.0)], 400) == pytest.approx(0.8)  # at most N^3
    assert runner.predict_call_s([(100, 10.0), (200, 40.0)], 200) is None  # not larger than measured


def test_call_in_worker_returns_raises_and_times_out():
    import math

    assert runner.call_in_worker(math.factorial, 5, timeout_s=60) == 120
    with pytest.raises(RuntimeError, match="ValueError"):
        runner.call_in_worker(math.factorial, -1, timeout_s=60)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        runner.call_in_worker(time.sleep, 30, timeout_s=0.5)
    assert time.monotonic() - start < 20
