"""Helpers shared by the launchers: output allocation and device facts."""

from __future__ import annotations

import functools

import torch

# Tests set this to True so that every launcher's outputs start as NaN (floating point) and any
# element a kernel fails to write shows up in the comparison with the reference.
FILL_OUTPUTS_WITH_NAN: bool = False


def new_output(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for a kernel's output; NaN-filled while ``FILL_OUTPUTS_WITH_NAN`` is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if FILL_OUTPUTS_WITH_NAN and out.is_floating_point():
        out.fill_(float("nan"))
    return out


@functools.lru_cache(maxsize=None)
def cuda_capability(device_index: int) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return torch.cuda.get_device_capability(device_index)


def arch_of(device: torch.device) -> int:
    """The SM architecture as an int (80, 89, 90, ...) of ``device``; 90 for the CPU interpreter."""
    if device.type != "cuda":
        return 90
    major, minor = cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    return major * 10 + minor
