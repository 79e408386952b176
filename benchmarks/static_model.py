"""The static performance model: what a kernel's machine code says about its speed, without a GPU.

From the figures of one compiled configuration (registers, shared memory, warps, the SASS and the
TTGIR's MMA layouts) it derives, per architecture:

- ``ctas_per_sm``: resident programs per SM, the least of the register, shared memory, warp and
  block limits (the CUDA occupancy calculator's rules: registers are allocated per warp in units
  of 256, per SM sub-partition of 16384);
- ``regs_to_cliff``: registers per thread the kernel could still grow by before ``ctas_per_sm``
  drops (or before the 255-register cap);
- ``loop_issue_ratio`` of the hot loop: the issue cycles its SASS needs, ``instructions x warps /
  4`` (one instruction per cycle per scheduler, four schedulers per SM), over the tensor-core
  cycles of its MMAs. Above 1 the loop is bound by instruction issue, not by the tensor cores;
- ``loop_mufu_ratio`` of the hot loop: the cycles of its special-function instructions (MUFU:
  exp2, log2, reciprocal), ``MUFU x 32 lanes x warps / MUFU_PER_CLK``, over the same tensor-core
  cycles. Above 1 the loop waits on the special-function units: attention's softmax takes one
  exp2 per score against 2 x D tensor-core FMAs per score, so at D = 64 on sm_90 the ratio is
  about 1 whatever the tiling (16 exp2 per cycle per SM vs 2048 FMAs per cycle / 128 per score),
  and 2 at D = 32. Reported, not flagged: no tiling changes it.
- ``loop_efficiency`` of the hot loop: the share of its time the tensor cores are busy, from the
  two ratios (r, the larger) and the programs resident per SM (c). Where the loop waits on each
  MMA before the work that reads it (the row's ``loop_serial``: every ``wgmma_wait_pendings`` 0:
  attention, whose softmax / dS reads the dot just issued; with warp-level MMA, an HMMA result
  read by another instruction of the loop), a program runs its MMAs and its other work in turn,
  its warps meeting at a barrier per pipeline stage, and only the other programs of the SM fill
  the gaps: c iterations take ``max(c, c r, 1 + r)`` MMA-times, so ``c / max(c, c r, 1 + r)``
  (1 / (1 + r) at one program per SM). Where MMAs stay in flight under the other work (a wait at
  pendings >= 1, or a GEMM main loop whose HMMA accumulators only feed the next HMMA),
  ``min(1, 1 / r)``. Calibrated on the first H200 run (2026-12-04, bf16, N = 4097): the D = 128
  forward at one program per SM (r = 0.72, 0.58 by this formula) ran at 311 TFLOP/s, 0.46 of the
  measured 673 TFLOP/s matmul peak, and the D = 64 forward at two (r = 1.14, 0.88) at 420, 0.62;
  by ``min(1, 1 / r)`` alone the D = 128 one would be the faster.

Tensor-core cycles: an MMA of m x n x k is ``m * n * k`` FMAs, issued by every warp (HMMA) or
every warpgroup of four warps (HGMMA), at ``TENSOR_FMA_PER_CLK[arch]`` dense 16-bit FMAs per
cycle per SM (TF32 at half that), from the datasheets' dense 16-bit tensor TFLOP/s over SMs and
boost clock: sm_90 2048 (H100 SXM: 989 TFLOP/s, 132 SMs, 1.83 GHz), sm_80 1024 (A100: 312 TFLOP/s,
108 SMs, 1.41 GHz), sm_89 512 (L40S: 362 TFLOP/s, 142 SMs, 2.52 GHz). On sm_90 an HGMMA m64nNk16
that both warpgroups of 8 warps issue then takes N cycles. (Issue 15 names 1024 for sm_90 but
works its FC1 example, 361 instructions x 8 warps / 4 = 722 issue cycles against 512 tensor-core
cycles for four HGMMA.64x128x16, at 2048; 2048 is used here, and at 1024 every sm_90 ratio would
halve.)

The hot loop is the innermost loop (a backward branch in the SASS) with MMA instructions; where
several have them (a causal kernel's masked diagonal block and its unmasked steady state), the one
with the most tensor-core cycles, then the fewest instructions: the steady state. Its conditional
code (an ``if`` without ``else`` inside the loop, ``static_sass.skipped_in_loop``) is modelled as
not taken and reported apart (``loop_conditional_instructions``): in fastvit's kernels the only such
code is the attention forward's lazy rescale, which runs on a program's first key step and then only
when a row max grows by 2^8.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .static_sass import (
    Instruction,
    loops,
    mma_shape,
    mma_shapes,
    skipped_in_loop,
    warp_mma_results_read,
    wgmma_wait_pendings,
)

__all__ = [
    "CLIFF_MARGIN_REGS",
    "HARMLESS_SPILL_BYTES",
    "HOT_LOOP_MIN_HGMMA_N",
    "ISSUE_RATIO_LIMIT",
    "SERIAL_EFFICIENCY_LIMIT",
    "SHARED_MEMORY_LIMIT",
    "SM90_RESERVED_SHARED",
    "TENSOR_FMA_PER_CLK",
    "HotLoop",
    "ctas_per_sm",
    "harmless_spill",
    "hot_loop",
    "loop_efficiency",
    "model_problems",
    "problems",
    "regs_to_cliff",
    "sixteen_bit_inputs",
]

SCHEDULERS_PER_SM = 4  # warp schedulers, one instruction issued per cycle each
WARPS_PER_WARPGROUP = 4
# dense 16-bit (fp16/bf16 in, fp32 accumulate) tensor-core FMAs per cycle per SM (see the docstring)
TENSOR_FMA_PER_CLK = {80: 1024, 86: 512, 89: 512, 90: 2048}
TF32_RATE = 0.5  # TF32 MMAs run at half the 16-bit rate
# special-function (MUFU) results per cycle per SM: 16 on sm_80/86/89/90 (the CUDA programming
# guide's arithmetic-throughput table: exp2f, log2f, rcp, rsqrt, sin, cos)
MUFU_PER_CLK = {80: 16, 86: 16, 89: 16, 90: 16}

REGISTERS_PER_SM = 65536
SUB_PARTITIONS = 4  # register file slices; a warp's registers come from one
REGISTER_ALLOCATION_UNIT = 256  # registers, per warp
MAX_REGISTERS_PER_THREAD = 255
THREADS_PER_WARP = 32
# per architecture: resident warps, resident blocks, shared memory per SM (bytes)
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
MAX_CTAS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
SHARED_MEMORY_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_CTA = 1024  # the system's shared memory per resident block (sm_80 and later)
# Largest shared memory one block may use, per architecture (bytes, opt-in maximum).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# sm_90 cubins reserve 1 KiB of shared memory per block for the system (.nv.shared.reserved);
# cuobjdump's SHARED counts it, the opt-in limit above does not
SM90_RESERVED_SHARED = 1024

# the problem thresholds of issue 15
ISSUE_RATIO_LIMIT = 1.0  # a 16-bit MMA hot loop above this on sm_90 is issue-bound
# a 16-bit MMA hot loop on sm_90 that runs one program per SM and takes turns (its MMAs, then its
# other work) below this loop efficiency leaves the tensor cores idle that long: 1 / (1 + r) < 0.8
# for any r > 0.25
SERIAL_EFFICIENCY_LIMIT = 0.8
HOT_LOOP_MIN_HGMMA_N = 32  # narrower warpgroup MMAs in a hot loop waste the tensor cores' issue
CLIFF_MARGIN_REGS = 8  # a config aiming at 2+ CTAs/SM wants this many registers of headroom
# A spill this small whose local loads and stores all lie outside every loop (registers saved before
# a main loop and restored after it, under a register cap that keeps the occupancy) costs a few L1
# accesses per program: reported in the figures (``stack``), not flagged
HARMLESS_SPILL_BYTES = 64


def _register_ctas(registers: int, num_warps: int) -> int:
    """Blocks per SM that the register file holds."""
    per_warp = -(-max(registers, 1) * THREADS_PER_WARP // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps = SUB_PARTITIONS * ((REGISTERS_PER_SM // SUB_PARTITIONS) // per_warp)
    return warps // num_warps


def ctas_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident blocks per SM: the least of the register, shared memory, warp and block limits."""
    by_shared = SHARED_MEMORY_PER_SM[arch] // (shared + SHARED_RESERVED_PER_CTA)
    by_warps = MAX_WARPS_PER_SM[arch] // num_warps
    return min(_register_ctas(registers, num_warps), by_shared, by_warps, MAX_CTAS_PER_SM[arch])


