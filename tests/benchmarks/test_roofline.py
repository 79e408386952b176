"""The roofline floor: FLOPs and compulsory bytes on hand-computed shapes, the floor and percentage
arithmetic, the ceilings measured on this CPU, and a CLI run whose outputs carry % of floor."""

from __future__ import annotations

import json

import pytest
import torch

from fastvit.benchmarks import cli, mlp, patch_embed, roofline
from fastvit.benchmarks.records import Point, Record


def record(suite, mode, n, batch, heads, head_dim, dtype="float32", ms=1.0, status="ok", impl="impl", **extra):
    p = Point(suite, impl, mode, n, batch, heads, head_dim, dtype, "cpu", extra)
    return Record.from_point(p, status=status, ms=ms if status == "ok" else None)


def test_attention_bytes_by_hand():
    # B=2, H=3, N=5, D=4, fp16: q, k, v read and o written, 4 x 20 elements per head, 6 heads
    assert roofline.attention_bytes(2, 3, 5, 5, 4, "float16", "fwd") == 2 * 6 * 80
    # + lse written (fp32); backward: q, k, v, o, dO read (100 elements), lse read, dq, dk, dv written (60)
    backward = 2 * 6 * 100 + 6 * 5 * 4 + 2 * 6 * 60
    assert roofline.attention_bytes(2, 3, 5, 5, 4, "float16", "fwd+bwd") == 960 + 6 * 5 * 4 + backward
    # M keys != N queries: k, v and their gradients scale with M
    assert roofline.attention_bytes(1, 1, 2, 7, 4, "float32", "fwd") == 4 * (8 + 56 + 8)


def test_attention_bias_bytes_by_hand():
    # a bias of 5 x 5 elements, fp16: read by the forward; read again and its gradient written by the backward
    plain = roofline.attention_bytes(2, 3, 5, 5, 4, "float16", "fwd")
    assert roofline.attention_bytes(2, 3, 5, 5, 4, "float16", "fwd", bias_elements=25) == plain + 2 * 25
    plain = roofline.attention_bytes(2, 3, 5, 5, 4, "float16", "fwd+bwd")
    assert roofline.attention_bytes(2, 3, 5, 5, 4, "float16", "fwd+bwd", bias_elements=25) == plain + 3 * 2 * 25


def test_attention_cost_counts_the_bias_tensors():
    # (1, H, N, N) for +bias rows; rel_h (B, H, N, h) and rel_w (B, H, N, w) for +rel_pos rows
    biased = record("attention", "fwd", 197, 2, 12, 64, "bfloat16", impl="fastvit+bias[triton]")
    expected = roofline.attention_bytes(2, 12, 197, 197, 64, "bfloat16", "fwd", 12 * 197**2)
    assert roofline.cost(biased).min_bytes == expected
    rel = record("attention", "fwd", 196, 2, 12, 64, "bfloat16", impl="sdpa+rel_pos", grid="14x14")
    expected = roofline.attention_bytes(2, 12, 196, 196, 64, "bfloat16", "fwd", 24 * 196 * 28)
    assert roofline.cost(rel).min_bytes == expected
    plain = record("attention", "fwd", 197, 2, 12, 64, "bfloat16", impl="fastvit[triton]")
    assert roofline.cost(plain).min_bytes == roofline.attention_bytes(2, 12, 197, 197, 64, "bfloat16", "fwd")


def test_attention_cost_counts_the_rope_table():
    # RoPE rows: timm's fp32 (N - 1, 2D) table read by the forward, and again by the backward
    for mode, reads in (("fwd", 1), ("fwd+bwd", 2)):
        for impl in ("fastvit+rope[triton]", "sdpa+rope"):
            rope = record("attention", mode, 197, 2, 12, 64, "bfloat16", impl=impl, num_prefix_tokens=1)
            expected = roofline.attention_bytes(2, 12, 197, 197, 64, "bfloat16", mode) + reads * 4 * 196 * 128
            assert roofline.cost(rope).min_bytes == expected


