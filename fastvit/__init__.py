"""fastvit: fused GPU kernels for Vision Transformers.

Public API::

    fastvit.flash_attention(q, k, v, *, scale=None, causal=False, return_lse=False)
    with fastvit.backend("auto" | "triton" | "torch"): ...
"""

from fastvit.backend import FastvitFallbackWarning, backend, current_backend

__version__ = "0.1.0"

__all__ = [
    "FastvitFallbackWarning",
    "backend",
    "current_backend",
]
