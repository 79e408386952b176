"""Slope fits on synthetic data, and the slope table built from records."""

from __future__ import annotations

import dataclasses
import random

import pytest

from fastvit.benchmarks.records import Record
from fastvit.benchmarks.report import (
    SLOPE_HEADER,
    TABLE_HEADER,
    fit_slope,
    format_bytes,
    pytorch_speedups,
    slope_rows,
    slopes,
    table_rows,
    within_spread,
)

NS = [197, 577, 1025, 2305, 4097, 9217]


@pytest.mark.parametrize("power", [1.0, 1.5, 2.0])
def test_fit_recovers_the_power_of_a_noisy_power_law(power):
    rng = random.Random(0)
    ys = [3e-4 * n**power * rng.uniform(0.95, 1.05) for n in NS]
    fit = fit_slope(NS, ys)
    assert fit.slope == pytest.approx(power, abs=0.05)
    assert (fit.points, fit.n_min, fit.n_max) == (6, 197, 9217)


def test_fit_of_an_exact_power_law_is_exact():
    fit = fit_slope([10, 100, 1000], [7 * n**2 for n in (10, 100, 1000)])
    assert fit.slope == pytest.approx(2.0, abs=1e-12)
    assert fit.intercept == pytest.approx(__import__("math").log(7))


def test_fit_skips_missing_and_non_positive_values():
    fit = fit_slope([1, 2, 4, 8], [None, 0, 16, 64])
    assert fit.slope == pytest.approx(2.0) and fit.points == 2


@pytest.mark.parametrize("ns, ys", [([], []), ([5], [1.0]), ([5, 5], [1.0, 2.0]), ([1, 2], [None, 3.0])])
def test_fit_needs_two_distinct_sizes(ns, ys):
    assert fit_slope(ns, ys) is None


def record(impl, n, ms, mem, status="ok", mode="fwd"):
    return Record(
        "attention",
        impl,
        mode,
        n,
        1,
        12,
        64,
        "float32",
        "cpu",
        ms=ms,
        ms_p25=ms,
        ms_p75=ms,
        peak_mem_bytes=mem,
        status=status,
    )


def test_slopes_per_series_use_only_ok_points():
    records = [record("eager", n, 1e-6 * n**2, 48 * n**2) for n in NS[:4]]
    records += [record("eager", 9217, None, None, status="oom")]
    records += [record("flash", n, 1e-6 * n**2, 1000 * n) for n in NS]
    records += [record("flash", 197, 1.0, 10, mode="fwd+bwd")]  # one point: no fit
    fits = slopes(records)
    t, m = fits[("attention", "eager", "fwd", 1, 12, 64, "float32", None)]  # no model named: None
    assert t.slope == pytest.approx(2.0) and m.slope == pytest.approx(2.0) and m.points == 4
    t, m = fits[("attention", "flash", "fwd", 1, 12, 64, "float32", None)]
    assert m.slope == pytest.approx(1.0)
    assert fits[("attention", "flash", "fwd+bwd", 1, 12, 64, "float32", None)] == (None, None)
    rows = slope_rows(records)
    fixed = ["1", "12", "64", "float32"]  # B, H, D, dtype
    assert ["attention", "eager", "fwd", *fixed, "2.00", "2.00", "4", "197-2305"] in rows
    assert ["attention", "flash", "fwd+bwd", *fixed, "-", "-", "1", "197-197"] in rows


def test_two_models_of_one_shape_are_two_series_and_two_comparisons():
    # the mlp suite's ViT-B and EVA02-B rows share heads 12 and head dim 64: one series (slope 2.75
    # over repeated N, jumps in the plot) and compare matched 4 of 6 rows
    from fastvit.benchmarks.compare import compare

    records = [dataclasses.replace(record("eager", n, 1e-6 * n * k, 10 * n), extra={"model": model})
               for model, k in (("vit_b", 1.0), ("eva02_b", 3.0)) for n in NS[:3]]  # fmt: skip
    fits = slopes(records)
    assert {key[-1] for key in fits} == {"vit_b", "eva02_b"}
    assert all(t.slope == pytest.approx(1.0) and t.points == 3 for t, _ in fits.values())
    assert {row[1] for row in slope_rows(records)} == {"eager (vit_b)", "eager (eva02_b)"}
    matched, only_base, only_new = compare(records, records)
    assert len(matched) == 6 and not only_base and not only_new


