"""The varlen suite: attention over a NaFlex-like batch of images at their own sizes, packed.

A batch of ``images`` sequences whose token counts are drawn uniformly from [min_len, max_len]
with a fixed seed (the same batch every run); the sweep raises ``max_len``, so the x axis
``n_tokens`` is the total packed tokens T = sum of the lengths. Self-attention within each image
(non-causal), (T, H, D) inputs. Implementations (``impl``):

- ``fastvit-varlen[<route>]``: ``fastvit.flash_attention_varlen`` on the packed (T, H, D) tensors
  with ``max_seqlen_q`` given (one launch; labelled with the route that ran);
- ``sdpa-padded``: ``F.scaled_dot_product_attention`` on the batch padded to (S, H, max_len, D),
  with a (S, 1, 1, max_len) bool key-padding mask: what a padded pipeline runs (the padding and
  unpadding copies are not timed; padded query rows are computed and thrown away);
- ``sdpa-per-image``: one SDPA call per image on slices of the packed tensors, outputs
  concatenated back to (T, H, D) (the torch route's way);
- ``fastvit-dense[<route>]``: ``fastvit.flash_attention`` once per bucket of equal-length
  images, each bucket a dense (c, H, L, D) batch: the same useful work as the packed op, no
  padding, but one launch per distinct length (as many as the images, with random lengths).

FLOPs are the useful work for every implementation (flash-attn's convention): forward
4 * H * D * sum(len^2), forward+backward 3.5x. The padded row does more work than it is credited
with, which is the point of the comparison. Extra fields per row: ``images``, ``min_len``,
``max_len``, ``padding_frac`` (1 - T / (S * max length): the share of the padded batch that is
padding), ``sum_len_sq``, ``seed`` and ``calls`` (attention calls per step).

The suite contract is ``benchmarks/attention.py``'s: ``run(args, progress)`` in the parent,
``build(point)`` in the worker.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .measure import Unavailable, Workload, input_sets, op_step, randn, relabel_on_fallback
from .options import modes, torch_dtype
from .progress import Progress
from .records import Point, Record
from .roofline import varlen_attention_bytes
from .runner import run_impls

__all__ = ["IMPLS", "build", "flops", "lengths", "points", "run"]

NAME = "varlen"
IMPLS = ("fastvit-varlen", "sdpa-padded", "sdpa-per-image", "fastvit-dense")
FASTVIT_IMPLS = ("fastvit-varlen", "fastvit-dense")  # labelled with the route that ran
SEED = 0
# images per batch, shortest image, and the sweep of the longest (tokens): on a GPU, 64 images of
# 64 to 1024 tokens at the largest point (NaFlex at patch 16: 128 px to 512 px squares)
SIZES = {
    "cuda": (64, 64, (256, 512, 1024, 2048)),
    "cpu": (8, 16, (64, 128, 256)),
}
QUICK_SIZES = (4, 8, (24, 48))
DEFAULT_HEADS, DEFAULT_HEAD_DIM = 12, 64  # ViT-B


def lengths(images: int, min_len: int, max_len: int, seed: int = SEED) -> list[int]:
    """Token counts of the batch: ``images`` draws from [min_len, max_len], fixed by ``seed``."""
    rng = random.Random(f"{seed}:{images}:{min_len}:{max_len}")
    return [rng.randint(min_len, max_len) for _ in range(images)]


def min_bytes(point: Point) -> int:
    """Compulsory bytes of one call (``roofline.varlen_attention_bytes``: padding is not compulsory)."""
    return varlen_attention_bytes(point.n_tokens, point.heads, point.head_dim, point.dtype, point.mode)


def flops(point: Point) -> float:
    """Useful FLOPs of one call: 4 * H * D * sum(len^2) forward, 3.5x forward+backward."""
    forward = 4.0 * point.heads * point.head_dim * point.params["sum_len_sq"]
    return forward * (3.5 if point.mode == "fwd+bwd" else 1.0)


# ---------------------------------------------------------------------------------------------
# parent side: which points
# ---------------------------------------------------------------------------------------------
def _sizes(args: Any) -> tuple[int, int, list[int]]:
    images, min_len, max_lens = QUICK_SIZES if args.quick else SIZES[args.device]
    if args.seq_lens:
        max_lens = args.seq_lens
        min_len = min(min_len, *max_lens)
    return args.batch or images, min_len, sorted(set(max_lens))


def points(args: Any, impl: str) -> list[Point]:
    """The points of one implementation: each mode, the longest image (and T) increasing."""
    images, min_len, max_lens = _sizes(args)
    out = []
    for mode in modes(args):
        for max_len in max_lens:
            lens = lengths(images, min_len, max_len)
            total = sum(lens)
            params = {
                "images": images,
                "min_len": min_len,
                "max_len": max_len,
                "seed": SEED,
                "sum_len_sq": sum(n * n for n in lens),
                "padding_frac": round(1.0 - total / (images * max(lens)), 4),
            }
            out.append(Point(
                suite=NAME, impl=impl, mode=mode, n_tokens=total, batch=images,
                heads=args.heads or DEFAULT_HEADS, head_dim=args.head_dim or DEFAULT_HEAD_DIM,
                dtype=args.dtype, device=args.device, params=params,
            ))  # fmt: skip
    return out


def _not_here(impl: str) -> str | None:
    import fastvit

    op = {"fastvit-varlen": "flash_attention_varlen", "fastvit-dense": "flash_attention"}.get(impl)
    if op is not None and not hasattr(fastvit, op):
        return f"fastvit.{op} is not in this build"
    return None


def run(args: Any, progress: Progress) -> list[Record]:
    """Every implementation in ``args.impls`` (default: all), every mode and size."""
    records, impls = run_impls(
        NAME, IMPLS, args.impls, _not_here, lambda impl: points(args, impl), lambda p: p.n_tokens, build, args,
        progress,
    )  # fmt: skip
    order = {mode: i for i, mode in enumerate(modes(args))}
    return sorted(records, key=lambda r: (impls.index(r.impl.split("[")[0]), order[r.mode], r.n_tokens))


# ---------------------------------------------------------------------------------------------
# worker side: the implementations and the workload
# ---------------------------------------------------------------------------------------------
def _cu_seqlens(lens: Sequence[int], device: str) -> torch.Tensor:
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _implementation(point: Point, lens: list[int]) -> tuple[Callable, Callable[[], tuple], list, str]:
    """(fn(*inputs) -> outputs, make() -> inputs, the output shapes, label) of the point's impl."""
    dtype, device = torch_dtype(point.dtype), point.device
    heads, head_dim, images = point.heads, point.head_dim, len(lens)
    total, longest = sum(lens), max(lens)
    grad = point.mode == "fwd+bwd"

    def qkv(shape) -> tuple[torch.Tensor, ...]:
        return tuple(randn(shape, dtype=dtype, device=device, requires_grad=grad) for _ in range(3))

    if point.impl == "fastvit-varlen":  # the varlen op reads no tuning table: the device's route
        from fastvit.backend import resolve_backend

        label = f"{point.impl}[{resolve_backend(torch.device(device))}]"
    elif point.impl == "fastvit-dense":  # one call per length: each bucket's own route, or "mixed"
        from .attention import attention_route

        routes = {attention_route(device, head_dim, dtype, n, lens.count(n) * heads, False, grad) for n in set(lens)}
        label = f"{point.impl}[{routes.pop() if len(routes) == 1 else 'mixed'}]"
    if point.impl == "fastvit-varlen":
        import fastvit

        cu = _cu_seqlens(lens, device)

        def varlen(q, k, v):
            return (fastvit.flash_attention_varlen(q, k, v, cu, max_seqlen_q=longest),)

        return varlen, lambda: qkv((total, heads, head_dim)), [(total, heads, head_dim)], label
    if point.impl == "sdpa-padded":
        keep = torch.arange(longest, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        mask = keep[:, None, None, :]  # (S, 1, 1, max_len): True = a real key

        def padded(q, k, v):
            return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),)

        shape = (images, heads, longest, head_dim)
        return padded, lambda: qkv(shape), [shape], point.impl
    if point.impl == "sdpa-per-image":
        bounds = _cu_seqlens(lens, "cpu").tolist()

        def per_image(q, k, v):
            outs = [
                F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                               v[a:b].transpose(0, 1)).transpose(0, 1)
                for a, b in itertools.pairwise(bounds)
            ]
            return (torch.cat(outs, dim=0),)

        return per_image, lambda: qkv((total, heads, head_dim)), [(total, heads, head_dim)], point.impl
    if point.impl == "fastvit-dense":
        import fastvit

        counts: dict[int, int] = {}
        for n in lens:
            counts[n] = counts.get(n, 0) + 1
        shapes = [(c, heads, n, head_dim) for n, c in sorted(counts.items())]

        def buckets(*tensors):
            return tuple(fastvit.flash_attention(*tensors[i : i + 3]) for i in range(0, len(tensors), 3))

        return buckets, lambda: tuple(t for s in shapes for t in qkv(s)), shapes, label
    raise Unavailable(f"unknown varlen implementation {point.impl!r}")


def build(point: Point) -> Workload:
    """Inputs (rotated sets, and one grad_output per output for fwd+bwd) and the step."""
    p = point.params
    lens = lengths(p["images"], p["min_len"], p["max_len"], p["seed"])
    fn, make, out_shapes, label = _implementation(point, lens)
    dtype, device = torch_dtype(point.dtype), point.device
    sets = input_sets(make, device)
    grads = None
    if point.mode == "fwd+bwd":
        grads = [tuple(randn(s, dtype=dtype, device=device) for s in out_shapes) for _ in sets]
    calls = {"fastvit-dense": len(out_shapes), "sdpa-per-image": len(lens)}.get(point.impl, 1)
    workload = Workload(
        step=op_step(fn, sets, point.mode, grads),  # fn returns a tuple of outputs, grads a tuple each
        flops=flops(point),
        impl=label,
        extra={"input_sets": len(sets), "calls": calls},
    )
    if point.impl in FASTVIT_IMPLS:
        workload.after_warmup = relabel_on_fallback(workload)
    return workload
