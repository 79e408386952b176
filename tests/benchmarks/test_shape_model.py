"""The shape model (benchmarks/shape_model.py) on shapes whose answer is worked out by hand,
including issue 15's: at N = 197 the forward's 128 x 64 tiles do 59% useful work, a 16-key tail 73%."""

from __future__ import annotations

import math

import pytest

from fastvit.benchmarks.shape_model import attention_forward, padded_fraction, predicted_s, waves


def test_padded_fraction_at_vit_lengths():
    # 197 = ViT-B/16 at 224 (cls + 14 * 14): queries pad to 256 (128 blocks), keys to 256 (64 blocks)
    assert padded_fraction(197, 197, 128, 64) == pytest.approx(197 * 197 / (256 * 256))  # 0.59
    # a 16-key tail: the last key block holds 5 keys, padded to 16: 192 + 16 = 208
    assert padded_fraction(197, 197, 128, 64, key_tail=16) == pytest.approx(197 * 197 / (256 * 208))  # 0.73
    assert round(padded_fraction(197, 197, 128, 64), 2) == 0.59
    assert round(padded_fraction(197, 197, 128, 64, key_tail=16), 2) == 0.73
    # the kernel takes ONE short step: more keys left than the tail holds take a whole block
    # (785 = DINOv2's 28 * 28 + 1: 17 keys past 768 fit a 32-key tail; with a 16-key one: a 64-key block)
    assert padded_fraction(785, 785, 128, 64, key_tail=32) == pytest.approx(785 * 785 / (896 * 800))
    assert padded_fraction(785, 785, 128, 64, key_tail=16) == padded_fraction(785, 785, 128, 64)
    assert padded_fraction(256, 1024, 128, 64) == 1.0  # whole tiles
    assert padded_fraction(0, 5, 128, 64) == 1.0  # nothing to compute, nothing wasted


def test_waves_and_their_efficiency():
    # 132 SMs x 2 CTAs = 264 slots: 264 programs are one full wave, 265 two waves, the second of one
    assert waves(264, 90, 2) == (1.0, 1.0)
    count, eff = waves(265, 90, 2)
    assert count == pytest.approx(265 / 264) and eff == pytest.approx(265 / 264 / 2)
    assert waves(54, 80, 1) == (0.5, 0.5)  # half of A100's 108 SMs idle


def test_attention_forward_prediction():
    # ViT-B training batch: B = 64, H = 12, N = 197, on sm_90 with 2 CTAs/SM and an issue ratio of 1.25
    model = attention_forward(64, 12, 197, 197, 128, 64, arch=90, ctas_per_sm=2, loop_issue_ratio=1.25)
    programs = 2 * 64 * 12  # 1536 programs over 264 slots: 5.8 waves
    assert model.waves == pytest.approx(programs / 264)
    assert model.wave_efficiency == pytest.approx(programs / 264 / 6)
    assert model.loop_efficiency == pytest.approx(0.8)
    expected = 197 * 197 / 256**2 * (programs / 264 / 6) * 0.8
    assert model.efficiency == pytest.approx(expected)
    assert model.predicted_s(1e-3) == pytest.approx(1e-3 / expected)
    # no MMA loop (fp32): nothing to overlap; a loop under 1 costs nothing from two programs per SM on
    assert attention_forward(1, 1, 128, 64, 128, 64, 90, 1, None).loop_efficiency == 1.0
    assert attention_forward(1, 1, 128, 64, 128, 64, 90, 2, 0.5).loop_efficiency == 1.0
    # the special-function units bound it too: an exp2 per score at D = 32 is a MUFU ratio of ~2
    assert attention_forward(1, 1, 128, 64, 128, 64, 90, 2, 0.5, loop_mufu_ratio=2.0).loop_efficiency == 0.5
    assert predicted_s(1.0, 0.0) == math.inf


def test_one_program_per_sm_runs_its_mma_and_its_other_work_in_turn():
    """Calibrated on an H200 (bf16, N=4097): the D=128 forward at 1 CTA/SM and r = 0.72 ran at 311
    TFLOP/s of a 673 peak, 2.0x the old min(1, 1/r) model, 1.18x this one."""
    from fastvit.benchmarks.shape_model import loop_efficiency

    assert loop_efficiency(0.72, 0.53, 1) == pytest.approx(1 / 1.72)
    assert loop_efficiency(0.5, None, 1) == pytest.approx(1 / 1.5)
    assert loop_efficiency(1.14, 0.53, 2) == pytest.approx(1 / 1.14)  # issue-bound across 2 programs
    assert loop_efficiency(0.885, 0.5, 3) == 1.0
    assert loop_efficiency(0.9, None, 2) == 1.0  # the other program fills each one's softmax


