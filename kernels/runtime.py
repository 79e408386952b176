"""Helpers shared by the launchers: the interpreter flag, output allocation, device facts, the GEMM
tile config, tl.dot's precision and the dtype names of ahead-of-time signatures.

``INTERPRETER`` records whether ``TRITON_INTERPRET=1`` was set when the kernels were decorated
(Triton reads it at ``@triton.jit`` time, i.e. at import): a process either interprets or compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to True so that every launcher's outputs start as NaN (floating point) and any
# element a kernel fails to write shows up in the comparison with the reference.
FILL_OUTPUTS_WITH_NAN: bool = False


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints, in plain Python. ``triton.cdiv`` and ``triton.next_power_of_2`` are
    constexpr functions whose host calls cost ~2-5 us each (Triton 3.8, cProfile of the launchers
    with a mock driver), several per launch; the launchers use these two instead.

    Example:
        >>> cdiv(197, 64)
        4
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` <= 1), in plain Python (see ``cdiv``).

    Example:
        >>> next_power_of_2(80)
        128
    """
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def new_output(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device,
               strides: tuple[int, ...] | None = None) -> torch.Tensor:  # fmt: skip
    """``torch.empty`` for a kernel's output (``torch.empty_strided`` with ``strides``: a tensor of its
    own in that layout, not a view); NaN-filled while ``FILL_OUTPUTS_WITH_NAN`` is set."""
    if strides is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    else:
        out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
    if FILL_OUTPUTS_WITH_NAN and out.is_floating_point():
        out.fill_(float("nan"))
    return out


@functools.cache
def cuda_capability(device_index: int) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device_index)


def arch_of(device: torch.device) -> int:
    """The SM architecture as an int (80, 89, 90, ...) of ``device``; 90 for the CPU interpreter."""
    if device.type != "cuda":
        return 90
    major, minor = cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    return major * 10 + minor


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU the current device while launching: Triton launches on the current device,
    which need not be the one holding the tensors (``model.to("cuda:1")`` with cuda:0 current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rows_addressable_in_int32(t: torch.Tensor, rows_per_block: int = 256) -> torch.Tensor:
    """``t`` itself, unless a block of rows (dim -2) spans 2^31 elements or more.

    Kernels keep (batch, head) base offsets in int64 but offsets inside a tile in int32, which
    is exact while ``rows_per_block * stride(-2) < 2**31``. A view whose row stride is larger
    (e.g. a sequence-first packed qkv at a very large batch) is copied once to the contiguous
    layout, where the row stride is the last dim.
    """
    if abs(t.stride(-2)) * rows_per_block < 2**31:
        return t
    return t.contiguous()


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of one GEMM kernel: ``block_m`` x ``block_n`` outputs, ``block_k`` per step, on
    ``num_warps`` warps with ``num_stages`` pipeline stages; ``group_m`` row tiles per group in
    the grouped (L2-friendly) program order of the kernels that use one."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: IEEE for fp32 (tf32 would lose 13
    mantissa bits against the float32 reference), "tf32" otherwise (ignored for 16-bit operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (read once per device); 4 for the CPU
    interpreter, where a "wave" only needs to cross a few programs."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# the names ahead-of-time signatures (fastvit.kernels.aot.signature) give the kernels' tensor dtypes
AOT_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
