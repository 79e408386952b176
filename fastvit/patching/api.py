"""``fastvit.patch(model)`` and ``fastvit.unpatch(model)``.

Patching swaps the class of each recognised module for a fused subclass (``fastvit.nn.fused``):
nothing is copied, moved or re-registered, so ``state_dict()`` keys, shapes and storages, the
Parameters an optimizer holds, hooks and checkpoints are exactly as before, and unpatching swaps
the original classes back.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

import fastvit
from fastvit import tuning
from fastvit.backend import warn_once
from fastvit.nn.fused import FusedModule, unfused_class
from fastvit.patching import hf_interface
from fastvit.patching.no_split import rename_no_split, restore_no_split
from fastvit.patching.registry import ADAPTERS, OP_OF_PART, Patched, Skip, Swap, loaded_adapters
from fastvit.patching.report import PatchEntry, PatchReport

__all__ = ["patch", "unpatch"]

hf_interface.install()  # attn_implementation="fastvit" in transformers, whenever it is imported


def _check_model(model: object, caller: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastvit.{caller}: model must be a torch.nn.Module, got {type(model).__name__}")


def _check_not_meta(model: nn.Module) -> None:
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        raise ValueError(
            f"fastvit.patch: {type(model).__name__} has {len(meta)} tensors on the meta device (e.g. "
            f"{meta[0]!r}); materialize it first (model.to_empty(device=...) and load its weights), then "
            "patch. The model is unchanged."
        )


def _gpu_of(model: nn.Module) -> torch.device | None:
    """The CUDA device of the model's first Parameter or buffer on one, or None."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_cuda:
            return tensor.device
    return None


def _class_name(model: nn.Module) -> str:
    """The model's class as its reports name it: a fused model's original (``VisionTransformer``,
    not ``FusedVisionTransformer``), so that patching or unpatching a patched model reads alike."""
    cls = type(model)
    return (cls.fastvit_original() if issubclass(cls, FusedModule) else cls).__name__


def _tuning_hint(model: nn.Module) -> None:
    """On a GPU with no tuning table, say once how to make one: without it ``auto`` runs the
    Triton kernels everywhere, also where PyTorch's route or the cuda backend is faster."""
    device = _gpu_of(model)
    if device is None or tuning.has_table(device):
        return
    warn_once(
        "patch:no-tuning-table",
        f"fastvit: no tuning table for {tuning.device_name(device)}: the patched model runs fastvit's "
        "Triton kernels everywhere, even for shapes where PyTorch's own route or the cuda backend is "
        "faster. Run `python -m benchmarks tune` once on this machine (a few minutes) and `auto` "
        f"follows what it measured ({tuning.table_path()}).",
    )


def _replacement_detail(swap: Swap) -> str:
    fused = swap.fused
    detail = f"{fused.fastvit_original().__name__} -> {fused.__name__} (fastvit.{fused.fastvit_op})"
    return "; ".join((detail, *swap.notes))


def _find_swaps(model: nn.Module, parts: dict[str, bool], report: PatchReport) -> list[Swap]:
    """Ask each loaded adapter what it finds; record skips and earlier patches in ``report``."""
    swaps: list[Swap] = []
    seen: set[int] = set()
    for adapter in loaded_adapters():
        try:
            family = adapter.load()
        except (ImportError, AttributeError) as err:  # a library version the adapter cannot read
            reason = f"fastvit's {adapter.family} adapter does not load with the installed {adapter.library}: {err}"
            report.skipped.append(PatchEntry("", "model", reason))
            continue
        for finding in family.find(model):
            if finding.part in parts and not parts[finding.part]:
                continue  # a part not asked for is neither patched nor reported
            if isinstance(finding, Skip):
                report.skipped.append(PatchEntry(finding.path, finding.part, finding.reason))
            elif isinstance(finding, Patched):
                detail = f"{type(finding.module).__name__} (an earlier fastvit.patch)"
                report.already_patched.append(PatchEntry(finding.path, finding.part, detail))
            elif not hasattr(fastvit, OP_OF_PART[finding.part]):
                op = OP_OF_PART[finding.part]
                reason = f"fastvit.{op} is not available in this fastvit (fastvit/ops/{op}.py is missing)"
                report.skipped.append(PatchEntry(finding.path, finding.part, reason))
            elif id(finding.module) not in seen:  # a module shared by two models (or paths) once
                seen.add(id(finding.module))
                swaps.append(finding)
    return swaps


