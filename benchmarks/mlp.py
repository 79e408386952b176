"""The mlp suite: the LayerNorm + MLP half of a ViT block, fused against the composite it replaces.

    python -m benchmarks mlp                    # ViT-S/B/L/H widths at 256 x 197 and 64 x 1025 tokens (GPU)
    python -m benchmarks mlp --heads 12 --head-dim 64 --seq-lens 197 --batch 256 --mode fwd

Implementations, on ``x + fc2(gelu(fc1(layer_norm(x))))`` (timm's pre-norm Block; width D = heads x
head_dim, hidden 4 D, eps 1e-6, exact GELU), every tensor in ``--dtype``:

- ``eager``: the composite of torch ops (F.layer_norm, F.linear, F.gelu, the residual add), as
  timm runs it: LN(x), fc1's output and GELU's output are materialised;
- ``compiled``: the same function under ``torch.compile(fullgraph=True)`` (inductor, default mode);
- ``compiled-max-autotune``: ``mode="max-autotune"`` (inductor autotunes Triton GEMM templates
  with fused epilogues; GPU only: on the CPU it would only add minutes of compilation);
- ``fastvit[<route>]``: ``fastvit.layernorm_mlp`` under the backend selection in force (``auto``:
  the route the tuning table picks, Triton where it has no entry), labelled with the route that ran;
- ``fastvit-triton``, ``fastvit-cuda``: the same op pinned to one backend (``fastvit.backend``), so
  a run compares the Triton kernels with the extension's cuBLAS + CUDA-kernel route (GPU only).

``fwd`` is inference (no autograd); ``fwd+bwd`` is a training step: forward, then the gradients of
x and of every parameter. Sizes: ``n_tokens`` is N per image and ``batch`` the images, so a point
has batch x N token rows; ``heads`` x ``head_dim`` encodes the width (ViT-S 6 x 64, ViT-B 12 x 64,
ViT-L 16 x 64, ViT-H 16 x 80).

Variants (``variant`` column): ``gelu``, the above at each width; ``swiglu_hidden_norm``, EVA02-B's
MLP half (``eva02_b`` rows, run by default beside ViT-B's width unless ``--heads`` / ``--head-dim``
or ``--quick`` pick the widths): ``x + fc2(LN_h(silu(fc1_g(LN(x))) * fc1_x(LN(x))))``, D = 768,
hidden 2048 per projection, every bias, timm's ``scale_mlp`` LayerNorm (``LN_h``) before fc2; for
fastvit one ``layernorm_mlp(..., fc1_gate_weight=..., hidden_norm="layernorm")`` call.

Extra columns: ``dim``, ``hidden``, ``model``, ``variant``; and for ``fwd+bwd`` points ``saved_bytes``, the bytes
autograd keeps for the backward (the activation memory: every tensor the forward saves, not
counting the inputs and parameters), measured with ``saved_tensors_hooks`` in one extra, untimed
forward after the timing. FLOPs: the GEMMs, 4 * T * D * hidden forward (T token rows; 6 * T * D *
hidden for the gated variant's three projections), three times that for forward+backward (fastvit
recomputes the norms and the activation, never a GEMM).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .backends import FASTVIT_IMPLS, fastvit_implementation, fastvit_unavailable
from .measure import Workload, input_sets, op_step, randn, relabel_on_fallback
from .options import VIT_WIDTHS, modes, token_sizes, torch_dtype, vit_widths
from .progress import Progress
from .records import Point, Record
from .roofline import mlp_bytes
from .runner import run_impls

__all__ = ["IMPLS", "build", "eager_mlp", "eager_swiglu_hidden_norm", "flops", "run", "saved_bytes"]

NAME = "mlp"
IMPLS = ("eager", "compiled", "compiled-max-autotune", *FASTVIT_IMPLS)
MLP_RATIO = 4
EPS = 1e-6

# (batch, tokens per image): ViT-B/16 at 224 px (cls + 14 x 14) and at 512 px (cls + 32 x 32)
SIZES = {"cuda": ((256, 197), (64, 1025)), "cpu": ((4, 197), (1, 1025))}
QUICK = {"cuda": (("vit_b",), ((64, 197),)), "cpu": (("vit_s",), ((2, 197),))}
DEFAULT_WIDTHS = {"cuda": tuple(VIT_WIDTHS), "cpu": ("vit_s", "vit_b")}
ROWS_PER_POINT = {"cuda": 50432, "cpu": 788}  # --seq-lens without --batch: batch = this // N
# the variants' rows beside the ViT widths: (model label, heads, head_dim, variant, hidden)
VARIANT_ROWS = (("eva02_b", 12, 64, "swiglu_hidden_norm", 2048),)


# ---------------------------------------------------------------------------------------------
# parent side: which points
# ---------------------------------------------------------------------------------------------
def _widths(args: Any) -> list[tuple[str, int, int]]:
    """(model label, heads, head_dim) of each width to run."""
    return vit_widths(args, QUICK[args.device][0] if args.quick else DEFAULT_WIDTHS[args.device])


def _sizes(args: Any) -> list[tuple[int, int]]:
    """(batch, tokens per image) of each size to run, fewest token rows first."""
    return token_sizes(args, QUICK[args.device][1] if args.quick else SIZES[args.device], ROWS_PER_POINT[args.device])


def _rows(args: Any) -> list[tuple[str, int, int, str, int]]:
    """(model label, heads, head_dim, variant, hidden) of each MLP to run: the ViT widths (GELU,
    hidden 4 D), then the variants' rows unless the widths were picked (``--heads`` / ``--head-dim``,
    ``--quick``)."""
    rows = [(model, heads, head_dim, "gelu", MLP_RATIO * heads * head_dim) for model, heads, head_dim in _widths(args)]
    if not (args.quick or args.heads or args.head_dim):
        rows += list(VARIANT_ROWS)
    return rows


def points(args: Any, impl: str) -> list[Point]:
    """The points of one implementation: each MLP (width and variant), size and mode."""
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
            params={"model": model, "dim": heads * head_dim, "hidden": hidden, "variant": variant},
        )
        for model, heads, head_dim, variant, hidden in _rows(args)
        for batch, n in _sizes(args)
        for mode in modes(args)
    ]


def _not_here(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run at all here (checked in the parent), or None."""
    if impl.startswith("compiled") and device == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile (inductor) on the CPU needs a C++ compiler; none is on PATH"
    if impl == "compiled-max-autotune" and device == "cpu":
        return "max-autotune tunes GPU GEMM kernels; on the CPU it only adds compile time (see 'compiled')"
    if impl in FASTVIT_IMPLS:
        return fastvit_unavailable(impl, device)
    return None