def test_mlp_bytes_by_hand():
    # T=10 rows, D=4, hidden=16, fp32; parameters: 2*4 (LN) + 64 + 16 (fc1) + 64 + 4 (fc2) = 156
    assert roofline.mlp_bytes(10, 4, 16, "float32", "fwd") == 4 * (40 + 156 + 40)
    forward = 4 * (40 + 156 + 40) + 4 * 160 + 8 * 10  # + pre-activation (10 x 16) and mean, rstd saved
    backward_reads = 4 * (40 + 40 + 8 + 128) + 4 * 160 + 8 * 10  # dy, x, LN w/b, W1, W2; pre-activation, stats
    backward_writes = 4 * (40 + 156)  # dx and the parameters' gradients
    assert roofline.mlp_bytes(10, 4, 16, "float32", "fwd+bwd") == forward + backward_reads + backward_writes


def test_gated_hidden_norm_mlp_bytes_by_hand():
    # T=10, D=4, hidden=16 per projection, fp32; parameters: 8 (LN) + 128 + 32 (fc1_g, fc1_x) + 64 + 4
    # (fc2) + 32 (the hidden norm's weight and bias) = 268
    assert roofline.mlp_bytes(10, 4, 16, "float32", "fwd", gated_hidden_norm=True) == 4 * (40 + 268 + 40)
    saved = 4 * 320 + 16 * 10  # the (10, 32) pre-activation; mean and rstd of both norms
    forward = 4 * (40 + 268 + 40) + saved
    backward_reads = 4 * (40 + 40 + 8 + 32 + 192) + saved  # dy, x, the norms' w / b, W1 (32 x 4), W2
    backward_writes = 4 * (40 + 268)
    assert roofline.mlp_bytes(10, 4, 16, "float32", "fwd+bwd", gated_hidden_norm=True) == (
        forward + backward_reads + backward_writes)


def test_patch_embed_bytes_by_hand_and_as_the_suite_counts_them():
    # B=2, C=3, 32 x 32 px, p=16 -> 4 patches + 1 cls, D=8, bf16
    images, params, tokens = 2 * 3 * 32 * 32, 8 * 3 * 256 + 8 + 8 + 5 * 8, 2 * 5 * 8
    assert roofline.patch_embed_bytes(2, 3, 32, 16, 8, 1, "bfloat16", "fwd") == 2 * (images + params + tokens)
    assert roofline.patch_embed_bytes(2, 3, 32, 16, 8, 1, "bfloat16", "fwd+bwd") == 2 * 2 * (images + params + tokens)
    for mode in ("fwd", "fwd+bwd"):
        params = {"resolution": 224, "patch": 16, "in_chans": 3, "embed_dim": 768}
        p = Point("patch-embed", "eager", mode, 197, 8, 12, 64, "bfloat16", "cpu", params)
        assert roofline.cost(Record.from_point(p, status="ok", ms=1.0)).min_bytes == patch_embed.min_bytes(p)


def test_cost_uses_the_suites_flops():
    r = record("attention", "fwd+bwd", 197, 2, 12, 64, "bfloat16")
    assert roofline.cost(r) == roofline.Cost(3.5 * 4 * 2 * 12 * 197**2 * 64,
                                             roofline.attention_bytes(2, 12, 197, 197, 64, "bfloat16", "fwd+bwd"))
    r = record("mlp", "fwd", 197, 4, 12, 64, dim=768, hidden=3072)
    assert roofline.cost(r).flops == mlp.flops(Point("mlp", "eager", "fwd", 197, 4, 12, 64, "float32", "cpu",
                                                     {"dim": 768, "hidden": 3072})) == 4 * 788 * 768 * 3072
    assert roofline.cost(record("model", "fwd", 197, 1, 12, 64, model="vit", resolution=224)) is None
    assert roofline.cost(record("mlp", "fwd", 197, 1, 12, 64)) is None  # no dim / hidden: no floor


def test_floor_is_the_slower_of_compute_and_memory():
    ceilings = {"copy_gbps": 1000.0, "matmul_tflops": {"bfloat16": 100.0}}
    # 1 TFLOP at 100 TFLOP/s: 10 ms; 1 GB at 1000 GB/s: 1 ms
    assert roofline.floor(roofline.Cost(1e12, 10**9), ceilings, "bfloat16") == pytest.approx((10.0, "compute"))
    assert roofline.floor(roofline.Cost(1e9, 10**10), ceilings, "bfloat16") == pytest.approx((10.0, "memory"))
    assert roofline.floor(roofline.Cost(1e9, 10**9), ceilings, "float32") is None  # no fp32 matmul figure
    assert roofline.floor(roofline.Cost(1e9, 10**9), {"error": "x"}, "bfloat16") is None


