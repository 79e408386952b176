"""The output folder: results.json's schema, results.csv with the same rows, summary and plots."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from fastvit.benchmarks.output import load_results, meta, write_results
from fastvit.benchmarks.records import KEY_FIELDS, MODES, RECORD_FIELDS, STATUSES, Point, Record

META_KEYS = {"device", "device_name", "driver", "torch", "triton", "fastvit", "date", "command"}


def records() -> list[Record]:
    out = []
    for impl, mem_power in (("eager", 2), ("fastvit[torch]", 1)):
        for mode in MODES:
            for n in (197, 577, 1025):
                p = Point("attention", impl, mode, n, 1, 12, 64, "float32", "cpu")
                out.append(
                    Record.from_point(
                        p,
                        status="ok",
                        ms=n / 100,
                        ms_p25=n / 110,
                        ms_p75=n / 90,
                        tflops=0.1,
                        peak_mem_bytes=n**mem_power,
                        extra={"reps": 5},
                    )
                )
    p = Point("attention", "axial", "fwd", 197, 1, 12, 64, "float32", "cpu", {"grid": "14x14"})
    out.append(Record.from_point(p, status="error", note="ValueError: boom, with a comma"))
    p = Point("attention", "flash-attn", "fwd", 197, 1, 12, 64, "float32", "cpu")
    out.append(Record.from_point(p, status="unavailable", note="flash-attn is not installed"))
    return out


def validate_results_json(data: dict) -> None:
    """The schema of issue 5: meta + records with at least RECORD_FIELDS, valid status and mode."""
    assert set(data) == {"meta", "records"}
    assert set(data["meta"]) >= META_KEYS
    for row in data["records"]:
        assert set(RECORD_FIELDS) <= set(row), set(RECORD_FIELDS) - set(row)
        assert row["status"] in STATUSES and row["mode"] in MODES
        assert isinstance(row["n_tokens"], int) and isinstance(row["note"], str)
        if row["status"] == "ok":
            assert row["ms_p25"] <= row["ms"] <= row["ms_p75"]
        else:
            assert row["ms"] is None


def test_results_json_csv_summary_and_plots(tmp_path):
    recs = records()
    files = write_results(tmp_path / "out", recs, meta("cpu", ["prog", "attention", "--quick"]))
    names = sorted(f.name for f in files)
    assert names == ["attention-fwd.png", "attention-fwd_bwd.png", "results.csv", "results.json", "summary.md"]
    for f in files:
        assert f.stat().st_size > 0
    assert (tmp_path / "out" / "attention-fwd.png").read_bytes()[:4] == b"\x89PNG"

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    validate_results_json(data)
    assert data["meta"]["command"] == "python -m benchmarks attention --quick"
    assert data["records"][0]["reps"] == 5 and data["records"][-2]["grid"] == "14x14"

    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["records"])
    assert list(rows[0])[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
    for row, rec in zip(rows, data["records"], strict=True):
        assert [row[k] for k in KEY_FIELDS] == [str(rec[k]) for k in KEY_FIELDS]
        assert row["ms"] == ("" if rec["ms"] is None else str(rec["ms"]))
        assert row["note"] == rec["note"]

    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| attention | eager | fwd | 1 | 12 | 64 | float32 | 1.00 | 2.00 | 3 | 197-1025 |" in summary
    assert "![attention-fwd](attention-fwd.png)" in summary


def test_load_results_round_trip(tmp_path):
    recs = records()
    write_results(tmp_path, recs, meta("cpu", ["prog"]), plots=False)
    run_meta, loaded = load_results(tmp_path / "results.json")
    assert run_meta["device"] == "cpu"
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in recs]
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match=r"not a fastvit results\.json"):
        load_results(tmp_path / "bad.json")


def test_record_validation():
    p = Point("attention", "eager", "fwd", 197, 1, 12, 64, "float32", "cpu")
    with pytest.raises(ValueError, match="status"):
        Record.from_point(p, status="crashed")
    with pytest.raises(ValueError, match="mode"):
        Point("attention", "eager", "bwd", 197, 1, 12, 64, "float32", "cpu")


CEILINGS = {"device": "cpu", "copy_gbps": 10.0, "matmul_tflops": {"float32": 0.1}, "threads": 1, "method": "canned"}


def test_roofline_columns_and_ceilings_in_the_outputs(tmp_path):
    write_results(tmp_path, records(), meta("cpu", ["prog"], ceilings=CEILINGS), plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["ceilings"] == CEILINGS
    first = data["records"][0]  # eager fwd, B=1, H=12, N=197, D=64, fp32: 1.97 ms
    flops = 4 * 12 * 197**2 * 64  # 119 MFLOP at 0.1 TFLOP/s: 1.19 ms
    assert first["flops"] == flops and first["min_bytes"] == 4 * 12 * 4 * 197 * 64  # q, k, v, o: 0.24 ms at 10 GB/s
    assert first["floor_bound"] == "compute" and first["floor_ms"] == pytest.approx(flops / 0.1e12 * 1e3)
    assert first["pct_of_floor"] == pytest.approx(100 * first["floor_ms"] / 1.97)
    assert all("pct_of_floor" not in row for row in data["records"] if row["status"] != "ok")
    with open(tmp_path / "results.csv", newline="") as f:
        assert "pct_of_floor" in next(csv.reader(f))
    summary = (tmp_path / "summary.md").read_text()
    assert "Device ceilings: copy 10 GB/s (read + write), matmul float32 0.1 TFLOP/s" in summary
    assert "| % floor |" in summary and f"| {first['pct_of_floor']:.3g} |" in summary


def test_summary_says_when_there_are_no_ceilings(tmp_path):
    write_results(tmp_path, records(), meta("cpu", ["prog"], ceilings={"error": "TimeoutError: slow"}), plots=False)
    assert "could not be measured (TimeoutError: slow)" in (tmp_path / "summary.md").read_text()
    assert "pct_of_floor" not in json.loads((tmp_path / "results.json").read_text())["records"][0]


def test_summary_says_how_calls_were_timed(tmp_path):
    from fastvit.benchmarks.output import timing_line

    cpu = meta("cpu", ["prog"])
    eager_gpu = {**cpu, "device": "cuda", "settings": {"policy": {"cuda_graph": False}}}
    graphed_gpu = {**cpu, "device": "cuda", "settings": {"policy": {"cuda_graph": True}}}
    assert "perf_counter" in timing_line(cpu)
    assert "eager calls" in timing_line(eager_gpu) and "host sets the pace" in timing_line(eager_gpu)
    assert "replays of CUDA graphs" in timing_line(graphed_gpu)
    write_results(tmp_path, records(), graphed_gpu, plots=False)
    assert timing_line(graphed_gpu) in (tmp_path / "summary.md").read_text()


def test_a_run_replaces_the_plots_of_an_earlier_run_in_its_folder(tmp_path, capsys):
    """A second run into one --out folder left the first run's figures beside its results.json: the
    plots a write does not replace are removed, those of the harness's naming only."""
    earlier = ["attention-fwd.png", "attention-fwd_bwd.png", "mlp-fwd.png", "patch-embed-fwd_bwd.png"]
    theirs = ["diagram-fwd.png", "attention.png", "attention-fwd.svg", "notes.md"]  # not the harness's plots
    for name in earlier + theirs:
        (tmp_path / name).write_bytes(b"earlier")
    fwd_only = [r for r in records() if r.mode == "fwd"]
    files = write_results(tmp_path, fwd_only, meta("cpu", ["prog", "attention", "--mode", "fwd"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["attention-fwd.png", "results.csv", "results.json", "summary.md", *theirs]
    )
    assert (tmp_path / "attention-fwd.png").read_bytes()[:4] == b"\x89PNG"  # this run's figure
    assert "attention-fwd_bwd.png" in capsys.readouterr().err  # the removal is said
    assert "attention-fwd_bwd" not in (tmp_path / "summary.md").read_text()
    # a run without plots (--no-plots, or the writes during a run) leaves none of an earlier run
    write_results(tmp_path, fwd_only, meta("cpu", ["prog"]), plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["results.csv", "results.json", "summary.md", *theirs])
    assert [p.name for p in files if p.suffix == ".png"] == ["attention-fwd.png"]


def test_without_matplotlib_the_plots_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    files = write_results(tmp_path, records(), meta("cpu", ["prog"]))
    assert sorted(f.name for f in files) == ["results.csv", "results.json", "summary.md"]
    assert "plots skipped" in capsys.readouterr().err


def test_summary_and_meta_say_what_became_of_each_suite(tmp_path):
    status = {
        "attention": {"status": "completed", "note": ""},
        "mlp": {"status": "failed", "note": "ValueError: boom"},
        "model": {"status": "not-run", "note": "the run ended before this suite started"},
    }
    write_results(tmp_path, records(), meta("cpu", ["prog"], suite_status=status), plots=False)
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["suite_status"] == status
    summary = (tmp_path / "summary.md").read_text()
    assert "| attention | completed | 14 |  |" in summary and "| mlp | failed | 0 | ValueError: boom |" in summary
    assert "`failed`: raised an error" in summary
    write_results(tmp_path, records(), meta("cpu", ["prog"]), plots=False)  # a meta without it (older runs)
    assert "## Suites" not in (tmp_path / "summary.md").read_text()
