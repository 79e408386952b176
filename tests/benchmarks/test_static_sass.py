"""Reading machine code (benchmarks/static_sass.py): the cuobjdump and ptxas parsers on canned
output — instruction counts, the MMA histogram, loops, async copies, wgmma waits. (The compile of
every configuration runs once, in tests/benchmarks/test_static.py; the model over these figures
is tested in test_static_model.py.)"""

from __future__ import annotations

from fastvit.benchmarks.static_sass import (
    async_copy,
    local_accesses_in_loops,
    loops,
    mma_shapes,
    parse_ptxas_log,
    parse_resource_usage,
    parse_sass,
    sass_functions,
    skipped_in_loop,
    warp_mma_results_read,
    wgmma_wait_pendings,
)

# cuobjdump --dump-resource-usage of an nvcc cubin: two kernels, one spilling (-maxrregcount=32)
USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z12heavy_kernelPfi:
  REG:32 STACK:912 SHARED:0 LOCAL:0 CONSTANT[0]:364 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z10mma_kernelPK6__halfS1_Pf:
  REG:22 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:376 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

# cuobjdump -sass excerpts: predicated instructions, control words on their own lines, and the
# opcode names inside operands or comments that must not count
SASS = """
\tcode for sm_90
\t.target\tsm_90

\t\tFunction : _Z12heavy_kernelPfi
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*00e0*/                   STL.64 [R1+0x370], R18 ;                 /* 0x0003701201007387 */
                                                                            /* 0x000fe20000000800 */
        /*0150*/                   STL [R1+0x1c], R2 ;                      /* 0x00001c0201007387 */
        /*2900*/              @!P0 LDL.LU.64 R8, [R1+0x78] ;                /* 0x0000780001087983 */
        /*29a0*/                   EXIT ;                                   /* 0x000000000000794d */
\t\t..........

\t\tFunction : _Z10mma_kernelPK6__halfS1_Pf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0130*/                   HMMA.16816.F32 R16, R4.reuse, R12, RZ ;  /* 0x0000000c0410723c */
        /*0140*/               @P1 HMMA.16816.F32 R12, R4, R14, RZ ;        /* 0x0000000e040c723c */
        /*0150*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x00000000ff1879f0 */
        /*0160*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;          /* HGMMA HMMA in a comment */
        /*0170*/                   EXIT ;
"""

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z12heavy_kernelPfi' for 'sm_80'
ptxas info    : Function properties for _Z12heavy_kernelPfi
    912 bytes stack frame, 932 bytes spill stores, 1024 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 912 bytes cumulative stack size, 364 bytes cmem[0]
ptxas info    : Compile time = 33.030 ms
ptxas info    : Function properties for _ZN7fastvit6helperEf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z10mma_kernelPK6__halfS1_Pf' for 'sm_80'
ptxas info    : Function properties for _Z10mma_kernelPK6__halfS1_Pf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers, used 1 barriers, 2048 bytes smem, 376 bytes cmem[0]
"""


def test_resource_usage_per_function():
    usage = parse_resource_usage(USAGE)
    assert usage == {
        "_Z12heavy_kernelPfi": {"REG": 32, "STACK": 912, "SHARED": 0, "LOCAL": 0},
        "_Z10mma_kernelPK6__halfS1_Pf": {"REG": 22, "STACK": 0, "SHARED": 1024, "LOCAL": 0},
    }


def test_sass_instruction_counts_per_function():
    counts = parse_sass(SASS)
    assert counts["_Z12heavy_kernelPfi"] == {"hmma": 0, "hgmma": 0, "local_stores": 2, "local_loads": 1}
    assert counts["_Z10mma_kernelPK6__halfS1_Pf"] == {"hmma": 2, "hgmma": 1, "local_stores": 0, "local_loads": 0}


def test_ptxas_log_spills_registers_and_entries():
    log = parse_ptxas_log(PTXAS)
    assert log["_Z12heavy_kernelPfi"] == {
        "entry": 1, "stack": 912, "spill_stores": 932, "spill_loads": 1024, "registers": 32, "smem": 0,
    }  # fmt: skip
    assert log["_Z10mma_kernelPK6__halfS1_Pf"]["smem"] == 2048
    assert "entry" not in log["_ZN7fastvit6helperEf"]  # a device function, not a kernel


# a loop of sm_90 SASS: a prologue, a 6-instruction body from 0x0040 to 0x0090 (the backward
# branch's target to the branch), cp.async and TMA loads, and the trap's branch to itself
LOOP = """
\t\tFunction : loop_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R25+0x8000], desc[UR16][R10.64], !P6 ;
        /*0030*/                   HGMMA.64x16x16.F32.BF16 R96, gdesc[UR56], RZ, !UPT ;
        /*0040*/                   IMAD R2, R3, R4, R5 ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0060*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], R24, gsb0 ;
        /*0070*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R2, R6, PT ;
        /*0090*/               @P0 BRA 0x40 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_instructions_with_addresses_opcodes_and_branch_targets():
    code = sass_functions(LOOP)["loop_kernel"]
    assert [i.address for i in code[:2]] == [0, 0x10] and len(code) == 12
    assert code[9].opcode == "BRA" and code[9].predicated and code[9].branch_target == 0x40
    assert code[5].name == "HGMMA" and code[5].opcode == "HGMMA.64x64x16.F32.BF16"


