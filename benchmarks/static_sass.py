"""Reading machine code for the static report: cuobjdump's and ptxas's text, per function.

- ``parse_resource_usage``: ``cuobjdump --dump-resource-usage`` (registers, stack, shared, local);
- ``parse_ptxas_log``: ``ptxas -v`` (spill bytes, registers and static shared memory per kernel);
- ``sass_functions``: ``cuobjdump -sass`` as a list of instructions per function, and over those
  ``instruction_counts`` (MMA, local loads/stores), ``mma_shapes`` (the MMA histogram),
  ``async_copy`` (TMA / cp.async / none) and ``loops`` (the bodies of backward branches).

Only text parsing lives here; what the figures mean is ``static_model``'s job.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = [
    "Instruction",
    "async_copy",
    "instruction_counts",
    "local_accesses_in_loops",
    "loops",
    "mma_shape",
    "mma_shapes",
    "parse_instruction",
    "parse_ptxas_log",
    "parse_resource_usage",
    "parse_sass",
    "sass_functions",
    "skipped_in_loop",
    "warp_mma_results_read",
    "wgmma_wait_pendings",
]

_FUNCTION_USAGE = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_USAGE_FIELD = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
# an instruction: its address, an optional predicate (@P0, @!UP1, @PT), the opcode with its
# modifiers (HGMMA.64x64x16.F32.BF16), then the operands up to the ';'
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)")
# HMMA's shape is written as digits: 16816 = m16 n8 k16, 1688 = m16 n8 k8, 884 = m8 n8 k4
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}
_COUNTED = {"HMMA": "hmma", "HGMMA": "hgmma", "STL": "local_stores", "LDL": "local_loads"}
_DEPBAR = re.compile(r"gsb0\s*,\s*(0x[0-9a-f]+|\d+)")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One SASS instruction: ``address`` in bytes, ``opcode`` with its modifiers
    (``HGMMA.64x16x16.F32.BF16``), ``operands`` (the text up to the ';'), ``predicated``."""

    address: int
    opcode: str
    operands: str
    predicated: bool = False

    @property
    def name(self) -> str:
        """The opcode without modifiers: ``HGMMA``."""
        return self.opcode.split(".", 1)[0]

    @property
    def branch_target(self) -> int | None:
        """The address a ``BRA`` jumps to; None for other instructions (or an indirect branch)."""
        if self.name != "BRA":
            return None
        match = _BRANCH_TARGET.search(self.operands.strip())
        return int(match.group(1), 16) if match else None


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG", "STACK", "SHARED", "LOCAL"}}.

    The output lists each function as ``Function NAME:`` followed by a line of ``KEY:VALUE``
    fields (``REG:`` registers per thread, ``STACK:`` stack frame bytes, non-zero when registers
    spill, ``SHARED:`` static shared memory bytes, ``LOCAL:`` local memory bytes).
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        match = _FUNCTION_USAGE.match(line)
        if match:
            current = match.group(1)
            out[current] = {}
            continue
        if current is not None and out[current] == {}:
            fields = {k: int(v) for k, v in _USAGE_FIELD.findall(line)}
            if fields:
                out[current] = fields
    return out


def sass_functions(text: str) -> dict[str, list[Instruction]]:
    """``cuobjdump -sass`` (or ``nvdisasm``) output -> {function: its instructions, in order}.

    Control words (``/* 0x... */`` alone on a line) and comments are not instructions.
    """
    out: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        match = _SASS_FUNCTION.match(line)
        if match:
            current = out[match.group(1)] = []
            continue
        ins = parse_instruction(line)
        if current is not None and ins is not None:
            current.append(ins)
    return out


def parse_instruction(line: str) -> Instruction | None:
    """One line of a SASS listing (``cuobjdump -sass`` or ``nvdisasm``) -> its instruction; None
    for anything else (a control word ``/* 0x... */`` alone, a header, a comment)."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    address, predicate, opcode, operands = match.groups()
    return Instruction(int(address, 16), opcode, operands.strip(), predicate is not None)


def instruction_counts(instructions: list[Instruction]) -> dict[str, int]:
    """``hmma`` (warp-level tensor-core MMA, sm_80/89/90), ``hgmma`` (warpgroup MMA, sm_90 only),
    and ``local_stores`` / ``local_loads`` (STL / LDL: spilled registers or local arrays)."""
    counts = dict.fromkeys(_COUNTED.values(), 0)
    for ins in instructions:
        key = _COUNTED.get(ins.name)
        if key:
            counts[key] += 1
    return counts


def parse_sass(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -sass`` output -> {function: ``instruction_counts``}."""
    return {name: instruction_counts(body) for name, body in sass_functions(text).items()}


def mma_shape(ins: Instruction) -> tuple[str, int, int, int] | None:
    """(histogram key, m, n, k) of a tensor-core MMA; None for any other instruction.

    ``HGMMA.64x16x16.F32.BF16`` -> ``("HGMMA.64x16x16", 64, 16, 16)``;
    ``HMMA.16816.F32.BF16`` -> ``("HMMA.16816", 16, 8, 16)``.
    """
    if ins.name == "HGMMA":
        match = _HGMMA_SHAPE.match(ins.opcode)
        if match:
            m, n, k = (int(g) for g in match.groups())
            return f"HGMMA.{m}x{n}x{k}", m, n, k
    elif ins.name == "HMMA":
        digits = ins.opcode.split(".")[1] if "." in ins.opcode else ""
        if digits in _HMMA_SHAPES:
            return (f"HMMA.{digits}", *_HMMA_SHAPES[digits])
    return None


