"""Disassembling many cubins in one nvdisasm run (benchmarks/static_disasm.py): the ELF reader on a
hand-built cubin, the rebasing of addresses and branch targets, and, on kernels compiled for sm_90
and sm_80, the same instructions as ``cuobjdump -sass`` of each cubin alone."""

from __future__ import annotations

import json
import struct

import pytest

from fastvit.benchmarks.static_disasm import _rebased, code_section, nvdisasm_arch
from fastvit.benchmarks.static_sass import Instruction, parse_instruction

from ._aot_process import run_without_interpreter


def _elf(sections: dict[str, bytes]) -> bytes:
    """A minimal little-endian ELF64: a null section, the named ``sections``, the section names."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    header_size, entry = 64, struct.calcsize("<IIQQQQIIQQ")
    body, offsets = b"", []
    for data in [*sections.values(), names]:
        offsets.append(header_size + len(body))
        body += data
    table = header_size + len(body)
    name_at = [names.index(n.encode() + b"\0") for n in [*sections, ".shstrtab"]]
    headers = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    for name, offset, data in zip(name_at, offsets, [*sections.values(), names], strict=True):
        headers += struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, len(data), 0, 0, 0, 0)
    elf = bytearray(b"\x7fELF\x02\x01\x01" + b"\0" * (header_size - 7))
    struct.pack_into("<Q", elf, 0x28, table)
    struct.pack_into("<HHH", elf, 0x3A, entry, len(sections) + 2, len(sections) + 1)
    return bytes(elf) + body + headers


def test_code_section_reads_the_kernels_text_section():
    code = bytes(range(32))
    assert code_section(_elf({".nv.info": b"x" * 8, ".text.my_kernel": code, ".nv.constant0": b"c"})) == (
        "my_kernel", code)  # fmt: skip


@pytest.mark.parametrize("sections", [{".nv.info": b"x"}, {".text.a": b"\0" * 16, ".text.b": b"\0" * 16}])
def test_code_section_wants_one_kernel(sections):
    with pytest.raises(ValueError, match="one kernel"):
        code_section(_elf(sections))


def test_code_section_wants_an_elf64_cubin():
    with pytest.raises(ValueError, match="ELF64"):
        code_section(b"\0" * 64)


def test_rebasing_moves_addresses_and_branch_targets_not_immediates():
    branch = parse_instruction("        /*8700*/              @!P0 BRA 0xfdc0 ;")
    assert _rebased(branch, 0x8000) == Instruction(0x700, "BRA", "0x7dc0", predicated=True)
    assert _rebased(branch, 0x8000).branch_target == 0x7DC0
    sync = parse_instruction("        /*8010*/                   BSSY B0, 0x8100 ;")
    assert _rebased(sync, 0x8000).operands == "B0, 0x100"
    move = parse_instruction("        /*8020*/                   MOV R1, 0x3f800000 ;")
    assert _rebased(move, 0x8000) == Instruction(0x20, "MOV", "R1, 0x3f800000")


def test_nvdisasm_arch_names_triton_s_targets():
    assert [nvdisasm_arch(a) for a in (80, 89, 90)] == ["SM80", "SM89", "SM90a"]


# Compiled without TRITON_INTERPRET in a subprocess (this process may interpret): the hand-made
# kernels of _static_kernels for sm_90 (warpgroup MMA) and sm_80, disassembled as one batch that
# holds the first kernel twice (the second copy at an offset), and each alone by cuobjdump -sass
COMPARE = """
import dataclasses, json, os, subprocess, sys, tempfile
from fastvit.benchmarks.static_disasm import disassemble
from fastvit.benchmarks.static_sass import sass_functions
from fastvit.benchmarks.static_triton import _compile, tool
from tests.benchmarks._static_kernels import SPECS

out = {}
for arch in (90, 80):
    specs = [dataclasses.replace(SPECS[n], arch=arch) for n in ("chained 64 rows on 4 warps", "integer-heavy loop")]
    cubins = [_compile(s)[1].asm["cubin"] for s in specs]
    batch = disassemble([cubins[0], cubins[1], cubins[0]], arch, tool("nvdisasm"))
    alone = []
    for cubin in cubins:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(cubin)
        text = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        os.unlink(f.name)
        alone.append(next(iter(sass_functions(text).items())))
    out[arch] = {
        "same": [batch[i] == alone[j] for i, j in ((0, 0), (1, 1), (2, 0))],
        "names": [name for name, _ in batch],
        "instructions": [len(code) for _, code in batch],
        "branches": [sum(i.branch_target is not None for i in code) for _, code in batch],
    }
json.dump(out, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("static-disasm") / "compared.json"
    run_without_interpreter(COMPARE, out, "compiling or disassembling the hand-made kernels", timeout=600)
    return {int(arch): figures for arch, figures in json.loads(out.read_text()).items()}


@pytest.mark.parametrize("arch", [90, 80])
def test_one_run_lists_what_cuobjdump_lists_for_each_cubin(compared, arch):
    figures = compared[arch]
    assert figures["same"] == [True, True, True]
    assert figures["names"] == ["tile_dot_kernel"] * 3
    assert min(figures["instructions"]) > 100 and min(figures["branches"]) > 0  # loops: rebased targets