def regs_to_cliff(arch: int, registers: int, shared: int, num_warps: int, ctas: int | None = None) -> int:
    """Registers per thread to spare before ``ctas_per_sm`` drops below ``ctas`` (default: below
    what it is now), or the 255-register cap."""
    now = ctas_per_sm(arch, registers, shared, num_warps) if ctas is None else ctas
    more = registers
    while more < MAX_REGISTERS_PER_THREAD and ctas_per_sm(arch, more + 1, shared, num_warps) >= now:
        more += 1
    return more - registers


@dataclasses.dataclass(frozen=True)
class HotLoop:
    """The hot loop's figures: SASS ``instructions`` per iteration (per thread), the tensor-core
    ``mma_cycles`` per iteration of the whole program, its MMA histogram, whether its MMAs take
    16-bit operands, its wgmma waits, and the cycles its instructions take to issue and its MUFU
    instructions to run."""

    instructions: int
    mma_cycles: float
    mma_shapes: dict[str, int]
    sixteen_bit: bool
    wait_pendings: list[int]
    issue_cycles: float
    mufu_cycles: float = 0.0
    # the loop waits on its MMAs before the work that reads them: every warpgroup MMA wait at
    # pendings 0, or (warp-level MMA) an HMMA result read by another instruction of the loop
    serial: bool = True
    # instructions of the loop's conditional code, not in ``instructions`` (modelled as not taken)
    conditional_instructions: int = 0

    @property
    def issue_ratio(self) -> float:
        return self.issue_cycles / self.mma_cycles

    @property
    def mufu_ratio(self) -> float:
        return self.mufu_cycles / self.mma_cycles


