"""The fastvit rows of the op suites: ``fastvit`` (the backend selection in force, ``auto`` by
default, labelled with the route that ran) and the pinned ``fastvit-triton`` / ``fastvit-cuda`` /
``fastvit-torch`` (one route each, labelled with their own name; ``torch`` is PyTorch's own
composite, the third candidate of ``python -m benchmarks tune``), so one run compares the routes
and what ``auto`` made of them."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["FASTVIT_IMPLS", "PINNED", "backend_unavailable", "fastvit_implementation", "fastvit_unavailable"]

PINNED = {"fastvit-triton": "triton", "fastvit-cuda": "cuda", "fastvit-torch": "torch"}
FASTVIT_IMPLS = ("fastvit", *PINNED)


def fastvit_unavailable(impl: str, device: str) -> str | None:
    """Why the benchmark row ``impl`` is not run on ``device`` (checked in the parent, which also
    builds the extension once for the workers to load), or None."""
    if impl == "fastvit-triton" and device != "cuda":
        return "the Triton kernels run on a CPU only in Triton's interpreter: a test path, not a benchmark"
    if impl == "fastvit-cuda" and device != "cuda":
        return "the cuda backend's CPU loops are its test path, not a CPU implementation worth timing"
    if impl == "fastvit-torch" and device != "cuda":
        return "on a CPU the fastvit row runs this route already"
    return backend_unavailable(impl, device)


def backend_unavailable(impl: str, device: str) -> str | None:
    """Why the pinned row ``impl`` cannot run on ``device`` at all, or None (``tune`` uses this
    directly: on a CPU it may compare the interpreter with the CPU loops, to test itself)."""
    if impl == "fastvit-triton" and device != "cuda":
        from fastvit.kernels.runtime import INTERPRETER

        if not INTERPRETER:
            return "the Triton kernels run on a CPU only in Triton's interpreter, and TRITON_INTERPRET=1 was not set"
    if impl == "fastvit-cuda":
        from fastvit import extension

        if not extension.load():
            return f"the extension fastvit._C is not available: {extension.unavailable_reason()}"
        if device == "cuda" and not extension.has_cuda_kernels():
            return "the extension fastvit._C was built without its CUDA kernels (no CUDA toolkit at build time)"
    return None


def fastvit_implementation(
    impl: str, op: Callable[..., torch.Tensor], route: Callable[[], str]
) -> tuple[Callable[..., torch.Tensor], str]:
    """(fn, label) for a fastvit row: ``op`` itself under the selection in force, labelled
    ``fastvit[<route()>]``; or ``op`` inside ``fastvit.backend(<pinned>)``, labelled ``impl``."""
    if impl == "fastvit":
        return op, f"fastvit[{route()}]"
    import fastvit

    name = PINNED[impl]

    def pinned(*args: torch.Tensor) -> torch.Tensor:
        with fastvit.backend(name):
            return op(*args)

    return pinned, impl
