"""The static performance model (benchmarks/static_model.py, static_ttgir.py): occupancy, the
hot loop's issue ratio, replicated MMA rows and the problems, first on canned text whose answer is
worked out by hand, then on hand-made kernels compiled for sm_90 (tests/benchmarks/_static_kernels.py:
a 64-row attention tile on 8 warps must be flagged replicated, a loop of integer ops must be
issue-bound, clean tiles must pass)."""

from __future__ import annotations

import json

import pytest

from fastvit.benchmarks.static_figures import compare
from fastvit.benchmarks.static_model import (
    HARMLESS_SPILL_BYTES,
    ctas_per_sm,
    harmless_spill,
    hot_loop,
    loop_efficiency,
    model_problems,
    problems,
    regs_to_cliff,
    sixteen_bit_inputs,
)
from fastvit.benchmarks.static_sass import sass_functions
from fastvit.benchmarks.static_ttgir import mma_tiles

from ._aot_process import run_without_interpreter
from .test_static_sass import LOOP


# ---------------------------------------------------------------------------------------------
# canned text
# ---------------------------------------------------------------------------------------------
def test_occupancy_and_the_register_cliff():
    # 8 warps: 128 registers = 4096 per warp, 16 warps fit the 64K register file: 2 CTAs, and one
    # more register (rounded to 136 per thread) leaves room for 15 warps: 1 CTA
    assert ctas_per_sm(90, 128, 0, 8) == 2 and regs_to_cliff(90, 128, 0, 8) == 0
    assert ctas_per_sm(90, 129, 0, 8) == 1
    assert ctas_per_sm(90, 120, 0, 8) == 2 and regs_to_cliff(90, 120, 0, 8) == 8
    # shared memory: 228 KiB per SM, 1 KiB reserved per CTA -> two 100 KiB CTAs, one of 120 KiB
    assert ctas_per_sm(90, 64, 100 * 1024, 4) == 2 and ctas_per_sm(90, 64, 120 * 1024, 4) == 1
    # one CTA: the cliff is the 255-register cap
    assert ctas_per_sm(80, 200, 0, 8) == 1 and regs_to_cliff(80, 200, 0, 8) == 55
    # sm_89 holds 48 resident warps: three CTAs of 16 warps, one of 32
    assert ctas_per_sm(89, 32, 0, 16) == 3 and ctas_per_sm(89, 32, 0, 32) == 1


def test_issue_ratio_of_a_hand_counted_loop():
    """LOOP's body: 6 instructions and two HGMMA m64n64k16. On 8 warps: issue 6 * 8 / 4 = 12
    cycles; tensor cores: two warpgroups x 2 x 64*64*16 FMAs / 2048 per cycle = 128 cycles."""
    loop = hot_loop(sass_functions(LOOP)["loop_kernel"], arch=90, num_warps=8)
    assert loop.instructions == 6 and loop.issue_cycles == 12 and loop.mma_cycles == 128
    assert loop.issue_ratio == pytest.approx(12 / 128)
    assert loop.mma_shapes == {"HGMMA.64x64x16": 2} and loop.sixteen_bit and loop.wait_pendings == [1]
    # 4 warps, one warpgroup: half the issue cycles and half the tensor-core cycles per iteration
    four = hot_loop(sass_functions(LOOP)["loop_kernel"], arch=90, num_warps=4)
    assert four.mma_cycles == 64 and four.issue_cycles == 6
    # the rate is per architecture: at sm_80's 1024 FMAs per cycle the same MMAs take twice as long
    assert hot_loop(sass_functions(LOOP)["loop_kernel"], arch=80, num_warps=8).mma_cycles == 256
    assert hot_loop(sass_functions(LOOP)["loop_kernel"][:5], arch=90, num_warps=8) is None  # no loop


