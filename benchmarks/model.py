"""The model suite: each model as is and patched by ``fastvit.patch`` (``<model>+fastvit``).

    python -m benchmarks model --model vit_base_patch16_224 --resolutions 224,384,512,1024
    python -m benchmarks model --model hf-clip-vit-b16,tv-swin-b
    python -m benchmarks model --model scaling        # ViT-B, EVA02-B, SAM-B against N
    python -m benchmarks model --model vit_base_patch16_224,eva02_base_patch14_224 --seq-lens 197,577,1025

``--model`` takes comma-separated names: timm model names, ``ZOO`` models or the group
``scaling``. Every model's implementations carry its name (``eva02_base_patch14_224`` and
``eva02_base_patch14_224+fastvit``, ``hf-clip-vit-b16`` and ``hf-clip-vit-b16+fastvit``) so that
rows of several models never share a series (a plot line, a slope, a ``compare`` key). The zoo:

- ``hf-clip-vit-b16``, ``hf-siglip-base-p16``, ``hf-dinov2-vit-b14``, ``hf-swin-b``: Hugging Face
  ``*ForImageClassification`` built from configs (CLIP ViT-B/16 vision tower, SigLIP base/16,
  DINOv2 ViT-B/14, Swin-B window 7); patching routes their attention through transformers'
  ``AttentionInterface`` (``attn_implementation="fastvit"``) and swaps the modules that fit;
  unpatched they run transformers' default (``sdpa``);
- ``hf-sam-vit-b``: Hugging Face's SAM ViT-B image encoder (``SamVisionModel``; its own-forward
  attention swapped, ``fastvit.nn.hf_sam``) under a mean-pooled linear head, at 448 (2 x 2 of its
  14 x 14 windows; the CPU's and ``--quick``'s size) and 1024 (its native size);
- ``tv-swin-b``: torchvision's ``swin_b`` (window attention and MLP halves patched,
  ``fastvit.nn.torchvision_swin``).

Without ``--model``: ``vit_base_patch16_224``, the ``TIMM_MODELS`` (``eva02_base_patch14_224``,
``vit_base_patch16_rope_reg1_gap_256``, ``swin_base_patch4_window7_224``, ``samvit_base_patch16``,
``beitv2_base_patch16_224``: each at its native size, SAM-B at 1024) and the whole zoo. Reduced on
the CPU: the zoo and the ``TIMM_MODELS`` at their first size only (SAM-B at 448: 2 x 2 of its
14 x 14 windows), with 4 blocks (the ViTs), 2 blocks (SAM-B: one windowed, one global) or
stages of (2, 2, 2, 2) blocks (the Swins); their rows say ``depth``. On a GPU they run at full
depth: the zoo at 224 and 384 (DINOv2: 224 and 518, its pretraining size; sizes are multiples
of 14 there), 224 only with ``--quick``; the ``TIMM_MODELS`` at their native size.

**Sequence-length scaling.** ``--resolutions`` runs every model at those image sizes; ``--seq-lens``
runs each model at the image size that gives it about N tokens, ``N = prefix + (size / patch)^2``
(its class and register tokens; Swin: its first stage's tokens): N = 197 is 224 px for ViT-B/16,
196 px for EVA02-B/14 (patch 14) and 224 px for SAM-B (no prefix: 196 tokens). ``--resolutions``
wins over ``--seq-lens``. The group ``scaling`` (``SCALING``: ViT-B/16, EVA02-B/14, SAM-B) sweeps
``SCALING_SEQ_LENS`` unless either is given. Each (model, size) is one row with the model's own
``n_tokens``, so the slope table (``report.slope_rows``, summary.md's "Scaling" section) fits
time and memory against N per model. timm builds each size with ``img_size=`` (position
embeddings, RoPE grids and SAM's relative positions sized for it).

For each resolution: images/s and peak memory of inference (``fwd``: forward without autograd,
``model.eval()``) and of a training step (``fwd+bwd``: forward, cross-entropy against random
labels, gradients of every parameter; ``model.train()``; no optimizer step; its peak memory
includes the parameters' gradients, 4 bytes per parameter). Random weights, no downloads
(``pretrained=False``; timm models get a 1000-class head, also those whose default has none).
``dtype`` float32 runs the model in fp32; bfloat16 / float16 run it under ``torch.autocast``
(fp32 parameters), the usual mixed precision.

Inference rows also carry a per-component breakdown of the forward pass, from module hooks
timed with the same clock in a separate pass (so the hooks do not slow the timed calls):
``ms_patch_embed`` (everything before the first block: patch projection, class token, position
embedding), ``ms_attention`` (the blocks' attention modules), ``ms_mlp`` (the rest of the blocks:
norm2 + MLP and the norm1 / residual adds around attention; SAM's window partition), ``ms_rest``
(after the last block: final norm, head, SAM's neck; for Swin also the patch merging between
stages). Patching degrades to the fused ops this build has: a part whose op is missing is left
as the model's (the patch report in the note says what was replaced and how much was skipped).

``n_tokens``, ``heads`` and ``head_dim`` are the model's (Swin: the first stage's tokens and
heads; its attention runs on windows of 49 of them; SAM: the image's tokens, which its windowed
blocks split into 14 x 14 windows); FLOPs come from PyTorch's FLOP counter run on the meta device
(the unpatched model: the patched one does the same math).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from .measure import Unavailable, Workload, input_sets, randn
from .options import modes, torch_dtype
from .progress import Progress
from .records import Point, Record
from .runner import not_run, policy_from_args, run_points

__all__ = ["SCALING", "TIMM_MODELS", "ZOO", "build", "resolution_for", "run", "token_layout", "unknown_names"]

NAME = "model"
DEFAULT_MODEL = "vit_base_patch16_224"
RESOLUTIONS = {"cpu": (224, 384), "cuda": (224, 384, 512, 1024)}  # DEFAULT_MODEL's and other timm names'
QUICK_RESOLUTIONS = {"cpu": (224,), "cuda": (224, 384)}
DEFAULT_BATCH = {"cpu": 1, "cuda": 32}
NUM_CLASSES = 1000
# the group ``--model scaling``: whole models against N, and the N it sweeps by default (first
# two with --quick): 197 tokens is ViT-B/16 at 224, 4097 at 1024 (SAM-B's native 4096 tokens)
SCALING = ("vit_base_patch16_224", "eva02_base_patch14_224", "samvit_base_patch16")
SCALING_SEQ_LENS = {"cpu": (50, 197, 577), "cuda": (197, 577, 1025, 4097)}


# ---------------------------------------------------------------------------------------------
# the models
# ---------------------------------------------------------------------------------------------
def _quiet_transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()  # the configs' unused text towers warn about token ids
    return transformers


def _hf_clip(resolution: int, depth: int | None) -> torch.nn.Module:
    t = _quiet_transformers()
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=depth or 12, num_attention_heads=12,
                  patch_size=16, image_size=resolution)  # fmt: skip
    return t.CLIPForImageClassification(t.CLIPConfig(vision_config=vision, num_labels=NUM_CLASSES))


def _hf_siglip(resolution: int, depth: int | None) -> torch.nn.Module:
    t = _quiet_transformers()
    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=depth or 12, num_attention_heads=12,
                  patch_size=16, image_size=resolution)  # fmt: skip
    return t.SiglipForImageClassification(t.SiglipConfig(vision_config=vision, num_labels=NUM_CLASSES))


def _hf_dinov2(resolution: int, depth: int | None) -> torch.nn.Module:
    t = _quiet_transformers()
    config = t.Dinov2Config(hidden_size=768, intermediate_size=3072, num_hidden_layers=depth or 12,
                            num_attention_heads=12, patch_size=14, image_size=resolution,
                            num_labels=NUM_CLASSES)  # fmt: skip
    return t.Dinov2ForImageClassification(config)


class _HFSamClassifier(torch.nn.Module):
    """Hugging Face SAM's image encoder (``SamVisionModel``) under a mean-pooled linear head: the
    suite's training step needs logits (SAM predicts masks from the (B, 256, H/16, W/16) embeddings)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.config = encoder, encoder.config
        self.head = torch.nn.Linear(encoder.config.output_channels, NUM_CLASSES)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixel_values=pixel_values).last_hidden_state.mean(dim=(2, 3)))


