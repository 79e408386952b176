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
# sm_90 cubins reserve 1 KiB of shared memory per block for the system (.nv.shared.reserved);
# cuobjdump's SHARED counts it, the opt-in limit above does not
SM90_RESERVED_SHARED = 1024


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


def tool(name: str) -> str:
    """Path of a CUDA binary tool (``cuobjdump``, ``nvdisasm``) shipped in Triton's wheel."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# ---------------------------------------------------------------------------------------------
# reading the machine code: cuobjdump's and ptxas's text, per function
# ---------------------------------------------------------------------------------------------
_FUNCTION_USAGE = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_SASS_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
_USAGE_FIELD = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
# an instruction (after an optional predicate such as @P0 or @!UP1), up to its first modifier
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z][A-Z0-9_]*)")


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


def parse_sass(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -sass`` (or ``nvdisasm``) output -> {function: instruction counts}.

    Counts ``hmma`` (warp-level tensor-core MMA, sm_80/89/90), ``hgmma`` (warpgroup MMA, sm_90
    only), and ``local_stores`` / ``local_loads`` (STL / LDL: spilled registers or local arrays).
    """
    out: dict[str, dict[str, int]] = {}
    counts = None
    for line in text.splitlines():
        match = _SASS_FUNCTION.match(line)
        if match:
            counts = out[match.group(1)] = {"hmma": 0, "hgmma": 0, "local_stores": 0, "local_loads": 0}
            continue
        op = _OPCODE.match(line)
        if counts is None or op is None:
            continue
        key = {"HMMA": "hmma", "HGMMA": "hgmma", "STL": "local_stores", "LDL": "local_loads"}.get(op.group(1))
        if key:
            counts[key] += 1
    return out


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
    dynamic = int(compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        cubin = f.name
    try:
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(cubin)
    # one kernel per Triton cubin
    resources = next(iter(parse_resource_usage(usage).values()), {})
    code = next(iter(parse_sass(sass).values()), {})
    report["registers"] = resources.get("REG", -1)
    report["stack"] = resources.get("STACK", 0)
    report["local"] = resources.get("LOCAL", 0)
    # Triton allocates its shared memory dynamically at launch (metadata.shared); the cubin's
    # SHARED (shared_cubin) holds, on sm_90, the 1 KiB system reservation that the opt-in limit excludes
    cubin_shared = resources.get("SHARED", 0)
    report["shared_static"] = max(0, cubin_shared - (SM90_RESERVED_SHARED if spec.arch >= 90 else 0))
    report["shared_dynamic"] = dynamic
    report["shared"] = report["shared_static"] + dynamic
    report["shared_cubin"] = cubin_shared
    report.update(code)
    report["shared_limit"] = SHARED_MEMORY_LIMIT[spec.arch]
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled configuration (empty when it is fine)."""
    if "error" in report:
        return [f"does not compile: {report['error']}"]
    found = []
    spilled = {k: report.get(k) or 0 for k in ("stack", "local", "spill_stores", "spill_loads")}
    if any(spilled.values()):
        found.append("spills: " + ", ".join(f"{k.replace('_', ' ')} {v} B" for k, v in spilled.items() if v))
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
    from fastvit.kernels.runtime import INTERPRETER

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
