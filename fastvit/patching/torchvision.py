"""torchvision adapter: ``VisionTransformer`` (vit_b_16 ... vit_h_14): each ``EncoderBlock``'s
``nn.MultiheadAttention`` and LayerNorm+MLP half, and the embedding (``conv_proj``, ``class_token``,
``encoder.pos_embedding``).

``nn.MultiheadAttention`` is patched only as an ``EncoderBlock``'s ``self_attention``, where it is
known to be called as self-attention without weights; elsewhere in a model it is left alone.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.vision_transformer import Encoder, MLPBlock

from fastvit.nn import torchvision_vit as fused
from fastvit.patching.checks import exact_type, layernorm_problems, missing_attributes, patch_conv_problems
from fastvit.patching.registry import Finding, Skip, foreign, fused_table, join, slot

__all__ = ["FAMILY", "find"]

FAMILY = "torchvision"
_ATTENTIONS = fused_table(fused.FusedMultiheadAttention)
_BLOCKS = fused_table(fused.FusedEncoderBlock)
_MODELS = fused_table(fused.FusedVisionTransformer)


def _attention_problems(mha: nn.Module) -> list[str]:
    problems = []
    if not mha._qkv_same_embed_dim:
        problems.append("separate q/k/v projections (kdim/vdim differ from embed_dim)")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        problems.append("bias_k/bias_v or add_zero_attn")
    problems += exact_type(
        mha.out_proj, "out_proj", (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear), "nn.Linear"
    )
    return problems


def _attention_notes(mha: nn.Module) -> list[str]:
    return (
        [f"attention dropout {mha.dropout}: in training it runs PyTorch's forward"] if mha.dropout > 0 else []
    )


def _block_problems(block: nn.Module) -> list[str]:
    problems = missing_attributes(block, ("ln_1", "self_attention", "dropout", "ln_2", "mlp"), "torchvision")
    if problems:
        return problems
    problems += layernorm_problems(block.ln_2, "ln_2")
    problems += exact_type(block.mlp, "mlp", (MLPBlock,), "torchvision's MLPBlock")
    if problems:
        return problems
    expected = (nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout)
    got = tuple(type(layer) for layer in block.mlp)
    if got != expected:
        names = ", ".join(cls.__name__ for cls in got)
        problems.append(f"mlp holds ({names}), not (Linear, GELU, Dropout, Linear, Dropout)")
    return problems


def _block_notes(block: nn.Module) -> list[str]:
    p = max(block.mlp[2].p, block.mlp[4].p)
    return [f"MLP dropout {p}: in training its MLP half runs torchvision's modules"] if p > 0 else []


def _embed_problems(model: nn.Module) -> list[str]:
    problems = patch_conv_problems(
        model.conv_proj, "conv_proj"
    )  # a conv stem (conv_stem_configs) is not fused
    if not problems and model.conv_proj.kernel_size[0] != model.patch_size:
        problems.append(
            f"conv_proj kernel {model.conv_proj.kernel_size} differs from patch_size {model.patch_size}"
        )
    problems += exact_type(model.encoder, "encoder", (Encoder,), "torchvision's Encoder")
    if not problems:
        problems += missing_attributes(model.encoder, ("pos_embedding", "dropout", "layers", "ln"), "torchvision")
    if getattr(model, "class_token", None) is None:
        problems.append("no class_token")
    return problems


def find(model: nn.Module) -> list[Finding]:
    """What can be fused in ``model``'s torchvision ViT modules (see ``fastvit.patching.registry``)."""
    findings: list[Finding] = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls in _BLOCKS:
            findings.append(slot(path, module, "mlp", _BLOCKS[cls], _block_problems, _block_notes))
            mha = getattr(module, "self_attention", None)
            mha_path = join(path, "self_attention")
            if type(mha) in _ATTENTIONS:
                findings.append(
                    slot(
                        mha_path,
                        mha,
                        "attention",
                        _ATTENTIONS[type(mha)],
                        _attention_problems,
                        _attention_notes,
                    )
                )
            else:
                findings.append(Skip(mha_path, "attention", foreign(mha, "nn.MultiheadAttention")))
        elif cls in _MODELS:
            findings.append(slot(path, module, "patch_embed", _MODELS[cls], _embed_problems))
    return findings
