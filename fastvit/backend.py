"""Backend selection: which implementation of an op runs.

- ``"auto"`` (default): Triton kernels on CUDA tensors, the ``torch`` route on CPU tensors.
- ``"triton"``: the Triton kernels; on CPU tensors they run in Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment *before* fastvit's kernels are imported.
- ``"torch"``: PyTorch's own best route (SDPA for attention, else the composite of torch ops).
- ``"cuda"``: the C++/CUDA extension ``fastvit._C`` (``csrc/``, Apex/Megatron style: cuBLAS(Lt)
  GEMMs around hand-written LayerNorm, bias+GELU, residual and patchify kernels) for the ops it
  covers (``layernorm_mlp``, ``patch_embed``); the others run their Triton kernels. It is built
  where it runs (``fastvit.extension``); on CPU tensors it runs the extension's CPU loops (the same
  row math, for testing). ``auto`` picks it only where ``python -m benchmarks tune`` measured it
  faster (``fastvit.tuning``).

The choice comes from the innermost ``with fastvit.backend(name):`` block, else the environment
variable ``FASTVIT_BACKEND``, else ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "BACKENDS",
    "CUDA_OPS",
    "FastvitFallbackWarning",
    "backend",
    "current_backend",
    "resolve_backend",
    "warn_once",
]

BACKENDS = ("auto", "triton", "torch", "cuda")
# the ops the extension implements; the others run their Triton kernels under "cuda"
CUDA_OPS = ("layernorm_mlp", "patch_embed")

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
        name: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cuda"``.

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


def interpreter_dtype_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the ``triton`` route cannot run ``dtype`` on ``device``, or None: in Triton's interpreter
    (the ``triton`` route on CPU tensors) ``tl.dot`` multiplies bf16's raw bits (an upstream bug),
    so bf16 results would be garbage; the caller runs the ``torch`` route with one warning.

    Example:
        >>> interpreter_dtype_problem(torch.device("cpu"), torch.bfloat16)  # under TRITON_INTERPRET=1: a reason
    """
    if device.type == "cuda" or dtype != torch.bfloat16:
        return None
    from fastvit.kernels.runtime import INTERPRETER

    return "bfloat16 in Triton's interpreter (its tl.dot is wrong for bf16)" if INTERPRETER else None


def _interpreter_check(device: torch.device) -> None:
    from fastvit.kernels.runtime import INTERPRETER

    if not INTERPRETER:
        raise RuntimeError(
            f"fastvit backend 'triton' on {device.type} tensors runs the Triton kernels in "
            "Triton's interpreter, which needs TRITON_INTERPRET=1 set in the environment before "
            "fastvit's kernels are imported; it was not set then. Set it before starting Python "
            "(TRITON_INTERPRET=1 python ...), or use fastvit.backend('torch') on the CPU."
        )


def _extension_check(device: torch.device) -> None:
    from fastvit import extension

    if not extension.load():
        raise RuntimeError(
            "fastvit backend 'cuda' needs the C++/CUDA extension fastvit._C, which is not available: "
            f"{extension.unavailable_reason()}"
        )
    if device.type == "cuda" and not extension.has_cuda_kernels():
        raise RuntimeError(
            "fastvit backend 'cuda': the extension fastvit._C was built without its CUDA kernels (no CUDA "
            "toolkit was found when it was compiled), so it runs on CPU tensors only. Install a CUDA "
            "toolkit (nvcc) matching torch.version.cuda and rebuild it (fastvit.extension.load(build=True))."
        )


def resolve_backend(device: torch.device, op: str | None = None, bucket: Callable[[], str] | None = None) -> str:
    """The concrete route, ``"triton"``, ``"torch"`` or ``"cuda"``, for ``op`` on ``device``.

    Args:
        device: the tensors' device.
        op: the op's name (``"layernorm_mlp"``, ``"patch_embed"``, ``"flash_attention"``); ops not in
            ``CUDA_OPS`` run their Triton kernels under the ``cuda`` backend.
        bucket: builds the op's tuning-table key (``fastvit.tuning``); ``auto`` on a GPU follows the
            measured winner for it and runs Triton where the table has no entry.

    Raises:
        RuntimeError: ``"triton"`` was asked for on CPU tensors but the kernels were imported
            without ``TRITON_INTERPRET=1``, so they cannot run in the interpreter; or ``"cuda"`` was
            asked for and the extension cannot be built or loaded here (the message says why).
    """
    name = current_backend()
    covered = op in CUDA_OPS
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        if covered and bucket is not None:
            from fastvit import tuning

            if tuning.lookup(device, op, bucket()) == "cuda":
                from fastvit import extension

                if extension.load() and extension.has_cuda_kernels():
                    return "cuda"
                warn_once(
                    "auto:cuda-unavailable",
                    "fastvit: the tuning table prefers the 'cuda' backend here, but the extension is "
                    f"not available ({extension.unavailable_reason()}); running the Triton kernels",
                )
        return "triton"
    if name == "cuda":
        if covered:
            _extension_check(device)
            return "cuda"
        name = "triton"
    if name == "triton" and device.type != "cuda":
        _interpreter_check(device)
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
