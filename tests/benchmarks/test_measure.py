"""The measurement inside a worker: percentiles, rotation, op steps, warm-up and budget rules."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fastvit.benchmarks.measure import (
    NotCapturable,
    Policy,
    Workload,
    _percentile,
    capture_graphs,
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
    assert classify_exception(NotCapturable("not capturable as a CUDA graph: why")) == (
        "error", "not capturable as a CUDA graph: why")


def test_cuda_graph_policy_times_plain_calls_on_the_cpu():
    # the flag is a GPU option (the command line refuses it elsewhere); a CPU worker times calls
    used = []
    result = measure(Workload(step=used.append, extra={"input_sets": 3}), "cpu",
                     Policy(budget_s=2.0, min_reps=3, max_reps=7, target_s=0.01, cuda_graph=True))
    assert result["status"] == "ok" and "cuda_graph" not in result["extra"]
    assert used == list(range(len(used)))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: holds the calls made during its capture."""

    def __init__(self):
        self.calls, self.pool_from = [], None

    def pool(self):
        return id(self)


def test_capture_graphs_captures_each_set_once_in_one_pool_and_replays_them_in_turn(monkeypatch):
    import contextlib

    events, current = [], []

    @contextlib.contextmanager
    def graph(g, pool=None):
        g.pool_from = pool
        current.append(g)
        yield
        current.pop()

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            events.append("wait")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(_FakeGraph, "replay", lambda self: events.append((self.calls, self.pool_from)),
                        raising=False)
    sync_mode = ["warn"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: sync_mode[0])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: sync_mode.__setitem__(0, mode))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: events.append("stream restored"))

    def step(i):
        (current[-1].calls if current else events).append(i if sync_mode[0] == "error" or current else "unchecked")

    replay = capture_graphs(step, 3, torch.device("cpu"))
    # one side-stream call per set, with host syncs raising, before any capture; the mode restored
    assert events == ["wait", 0, 1, 2, "wait"] and sync_mode == ["warn"]
    for i in range(5):
        replay(i)
    shared = events[6][1]  # the graphs after the first capture into its pool
    assert shared is not None
    assert events[5:] == [([0], None), ([1], shared), ([2], shared), ([0], None), ([1], shared)]

    def host_sync(i):  # the error inside the capture, then the one ending it (torch.cuda.graph's __exit__)
        if current:
            try:
                raise ValueError("operation not permitted when stream is capturing\nmore")
            finally:
                current.pop()
                raise RuntimeError("capture_end: invalidated")

    events.clear()
    with pytest.raises(NotCapturable, match=r"RuntimeError: capture_end: invalidated \(while handling ValueError: "
                                            r"operation not permitted when stream is capturing\)$"):
        capture_graphs(host_sync, 1, torch.device("cpu"))
    assert events[-1] == "stream restored"

    def item(i):  # a host sync: PyTorch's sync debug mode raises in the warm-up, before any capture
        if sync_mode[0] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")

    events.clear()
    with pytest.raises(NotCapturable, match=r"RuntimeError: called a synchronizing CUDA operation$"):
        capture_graphs(item, 2, torch.device("cpu"))
    assert sync_mode == ["warn"] and "wait" in events

    def out_of_memory(i):
        if current:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):  # an oom row, not an error row
        capture_graphs(out_of_memory, 1, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_policy_replays_one_captured_graph_per_input_set():
    sets = [torch.randn(256, 256, device="cuda") for _ in range(3)]
    outs = [torch.empty(256, 256, device="cuda") for _ in range(3)]
    eager_calls = []

    def step(i):
        eager_calls.append(i)
        torch.matmul(sets[i % 3], sets[i % 3], out=outs[i % 3])

    policy = Policy(budget_s=5.0, min_reps=3, max_reps=7, target_s=0.01, compile_grace_s=30.0, cuda_graph=True)
    result = measure(Workload(step=step, extra={"input_sets": 3}), "cuda", policy)
    assert result["status"] == "ok" and result["extra"]["cuda_graph"] is True
    # warm-up calls, one side-stream call and one capture per set, then the eager memory pass:
    # the timed calls replay graphs and run no Python
    assert eager_calls[-7:-1] == [0, 1, 2, 0, 1, 2]
    for i in range(3):
        sets[i].normal_()
    capture_graphs(step, 3, torch.device("cuda"))(1)  # a replay computes set 1 from its new values
    torch.cuda.synchronize()
    torch.testing.assert_close(outs[1], sets[1] @ sets[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_step_that_syncs_with_the_host_is_not_capturable():
    x = torch.randn(8, device="cuda")
    policy = Policy(budget_s=5.0, min_reps=3, max_reps=7, target_s=0.01, compile_grace_s=30.0, cuda_graph=True)
    stream = torch.cuda.current_stream()
    with pytest.raises(NotCapturable, match="not capturable as a CUDA graph"):
        measure(Workload(step=lambda i: x.sum().item()), "cuda", policy)
    # refused in the warm-up by the sync debug mode: no capture started, nothing left behind
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    assert torch.isfinite(x.sum())


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