TTGIR = """
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 16, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 64, 16]}>
module {
  %s_t = ttng.warp_group_dot %k, %q, %c {inputPrecision = 0 : i32} : !ttg.memdesc<64x128xbf16> * \
!ttg.memdesc<128x32xbf16> -> tensor<64x32xf32, #mma> loc(#loc1)
  %dv = ttng.warp_group_dot %p, %do, %acc {inputPrecision = 0 : i32} : tensor<64x32xbf16> * \
!ttg.memdesc<32x128xbf16> -> tensor<64x128xf32, #mma1> loc(#loc2)
  %f = tt.dot %a, %b, %c : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32, #blocked> loc(#loc3)
}
"""


SOFTMAX_LOOP = """
\t\tFunction : softmax_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/                   MUFU.EX2 R30, R24 ;
        /*0050*/                   MUFU.EX2 R31, R25 ;
        /*0060*/                   MUFU.EX2 R32, R26 ;
        /*0070*/                   MUFU.RCP R33, R27 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R2, R6, PT ;
        /*0090*/               @P0 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_mufu_ratio_of_a_hand_counted_loop():
    """Four MUFU per thread per iteration on 8 warps: 4 x 32 lanes x 8 warps / 16 per cycle = 64
    cycles, against two warpgroups x 2 HGMMA m64n64k16 = 128 tensor-core cycles: 0.5."""
    loop = hot_loop(sass_functions(SOFTMAX_LOOP)["softmax_kernel"], arch=90, num_warps=8)
    assert loop.mma_cycles == 128 and loop.mufu_cycles == 64 and loop.mufu_ratio == 0.5
    assert hot_loop(sass_functions(LOOP)["loop_kernel"], arch=90, num_warps=8).mufu_ratio == 0  # none


LAZY_RESCALE_LOOP = """
\t\tFunction : lazy_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0020*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0030*/                   ISETP.NE.AND P0, PT, R9, RZ, PT ;
        /*0040*/              @!P0 BRA 0x80 ;
        /*0050*/                   MUFU.EX2 R7, R7 ;
        /*0060*/                   FMUL R24, R24, R7 ;
        /*0070*/                   FMUL R25, R25, R7 ;
        /*0080*/                   MUFU.EX2 R30, R24 ;
        /*0090*/               @P1 BRA 0x10 ;
        /*00a0*/                   EXIT ;
"""


def test_conditional_code_in_the_hot_loop_is_modelled_as_not_taken():
    """LAZY_RESCALE_LOOP's body is 9 instructions, 3 of them an if without else (the forward's lazy
    rescale): 6 issue per iteration that skips it, 1 MUFU; on 4 warps 6 issue cycles against one
    warpgroup's HGMMA m64n64k16, 32 cycles."""
    loop = hot_loop(sass_functions(LAZY_RESCALE_LOOP)["lazy_kernel"], arch=90, num_warps=4)
    assert loop.instructions == 6 and loop.conditional_instructions == 3
    assert loop.issue_cycles == 6 and loop.mma_cycles == 32 and loop.mufu_cycles == 1 * 32 * 4 / 16
    assert hot_loop(sass_functions(LOOP)["loop_kernel"], arch=90, num_warps=8).conditional_instructions == 0


def test_replicated_rows_from_the_mma_layouts():
    tiles = mma_tiles(TTGIR)
    assert [t.label() for t in tiles] == ["64x32 warps [8, 1] v3", "64x128 warps [4, 2] v3"]  # FMA dot left out
    assert [t.replicated for t in tiles] == [True, False]
    assert tiles[0].rows_covered == 128


def _row(**overrides):
    base = {"arch": 90, "needs_wgmma": True, "stack": 0, "local": 0, "shared": 1024, "shared_limit": 232448,
            "hgmma": 4, "hmma": 0, "ctas_per_sm": 1, "regs_to_cliff": 50, "target_ctas_per_sm": 1,
            "mma_rows_replicated": False, "loop_mma_shapes": {"HGMMA.64x64x16": 4}, "loop_issue_ratio": 0.5,
            "loop_sixteen_bit": True}  # fmt: skip
    return {**base, **overrides}


