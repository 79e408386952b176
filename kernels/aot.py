"""Ahead-of-time compile of every kernel configuration, for GPUs this machine may not have.

Each kernel module exposes ``aot_specs() -> list[KernelSpec]``: one spec per (configuration,
dtype, head dim or width bucket, architecture) that its launcher can pick. This module compiles
them with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the
machine code with the ``cuobjdump`` shipped in Triton's wheel: registers per thread, stack frame
(non-zero means spills), shared memory, and the MMA instructions (HMMA on sm_80/89, HGMMA =
warpgroup MMA on sm_90).

Run it in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces ``@triton.jit``
functions at import): ``python -m fastvit.kernels.aot --json report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

# Kernel modules (under fastvit.kernels) that provide aot_specs().
KERNEL_MODULES: tuple[str, ...] = ("flash_attention", "patch_embed", "layernorm_mlp")

ARCHS: tuple[int, ...] = (80, 89, 90)

# Largest shared memory one block may use, per architecture (bytes, opt-in maximum).
SHARED_MEMORY_LIMIT: dict[int, int] = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compilable kernel configuration.

    Attributes:
        kernel: the ``@triton.jit`` function's module and name, ``"flash_attention._fwd_kernel"``.
        config: a short human label of the configuration (dtype, head dim, block sizes, ...).
        signature: argument name -> Triton type (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``).
        constexprs: values of the ``constexpr`` arguments.
        num_warps, num_stages: launch options.
        arch: SM architecture, e.g. 90.
        needs_wgmma: True for an fp16/bf16 matmul-bound kernel, which must use HGMMA on sm_90.
        divisible_by_16: arguments (pointers, strides) the runtime specialises as 16-divisible.
    """

    kernel: str
    config: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    arch: int
    needs_wgmma: bool = False
    divisible_by_16: tuple[str, ...] = ()


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resolve(kernel: str):
    module_name, fn_name = kernel.rsplit(".", 1)
    module = importlib.import_module(f"fastvit.kernels.{module_name}")
    return getattr(module, fn_name)


def compile_spec(spec: KernelSpec) -> dict[str, Any]:
    """Compile one spec; return its resource report (registers, stack, shared, MMA counts)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(spec.kernel)
    arg_names = list(spec.signature)
    attrs = {(arg_names.index(a),): [["tt.divisibility", 16]] for a in spec.divisible_by_16}
    source = ASTSource(fn, dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    report: dict[str, Any] = {
        "kernel": spec.kernel,
        "config": spec.config,
        "arch": spec.arch,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "needs_wgmma": spec.needs_wgmma,
    }
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", spec.arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as exc:  # reported, and the test fails on it
        report["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        return report
    report["compile_s"] = round(time.perf_counter() - start, 2)
    report["shared"] = int(compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    report["registers"] = int(fields.get("REG", -1))
    report["stack"] = int(fields.get("STACK", 0))
    report["local"] = int(fields.get("LOCAL", 0))
    report["hgmma"] = len(re.findall(r"\bHGMMA\.", sass))
    report["hmma"] = len(re.findall(r"\bHMMA\.", sass))
    report["shared_limit"] = SHARED_MEMORY_LIMIT[spec.arch]
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled configuration (empty when it is fine)."""
    if "error" in report:
        return [f"does not compile: {report['error']}"]
    found = []
    if report["stack"] or report["local"]:
        found.append(f"spills: stack frame {report['stack']} B, local {report['local']} B")
    if report["shared"] > report["shared_limit"]:
        limit = report["shared_limit"]
        found.append(f"shared memory {report['shared']} B over the sm_{report['arch']} limit {limit} B")
    if report["needs_wgmma"] and report["arch"] == 90 and report["hgmma"] == 0:
        found.append("fp16/bf16 matmul without warpgroup MMA (no HGMMA) on sm_90")
    return found


def all_specs(modules: tuple[str, ...] = KERNEL_MODULES, archs: tuple[int, ...] = ARCHS) -> list[KernelSpec]:
    """Every configuration of every kernel module, for the given architectures."""
    specs = []
    for name in modules:
        module = importlib.import_module(f"fastvit.kernels.{name}")
        specs.extend(s for s in module.aot_specs() if s.arch in archs)
    return specs


def run(
    modules: tuple[str, ...] = KERNEL_MODULES, archs: tuple[int, ...] = ARCHS, jobs: int | None = None
) -> list[dict[str, Any]]:
    """Compile every spec (in parallel processes); return one report per spec."""
    from fastvit.kernels import INTERPRETER

    if INTERPRETER:
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset (it is set to 1)")
    specs = all_specs(modules, archs)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_spec(s) for s in specs]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(compile_spec, specs, chunksize=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the reports to this file")
    parser.add_argument("--modules", nargs="*", default=list(KERNEL_MODULES))
    parser.add_argument("--archs", nargs="*", type=int, default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    reports = run(tuple(args.modules), tuple(args.archs), args.jobs)
    bad = 0
    for r in reports:
        found = problems(r)
        bad += bool(found)
        regs = r.get("registers", "-")
        print(
            f"sm_{r['arch']} {r['kernel']:<45} {r['config']:<48} REG {regs!s:>3} STACK {r.get('stack', '-')!s:>4} "
            f"SMEM {r.get('shared', '-')!s:>6} HGMMA {r.get('hgmma', '-')!s:>3} HMMA {r.get('hmma', '-')!s:>4}"
            + (f"  <-- {'; '.join(found)}" if found else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    print(f"{len(reports)} configurations, {bad} with problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
