"""What the tests expect differently on the torch versions fastvit supports (torch >= 2.11)."""

from __future__ import annotations

import torch

_ALL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

# opcheck's test_schema, which runs the op inside torch's SchemaCheckMode, failed for flash_attention_fwd
# and its varlen twin on torch 2.11 (H200, 2026-12-04: "Pointer argument (at 1) cannot be accessed
# from Triton (cpu tensor?)") while every direct call of those ops passed there; torch 2.14 passes it.
# Not yet understood: the other three checks still run on every version.
OPCHECK_UTILS = _ALL if TORCH_VERSION >= (2, 14) else _ALL[1:]
