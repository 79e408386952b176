"""Reading machine code: the cuobjdump and ptxas parsers on canned output, and what counts as a
problem. (The compile of every configuration runs once, in tests/benchmarks/test_static.py.)"""

from __future__ import annotations

from fastvit.kernels.aot import parse_ptxas_log, parse_resource_usage, parse_sass, problems

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


def _report(**overrides):
    base = {"arch": 90, "needs_wgmma": True, "stack": 0, "local": 0, "shared": 1024, "shared_limit": 232448,
            "hgmma": 4, "hmma": 0}  # fmt: skip
    return {**base, **overrides}


def test_problems():
    assert problems(_report()) == []
    assert problems(_report(stack=56)) == ["spills: stack 56 B"]
    assert problems(_report(spill_stores=8, spill_loads=8)) == ["spills: spill stores 8 B, spill loads 8 B"]
    assert "over the sm_90 limit" in problems(_report(shared=232449))[0]
    assert "without warpgroup MMA" in problems(_report(hgmma=0))[0]
    assert problems(_report(hgmma=0, arch=80)) == []  # HGMMA exists on sm_90 only
    assert problems(_report(hgmma=0, needs_wgmma=False)) == []  # fp32 / memory-bound kernels
    assert problems({"error": "boom"}) == ["does not compile: boom"]
