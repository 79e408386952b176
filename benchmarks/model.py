"""The model suite: a timm ViT as is (``timm``) and patched by ``fastvit.patch`` (``timm+fastvit``).

    python -m benchmarks model --model vit_base_patch16_224 --resolutions 224,384,512,1024

For each resolution: images/s and peak memory of inference (``fwd``: forward without autograd,
``model.eval()``) and of a training step (``fwd+bwd``: forward, cross-entropy against random
labels, gradients of every parameter; ``model.train()``; no optimizer step; its peak memory
includes the parameters' gradients, 4 bytes per parameter). Random weights, no downloads
(``pretrained=False``). ``dtype`` float32 runs the model in fp32; bfloat16 / float16 run
it under ``torch.autocast`` (fp32 parameters), the usual mixed precision.

Inference rows also carry a per-component breakdown of the forward pass, from module hooks
timed with the same clock in a separate pass (so the hooks do not slow the timed calls):
``ms_patch_embed`` (everything before the first block: patch projection, class token, position
embedding), ``ms_attention`` (the blocks' ``attn`` modules), ``ms_mlp`` (the rest of the blocks:
norm2 + MLP and the norm1 / residual adds around attention), ``ms_rest`` (after the last block:
final norm, head). Patching degrades to the fused ops this build has: a part whose op is missing
is left as timm's (the patch report in the note says what was replaced).

``n_tokens``, ``heads`` and ``head_dim`` are the model's; FLOPs come from PyTorch's FLOP counter
run on the meta device (the unpatched model: the patched one does the same math).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any

import torch
import torch.nn.functional as F

from .measure import Unavailable, Workload, input_sets, randn
from .options import modes, torch_dtype
from .progress import Progress
from .records import Point, Record
from .runner import not_run, policy_from_args, run_points

__all__ = ["IMPLS", "build", "run"]

NAME = "model"
IMPLS = ("timm", "timm+fastvit")
DEFAULT_MODEL = "vit_base_patch16_224"
RESOLUTIONS = {"cpu": (224, 384), "cuda": (224, 384, 512, 1024)}
QUICK_RESOLUTIONS = {"cpu": (224,), "cuda": (224, 384)}
DEFAULT_BATCH = {"cpu": 1, "cuda": 32}


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def _create(name: str, resolution: int, device: str | torch.device) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, img_size=resolution).to(device)


@functools.cache
def model_shape(name: str, resolution: int, batch: int) -> dict[str, Any]:
    """Tokens, heads, head dim and FLOPs of a timm ViT, from an instance on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = _create(name, resolution, "meta")
    attn = model.blocks[0].attn
    shape = {
        "n_tokens": model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 0),
        "heads": attn.num_heads,
        "head_dim": attn.head_dim,
    }
    x = torch.empty(batch, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    shape["flops_fwd"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        F.cross_entropy(out.float(), torch.zeros(batch, dtype=torch.long, device="meta")).backward()
    shape["flops_fwd_bwd"] = counter.get_total_flops()
    return shape


def run(args: Any, progress: Progress) -> list[Record]:
    """Both implementations, every mode and resolution of ``args.model``."""
    name = args.model or DEFAULT_MODEL
    resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else RESOLUTIONS)[args.device]
    batch = args.batch or DEFAULT_BATCH[args.device]
    records: list[Record] = []
    runnable: list[Point] = []
    for impl in IMPLS:
        for mode in modes(args):
            for res in sorted(resolutions):
                try:
                    shape = model_shape(name, res, batch)
                except Exception as exc:  # not a timm ViT, unknown name, size not divisible ...
                    shape, error = {"n_tokens": 0, "heads": 0, "head_dim": 0}, f"{type(exc).__name__}: {exc}"
                else:
                    error = None
                point = Point(
                    suite=NAME,
                    impl=impl,
                    mode=mode,
                    n_tokens=shape["n_tokens"],
                    batch=batch,
                    heads=shape["heads"],
                    head_dim=shape["head_dim"],
                    dtype=args.dtype,
                    device=args.device,
                    params={"model": name, "resolution": res, "flops": shape.get(f"flops_{mode.replace('+', '_')}")},
                )
                if error is not None:
                    records += not_run([point], "error", f"cannot build {name} at {res}: {error}"[:300], progress)
                elif impl == "timm+fastvit" and not _has_patch():
                    records += not_run([point], "unavailable", "fastvit.patch is not in this build", progress)
                else:
                    runnable.append(point)
    # resolution-major: both implementations advance together under a --time-limit
    order = {mode: i for i, mode in enumerate(modes(args))}
    runnable.sort(key=lambda p: (p.params["resolution"], order[p.mode], IMPLS.index(p.impl)))
    policy = dataclasses.replace(policy_from_args(args), build_timeout_s=300.0)  # model creation
    records += run_points(runnable, build, args, progress, policy=policy)
    return sorted(records, key=lambda r: (IMPLS.index(r.impl), order[r.mode], r.extra["resolution"]))


def _has_patch() -> bool:
    import fastvit

    return hasattr(fastvit, "patch")


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------
def _patch(model: torch.nn.Module) -> str:
    import fastvit

    if not hasattr(fastvit, "patch"):
        raise Unavailable("fastvit.patch is not in this build")
    report = fastvit.patch(
        model,
        attention=hasattr(fastvit, "flash_attention"),
        patch_embed=hasattr(fastvit, "patch_embed"),
        mlp=hasattr(fastvit, "layernorm_mlp"),
    )
    counts = report.counts() if hasattr(report, "counts") else {}
    skipped = len(getattr(report, "skipped", []))
    return "patched: " + ", ".join(f"{n} {part}" for part, n in counts.items()) + f"; {skipped} skipped"


class _Breakdown:
    """Forward-pass time per component of a timm ViT, from module hooks (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        if not hasattr(model, "blocks") or not all(hasattr(b, "attn") for b in model.blocks):
            raise Unavailable("no per-component breakdown: not a timm ViT (blocks[i].attn)")
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []
        self.handles = [
            model.register_forward_pre_hook(self._mark("start")),
            model.register_forward_hook(self._mark("end")),
        ]
        for block in model.blocks:
            self.handles += [
                block.register_forward_pre_hook(self._mark("block+")),
                block.register_forward_hook(self._mark("block-")),
                block.attn.register_forward_pre_hook(self._mark("attn+")),
                block.attn.register_forward_hook(self._mark("attn-")),
            ]

    def _mark(self, label: str):
        def hook(*_: Any) -> None:
            if self.cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                self.marks.append((label, event))
            else:
                self.marks.append((label, time.perf_counter()))

        return hook

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def measure(self, forward, passes: int = 3) -> dict[str, float]:
        """Per-component ms of the median (by total) of ``passes`` forward passes."""
        results = []
        for _ in range(passes):
            self.marks = []
            forward()
            if self.cuda:
                torch.cuda.synchronize()
            t = dict.fromkeys(("patch_embed", "attention", "blocks"), 0.0)
            start = end = first_block = None
            opened: dict[str, Any] = {}
            for label, stamp in self.marks:
                if label == "start":
                    start = stamp
                elif label == "end":
                    end = stamp
                elif label.endswith("+"):
                    opened[label[:-1]] = stamp
                    if label == "block+" and first_block is None:
                        first_block = stamp
                else:
                    kind = label[:-1]
                    t["attention" if kind == "attn" else "blocks"] += self._ms(opened[kind], stamp)
            total = self._ms(start, end)
            embed = self._ms(start, first_block)
            results.append(
                {
                    "ms_patch_embed": embed,
                    "ms_attention": t["attention"],
                    "ms_mlp": t["blocks"] - t["attention"],
                    "ms_rest": total - embed - t["blocks"],
                    "ms_forward_hooked": total,
                }
            )
        # the pass with the median total, so that the components add up to its total
        return sorted(results, key=lambda r: r["ms_forward_hooked"])[len(results) // 2]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def build(point: Point) -> Workload:
    """The model (patched for ``timm+fastvit``), rotated image batches, and the step."""
    device = torch.device(point.device)
    dtype = torch_dtype(point.dtype)
    res, batch = point.params["resolution"], point.batch
    model = _create(point.params["model"], res, device)
    note = _patch(model) if point.impl == "timm+fastvit" else ""
    training = point.mode == "fwd+bwd"
    model.train(training)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    sets = input_sets(lambda: randn((batch, 3, res, res), dtype=torch.float32, device=device), device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    if training:

        def step(i: int) -> None:
            with autocast():
                out = model(sets[i % len(sets)])
            torch.autograd.grad(F.cross_entropy(out.float(), labels), params)

    else:

        def step(i: int) -> None:
            with torch.no_grad(), autocast():
                model(sets[i % len(sets)])

    def finish(ms: float) -> dict[str, Any]:
        extra: dict[str, Any] = {"images_per_s": batch / (ms * 1e-3)}
        if not training:
            try:
                hooks = _Breakdown(model, device)
            except Unavailable as exc:
                extra["breakdown"] = str(exc)
            else:
                extra.update(hooks.measure(lambda: step(0)))
                hooks.remove()
        return extra

    return Workload(
        step=step,
        flops=point.params.get("flops"),
        note="; ".join(n for n in (note, "autocast" if dtype != torch.float32 else "") if n),
        finish=finish,
        extra={"input_sets": len(sets)},
    )
