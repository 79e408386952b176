"""Disassembling many Triton cubins in one ``nvdisasm`` run, for the static report.

``cuobjdump -sass`` runs ``nvdisasm`` once per cubin, and nvdisasm spends about 0.3 s starting up
whatever it reads: measured on the 2-core CPU machine (Triton 3.8's nvdisasm), 0.37 s for one
32 KiB flash-attention kernel, 0.47 s for four copies of it in one run. With a thousand
configurations that start-up was a fifth of the report's compile time. So the report disassembles
the cubins of one architecture in batches:

1. each Triton cubin holds one kernel, whose machine code is the ELF section ``.text.<kernel>``
   (``code_section``);
2. the sections go one after another into one raw instruction binary, read by
   ``nvdisasm --binary SM<arch>`` (``disassemble``);
3. the listing is split back at the sections' offsets, and each kernel's addresses and branch
   targets rebased to its own start: the instructions ``cuobjdump -sass`` lists for that cubin alone
   (the same text, compared in tests/benchmarks/test_static_disasm.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import re
import struct
import subprocess
import tempfile

from .static_sass import Instruction, parse_instruction

__all__ = ["code_section", "disassemble", "nvdisasm_arch"]

# ELF64, little-endian: e_shoff at 0x28; e_shentsize, e_shnum, e_shstrndx at 0x3a; each section
# header starts with sh_name, sh_type (u32), sh_flags, sh_addr, sh_offset, sh_size (u64)
_ELF_MAGIC = b"\x7fELF\x02\x01"
_SECTION_HEADER = struct.Struct("<IIQQQQ")
# instructions whose last operand is a code address (absolute in nvdisasm's raw listing)
_ADDRESS_OPERAND = frozenset({"BRA", "BSSY", "CALL", "JMP", "BPT"})
_TRAILING_ADDRESS = re.compile(r"0x([0-9a-f]+)$")  # operands come stripped (parse_instruction)


def code_section(cubin: bytes) -> tuple[str, bytes]:
    """(kernel name, machine code) of a cubin holding one kernel: its ``.text.<kernel>`` section.

    Raises ValueError for anything else (not an ELF64 cubin, no kernel or several).
    """
    if not cubin.startswith(_ELF_MAGIC):
        raise ValueError("not a little-endian ELF64 cubin")
    (section_offset,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [_SECTION_HEADER.unpack_from(cubin, section_offset + i * entry_size) for i in range(count)]
    names_offset = headers[names_index][4]
    sections = []
    for name_offset, _, _, _, offset, size in headers:
        start = names_offset + name_offset
        name = cubin[start : cubin.index(b"\0", start)].decode()
        if name.startswith(".text."):
            sections.append((name.removeprefix(".text."), cubin[offset : offset + size]))
    if len(sections) != 1:
        raise ValueError(f"expected one kernel in the cubin, found {len(sections)}")
    return sections[0]


def nvdisasm_arch(arch: int) -> str:
    """nvdisasm's ``--binary`` name of the code Triton compiles for ``arch``: sm_90 code is sm_90a
    (warpgroup MMA), ``SM90a``; ``SM80``, ``SM89``."""
    return f"SM{arch}a" if arch >= 90 else f"SM{arch}"


def _rebased(ins: Instruction, start: int) -> Instruction:
    operands = ins.operands
    if ins.name in _ADDRESS_OPERAND:
        operands = _TRAILING_ADDRESS.sub(lambda m: f"0x{int(m.group(1), 16) - start:x}", operands)
    return dataclasses.replace(ins, address=ins.address - start, operands=operands)


def disassemble(cubins: list[bytes], arch: int, nvdisasm: str) -> list[tuple[str, list[Instruction]]]:
    """Each cubin's (kernel name, instructions), in order, from one ``nvdisasm`` run.

    Args:
        cubins: Triton cubins compiled for ``arch``, one kernel each.
        arch: their compute capability as an integer (80, 89, 90).
        nvdisasm: the path of nvdisasm (Triton's wheel ships one).

    Example:
        >>> [(name, code)] = disassemble([compiled.asm["cubin"]], 90, tool("nvdisasm"))
        >>> mma_shapes(code)  # {"HGMMA.64x64x16": 16, ...}
    """
    if not cubins:
        return []
    sections = [code_section(c) for c in cubins]
    starts = []
    offset = 0
    for _, code in sections:
        starts.append(offset)
        offset += len(code)
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(b"".join(code for _, code in sections))
        raw = f.name
    try:
        listing = subprocess.run([nvdisasm, "--binary", nvdisasm_arch(arch), "--no-vliw", raw], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
    finally:
        os.unlink(raw)
    out: list[tuple[str, list[Instruction]]] = [(name, []) for name, _ in sections]
    for line in listing.splitlines():
        ins = parse_instruction(line)
        if ins is not None:
            index = bisect.bisect_right(starts, ins.address) - 1
            out[index][1].append(_rebased(ins, starts[index]))
    return out
