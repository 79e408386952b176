"""The shape model: what a benchmark point's shape costs a kernel beyond its machine code, and the
time that predicts, without a GPU.

For one launch of a tiled kernel over a shape:

- ``padded_fraction``: the useful share of the work its tiles compute. Attention at N = 197 with
  128-query and 64-key blocks computes 256 x 256 scores for 197 x 197 useful ones: 0.59; with a
  16-key tail the keys pad to 208 instead of 256: 0.73.
- ``waves``: programs over the SM's resident slots (``SM_COUNT[arch] * ctas_per_sm``), and
  ``wave_efficiency``: the share of those slots the last, partial wave keeps busy, averaged over
  the waves.
- ``predicted_s``: the roofline floor (``benchmarks/roofline.py``'s, measured per run) over the
  kernel's static efficiency: padded fraction x wave efficiency x ``min(1, 1 / loop_issue_ratio)``
  (the static report's hot-loop figure: an issue-bound loop runs the tensor cores at most 1 / ratio
  of the time). A first GPU run calibrates it: the measured time over the prediction is what the
  model misses (memory latency, softmax, the epilogue).

Static figures only: ``ctas_per_sm`` and ``loop_issue_ratio`` come from the static report's rows
(``benchmarks/results/static/figures-triton-<version>.json``).
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["SM_COUNT", "ShapeModel", "attention_forward", "padded_fraction", "predicted_s", "waves"]

# SMs of the parts the architectures stand for: A100 SXM (sm_80), L40S (sm_89), H100/H200 SXM (sm_90)
SM_COUNT = {80: 108, 89: 142, 90: 132}


def _padded(length: int, block: int, tail: int | None = None) -> int:
    """``length`` rounded up to whole blocks; with ``tail``, the last partial block rounds up to
    a multiple of ``tail`` instead (a short last block)."""
    full, rest = divmod(length, block)
    if rest == 0:
        return length
    return full * block + (block if tail is None else -(-rest // tail) * tail)


def padded_fraction(n: int, m: int, block_m: int, block_n: int, key_tail: int | None = None) -> float:
    """Useful share of an (n x m) tiled computation with (block_m x block_n) tiles."""
    if n <= 0 or m <= 0:
        return 1.0
    return (n * m) / (_padded(n, block_m) * _padded(m, block_n, key_tail))


def waves(programs: int, arch: int, ctas_per_sm: int) -> tuple[float, float]:
    """(waves, wave efficiency) of ``programs`` on one GPU of ``arch``."""
    slots = SM_COUNT[arch] * max(1, ctas_per_sm)
    count = programs / slots
    return count, (count / math.ceil(count) if programs else 1.0)


def predicted_s(floor_s: float, efficiency: float) -> float:
    """The roofline floor over the static efficiency."""
    return floor_s / efficiency if efficiency > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class ShapeModel:
    """One benchmark point's shape model."""

    padded_fraction: float
    waves: float
    wave_efficiency: float
    issue_efficiency: float  # min(1, 1 / loop_issue_ratio); 1 where the row has no MMA loop

    @property
    def efficiency(self) -> float:
        return self.padded_fraction * self.wave_efficiency * self.issue_efficiency

    def predicted_s(self, floor_s: float) -> float:
        return predicted_s(floor_s, self.efficiency)


def attention_forward(batch: int, heads: int, n: int, m: int, block_m: int, block_n: int, arch: int,
                      ctas_per_sm: int, loop_issue_ratio: float | None,
                      key_tail: int | None = None) -> ShapeModel:  # fmt: skip
    """The forward attention's shape model: one program per (block_m queries, batch, head), each
    walking all m keys in block_n steps (the non-causal kernel; the figures of the configuration's
    static-report row give ``ctas_per_sm`` and ``loop_issue_ratio``)."""
    programs = math.ceil(n / block_m) * batch * heads
    count, wave_eff = waves(programs, arch, ctas_per_sm)
    issue = 1.0 if not loop_issue_ratio else min(1.0, 1.0 / loop_issue_ratio)
    return ShapeModel(padded_fraction(n, m, block_m, block_n, key_tail), count, wave_eff, issue)
