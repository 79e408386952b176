"""The shape model: what a benchmark point's shape costs a kernel beyond its machine code, and the
time that predicts, without a GPU.

For one launch of a tiled kernel over a shape:

- ``padded_fraction``: the useful share of the work its tiles compute. Attention at N = 197 with
  128-query and 64-key blocks computes 256 x 256 scores for 197 x 197 useful ones: 0.59; with a
  16-key tail the keys pad to 208 instead of 256: 0.73.
- ``waves``: programs over the SM's resident slots (``SM_COUNT[arch] * ctas_per_sm``), and
  ``wave_efficiency``: the share of those slots the last, partial wave keeps busy, averaged over
  the waves.
- ``loop_efficiency``: the share of the hot loop's time the tensor cores are busy
  (``static_model.loop_efficiency``, which the static report also gives per row), from the static
  report's hot-loop figures (r = the larger of ``loop_issue_ratio`` and ``loop_mufu_ratio``: the
  non-MMA work in MMA-times) and the programs resident per SM (c = ``ctas_per_sm``). A program
  runs its MMAs and its other instructions one after the other (Triton waits on each dot before
  the softmax that reads it, and the warpgroups of one program meet at a barrier per pipeline
  stage); the c programs of an SM overlap one another. So c loop iterations take
  ``max(c, c * r, 1 + r)`` MMA-times: ``c / max(c, c r, 1 + r)``, i.e. 1 / (1 + r) for one program
  per SM and min(1, 1 / r) from two on (while 1 + r <= c max(1, r)).
- ``l2_efficiency``: where the run measured the L2's bandwidth (``roofline.measure_ceilings``'
  ``l2_gbps``), at most that over the K/V bytes the forward's query blocks read per second at the
  matmul peak (every query block reads all of K and V: ``element bytes / (2 block_m)`` bytes per
  FLOP, so 64-row blocks need twice the L2 bandwidth of 128-row ones); 1 where it is unknown.
- ``predicted_s``: the roofline floor (``benchmarks/roofline.py``'s, measured per run) over the
  kernel's static efficiency, padded fraction x wave efficiency x loop efficiency x L2
  efficiency. The measured time over the prediction is what the model misses (memory latency,
  the epilogue, host time).

Calibration, H200, bf16, B=2, H=12, N=4097, forward kernel (attention_quick.py, 2026-12-04,
``benchmarks/results/h200-2026-12-04-session22/``; the measured 673 TFLOP/s matmul peak): the
pointer tiles at D = 64 (2 CTAs/SM, r = 1.14) ran at 420 TFLOP/s, at D = 128 (1 CTA/SM, r = 0.72)
at 311; the TMA tiles at D = 64 (64-row blocks, 3 CTAs/SM, r = 0.885) at 231, at D = 128 (1
CTA/SM, r = 0.67) at 316. Measured over modelled: 1.32, 2.0, 2.8, 2.0 with ``min(1, 1 / r)``
alone, 1.32, 1.18, 2.8, 1.2 with the serial term. The 64-row TMA tiles stay unexplained without a
measured L2 bandwidth (they need 10.5 TB/s of K/V reads at the matmul peak, the 128-row ones 5.3).

Static figures only: ``ctas_per_sm``, ``loop_issue_ratio`` and ``loop_mufu_ratio`` come from the
static report's rows (``benchmarks/results/static/figures-triton-<version>.json``): the plain
forward's for ``fastvit`` rows, the masked forward's for ``fastvit+bias`` (a learnable bias) and
``fastvit+rel_pos`` (the selection-matrix dots up to 64 bins); the masked forward is not yet
calibrated on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable
from typing import Any

from .static_model import loop_efficiency

__all__ = [
    "SHAPE_MODEL_HEADER", "SM_COUNT", "ShapeModel", "arch_of_name", "attention_forward", "attention_forward_rows",
    "load_figures", "loop_efficiency", "main", "padded_fraction", "predicted_s", "run_arch", "waves",
]

# SMs of the parts the architectures stand for: A100 SXM (sm_80), L40S (sm_89), H100/H200 SXM (sm_90)
SM_COUNT = {80: 108, 89: 142, 90: 132}


def _padded(length: int, block: int, tail: int | None = None) -> int:
    """``length`` rounded up to whole blocks; with ``tail``, a partial last block of at most
    ``tail`` keys takes one ``tail``-wide step instead (the forward kernel's BLOCK_TAIL)."""
    full, rest = divmod(length, block)
    if rest == 0:
        return length
    return full * block + (tail if tail is not None and rest <= tail else block)


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
    loop_efficiency: float  # ``loop_efficiency()``; 1 where the row has no MMA loop
    l2_efficiency: float = 1.0  # min(1, measured L2 bandwidth / the K/V reads at the peak); 1 if unknown

    @property
    def efficiency(self) -> float:
        return self.padded_fraction * self.wave_efficiency * self.loop_efficiency * self.l2_efficiency

    def predicted_s(self, floor_s: float) -> float:
        return predicted_s(floor_s, self.efficiency)


def attention_forward(batch: int, heads: int, n: int, m: int, block_m: int, block_n: int, arch: int,
                      ctas_per_sm: int, loop_issue_ratio: float | None,
                      key_tail: int | None = None, loop_mufu_ratio: float | None = None, *,
                      element_bytes: int = 2, l2_gbps: float | None = None,
                      peak_tflops: float | None = None) -> ShapeModel:  # fmt: skip
    """The forward attention's shape model: one program per (block_m queries, batch, head), each
    walking all m keys in block_n steps and one ``key_tail`` step where the last keys fit (the
    non-causal kernel; the figures of the configuration's static-report row give ``ctas_per_sm``,
    ``loop_issue_ratio`` and ``loop_mufu_ratio``). With the run's measured ``l2_gbps`` and matmul
    ``peak_tflops``, the L2 term caps it where the query blocks' K/V reads outrun the L2."""
    programs = math.ceil(n / block_m) * batch * heads
    count, wave_eff = waves(programs, arch, ctas_per_sm)
    loop = loop_efficiency(loop_issue_ratio, loop_mufu_ratio, ctas_per_sm)
    l2 = 1.0
    if l2_gbps and peak_tflops:
        need_gbps = peak_tflops * 1e3 * element_bytes / (2 * block_m)  # K/V bytes per FLOP x FLOP/s
        l2 = min(1.0, l2_gbps / need_gbps)
    return ShapeModel(padded_fraction(n, m, block_m, block_n, key_tail), count, wave_eff, loop, l2)


# ---------------------------------------------------------------------------------------------
# beside the measured rows: the attention suite's fastvit forward rows of a run
# ---------------------------------------------------------------------------------------------
# the forward configurations' labels in the static report ("bf16 D=64 BM=128 BN=64 tail=32 w=8 s=3";
# "bf16 D=64 tma BM=64 ...": the tensor-descriptor tiles Hopper runs for inputs a descriptor can address;
# "bf16 D=64 bias=fp32 BM=...", "bf16 D=64 rel_pos mma k=16 BM=...": the masked variants)
_FWD_LABEL = re.compile(r"^(bf16|fp16|fp32) D=(\d+)(?: (bias=fp32|mask=bool|rel_pos mma k=\d+|rel_pos))?( tma)? "
                        r"BM=(\d+) BN=(\d+)(?: tail=(\d+))? w=\d+ s=\d+$")  # fmt: skip
_FWD_KERNEL = "flash_attention.flash_attention_fwd_kernel"
_DTYPE_LABEL = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# GPU names -> the architecture whose static figures stand for them
_ARCH_OF_NAME = (("H100", 90), ("H200", 90), ("H800", 90), ("GH200", 90), ("A100", 80), ("A800", 80),
                 ("A30", 80), ("L40", 89), ("L4", 89), ("RTX 40", 89), ("Ada", 89))  # fmt: skip
# the attention suite's fastvit rows the model covers: plain, with a learnable bias, with rel_pos
_MODELLED_IMPLS = ("fastvit", "fastvit+bias", "fastvit+rel_pos")
SHAPE_MODEL_HEADER = ["impl", "N", "B x H", "D", "ms", "floor ms", "useful", "waves", "wave eff", "loop eff",
                      "L2 eff", "model ms", "ms / model"]  # fmt: skip


def arch_of_name(device_name: str) -> int | None:
    """The SM architecture of a GPU named like ``torch.cuda.get_device_name`` (None if unknown)."""
    for part, arch in _ARCH_OF_NAME:
        if part in device_name:
            return arch
    return None


def _forward_figures(figures_rows: dict[str, dict[str, Any]], arch: int, dtype: str, head_dim_pad: int,
                     variant: str | None = None) -> tuple[int, int, int | None, dict[str, Any]] | None:  # fmt: skip
    """(block_m, block_n, key tail or None, figures) of the forward configuration for (arch, dtype,
    padded D, ``variant``: None for plain attention, else the report's mask label such as
    ``"bias=fp32"`` or ``"rel_pos mma k=16"``) that the launcher takes: the pointer one, or the
    tensor-descriptor one where the report has it and ``FASTVIT_TMA=1`` asks for it (the benchmark's
    contiguous inputs qualify)."""
    from fastvit.kernels.flash_attention import tma_enabled

    prefix = f"sm_{arch} {_FWD_KERNEL} ["
    found = {}
    for key, row in figures_rows.items():
        if not key.startswith(prefix):
            continue
        label = _FWD_LABEL.match(key[len(prefix):-1])
        if label and label[1] == _DTYPE_LABEL.get(dtype) and int(label[2]) == head_dim_pad and label[3] == variant:
            found[bool(label[4])] = (int(label[5]), int(label[6]), int(label[7]) if label[7] else None, row)
    return (found.get(True) if tma_enabled() else None) or found.get(False)


def _mask_variant(record: Any) -> str | None:
    """The static report's mask label standing for an attention row's fastvit variant: None for
    plain ``fastvit``; the float-bias row for ``fastvit+bias`` (the suite's bias is in q's dtype,
    the report's fp32: same tiles, wider loads); the selection-matrix dots for ``fastvit+rel_pos``
    (its tables are in q's dtype) with the grid's padded bins, the gathers past 64 bins."""
    from fastvit.kernels.flash_attention import REL_POS_FWD_MMA_MAX_PAD, rel_pos_padded

    base = record.impl.split("[")[0]
    if base == "fastvit+bias":
        return "bias=fp32"
    if base == "fastvit+rel_pos":
        bins = max(rel_pos_padded(int(side)) for side in record.extra["grid"].split("x"))
        return f"rel_pos mma k={bins}" if bins <= REL_POS_FWD_MMA_MAX_PAD else "rel_pos"
    return None


def attention_forward_rows(records: Iterable[Any], figures_rows: dict[str, dict[str, Any]],
                           arch: int | None, ceilings: dict[str, Any] | None = None) -> list[list[str]]:  # fmt: skip
    """Table rows (``SHAPE_MODEL_HEADER``) of the shape model beside the measured time, for each
    ``ok`` forward row of fastvit's attention with a roofline floor (plain, ``fastvit+bias`` and
    ``fastvit+rel_pos``: the masked forward's rows of the report, ``_mask_variant``); the block sizes and the
    static figures come from the static report's row of the configuration the launcher picks, the
    L2 term from the run's ``ceilings`` (``l2_gbps`` and the dtype's matmul TFLOP/s) where it has them."""
    from fastvit.kernels.flash_attention import head_dim_padded

    ceilings = ceilings or {}
    rows = []
    if arch is None:
        return rows
    for r in records:
        base, _, route = r.impl.partition("[")
        # the model is of the Triton kernels: a row that ran another route (fastvit[torch] where a
        # tuning table chose SDPA, any row on a CPU) is not one of them
        if (r.suite, r.mode, r.status) != ("attention", "fwd", "ok") or base not in _MODELLED_IMPLS:
            continue
        if route.rstrip("]") != "triton":
            continue
        floor_ms = r.extra.get("floor_ms")
        if not floor_ms or not r.ms:
            continue
        head_dim_pad = head_dim_padded(r.head_dim)
        found = _forward_figures(figures_rows, arch, r.dtype, head_dim_pad, _mask_variant(r))
        if found is None:
            continue
        block_m, block_n, key_tail, fig = found
        model = attention_forward(r.batch, r.heads, r.n_tokens, r.n_tokens, block_m, block_n, arch,
                                  fig.get("ctas_per_sm") or 1, fig.get("loop_issue_ratio"), key_tail,
                                  fig.get("loop_mufu_ratio"), element_bytes=4 if r.dtype == "float32" else 2,
                                  l2_gbps=ceilings.get("l2_gbps"),
                                  peak_tflops=(ceilings.get("matmul_tflops") or {}).get(r.dtype))  # fmt: skip
        predicted_ms = model.predicted_s(floor_ms / 1e3) * 1e3
        rows.append([
            r.impl, str(r.n_tokens), f"{r.batch} x {r.heads}", str(r.head_dim), f"{r.ms:.4g}", f"{floor_ms:.3g}",
            f"{model.padded_fraction:.2f}", f"{model.waves:.2f}", f"{model.wave_efficiency:.2f}",
            f"{model.loop_efficiency:.2f}", f"{model.l2_efficiency:.2f}", f"{predicted_ms:.3g}",
            f"{r.ms / predicted_ms:.3g}",
        ])  # fmt: skip
    return rows


def run_arch(run_meta: dict[str, Any]) -> int | None:
    """The architecture a run's GPU stands for: recorded in its meta, else from its name."""
    if run_meta.get("device") != "cuda":
        return None
    return run_meta.get("arch") or arch_of_name(run_meta.get("device_name") or "")


def load_figures(triton_version: str | None) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The committed static figures of ``triton_version``, else of the newest version there is
    (Triton's code generation differs per version: then the model is approximate); (rows, version)."""
    from .static_figures import FIGURES_DIR, figures_path

    path = figures_path(triton_version)
    if not path.exists():
        found = sorted(FIGURES_DIR.glob("figures-triton-*.json"))
        if not found:
            return {}, None
        path = found[-1]
    data = json.loads(path.read_text())
    return data["rows"], data["meta"].get("triton")


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks shape-model RESULTS.json``: the shape model beside a run's measured
    fastvit attention forward rows (the first GPU run calibrates the model)."""
    import argparse

    from .output import load_results
    from .report import markdown_table

    parser = argparse.ArgumentParser(prog="python -m benchmarks shape-model", description=main.__doc__)
    parser.add_argument("results", help="a run's results.json")
    parser.add_argument("--arch", type=int, help="the GPU's SM architecture (default: from the run)")
    args = parser.parse_args(argv)
    try:
        run_meta, records = load_results(args.results)
    except (OSError, ValueError) as error:  # a missing file, another file, a folder: one line, as compare
        parser.error(f"{args.results}: cannot read a fastvit results.json ({error})")
    arch = args.arch or run_arch(run_meta)
    figures_rows, version = load_figures(run_meta.get("triton"))
    rows = attention_forward_rows(records, figures_rows, arch, run_meta.get("ceilings"))
    if not rows:
        print("no fastvit attention forward rows with a floor on a known GPU architecture in this run")
        return 1
    print(f"shape model: sm_{arch} static figures of Triton {version} (the run used Triton {run_meta.get('triton')})")
    print(markdown_table(SHAPE_MODEL_HEADER, rows))
    return 0
