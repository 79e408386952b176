"""timm adapter: ``Attention`` anywhere, the pre-norm ``Block``'s LayerNorm+MLP half, and the
``VisionTransformer`` / ``VisionTransformerDistilled`` embedding.

That covers vit_* (register tokens, ``qk_norm``, ``no_embed_class``, ``class_token=False``,
``dynamic_img_size``), deit_* (distilled too), deit3_* (LayerScale) and the other timm models built
from the same blocks. Other timm architectures (``fastvit_*``, Eva, Swin ...) are left alone.
"""

from __future__ import annotations

import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers.format import Format

from fastvit.nn import timm_vit as fused
from fastvit.patching.checks import exact_type, layernorm_problems, missing_attributes, patch_conv_problems
from fastvit.patching.registry import Finding, Skip, foreign, fused_table, join, slot

__all__ = ["FAMILY", "find"]

FAMILY = "timm"
_ATTENTIONS = fused_table(fused.FusedAttention)
_BLOCKS = fused_table(fused.FusedBlock)
_MODELS = fused_table(fused.FusedVisionTransformer, fused.FusedVisionTransformerDistilled)


def _attention_problems(attn: nn.Module) -> list[str]:
    names = (
        "qkv",
        "q_norm",
        "k_norm",
        "attn_drop",
        "norm",
        "proj",
        "proj_drop",
        "num_heads",
        "head_dim",
        "scale",
    )
    return missing_attributes(attn, names, "timm")


def _attention_notes(attn: nn.Module) -> list[str]:
    p = attn.attn_drop.p
    return [f"attention dropout {p}: in training it runs timm's forward"] if p > 0 else []


def _block_problems(block: nn.Module) -> list[str]:
    problems = missing_attributes(
        block, ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"), "timm"
    )
    if problems:
        return problems
    problems += layernorm_problems(block.norm2, "norm2", (nn.LayerNorm, TimmLayerNorm))
    problems += exact_type(block.ls2, "ls2", (nn.Identity, LayerScale), "LayerScale")
    problems += exact_type(block.drop_path2, "drop_path2", (nn.Identity, DropPath), "DropPath")
    mlp = block.mlp
    problems += exact_type(mlp, "mlp", (Mlp,), "timm's Mlp (the fused op is a GELU MLP)")
    if problems:
        return problems
    problems += exact_type(mlp.fc1, "mlp.fc1", (nn.Linear,), "nn.Linear")
    problems += exact_type(mlp.fc2, "mlp.fc2", (nn.Linear,), "nn.Linear")
    problems += exact_type(mlp.norm, "mlp.norm", (nn.Identity,), "Identity (scale_mlp_norm is not fused)")
    problems += exact_type(mlp.drop1, "mlp.drop1", (nn.Dropout,), "nn.Dropout")
    problems += exact_type(mlp.drop2, "mlp.drop2", (nn.Dropout,), "nn.Dropout")
    if fused.gelu_approximate(mlp.act) is None:
        problems.append(
            f"mlp.act is {type(mlp.act).__qualname__}; the fused op computes GELU (exact or tanh)"
        )
    return problems


def _block_notes(block: nn.Module) -> list[str]:
    notes = []
    p = max(block.mlp.drop1.p, block.mlp.drop2.p)
    if p > 0:
        notes.append(f"MLP dropout {p}: in training its MLP half runs timm's modules")
    if isinstance(block.drop_path2, DropPath) and block.drop_path2.drop_prob > 0:
        notes.append(f"drop path {block.drop_path2.drop_prob} as the op's sample_scale")
    return notes


def _embed_problems(model: nn.Module) -> list[str]:
    embed = model.patch_embed
    problems = exact_type(embed, "patch_embed", (PatchEmbed,), "timm's PatchEmbed (e.g. a hybrid CNN stem)")
    if problems:
        return problems
    problems += patch_conv_problems(embed.proj, "patch_embed.proj")
    problems += exact_type(
        embed.norm, "patch_embed.norm", (nn.Identity,), "Identity (a norm before the tokens)"
    )
    flat = embed.flatten and embed.output_fmt == Format.NCHW
    if not (flat or (model.dynamic_img_size and embed.output_fmt == Format.NHWC)):
        problems.append(f"patch_embed output format {embed.output_fmt} (flatten={embed.flatten})")
    return problems


def find(model: nn.Module) -> list[Finding]:
    """What can be fused in ``model``'s timm modules (see ``fastvit.patching.registry``)."""
    findings: list[Finding] = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls in _ATTENTIONS:
            findings.append(
                slot(path, module, "attention", _ATTENTIONS[cls], _attention_problems, _attention_notes)
            )
        elif cls in _BLOCKS:
            findings.append(slot(path, module, "mlp", _BLOCKS[cls], _block_problems, _block_notes))
            attn = getattr(module, "attn", None)
            if type(attn) not in _ATTENTIONS:
                findings.append(Skip(join(path, "attn"), "attention", foreign(attn, "timm's Attention")))
        elif cls in _MODELS:
            findings.append(slot(path, module, "patch_embed", _MODELS[cls], _embed_problems))
        elif cls.__module__ == "timm.models.vision_transformer" and cls.__name__.endswith("Block"):
            findings.append(Skip(path, "mlp", f"{cls.__name__} is not timm's pre-norm Block: left alone"))
        elif cls.__module__ == "timm.models.fastvit" and not path:
            findings.append(
                Skip(path, "model", "timm's fastvit_* models are Apple's FastViT, a different architecture "
                     "(no ViT attention, MLP or patch-embed modules): left alone")
            )  # fmt: skip
    return findings
