"""The layernorm suite: LayerNorm alone, the extension's CUDA blocks against PyTorch's own kernels.

    python -m benchmarks layernorm              # ViT-S/B/L/H widths at 256 x 197 and 64 x 1025 tokens (GPU)
    python -m benchmarks layernorm --heads 12 --head-dim 64 --seq-lens 197 --batch 256 --mode fwd+bwd

Implementations, on ``F.layer_norm`` over the last dim of (batch x N, D) tokens (width D = heads x
head_dim, affine weight and bias, eps 1e-6), every tensor in ``--dtype``:

- ``eager``: ``F.layer_norm``: PyTorch's own CUDA kernels (its CPU kernels on a CPU);
- ``compiled``: the same function under ``torch.compile(fullgraph=True)`` (inductor, default mode);
- ``fastvit-cuda``: the extension's LayerNorm blocks, ``torch.ops.fastvit_C.layer_norm_fwd`` and
  ``layer_norm_bwd`` (fp32 statistics saved by the forward, deterministic dW/dB), in a thin
  ``torch.autograd.Function`` of this module (``CudaLayerNorm``). GPU only: on a CPU the
  extension's loops are its test path and the row is ``unavailable``, with the reason.

``fwd`` is inference (no autograd); ``fwd+bwd`` is forward, then the gradients of x, weight and
bias. There is no backward-only row and no derived backward column: every number is a measured
call. To compare the backward (the issue's "CUDA LayerNorm backward at least as fast as
PyTorch's"), subtract an implementation's ``fwd`` row from its ``fwd+bwd`` row at the same shape;
the rows are sorted so that those two sit next to each other (width, then token rows, then
implementation, then mode).

Sizes: ``n_tokens`` is N per image and ``batch`` the images, so a point has batch x N token rows;
``heads`` x ``head_dim`` encodes the width (ViT-S 6 x 64, ViT-B 12 x 64, ViT-L 16 x 64, ViT-H
16 x 80), as in the mlp suite, so ``--heads`` / ``--head-dim`` pick one width.

Extra columns: ``dim`` (D) and ``model`` (the width's label). FLOPs: LayerNorm is memory-bound and
its arithmetic is no matmul, so the count is only a nominal one, kept small and explicit so that
the roofline floor is the memory term: 8 per element forward (mean: 1 add; variance: subtract,
square, add; normalise: subtract, multiply; affine: multiply, add) and 21 per element forward +
backward (13 more: x-hat 2, dy * w 1, db 1, dw 2, the two row sums 3, dx 4). The TFLOP/s column is
that count over the time, not a measure of anything the GPU is good at; read ``% floor``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .backends import fastvit_unavailable
from .measure import Unavailable, Workload, input_sets, op_step, randn
from .options import VIT_WIDTHS, modes, token_sizes, torch_dtype, vit_widths
from .progress import Progress
from .records import Point, Record
from .roofline import layernorm_bytes
from .runner import run_impls

__all__ = ["IMPLS", "CudaLayerNorm", "build", "cuda_layer_norm", "eager_layer_norm", "flops", "points", "run"]

NAME = "layernorm"
IMPLS = ("eager", "compiled", "fastvit-cuda")
EPS = 1e-6
FLOPS_PER_ELEMENT = {"fwd": 8, "fwd+bwd": 21}  # nominal (module docstring)

# (batch, tokens per image): ViT-B/16 at 224 px (cls + 14 x 14) and at 512 px (cls + 32 x 32)
SIZES = {"cuda": ((256, 197), (64, 1025)), "cpu": ((4, 197),)}
QUICK = {"cuda": (("vit_b",), ((64, 197),)), "cpu": (("vit_b",), ((2, 197),))}
DEFAULT_WIDTHS = {"cuda": tuple(VIT_WIDTHS), "cpu": ("vit_s", "vit_b")}
ROWS_PER_POINT = {"cuda": 50432, "cpu": 788}  # --seq-lens without --batch: batch = this // N


# ---------------------------------------------------------------------------------------------
# parent side: which points
# ---------------------------------------------------------------------------------------------
def _widths(args: Any) -> list[tuple[str, int, int]]:
    """(model label, heads, head_dim) of each width to run."""
    return vit_widths(args, QUICK[args.device][0] if args.quick else DEFAULT_WIDTHS[args.device])


def _sizes(args: Any) -> list[tuple[int, int]]:
    """(batch, tokens per image) of each size to run, fewest token rows first."""
    return token_sizes(args, QUICK[args.device][1] if args.quick else SIZES[args.device], ROWS_PER_POINT[args.device])


def points(args: Any, impl: str) -> list[Point]:
    """The points of one implementation: each width, size and mode."""
    return [
        Point(
            suite=NAME,
            impl=impl,
            mode=mode,
            n_tokens=n,
            batch=batch,
            heads=heads,
            head_dim=head_dim,
            dtype=args.dtype,
            device=args.device,
            params={"model": model, "dim": heads * head_dim},
        )
        for model, heads, head_dim in _widths(args)
        for batch, n in _sizes(args)
        for mode in modes(args)
    ]


def _not_here(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run at all here (checked in the parent), or None."""
    if impl == "compiled" and device == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile (inductor) on the CPU needs a C++ compiler; none is on PATH"
    if impl == "fastvit-cuda":
        return fastvit_unavailable(impl, device)
    return None


