"""Backend selection: which implementation of an op runs.

- ``"auto"`` (default): Triton kernels on CUDA tensors, the ``torch`` route on CPU tensors.
- ``"triton"``: the Triton kernels; on CPU tensors they run in Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment *before* fastvit's kernels are imported.
- ``"torch"``: PyTorch's own best route (SDPA for attention, else the composite of torch ops).

The choice comes from the innermost ``with fastvit.backend(name):`` block, else the environment
variable ``FASTVIT_BACKEND``, else ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch

__all__ = [
    "BACKENDS",
    "FastvitFallbackWarning",
    "backend",
    "current_backend",
    "resolve_backend",
    "warn_once",
]

BACKENDS = ("auto", "triton", "torch")

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastvit_backend", default=None)
_warned: set[str] = set()


class FastvitFallbackWarning(UserWarning):
    """A valid call the fused kernels do not cover ran on the ``torch`` route instead."""


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the fastvit ops inside the block on backend ``name``.

    Args:
        name: ``"auto"``, ``"triton"`` or ``"torch"``.

    Example:
        >>> with fastvit.backend("torch"):
        ...     out = fastvit.flash_attention(q, k, v)
    """
    token = _selected.set(_check_name(name, "backend name"))
    try:
        yield
    finally:
        _selected.reset(token)


def current_backend() -> str:
    """The selected backend name: the innermost ``backend()`` block, else ``FASTVIT_BACKEND``, else auto."""
    name = _selected.get()
    if name is not None:
        return name
    env = os.environ.get("FASTVIT_BACKEND")
    if env:
        return _check_name(env.strip().lower(), "environment variable FASTVIT_BACKEND")
    return "auto"


def resolve_backend(device: torch.device) -> str:
    """The concrete route, ``"triton"`` or ``"torch"``, for tensors on ``device``.

    Raises:
        RuntimeError: ``"triton"`` was asked for on CPU tensors but the kernels were imported
            without ``TRITON_INTERPRET=1``, so they cannot run in the interpreter.
    """
    name = current_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda":
        from fastvit.kernels import INTERPRETER

        if not INTERPRETER:
            raise RuntimeError(
                f"fastvit backend 'triton' on {device.type} tensors runs the Triton kernels in "
                "Triton's interpreter, which needs TRITON_INTERPRET=1 set in the environment before "
                "fastvit's kernels are imported; it was not set then. Set it before starting Python "
                "(TRITON_INTERPRET=1 python ...), or use fastvit.backend('torch') on the CPU."
            )
    return name


def warn_once(key: str, message: str) -> None:
    """Emit ``FastvitFallbackWarning(message)`` the first time ``key`` is seen in this process.

    Silent while ``torch.compile`` traces (a warning there would break the graph); the eager
    call that precedes or follows compilation warns as usual.
    """
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(message, FastvitFallbackWarning, stacklevel=3)
