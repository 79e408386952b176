"""Hugging Face transformers adapter: ``ViTModel`` and the models built on it
(``ViTForImageClassification``, ``ViTForMaskedImageModeling``) in the transformers 5.x layout:
``ViTAttention`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``), ``ViTLayer``'s LayerNorm+MLP half
(``layernorm_after``, ``mlp.fc1``/``mlp.fc2``) and ``ViTEmbeddings``.

The 4.x layout (``attention.attention.{query,key,value}``, ``intermediate.dense``,
``output.dense``) is recognised and left alone with a message saying so, both when transformers
4.x is installed and for 4.x-layout modules seen beside 5.x.
"""

from __future__ import annotations

import torch.nn as nn
import transformers
from transformers.models.vit import modeling_vit

from fastvit.patching.checks import exact_type, layernorm_problems, missing_attributes, patch_conv_problems
from fastvit.patching.registry import Finding, Skip, foreign, fused_table, join, slot

__all__ = ["FAMILY", "INSTALLED_LAYOUT_SUPPORTED", "find"]

FAMILY = "transformers"
# 5.x has ViTMLP (mlp.fc1/fc2) and ViTAttention with q_proj ...; 4.x has ViTIntermediate/ViTOutput.
INSTALLED_LAYOUT_SUPPORTED = hasattr(modeling_vit, "ViTMLP")

V4_LAYOUT_REASON = (
    "Hugging Face ViT in the transformers 4.x layout (attention.attention.{query,key,value}, "
    "intermediate.dense, output.dense): fastvit patches the 5.x layout (attention.{q,k,v,o}_proj, "
    f"mlp.{{fc1,fc2}}) of transformers >= 5 (installed: {transformers.__version__}); left alone"
)


def _is_v4_layer(module: nn.Module) -> bool:
    """A ViTLayer with 4.x children, whichever transformers defined its class."""
    attention = getattr(module, "attention", None)
    return (
        type(module).__name__ == "ViTLayer"
        and hasattr(module, "intermediate")
        and hasattr(module, "output")
        and hasattr(attention, "attention")
    )


def _v4_findings(model: nn.Module) -> list[Finding]:
    return [
        Skip(path, "model", V4_LAYOUT_REASON)
        for path, module in model.named_modules()
        if _is_v4_layer(module)
    ]


if INSTALLED_LAYOUT_SUPPORTED:  # fastvit.nn.hf_vit subclasses the 5.x classes
    from fastvit.nn import hf_vit as fused

    _ATTENTIONS = fused_table(fused.FusedViTAttention)
    _LAYERS = fused_table(fused.FusedViTLayer)
    _EMBEDDINGS = fused_table(fused.FusedViTEmbeddings)


def _attention_problems(attn: nn.Module) -> list[str]:
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config", "attention_dropout")
    return missing_attributes(attn, names, "transformers")


def _attention_notes(attn: nn.Module) -> list[str]:
    p = attn.attention_dropout
    return [f"attention dropout {p}: in training it runs Hugging Face's forward"] if p > 0 else []


def _layer_problems(layer: nn.Module) -> list[str]:
    names = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    problems += layernorm_problems(layer.layernorm_after, "layernorm_after")
    problems += exact_type(layer.mlp, "mlp", (modeling_vit.ViTMLP,), "ViTMLP")
    problems += exact_type(layer.dropout, "dropout", (nn.Dropout,), "nn.Dropout")
    if problems:
        return problems
    problems += exact_type(layer.mlp.fc1, "mlp.fc1", (nn.Linear,), "nn.Linear")
    problems += exact_type(layer.mlp.fc2, "mlp.fc2", (nn.Linear,), "nn.Linear")
    if fused.gelu_approximate(layer.mlp.activation_fn) is None:
        act = type(layer.mlp.activation_fn).__qualname__
        problems.append(f"mlp.activation_fn is {act}; the fused op computes GELU (exact or tanh)")
    return problems


def _layer_notes(layer: nn.Module) -> list[str]:
    p = layer.dropout.p
    return [f"hidden dropout {p}: in training its MLP half runs Hugging Face's modules"] if p > 0 else []


def _embedding_problems(emb: nn.Module) -> list[str]:
    patches = emb.patch_embeddings
    problems = exact_type(
        patches, "patch_embeddings", (modeling_vit.ViTPatchEmbeddings,), "ViTPatchEmbeddings"
    )
    return problems or patch_conv_problems(patches.projection, "patch_embeddings.projection")


def find(model: nn.Module) -> list[Finding]:
    """What can be fused in ``model``'s Hugging Face ViT modules (see ``fastvit.patching.registry``)."""
    if not INSTALLED_LAYOUT_SUPPORTED:
        return _v4_findings(model)
    findings: list[Finding] = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls in _ATTENTIONS:
            findings.append(
                slot(path, module, "attention", _ATTENTIONS[cls], _attention_problems, _attention_notes)
            )
        elif cls in _LAYERS:
            findings.append(slot(path, module, "mlp", _LAYERS[cls], _layer_problems, _layer_notes))
            attn = getattr(module, "attention", None)
            if type(attn) not in _ATTENTIONS:
                findings.append(Skip(join(path, "attention"), "attention", foreign(attn, "ViTAttention")))
        elif cls in _EMBEDDINGS:
            findings.append(slot(path, module, "patch_embed", _EMBEDDINGS[cls], _embedding_problems))
        elif _is_v4_layer(module):
            findings.append(Skip(path, "model", V4_LAYOUT_REASON))
    return findings
