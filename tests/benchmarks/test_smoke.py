"""CI's smoke test: the quick CPU attention run, as a user runs it, within its time budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_output import validate_results_json

ROOT = Path(__file__).resolve().parents[2]
RUNS_EVERYWHERE = ("eager", "axial", "sdpa[math]", "sdpa[flash]", "fastvit[torch]")


def test_quick_attention_run_on_cpu(tmp_path):
    out = tmp_path / "quick"
    # --threads 1: steady on a shared CI machine, where two threads can wait on each other
    cmd = [sys.executable, "-m", "benchmarks", "attention", "--quick", "--device", "cpu", "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run([*cmd, "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the promise is 2 minutes on an idle 2-core machine; a busy CI machine gets some slack
    assert elapsed < 180, f"--quick took {elapsed:.0f} s"

    data = json.loads((out / "results.json").read_text())
    validate_results_json(data)
    records = data["records"]
    assert {r["suite"] for r in records} == {"attention"} and {r["device"] for r in records} == {"cpu"}
    for impl in RUNS_EVERYWHERE:
        for mode in ("fwd", "fwd+bwd"):
            ok = {r["n_tokens"] for r in records if (r["impl"], r["mode"], r["status"]) == (impl, mode, "ok")}
            assert len(ok) >= 4, (impl, mode, [(r["n_tokens"], r["status"], r["note"]) for r in records
                                               if r["impl"] == impl])  # fmt: skip
    unavailable = {r["impl"] for r in records if r["status"] == "unavailable"}
    assert {"sdpa[efficient]", "sdpa[cudnn]", "flash-attn", "xformers"} <= unavailable
    for name in ("results.csv", "summary.md", "attention-fwd.png", "attention-fwd_bwd.png"):
        assert (out / name).stat().st_size > 0
    assert "log-log slopes" in proc.stdout and "sdpa[flash]" in proc.stdout


def test_a_terminated_run_writes_what_it_measured(tmp_path):
    # `timeout` (and CI) end a run with SIGTERM: the records measured so far must be written
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "benchmarks", "attention", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--threads", "1", "--no-plots"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # one line per finished point
            if line.startswith("[2/"):
                break
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    data = json.loads((out / "results.json").read_text())
    validate_results_json(data)
    assert len(data["records"]) >= 2


@pytest.mark.interpreter
def test_masked_attention_gpu_check_runs_on_cpu(tmp_path):
    """benchmarks/gpu_checks/attention_masked.py (a phase of .ci/gpu) on tiny shapes in the interpreter:
    every masked case (bool, float bias, windows with a region mask, unmasked windows at D = 80 dense and
    packed, rel_pos on a 6 x 6 and a 20 x 20 grid) passes its check, and so do the float bias with the dBias walk on two
    stages and with the dQ and dK/dV passes in place of the walk that takes them, and the windows with
    the passes in place of the short backward and with its kernel on two stages (the candidates it
    times on a GPU)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = ROOT / "benchmarks" / "gpu_checks" / "attention_masked.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = json.loads((tmp_path / "attention_masked.json").read_text())["checks"]
    assert len(checks) == 14 and all(c.startswith("PASS") for c in checks), checks
    assert [sum(f"({tag})" in c for c in checks) for tag in ("dbias s2", "passes", "short s2")] == [1, 4, 2], checks


@pytest.mark.interpreter
def test_mlp_tile_sweep_gpu_check_runs_on_cpu(tmp_path):
    """benchmarks/gpu_checks/mlp_configs.py (a phase of .ci/gpu) on tiny shapes in the interpreter:
    every candidate tiling of FC1 and the dA GEMM, plain and with a separate gate projection, matches
    the float32 composite, and each kind's first candidate is the launcher's own Hopper tiles."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = ROOT / "benchmarks" / "gpu_checks" / "mlp_configs.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "300"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "mlp_configs.jsonl").read_text().splitlines()]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    shapes, kinds = ("tiny", "tiny_swiglu"), ("fc1", "fc2_bwd")
    assert {(r["shape"], r["kind"]) for r in rows} == {(s, k) for s in shapes for k in kinds}
    firsts = {(r["shape"], r["kind"]): r["config"] for r in reversed(rows)}
    assert firsts[("tiny", "fc1")] == "64x128x64 w4 s3" and firsts[("tiny", "fc2_bwd")] == "64x64x64 w4 s4"
    assert firsts[("tiny_swiglu", "fc2_bwd")] == "64x64x64 w4 s4"  # SwiGLU's SiLU
