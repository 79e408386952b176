"""The command line: defaults that depend on the machine, suite selection, bad arguments."""

from __future__ import annotations

import importlib.machinery
import json
import os
import signal
import sys
import time
import types

import pytest
import torch

from fastvit.benchmarks import cli, runner
from fastvit.benchmarks.progress import Progress
from fastvit.benchmarks.records import Point, Record


def test_defaults_on_this_machine():
    args = cli.parse_args([])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert args.dtype == ("bfloat16" if args.device == "cuda" else "float32")
    assert args.suites == ["attention", "model"]  # timm is installed here
    assert args.mode == "both" and args.out is None and not args.quick
    if args.device == "cpu":  # the default CPU job keeps within its 10 minutes
        assert args.time_limit == 9.0 and args.deadline is not None
    assert cli.parse_args(["attention"]).deadline is None  # a chosen suite runs to the end


def test_options_are_parsed():
    args = cli.parse_args(
        ["attention", "--device", "cpu", "--dtype", "bf16", "--seq-lens", "577,197", "--batch", "2",
         "--heads", "3", "--head-dim", "32", "--mode", "fwd", "--impls", "eager,sdpa[flash]",
         "--out", "/tmp/x", "--quick", "--budget", "5", "--time-limit", "2", "--threads", "1"]
    )  # fmt: skip
    assert args.suites == ["attention"] and args.dtype == "bfloat16"
    assert args.seq_lens == [577, 197] and (args.batch, args.heads, args.head_dim) == (2, 3, 32)
    assert args.impls == ["eager", "sdpa[flash]"] and args.mode == "fwd" and args.budget == 5
    assert args.deadline is not None and args.threads == 1


def test_all_means_every_registered_suite():
    assert cli.parse_args(["all"]).suites == list(cli.SUITES)


@pytest.mark.parametrize(
    "argv",
    [["nope"], ["--seq-lens", "197,x"], ["--seq-lens", "0"], ["--batch", "0"], ["--mode", "bwd"], ["--dtype", "int8"]],
)
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["attention", "--impls", ""], "--impls names no implementation"),  # measured nothing, exit 0
        (["attention", "--impls", " , "], "--impls names no implementation"),
        (["model", "--model", "vit_base_patch16_224,nosuch"], "--model ['nosuch']: not timm models"),  # error rows
    ],
)
def test_a_run_that_would_measure_nothing_is_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_model_names_of_timm_the_zoo_and_the_group_are_accepted():
    pytest.importorskip("timm")
    args = cli.parse_args(["model", "--model", "vit_base_patch16_224, hf-clip-vit-b16,scaling"])
    assert args.model == "vit_base_patch16_224, hf-clip-vit-b16,scaling"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cuda_graph_timing_needs_the_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["attention", "--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph times CUDA graph replays: it needs --device cuda" in capsys.readouterr().err
    assert cli.parse_args(["attention", "--device", "cpu"]).cuda_graph is False


def test_main_defines_the_console_script_entry_point():
    from fastvit.benchmarks.__main__ import main

    assert main is cli.main


def test_commands_are_dispatched_lazily(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["static", "--help"])
    assert exc.value.code == 0 and "--only" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["static", "--arch", "75"])  # not an architecture the report knows
    assert "--arch" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "later", ("no_such_module", "not written yet"))
    assert cli.main(["later", "x"]) == 2
    assert "not in this build yet" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    for name in ("compare", "static", "tune"):
        assert f"python -m benchmarks {name}" in out


def _point(suite: str, n: int = 197) -> Point:
    return Point(suite, "impl", "fwd", n, 1, 1, 8, "float32", "cpu")


def _measured(suite: str, progress: Progress) -> list[Record]:
    record = Record.from_point(_point(suite), status="ok", ms=1.0, ms_p25=1.0, ms_p75=1.0)
    progress.add(1)
    progress.advance(suite, record)
    return [record]


def _cut(args, progress: Progress) -> list[Record]:  # its share of --time-limit is spent before its last point
    records = _measured("cut", progress)
    args.deadline = time.monotonic() - 1
    return records + runner.run_points([_point("cut", 577)], None, args, progress)


def _stopped(args, progress: Progress) -> list[Record]:  # `timeout` sends SIGTERM during the suite
    records = _measured("stop", progress)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises before this ends
    return records


FAKE_SUITES = {
    "ok": lambda args, progress: _measured("ok", progress),
    "cut": _cut,
    "boom": lambda args, progress: (_ for _ in ()).throw(ValueError("boom\nsecond line of the message")),
    "stop": _stopped,
    "later": lambda args, progress: _measured("later", progress),
}


def test_results_say_which_suites_did_not_complete_and_why(tmp_path, monkeypatch, capsys):
    """A failed or interrupted suite was reported only on stderr: results.json's meta and summary.md
    must say, per suite, whether it completed, was cut by --time-limit, failed (the error) or was
    interrupted, and which never ran."""
    for name, run in FAKE_SUITES.items():
        module = types.ModuleType(f"{cli._PACKAGE}.fake_{name}")
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
        module.IMPLS, module.run = ("impl",), run
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(cli.SUITES, name, f"fake_{name}")
    monkeypatch.setitem(cli.SUITES, "missing", "no_such_suite_module")
    monkeypatch.setattr(cli, "measure_ceilings", lambda args: {"error": "not measured in this test"})
    monkeypatch.setattr(runner, "set_preload", lambda modules: None)
    out = tmp_path / "run"
    argv = [*FAKE_SUITES, "missing", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plots"]
    assert cli.main(argv) == 130
    status = json.loads((out / "results.json").read_text())["meta"]["suite_status"]
    assert {name: s["status"] for name, s in status.items()} == {
        "ok": "completed", "cut": "time-limit", "boom": "failed", "stop": "interrupted", "later": "not-run",
        "missing": "not-in-build",
    }  # fmt: skip
    assert status["boom"]["note"] == "ValueError: boom"  # one line
    assert status["cut"]["note"] == "1 of its 2 points not run: the --time-limit was reached"
    assert status["stop"]["note"] == "the run was stopped by signal 15 (SIGTERM)"
    summary = (out / "summary.md").read_text()
    for row in ("| ok | completed | 1 |  |", "| boom | failed | 0 | ValueError: boom |",
                "| stop | interrupted | 1 | the run was stopped by signal 15 (SIGTERM) |",
                "| later | not-run | 0 | the run ended before this suite started |"):  # fmt: skip
        assert row in summary
    assert "suite boom: failed (ValueError: boom)" in capsys.readouterr().err
