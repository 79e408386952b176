"""Ahead-of-time compile of every kernel configuration for sm_80, sm_89 and sm_90, on a machine
without a GPU: no register spills, shared memory within each architecture's limit, and warpgroup
MMA (HGMMA) in every fp16/bf16 matmul-bound kernel on sm_90.

Triton reads TRITON_INTERPRET when it decorates a kernel, and this test process interprets, so the
compile runs in a subprocess with the variable unset (``python -m fastvit.kernels.aot``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fastvit.kernels.aot import KERNEL_MODULES, problems


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastvit.kernels.aot", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=1500,
    )
    if not out.exists():
        pytest.fail(f"the AOT compile did not finish:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def _offenders(reports, predicate):
    return [f"sm_{r['arch']} {r['kernel']} [{r['config']}]: {'; '.join(problems(r))}" for r in reports if predicate(r)]


def test_every_kernel_module_is_covered(reports):
    seen = {r["kernel"].split(".")[0] for r in reports}
    assert seen == set(KERNEL_MODULES)
    assert {r["arch"] for r in reports} == {80, 89, 90}


def test_every_configuration_compiles(reports):
    assert not _offenders(reports, lambda r: "error" in r)


def test_no_register_spills(reports):
    assert not _offenders(reports, lambda r: "error" not in r and (r["stack"] or r["local"]))


def test_shared_memory_within_architecture_limit(reports):
    assert not _offenders(reports, lambda r: "error" not in r and r["shared"] > r["shared_limit"])


def test_fp16_bf16_matmuls_use_warpgroup_mma_on_sm90(reports):
    wgmma = [r for r in reports if r["needs_wgmma"] and r["arch"] == 90]
    assert wgmma, "no fp16/bf16 matmul-bound kernel was compiled for sm_90"
    assert not _offenders(wgmma, lambda r: "error" not in r and r["hgmma"] == 0)
