"""Child process of test_flash_attention_lse_product.py (Triton compiles need TRITON_INTERPRET
unset): compiles the fp32 attention backward kernels for one architecture and prints, as JSON,
how each one forms ``lse * log2 e`` in its PTX.

``kernels.flash_attention.backward_lse`` folds the rounding of that product into dO's rows, so it
assumes the product is rounded to fp32 by itself: an explicit ``mul.f32`` whose result reaches the
exponent only as an fma's addend (directly or through a ``neg``) or through a ``selp`` (ptxas
contracts a multiply into a following add, not into an fma's addend nor across a select). A
product by log2 e fused into an fma with a loaded lse as the other factor would break that.

    python -m tests.kernels.lse_product_ptx 90
"""

from __future__ import annotations

import json
import re
import sys

LOG2E_IMMEDIATES = ("0f3FB8AA3B", "0fBFB8AA3B")  # +-log2(e) as fp32 PTX immediates
# one spec per kernel and variant whose exponent is formed differently (plain, masks, packed, the
# dBias walk with dQ, the short backward)
CONFIGS = (
    "flash_attention_bwd_dkdv_kernel [fp32 D=64 BM",
    "flash_attention_bwd_dkdv_kernel [fp32 D=64 bias=fp32 BM",
    "flash_attention_bwd_dkdv_kernel [fp32 D=64 varlen BM",
    "flash_attention_bwd_dq_kernel [fp32 D=64 BM",
    "flash_attention_bwd_dq_kernel [fp32 D=64 bias=fp32 BM",
    "flash_attention_bwd_dq_kernel [fp32 D=64 bias=fp32 rel_pos+grad",
    "flash_attention_bwd_dbias_kernel [fp32 D=64 dbias (1,H,N,M) split +dq",
    "flash_attention_bwd_dbias_kernel [fp32 D=64 dbias (B,1,1,M)",
    "flash_attention_bwd_short_kernel [fp32 D=64 BM",
    "flash_attention_bwd_short_kernel [fp32 D=64 mask=bool",
)
_PREDICATE = re.compile(r"^@!?%\w+\s+")
_REGISTER = re.compile(r"%\w+")


def _instructions(ptx: str) -> list[tuple[str, list[str], list[str]]]:
    """(opcode, destination registers, source operands) of each PTX instruction; a brace group
    ``{ %r1, %r2 }`` is one operand (a vector load's destinations), an address ``[ %rd4 + 0 ]``
    one operand. Stores have no destination."""
    found = []
    for line in ptx.splitlines():
        line = _PREDICATE.sub("", line.strip())
        if not line.endswith(";") or line.startswith((".", "//", "}", "{")) or " " not in line:
            continue
        opcode, rest = line[:-1].split(None, 1)
        operands, depth, current = [], 0, ""
        for ch in rest:
            depth += 1 if ch in "{[" else -1 if ch in "}]" else 0
            if ch == "," and depth == 0:
                operands.append(current.strip())
                current = ""
            else:
                current += ch
        operands.append(current.strip())
        no_destination = opcode.startswith(("st.", "bar", "ret", "bra", "cp.", "red.", "atom."))
        if no_destination or not operands[0].startswith(("%", "{")):
            found.append((opcode, [], operands))
        else:
            found.append((opcode, _REGISTER.findall(operands[0]), operands[1:]))
    return found


def lse_products(ptx: str, lse_param: str) -> dict:
    """How the kernel multiplies the lse rows it loads (through the pointer parameter
    ``lse_param``) by log2 e: each ``mul.f32`` product with the instructions that take it
    (followed through ``neg``; an fma's addend counted as ``fma-addend``), and the fmas that take
    an lse row and log2 e as their two factors (a fused product)."""
    instructions = _instructions(ptx)
    log2e = set(LOG2E_IMMEDIATES)
    for opcode, dests, sources in instructions:  # registers holding the constant
        if opcode.startswith("mov") and len(dests) == 1 and sources[0] in LOG2E_IMMEDIATES:
            log2e.add(dests[0])
    # the pointer's registers, then the values loaded through them, then what carries them unchanged
    address, rows = set(), set()
    for opcode, dests, sources in instructions:
        regs = {r for s in sources for r in _REGISTER.findall(s)}
        if opcode.startswith("ld.param") and any(lse_param + "]" in s for s in sources):
            address.update(dests)
        elif opcode.startswith("ld.global") and regs & address:
            rows.update(dests)
        elif regs & address and not opcode.startswith("ld."):
            address.update(dests)
        elif opcode.startswith(("mov", "selp", "cvt", "neg")) and regs & rows:
            rows.update(dests)

    def uses(reg: str) -> list[str]:
        found = []
        for opcode, dests, sources in instructions:
            if reg not in sources:
                continue
            if opcode == "neg.f32":
                found += [u for d in dests for u in uses(d)]
            elif opcode.startswith("fma") and sources.index(reg) == 2:
                found.append("fma-addend")
            else:
                found.append(opcode)
        return found

    products, fused = [], []
    for opcode, dests, sources in instructions:
        factors = sources[:2]
        if not (set(factors) & log2e and set(factors) & rows):
            continue
        if opcode == "mul.f32":
            products.append({"mul": f"{opcode} {dests[0]}, {', '.join(sources)}", "uses": uses(dests[0])})
        else:
            fused.append(f"{opcode} {', '.join(dests)}, {', '.join(sources)}")
    return {"products": products, "fused": fused}


def main(arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastvit.benchmarks.static_triton import _resolve, all_specs
    from fastvit.kernels.aot import defaults

    specs = all_specs(("flash_attention",), (arch,))
    result = {}
    for wanted in CONFIGS:
        spec = next(s for s in specs if wanted in f"{s.kernel.split('.')[-1]} [{s.config}")
        fn = _resolve(spec.kernel)
        names = list(spec.signature)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
        unset = {n: v for n, v in defaults(fn).items()
                 if spec.signature.get(n) == "constexpr" and n not in spec.constexprs}  # fmt: skip
        source = ASTSource(fn, dict(spec.signature), constexprs={**unset, **spec.constexprs}, attrs=attrs)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        if spec.max_registers:
            options["maxnreg"] = spec.max_registers
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        # the PTX parameters are the non-constexpr arguments, in order
        index = [n for n, ty in spec.signature.items() if ty != "constexpr"].index("Lse")
        result[f"{spec.kernel} [{spec.config}]"] = lse_products(compiled.asm["ptx"], f"_param_{index}")
    return result


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
