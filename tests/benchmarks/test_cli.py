"""The command line: defaults that depend on the machine, suite selection, bad arguments."""

from __future__ import annotations

import pytest
import torch

from fastvit.benchmarks import cli


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