def patch(
    model: nn.Module, *, attention: bool = True, patch_embed: bool = True, mlp: bool = True
) -> PatchReport:
    """Make ``model`` run fastvit's fused ops, in place, keeping every Parameter where it is.

    Recognised, alone or inside a larger model:

    - timm: ``VisionTransformer`` and the models sharing its blocks (vit_*, deit_*, deit3_*, ViTamin's
      GeGLU blocks ...); the attention of BEiT/BEiTv2, ``vit_relpos_*``, TinyViT, LeViT,
      EfficientFormer, Swin V1/V2 and V2-CR, SAM, Hiera, SAM 2's HieraDet, Eva (EVA02, RoPE ViTs, timm's
      DINOv3), ``AttentionRope`` (vit_pe_*, NaFlexVit's RoPE, the Qwen3-VL and DeepSeek towers), the
      Gemma 4 tower (its unclamped blocks' MLP halves too), MaxViT / CoAtNet, DaViT (Florence-2's
      encoders), Twins (SVT, PCPVT), NesT, GCViT (the MLP halves of these four too), Visformer,
      CrossViT's cross attention, ViT-22B's parallel blocks (``vit_*_xp_*``, differential:
      ``vit_dpwee_*``), PVTv2, MViTv2, VOLO, ConViT's MHSA, CaiT's class attention, XCiT and EdgeNeXt
      (cross-covariance), Next-ViT, CAFormer (MetaFormer's attention token mixer), TNT and Apple's
      FastViT / MobileCLIP (``fastvit_sa*``, ``fastvit_mci*``); the MLP halves of the Swin V1, SAM,
      HieraDet, Hiera, MaxViT, CoAtNet, vit_relpos, TinyViT, EfficientFormer, CaiT, VOLO, MViTv2, XCiT,
      ConViT, TNT, EdgeNeXt and CSATv2 (transformer) blocks, and ConvNeXt's (``convnext_*``, the
      ConvNeXt CLIP towers); the MLP alone (``norm="none"``) of the post-norm blocks (Swin V2, V2-CR,
      ``EvaBlockPostNorm``, ``ResPostRelPosBlock``, ``ResPostBlock``); ``scale_mlp``'s LayerNorm between
      the activation and fc2 (EVA02-B/L, EVA02-CLIP) as the op's ``hidden_norm``; the embeddings of
      ``VisionTransformer``, Eva, BEiT, ``vit_relpos_*``, CaiT, ConViT, SAM and the Qwen3-VL and
      DeepSeek towers;
    - torchvision: ``VisionTransformer``, Swin V1/V2 (``swin_*``, ``swin_v2_*``: V2's post-norm MLP
      alone), MaxViT and ConvNeXt's LayerNorm+MLP (``convnext_*``);
    - Hugging Face: ``ViTModel`` / ``ViTForImageClassification`` (module swaps), the MLP halves of DeiT,
      ViTMAE, CLIP, SigLIP(2), DINOv2/v3 (gated MLPs too), AIMv2 and Pixtral, the embeddings of DeiT,
      ViTMAE, ViT-MSN, I-JEPA, BEiT, data2vec-vision, CLIP, SigLIP, DINOv2/v3 and InternVL (with its
      copy in Qianfan-OCR), the MLP halves of the
      layers that are CLIP's (Chinese-CLIP, AltCLIP, OWL-ViT / OWLv2, X-CLIP, GIT, Idefics2 / 3,
      SmolVLM, Granite-Docling, Kosmos-2, CLIPSeg, MetaCLIP 2, Phi-4-multimodal, GroupViT, MiniCPM-V,
      Molmo 2, Unlimited-OCR, HunYuan-VL, HY-V4-VL, PP-OCR's SVTR blocks) and DINOv2's (C-RADIO, EoMT,
      TIPSv2, VidEoMT), of DPT's, YOLOS's, VideoMAE's and MobileViT's (ViT's 4.x layout), of the vision
      towers of BLIP / BLIP-2 / InstructBLIP(-Video), InternVL, MLCD, Janus, X-CLIP, VideoPrism,
      PaddleOCR-VL, VideoLLaMA 3, Ovis2.5, Cosmos 3 Edge, MiniMax-M3-VL and Gemma 4 (its sandwich's
      pre-MLP norm and gated MLP), MGP-STR's and AST's, of the OCR towers' own layers (Pix2Struct,
      Kosmos-2.5, Qianfan-OCR, DeepSeek-OCR 2's vision encoder), of LFM3-VL's tower, of the V-JEPA 2,
      ViTPose, Pixio, Sapiens2, RF-DETR (DINOv2), LW-DETR (ViT), PVT and TimeSformer backbones, the MLP
      halves of I-JEPA's, ViT-MSN's, ViViT's, Swin's and BEiT's layers and of the Qwen2-VL / Qwen2.5-VL
      / Qwen3-VL vision towers, ConvNeXt's ``ConvNextLayer`` branch, Swin V2's attention
      (``Swinv2SelfAttention``) and its post-norm layers' MLP alone, SAM's and SAM-HQ's image encoder
      (``SamVisionAttention`` with its decomposed relative position, ``SamVisionLayer``'s MLP half), the
      MLP halves of SAM 2's Hiera blocks and SAM 3's ViT layers, the attentions that compute their
      scores in their own forward and their layers' MLP halves where fusable: BLIP, ViTDet, Hiera,
      Donut's and MaskFormer's Swin, Swin2SR, data2vec-vision, PVT, GLPN, PVTv2, TimeSformer, MobileViT,
      FLAVA, ViLT, GroupViT (its assignment's cross-attention layer's MLP half too),
      CvT, LeViT, the SAM encoders of DeepSeek-OCR 2, GOT-OCR 2.0, PP-FormulaNet,
      SLANeXt and Unlimited-OCR, and SegGPT; and every attention going through transformers'
      ``AttentionInterface`` (below). A Hugging Face layer none of these covers is named in the report
      (its MLP half left as it is), and so is a patch embedding none of them fuses (SAM's, YOLOS',
      VideoMAE's, AIMv2's; Hiera's overlapping conv, SigLIP2's Linear over cut patches, Pixtral's
      ``patch_conv`` ...).

    Each part is replaced per module: the attention (``fastvit.flash_attention``), the
    LayerNorm+MLP half of each block with its residual add (``fastvit.layernorm_mlp``) and the
    patch embedding with its class/register tokens and position embedding (``fastvit.patch_embed``).
    A module that cannot be fused is left alone and listed in the report with the reason; calls a
    fused module does not cover (dropout in training, attention weights requested, a hook or a
    replaced submodule) run its original forward.

    Every other Hugging Face attention module that goes through transformers' ``AttentionInterface``
    (CLIP, SigLIP/SigLIP2, DINOv2/v3, DeiT, ViTMAE, AIMv2, Pixtral, BEiT, Swin ...) is routed
    instead: the config it reads is switched to ``attn_implementation="fastvit"``
    (``fastvit.nn.hf_attention``; ``unpatch`` restores each config's previous value), or, for the
    vision towers that pack their images for flash-attn (Qwen-VL, GLM-4V, Pixtral ...), to
    ``"fastvit_flash_varlen"``: one ``fastvit.flash_attention_varlen`` call per block over every
    image or window, not one call per image.

    Args:
        model: the model, on any device (not meta), with or without trained weights.
        attention, patch_embed, mlp: which parts to fuse.

    Returns:
        A ``PatchReport``: ``replaced``, ``skipped`` (with reasons) and ``already_patched``;
        ``print(report)`` gives a short table. Patching a patched model again changes nothing
        (its modules are listed in ``already_patched``), except where a submodule that a fused
        module reads without calling (an MLP's ``fc1``, a patch projection) was replaced since:
        that module is fused anew over the new submodule if it qualifies (listed in
        ``replaced``, "fused anew"; as another fused class where the MLP changed kind, plain <->
        gated) or listed in ``skipped`` if not.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a flag is not a bool.
        ValueError: nothing in ``model`` can be patched (the message says why), no part was
            asked for, or the model has tensors on the meta device. The model is then unchanged.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_base_patch16_224", pretrained=True).cuda()
        >>> print(fastvit.patch(model))
        >>> fastvit.unpatch(model)  # back to timm's own modules
    """
    _check_model(model, "patch")
    parts = {"attention": attention, "patch_embed": patch_embed, "mlp": mlp}
    for name, flag in parts.items():
        if not isinstance(flag, bool):
            raise TypeError(f"fastvit.patch: {name} must be a bool, got {flag!r}")
    if not any(parts.values()):
        raise ValueError("fastvit.patch: attention, patch_embed and mlp are all False; nothing was asked for")
    _check_not_meta(model)

    report = PatchReport(model=_class_name(model))
    swaps = _find_swaps(model, parts, report)
    routing = hf_interface.route(model, {id(s.module): s.part for s in swaps}, report) if attention else None
    if not swaps and not routing and not report.already_patched:
        families = ", ".join(a.family for a in ADAPTERS)
        reasons = "\n".join(f"  {e.part:<12} {e.where}: {e.detail}" for e in report.skipped)
        found = f"; what was found:\n{reasons}" if reasons else f": no {families} ViT modules found"
        name = type(model).__name__
        raise ValueError(f"fastvit.patch: nothing to patch in {name}{found}\nThe model is unchanged.")

    _tuning_hint(model)  # before any change: a warnings filter that makes it an error leaves the model as it was
    done: list[tuple[nn.Module, tuple | None, type | None]] = []  # (module, earlier snapshot, earlier class)
    try:
        for swap in swaps:
            module = swap.module
            if type(module) is swap.fused:  # fused earlier, its submodules replaced since: anew
                done.append((module, module.fastvit_fuse_anew(), None))
            elif isinstance(module, FusedModule):  # fused earlier as another class (its MLP changed kind)
                done.append((module, *_refuse_as(module, swap.fused)))
            else:
                swap.fused.swap_in(module)  # all or nothing for one module
                done.append((module, None, None))
    except BaseException:
        for module, earlier, earlier_class in reversed(done):  # leave the model as it was
            if earlier is None:
                module.swap_out()
            elif earlier_class is None:
                module.fastvit_unfuse_anew(earlier)
            else:
                _restore_class(module, earlier_class, earlier)
        raise
    report.replaced.extend(PatchEntry(s.path, s.part, _replacement_detail(s)) for s in swaps)
    # the layer classes named by class name: every fused class in the model, those of an earlier
    # fastvit.patch of a submodule too (its call could not reach the lists above it)
    rename_no_split(model, {type(m) for m in model.modules() if isinstance(m, FusedModule)})
    if routing:  # attention through transformers' AttentionInterface: its configs, not its modules
        routing.apply(report)
    return report


