"""A patched model under DistributedDataParallel: 2 processes over gloo on the CPU, spawned here
(with a deadline). Gradients must equal the unpatched model's, all-reduced, within fp32 rounding."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.patching import ddp_worker

WORLD_SIZE = 2
DEADLINE_S = 180


HAS_GLOO = dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not HAS_GLOO, reason="needs torch.distributed with gloo")
def test_ddp_gradients_match_unpatched(tmp_path):
    pytest.importorskip("timm")
    context = mp.start_processes(
        ddp_worker.run,
        args=(WORLD_SIZE, str(tmp_path / "rendezvous"), str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the DDP ranks did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for result in results:
        assert result["replaced"] > 0
        reference, patched = result["grads"]["reference"], result["grads"]["patched"]
        assert reference.keys() == patched.keys()
        for name, grad in reference.items():
            message = lambda m, n=name: f"{n}: {m}"
            torch.testing.assert_close(patched[name], grad, rtol=1e-5, atol=1e-6, msg=message)
    for name, grad in results[0]["grads"]["patched"].items():  # all-reduced: the same on both ranks
        torch.testing.assert_close(results[1]["grads"]["patched"][name], grad, rtol=0, atol=0)
