"""The roofline floor of each benchmarked op and shape, and the device ceilings it is measured against.

For a point, the floor is the least time any implementation could take on this device:

    floor_ms = 1e3 * max(flops / peak_flops, min_bytes / peak_bandwidth)

and each implementation's row gets ``pct_of_floor = 100 * floor_ms / ms`` (100 % = at the floor),
with ``floor_bound`` saying which term set it ("compute" or "memory").

**FLOPs** are the suite's own (its ``flops(point)``, the same number as the TFLOP/s column):
flash-attn's convention for attention (4 B H N M D forward, 3.5x for forward+backward; axial
rows count the work axial attention does), the GEMMs for the mlp (4 T D hidden forward, 3x with
the backward) and patch embed (2 B N K D forward, 2x with the weight gradient), and a nominal
arithmetic count for LayerNorm (8 T D forward, 21 T D forward + backward: no matmul, so its floor
is always the memory term).

**Bytes** are the compulsory traffic of one timed call, element sizes from the point's dtype
(LSE and LayerNorm statistics in fp32):

- the forward reads each input and parameter once and writes each output once; in a training
  step (``fwd+bwd``) it also writes what the backward needs that it cannot recompute without a
  GEMM: attention's LSE (B H N), the mlp's FC1 pre-activation (T x hidden) and LayerNorm mean and
  rstd (2 T fp32) — the FLOPs above count no recomputed GEMM, so neither do the bytes;
- the backward is a separate pass (autograd runs it after the forward returns): it reads each
  tensor it needs once — the gradient of the output, the saved tensors and the inputs it uses
  again — and writes each gradient once.

Per suite (s = the dtype's bytes; attention M = N, self-attention):

- attention ``fwd``: q, k, v read, o written: s B H (2 N D + 2 M D). ``fwd+bwd`` adds the LSE
  written (4 B H N) and the backward's q, k, v, o, dO, LSE read and dq, dk, dv written: in all
  s B H (6 N D + 6 M D) + 8 B H N. (q, k, v are counted again in the backward; a floor that reads
  them once for the whole step is lower by s B H (N D + 2 M D).) Rows with a bias (``+bias``,
  ``+rel_pos``) add the bias's own tensors: read by the forward; read again, and their gradient
  written, by the backward.
  RoPE rows (``+rope``) add timm's fp32 (N - P, 2D) [sin, cos] table, read by the forward and
  again by the backward: the floor of the rotation fused into the attention's loads (a rotation in
  its own pass also writes and reads the rotated q and k, above the floor).
- varlen (packed sequences, T tokens in all): the attention bytes at N = M = T with B = 1 (the
  per-sequence terms are linear in the lengths, so they sum to that); padding is not counted.
- mlp ``fwd``: x, the LayerNorm weight and bias, W1, b1, W2, b2 read, y written. ``fwd+bwd``: the
  forward also writes the pre-activation and the statistics; the backward reads dy, x, the
  statistics, the pre-activation, the LayerNorm weight and bias, W1 and W2 (the biases are not
  needed), and writes dx and every parameter's gradient.
- patch-embed ``fwd``: the images, weight, bias, cls token(s) and pos_embed read, the (B, P+N, D)
  tokens written. ``fwd+bwd`` (the images need no gradient): the backward reads dTokens and the
  images again and writes the gradients of the weight, bias, prefix tokens and pos_embed (the
  suite's ``min_bytes``).
- layernorm ``fwd`` (T = B N rows of width D): x read, weight and bias read, y written:
  s (2 T D + 2 D). ``fwd+bwd``: the forward also writes mean and rstd (8 T); the backward reads dy,
  x again, the weight and mean and rstd (8 T), and writes dx, dweight and dbias: in all
  s (5 T D + 5 D) + 16 T. (The statistics are counted as saved, as PyTorch and fastvit do; a floor
  that recomputes them from x, which the backward reads anyway, is lower by 16 T.)
- model: no floor (a whole network's floor is the sum of its ops'; its rows have per-component
  times only for the forward, and those include ops no suite measures).

**Ceilings** are measured once per harness run, in a fresh worker process, on the run's device
(``measure_ceilings``): the copy bandwidth is a large device-to-device ``copy_`` (1 GiB on a GPU,
four times the last-level cache on a CPU), counted as the bytes read plus written, best of a few
calls; the matmul peak is ``torch.mm`` of n x n matrices (n = 8192 on a GPU, 1024 on a CPU: at
256 CPU fp16 / bf16 matmuls ran at a fifth of their speed at 1024, and 16-bit rows showed up to
400% of the floor), best of a few after a warm-up (0.25 s on a GPU, 0.2 s on a CPU: the first
16-bit CPU calls are slow), in bfloat16 (GPU) or float32 (CPU) and in the run's dtype if
different. CUDA events time the GPU, ``perf_counter`` the CPU. The figures are kept in
results.json's ``meta["ceilings"]`` and stated in summary.md. They are what PyTorch reaches on the
device, not datasheet numbers: a kernel may beat them a little.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .records import Point, Record

__all__ = [
    "SUITES",
    "Cost",
    "annotate",
    "attention_bytes",
    "ceilings_line",
    "cost",
    "element_size",
    "floor",
    "layernorm_bytes",
    "measure_ceilings",
    "mlp_bytes",
    "patch_embed_bytes",
    "varlen_attention_bytes",
]

# suite name -> module of this package (its flops(point) is the FLOP count)
SUITES = {
    "attention": "attention",
    "mlp": "mlp",
    "patch-embed": "patch_embed",
    "layernorm": "layernorm",
    "varlen": "varlen",
}
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
FP32 = 4  # LSE and LayerNorm statistics
_PACKAGE = __package__  # "fastvit.benchmarks"

# measurement sizes (see the module docstring)
CUDA_COPY_BYTES = 1 << 30
CPU_COPY_BYTES = (64 << 20, 512 << 20)  # at least, at most (4x the last-level cache in between)
CUDA_MATMUL_N = 8192
CPU_MATMUL_N = 1024
REPS = {"cuda": 5, "cpu": 3}
CUDA_WARMUP_S = 0.25  # GPU clocks ramp up under load
CPU_WARMUP_S = 0.2  # the first fp16 / bf16 CPU matmuls of a process run at a fraction of their speed
# The L2 ceiling: copy_ of an 8 MiB buffer into another, both resident in the L2 (40-60 MB on
# A100/H100/H200), L2_COPIES times in one CUDA graph (one copy alone is too short to time)
L2_COPY_BYTES = 8 << 20
L2_COPIES = 64


@dataclass(frozen=True)
class Cost:
    """The work of one call: floating-point operations and the fewest bytes that must move."""

    flops: float
    min_bytes: int


def element_size(dtype: str) -> int:
    """Bytes per element of a dtype name ("bfloat16" -> 2)."""
    try:
        return ELEMENT_SIZE[dtype]
    except KeyError:
        raise ValueError(f"no element size for dtype {dtype!r}; known: {sorted(ELEMENT_SIZE)}") from None


# ---------------------------------------------------------------------------------------------
# bytes per op
# ---------------------------------------------------------------------------------------------
def attention_bytes(
    batch: int, heads: int, n: int, m: int, head_dim: int, dtype: str, mode: str, bias_elements: int = 0
) -> int:
    """Compulsory bytes of attention with N queries and M keys (module docstring); ``bias_elements``:
    the elements of an additive bias's own tensors (a (1, H, N, M) mask, or rel_pos's tables), read
    by the forward and, in ``fwd+bwd``, read again and their gradient written by the backward."""
    s, bh = element_size(dtype), batch * heads
    q, kv = n * head_dim, 2 * m * head_dim  # elements per (batch, head)
    forward = s * bh * (q + kv + q) + s * bias_elements  # q, k, v, bias read; o written
    if mode == "fwd":
        return forward
    lse = FP32 * bh * n
    # backward: q, k, v, o, dO, lse, bias read; dq, dk, dv, dbias written
    backward = s * bh * (q + kv + q + q) + lse + s * bh * (q + kv) + 2 * s * bias_elements
    return forward + lse + backward


def varlen_attention_bytes(total_tokens: int, heads: int, head_dim: int, dtype: str, mode: str) -> int:
    """Compulsory bytes of packed variable-length attention over T tokens in all (module docstring):
    each sequence moves attention's bytes at its own length, and those are linear in the lengths,
    so the sum is one (1, H, T, D) attention's. Padding, where an implementation pads, is not
    compulsory and not counted."""
    return attention_bytes(1, heads, total_tokens, total_tokens, head_dim, dtype, mode)


def mlp_bytes(rows: int, dim: int, hidden: int, dtype: str, mode: str, *, gated_hidden_norm: bool = False) -> int:
    """Compulsory bytes of x + fc2(gelu(fc1(layer_norm(x)))) over ``rows`` tokens (module docstring);
    ``gated_hidden_norm``: x + fc2(LN_h(silu(fc1_g(h)) * fc1_x(h))), fc1 (2 hidden, D) in all, the
    hidden norm's weight and bias, a (rows, 2 hidden) pre-activation and its statistics saved."""
    s = element_size(dtype)
    fc1_rows = 2 * hidden if gated_hidden_norm else hidden
    hidden_norm = 2 * hidden if gated_hidden_norm else 0
    params = 2 * dim + fc1_rows * dim + fc1_rows + dim * hidden + dim + hidden_norm  # norms, W1, b1, W2, b2
    forward = s * (rows * dim + params + rows * dim)  # x and parameters read, y written
    if mode == "fwd":
        return forward
    # pre-activation, mean and rstd (and the hidden norm's)
    saved = s * rows * fc1_rows + (4 if gated_hidden_norm else 2) * FP32 * rows
    # backward: dy, x, saved, the norms' weights and biases, W1, W2 read; dx and every parameter
    # gradient written
    reads = 2 * rows * dim + 2 * dim + hidden_norm + (fc1_rows + hidden) * dim
    backward = s * reads + saved + s * (rows * dim + params)
    return forward + saved + backward


