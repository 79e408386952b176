"""The attention suite: time and peak memory of self-attention implementations against N.

This module is also the model of a suite. A suite is a module ``benchmarks/<name>.py`` with

- ``run(args, progress) -> list[Record]`` (in the parent process): turn the command line into
  ``Point`` s, one per implementation x mode x size, each group in increasing size; hand them to
  ``runner.run_points`` (or ``runner.not_run`` for an implementation that cannot run here);
- ``build(point) -> Workload`` (module level: it runs in a worker process): make the inputs
  (``measure.input_sets``, random, rotated) and the step (``measure.op_step``); raise
  ``measure.Unavailable(reason)`` when the implementation cannot run.

Everything else (warm-up, timing, peak memory, time limits, out-of-memory handling, records,
tables, plots) is the harness's.

Implementations (``impl``), on (B, H, N, D) self-attention with N = 1 + (r / 16)^2 at resolution r:

- ``eager``: timm's materialised attention, ``softmax((q * scale) @ k^T) @ v``;
- ``axial``: ``fastvit.axial_attention`` on the 1 + h x w token grid (a different model, O(N^1.5));
- ``window``: ``fastvit.window_attention`` with 14 x 14 windows on the same grid, like ViTDet's
  windowed blocks (a different model, O(N * window^2));
- ``sdpa[math|efficient|flash|cudnn]``: ``F.scaled_dot_product_attention`` pinned to one backend
  with ``torch.nn.attention.sdpa_kernel`` (unavailable where the device lacks it);
- ``flash-attn``, ``xformers``: when importable (their (B, N, H, D) layout);
- ``fastvit[<route>]``: ``fastvit.flash_attention`` labelled with the route that ran.

Attention with a learnable bias, as the relative-position models run it (fwd+bwd includes the
bias's gradient):

- ``fastvit+bias[<route>]`` / ``sdpa+bias``: a float ``attn_mask`` of shape (1, H, N, N) that
  requires grad (BEiT's / Swin's gathered relative-position bias), given to
  ``fastvit.flash_attention`` and to ``F.scaled_dot_product_attention``;
- ``fastvit+rel_pos[<route>]`` / ``sdpa+rel_pos``: SAM's decomposed relative position on the
  h x w grid (no cls token: N = h * w), ``rel_h`` (B, H, N, h) and ``rel_w`` (B, H, N, w):
  computed inside fastvit's kernel, materialised as a (B, H, N, N) bias for SDPA.

RoPE models (EVA02, the ``vit_*_rope_*`` ViTs, DINOv3), one cls token left unrotated, q, k and v
views of a packed (B, N, 3, H, D) qkv, timm's fp32 (N - 1, 2D) interleaved embedding; fwd+bwd gives
the packed qkv's gradient:

- ``fastvit+rope[<route>]``: ``fastvit.rotary_qk`` (q and k rotated in one pass) then
  ``fastvit.flash_attention``: the one-pass option of issue 14;
- ``sdpa+rope``: timm's ``EvaAttention`` code, ``apply_rot_embed_cat`` on the patch rows of q and
  of k, ``torch.cat`` of the cls row, ``type_as(v)``, then ``F.scaled_dot_product_attention``.

``--quick`` runs the biased pairs and the RoPE pair only when ``--impls`` names them; the default
CPU run leaves the RoPE pair out too (a GPU run's default measures it).

FLOPs follow flash-attn's convention (forward 4 * B * H * N^2 * D, forward+backward 3.5x; the bias
adds no FLOPs); the axial rows count the work axial attention does,
4 * B * H * D * (h*w * (2P + h + w) + P * N), and the window rows theirs,
4 * B * H * D * (windows * w^2 * (P + w^2) + P * N), padded windows included.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .measure import Unavailable, Workload, input_sets, op_step, randn, relabel_on_fallback
from .options import modes, square_grid, torch_dtype, vit_tokens
from .progress import Progress
from .records import Point, Record
from .roofline import attention_bytes
from .runner import run_impls

__all__ = ["IMPLS", "build", "eager_attention", "flops", "run"]

NAME = "attention"
SDPA_BACKENDS = {
    "sdpa[math]": "MATH",
    "sdpa[efficient]": "EFFICIENT_ATTENTION",
    "sdpa[flash]": "FLASH_ATTENTION",
    "sdpa[cudnn]": "CUDNN_ATTENTION",
}
BIAS_IMPLS = ("fastvit+bias", "sdpa+bias", "fastvit+rel_pos", "sdpa+rel_pos")
ROPE_IMPLS = ("fastvit+rope", "sdpa+rope")
IMPLS = ("eager", "axial", "window", *SDPA_BACKENDS, "flash-attn", "xformers", "fastvit", *BIAS_IMPLS, *ROPE_IMPLS)
# labelled with the route that ran
FASTVIT_IMPLS = ("fastvit", "fastvit+bias", "fastvit+rel_pos", "fastvit+rope")
# --quick (CI's smoke run, 2 minutes on a 2-core CPU) leaves the biased and RoPE pairs out unless named
QUICK_IMPLS = tuple(impl for impl in IMPLS if impl not in BIAS_IMPLS + ROPE_IMPLS)
# the default CPU run leaves the RoPE pair out unless named (its time stays what it was); on a GPU it runs
CPU_DEFAULT_IMPLS = tuple(impl for impl in IMPLS if impl not in ROPE_IMPLS)
PREFIX = 1  # one cls token before the grid
WINDOW = 14  # ViTDet's window (14 x 14 patches of a 1024 px image at patch 16)

# ViT-B/16 token counts at growing resolutions: 197, 577, 1025, 2305, 4097, 8101 on the CPU
# (2 cores: eager attention at 8101 tokens takes ~15 s a call), up to 65537 (4096 px) on a GPU.
RESOLUTIONS = {
    "cpu": (224, 384, 512, 768, 1024, 1440),
    "cuda": (224, 384, 512, 768, 1024, 1536, 2048, 3072, 4096),
}
QUICK_RESOLUTIONS = (224, 320, 384, 512)  # 197, 401, 577, 1025 tokens
DEFAULT_BATCH = {"cpu": 1, "cuda": 4}
DEFAULT_HEADS, DEFAULT_HEAD_DIM = 12, 64  # ViT-B


# ---------------------------------------------------------------------------------------------
# parent side: which points
# ---------------------------------------------------------------------------------------------
def seq_lens(args: Any) -> list[int]:
    if args.seq_lens:
        return sorted(set(args.seq_lens))
    resolutions = QUICK_RESOLUTIONS if args.quick else RESOLUTIONS[args.device]
    return [vit_tokens(r, 16, PREFIX) for r in resolutions]


def attention_bias_elements(point: Point) -> int:
    """Elements of the bias tensors an attention-suite row reads (0 for unbiased rows)."""
    impl, n = point.impl.split("[")[0], point.n_tokens
    if impl.endswith("+bias"):
        return point.heads * n * n  # (1, H, N, N)
    if impl.endswith("+rel_pos"):
        gh, gw = (int(v) for v in point.params["grid"].split("x"))
        return point.batch * point.heads * n * (gh + gw)  # rel_h (B, H, N, h), rel_w (B, H, N, w)
    return 0


def rope_bytes(point: Point) -> int:
    """Compulsory bytes of the RoPE rows' embedding (0 for other rows): timm's fp32 (N - P, 2D)
    [sin, cos] table, read by the forward and again by the backward (the inverse rotation of dq and
    dk). The floor is the rotation fused into the attention's loads, so the rotated q and k are
    never written: a one-pass rotation's extra q and k traffic is above the floor."""
    if not point.impl.split("[")[0].endswith("+rope"):
        return 0
    rows = point.n_tokens - point.params["num_prefix_tokens"]
    return 4 * rows * 2 * point.head_dim * (2 if point.mode == "fwd+bwd" else 1)