def _hf_sam(resolution: int, depth: int | None) -> torch.nn.Module:
    t = _quiet_transformers()
    layers = _sam_depth(depth) if depth is not None else {"depth": 12, "global_attn_indexes": (2, 5, 8, 11)}
    config = t.SamVisionConfig(image_size=resolution, num_hidden_layers=layers["depth"],
                               global_attn_indexes=list(layers["global_attn_indexes"]))  # fmt: skip
    return _HFSamClassifier(t.SamVisionModel(config))


def _swin_b_depths(depth: int | None) -> list[int]:
    return [2, 2, 18, 2] if depth is None else [min(depth, 2), min(depth, 2), depth, min(depth, 2)]


def _hf_swin(resolution: int, depth: int | None) -> torch.nn.Module:
    t = _quiet_transformers()
    config = t.SwinConfig(image_size=resolution, patch_size=4, embed_dim=128, depths=_swin_b_depths(depth),
                          num_heads=[4, 8, 16, 32], window_size=7, num_labels=NUM_CLASSES)  # fmt: skip
    return t.SwinForImageClassification(config)


def _tv_swin(resolution: int, depth: int | None) -> torch.nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=128, depths=_swin_b_depths(depth), num_heads=[4, 8, 16, 32],
                           window_size=[7, 7], stochastic_depth_prob=0.5, num_classes=NUM_CLASSES)  # fmt: skip