def test_the_l2_term_needs_a_measured_bandwidth():
    """64-row query blocks read K and V twice as often per FLOP as 128-row ones."""
    plain = attention_forward(2, 12, 4097, 4097, 64, 128, 90, 3, 0.885)
    assert plain.l2_efficiency == 1.0  # no measured L2 bandwidth: no cap
    # 673 TFLOP/s x 2 bytes / (2 x 64 rows) = 10.5 TB/s of K/V reads; an L2 of 7 TB/s caps it at 2/3
    capped = attention_forward(2, 12, 4097, 4097, 64, 128, 90, 3, 0.885, l2_gbps=7010.0, peak_tflops=673.0)
    assert capped.l2_efficiency == pytest.approx(7010 / 10515.625)
    wide = attention_forward(2, 12, 4097, 4097, 128, 64, 90, 2, 1.14, l2_gbps=7010.0, peak_tflops=673.0)
    assert wide.l2_efficiency == 1.0  # 5.3 TB/s needed


# ---------------------------------------------------------------------------------------------
# beside a run's measured rows
# ---------------------------------------------------------------------------------------------
def _fwd_record(n, ms, floor_ms, impl="fastvit[triton]", mode="fwd"):
    from fastvit.benchmarks.records import Record

    return Record("attention", impl, mode, n, 4, 12, 64, "bfloat16", "cuda", ms=ms, status="ok",
                  extra={"floor_ms": floor_ms})  # fmt: skip


FIGURES = {
    # the plain forward row the model reads, and rows it must not pick (a mask, another dtype or D)
    "sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=64 BM=128 BN=64 w=8 s=3]":
        {"ctas_per_sm": 2, "loop_issue_ratio": 1.25},
    "sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=64 mask=bool BM=128 BN=32 w=8 s=2]":
        {"ctas_per_sm": 1, "loop_issue_ratio": 9.0},
    "sm_90 flash_attention.flash_attention_fwd_kernel [fp16 D=64 BM=64 BN=64 w=4 s=3]": {"ctas_per_sm": 3},
    "sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=128 BM=128 BN=64 w=8 s=2]": {"ctas_per_sm": 1},
}


def test_attention_rows_put_the_model_beside_the_measurement():
    from fastvit.benchmarks.shape_model import SHAPE_MODEL_HEADER, attention_forward_rows

    records = [
        _fwd_record(197, ms=0.3, floor_ms=0.001),
        _fwd_record(197, ms=0.1, floor_ms=0.001, impl="sdpa[flash]"),  # not fastvit: no model
        _fwd_record(197, ms=1.0, floor_ms=0.003, mode="fwd+bwd"),  # the backward: not modelled
        _fwd_record(197, ms=0.3, floor_ms=None),  # no floor (no ceilings measured): no model
        _fwd_record(197, ms=0.1, floor_ms=0.001, impl="fastvit[torch]"),  # SDPA ran (a tuning table's pick): no model
    ]
    rows = attention_forward_rows(records, FIGURES, arch=90)
    assert len(rows) == 1
    row = dict(zip(SHAPE_MODEL_HEADER, rows[0], strict=True))
    # 128 x 64 tiles at N = 197: 0.59 useful; 2 * 48 programs on 132 x 2 slots; issue 1 / 1.25
    expected = attention_forward(4, 12, 197, 197, 128, 64, 90, 2, 1.25)
    assert row["useful"] == "0.59" and row["loop eff"] == "0.80"
    assert float(row["model ms"]) == pytest.approx(expected.predicted_s(1e-6) * 1e3, rel=1e-2)
    assert float(row["ms / model"]) == pytest.approx(0.3 / (expected.predicted_s(1e-6) * 1e3), rel=1e-2)
    assert attention_forward_rows(records, FIGURES, arch=None) == []  # not a GPU run


def test_the_masked_rows_read_the_masked_configurations():
    """fastvit+bias reads the report's float-bias forward, fastvit+rel_pos the selection-matrix dots
    with its grid's padded bins (the gathers past 64 bins); a variant the report lacks gets no row."""
    from fastvit.benchmarks.shape_model import SHAPE_MODEL_HEADER, attention_forward_rows

    prefix = "sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=64 "
    tiles = " BM=128 BN=64 tail=32 w=8 s=2]"
    figures = {
        **FIGURES,
        prefix + "bias=fp32" + tiles: {"ctas_per_sm": 1, "loop_issue_ratio": 1.5},
        prefix + "rel_pos mma k=16" + tiles: {"ctas_per_sm": 2, "loop_issue_ratio": 1.25},
        prefix + "rel_pos mma k=64" + tiles: {"ctas_per_sm": 1, "loop_issue_ratio": 1.0},
    }
    bias = _fwd_record(197, ms=0.3, floor_ms=0.001, impl="fastvit+bias[triton]")
    windows = _fwd_record(196, ms=0.3, floor_ms=0.001, impl="fastvit+rel_pos[triton]")
    windows.extra["grid"] = "14x14"
    sam_global = _fwd_record(4096, ms=3.0, floor_ms=0.1, impl="fastvit+rel_pos[triton]")
    sam_global.extra["grid"] = "64x64"
    wider = _fwd_record(9216, ms=9.0, floor_ms=1.0, impl="fastvit+rel_pos[triton]")
    wider.extra["grid"] = "96x96"  # past 64 bins: the gathers, absent from these figures
    rows = [dict(zip(SHAPE_MODEL_HEADER, row, strict=True))
            for row in attention_forward_rows([bias, windows, sam_global, wider], figures, arch=90)]  # fmt: skip
    assert [(r["impl"], r["N"], r["loop eff"]) for r in rows] == [
        ("fastvit+bias[triton]", "197", f"{1 / 2.5:.2f}"), ("fastvit+rel_pos[triton]", "196", f"{1 / 1.25:.2f}"),
        ("fastvit+rel_pos[triton]", "4096", "0.50")]  # fmt: skip