def min_bytes(point: Point) -> int:
    """Compulsory bytes of one call (``roofline.attention_bytes``: q, k, v, out, the LSE, the bias;
    the RoPE rows' embedding)."""
    n = point.n_tokens
    return attention_bytes(point.batch, point.heads, n, n, point.head_dim, point.dtype, point.mode,
                           attention_bias_elements(point)) + rope_bytes(point)


def flops(point: Point) -> float:
    """FLOPs of one call (flash-attn's convention; the axial rows count their own work)."""
    b, h, n, d = point.batch, point.heads, point.n_tokens, point.head_dim
    if point.impl == "axial":
        gh, gw = (int(s) for s in point.params["grid"].split("x"))
        p = point.params["num_prefix_tokens"]
        forward = 4.0 * b * h * d * (gh * gw * (2 * p + gh + gw) + p * n)
    elif point.impl == "window":
        gh, gw = (int(s) for s in point.params["grid"].split("x"))
        p, w = point.params["num_prefix_tokens"], point.params["window"]
        windows = -(-gh // w) * -(-gw // w)
        forward = 4.0 * b * h * d * (windows * w * w * (p + w * w) + p * n)
    else:
        forward = 4.0 * b * h * n * n * d
    return forward * (3.5 if point.mode == "fwd+bwd" else 1.0)


def _not_here(impl: str, device: str, dtype: str) -> str | None:
    """Why ``impl`` cannot run at all here (checked in the parent: no worker needed), or None."""
    if impl in ("flash-attn", "xformers"):
        module = "flash_attn" if impl == "flash-attn" else "xformers"
        if importlib.util.find_spec(module) is None:
            return f"{impl} is not installed (pip install {impl})"
        if device != "cuda":
            return f"{impl} runs on CUDA tensors only"
        if impl == "flash-attn" and dtype == "float32":
            return "flash-attn takes float16 and bfloat16 only"
    if impl in ("fastvit", "window", "fastvit+bias", "fastvit+rel_pos", "fastvit+rope"):
        import inspect

        import fastvit

        ops = {"window": ("window_attention",), "fastvit+rope": ("rotary_qk", "flash_attention")}
        for op in ops.get(impl, ("flash_attention",)):
            if not hasattr(fastvit, op):
                return f"fastvit.{op} is not in this build"
        needs = {"fastvit+bias": "attn_mask", "fastvit+rel_pos": "rel_pos"}.get(impl)
        if needs and needs not in inspect.signature(fastvit.flash_attention).parameters:
            return f"fastvit.flash_attention has no {needs} in this build"
    return None


def points(args: Any, impl: str) -> list[Point]:
    """The points of one implementation: each mode, N increasing."""
    out = []
    for mode in modes(args):
        for n in seq_lens(args):
            params: dict[str, Any] = {}
            unavailable = ""
            if (impl in ("axial", "window") or impl.endswith("+rel_pos")) and n <= PREFIX:
                unavailable = f"N = {n} leaves no token grid after the {PREFIX} class token"
            elif impl in ("axial", "window"):
                gh, gw = square_grid(n, PREFIX)
                params = {"grid": f"{gh}x{gw}", "num_prefix_tokens": PREFIX}
                if impl == "window":
                    params["window"] = WINDOW
            elif impl.endswith("+rel_pos"):
                gh, gw = square_grid(n, PREFIX)  # SAM has no cls token: N = h * w
                n, params = gh * gw, {"grid": f"{gh}x{gw}"}
            elif impl.endswith("+rope"):
                params = {"num_prefix_tokens": PREFIX}  # the cls token stays unrotated
            out.append(
                Point(
                    suite=NAME,
                    impl=impl,
                    mode=mode,
                    n_tokens=n,
                    batch=args.batch or DEFAULT_BATCH[args.device],
                    heads=args.heads or DEFAULT_HEADS,
                    head_dim=args.head_dim or DEFAULT_HEAD_DIM,
                    dtype=args.dtype,
                    device=args.device,
                    params=params,
                    unavailable=unavailable,
                )
            )
    # -- one point per (mode, N): rel_pos maps N to an N - 1 grid, so --seq-lens 1,2 gave two rows of
    #    N = 1 (one unavailable); a measurable point wins over an unavailable one --
    kept: dict[tuple[str, int], Point] = {}
    for point in out:
        key = (point.mode, point.n_tokens)
        if key not in kept or (kept[key].unavailable and not point.unavailable):
            kept[key] = point
    return list(kept.values())


def run(args: Any, progress: Progress) -> list[Record]:
    """Every implementation in ``args.impls`` (default: all), every mode and sequence length."""
    default = QUICK_IMPLS if args.quick else (None if args.device == "cuda" else CPU_DEFAULT_IMPLS)
    records, impls = run_impls(
        NAME, IMPLS, args.impls, lambda impl: _not_here(impl, args.device, args.dtype),
        lambda impl: points(args, impl), lambda p: p.n_tokens, build, args, progress, default=default,
    )  # fmt: skip
    order = {mode: i for i, mode in enumerate(modes(args))}
    return sorted(records, key=lambda r: (impls.index(_base(r.impl)), order[r.mode], r.n_tokens))


def _base(impl: str) -> str:
    """ "fastvit+bias[torch]" -> "fastvit+bias" (the label records the route; the point has the name)."""
    return impl.split("[")[0] if impl.split("[")[0] in FASTVIT_IMPLS else impl


# ---------------------------------------------------------------------------------------------
# worker side: the implementations and the workload
# ---------------------------------------------------------------------------------------------
def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm's non-fused path: the (B, H, N, N) scores and probabilities are materialised."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return attn.softmax(dim=-1) @ v


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_with_bias(q, k, v, bias) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _sdpa_materialised_rel_pos(q, k, v, rel_h, rel_w) -> torch.Tensor:
    """SAM's way: the (B, H, N, h * w) bias rel_h[..., j // w] + rel_w[..., j % w], materialised."""
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _packed_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3, H, D) -> q, k, v (B, H, N, D) views, as timm's attention unbinds its packed qkv."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _fastvit_rope(qkv: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The one-pass rotation of q and k, then fastvit's attention (FusedEvaAttention's path)."""
    import fastvit

    q, k, v = _packed_views(qkv)
    q, k = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=PREFIX)
    return fastvit.flash_attention(q.type_as(v), k.type_as(v), v)