def loop_efficiency(loop_issue_ratio: float | None, loop_mufu_ratio: float | None, ctas_per_sm: int,
                    serial: bool = True) -> float:  # fmt: skip
    """The tensor cores' busy share of a hot loop (the module docstring): ``c / max(c, c r, 1 + r)``
    with r the larger ratio and c the programs per SM where the loop takes turns (``serial``),
    ``min(1, 1 / r)`` where it keeps MMAs in flight; 1 without an MMA loop.

    Example:
        >>> loop_efficiency(0.72, 0.53, 1)  # one program per SM: MMA and softmax take turns
        0.5813953488372093
        >>> loop_efficiency(1.14, 0.53, 2)  # two: bound by instruction issue, 1 / 1.14
        0.8771929824561404
        >>> loop_efficiency(0.69, None, 1, serial=False)  # a pipelined GEMM loop
        1.0
    """
    bound = max(loop_issue_ratio or 0.0, loop_mufu_ratio or 0.0)
    if not bound:
        return 1.0
    if not serial:
        return min(1.0, 1.0 / bound)
    c = max(1, ctas_per_sm)
    return c / max(c, c * bound, 1.0 + bound)


def _mma_cycles(body: list[Instruction], arch: int, num_warps: int) -> float:
    cycles = 0.0
    for ins in body:
        shape = mma_shape(ins)
        if shape is None:
            continue
        _, m, n, k = shape
        issuers = max(1, num_warps // WARPS_PER_WARPGROUP) if ins.name == "HGMMA" else num_warps
        rate = TENSOR_FMA_PER_CLK[arch] * (TF32_RATE if ".TF32" in ins.opcode else 1.0)
        cycles += m * n * k * issuers / rate
    return cycles


def _innermost(bodies: list[list[Instruction]]) -> list[list[Instruction]]:
    """The bodies that hold no other body with MMAs."""
    spans = [(b[0].address, b[-1].address) for b in bodies]
    out = []
    for body, (lo, hi) in zip(bodies, spans, strict=True):
        inner = any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans)
        if not inner:
            out.append(body)
    return out