def test_problems():
    assert problems(_row()) == []
    assert problems(_row(stack=56)) == ["spills: stack 56 B"]
    assert problems(_row(spill_stores=8, spill_loads=8)) == ["spills: spill stores 8 B, spill loads 8 B"]
    assert "over the sm_90 limit" in problems(_row(shared=232449))[0]
    assert "without warpgroup MMA" in problems(_row(hgmma=0))[0]
    assert problems(_row(hgmma=0, arch=80)) == []  # HGMMA exists on sm_90 only
    assert problems(_row(hgmma=0, needs_wgmma=False)) == []  # fp32 / memory-bound kernels
    assert problems({"error": "boom"}) == ["does not compile: boom"]


def test_spills_outside_every_loop_are_reported_not_flagged():
    # Triton 3.6's sm_80 ViT-B forward under its 128-register cap: 3 registers saved before the main
    # loop and restored after it, once per program
    saved = _row(stack=16, local_stores=3, local_loads=3, local_in_loops=0)
    assert harmless_spill(saved) and problems(saved) == []
    reloaded = {**saved, "local_in_loops": 2}
    assert problems(reloaded) == ["spills: stack 16 B (2 of 6 local loads/stores inside a loop)"]
    big = {**saved, "stack": HARMLESS_SPILL_BYTES + 8}
    assert problems(big) == [f"spills: stack {HARMLESS_SPILL_BYTES + 8} B (0 of 6 local loads/stores inside a loop)"]
    # no SASS figures (csrc's ptxas rows), or a stack frame without a local access seen: flagged
    assert not harmless_spill(_row(stack=16))
    assert not harmless_spill(_row(stack=16, local_stores=0, local_loads=0, local_in_loops=0))


def test_model_problems():
    replicated = _row(mma_rows_replicated=True, mma_replicated_tiles=["64x32 warps [8, 1] v3"])
    assert model_problems(replicated) == ["replicated MMA rows (64x32 warps [8, 1] v3)"]
    narrow = model_problems(_row(loop_mma_shapes={"HGMMA.64x16x16": 32, "HGMMA.64x32x16": 2}))
    assert narrow == ["hot-loop HGMMA with N < 32: 32x HGMMA.64x16x16"]
    assert "issue-bound" in model_problems(_row(loop_issue_ratio=1.2))[0]
    assert model_problems(_row(loop_issue_ratio=1.2, arch=80)) == []  # flagged on sm_90 only
    assert model_problems(_row(loop_issue_ratio=1.2, loop_sixteen_bit=False)) == []  # TF32 / fp32
    assert model_problems(_row(target_ctas_per_sm=2, ctas_per_sm=2, regs_to_cliff=7))[0].startswith(
        "7 registers to the occupancy cliff")
    assert model_problems(_row(target_ctas_per_sm=2, ctas_per_sm=1))[0].startswith("1 CTAs/SM")
    assert model_problems(_row(target_ctas_per_sm=2, ctas_per_sm=2, regs_to_cliff=8)) == []
    assert model_problems(_row(regs_to_cliff=0)) == []  # a 1-CTA config has no cliff to keep
    # above its aim: 80 registers on 8 warps give 3 CTAs/SM on sm_90, 0 to that cliff but 48 to the
    # aim's (2 CTAs up to 128 registers): fine; 126 registers at an aim of 2 are not
    above = _row(arch=90, target_ctas_per_sm=2, ctas_per_sm=3, regs_to_cliff=0, registers=80, shared=73728,
                 num_warps=8)  # fmt: skip
    assert model_problems(above) == []
    tight = _row(arch=90, target_ctas_per_sm=2, ctas_per_sm=2, regs_to_cliff=2, registers=126, shared=73728,
                 num_warps=8)  # fmt: skip
    assert model_problems(tight)[0].startswith("2 registers to the occupancy cliff")
    # under a register cap that keeps the aim the occupancy cannot drop (more registers would spill):
    # 128 registers on 8 warps give 2 CTAs/SM on sm_90, 0 to the cliff
    capped = _row(arch=90, target_ctas_per_sm=2, ctas_per_sm=2, regs_to_cliff=0, registers=128, shared=81920,
                  num_warps=8, max_registers=128)  # fmt: skip
    assert model_problems(capped) == []
    assert model_problems({**capped, "max_registers": 168})[0].startswith("0 registers to the occupancy cliff")
    # nor where no thread can hold enough registers to drop it: 4 warps at 255 registers keep 2 CTAs/SM,
    # but not 3
    full = _row(arch=90, target_ctas_per_sm=2, ctas_per_sm=2, regs_to_cliff=0, registers=255, shared=65536,
                num_warps=4)  # fmt: skip
    assert model_problems(full) == []
    three = _row(arch=90, target_ctas_per_sm=3, ctas_per_sm=3, regs_to_cliff=4, registers=164, shared=24576,
                 num_warps=4)  # fmt: skip
    assert model_problems(three)[0].startswith("4 registers to the occupancy cliff")


