"""The tolerance rule (flash-attn's), kept in one place.

A kernel's max abs error against the float64 reference may be at most ``FACTOR`` times the error of
the same reference math run in the input dtype, plus a small absolute slack ``ATOL[dtype]``.
On the CPU, PyTorch's fp16/bf16 matmuls accumulate in fp32 internally and round the result, so the
low-precision reference's error is the rounding of each intermediate to the input dtype.
"""

from __future__ import annotations

import torch

FACTOR = 2.0
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference, compared on the CPU (a GPU result against a CPU reference is fine)."""
    if not actual.numel():
        return 0.0
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def assert_close_to_reference(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    lowp: torch.Tensor,
    *,
    name: str,
    dtype: torch.dtype | None = None,
    factor: float = FACTOR,
    atol: float | None = None,
) -> None:
    """Check ``actual`` against the float64 ``oracle`` with the budget set by ``lowp``.

    Args:
        actual: the kernel's result.
        oracle: the reference computed on float64 copies of the inputs.
        lowp: the same reference computed in the input dtype.
        name: what is compared (``"dq"``), for the message.
        dtype: the input dtype that picks the slack (default: ``actual.dtype``).
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output or overflow)"
    dtype = dtype or actual.dtype
    slack = ATOL[dtype] if atol is None else atol
    err = max_error(actual, oracle)
    budget = factor * max_error(lowp, oracle) + slack
    assert err <= budget, f"{name}: max error {err:.3e} > {factor} x {max_error(lowp, oracle):.3e} + {slack:.1e}"