def _refuse_as(module: FusedModule, fused: type[FusedModule]) -> tuple[tuple, type[FusedModule]]:
    """Make ``module``, fused earlier as another class of the same original, an instance of ``fused``
    (all or nothing); returns its earlier snapshot and class for ``_restore_class``."""
    earlier, earlier_class = module._fastvit_watched, type(module)
    module.swap_out()
    try:
        fused.swap_in(module)
    except BaseException:
        _restore_class(module, earlier_class, earlier)
        raise
    return earlier, earlier_class


def _restore_class(module: nn.Module, fused: type[FusedModule], watched: tuple) -> None:
    """Undo ``_refuse_as``: ``module`` back to ``fused`` with its earlier snapshot."""
    if isinstance(module, FusedModule):
        module.swap_out()
    fused.swap_in(module)
    module.fastvit_unfuse_anew(watched)


def _restoration_plan(model: nn.Module) -> list[tuple[str, FusedModule, type[nn.Module]]]:
    """Each fused module of ``model`` (once, if shared) with the class ``unpatch`` gives it back.
    Raises, naming the module, where one cannot be restored: before ``unpatch`` changes anything."""
    plan = []
    for path, module in model.named_modules():
        if not isinstance(module, FusedModule):
            continue
        try:
            plan.append((path, module, unfused_class(type(module))))
        except TypeError as err:
            where = path or f"the model ({type(model).__name__})"
            raise TypeError(f"fastvit.unpatch: cannot restore {where}: {err}. The model is unchanged.") from err
    return plan


