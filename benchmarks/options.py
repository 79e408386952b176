"""Helpers every suite uses to read the command line: dtypes, modes, ViT token counts, sizes.

The parsed arguments (``args``) hold the user's choices or None where the suite picks its own
default: ``device`` ("cpu" | "cuda"), ``dtype`` (a name from ``DTYPES``), ``mode`` ("fwd",
"fwd+bwd" or "both"), ``seq_lens``, ``batch``, ``heads``, ``head_dim`` (None or ints), ``quick``,
``budget`` (seconds per point or None), ``threads`` (None or CPU threads per worker), ``impls``
(None or names), ``model``, ``resolutions``, ``deadline`` (None or a ``time.monotonic()`` value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["DTYPES", "modes", "square_grid", "torch_dtype", "vit_tokens"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
CANONICAL = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in ``DTYPES``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


def canonical_dtype(name: str) -> str:
    torch_dtype(name)
    return CANONICAL.get(name, name)


def modes(args: Any) -> list[str]:
    """The modes to run: ``["fwd"]``, ``["fwd+bwd"]`` or both."""
    return ["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode]


def vit_tokens(resolution: int, patch: int = 16, prefix: int = 1) -> int:
    """Tokens of a ViT at a square resolution: ``prefix + (resolution // patch) ** 2``."""
    return prefix + (resolution // patch) ** 2


def square_grid(n_tokens: int, prefix: int = 1) -> tuple[int, int]:
    """The most nearly square (h, w), h <= w, with h * w = n_tokens - prefix (14 x 14 for 197)."""
    cells = n_tokens - prefix
    if cells < 1:
        raise ValueError(f"{n_tokens} tokens leave no grid after {prefix} prefix tokens")
    h = math.isqrt(cells)
    while cells % h:
        h -= 1
    return h, cells // h


# (model, heads, head_dim): the ViT widths D = heads x head_dim, for the suites sized by width
VIT_WIDTHS = {
    "vit_s": (6, 64),  # 384
    "vit_b": (12, 64),  # 768
    "vit_l": (16, 64),  # 1024
    "vit_h": (16, 80),  # 1280
}


def vit_widths(args: Any, names: Sequence[str]) -> list[tuple[str, int, int]]:
    """(model label, heads, head_dim) of each width to run: ``--heads`` / ``--head-dim`` if given
    (labelled ``D=<width>``), else the named ViT widths."""
    if args.heads or args.head_dim:
        heads, head_dim = args.heads or 12, args.head_dim or 64
        return [(f"D={heads * head_dim}", heads, head_dim)]
    return [(name, *VIT_WIDTHS[name]) for name in names]


def token_sizes(args: Any, sizes: Sequence[tuple[int, int]], rows_per_point: int) -> list[tuple[int, int]]:
    """(batch, tokens per image) of each size to run, fewest token rows first: ``--seq-lens`` (batch
    ``--batch``, else ``rows_per_point // N``), else ``sizes`` (their batch replaced by ``--batch``)."""
    if args.seq_lens:
        chosen = [(args.batch or max(1, rows_per_point // n), n) for n in args.seq_lens]
    else:
        chosen = [(args.batch, n) for _, n in sizes] if args.batch else list(sizes)
    return sorted(set(chosen), key=lambda s: (s[0] * s[1], s[1]))