def run(args: Any, progress: Progress) -> list[Record]:
    """Every implementation in ``args.impls`` (default: all), every width, size and mode."""
    records, _ = run_impls(
        NAME, IMPLS, args.impls, lambda impl: _not_here(impl, args.device), lambda impl: points(args, impl),
        lambda p: p.params["dim"] * p.batch * p.n_tokens, build, args, progress,
    )  # fmt: skip
    return sorted(records, key=lambda r: (r.extra.get("dim", 0), r.batch * r.n_tokens, r.mode, r.impl))


# ---------------------------------------------------------------------------------------------
# the arithmetic of a point
# ---------------------------------------------------------------------------------------------
def min_bytes(point: Point) -> int:
    """Compulsory bytes of one call (``roofline.mlp_bytes``)."""
    return mlp_bytes(point.batch * point.n_tokens, point.params["dim"], point.params["hidden"], point.dtype,
                     point.mode, gated_hidden_norm=_variant(point) == "swiglu_hidden_norm")


def flops(point: Point) -> float:
    """The GEMMs: 4 * T * D * hidden forward (gated: 6, three projections); forward+backward three
    times that."""
    rows, dim, hidden = point.batch * point.n_tokens, point.params["dim"], point.params["hidden"]
    per_row = 6.0 if _variant(point) == "swiglu_hidden_norm" else 4.0
    return per_row * rows * dim * hidden * (3.0 if point.mode == "fwd+bwd" else 1.0)


def _variant(point: Point) -> str:
    return point.params.get("variant", "gelu")  # records written before the variants: GELU


