"""The layernorm suite: its points and sizes, a quick CPU run (eager measured, fastvit-cuda unavailable
with its reason), its roofline bytes by hand, and its fastvit-cuda autograd Function against
F.layer_norm on the extension's CPU loops (forward and the x, weight and bias gradients)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastvit.benchmarks import cli, layernorm, roofline
from fastvit.benchmarks.progress import Progress
from fastvit.benchmarks.records import Point, Record
from tests.tolerance import ATOL, assert_close_to_reference


def args(**overrides):
    base = dict(
        device="cpu",
        dtype="float32",
        mode="both",
        seq_lens=None,
        batch=None,
        heads=None,
        head_dim=None,
        quick=False,
        budget=10.0,
        threads=1,
        impls=None,
        deadline=None,
    )
    return SimpleNamespace(**{**base, **overrides})


def shapes(pts):
    """(dim, batch, n_tokens, mode) of each point, in order."""
    return [(p.params["dim"], p.batch, p.n_tokens, p.mode) for p in pts]


# ---------------------------------------------------------------------------------------------
# which points
# ---------------------------------------------------------------------------------------------
def test_gpu_points_are_the_vit_widths_at_two_token_counts():
    pts = layernorm.points(args(device="cuda", dtype="bfloat16"), "eager")
    assert shapes(pts) == [
        (d, b, n, m) for d in (384, 768, 1024, 1280) for b, n in ((256, 197), (64, 1025)) for m in ("fwd", "fwd+bwd")
    ]  # 256 x 197 = 50432 rows, 64 x 1025 = 65600 rows: fewest rows first
    assert [p.params["model"] for p in pts[::4]] == ["vit_s", "vit_b", "vit_l", "vit_h"]
    assert {(p.heads, p.head_dim) for p in pts if p.params["dim"] == 1280} == {(16, 80)}
    assert {p.dtype for p in pts} == {"bfloat16"} and {p.suite for p in pts} == {"layernorm"}


def test_cpu_and_quick_points_are_small():
    assert shapes(layernorm.points(args(), "eager")) == [(d, 4, 197, m) for d in (384, 768) for m in ("fwd", "fwd+bwd")]
    for device in ("cpu", "cuda"):  # --quick: ViT-B at one size
        pts = layernorm.points(args(device=device, quick=True, mode="fwd"), "eager")
        assert len(pts) == 1 and pts[0].params == {"model": "vit_b", "dim": 768} and pts[0].mode == "fwd"


def test_command_line_sizes_are_honoured():
    pts = layernorm.points(args(heads=2, head_dim=16, seq_lens=[26, 17], batch=3, mode="fwd+bwd"), "eager")
    assert shapes(pts) == [(32, 3, 17, "fwd+bwd"), (32, 3, 26, "fwd+bwd")]
    assert pts[0].params["model"] == "D=32"
    # --seq-lens without --batch: about the default number of token rows per point
    pts = layernorm.points(args(seq_lens=[197, 577], mode="fwd"), "eager")
    assert [(p.batch, p.n_tokens) for p in pts[:2]] == [(1, 577), (4, 197)]
    # --batch alone keeps the default token counts
    assert {(p.batch, p.n_tokens) for p in layernorm.points(args(batch=2), "eager")} == {(2, 197)}


def test_the_suite_is_registered_and_weighted():
    assert cli.SUITES["layernorm"] == "layernorm" and "layernorm" in cli.parse_args(["all"]).suites
    assert cli.WEIGHTS["layernorm"] == cli.WEIGHTS["patch-embed"] < cli.WEIGHTS["attention"]
    assert roofline.SUITES["layernorm"] == "layernorm"


def test_an_implementation_the_suite_lacks_is_skipped():
    """The suite runs the --impls names it has (the command line refuses names no suite run has)."""
    assert layernorm.run(args(impls=["fastvit-triton"]), Progress(enabled=False)) == []


# ---------------------------------------------------------------------------------------------
# a quick run
# ---------------------------------------------------------------------------------------------
def test_quick_cpu_run_measures_eager_and_reports_fastvit_cuda_unavailable():
    a = args(heads=2, head_dim=16, seq_lens=[17], batch=2, impls=["fastvit-cuda", "eager"], budget=5.0)
    records = layernorm.run(a, Progress(enabled=False))
    # sorted so that each implementation's fwd row sits above its fwd+bwd row (the reader subtracts)
    assert [(r.impl, r.mode) for r in records] == [
        ("fastvit-cuda", "fwd"), ("fastvit-cuda", "fwd+bwd"), ("eager", "fwd"), ("eager", "fwd+bwd")
    ]  # fmt: skip
    for r in records[2:]:
        assert r.status == "ok", (r.mode, r.note)
        assert r.ms > 0 and r.peak_mem_bytes is not None and r.extra["dim"] == 32
        point = Point(r.suite, "eager", r.mode, 17, 2, 2, 16, "float32", "cpu", {"dim": 32})
        assert r.tflops == pytest.approx(layernorm.flops(point) / (r.ms * 1e-3) / 1e12)
    for r in records[:2]:
        assert r.status == "unavailable" and r.ms is None
        assert "test path" in r.note  # on a CPU the extension's loops are not timed, and the row says why
    roofline.annotate(records, {"copy_gbps": 10.0, "matmul_tflops": {"float32": 0.1}})
    assert records[2].extra["min_bytes"] == roofline.layernorm_bytes(34, 32, "float32", "fwd")
    assert records[3].extra["floor_bound"] == "memory" and records[3].extra["pct_of_floor"] > 0
    assert "pct_of_floor" not in records[0].extra


# ---------------------------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------------------------
def test_layernorm_bytes_by_hand():
    # T=10 rows, D=4, fp16 (2 bytes): x read and y written (40 elements each), weight and bias read (8)
    assert roofline.layernorm_bytes(10, 4, "float16", "fwd") == 2 * (40 + 8 + 40)
    stats = 2 * 4 * 10  # mean and rstd, fp32: written by the forward, read by the backward
    backward_reads = 2 * (40 + 40 + 4)  # dy, x again, weight
    backward_writes = 2 * (40 + 4 + 4)  # dx, dweight, dbias
    total = 2 * (40 + 8 + 40) + stats + backward_reads + stats + backward_writes
    assert roofline.layernorm_bytes(10, 4, "float16", "fwd+bwd") == total == 600


def test_cost_of_a_layernorm_record():
    p = Point("layernorm", "eager", "fwd+bwd", 197, 4, 12, 64, "bfloat16", "cpu", {"model": "vit_b", "dim": 768})
    c = roofline.cost(Record.from_point(p, status="ok", ms=1.0))
    assert c == roofline.Cost(21.0 * 788 * 768, roofline.layernorm_bytes(788, 768, "bfloat16", "fwd+bwd"))
    assert layernorm.flops(Point("layernorm", "eager", "fwd", 197, 4, 12, 64, "bfloat16", "cpu", {"dim": 768})) == (
        8.0 * 788 * 768
    )
    bare = Point("layernorm", "eager", "fwd", 197, 4, 12, 64, "bfloat16", "cpu", {})
    assert roofline.cost(Record.from_point(bare, status="ok", ms=1.0)) is None  # no dim: no floor


# ---------------------------------------------------------------------------------------------
# the fastvit-cuda Function on the extension's CPU loops
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def extension_loaded():
    from fastvit import extension

    if not extension.load(build=True):
        reason = extension.unavailable_reason() or ""
        if reason.startswith("no C++ compiler"):
            pytest.skip(reason)
        pytest.fail(f"the extension did not build: {reason}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_kind", ["random", "sum"])
def test_cuda_layer_norm_function_matches_f_layer_norm(extension_loaded, dtype, grad_kind):
    gen = torch.Generator().manual_seed(7)
    b, n, d = 3, 7, 47  # 21 rows; D prime: not a multiple of any vector width
    # a view into wider rows (row stride d + 5), non-zero mean so that centring matters
    x = (torch.randn(b, n, d + 5, generator=gen) * 2 + 3).to(dtype)[..., :d]
    w = (1 + 0.3 * torch.randn(d, generator=gen)).to(dtype)
    bias = (0.3 * torch.randn(d, generator=gen)).to(dtype)
    g = torch.randn(b, n, d, generator=gen).to(dtype)

    def run(fn, *tensors):
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        y = fn(*leaves)
        # "sum": out.sum()'s gradient reaches the backward expanded, strides (0, 0, 0)
        loss = y.sum() if grad_kind == "sum" else (y * g.to(y.dtype)).sum()
        return (y, *torch.autograd.grad(loss, leaves))

    got = run(layernorm.cuda_layer_norm, x, w, bias)
    oracle = run(layernorm.eager_layer_norm, x.double(), w.double(), bias.double())
    lowp = run(layernorm.eager_layer_norm, x, w, bias)
    for name, have, want, low in zip(("y", "dx", "dweight", "dbias"), got, oracle, lowp, strict=True):
        assert have.dtype == dtype and have.shape == want.shape
        # dweight / dbias sum 21 rows of products: the slack grows with the row count
        atol = None if name in ("y", "dx") else ATOL[dtype] * math.sqrt(b * n) * max(1.0, want.abs().max().item())
        assert_close_to_reference(have, want, low, name=name, dtype=dtype, atol=atol)
    if dtype == torch.float32:  # and the same numbers as PyTorch's own kernel, to fp32 rounding
        for name, have, want in zip(("y", "dx", "dweight", "dbias"), got, lowp, strict=True):
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5, msg=name)


def test_cuda_layer_norm_function_computes_only_the_gradients_asked_for(extension_loaded):
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, bias = 1 + 0.1 * torch.randn(16), 0.1 * torch.randn(16)  # constants: no dweight, no dbias
    (dx,) = torch.autograd.grad(layernorm.cuda_layer_norm(x, w, bias).square().sum(), x)
    (want,) = torch.autograd.grad(F.layer_norm(x, (16,), w, bias, layernorm.EPS).square().sum(), x)
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_(True)
    y = layernorm.cuda_layer_norm(x.detach(), wg, bias)
    (dw,) = torch.autograd.grad(y.square().sum(), wg)
    xd = x.detach()
    (want_dw,) = torch.autograd.grad(F.layer_norm(xd, (16,), wg, bias, layernorm.EPS).square().sum(), wg)
    torch.testing.assert_close(dw, want_dw, rtol=1e-5, atol=1e-5)
