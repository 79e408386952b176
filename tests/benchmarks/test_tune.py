"""``python -m benchmarks tune``: a real (tiny) run — on the CPU the Triton kernels in the interpreter
against the extension's CPU loops, on a GPU the compiled kernels — writes a table whose entries
``auto`` reads back."""

from __future__ import annotations

import json

import pytest
import torch

from fastvit import tuning
from fastvit.benchmarks import tune

# the kernels' device: the GPU where there is one (there the Triton kernels are compiled, not
# interpreted: TRITON_INTERPRET is set only on machines without CUDA), else the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = [
    "--device", DEVICE, "--dtype", "float32", "--modes", "fwd,fwd+bwd", "--target-s", "0.01",
    "--widths", "32", "--sizes", "1x7", "--patch-shapes", "16:8", "--batches", "1", "--resolution", "16",
    "--attention-shapes", "16:7:2",
]


@pytest.mark.usefixtures("cuda_extension")
def test_tune_measures_every_route_and_records_the_fastest(tmp_path, capsys):
    table, runs = tmp_path / "tune.json", tmp_path / "run.json"
    assert tune.main([*TINY, "--table", str(table), "--json", str(runs)]) == 0
    rows = json.loads(runs.read_text())["rows"]
    assert {(r["op"], r["bucket"].rsplit(",", 1)[1]) for r in rows} == {
        ("layernorm_mlp", "infer"), ("layernorm_mlp", "train"), ("patch_embed", "infer"), ("patch_embed", "train"),
        ("flash_attention", "infer"), ("flash_attention", "train"),
    }
    for row in rows:
        # PyTorch's own route is a candidate beside fastvit's (issue 15: auto never slower than it)
        routes = {"triton", "torch"} if row["op"] == "flash_attention" else {"triton", "cuda", "torch"}
        assert set(row["ms"]) == routes and all(t > 0 for t in row["ms"].values()), row
        faster = min(row["ms"], key=row["ms"].get)
        assert row["backend"] == faster
        device_key = tuning.device_name(torch.device(DEVICE))
        entry = json.loads(table.read_text())["entries"][device_key][row["op"]][row["bucket"]]
        assert entry["backend"] == faster and set(entry["ms"]) == routes
    key = tuning.layernorm_mlp_bucket(32, 128, torch.float32, 7, True)
    assert key in {r["bucket"] for r in rows}
    out = capsys.readouterr().out
    assert "6 of 6 buckets recorded" in out
    # --print shows what was stored
    assert tune.main(["--print", "--table", str(table)]) == 0
    assert "layernorm_mlp" in capsys.readouterr().out


@pytest.mark.interpreter if DEVICE == "cpu" else pytest.mark.gpu
def test_a_fallback_is_not_recorded_in_any_bucket(tmp_path, capsys):
    # fallbacks are told by their warning, said once per process and reason: from the second bucket
    # with the same reason on, the torch route's time was recorded as triton's
    table = tmp_path / "tune.json"
    shapes = ["--ops", "flash_attention", "--modes", "fwd", "--attention-shapes", "272:9:1,272:17:1"]
    assert tune.main(["--device", DEVICE, "--dtype", "float32", "--target-s", "0.01", *shapes,
                      "--table", str(table)]) == 1  # fmt: skip  (not every bucket recorded)
    out = capsys.readouterr().out
    assert out.count("triton: fell back") == 2, out  # head dim 272 > 256, in both buckets
    entries = json.loads(table.read_text())["entries"] if table.exists() else {}
    assert not any(entry.get("backend") == "triton" for device in entries.values() for op in device.values()
                   for entry in op.values())  # fmt: skip