# the MMA input types SASS names after the accumulator's (fp16 inputs are the default, unnamed:
# ``HGMMA.64x64x16.F32`` is fp16 x fp16 -> fp32, ``HGMMA.64x64x16.F32.BF16`` bf16 x bf16 -> fp32)
_NAMED_MMA_INPUTS = {"BF16", "TF32", "E4M3", "E5M2", "S8", "U8", "S4", "U4"}


def sixteen_bit_inputs(opcode: str) -> bool:
    """Whether an MMA opcode takes fp16 or bf16 operands.

    Example:
        >>> [sixteen_bit_inputs(op) for op in ("HGMMA.64x64x16.F32", "HMMA.16816.F32.BF16", "HMMA.1684.F32.TF32")]
        [True, True, False]
    """
    named = set(opcode.split(".")[2:]) & _NAMED_MMA_INPUTS
    return named <= {"BF16"}


def hot_loop(instructions: list[Instruction], arch: int, num_warps: int) -> HotLoop | None:
    """The hot loop's figures; None where no loop issues an MMA."""
    with_mma = [b for b in loops(instructions) if any(mma_shape(i) for i in b)]
    candidates = _innermost(with_mma)
    if not candidates:
        return None
    body = max(candidates, key=lambda b: (_mma_cycles(b, arch, num_warps), -len(b)))
    sixteen = any(mma_shape(i) and sixteen_bit_inputs(i.opcode) for i in body)
    pendings = wgmma_wait_pendings(body)
    warpgroup = any(i.name == "HGMMA" for i in body)
    conditional = skipped_in_loop(body)
    taken = [i for i in body if i.address not in conditional]  # the iterations that skip it
    return HotLoop(
        instructions=len(taken),
        mma_cycles=_mma_cycles(body, arch, num_warps),
        mma_shapes=mma_shapes(body),
        sixteen_bit=sixteen,
        wait_pendings=pendings,
        issue_cycles=len(taken) * num_warps / SCHEDULERS_PER_SM,
        mufu_cycles=sum(ins.name == "MUFU" for ins in taken) * THREADS_PER_WARP * num_warps / MUFU_PER_CLK[arch],
        serial=not any(pendings) if warpgroup else warp_mma_results_read(body),
        conditional_instructions=len(conditional),
    )