def saved_bytes(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> int:
    """Bytes of the tensors autograd keeps for the backward of one ``fn(*inputs)`` (each storage
    once), not counting the inputs' own storages."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(kept.values())


# ---------------------------------------------------------------------------------------------
# worker side: the implementations and the workload
# ---------------------------------------------------------------------------------------------
def eager_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
) -> torch.Tensor:
    """timm's ``x + mlp(norm2(x))``: LayerNorm, Linear, GELU, Linear, residual add."""
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, EPS)
    return x + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def eager_swiglu_hidden_norm(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    fc1_gate_weight: torch.Tensor,
    fc1_gate_bias: torch.Tensor,
    hidden_norm_weight: torch.Tensor,
    hidden_norm_bias: torch.Tensor,
) -> torch.Tensor:
    """timm's EVA02-B MLP half, ``x + mlp(norm2(x))`` with ``SwiGLU(norm_layer=LayerNorm)``:
    fc1_x is ``fc1_weight`` (the value), fc1_g the gate."""
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, EPS)
    g = F.silu(F.linear(h, fc1_gate_weight, fc1_gate_bias)) * F.linear(h, fc1_weight, fc1_bias)
    g = F.layer_norm(g, (g.shape[-1],), hidden_norm_weight, hidden_norm_bias, EPS)
    return x + F.linear(g, fc2_weight, fc2_bias)


def _implementation(point: Point) -> tuple[Callable[..., torch.Tensor], str]:
    """(fn(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias[, fc1_gate_weight,
    fc1_gate_bias, hidden_norm_weight, hidden_norm_bias]), label): the variant's tensors after the
    plain MLP's seven."""
    gated = _variant(point) == "swiglu_hidden_norm"
    eager = eager_swiglu_hidden_norm if gated else eager_mlp
    if point.impl == "eager":
        return eager, "eager"
    if point.impl == "compiled":
        return torch.compile(eager, fullgraph=True, dynamic=False), "compiled"
    if point.impl == "compiled-max-autotune":
        return torch.compile(eager, fullgraph=True, dynamic=False, mode="max-autotune"), point.impl
    if point.impl in FASTVIT_IMPLS:
        import fastvit
        from fastvit.backend import resolve_backend
        from fastvit.tuning import layernorm_mlp_bucket

        def fused(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *variant):
            keywords = {}
            if variant:  # the gate projection and the hidden norm
                names = ("fc1_gate_weight", "fc1_gate_bias", "hidden_norm_weight", "hidden_norm_bias")
                keywords = dict(zip(names, variant, strict=True), activation="silu", hidden_norm="layernorm")
            return fastvit.layernorm_mlp(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                         eps=EPS, **keywords)

        def bucket() -> str:
            rows, dtype = point.batch * point.n_tokens, torch_dtype(point.dtype)
            fc1_rows = point.params["hidden"] * (2 if gated else 1)
            return layernorm_mlp_bucket(point.params["dim"], fc1_rows, dtype, rows, point.mode != "fwd")

        return fastvit_implementation(
            point.impl, fused, lambda: resolve_backend(torch.device(point.device), "layernorm_mlp", bucket)
        )
    raise ValueError(f"unknown mlp implementation {point.impl!r}")


def build(point: Point) -> Workload:
    """Inputs (rotated sets of random tokens and parameters, and grad_output for fwd+bwd) and the step."""
    dtype, device = torch_dtype(point.dtype), point.device
    fn, label = _implementation(point)
    b, n, d, hidden = point.batch, point.n_tokens, point.params["dim"], point.params["hidden"]
    backward = point.mode == "fwd+bwd"

    def param(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = randn(shape, dtype=dtype, device=device)
        return t.mul_(scale).add_(shift).requires_grad_(backward)

    def make() -> tuple[torch.Tensor, ...]:
        # a trained block's scales: O(1) activations in bf16
        plain = (
            randn((b, n, d), dtype=dtype, device=device, requires_grad=backward),
            param(d, scale=0.1, shift=1.0),
            param(d, scale=0.1),
            param(hidden, d, scale=d**-0.5),
            param(hidden, scale=0.1),
            param(d, hidden, scale=hidden**-0.5),
            param(d, scale=0.1),
        )
        if _variant(point) != "swiglu_hidden_norm":
            return plain
        # the gate projection and the hidden norm's weight and bias
        return (*plain, param(hidden, d, scale=d**-0.5), param(hidden, scale=0.1), param(hidden, scale=0.1, shift=1.0),
                param(hidden, scale=0.1))

    sets = input_sets(make, device)
    grads = [randn((b, n, d), dtype=dtype, device=device) for _ in sets] if backward else None
    workload = Workload(
        step=op_step(fn, sets, point.mode, grads),
        flops=flops(point),
        impl=label,
        extra={"input_sets": len(sets)},
    )
    if backward:
        workload.finish = lambda ms: {"saved_bytes": saved_bytes(fn, sets[0])}
    if point.impl in FASTVIT_IMPLS:
        workload.after_warmup = relabel_on_fallback(workload)
    return workload
