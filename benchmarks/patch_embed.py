"""The patch-embed suite: a ViT's stem, images to tokens, fused against the composite it replaces.

    python -m benchmarks patch-embed                      # ViT-B/16 at 224 and 384, batch 256 on a GPU
    python -m benchmarks patch-embed --resolutions 224 --batch 64 --mode fwd

Implementations, on ViT-B/16's stem (3 x r x r images, p = 16, D = heads x head_dim = 768, one cls
token, pos_embed over all 1 + (r/16)^2 tokens), every tensor in ``--dtype``:

- ``eager``: ``nn.Conv2d`` (F.conv2d) + flatten + transpose + ``torch.cat`` of the cls token + pos
  add, as timm's VisionTransformer runs it (the (B, D, r/16, r/16) conv output is materialised);
- ``compiled``: the same function under ``torch.compile(fullgraph=True)`` (inductor);
- ``fastvit[<route>]``: ``fastvit.patch_embed`` under the backend selection in force (``auto``: the
  route the tuning table picks, Triton where it has no entry), labelled with the route that ran;
- ``fastvit-triton``, ``fastvit-cuda``: the same op pinned to one backend (GPU only): the implicit-
  GEMM Triton kernel against the extension's patchify kernel + cuBLAS GEMM.

``fwd`` is inference (no autograd); ``fwd+bwd`` is a training step of the stem: forward, then the
gradients of the weight, bias, cls token and pos_embed (the images do not require grad).
Extra columns: ``bytes_moved``, the compulsory traffic of one call (read the images and the
parameters, write the tokens; the backward also reads the token gradient and the images again and
writes the parameter gradients), and ``gb_per_s``, that traffic over the measured time. FLOPs:
2 * B * N * K * D for the forward GEMM (K = C * p * p), twice that with the weight gradient.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .backends import FASTVIT_IMPLS, fastvit_implementation, fastvit_unavailable
from .measure import Workload, input_sets, op_step, randn, relabel_on_fallback
from .options import modes, torch_dtype, vit_tokens
from .progress import Progress
from .records import Point, Record
from .roofline import patch_embed_bytes
from .runner import applicable_impls, not_run, run_points

__all__ = ["IMPLS", "build", "eager_patch_embed", "flops", "min_bytes", "run"]

NAME = "patch-embed"
IMPLS = ("eager", "compiled", *FASTVIT_IMPLS)
PATCH, IN_CHANS, PREFIX = 16, 3, 1  # ViT-B/16: RGB images, one cls token
RESOLUTIONS = (224, 384)
QUICK_RESOLUTIONS = (224,)
DEFAULT_BATCH = {"cpu": 8, "cuda": 256}
DEFAULT_HEADS, DEFAULT_HEAD_DIM = 12, 64  # D = 768


# ---------------------------------------------------------------------------------------------
# parent side: which points
# ---------------------------------------------------------------------------------------------
def points(args: Any, impl: str) -> list[Point]:
    """The points of one implementation: each mode, resolution increasing."""
    resolutions = sorted(args.resolutions) if args.resolutions else QUICK_RESOLUTIONS if args.quick else RESOLUTIONS
    heads, head_dim = args.heads or DEFAULT_HEADS, args.head_dim or DEFAULT_HEAD_DIM
    return [
        Point(
            suite=NAME,
            impl=impl,
            mode=mode,
            n_tokens=vit_tokens(r, PATCH, PREFIX),
            batch=args.batch or DEFAULT_BATCH[args.device],
            heads=heads,
            head_dim=head_dim,
            dtype=args.dtype,
            device=args.device,
            params={"resolution": r, "patch": PATCH, "in_chans": IN_CHANS, "embed_dim": heads * head_dim},
        )
        for mode in modes(args)
        for r in resolutions
    ]


def _not_here(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run at all here (checked in the parent), or None."""
    if impl == "compiled" and device == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile (inductor) on the CPU needs a C++ compiler; none is on PATH"
    if impl in FASTVIT_IMPLS:
        return fastvit_unavailable(impl, device)
    return None


def run(args: Any, progress: Progress) -> list[Record]:
    """Every implementation in ``args.impls`` (default: all), every mode and resolution."""
    impls = IMPLS if args.impls is None else applicable_impls(NAME, IMPLS, args.impls)
    if getattr(args, "seq_lens", None) and not args.resolutions:  # said, not ignored silently
        print(f"{NAME}: --seq-lens is not used (this suite sweeps image sizes: --resolutions)", file=sys.stderr)
    records = []
    for impl in impls:
        pts = points(args, impl)
        reason = _not_here(impl, args.device)
        records += not_run(pts, "unavailable", reason, progress) if reason else run_points(pts, build, args, progress)
    return records


