"""The Triton half of the static report: compile every kernel configuration ahead of time, for GPUs
this machine may not have, and read its machine code.

Each kernel module named in ``KERNEL_MODULES`` exposes ``aot_specs() -> list[KernelSpec]``
(``fastvit.kernels.aot``): one spec per (configuration, dtype, head dim or width bucket,
architecture) that its launcher can pick. ``compile_specs`` compiles a batch of one architecture
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads, with the
CUDA tools shipped in Triton's wheel, each kernel's registers, stack frame and shared memory
(``cuobjdump``) and its SASS (the batch's in one ``nvdisasm`` run, ``static_disasm``), and from the
TTGIR the dots' MMA layouts; ``static_model`` turns those into occupancy, the hot loop's issue ratio
and the problems.

Run it in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces ``@triton.jit``
functions at import): ``python -m fastvit.benchmarks.static_triton --json rows.json`` (the
report, ``python -m benchmarks static``, runs it so).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from fastvit.kernels.aot import ARCHS, KernelSpec, defaults

from .static_disasm import disassemble
from .static_model import (
    SHARED_MEMORY_LIMIT,
    SM90_RESERVED_SHARED,
    ctas_per_sm,
    hot_loop,
    loop_efficiency,
    problems,
    regs_to_cliff,
)
from .static_sass import (
    Instruction,
    async_copy,
    instruction_counts,
    local_accesses_in_loops,
    mma_shapes,
    parse_resource_usage,
)
from .static_ttgir import mma_tiles

__all__ = ["KERNEL_MODULES", "all_specs", "batches", "compile_spec", "compile_specs", "main", "model_fields", "run",
           "tool"]

# Kernel modules (under fastvit.kernels) that provide aot_specs().
KERNEL_MODULES: tuple[str, ...] = ("flash_attention", "patch_embed", "layernorm_mlp", "layernorm_mlp_bwd", "rotary")
# the most specs ``run`` compiles in one process call and disassembles in one nvdisasm run
BATCH_SIZE = 12


def tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``) shipped in Triton's wheel."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resolve(kernel: str):
    """The ``@triton.jit`` function of ``"module.fn"`` (a module of fastvit.kernels) or of a full
    dotted path ``"package.module.fn"`` (the tests' hand-made kernels)."""
    module_name, fn_name = kernel.rsplit(".", 1)
    full = module_name if "." in module_name else f"fastvit.kernels.{module_name}"
    return getattr(importlib.import_module(full), fn_name)


def model_fields(
    code: list[Instruction], ttgir: str, arch: int, num_warps: int, registers: int, shared: int
) -> dict[str, Any]:
    """The performance model's fields of one compiled kernel (its SASS instructions and TTGIR text)."""
    tiles = mma_tiles(ttgir)
    loop = hot_loop(code, arch, num_warps)
    ctas = ctas_per_sm(arch, registers, shared, num_warps)
    return {
        **instruction_counts(code),
        "local_in_loops": local_accesses_in_loops(code),
        "ctas_per_sm": ctas,
        "regs_to_cliff": regs_to_cliff(arch, registers, shared, num_warps),
        "mma_shapes": mma_shapes(code),
        "mma_tiles": [t.label() for t in tiles],
        "mma_rows_replicated": any(t.replicated for t in tiles),
        "mma_replicated_tiles": [t.label() for t in tiles if t.replicated],
        "loop_issue_ratio": round(loop.issue_ratio, 3) if loop else None,
        "loop_mufu_ratio": round(loop.mufu_ratio, 3) if loop else None,
        "loop_efficiency": round(loop_efficiency(loop.issue_ratio, loop.mufu_ratio, ctas, loop.serial), 3)
        if loop else None,
        "loop_instructions": loop.instructions if loop else None,
        "loop_conditional_instructions": loop.conditional_instructions if loop else None,
        "loop_mma_cycles": loop.mma_cycles if loop else None,
        "loop_mma_shapes": loop.mma_shapes if loop else None,
        "loop_sixteen_bit": loop.sixteen_bit if loop else False,
        "loop_serial": loop.serial if loop else None,
        "async_copy": async_copy(code),
        "wgmma_wait_pendings": loop.wait_pendings if loop and arch >= 90 else None,
    }


def _compile(spec: KernelSpec) -> tuple[dict[str, Any], Any]:
    """(the spec's row so far, Triton's compiled kernel); the kernel is None and the row holds the
    ``error`` and ``problems`` where it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(spec.kernel)
    arg_names = list(spec.signature)
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    # constexprs the spec leaves out take the kernel's defaults (an optional feature switched off)
    unset = {n: v for n, v in defaults(fn).items() if spec.signature.get(n) == "constexpr" and n not in spec.constexprs}
    source = ASTSource(fn, dict(spec.signature), constexprs={**unset, **spec.constexprs}, attrs=attrs)
    row: dict[str, Any] = {
        "kernel": spec.kernel,
        "config": spec.config,
        "arch": spec.arch,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "needs_wgmma": spec.needs_wgmma,
        "target_ctas_per_sm": spec.target_ctas_per_sm,
        "max_registers": spec.max_registers,
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", spec.arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                     **({"maxnreg": spec.max_registers} if spec.max_registers else {})},
        )
    except Exception as exc:  # reported, and the test fails on it
        row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        row["problems"] = problems(row)
        return row, None
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row, compiled


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of a one-kernel cubin: REG, STACK, SHARED, LOCAL."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    finally:
        os.unlink(path)
    return next(iter(parse_resource_usage(usage).values()), {})  # one kernel per Triton cubin


def _read_machine_code(row: dict[str, Any], spec: KernelSpec, compiled: Any, code: list[Instruction]) -> None:
    """Fill a compiled spec's row: resources, the model's fields (from its SASS ``code``), problems."""
    resources = _resource_usage(compiled.asm["cubin"])
    row["registers"] = resources.get("REG", -1)
    row["stack"] = resources.get("STACK", 0)
    row["local"] = resources.get("LOCAL", 0)
    # Triton allocates its shared memory dynamically at launch (metadata.shared); the cubin's
    # SHARED (shared_cubin) holds, on sm_90, the 1 KiB system reservation that the opt-in limit excludes
    cubin_shared = resources.get("SHARED", 0)
    row["shared_static"] = max(0, cubin_shared - (SM90_RESERVED_SHARED if spec.arch >= 90 else 0))
    row["shared_dynamic"] = int(compiled.metadata.shared)
    row["shared"] = row["shared_static"] + row["shared_dynamic"]
    row["shared_cubin"] = cubin_shared
    row["shared_limit"] = SHARED_MEMORY_LIMIT[spec.arch]
    row.update(model_fields(code, compiled.asm["ttgir"], spec.arch, spec.num_warps, row["registers"], row["shared"]))
    row["problems"] = problems(row)


def compile_specs(specs: list[KernelSpec]) -> list[dict[str, Any]]:
    """Compile specs of one architecture; their rows (resources, MMA counts, the model's fields,
    problems), in order. The cubins are disassembled together, in one nvdisasm run
    (``static_disasm``)."""
    if len({s.arch for s in specs}) > 1:
        raise ValueError("compile_specs takes the specs of one architecture")
    compiled = [(spec, *_compile(spec)) for spec in specs]
    built = [(spec, row, kernel) for spec, row, kernel in compiled if kernel is not None]
    if built:
        code = disassemble([kernel.asm["cubin"] for _, _, kernel in built], built[0][0].arch, tool("nvdisasm"))
        for (spec, row, kernel), (_, instructions) in zip(built, code, strict=True):
            _read_machine_code(row, spec, kernel, instructions)
    return [row for _, row, _ in compiled]


def compile_spec(spec: KernelSpec) -> dict[str, Any]:
    """Compile one spec; return its row (resources, MMA counts, the model's fields, problems)."""
    return compile_specs([spec])[0]


def batches(specs: list[KernelSpec], size: int) -> list[list[int]]:
    """The specs' indices in batches of at most ``size``, each of one architecture (one nvdisasm
    run), in the specs' order within an architecture."""
    by_arch: dict[int, list[int]] = {}
    for index, spec in enumerate(specs):
        by_arch.setdefault(spec.arch, []).append(index)
    return [indices[i : i + size] for indices in by_arch.values() for i in range(0, len(indices), size)]


def all_specs(modules: tuple[str, ...] = KERNEL_MODULES, archs: tuple[int, ...] = ARCHS) -> list[KernelSpec]:
    """Every configuration of every kernel module, for the given architectures."""
    specs = []
    for name in modules:
        module = importlib.import_module(f"fastvit.kernels.{name}")
        specs.extend(s for s in module.aot_specs() if s.arch in archs)
    return specs


def run(
    modules: tuple[str, ...] = KERNEL_MODULES,
    archs: tuple[int, ...] = ARCHS,
    jobs: int | None = None,
    match: str | None = None,
) -> list[dict[str, Any]]:
    """Compile every spec (in parallel processes) whose ``kernel [config]`` contains ``match``."""
    from fastvit.kernels.runtime import INTERPRETER

    if INTERPRETER:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (it is set to 1)")
    specs = [s for s in all_specs(modules, archs) if match is None or match in f"{s.kernel} [{s.config}]"]
    jobs = jobs or os.cpu_count() or 1
    # a dozen specs per nvdisasm run, and several batches per process to keep the processes busy
    # to the end
    groups = batches(specs, max(1, min(BATCH_SIZE, len(specs) // (4 * jobs))))
    grouped = [[specs[i] for i in group] for group in groups]
    if jobs == 1:
        results = [compile_specs(g) for g in grouped]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(compile_specs, grouped, chunksize=1))
    rows: list[dict[str, Any]] = [{}] * len(specs)
    for group, group_rows in zip(groups, results, strict=True):
        for index, row in zip(group, group_rows, strict=True):
            rows[index] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    """Compile, write the rows as JSON, print one line per row to stderr; 1 when any has problems."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--modules", nargs="*", default=list(KERNEL_MODULES))
    parser.add_argument("--archs", nargs="*", type=int, default=list(ARCHS))
    parser.add_argument("--match", help="only the specs whose 'kernel [config]' contains this text")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    rows = run(tuple(args.modules), tuple(args.archs), args.jobs, args.match)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        print(f"sm_{r['arch']} {r['kernel']} [{r['config']}] REG {r.get('registers', '-')} CTAs/SM "
              f"{r.get('ctas_per_sm', '-')} issue {r.get('loop_issue_ratio', '-')} {'; '.join(r['problems'])}",
              file=sys.stderr)  # fmt: skip
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