def test_loops_are_the_bodies_of_backward_branches():
    (body,) = loops(sass_functions(LOOP)["loop_kernel"])  # the trap's branch to itself is no loop
    assert [i.address for i in body] == [0x40, 0x50, 0x60, 0x70, 0x80, 0x90]


# registers saved before a main loop and restored after it (Triton 3.6 under a register cap), and one
# reloaded every iteration
SPILL = """
\t\tFunction : spill_kernel
        /*0000*/                   STL [R1], R5 ;
        /*0010*/                   STL [R1+0x4], R10 ;
        /*0020*/                   HMMA.16816.F32.BF16 R24, R4, R8, R24 ;
        /*0030*/                   LDL R12, [R1+0x8] ;
        /*0040*/                   ISETP.GE.AND P0, PT, R2, R6, PT ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/                   LDL R34, [R1+0x4] ;
        /*0070*/                   LDL R35, [R1] ;
        /*0080*/                   EXIT ;
"""


def test_local_accesses_inside_loops_are_counted_apart():
    code = sass_functions(SPILL)["spill_kernel"]
    assert parse_sass(SPILL)["spill_kernel"]["local_stores"] == 2
    assert parse_sass(SPILL)["spill_kernel"]["local_loads"] == 3
    assert local_accesses_in_loops(code) == 1  # the LDL at 0x30; the saves and restores run once
    assert local_accesses_in_loops([i for i in code if i.address != 0x30]) == 0
    assert local_accesses_in_loops(sass_functions(LOOP)["loop_kernel"]) == 0


def test_mma_histogram_async_copy_and_wgmma_waits():
    code = sass_functions(LOOP)["loop_kernel"]
    assert mma_shapes(code) == {"HGMMA.64x16x16": 1, "HGMMA.64x64x16": 2}
    assert mma_shapes(sass_functions(SASS)["_Z10mma_kernelPK6__halfS1_Pf"]) == {"HGMMA.64x64x16": 1,
                                                                               "HMMA.16816": 2}  # fmt: skip
    assert async_copy(code) == "tma"
    assert async_copy([i for i in code if i.name != "UTMALDG"]) == "cp.async"
    assert async_copy(code[:1]) == "none"
    assert wgmma_wait_pendings(code) == [1]


def _body(lines: str):
    text = "\n".join(f"        /*{16 * i:04x}*/ {line} ;" for i, line in enumerate(lines.strip().splitlines()))
    return next(iter(sass_functions("        Function : k\n" + text).values()))


def test_warp_mma_results_read_by_other_instructions():
    # a GEMM main loop: the accumulators R16..R19 only feed the next HMMA
    gemm = _body("""
        LDSM.16.M88.4 R4, [R2]
        HMMA.16816.F32 R16, R4, R8, R16
        HMMA.16816.F32 R16, R6, R10, R16
        IADD3 R2, R2, 0x1000, RZ""")
    assert not warp_mma_results_read(gemm)
    # attention: the softmax reads the score tile (R18 is inside R16..R19)
    attention = _body("""
        HMMA.16816.F32 R16, R4, R8, RZ
        FMNMX R20, R18, R3, !PT""")
    assert warp_mma_results_read(attention)
    # a store of a result reads every operand; an fp16 accumulator is 2 registers (R17 only)
    assert warp_mma_results_read(_body("""
        HMMA.16816.F32 R16, R4, R8, RZ
        STS [R16], R30"""))
    assert not warp_mma_results_read(_body("""
        HMMA.16816.F16 R16, R4, R8, RZ
        FADD R20, R18, R3"""))
    assert warp_mma_results_read(_body("""
        HMMA.16816.F16 R16, R4, R8, RZ
        FADD R20, R17, R3"""))


def test_conditional_code_in_a_loop_is_the_region_a_predicated_forward_branch_skips():
    # the attention forward's lazy rescale: a CTA-wide test, then an if without else over the rescale
    body = _body("""
        HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24, gsb0
        ISETP.NE.AND P0, PT, R9, RZ, PT
        @!P0 BRA 0x70
        MUFU.EX2 R7, R7
        FMUL R24, R24, R7
        FMUL R25, R25, R7
        BSYNC B0
        MUFU.EX2 R30, R24
        @P1 BRA 0x0""")
    assert skipped_in_loop(body) == {0x30, 0x40, 0x50, 0x60}
    # an if / else: the predicated branch's region holds the jump over the else: both count
    assert skipped_in_loop(_body("""
        @!P0 BRA 0x30
        FMUL R24, R24, R7
        BRA 0x40
        FADD R24, R24, R7
        @P1 BRA 0x0""")) == set()
    # a guarded region holding the loop's MMAs is its main work, not side code
    assert skipped_in_loop(_body("""
        @!P0 BRA 0x30
        HMMA.16816.F32 R16, R4, R8, R16
        FMUL R24, R24, R7
        @P1 BRA 0x0""")) == set()
    # an unpredicated forward branch, and a predicated one leaving the loop, skip nothing in it
    assert skipped_in_loop(_body("""
        BRA 0x20
        FMUL R24, R24, R7
        @P0 BRA 0x50
        FADD R24, R24, R7
        @P1 BRA 0x0""")) == set()
