"""``python -m benchmarks host``: fastvit's host time per op call with the launches stubbed out, in a
child process under Triton's interpreter, and Triton's binding of the launches it recorded."""

from __future__ import annotations

import json

from fastvit.benchmarks import host_time


def test_host_time_rows_count_each_launch_and_time_its_binding(tmp_path):
    out = tmp_path / "host.json"
    assert host_time.main(["--calls", "3", "--repeats", "1", "--match", "key-padding", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["calls"] == 3 and "triton" in report["meta"]
    rows = {row["mode"]: row for row in report["rows"]}
    assert set(rows) == {"infer", "train"}
    assert all(row["op"] == "flash_attention key-padding mask" for row in rows.values())
    # the forward kernel; in training also the dQ and dK/dV passes (N = 197 takes no short backward)
    assert rows["infer"]["launches"] == 1 and rows["train"]["launches"] == 3
    for row in rows.values():
        assert row["layers_us"] > 0 and row["bind_us"] > 0
    # binding three launches takes longer than binding one
    assert rows["train"]["bind_us"] > rows["infer"]["bind_us"]


def test_every_case_builds_a_call_of_its_op():
    import torch

    for case in host_time.CASES:
        call, inputs = case.build(torch)
        assert callable(call) and all(isinstance(t, torch.Tensor) for t in inputs), case.name


def test_cli_knows_the_command():
    from fastvit.benchmarks.cli import COMMANDS

    assert COMMANDS["host"][0] == "host_time"


def test_the_real_launch_comes_back_after_a_run():
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    with host_time._Recorder() as recorder:
        assert InterpretedFunction.run is not original
    assert InterpretedFunction.run is original and recorder.launches == []


def test_a_match_of_nothing_is_said(capsys):
    # an empty table and exit 0 before
    assert host_time.main(["--match", "NO_SUCH_OP"]) == 2
    assert "no op's name contains it" in capsys.readouterr().err
