"""The varlen suite: its batches, FLOPs and bytes by hand, rows produced on the CPU, and the
command line end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastvit.benchmarks import roofline, varlen
from fastvit.benchmarks.progress import Progress
from fastvit.benchmarks.records import Point, Record

from .test_output import validate_results_json

ROOT = Path(__file__).resolve().parents[2]


def args(**overrides):
    base = dict(
        device="cpu", dtype="float32", mode="both", seq_lens=None, batch=3, heads=2, head_dim=16, quick=True,
        budget=5.0, threads=1, impls=None, model=None, resolutions=None, deadline=None,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **overrides})


def test_lengths_are_fixed_by_the_seed_and_in_range():
    first = varlen.lengths(64, 64, 1024)
    assert first == varlen.lengths(64, 64, 1024)  # comparable between runs
    assert len(first) == 64 and min(first) >= 64 and max(first) <= 1024
    assert len(set(first)) > 32  # mixed sizes, not one repeated length
    assert varlen.lengths(64, 64, 1024, seed=1) != first


def test_points_sweep_total_tokens_with_their_padding():
    pts = varlen.points(args(mode="fwd", seq_lens=[10, 20]), "sdpa-padded")
    assert [p.params["max_len"] for p in pts] == [10, 20]
    for p in pts:
        lens = varlen.lengths(3, p.params["min_len"], p.params["max_len"])
        assert p.n_tokens == sum(lens) and p.batch == 3
        assert p.params["sum_len_sq"] == sum(n * n for n in lens)
        assert p.params["padding_frac"] == pytest.approx(1 - sum(lens) / (3 * max(lens)), abs=1e-4)
    assert pts[0].n_tokens < pts[1].n_tokens


def test_flops_by_hand():
    # lengths 3 and 5, H = 2, D = 4: forward 4 * 2 * 4 * (9 + 25)
    fwd = Point("varlen", "sdpa-padded", "fwd", 8, 2, 2, 4, "float32", "cpu", {"sum_len_sq": 34})
    assert varlen.flops(fwd) == 4 * 2 * 4 * 34
    both = Point("varlen", "fastvit-varlen", "fwd+bwd", 8, 2, 2, 4, "float32", "cpu", {"sum_len_sq": 34})
    assert varlen.flops(both) == 3.5 * 4 * 2 * 4 * 34


def test_bytes_are_one_packed_attention():
    # T = 8 tokens, H = 2, D = 4, fp32: q, k, v read and o written: 4 * 2 * 4 * 8 * 4
    assert roofline.varlen_attention_bytes(8, 2, 4, "float32", "fwd") == 4 * 2 * (4 * 8 * 4)
    # fwd+bwd: s H (6 T D + 6 T D) + 8 H T
    assert roofline.varlen_attention_bytes(8, 2, 4, "float32", "fwd+bwd") == 4 * 2 * 12 * 8 * 4 + 8 * 2 * 8
    row = Record("varlen", "sdpa-per-image", "fwd", 8, 2, 2, 4, "float32", "cpu", ms=1.0, extra={"sum_len_sq": 34})
    assert roofline.cost(row) == roofline.Cost(4 * 2 * 4 * 34, 4 * 2 * 4 * 8 * 4)


def test_rows_on_the_cpu():
    records = varlen.run(args(seq_lens=[6, 12]), Progress(enabled=False))
    by_impl = {}
    for r in records:
        by_impl.setdefault(r.impl, []).append(r)
    # on the CPU both fastvit ops run their torch route, and say so
    assert set(by_impl) == {"fastvit-varlen[torch]", "sdpa-padded", "sdpa-per-image", "fastvit-dense[torch]"}
    for impl, rows in by_impl.items():
        assert [r.status for r in rows] == ["ok"] * 4, (impl, [(r.status, r.note) for r in rows])
        assert [r.mode for r in rows] == ["fwd", "fwd", "fwd+bwd", "fwd+bwd"]
        for r in rows:
            point = Point(r.suite, r.impl, r.mode, r.n_tokens, r.batch, r.heads, r.head_dim, r.dtype, r.device,
                          {"sum_len_sq": r.extra["sum_len_sq"]})
            assert r.tflops == pytest.approx(varlen.flops(point) / (r.ms * 1e-3) / 1e12)
            assert r.extra["images"] == 3 and r.extra["max_len"] in (6, 12)
    lens = varlen.lengths(3, 6, 12)
    assert by_impl["sdpa-per-image"][1].extra["calls"] == 3
    assert by_impl["fastvit-dense[torch]"][1].extra["calls"] == len(set(lens))


def test_padded_and_packed_steps_compute_the_same_attention():
    """The padded SDPA with its key mask and the packed op agree on the real tokens."""
    import fastvit

    lens = [3, 7, 5]
    point = Point("varlen", "sdpa-padded", "fwd", 15, 3, 2, 8, "float32", "cpu", {})
    padded, *_ = varlen._implementation(point, lens)
    q, k, v = torch.randn(3, 15, 2, 8).unbind(0)
    cu = torch.tensor([0, 3, 10, 15], dtype=torch.int32)
    packed = fastvit.flash_attention_varlen(q, k, v, cu)
    pad = torch.zeros(3, 3, 2, 7, 8)  # (qkv, S, H, max_len, D)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        for i, t in enumerate((q, k, v)):
            pad[i, s, :, : b - a] = t[a:b].transpose(0, 1)
    (out,) = padded(*pad.unbind(0))
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        torch.testing.assert_close(out[s, :, : b - a].transpose(0, 1), packed[a:b])


def test_registered_but_not_in_the_default_run():
    from fastvit.benchmarks import cli

    assert cli.SUITES["varlen"] == "varlen" and "varlen" not in cli.DEFAULT_SUITES
    assert "varlen" in cli.parse_args(["all", "--device", "cpu"]).suites and "varlen" in cli.WEIGHTS
    assert roofline.SUITES["varlen"] == "varlen"


def test_an_implementation_the_suite_lacks_is_skipped():
    """The suite runs the --impls names it has (the command line refuses names no suite run has)."""
    assert varlen.run(args(impls=["nope"]), Progress(enabled=False)) == []


def test_quick_cli_run_on_cpu(tmp_path):
    out = tmp_path / "varlen"
    cmd = [sys.executable, "-m", "benchmarks", "varlen", "--quick", "--device", "cpu", "--out", str(out),
           "--threads", "1", "--heads", "2", "--head-dim", "16", "--no-plots"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    validate_results_json(data)
    records = data["records"]
    assert {r["suite"] for r in records} == {"varlen"}
    assert {r["status"] for r in records} == {"ok"}, [(r["impl"], r["note"]) for r in records]
    assert len(records) == len(varlen.IMPLS) * 2 * len(varlen.QUICK_SIZES[2])
    for r in records:  # every row has its useful FLOPs and compulsory bytes
        assert r["flops"] > 0 and r["min_bytes"] > 0 and 0 <= r["padding_frac"] < 1
    assert "fastvit-varlen[torch]" in proc.stdout and "sdpa-padded" in proc.stdout
