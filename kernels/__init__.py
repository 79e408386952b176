"""Triton kernels and their launchers, installed as ``fastvit.kernels``.

No autograd and no nn here: tensors in, tensors out. Validation happens once, at the op boundary
(``fastvit.ops``); launchers assume valid input.

``INTERPRETER`` records whether ``TRITON_INTERPRET=1`` was set when the kernels were decorated
(Triton reads it at ``@triton.jit`` time, i.e. at import): a process either interprets or compiles.
"""

import os

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