def _vit_blocks(layers: Any, attn: str) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    return [(block, getattr(block, attn)) for block in layers]


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model of the zoo: how to build it and where its blocks and their attention are.

    Attributes:
        create: ``(resolution, depth) -> model``; depth None is the full model, else the reduced
            one (ViTs: that many blocks; Swin-B: stages of (2, 2, depth, 2) blocks, at most 2 each
            outside the third).
        blocks: ``model -> [(block, attention module)]`` in call order, for the breakdown.
        patch: the ``(height, width)`` stride of the first-stage tokens.
        cpu_depth: the reduced depth the CPU runs.
        description: one line, for ``--help`` and the notes.
        gpu_resolutions: the sizes a GPU runs without ``--quick`` (the CPU and ``--quick``: the
            first only).
        prefix: the tokens before the patches (class token: 1; SigLIP and Swin: none).
    """

    create: Any
    blocks: Any
    patch: int
    cpu_depth: int
    description: str
    gpu_resolutions: tuple[int, ...] = (224, 384)
    prefix: int = 1


ZOO: dict[str, ZooModel] = {
    "hf-clip-vit-b16": ZooModel(
        _hf_clip, lambda m: _vit_blocks(m.vision_model.encoder.layers, "self_attn"), 16, 4,
        "CLIP ViT-B/16 vision tower (transformers CLIPForImageClassification)",
    ),
    "hf-siglip-base-p16": ZooModel(
        _hf_siglip, lambda m: _vit_blocks(m.vision_model.encoder.layers, "self_attn"), 16, 4,
        "SigLIP base/16 vision tower (transformers SiglipForImageClassification)", prefix=0,
    ),
    "hf-dinov2-vit-b14": ZooModel(
        _hf_dinov2, lambda m: _vit_blocks(m.dinov2.encoder.layer, "attention"), 14, 4,
        "DINOv2 ViT-B/14 (transformers Dinov2ForImageClassification)", (224, 518),  # multiples of 14
    ),
    "hf-swin-b": ZooModel(
        _hf_swin, lambda m: [(b, b.attention) for stage in m.swin.encoder.layers for b in stage.blocks], 4, 2,
        "Swin-B, window 7 (transformers SwinForImageClassification)", prefix=0,
    ),
    "hf-sam-vit-b": ZooModel(
        _hf_sam, lambda m: _vit_blocks(m.encoder.vision_encoder.layers, "attn"), 16, 2,
        "SAM ViT-B image encoder (transformers SamVisionModel, a pooled head for the loss): 14 x 14 windows, "
        "global blocks, decomposed relative position", (448, 1024), prefix=0,
    ),
    "tv-swin-b": ZooModel(
        _tv_swin, lambda m: [(b, b.attn) for stage in m.features[1::2] for b in stage], 4, 2,
        "Swin-B, window 7 (torchvision swin_b)", prefix=0,
    ),
}  # fmt: skip


def _depth(depth: int) -> dict[str, Any]:
    return {"depth": depth}


def _swin_depths(depth: int) -> dict[str, Any]:
    return {"depths": tuple(_swin_b_depths(depth))}


def _sam_depth(depth: int) -> dict[str, Any]:
    # every third block counted back from the last is global, as blocks 2, 5, 8, 11 of SAM-B
    return {"depth": depth, "global_attn_indexes": tuple(range(depth - 1, -1, -3))[::-1]}


@dataclasses.dataclass(frozen=True)
class TimmModel:
    """A timm model of the default set beside ``DEFAULT_MODEL``: its size and its reduced CPU build.

    Attributes:
        resolution: its native image size, which a GPU runs by default.
        cpu_depth: the reduced depth the CPU builds (see ``reduce``).
        description: one line: what the model is.
        reduce: ``depth -> timm.create_model keyword arguments`` of the reduced model.
        cpu_resolution: the size the CPU runs by default (None: ``resolution``).
    """

    resolution: int
    cpu_depth: int
    description: str
    reduce: Any = _depth
    cpu_resolution: int | None = None


TIMM_MODELS: dict[str, TimmModel] = {
    "eva02_base_patch14_224": TimmModel(224, 4, "EVA02-B/14: RoPE, SwiGLU, patch 14 (16 x 16 + 1 tokens at 224)"),
    "vit_base_patch16_rope_reg1_gap_256": TimmModel(
        256, 4, "ViT-B/16 with RoPE, 1 register token, average pooling (timm Eva class; 16 x 16 + 1 at 256)"
    ),
    "swin_base_patch4_window7_224": TimmModel(224, 2, "Swin-B, window 7 (timm)", _swin_depths),
    "samvit_base_patch16": TimmModel(
        1024, 2, "SAM ViT-B image encoder: 14 x 14 windows, 4 global blocks, decomposed relative position",
        _sam_depth, cpu_resolution=448,
    ),
    "beitv2_base_patch16_224": TimmModel(224, 4, "BEiT v2 B/16: relative position bias"),
}  # fmt: skip


def impls_of(name: str) -> tuple[str, str]:
    """The two implementations of a model, unpatched and patched: its name and ``name+fastvit``."""
    return name, f"{name}+fastvit"


def depth_of(name: str, device: str) -> int | None:
    """The depth a zoo or ``TIMM_MODELS`` model runs with on ``device`` (None: full)."""
    if device != "cpu":
        return None
    spec = ZOO.get(name) or TIMM_MODELS.get(name)
    return spec.cpu_depth if spec is not None else None


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
def _create(name: str, resolution: int, device: str | torch.device, depth: int | None = None) -> torch.nn.Module:
    if name in ZOO:
        return ZOO[name].create(resolution, depth).to(device)
    import timm

    kwargs = TIMM_MODELS[name].reduce(depth) if depth is not None else {}
    model = timm.create_model(name, pretrained=False, img_size=resolution, num_classes=NUM_CLASSES, **kwargs)
    return model.to(device)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _timm_blocks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """A timm model's ``(block, attention)`` pairs: ``blocks[i].attn`` (ViT, Eva, BEiT, SAM) or
    ``layers[i].blocks[j].attn`` (Swin); ``Unavailable`` for other layouts."""
    if hasattr(model, "blocks"):
        blocks = list(model.blocks)
    else:
        blocks = [b for stage in getattr(model, "layers", ()) for b in getattr(stage, "blocks", ())]
    if not blocks or not all(hasattr(b, "attn") for b in blocks):
        raise Unavailable("not a timm ViT (blocks[i].attn or layers[i].blocks[j].attn)")
    return [(block, block.attn) for block in blocks]


def _prefix_tokens(model: torch.nn.Module) -> int:
    return getattr(model, "num_prefix_tokens", 0) or 0  # class and register tokens; Swin, SAM: none


def _shape_of(name: str, model: torch.nn.Module, resolution: int) -> dict[str, Any]:
    if name not in ZOO:
        attn = _timm_blocks(model)[0][1]
        heads = attn.num_heads
        # BEiT's and Swin's attention keep no head_dim: their packed qkv projection has 3 x H x head_dim
        head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
        return {
            "n_tokens": model.patch_embed.num_patches + _prefix_tokens(model),
            "heads": heads,
            "head_dim": head_dim,
        }
    spec = ZOO[name]
    config = getattr(model, "config", None)
    if name.endswith("swin-b"):
        heads, width = 4, 128
    else:
        vision = getattr(config, "vision_config", config)
        heads, width = vision.num_attention_heads, vision.hidden_size
    return {"n_tokens": spec.prefix + (resolution // spec.patch) ** 2, "heads": heads, "head_dim": width // heads}


@functools.cache
def token_layout(name: str) -> tuple[int, int]:
    """(patch, prefix tokens) of a model: at a square size it has ``prefix + (size // patch)^2``
    tokens (Swin: its first stage's). timm models: read from an instance on the meta device."""
    if name in ZOO:
        return ZOO[name].patch, ZOO[name].prefix
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    patch = model.patch_embed.patch_size
    return (patch[0] if isinstance(patch, tuple | list) else int(patch)), _prefix_tokens(model)


def resolution_for(name: str, n_tokens: int) -> int:
    """The square image size that gives a model the number of tokens nearest ``n_tokens``:
    ``patch * round(sqrt(n_tokens - prefix))`` (197 -> 224 for ViT-B/16, 196 for EVA02-B/14,
    224 for SAM-B: 196 tokens, no prefix). An unknown name maps as a ViT-B/16 (then fails to build
    with its own error)."""
    try:
        patch, prefix = token_layout(name)
    except Exception:  # not a timm name: model_shape reports why
        patch, prefix = 16, 1
    return patch * max(1, round(math.sqrt(max(n_tokens - prefix, 1))))


@functools.cache
def model_shape(name: str, resolution: int, batch: int, depth: int | None = None) -> dict[str, Any]:
    """Tokens, heads, head dim and FLOPs of a model, from an instance on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = _create(name, resolution, "meta", depth)
    shape = _shape_of(name, model, resolution)
    x = torch.empty(batch, 3, resolution, resolution, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    shape["flops_fwd"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out = _logits(model(x))
        F.cross_entropy(out.float(), torch.zeros(batch, dtype=torch.long, device="meta")).backward()
    shape["flops_fwd_bwd"] = counter.get_total_flops()
    return shape


def _requested(args: Any) -> list[str]:
    return [n.strip() for n in str(args.model or "").split(",") if n.strip()]


def model_names(args: Any) -> list[str]:
    """``--model``'s comma-separated names (the group ``scaling`` expanded to ``SCALING``), or the
    default: the timm ViT-B/16, the ``TIMM_MODELS`` and the zoo."""
    if not args.model:
        return [DEFAULT_MODEL, *TIMM_MODELS, *ZOO]
    names = [m for n in _requested(args) for m in (SCALING if n == "scaling" else (n,))]
    return list(dict.fromkeys(names))


def unknown_names(args: Any) -> list[str]:
    """The names of ``--model`` that are neither the group ``scaling``, a ``ZOO`` model nor a timm
    model (all of them where timm is not installed): the command line refuses them, rather than
    a run of error rows."""
    requested = [n for n in _requested(args) if n != "scaling" and n not in ZOO]
    try:
        import timm
    except ImportError:
        return requested
    return [n for n in requested if not timm.is_model(n)]


def sweep_seq_lens(args: Any) -> tuple[int, ...] | None:
    """The token counts the models are sized for: ``--seq-lens``, else ``SCALING_SEQ_LENS`` (the
    first two with ``--quick``) when ``--model`` names the group ``scaling``, else None (each
    model's own sizes). ``--resolutions`` overrides both (see ``resolutions``)."""
    if getattr(args, "seq_lens", None):
        return tuple(args.seq_lens)
    if "scaling" in _requested(args):
        lens = SCALING_SEQ_LENS[args.device]
        return lens[:2] if args.quick else lens
    return None


def resolutions(args: Any, name: str) -> tuple[int, ...]:
    """The image sizes to run ``name`` at, ascending: ``--resolutions``, else the sizes that give it
    ``sweep_seq_lens`` tokens (``resolution_for``), else its defaults (see the module docstring)."""
    if args.resolutions:
        return tuple(sorted(set(args.resolutions)))
    seq_lens = sweep_seq_lens(args)
    if seq_lens:
        return tuple(sorted({resolution_for(name, n) for n in seq_lens}))
    if name in ZOO:
        sizes = ZOO[name].gpu_resolutions
        return sizes if args.device == "cuda" and not args.quick else sizes[:1]
    if name in TIMM_MODELS:
        spec = TIMM_MODELS[name]
        return ((spec.cpu_resolution or spec.resolution) if args.device == "cpu" else spec.resolution,)
    return (QUICK_RESOLUTIONS if args.quick else RESOLUTIONS)[args.device]


def run(args: Any, progress: Progress) -> list[Record]:
    """Both implementations, every mode and resolution of each model of ``args.model``."""
    names = model_names(args)
    batch = args.batch or DEFAULT_BATCH[args.device]
    records: list[Record] = []
    runnable: list[Point] = []
    for name in names:
        depth = depth_of(name, args.device)
        for impl in impls_of(name):
            for mode in modes(args):
                for res in resolutions(args, name):
                    try:
                        shape = model_shape(name, res, batch, depth)
                    except Exception as exc:  # not a timm ViT, unknown name, size not divisible ...
                        shape, error = {"n_tokens": 0, "heads": 0, "head_dim": 0}, f"{type(exc).__name__}: {exc}"
                    else:
                        error = None
                    params = {"model": name, "resolution": res, "flops": shape.get(f"flops_{mode.replace('+', '_')}")}
                    if depth is not None:
                        params["depth"] = depth
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
                        params=params,
                    )
                    if error is not None:
                        records += not_run([point], "error", f"cannot build {name} at {res}: {error}"[:300], progress)
                    elif impl.endswith("+fastvit") and not _has_patch():
                        records += not_run([point], "unavailable", "fastvit.patch is not in this build", progress)
                    else:
                        runnable.append(point)
    # model- then resolution-major: both implementations advance together under a --time-limit
    order = {mode: i for i, mode in enumerate(modes(args))}
    rank = {name: i for i, name in enumerate(names)}

    runnable.sort(
        key=lambda p: (rank[p.params["model"]], p.params["resolution"], order[p.mode], p.impl.endswith("+fastvit"))
    )
    policy = dataclasses.replace(policy_from_args(args), build_timeout_s=300.0)  # model creation
    records += run_points(runnable, build, args, progress, policy=policy)
    return sorted(
        records,
        key=lambda r: (rank[r.extra["model"]], r.impl.endswith("+fastvit"), order[r.mode], r.extra["resolution"]),
    )


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
    """Forward-pass time per component of a model, from module hooks (see the module docstring).

    ``blocks``: the model's ``(block, attention module)`` pairs in call order."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device, blocks: list[tuple[torch.nn.Module, torch.nn.Module]]
    ) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []
        self.handles = [
            model.register_forward_pre_hook(self._mark("start")),
            model.register_forward_hook(self._mark("end")),
        ]
        for block, attn in blocks:
            self.handles += [
                block.register_forward_pre_hook(self._mark("block+")),
                block.register_forward_hook(self._mark("block-")),
                attn.register_forward_pre_hook(self._mark("attn+")),
                attn.register_forward_hook(self._mark("attn-")),
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


def _blocks(name: str, model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """The ``(block, attention)`` pairs the breakdown hooks (``Unavailable``: none found)."""
    if name in ZOO:
        return ZOO[name].blocks(model)
    try:
        return _timm_blocks(model)
    except Unavailable as exc:
        raise Unavailable(f"no per-component breakdown: {exc}") from None


def build(point: Point) -> Workload:
    """The model (patched for ``<family>+fastvit``), rotated image batches, and the step."""
    device = torch.device(point.device)
    dtype = torch_dtype(point.dtype)
    name, res, batch = point.params["model"], point.params["resolution"], point.batch
    model = _create(name, res, device, point.params.get("depth"))
    note = _patch(model) if point.impl.endswith("+fastvit") else ""
    if "depth" in point.params:
        note = "; ".join(n for n in (f"depth {point.params['depth']} (reduced on the CPU)", note) if n)
    training = point.mode == "fwd+bwd"
    model.train(training)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    sets = input_sets(lambda: randn((batch, 3, res, res), dtype=torch.float32, device=device), device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    if training:

        def step(i: int) -> None:
            with autocast():
                out = _logits(model(sets[i % len(sets)]))
            # allow_unused: CLIP's classifier reads the mean token, not the post-layernorm pooled one
            torch.autograd.grad(F.cross_entropy(out.float(), labels), params, allow_unused=True)

    else:

        def step(i: int) -> None:
            with torch.no_grad(), autocast():
                model(sets[i % len(sets)])

    def finish(ms: float) -> dict[str, Any]:
        extra: dict[str, Any] = {"images_per_s": batch / (ms * 1e-3)}
        if not training:
            try:
                hooks = _Breakdown(model, device, _blocks(name, model))
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