def run(args: Any, progress: Progress) -> list[Record]:
    """Every implementation in ``args.impls`` (default: all), every width, size and mode; the records
    sorted by width, token rows, implementation and mode (each fwd row above its fwd+bwd row)."""
    records, impls = run_impls(
        NAME, IMPLS, args.impls, lambda impl: _not_here(impl, args.device), lambda impl: points(args, impl),
        lambda p: p.params["dim"] * p.batch * p.n_tokens, build, args, progress,
    )  # fmt: skip
    order = {impl: i for i, impl in enumerate(impls)}
    return sorted(
        records,
        key=lambda r: (r.extra.get("dim", 0), r.batch * r.n_tokens, order.get(r.impl, len(order)), r.impl, r.mode),
    )


# ---------------------------------------------------------------------------------------------
# the arithmetic of a point
# ---------------------------------------------------------------------------------------------
def min_bytes(point: Point) -> int:
    """Compulsory bytes of one call (``roofline.layernorm_bytes``)."""
    return layernorm_bytes(point.batch * point.n_tokens, point.params["dim"], point.dtype, point.mode)


def flops(point: Point) -> float:
    """Nominal: 8 per element forward, 21 per element forward + backward (module docstring)."""
    return float(FLOPS_PER_ELEMENT[point.mode] * point.batch * point.n_tokens * point.params["dim"])


# ---------------------------------------------------------------------------------------------
# worker side: the implementations and the workload
# ---------------------------------------------------------------------------------------------
def eager_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.layer_norm`` over the last dim, eps 1e-6 (timm's ViT norms)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


class CudaLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim through the extension's blocks: ``layer_norm_fwd`` saves the fp32
    mean and rstd, ``layer_norm_bwd`` returns dx, dweight and dbias (only those asked for)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        # (..., D) -> (rows, D): the op needs a unit last stride, any row stride
        x2d = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, x.shape[-1])
        y, mean, rstd = torch.ops.fastvit_C.layer_norm_fwd(x2d, weight, bias, eps, x.dtype)
        ctx.save_for_backward(x2d, weight, mean, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, weight, mean, rstd = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        grad2d = (grad if grad.stride(-1) == 1 else grad.contiguous()).reshape(-1, grad.shape[-1])
        dx, dweight, dbias = torch.ops.fastvit_C.layer_norm_bwd(grad2d, x2d, weight, mean, rstd, needs)
        return (
            dx.view(ctx.x_shape) if needs[0] else None,
            dweight if needs[1] else None,
            dbias if needs[2] else None,
            None,
        )


def cuda_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``CudaLayerNorm`` with eps 1e-6 (load the extension first: ``fastvit.extension.load()``)."""
    return CudaLayerNorm.apply(x, weight, bias, EPS)


def _implementation(point: Point) -> Callable[..., torch.Tensor]:
    """fn(x, weight, bias) for the point's impl."""
    if point.impl == "eager":
        return eager_layer_norm
    if point.impl == "compiled":
        return torch.compile(eager_layer_norm, fullgraph=True, dynamic=False)
    if point.impl == "fastvit-cuda":
        from fastvit import extension

        if not extension.load():  # the parent built it; the worker loads the cached build
            raise Unavailable(f"the extension fastvit._C is not available: {extension.unavailable_reason()}")
        return cuda_layer_norm
    raise ValueError(f"unknown layernorm implementation {point.impl!r}")


def build(point: Point) -> Workload:
    """Inputs (rotated sets of random tokens, weight and bias, and grad_output for fwd+bwd) and the step."""
    dtype, device = torch_dtype(point.dtype), point.device
    fn = _implementation(point)
    b, n, d = point.batch, point.n_tokens, point.params["dim"]
    backward = point.mode == "fwd+bwd"

    def make() -> tuple[torch.Tensor, ...]:
        # a trained norm's scales: weight near 1, bias near 0
        return (
            randn((b, n, d), dtype=dtype, device=device, requires_grad=backward),
            randn((d,), dtype=dtype, device=device).mul_(0.1).add_(1.0).requires_grad_(backward),
            randn((d,), dtype=dtype, device=device).mul_(0.1).requires_grad_(backward),
        )

    sets = input_sets(make, device)
    grads = [randn((b, n, d), dtype=dtype, device=device) for _ in sets] if backward else None
    return Workload(
        step=op_step(fn, sets, point.mode, grads),
        flops=flops(point),
        impl=point.impl,
        extra={"input_sets": len(sets)},
    )
