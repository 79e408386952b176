"""fastvit.kernels.runtime's host-side helpers."""

from __future__ import annotations

import triton

from fastvit.kernels.runtime import cdiv, next_power_of_2


def test_plain_python_cdiv_and_next_power_of_2_match_tritons():
    """The launchers' own cdiv / next_power_of_2 (Triton's are constexpr functions, slow to call
    on the host) give Triton's answers."""
    for a in range(0, 300):
        for b in (1, 2, 16, 32, 64, 128, 197):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(1, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
