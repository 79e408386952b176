"""torchvision adapter: ``VisionTransformer`` (vit_b_16 ... vit_h_14): each ``EncoderBlock``'s
``nn.MultiheadAttention`` and LayerNorm+MLP half, and the embedding (``conv_proj``, ``class_token``,
``encoder.pos_embedding``); the window attention of ``SwinTransformer`` (swin_t/s/b:
``ShiftedWindowAttention``; swin_v2_t/s/b: ``ShiftedWindowAttentionV2``) and of ``MaxVit``
(maxvit_t: ``RelativePositionalMultiHeadAttention``), wherever those modules sit, and the
LayerNorm+MLP halves of Swin V1's ``SwinTransformerBlock`` and of MaxViT's
``PartitionAttentionLayer``, the MLP alone of Swin V2's post-norm ``SwinTransformerBlockV2`` (its
norm, stochastic depth and residual add stay torchvision's); and the LayerNorm+MLP of ConvNeXt's
``CNBlock`` (``convnext_*``).

``nn.MultiheadAttention`` is patched only as an ``EncoderBlock``'s ``self_attention``, where it is
known to be called as self-attention without weights; elsewhere in a model it is left alone.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.swin_transformer import SwinTransformerBlockV2
from torchvision.models.vision_transformer import Encoder, MLPBlock
from torchvision.ops.misc import MLP, Permute
from torchvision.ops.stochastic_depth import StochasticDepth

from fastvit.nn import torchvision_convnext, torchvision_maxvit, torchvision_swin
from fastvit.nn import torchvision_vit as fused
from fastvit.patching.checks import (
    class_name,
    exact_type,
    layernorm_problems,
    missing_attributes,
    patch_conv_problems,
)
from fastvit.patching.registry import Finding, Skip, foreign, fused_table, join, slot

__all__ = ["FAMILY", "find"]

FAMILY = "torchvision"
_ATTENTIONS = fused_table(fused.FusedMultiheadAttention)
_BLOCKS = fused_table(fused.FusedEncoderBlock)
_MODELS = fused_table(fused.FusedVisionTransformer)
_SWIN_BLOCKS = fused_table(torchvision_swin.FusedSwinTransformerBlock)
_MAXVIT_LAYERS = fused_table(torchvision_maxvit.FusedPartitionAttentionLayer)
_CONVNEXT_BLOCKS = fused_table(torchvision_convnext.FusedCNBlock)
_MLPS_ALONE = fused_table(torchvision_swin.FusedMLPAlone)  # Swin V2's post-norm blocks' MLPs
_WINDOW_ATTENTIONS = fused_table(
    torchvision_swin.FusedShiftedWindowAttention,
    torchvision_swin.FusedShiftedWindowAttentionV2,
    torchvision_maxvit.FusedRelativePositionalMultiHeadAttention,
)


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


def _class_names(classes: tuple[type, ...]) -> str:
    return ", ".join(class_name(cls) for cls in classes)


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
        names = _class_names(got)
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


def _swin_attention_problems(attn: nn.Module) -> list[str]:
    problems = missing_attributes(
        attn, ("qkv", "proj", "window_size", "shift_size", "num_heads", "attention_dropout", "dropout"), "torchvision"
    )
    if problems:
        return problems
    problems += exact_type(attn.qkv, "qkv", (nn.Linear,), "nn.Linear")
    problems += exact_type(attn.proj, "proj", (nn.Linear,), "nn.Linear")
    if problems:
        return problems
    dim = attn.proj.in_features
    if attn.qkv.in_features != dim or attn.qkv.out_features != 3 * dim or attn.proj.out_features != dim:
        problems.append(
            f"qkv is {attn.qkv.in_features} -> {attn.qkv.out_features} and proj {dim} -> "
            f"{attn.proj.out_features}; the fused forward needs C -> 3C and C -> C"
        )
    if dim % attn.num_heads:
        problems.append(f"width {dim} is not a multiple of num_heads {attn.num_heads}")
    if len(attn.window_size) != 2 or len(attn.shift_size) != 2:
        problems.append(f"window_size {attn.window_size} / shift_size {attn.shift_size} are not 2-D")
    return problems


def _swin_attention_notes(attn: nn.Module) -> list[str]:
    p = max(attn.attention_dropout, attn.dropout)
    return [f"dropout {p}: in training it runs torchvision's forward"] if p > 0 else []


def _row_stochastic_depth_problems(module: nn.Module, name: str) -> list[str]:
    """Why ``module.<name>`` is no row-wise ``StochasticDepth`` (the op's per-sample ``sample_scale``)."""
    drop = getattr(module, name)
    problems = exact_type(drop, name, (StochasticDepth,), "StochasticDepth")
    if not problems and drop.mode != "row":
        problems.append(f"{name} mode {drop.mode!r}, not 'row'")
    return problems


def _swin_block_problems(block: nn.Module) -> list[str]:
    problems = missing_attributes(block, ("norm1", "attn", "stochastic_depth", "norm2", "mlp"), "torchvision")
    if problems:
        return problems
    problems += layernorm_problems(block.norm2, "norm2")
    problems += _row_stochastic_depth_problems(block, "stochastic_depth")
    problems += exact_type(block.mlp, "mlp", (MLP,), "torchvision's MLP")
    return problems or _mlp_layers_problems(block.mlp)


def _mlp_layers_problems(mlp: nn.Module) -> list[str]:
    """Why the layers of torchvision's ``MLP`` (a block's ``mlp``) are not the op's MLP."""
    expected = (nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout)
    got = tuple(type(layer) for layer in mlp)
    if got == expected:
        return []
    names = _class_names(got)
    return [f"mlp holds ({names}), not (Linear, GELU, Dropout, Linear, Dropout)"]


def _post_norm_mlp(path: str, block: nn.Module) -> Finding:
    """The finding for Swin V2's post-norm block's ``mlp``: torchvision's ``MLP`` becomes
    ``FusedMLPAlone``, the block itself stays torchvision's."""
    mlp, mlp_path = block._modules.get("mlp"), join(path, "mlp")
    if type(mlp) not in _MLPS_ALONE:
        return Skip(mlp_path, "mlp", foreign(mlp, "torchvision's MLP"))
    return slot(mlp_path, mlp, "mlp", _MLPS_ALONE[type(mlp)], _mlp_layers_problems, _mlp_alone_notes)


def _mlp_alone_notes(mlp: nn.Module) -> list[str]:
    p = max(mlp[2].p, mlp[4].p)
    return [f"MLP dropout {p}: in training it runs torchvision's layers"] if p > 0 else []


def _swin_block_notes(block: nn.Module) -> list[str]:
    p = max(block.mlp[2].p, block.mlp[4].p)
    return [f"MLP dropout {p}: in training its MLP half runs torchvision's modules"] if p > 0 else []


def _maxvit_layer_problems(layer: nn.Module) -> list[str]:
    """Why the MLP half of a MaxViT PartitionAttentionLayer, x + stochastic_dropout(mlp_layer(x)),
    cannot be fused."""
    names = ("partition_op", "departition_op", "partition_swap", "departition_swap", "attn_layer", "mlp_layer",
             "stochastic_dropout", "p", "grid_size")  # fmt: skip
    problems = missing_attributes(layer, names, "torchvision")
    if problems:
        return problems
    problems += _row_stochastic_depth_problems(layer, "stochastic_dropout")
    problems += exact_type(layer.mlp_layer, "mlp_layer", (nn.Sequential,), "nn.Sequential")
    if problems:
        return problems
    got = tuple(type(m) for m in layer.mlp_layer)
    if got[:2] + got[3:] != (nn.LayerNorm, nn.Linear, nn.Linear, nn.Dropout) or len(got) != 5:
        names = _class_names(got)
        return [f"mlp_layer holds ({names}), not (LayerNorm, Linear, activation, Linear, Dropout)"]
    problems += layernorm_problems(layer.mlp_layer[0], "mlp_layer.0")
    if torchvision_maxvit.torchvision_activation(layer.mlp_layer[2]) is None:
        problems.append(f"mlp_layer.2 is {type(layer.mlp_layer[2]).__name__}; the fused op computes GELU or SiLU")
    return problems


def _maxvit_layer_notes(layer: nn.Module) -> list[str]:
    p = layer.mlp_layer[4].p
    return [f"MLP dropout {p}: in training its MLP half runs torchvision's modules"] if p > 0 else []


def _convnext_block_problems(block: nn.Module) -> list[str]:
    """Why a ConvNeXt CNBlock, stochastic_depth(layer_scale * block(x)) + x, cannot be fused: its
    ``block`` must be (Conv2d, Permute to channels-last, LayerNorm, Linear, GELU, Linear, Permute back)."""
    problems = missing_attributes(block, ("block", "layer_scale", "stochastic_depth"), "torchvision")
    if problems:
        return problems
    problems += _row_stochastic_depth_problems(block, "stochastic_depth")
    problems += exact_type(block.block, "block", (nn.Sequential,), "nn.Sequential")
    if problems:
        return problems
    got = tuple(type(m) for m in block.block)
    if len(got) != 7 or got[:4] + got[5:] != (nn.Conv2d, Permute, nn.LayerNorm, nn.Linear, nn.Linear, Permute):
        names = _class_names(got)
        return [f"block holds ({names}), not (Conv2d, Permute, LayerNorm, Linear, activation, Linear, Permute)"]
    if list(block.block[1].dims) != [0, 2, 3, 1] or list(block.block[6].dims) != [0, 3, 1, 2]:
        problems.append(f"block's permutes are {block.block[1].dims} and {block.block[6].dims}, not channels-last "
                        "and back")  # fmt: skip
    problems += layernorm_problems(block.block[2], "block.2")
    if torchvision_maxvit.torchvision_activation(block.block[4]) is None:
        problems.append(f"block.4 is {type(block.block[4]).__name__}; the fused op computes GELU or SiLU")
    dim = block.block[5].out_features
    if tuple(block.layer_scale.shape) not in ((dim, 1, 1), (dim,)):
        problems.append(f"layer_scale has shape {tuple(block.layer_scale.shape)}, not ({dim}, 1, 1)")
    return problems


def _maxvit_attention_problems(attn: nn.Module) -> list[str]:
    problems = missing_attributes(
        attn, ("to_qkv", "merge", "n_heads", "head_dim", "scale_factor", "max_seq_len"), "torchvision"
    )
    if problems:
        return problems
    problems += exact_type(attn.to_qkv, "to_qkv", (nn.Linear,), "nn.Linear")
    width = attn.n_heads * attn.head_dim
    if not problems and attn.to_qkv.out_features != 3 * width:
        problems.append(f"to_qkv gives {attn.to_qkv.out_features} features, not 3 * {width}")
    return problems


def _window_attention_slot(path: str, module: nn.Module) -> Finding:
    fused_cls = _WINDOW_ATTENTIONS[type(module)]
    if fused_cls is torchvision_maxvit.FusedRelativePositionalMultiHeadAttention:
        return slot(path, module, "attention", fused_cls, _maxvit_attention_problems)
    return slot(path, module, "attention", fused_cls, _swin_attention_problems, _swin_attention_notes)


def find(model: nn.Module) -> list[Finding]:
    """What can be fused in ``model``'s torchvision ViT, Swin, MaxViT and ConvNeXt modules (see
    ``fastvit.patching.registry``)."""
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
        elif cls in _WINDOW_ATTENTIONS:
            findings.append(_window_attention_slot(path, module))
        elif cls in _SWIN_BLOCKS:
            findings.append(slot(path, module, "mlp", _SWIN_BLOCKS[cls], _swin_block_problems, _swin_block_notes))
        elif cls is SwinTransformerBlockV2:
            findings.append(_post_norm_mlp(path, module))
        elif cls in _CONVNEXT_BLOCKS:
            findings.append(slot(path, module, "mlp", _CONVNEXT_BLOCKS[cls], _convnext_block_problems))
        elif cls in _MAXVIT_LAYERS:
            findings.append(slot(path, module, "mlp", _MAXVIT_LAYERS[cls], _maxvit_layer_problems,
                                 _maxvit_layer_notes))  # fmt: skip
    return findings