def test_annotate_fills_ok_rows_of_the_op_suites_only():
    ceilings = {"copy_gbps": 1.0, "matmul_tflops": {"float32": 1e-3}}  # 1 GB/s, 1 GFLOP/s
    ok = record("attention", "fwd", 10, 1, 1, 10, ms=10.0)  # 4000 FLOPs: 4 us; 4*(400) B: 1.6 us
    failed = record("attention", "fwd", 20, 1, 1, 10, status="oom")
    model = record("model", "fwd", 197, 1, 12, 64, ms=5.0, flops=1e9)
    roofline.annotate([ok, failed, model], ceilings)
    assert ok.extra["flops"] == 4 * 10 * 10 * 10 and ok.extra["min_bytes"] == 4 * 4 * 10 * 10
    assert ok.extra["floor_bound"] == "compute" and ok.extra["floor_ms"] == pytest.approx(4e-3)
    assert ok.extra["pct_of_floor"] == pytest.approx(100 * 4e-3 / 10.0)
    assert "pct_of_floor" not in failed.extra and "pct_of_floor" not in model.extra
    assert model.extra["flops"] == 1e9  # the model suite's own column is left alone
    before = dict(ok.extra)
    roofline.annotate([ok], ceilings)  # idempotent
    assert ok.extra == before
    bare = record("attention", "fwd", 10, 1, 1, 10, ms=10.0)
    roofline.annotate([bare], None)  # no ceilings: the work, no floor
    assert bare.extra["flops"] == 4000 and "floor_ms" not in bare.extra


def test_ceilings_measured_on_this_cpu_are_json_ready():
    c = roofline.measure_ceilings("cpu", ["float32", "bfloat16"], threads=1)
    assert json.loads(json.dumps(c)) == c
    assert c["copy_gbps"] > 0.1 and c["copy_bytes"] >= 64 << 20
    assert set(c["matmul_tflops"]) == {"float32", "bfloat16"} and min(c["matmul_tflops"].values()) > 0
    assert c["threads"] == 1 and "copy_" in c["method"]
    # its work is bounded by fixed sizes and repetitions (under two seconds on an idle machine; its
    # wall time, elapsed_s, is the machine's load as much as the code's, so it is not asserted)
    low, high = roofline.CPU_COPY_BYTES
    assert low <= c["copy_bytes"] <= high and c["reps"] == roofline.REPS["cpu"]
    assert set(c["matmul_n"].values()) == {roofline.CPU_MATMUL_N} and c["elapsed_s"] > 0
    assert "Device ceilings: copy" in roofline.ceilings_line(c)
    assert c["l2_gbps"] is None and "L2" not in roofline.ceilings_line(c)  # a GPU's L2 only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ceilings_on_a_gpu_include_the_l2_copy_bandwidth():
    c = roofline.measure_ceilings("cuda", ["bfloat16"])
    assert json.loads(json.dumps(c)) == c
    assert c["l2_gbps"] > 0 and "L2 copy" in roofline.ceilings_line(c) and "CUDA graph" in c["method"]


def test_a_run_reports_percent_of_floor(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["mlp", "--device", "cpu", "--mode", "fwd", "--impls", "eager", "--seq-lens", "17", "--batch", "2",
            "--heads", "2", "--head-dim", "16", "--budget", "3", "--threads", "1", "--no-plots", "--no-progress",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "% floor" in printed and "Device ceilings: copy" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["ceilings"]["matmul_tflops"]["float32"] > 0
    (row,) = data["records"]
    assert row["status"] == "ok", row["note"]
    assert row["flops"] == 4 * 34 * 32 * 128 and row["min_bytes"] == roofline.mlp_bytes(34, 32, 128, "float32", "fwd")
    assert row["pct_of_floor"] == pytest.approx(100 * row["floor_ms"] / row["ms"]) and row["pct_of_floor"] > 0
    assert "| % floor |" in (out / "summary.md").read_text()