def _sdpa_rope(qkv: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """timm's EvaAttention: apply_rot_embed_cat on the patch rows of q and k, the cls row cat back."""
    try:
        from timm.layers import apply_rot_embed_cat
    except ImportError:  # the same math without timm (fastvit's oracle is timm's code, op for op)
        from fastvit.reference import rotary_qk

        def apply_rot_embed_cat(x, emb, half=False):
            return rotary_qk(x, x, emb, rotate_half=half)[0]

    q, k, v = _packed_views(qkv)
    q = torch.cat([q[:, :, :PREFIX], apply_rot_embed_cat(q[:, :, PREFIX:], rope)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :PREFIX], apply_rot_embed_cat(k[:, :, PREFIX:], rope)], dim=2).type_as(v)
    return F.scaled_dot_product_attention(q, k, v)


def _rope_table(rows: int, head_dim: int, device: str) -> torch.Tensor:
    """timm's interleaved fp32 [sin, cos] embedding of ``rows`` tokens (random angles)."""
    angles = (torch.rand(rows, head_dim // 2, device=device) * 20).repeat_interleave(2, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def _probe(fn: Callable, label: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, context) -> None:
    """Run ``fn`` once on a tiny input; an implementation that cannot take it is Unavailable."""
    tiny = tuple(randn(shape, dtype=dtype, device=device) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with context:
                fn(*tiny)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            reasons = [str(w.message).splitlines()[0] for w in caught] or [str(exc).splitlines()[0]]
            why = "; ".join(dict.fromkeys(reasons))
            raise Unavailable(f"{label} cannot run {str(dtype)[6:]} on {device} here: {why}"[:300]) from exc


def attention_route(
    device: str, head_dim: int, dtype: torch.dtype, tokens: int, batch_heads: int, masked: bool, train: bool
) -> str:
    """The route ``fastvit.flash_attention`` takes for such a call under ``auto``: the tuning table's
    choice for its bucket where one is measured (the op reads the same), else the device's default.
    A row's label must say it: after ``tune`` most attention buckets of an H200 ran SDPA, labelled
    ``fastvit[triton]`` before."""
    from fastvit.backend import resolve_backend
    from fastvit.tuning import attention_bucket

    return resolve_backend(
        torch.device(device), "flash_attention",
        lambda: attention_bucket(head_dim, dtype, tokens, batch_heads, False, masked, train),
    )  # fmt: skip


def _implementation(point: Point) -> tuple[Callable, str, Callable[[], Any]]:
    """(fn(q, k, v), label, a factory of the context entered around the calls) for the point's impl."""
    impl = point.impl
    if impl == "eager":
        return eager_attention, impl, contextlib.nullcontext
    if impl == "axial":
        import fastvit

        grid = tuple(int(s) for s in point.params["grid"].split("x"))
        prefix = point.params["num_prefix_tokens"]
        return lambda q, k, v: fastvit.axial_attention(q, k, v, grid, prefix), impl, contextlib.nullcontext
    if impl in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_BACKENDS[impl])
        return _sdpa, impl, lambda: sdpa_kernel([backend])
    if impl == "flash-attn":
        from flash_attn import flash_attn_func

        return flash_attn_func, impl, contextlib.nullcontext
    if impl == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention, impl, contextlib.nullcontext
    if impl == "window":
        import fastvit

        grid = tuple(int(s) for s in point.params["grid"].split("x"))
        prefix, window = point.params["num_prefix_tokens"], point.params["window"]

        def window_attention(q, k, v):
            return fastvit.window_attention(q, k, v, grid, window, num_prefix_tokens=prefix)

        return window_attention, impl, contextlib.nullcontext
    if impl in FASTVIT_IMPLS:
        import fastvit

        masked = impl in ("fastvit+bias", "fastvit+rel_pos")
        route = attention_route(point.device, point.head_dim, torch_dtype(point.dtype), point.n_tokens,
                                point.batch * point.heads, masked, point.mode == "fwd+bwd")  # fmt: skip
        fns = {
            "fastvit": fastvit.flash_attention,
            "fastvit+bias": lambda q, k, v, bias: fastvit.flash_attention(q, k, v, attn_mask=bias),
            "fastvit+rel_pos": lambda q, k, v, rel_h, rel_w: fastvit.flash_attention(q, k, v, rel_pos=(rel_h, rel_w)),
            "fastvit+rope": _fastvit_rope,
        }
        return fns[impl], f"{impl}[{route}]", contextlib.nullcontext
    if impl == "sdpa+bias":
        return _sdpa_with_bias, impl, contextlib.nullcontext
    if impl == "sdpa+rel_pos":
        return _sdpa_materialised_rel_pos, impl, contextlib.nullcontext
    if impl == "sdpa+rope":
        return _sdpa_rope, impl, contextlib.nullcontext
    raise Unavailable(f"unknown attention implementation {impl!r}")


def build(point: Point) -> Workload:
    """Inputs (rotated sets of random q, k, v, and grad_output for fwd+bwd) and the step."""
    dtype, device = torch_dtype(point.dtype), point.device
    fn, label, context = _implementation(point)  # context: a factory (one context per use)
    b, h, n, d = point.batch, point.heads, point.n_tokens, point.head_dim
    bnhd = point.impl in ("flash-attn", "xformers")  # these two take (B, N, H, D)
    shape = (b, n, h, d) if bnhd else (b, h, n, d)
    if point.impl in SDPA_BACKENDS or bnhd:
        tiny = min(n, 8)  # the backend's constraints depend on dtype, head dim and device, not N
        _probe(fn, label, (b, tiny, h, d) if bnhd else (b, h, tiny, d), dtype, device, context())

    backward = point.mode == "fwd+bwd"
    # the extra inputs of the biased impls: a (1, H, N, N) bias, or SAM's rel_h / rel_w tables
    if point.impl.endswith("+bias"):
        extra_shapes = [(1, h, n, n)]
    elif point.impl.endswith("+rel_pos"):
        gh, gw = (int(s) for s in point.params["grid"].split("x"))
        extra_shapes = [(b, h, n, gh), (b, h, n, gw)]
    else:
        extra_shapes = []

    def make() -> tuple[torch.Tensor, ...]:
        if point.impl.endswith("+rope"):  # a packed qkv (its gradient in fwd+bwd) and timm's fp32 table
            qkv = randn((b, n, 3, h, d), dtype=dtype, device=device, requires_grad=backward)
            return qkv, _rope_table(n - point.params["num_prefix_tokens"], d, device)
        shapes = [shape] * 3 + extra_shapes
        return tuple(randn(s, dtype=dtype, device=device, requires_grad=backward) for s in shapes)
    sets = input_sets(make, device)
    grads = [randn(shape, dtype=dtype, device=device) for _ in sets] if backward else None
    workload = Workload(
        step=op_step(fn, sets, point.mode, grads),
        flops=flops(point),
        impl=label,
        context=context(),
        extra={"input_sets": len(sets)},
    )
    if point.impl in FASTVIT_IMPLS:
        workload.after_warmup = relabel_on_fallback(workload)
    return workload