def test_loop_efficiency_takes_turns_only_where_the_loop_waits_on_its_mmas():
    # one program per SM waiting on each MMA: its MMAs and its other work add up
    assert loop_efficiency(0.72, 0.53, 1) == pytest.approx(1 / 1.72)
    # a second program fills the gaps; then only issue (or MUFU) can bind
    assert loop_efficiency(0.72, 0.53, 2) == 1.0
    assert loop_efficiency(1.25, 0.5, 2) == pytest.approx(0.8)
    assert loop_efficiency(0.5, 1.6, 3) == pytest.approx(1 / 1.6)
    # a pipelined GEMM loop keeps an MMA in flight under its other work
    assert loop_efficiency(0.72, None, 1, serial=False) == 1.0
    assert loop_efficiency(1.6, None, 1, serial=False) == pytest.approx(1 / 1.6)
    assert loop_efficiency(None, None, 1) == 1.0  # no MMA loop


def test_sixteen_bit_mma_opcodes():
    # fp16 operands are SASS's unnamed default: the fp16 kernels' loops were not taken as 16-bit, so
    # the report never flagged an fp16 loop issue-bound
    for opcode in ("HGMMA.64x64x16.F32", "HGMMA.64x64x16.F16", "HGMMA.64x64x16.F32.BF16", "HMMA.16816.F32",
                   "HMMA.16816.F32.BF16"):  # fmt: skip
        assert sixteen_bit_inputs(opcode), opcode
    for opcode in ("HGMMA.64x64x8.F32.TF32", "HMMA.1684.F32.TF32", "HGMMA.64x64x32.F32.E4M3.E4M3"):
        assert not sixteen_bit_inputs(opcode), opcode


def test_one_program_per_sm_taking_turns_is_flagged():
    serial = _row(loop_efficiency=0.58, loop_serial=True)
    assert model_problems(serial) == [
        "one program per SM takes turns (MMAs, then the rest): loop efficiency 0.58 < 0.8"]
    assert model_problems(_row(loop_efficiency=0.58, loop_serial=False)) == []  # MMAs in flight
    # the hot loop's own verdict decides, not its warpgroup waits: a warp-level MMA loop on sm_90
    # (no wgmma waits) that keeps its MMAs in flight is not flagged, one that takes turns is
    assert model_problems(_row(loop_efficiency=0.58, loop_serial=False, wgmma_wait_pendings=[])) == []
    assert model_problems(_row(loop_efficiency=0.58, loop_serial=True, wgmma_wait_pendings=[])) != []
    assert model_problems(_row(loop_efficiency=0.7, ctas_per_sm=2, loop_serial=True)) == []
    assert model_problems(_row(loop_efficiency=0.81, loop_serial=True)) == []
    assert model_problems(_row(loop_efficiency=0.58, loop_serial=True, arch=80)) == []  # sm_90's target
    assert model_problems(_row(loop_efficiency=0.58, loop_serial=True, loop_sixteen_bit=False)) == []