def unpatch(model: nn.Module) -> PatchReport:
    """Undo ``fastvit.patch``: every fused module gets its original class back.

    The model then computes exactly what it did before patching (same modules, same tensors). A
    model that was never patched is left as it is (the report lists nothing). A module whose class
    another library derived from its fused class after patching (``torch.nn.utils.parametrize``'s
    ``ParametrizedFusedX``, FSDP2's ``FSDPFusedX``) gets the same derivation of its original
    (``ParametrizedX``, ``FSDPX``; ``fastvit.nn.fused.unfused_class``).

    Args:
        model: the ``nn.Module`` that ``fastvit.patch`` patched (or any module holding patched
            modules; every fused module inside it is restored, and the Hugging Face configs
            ``patch`` switched get their previous ``attn_implementation`` back).

    Returns:
        A ``PatchReport`` whose ``replaced`` lists the modules restored.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or a module's class cannot be restored (e.g.
            a subclass of a fused class whose methods call ``super()``); the message names it, and
            the model is left unchanged.

    Example:
        >>> import timm
        >>> model = timm.create_model("vit_base_patch16_224")
        >>> report = fastvit.patch(model)
        >>> print(fastvit.unpatch(model))  # doctest: +ELLIPSIS
        fastvit.unpatch(VisionTransformer): 25 restored
          restored:
            patch_embed  (model)              FusedVisionTransformer -> VisionTransformer
        ...
    """
    _check_model(model, "unpatch")
    restored = []
    for path, module, original in _restoration_plan(model):  # every class worked out, nothing changed yet
        fused = type(module)
        module.swap_out(original)
        restored.append(PatchEntry(path, fused.fastvit_part, f"{fused.__name__} -> {original.__name__}"))
    restored += hf_interface.restore(model)
    restore_no_split(model)
    return PatchReport(model=_class_name(model), action="unpatch", replaced=restored)
