"""``compare``: rows matched on the key fields, BASE.ms / NEW.ms (above 1 = NEW faster)."""

from __future__ import annotations

import pytest

from fastvit.benchmarks.compare import compare, main
from fastvit.benchmarks.output import meta, write_results
from fastvit.benchmarks.records import Record


def rec(impl, n, ms, status="ok", dtype="float32"):
    return Record("attention", impl, "fwd", n, 1, 12, 64, dtype, "cpu", ms=ms, ms_p25=ms, ms_p75=ms, status=status)


BASE = [rec("eager", 197, 4.0), rec("eager", 577, 30.0), rec("eager", 1025, 90.0, "ok"), rec("axial", 197, 1.0)]
NEW = [
    rec("eager", 577, 15.0),
    rec("eager", 197, 8.0),
    rec("eager", 1025, None, "oom"),
    rec("eager", 197, 1.0, dtype="bfloat16"),
]


def test_rows_match_on_the_key_fields():
    matched, only_base, only_new = compare(BASE, NEW)
    assert [(c.key[1], c.key[3], c.speedup) for c in matched] == [
        ("eager", 197, pytest.approx(0.5)),  # NEW slower
        ("eager", 577, pytest.approx(2.0)),  # NEW faster
        ("eager", 1025, None),  # NEW ran out of memory: no ratio
    ]
    assert [r.impl for r in only_base] == ["axial"]
    assert [(r.impl, r.dtype) for r in only_new] == [("eager", "bfloat16")]


def test_compare_command(tmp_path, capsys):
    write_results(tmp_path / "base", BASE, meta("cpu", ["p"]), plots=False)
    write_results(tmp_path / "new", NEW, meta("cpu", ["p"]), plots=False)
    assert main([str(tmp_path / "base" / "results.json"), str(tmp_path / "new" / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "2.000" in out and "0.500" in out and "oom" in out
    assert "1.000" in out  # geometric mean of 0.5 and 2.0
    assert "1 rows only in BASE: axial fwd N=197" in out


def test_compare_says_when_the_runs_timed_differently(tmp_path, capsys):
    # an eager GPU run against a CUDA-graph one measures host overhead, not a kernel change
    cpu = meta("cpu", ["p"])
    write_results(tmp_path / "base", BASE, {**cpu, "device": "cuda"}, plots=False)
    write_results(tmp_path / "new", NEW, {**cpu, "device": "cuda", "settings": {"policy": {"cuda_graph": True}}},
                  plots=False)
    main([str(tmp_path / "base" / "results.json"), str(tmp_path / "new" / "results.json")])
    out = capsys.readouterr().out
    assert "timed their calls differently" in out and "eager calls" in out and "CUDA graphs" in out
    main([str(tmp_path / "base" / "results.json"), str(tmp_path / "base" / "results.json")])
    assert "differently" not in capsys.readouterr().out


def test_compare_notes_the_suites_a_run_did_not_complete(tmp_path, capsys):
    status = {"attention": {"status": "completed", "note": ""}, "mlp": {"status": "failed", "note": "ValueError: boom"}}
    write_results(tmp_path / "base", BASE, meta("cpu", ["p"]), plots=False)  # an older run: no suite_status
    write_results(tmp_path / "new", NEW, meta("cpu", ["p"], suite_status=status), plots=False)
    assert main([str(tmp_path / "base"), str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "note: NEW suite mlp: failed (ValueError: boom)" in out and "suite attention" not in out


def test_compare_reads_a_run_folder_and_says_in_one_line_what_it_cannot_read(tmp_path, capsys):
    """A missing file, a file that is not results.json or a folder without one gave a traceback."""
    run = tmp_path / "run"
    write_results(run, BASE, meta("cpu", ["p"]), plots=False)
    assert main([str(run), str(run / "results.json")]) == 0
    for bad in (tmp_path / "missing.json", run / "summary.md", tmp_path):
        with pytest.raises(SystemExit):
            main([str(bad), str(run)])
        assert "cannot read a fastvit results.json" in capsys.readouterr().err
