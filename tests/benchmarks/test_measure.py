"""The measurement inside a worker: percentiles, rotation, op steps, warm-up and budget rules."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fastvit.benchmarks.measure import (
    Policy,
    Workload,
    _percentile,
    classify_exception,
    input_sets,
    measure,
    op_step,
    randn,
    rotation_count,
)

POLICY = Policy(budget_s=2.0, min_reps=3, max_reps=7, target_s=0.01)


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0]])
@pytest.mark.parametrize("q", [0.25, 0.5, 0.75])
def test_percentile_is_numpys_linear_percentile(values, q):
    assert _percentile(sorted(values), q) == pytest.approx(np.percentile(values, 100 * q))


def test_rotation_covers_twice_the_cache():
    from fastvit.benchmarks.measure import cache_bytes

    cache = cache_bytes("cpu")
    assert rotation_count(cache, "cpu") == 2
    assert rotation_count(cache // 4, "cpu") == 8
    assert rotation_count(1, "cpu") == 64  # capped
    assert rotation_count(10 * cache, "cpu") == 1
    sets = input_sets(lambda: (randn((cache // 8,), dtype=torch.float32, device="cpu"),), "cpu")
    assert len(sets) == 4  # half the cache per set (cache / 8 floats)
    assert all(s[0].abs().sum() > 0 for s in sets)  # random, never zeros
    assert not torch.equal(sets[0][0], sets[1][0])


def test_op_step_fwd_runs_without_autograd():
    seen = []

    def fn(a):
        seen.append(torch.is_grad_enabled())
        return a * 2

    sets = [(randn((3,), dtype=torch.float32, device="cpu", requires_grad=True),)]
    op_step(fn, sets, "fwd")(5)
    assert seen == [False]
    assert sets[0][0].grad is None


def test_op_step_fwd_bwd_computes_input_gradients_against_the_given_grad_output():
    calls = []
    x = randn((4,), dtype=torch.float64, device="cpu", requires_grad=True)
    g = randn((4,), dtype=torch.float64, device="cpu")

    def fn(a):
        out = a * a
        out.register_hook(lambda grad: calls.append(grad.clone()))
        return out

    op_step(fn, [(x,)], "fwd+bwd", [g])(0)
    assert torch.equal(calls[0], g)
    assert x.grad is None  # autograd.grad: nothing accumulates between calls
    with pytest.raises(ValueError, match="one grad_output per input set"):
        op_step(fn, [(x,)], "fwd+bwd")


def test_measure_rotates_inputs_and_reports_percentiles():
    used = []
    workload = Workload(step=used.append, flops=1e6)
    result = measure(workload, "cpu", POLICY)
    assert result["status"] == "ok"
    assert result["ms_p25"] <= result["ms"] <= result["ms_p75"]
    assert POLICY.min_reps <= result["extra"]["reps"] <= POLICY.max_reps
    assert used == list(range(len(used)))  # warm-up, memory pass, timed calls: each on the next set
    assert len(used) == 2 + result["extra"]["reps"]


def test_measure_enters_the_context_once_and_calls_the_hooks():
    events = []

    class Context:
        def __enter__(self):
            events.append("enter")

        def __exit__(self, *exc):
            events.append("exit")

    def step(i):
        events.append("step")
        if i == 0:
            import warnings

            warnings.warn("first call only", UserWarning, stacklevel=1)

    workload = Workload(
        step=step,
        context=Context(),
        after_warmup=lambda caught: events.append([str(w.message) for w in caught]),
        finish=lambda ms: {"finished_with": ms},
    )
    result = measure(workload, "cpu", POLICY)
    assert events[0] == "enter" and events[-1] == "exit"
    assert events.count("enter") == 1
    assert ["first call only"] in events
    assert result["extra"]["finished_with"] == result["ms"]


def test_measure_stops_a_point_whose_call_is_over_the_per_call_limit():
    # per-call limit 2 / (2 + 3) = 0.4 s, no compile grace: the first call ends the point
    calls = []
    result = measure(Workload(step=lambda i: (calls.append(i), time.sleep(0.45))), "cpu", POLICY)
    assert result["status"] == "timeout"
    assert calls == [0]
    assert "per-call limit of 0.4 s" in result["note"]


def test_a_slow_first_call_within_the_grace_is_retried_once():
    # the first call may be a compilation: within the grace, a second call re-estimates
    policy = Policy(budget_s=2.0, min_reps=3, max_reps=7, target_s=0.01, compile_grace_s=1.0)
    calls = []
    result = measure(Workload(step=lambda i: (calls.append(i), time.sleep(0.45))), "cpu", policy)
    assert result["status"] == "timeout"
    assert calls == [0, 1]


def test_a_slow_first_call_within_the_compile_grace_is_measured():
    policy = Policy(budget_s=2.0, min_reps=3, max_reps=3, target_s=0.01, compile_grace_s=1.0)

    def step(i):
        time.sleep(0.6 if i == 0 else 0.001)

    assert measure(Workload(step=step), "cpu", policy)["status"] == "ok"


def test_classify_exception():
    from fastvit.benchmarks.measure import Unavailable

    assert classify_exception(Unavailable("no cudnn")) == ("unavailable", "no cudnn")
    assert classify_exception(torch.OutOfMemoryError("CUDA out of memory"))[0] == "oom"
    assert classify_exception(RuntimeError("DefaultCPUAllocator: can't allocate memory: 9 bytes"))[0] == "oom"
    assert classify_exception(MemoryError())[0] == "oom"
    assert classify_exception(ValueError("bad\nsecond line")) == ("error", "ValueError: bad")


def test_relabel_on_fallback_names_the_route_that_ran():
    import warnings

    from fastvit import FastvitFallbackWarning
    from fastvit.benchmarks.measure import Workload, relabel_on_fallback

    workload = Workload(step=lambda i: None)
    hook = relabel_on_fallback(workload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("unrelated", UserWarning, stacklevel=1)
    hook(list(caught))
    assert workload.impl is None and workload.note == ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("head_dim 320 > 256", FastvitFallbackWarning, stacklevel=1)
    hook(list(caught))
    assert workload.impl == "fastvit[torch]" and "head_dim 320" in workload.note