def test_compare_figures():
    committed = {"a": {"registers": 100, "problems": ["known"]}, "gone": {"registers": 1, "problems": []}}
    fresh = {"a": {"registers": 104, "problems": ["known", "new"]}, "b": {"registers": 1, "problems": ["x"]}}
    diff = compare(fresh, committed)
    assert diff["new_problems"] == ["a: new", "b: x"]
    assert diff["changed"] == ["a: registers 100 -> 104"]
    assert diff["added"] == ["b"] and diff["removed"] == ["gone"]


# ---------------------------------------------------------------------------------------------
# hand-made kernels, compiled for sm_90 in a subprocess (this process may interpret)
# ---------------------------------------------------------------------------------------------
COMPILE = """
import json, sys
from fastvit.benchmarks.static_triton import compile_spec
from tests.benchmarks._static_kernels import SPECS
json.dump({name: compile_spec(spec) for name, spec in SPECS.items()}, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    out = tmp_path_factory.mktemp("static-model") / "rows.json"
    run_without_interpreter(COMPILE, out, "compiling the hand-made kernels")
    rows = json.loads(out.read_text())
    errors = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert not errors
    return rows


def test_a_64_row_tile_on_8_warps_is_flagged_replicated(hand_made):
    row = hand_made["chained 64 rows on 8 warps"]
    assert row["mma_rows_replicated"] and "64x64 warps [8, 1] v3" in row["mma_replicated_tiles"]
    assert any(p.startswith("replicated MMA rows") for p in row["problems"])


@pytest.mark.parametrize("name", ["chained 64 rows on 4 warps", "chained 128 rows on 8 warps", "128x128 on 8 warps"])
def test_clean_tiles_pass(hand_made, name):
    row = hand_made[name]
    assert row["problems"] == [] and not row["mma_rows_replicated"]
    assert row["hgmma"] > 0 and all(int(s.split("x")[1]) >= 32 for s in row["loop_mma_shapes"])
    assert 0 < row["loop_issue_ratio"] <= 1.0 and row["ctas_per_sm"] >= 1 and row["async_copy"] == "cp.async"


def test_a_loop_of_integer_ops_is_issue_bound(hand_made):
    heavy, plain = hand_made["integer-heavy loop"], hand_made["chained 64 rows on 4 warps"]
    assert heavy["loop_issue_ratio"] > 1.0 and heavy["loop_instructions"] > 3 * plain["loop_instructions"]
    # the row's loop efficiency is the model's, from its own figures, and the heavy loop's is lower
    for row in (heavy, plain):
        serial = not any(row["wgmma_wait_pendings"] or [])  # warpgroup MMA: serial exactly when every wait is 0
        assert row["loop_serial"] == serial
        expected = loop_efficiency(row["loop_issue_ratio"], row["loop_mufu_ratio"], row["ctas_per_sm"], serial)
        assert row["loop_efficiency"] == pytest.approx(expected, abs=1e-3)
    assert heavy["loop_efficiency"] < plain["loop_efficiency"]
    assert any("issue-bound" in p for p in heavy["problems"])


def test_figures_of_a_match_replace_only_its_rows(tmp_path):
    from fastvit.benchmarks.static_figures import write_figures

    def row(arch, config, registers):
        return {"arch": arch, "kernel": "m.k", "config": config, "registers": registers, "problems": []}

    path = tmp_path / "figures.json"
    write_figures(path, [row(90, "a BM=64", 1), row(80, "a BM=64", 2), row(90, "b", 3)], "3.8.0")
    write_figures(path, [row(90, "a BM=32", 9)], "3.8.0", match="m.k [a", archs=(90,))
    rows = json.loads(path.read_text())["rows"]
    assert {k: r["registers"] for k, r in rows.items()} == {"sm_90 m.k [a BM=32]": 9, "sm_80 m.k [a BM=64]": 2,
                                                            "sm_90 m.k [b]": 3}  # fmt: skip
    write_figures(path, [row(90, "c", 5)], "3.6.0", match="m.k [c", archs=(90,))  # another version: replaced
    assert list(json.loads(path.read_text())["rows"]) == ["sm_90 m.k [c]"]
