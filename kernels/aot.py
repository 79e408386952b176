"""What the kernels tell the static report: ``KernelSpec``, one compilable configuration, and
``ARCHS``, the architectures every configuration is compiled for.

Each kernel module exposes ``aot_specs() -> list[KernelSpec]``: one spec per (configuration,
dtype, head dim or width bucket, architecture) that its launcher can pick. The report
(``python -m benchmarks static``; the compile and the reading of the machine code live in
``fastvit.benchmarks.static_*``) compiles them for GPUs this machine may not have.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

__all__ = ["ARCHS", "KernelSpec", "defaults", "signature"]

# The architectures the kernels are configured and checked for: A100 (sm_80), L4/L40/RTX 40xx
# (sm_89), H100/H200 (sm_90). The one list: the static report and the specs both use it.
ARCHS: tuple[int, ...] = (80, 89, 90)


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
        target_ctas_per_sm: the programs per SM the configuration is sized for; at 2 or more the
            report asks for 8 registers of headroom below the occupancy cliff.
        max_registers: ptxas's register cap per thread (Triton's ``maxnreg`` launch option), or None.
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
    target_ctas_per_sm: int = 1
    max_registers: int | None = None


def signature(kernel: Any, types: dict[str, str]) -> dict[str, str]:
    """The ahead-of-time signature of a ``@triton.jit`` kernel, in its argument order
    (``kernel.arg_names``): the Triton type of each argument named in ``types`` (pointers, fp32
    scalars, ``"constexpr"`` for a None pointer or a constant stride), ``"constexpr"`` for the
    kernel's ``tl.constexpr`` parameters and for optional pointers (a default of None), ``"i32"``
    for the rest (sizes and strides). Constexprs a spec gives no value take the kernel's default
    (``defaults``).

    Raises ValueError for a name in ``types`` that the kernel does not take (a stale spec).
    Works on interpreted kernels too (their annotations are read from the Python function).
    """
    names = list(kernel.arg_names)
    unknown = [n for n in types if n not in names]
    if unknown:
        raise ValueError(f"{getattr(kernel, '__name__', kernel)} has no argument(s) {unknown}; it takes {names}")
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters

    def kind(name: str) -> str:
        param = params[name]
        return "constexpr" if "constexpr" in str(param.annotation) or param.default is None else "i32"

    return {n: types.get(n) or kind(n) for n in names}


def defaults(kernel: Any) -> dict[str, Any]:
    """The kernel's parameters that have a default value, name -> default."""
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    return {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