def test_the_key_tail_is_read_from_the_configuration_label(monkeypatch):
    figures = {"sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=64 BM=128 BN=64 tail=32 w=8 s=3]":
               {"ctas_per_sm": 2, "loop_issue_ratio": 1.0}}  # fmt: skip
    from fastvit.benchmarks.shape_model import SHAPE_MODEL_HEADER, attention_forward_rows

    row = dict(zip(SHAPE_MODEL_HEADER, attention_forward_rows([_fwd_record(197, ms=0.3, floor_ms=0.001)], figures,
                                                             arch=90)[0], strict=True))  # fmt: skip
    assert row["useful"] == f"{197 * 197 / (256 * 224):.2f}" == "0.68"  # keys: 192 + one 32-key step
    # Hopper's tensor-descriptor tiles stand for the run only where FASTVIT_TMA=1 asked for them
    figures["sm_90 flash_attention.flash_attention_fwd_kernel [bf16 D=64 tma BM=64 BN=128 tail=32 w=4 s=2]"] = {
        "ctas_per_sm": 3, "loop_issue_ratio": 0.5}

    def model_row():
        return dict(zip(SHAPE_MODEL_HEADER, attention_forward_rows([_fwd_record(197, ms=0.3, floor_ms=0.001)],
                                                                   figures, arch=90)[0], strict=True))  # fmt: skip

    monkeypatch.delenv("FASTVIT_TMA", raising=False)
    assert model_row()["useful"] == "0.68" and model_row()["loop eff"] == "1.00"
    monkeypatch.setenv("FASTVIT_TMA", "1")
    row = model_row()
    assert row["useful"] == f"{197 * 197 / (256 * 256):.2f}" and row["loop eff"] == "1.00"  # 128 + 69 keys: 2 blocks


def test_the_architecture_of_a_run():
    from fastvit.benchmarks.shape_model import arch_of_name, run_arch

    assert arch_of_name("NVIDIA H200") == arch_of_name("NVIDIA H100 80GB HBM3") == 90
    assert arch_of_name("NVIDIA A100-SXM4-80GB") == 80 and arch_of_name("NVIDIA L40S") == 89
    assert arch_of_name("Some CPU") is None
    assert run_arch({"device": "cuda", "arch": 86, "device_name": "NVIDIA H200"}) == 86  # recorded wins
    assert run_arch({"device": "cuda", "device_name": "NVIDIA H200"}) == 90  # older runs: from the name
    assert run_arch({"device": "cpu", "device_name": "x86_64"}) is None


def test_the_command_on_a_gpu_run(tmp_path, capsys):
    """`python -m benchmarks shape-model RESULTS.json` on a run file; the summary gets the same table."""
    import json

    from fastvit.benchmarks import cli
    from fastvit.benchmarks.output import _shape_model_section

    run_meta = {"device": "cuda", "device_name": "NVIDIA H200", "triton": "3.8.0"}
    records = [_fwd_record(2305, ms=0.339, floor_ms=0.0972)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"meta": run_meta, "records": [r.to_dict() for r in records]}))
    assert cli.main(["shape-model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 2305 | 4 x 12 | 64 | 0.339 |" in out
    section = "\n".join(_shape_model_section(records, run_meta))
    assert "## Shape model" in section and "| 2305 | 4 x 12 | 64 | 0.339 |" in section
    assert _shape_model_section(records, {**run_meta, "device": "cpu"}) == []


def test_the_command_says_in_one_line_what_it_cannot_read(tmp_path, capsys):
    """A missing file, a file that is not a results.json or a folder ended in a traceback
    (FileNotFoundError, JSONDecodeError, IsADirectoryError); now a one-line error, exit code 2,
    as ``compare`` gives."""
    from fastvit.benchmarks import cli

    summary = tmp_path / "summary.md"
    summary.write_text("# not a results.json\n")
    for bad in (tmp_path / "missing.json", summary, tmp_path):
        with pytest.raises(SystemExit) as exc:
            cli.main(["shape-model", str(bad)])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("python -m benchmarks shape-model: error: ") and str(bad) in err[-1]
        assert "cannot read a fastvit results.json" in err[-1] and "Traceback" not in "\n".join(err)