def test_tune_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert tune.main(["--quick"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_tune_rejects_unknown_ops(capsys):
    assert tune.main(["--ops", "conv", "--device", "cpu"]) == 2
    assert "unknown ops" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--sizes", "8", "BATCHxTOKENS"), ("--sizes", "8x", "BATCHxTOKENS"), ("--sizes", "8:197", "BATCHxTOKENS"),
        ("--sizes", "0x197", "BATCHxTOKENS"), ("--patch-shapes", "768", "D:p"), ("--patch-shapes", "768x16", "D:p"),
        ("--patch-shapes", "768:16:2", "D:p"), ("--attention-shapes", "64:197", "HEAD_DIM:TOKENS:BATCHxHEADS"),
        ("--widths", "768,x", "positive integers"), ("--batches", "-1", "positive integers"),
        ("--modes", "bwd", "choose from fwd, fwd+bwd"), ("--modes", "fwd,train", "choose from fwd, fwd+bwd"),
        ("--modes", ",", "choose from fwd, fwd+bwd"),
    ],
)  # fmt: skip
def test_malformed_shapes_and_modes_are_one_line_errors(option, value, expected, capsys):
    """They gave "invalid <lambda> value", or passed the parser and ended in a traceback (a size
    without its tokens) or ran a mode that is not one (bwd, timed as training)."""
    with pytest.raises(SystemExit) as exc:
        tune._parser().parse_args([option, value])
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"python -m benchmarks tune: error: argument {option}: ") and expected in error
    assert "<lambda>" not in error


def test_well_formed_shapes_and_modes_are_parsed():
    args = tune._parser().parse_args(["--sizes", "8x197,256x197", "--patch-shapes", "768:16", "--modes", "fwd+bwd,fwd",
                                      "--widths", "384,768", "--attention-shapes", "64:197:96"])  # fmt: skip
    assert args.sizes == [(8, 197), (256, 197)] and args.patch_shapes == [(768, 16)]
    assert args.modes == ["fwd+bwd", "fwd"] and args.widths == [384, 768] and args.attention_shapes == [(64, 197, 96)]
    assert tune._parser().parse_args([]).modes == ["fwd", "fwd+bwd"]


def test_tune_print_on_an_empty_table(tmp_path, capsys):
    assert tune.main(["--print", "--table", str(tmp_path / "none.json")]) == 0
    assert "no entries" in capsys.readouterr().out


def test_default_shapes_cover_the_vit_widths():
    args = tune._parser().parse_args([])
    args.dtype, args.device = "bfloat16", "cuda"
    points = tune.tune_points(args)
    buckets = {(p.op, p.key) for p in points}
    assert len(buckets) == len(points), "two default shapes fall in one bucket"
    widths = {p.key.split(",")[0] for p in points if p.op == "layernorm_mlp"}
    assert widths == {"D=384", "D=768", "D=1024", "D=1280"}
    assert any(p.op == "patch_embed" and "p=14" in p.key for p in points)
    head_dims = {p.key.split(",")[0] for p in points if p.op == "flash_attention"}
    assert head_dims == {"D=64", "D=80", "D=128"}  # ViT-B/L, ViT-H (80 pads to 128) and ViT-g
    assert all(p.backends == ("triton", "torch") for p in points if p.op == "flash_attention")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_tune_print_on_an_empty_table_says_what_auto_runs_on_the_device(device, tmp_path, capsys, monkeypatch):
    """It said "auto runs the Triton kernels everywhere" on the CPU too, where ``auto`` runs the
    torch route whatever the table holds (``fastvit.backend.resolve_backend``)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda")
    monkeypatch.setattr(tuning, "device_name", lambda d: "NVIDIA H100 80GB HBM3" if d.type == "cuda" else d.type)
    assert tune.main(["--print", "--table", str(tmp_path / "none.json")]) == 0
    out = capsys.readouterr().out
    assert "no entries" in out
    if device == "cuda":
        assert "auto runs the Triton kernels everywhere on NVIDIA H100 80GB HBM3" in out
    else:
        assert "Triton kernels everywhere" not in out and "auto runs the torch route on cpu tensors" in out
    # --device names the device to describe, whatever this machine has
    other = "cpu" if device == "cuda" else "cuda"
    assert tune.main(["--print", "--device", other, "--table", str(tmp_path / "none.json")]) == 0
    assert ("Triton kernels everywhere" in capsys.readouterr().out) == (other == "cuda")