# ---------------------------------------------------------------------------------------------
# the arithmetic of a point
# ---------------------------------------------------------------------------------------------
def _sizes(point: Point) -> tuple[int, int, int, int, int, int]:
    """(B, C, r, p, D, N) of a point."""
    p = point.params
    n = (p["resolution"] // p["patch"]) ** 2
    return point.batch, p["in_chans"], p["resolution"], p["patch"], p["embed_dim"], n


def flops(point: Point) -> float:
    """2 * B * N * K * D for the forward GEMM; the backward's weight gradient is another such GEMM."""
    b, c, _, p, d, n = _sizes(point)
    forward = 2.0 * b * n * c * p * p * d
    return forward * (2.0 if point.mode == "fwd+bwd" else 1.0)


def min_bytes(point: Point) -> int:
    """Compulsory memory traffic of one call, in bytes (what no implementation can avoid:
    ``roofline.patch_embed_bytes``, the prefix tokens being the point's tokens beyond the grid)."""
    b, c, r, p, d, n = _sizes(point)
    return patch_embed_bytes(b, c, r, p, d, point.n_tokens - n, point.dtype, point.mode)


# ---------------------------------------------------------------------------------------------
# worker side: the implementations and the workload
# ---------------------------------------------------------------------------------------------
def eager_patch_embed(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor, cls_token: torch.Tensor
) -> torch.Tensor:
    """timm's stem: Conv2d, flatten, NCHW -> NLC, prepend the cls token, add pos_embed."""
    tokens = F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + pos_embed


def _implementation(point: Point) -> tuple[Callable[..., torch.Tensor], str]:
    """(fn(x, weight, bias, pos_embed, cls_token), label) for the point's impl."""
    if point.impl == "eager":
        return eager_patch_embed, "eager"
    if point.impl == "compiled":
        return torch.compile(eager_patch_embed, fullgraph=True, dynamic=False), "compiled"
    if point.impl in FASTVIT_IMPLS:
        import fastvit
        from fastvit.backend import resolve_backend
        from fastvit.tuning import patch_embed_bucket

        def fused(x, weight, bias, pos_embed, cls_token):
            return fastvit.patch_embed(x, weight, bias, pos_embed=pos_embed, prefix_tokens=cls_token)

        def bucket() -> str:
            b, c, _, p, d, n = _sizes(point)
            return patch_embed_bucket(c, p, d, torch_dtype(point.dtype), b * n, point.mode != "fwd")

        return fastvit_implementation(
            point.impl, fused, lambda: resolve_backend(torch.device(point.device), "patch_embed", bucket)
        )
    raise ValueError(f"unknown patch-embed implementation {point.impl!r}")


def build(point: Point) -> Workload:
    """Inputs (rotated sets of random images and parameters, and grad_output for fwd+bwd) and the step."""
    dtype, device = torch_dtype(point.dtype), point.device
    fn, label = _implementation(point)
    b, c, r, p, d, n = _sizes(point)
    backward = point.mode == "fwd+bwd"

    def param(*shape: int, scale: float = 1.0) -> torch.Tensor:
        t = randn(shape, dtype=dtype, device=device)
        return t.mul_(scale).requires_grad_(backward)

    def make() -> tuple[torch.Tensor, ...]:
        x = randn((b, c, r, r), dtype=dtype, device=device)
        weight = param(d, c, p, p, scale=(c * p * p) ** -0.5)  # a trained stem's scale: O(1) tokens
        return x, weight, param(d), param(1, PREFIX + n, d, scale=0.02), param(1, PREFIX, d, scale=0.02)

    sets = input_sets(make, device)
    grads = [randn((b, PREFIX + n, d), dtype=dtype, device=device) for _ in sets] if backward else None
    traffic = min_bytes(point)
    workload = Workload(
        step=op_step(fn, sets, point.mode, grads),
        flops=flops(point),
        impl=label,
        extra={"input_sets": len(sets), "bytes_moved": traffic},
        finish=lambda ms: {"gb_per_s": traffic / (ms * 1e-3) / 1e9 if ms > 0 else None},
    )
    if point.impl in FASTVIT_IMPLS:
        workload.after_warmup = relabel_on_fallback(workload)
    return workload