def test_slope_rows_show_what_each_series_holds_fixed():
    """The mlp suite without --batch sizes each point by its token rows (batch = rows // N), so each
    width and batch is a one-point series: the rows must say which (B, H, D), not look alike."""
    records = [
        Record("mlp", "eager", "fwd", n, batch, heads, 64, "float32", "cpu", ms=1.0, extra={"model": model})
        for model, heads in (("vit_s", 6), ("vit_b", 12))
        for batch, n in ((4, 197), (1, 1025))
    ]
    rows = slope_rows(records)
    assert len({tuple(row) for row in rows}) == 4
    assert [row[SLOPE_HEADER.index("B"):SLOPE_HEADER.index("dtype") + 1] for row in rows] == [
        ["4", "6", "64", "float32"], ["1", "6", "64", "float32"], ["4", "12", "64", "float32"],
        ["1", "12", "64", "float32"],
    ]  # fmt: skip


def test_table_rows_and_bytes():
    rows = table_rows([record("sdpa[flash]", 197, 1.5, 3 << 20), record("eager", 9217, None, None, "oom")])
    assert rows[0][1:12] == ["sdpa[flash]", "fwd", "197", "1.5", "1.5-1.5", "-", "-", "-", "-", "3.0 MiB", "ok"]
    assert rows[1][4:12] == ["-", "-", "-", "-", "-", "-", "-", "oom"]
    assert format_bytes(512) == "512 B" and format_bytes(5 << 30) == "5.0 GiB"


def test_table_shows_the_roofline_floor_and_the_percentage_of_it():
    r = record("fastvit[triton]", 197, 2.0, 1 << 20)
    r.extra.update(floor_ms=0.5, pct_of_floor=25.0)
    row = table_rows([r])[0]
    assert row[TABLE_HEADER.index("floor ms")] == "0.5" and row[TABLE_HEADER.index("% floor")] == "25"


def test_each_fastvit_row_shows_its_speedup_over_the_best_pytorch_row():
    """issue 15: every suite's table compares each fastvit row with the fastest PyTorch row of the
    same run and shape (same variant: fastvit+bias against sdpa+bias)."""
    records = [
        record("eager", 197, 8.0, 1),
        record("sdpa[flash]", 197, 2.0, 1),
        record("sdpa[math]", 197, 4.0, 1),
        record("fastvit[triton]", 197, 1.0, 1),
        record("fastvit[triton]", 577, 3.0, 1),  # no PyTorch row at this N
        record("sdpa+bias", 197, 6.0, 1),
        record("fastvit+bias[triton]", 197, 3.0, 1),
        record("axial", 197, 0.5, 1),  # another model: never the baseline
        record("sdpa[cudnn]", 197, None, None, status="error"),  # failed rows are not baselines
    ]
    speedups = pytorch_speedups(records)
    assert speedups == [None, None, None, 2.0, None, None, 2.0, None, None]
    rows = table_rows(records)
    column = TABLE_HEADER.index("vs PyTorch")
    assert [row[column] for row in rows[3:5]] == ["2.00x", "-"]
    model = [Record("model", impl, "fwd", 197, 8, 12, 64, "bfloat16", "cuda", ms=ms, extra={"model": name})
             for impl, ms, name in (("timm", 10.0, "vit_b"), ("timm+fastvit", 8.0, "vit_b"),
                                    ("timm", 30.0, "vit_l"), ("timm+fastvit", 20.0, "vit_l"))]  # fmt: skip
    assert pytorch_speedups(model) == [None, 1.25, None, 1.5]


def test_a_speedup_inside_the_rows_spread_is_marked():
    # "vs PyTorch" read 1.05x where the two rows' middle halves of times overlap (a contended or noisy
    # run): the run does not tell them apart
    def timed(impl, ms, p25, p75):
        r = record(impl, 197, ms, 1)
        r.ms_p25, r.ms_p75 = p25, p75
        return r

    records = [timed("sdpa[flash]", 2.1, 2.0, 2.3), timed("fastvit[triton]", 2.0, 1.9, 2.05),
               timed("fastvit[torch]", 1.0, 0.9, 1.1), record("fastvit[cuda]", 197, 1.5, 1)]  # fmt: skip
    assert within_spread(records) == [False, True, False, False]  # (no spread: not marked)
    column = TABLE_HEADER.index("vs PyTorch")
    assert [row[column] for row in table_rows(records)] == ["-", "1.05x~", "2.10x", "1.40x"]