def mma_shapes(instructions: list[Instruction]) -> dict[str, int]:
    """The MMA instruction histogram, ``{"HGMMA.64x64x16": 16, "HGMMA.64x16x16": 32}``."""
    out: dict[str, int] = {}
    for ins in instructions:
        shape = mma_shape(ins)
        if shape:
            out[shape[0]] = out.get(shape[0], 0) + 1
    return dict(sorted(out.items()))


def async_copy(instructions: list[Instruction]) -> str:
    """How global memory reaches shared memory: ``"tma"`` (UTMALDG, the tensor memory
    accelerator), else ``"cp.async"`` (LDGSTS), else ``"none"`` (loads through registers)."""
    names = {ins.name for ins in instructions}
    if "UTMALDG" in names:
        return "tma"
    if "LDGSTS" in names:
        return "cp.async"
    return "none"


def wgmma_wait_pendings(instructions: list[Instruction]) -> list[int]:
    """The ``pendings`` of every wgmma wait (``WARPGROUP.DEPBAR.LE gsb0, 0xN``), in order: how
    many warpgroup MMA groups may still run when the wait returns (0 = fully synchronous)."""
    out = []
    for ins in instructions:
        if ins.opcode.startswith("WARPGROUP.DEPBAR"):
            match = _DEPBAR.search(ins.operands)
            if match:
                out.append(int(match.group(1), 0))
    return out


_REGISTER = re.compile(r"\bR(\d+)\b")


def warp_mma_results_read(body: list[Instruction]) -> bool:
    """Whether an instruction other than a warp-level MMA (HMMA) in ``body`` reads a register some
    HMMA of ``body`` writes: attention's softmax reading its score tile, not a GEMM main loop,
    whose accumulators only feed the next HMMA. An HMMA writes 4 registers with fp32
    accumulators (m16n8), 2 with fp16 ones; a store's every operand is read, another
    instruction's all but its first (the destination)."""
    written: set[int] = set()
    for ins in body:
        if ins.name == "HMMA":
            match = _REGISTER.search(ins.operands)
            if match:
                width = 4 if ".F32" in ins.opcode else 2
                written.update(range(int(match.group(1)), int(match.group(1)) + width))
    if not written:
        return False
    for ins in body:
        if ins.name == "HMMA":
            continue
        if ins.name.startswith("ST"):
            sources = ins.operands
        elif "," in ins.operands:
            sources = ins.operands.split(",", 1)[1]
        else:
            continue
        if any(int(r) in written for r in _REGISTER.findall(sources)):
            return True
    return False


def loops(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The loop bodies: for each backward branch (a ``BRA`` to a lower address, not to itself), the
    instructions from its target to the branch. Branches to one target give one loop, the longest.
    Code that a loop branches out to and back from (rare in Triton's output) is not counted."""
    ends: dict[int, int] = {}
    for ins in instructions:
        target = ins.branch_target
        if target is not None and target < ins.address:
            ends[target] = max(ends.get(target, target), ins.address)
    return [[i for i in instructions if start <= i.address <= end] for start, end in sorted(ends.items())]


def skipped_in_loop(body: list[Instruction]) -> set[int]:
    """Addresses of a loop body's conditional side code: the instructions that a predicated forward
    branch inside the body jumps over, where that region holds no branch of its own (an ``if``
    without ``else``) and no MMA (a region with the loop's MMAs is its main work, guarded: a
    dBias walk's step skipped outside its rows). Those run only on the iterations that take the
    ``if``."""
    inside = {i.address for i in body}
    skipped: set[int] = set()
    for ins in body:
        target = ins.branch_target
        if not ins.predicated or target is None or target <= ins.address or target not in inside:
            continue
        region = [i for i in body if ins.address < i.address < target]
        if not any(i.name == "BRA" or mma_shape(i) for i in region):
            skipped.update(i.address for i in region)
    return skipped


def local_accesses_in_loops(instructions: list[Instruction]) -> int:
    """How many local-memory loads and stores (LDL / STL: spilled registers or local arrays) lie
    inside a loop body (``loops``): each one runs every iteration. Those outside every loop run once
    per program, such as registers saved before a main loop and restored after it."""
    inside = {i.address for body in loops(instructions) for i in body}
    return sum(1 for i in instructions if i.name in ("LDL", "STL") and i.address in inside)


_PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` output (``nvcc -Xptxas -v``) -> {function: fields}.

    Fields: ``stack``, ``spill_stores``, ``spill_loads`` (bytes), and for entry functions
    (kernels) ``entry`` = 1, ``registers`` and ``smem`` (static shared memory bytes, without the
    system reservation that cuobjdump's SHARED includes on sm_90).
    """
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            out.setdefault(m.group(1), {})["entry"] = 1
        if m := _PTXAS_PROPERTIES.search(line):
            current = m.group(1)
            out.setdefault(current, {})
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            stack, stores, loads = (int(g) for g in m.groups())
            out[current].update(stack=stack, spill_stores=stores, spill_loads=loads)
        elif current is not None and (m := _PTXAS_USED.search(line)):
            out[current]["registers"] = int(m.group(1))
            out[current]["smem"] = int(m.group(2) or 0)
    return out