def model_problems(row: dict[str, Any]) -> list[str]:
    """The performance model's problems of one compiled Triton configuration (issue 15): replicated
    MMA rows; a hot-loop HGMMA narrower than 32; a 16-bit MMA hot loop on sm_90 whose issue ratio
    is above 1, or that runs one program per SM taking turns (the row's ``loop_serial``, the hot
    loop's own verdict, ``HotLoop.serial``) below ``SERIAL_EFFICIENCY_LIMIT``;
    fewer than 8 registers to the occupancy cliff where the config aims at 2+ CTAs/SM, unless its
    register cap (or the 255-register limit) keeps that aim (or occupancy already below its aim)."""
    found = []
    if row.get("mma_rows_replicated"):
        tiles = ", ".join(row.get("mma_replicated_tiles", []))
        found.append(f"replicated MMA rows ({tiles})")
    narrow = {s: n for s, n in (row.get("loop_mma_shapes") or {}).items()
              if s.startswith("HGMMA.") and int(s.split(".")[1].split("x")[1]) < HOT_LOOP_MIN_HGMMA_N}  # fmt: skip
    if narrow:
        found.append("hot-loop HGMMA with N < 32: " + ", ".join(f"{n}x {s}" for s, n in narrow.items()))
    ratio = row.get("loop_issue_ratio")
    if row.get("arch") == 90 and row.get("loop_sixteen_bit") and ratio is not None and ratio > ISSUE_RATIO_LIMIT:
        found.append(f"hot loop issue-bound: issue ratio {ratio:.2f} > {ISSUE_RATIO_LIMIT}")
    efficiency = row.get("loop_efficiency")
    if (row.get("arch") == 90 and row.get("loop_sixteen_bit") and efficiency is not None
            and row.get("ctas_per_sm") == 1 and row["loop_serial"]
            and efficiency < SERIAL_EFFICIENCY_LIMIT):  # fmt: skip
        found.append(f"one program per SM takes turns (MMAs, then the rest): loop efficiency {efficiency:.2f} "
                     f"< {SERIAL_EFFICIENCY_LIMIT}")  # fmt: skip
    aim = row.get("target_ctas_per_sm", 1)
    if aim >= 2 and "ctas_per_sm" in row:
        if row["ctas_per_sm"] < aim:
            found.append(f"{row['ctas_per_sm']} CTAs/SM where the config aims at {aim}")
        else:
            # the cliff that matters is the one below the aim: a config above its aim (3 CTAs/SM
            # aiming at 2) may lose the extra CTA without a problem
            margin = row["regs_to_cliff"]
            if row["ctas_per_sm"] > aim and {"registers", "shared", "num_warps"} <= row.keys():
                margin = regs_to_cliff(row["arch"], row["registers"], row["shared"], row["num_warps"], aim)
            # a register cap (maxnreg, else the 255 registers a thread may hold) that itself keeps the
            # aim holds the occupancy whatever the compiler needs: more would spill, a problem of its
            # own (4 warps at 255 registers still fit 2 CTAs/SM)
            cap = row.get("max_registers") or MAX_REGISTERS_PER_THREAD
            if {"shared", "num_warps"} <= row.keys() and ctas_per_sm(
                    row["arch"], cap, row["shared"], row["num_warps"]) >= aim:  # fmt: skip
                margin = CLIFF_MARGIN_REGS
            if margin < CLIFF_MARGIN_REGS:
                found.append(f"{margin} registers to the occupancy cliff (< {CLIFF_MARGIN_REGS}, "
                             f"aims at {aim} CTAs/SM)")  # fmt: skip
    return found


def harmless_spill(row: dict[str, Any]) -> bool:
    """A spill of at most ``HARMLESS_SPILL_BYTES`` whose local loads and stores the SASS shows, all
    outside every loop (``local_in_loops`` 0): it runs once per program, not once per iteration.
    Rows without SASS loop figures (csrc's ptxas rows) never qualify."""
    if row.get("local_in_loops") != 0 or not row.get("local_stores", 0) + row.get("local_loads", 0):
        return False
    return max(row.get(k) or 0 for k in ("stack", "local", "spill_stores", "spill_loads")) <= HARMLESS_SPILL_BYTES


def _spill_place(row: dict[str, Any]) -> str:
    inside = row.get("local_in_loops")
    if inside is None:
        return ""
    total = row.get("local_stores", 0) + row.get("local_loads", 0)
    return f" ({inside} of {total} local loads/stores inside a loop)"


def problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled configuration, Triton's or csrc's (empty when it is fine):
    it does not compile, spills (unless ``harmless_spill``), uses more shared memory than the
    architecture allows per block, is an fp16/bf16 matmul-bound kernel without HGMMA on sm_90, or
    has a ``model_problems`` one."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    found = []
    spilled = {k: row.get(k) or 0 for k in ("stack", "local", "spill_stores", "spill_loads")}
    if any(spilled.values()) and not harmless_spill(row):
        found.append("spills: " + ", ".join(f"{k.replace('_', ' ')} {v} B" for k, v in spilled.items() if v)
                     + _spill_place(row))
    if row["shared"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared']} B over the sm_{row['arch']} limit {row['shared_limit']} B")
    if row["needs_wgmma"] and row["arch"] == 90 and row["hgmma"] == 0:
        found.append("fp16/bf16 matmul without warpgroup MMA (no HGMMA) on sm_90")
    return found + model_problems(row)