def layernorm_bytes(rows: int, dim: int, dtype: str, mode: str) -> int:
    """Compulsory bytes of an affine LayerNorm over ``rows`` rows of width ``dim`` (module docstring)."""
    s = element_size(dtype)
    forward = s * (rows * dim + 2 * dim + rows * dim)  # x, weight and bias read; y written
    if mode == "fwd":
        return forward
    stats = 2 * FP32 * rows  # mean and rstd: written by the forward, read by the backward
    # backward: dy, x and the weight read; dx, dweight and dbias written
    backward = s * (2 * rows * dim + dim) + stats + s * (rows * dim + 2 * dim)
    return forward + stats + backward


def patch_embed_bytes(
    batch: int, in_chans: int, resolution: int, patch: int, dim: int, prefix: int, dtype: str, mode: str
) -> int:
    """Compulsory bytes of patch embedding into (B, prefix + N, D) tokens, pos_embed over all of them."""
    s = element_size(dtype)
    tokens = prefix + (resolution // patch) ** 2
    images = batch * in_chans * resolution * resolution
    params = dim * in_chans * patch * patch + dim + prefix * dim + tokens * dim  # weight, bias, prefix, pos
    forward = s * (images + params + batch * tokens * dim)
    if mode == "fwd":
        return forward
    return forward + s * (batch * tokens * dim + images + params)  # dTokens, images read; gradients written


# ---------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------
def _point(record: Record) -> Point:
    return Point(
        record.suite, record.impl, record.mode, record.n_tokens, record.batch, record.heads, record.head_dim,
        record.dtype, record.device, dict(record.extra),
    )  # fmt: skip


def _suite_module(suite: str) -> Any:
    try:
        return importlib.import_module(f".{SUITES[suite]}", _PACKAGE)
    except ImportError:
        return None


def cost(record: Record) -> Cost | None:
    """FLOPs and compulsory bytes of a record's op and shape, from its suite's ``flops(point)`` and
    ``min_bytes(point)``; None for suites without a floor or a record without their fields."""
    if record.suite not in SUITES or record.dtype not in ELEMENT_SIZE:
        return None
    module = _suite_module(record.suite)
    flops_of, bytes_of = getattr(module, "flops", None), getattr(module, "min_bytes", None)
    if flops_of is None or bytes_of is None:
        return None
    point = _point(record)
    try:
        return Cost(float(flops_of(point)), int(bytes_of(point)))
    except (KeyError, ValueError, TypeError):  # a record without the suite's fields
        return None


def floor(c: Cost, ceilings: dict[str, Any] | None, dtype: str) -> tuple[float, str] | None:
    """(floor_ms, "compute" | "memory") of a cost on a device; None without the dtype's ceilings."""
    if not ceilings:
        return None
    tflops = (ceilings.get("matmul_tflops") or {}).get(dtype)
    gbps = ceilings.get("copy_gbps")
    if not tflops or not gbps:
        return None
    compute_ms = c.flops / (tflops * 1e12) * 1e3
    memory_ms = c.min_bytes / (gbps * 1e9) * 1e3
    return (compute_ms, "compute") if compute_ms >= memory_ms else (memory_ms, "memory")


def annotate(records: Iterable[Record], ceilings: dict[str, Any] | None) -> None:
    """Add ``flops``, ``min_bytes`` and, with ceilings for the dtype, ``floor_ms``, ``floor_bound``
    and ``pct_of_floor`` to the extra fields of every ``ok`` record of the attention, varlen, mlp,
    patch-embed and layernorm suites (in place; running it again changes nothing)."""
    for r in records:
        if r.status != "ok" or not r.ms:
            continue
        c = cost(r)
        if c is None:
            continue
        r.extra.update(flops=c.flops, min_bytes=c.min_bytes)
        found = floor(c, ceilings, r.dtype)
        if found is not None:
            floor_ms, bound = found
            r.extra.update(floor_ms=floor_ms, floor_bound=bound, pct_of_floor=100.0 * floor_ms / r.ms)


# ---------------------------------------------------------------------------------------------
# device ceilings
# ---------------------------------------------------------------------------------------------
def _best_ms(fn: Callable[[], Any], reps: int, cuda: bool, warmup_s: float = 0.0) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` after one call (and ``warmup_s`` more)."""
    import torch

    fn()
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        fn()
        if cuda:
            torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def measure_ceilings(device: str, dtypes: Sequence[str] = (), threads: int | None = None) -> dict[str, Any]:
    """Copy bandwidth and matmul throughput of ``device`` (module docstring); JSON-ready.

    Returns ``{"device", "copy_gbps", "copy_bytes", "l2_gbps" (CUDA: L2-resident copies; else None),
    "matmul_tflops": {dtype: TFLOP/s},
    "matmul_n": {dtype: n}, "reps", "threads", "method", "elapsed_s"}``. Run it in a process of
    its own (``runner.call_in_worker``): on a GPU it creates a CUDA context and allocates ~2.5 GiB.
    """
    import torch

    from .measure import cache_bytes
    from .options import torch_dtype

    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    cuda = device == "cuda"
    reps = REPS["cuda" if cuda else "cpu"]
    names = list(dict.fromkeys(["bfloat16" if cuda else "float32", *dtypes]))
    if cuda:
        copy_bytes = CUDA_COPY_BYTES
    else:
        low, high = CPU_COPY_BYTES
        copy_bytes = max(low, min(high, 4 * cache_bytes(device)))
    warmup_s = CUDA_WARMUP_S if cuda else CPU_WARMUP_S

    def copy_ms() -> float:  # the buffers are freed when it returns
        src = torch.ones(copy_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return _best_ms(lambda: dst.copy_(src), reps, cuda, warmup_s)

    def matmul_ms(dtype: torch.dtype, n: int) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, dtype=dtype, device=device)
        return _best_ms(lambda: torch.mm(a, b, out=out), reps, cuda, warmup_s)

    def l2_gbps() -> float | None:
        """Read + write bandwidth of L2-resident copies (a lower bound of the L2's: copy_'s own
        kernel); None where CUDA graphs are unavailable."""
        try:
            src = torch.ones(L2_COPY_BYTES, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            dst.copy_(src)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(L2_COPIES):
                    dst.copy_(src)
            ms = _best_ms(graph.replay, reps, cuda, warmup_s) / L2_COPIES
        except RuntimeError:
            return None
        return 2.0 * L2_COPY_BYTES / (ms * 1e-3) / 1e9

    copy_gbps = 2.0 * copy_bytes / (copy_ms() * 1e-3) / 1e9
    l2 = l2_gbps() if cuda else None
    tflops, sizes = {}, {}
    for name in names:
        n = sizes[name] = CUDA_MATMUL_N if cuda else CPU_MATMUL_N
        tflops[name] = 2.0 * n**3 / (matmul_ms(torch_dtype(name), n) * 1e-3) / 1e12
    if cuda:
        torch.cuda.empty_cache()
    clock = "CUDA events" if cuda else "perf_counter"
    tf32 = f", TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}" if cuda else ""
    return {
        "device": device,
        "copy_gbps": copy_gbps,
        "copy_bytes": copy_bytes,
        "l2_gbps": l2,
        "matmul_tflops": tflops,
        "matmul_n": sizes,
        "reps": reps,
        "threads": torch.get_num_threads(),
        "method": (
            f"best of {reps} ({clock}{tf32}): copy_ of {copy_bytes} B on {device}, counted as the bytes read plus "
            f"written"
            + (f"; L2: {L2_COPIES} copies of {L2_COPY_BYTES} B in one CUDA graph, read plus written" if cuda else "")
            + "; torch.mm of n x n matrices per dtype, 2 n^3 FLOPs"
        ),
        "elapsed_s": round(time.perf_counter() - start, 2),
    }


def ceilings_line(ceilings: dict[str, Any] | None) -> str:
    """One line for the console and summary.md: what the floors were computed against."""
    if not ceilings:
        return "Device ceilings: not measured (no roofline floor)."
    if "error" in ceilings:
        return f"Device ceilings: could not be measured ({ceilings['error']}); no roofline floor."
    mm = ", ".join(f"{name} {value:.3g}" for name, value in ceilings.get("matmul_tflops", {}).items())
    l2 = f", L2 copy {ceilings['l2_gbps']:.4g} GB/s" if ceilings.get("l2_gbps") else ""
    return (
        f"Device ceilings: copy {ceilings['copy_gbps']:.4g} GB/s (read + write){l2}, matmul {mm} TFLOP/s, "
        f"{ceilings.get('threads')} threads; {ceilings['method']}. "
        "`% floor` = 100 x floor / time, floor = max(FLOPs / matmul peak, compulsory bytes / copy bandwidth)."
    )
