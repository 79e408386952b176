"""Fused subclasses of Hugging Face's ViT modules (transformers 5.x layout), swapped onto a model by
``fastvit.patch``.

``ViTAttention`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``), ``ViTLayer`` (its LayerNorm+MLP
half: ``layernorm_after``, ``mlp.fc1``/``mlp.fc2``) and ``ViTEmbeddings``. The fused classes
subclass Hugging Face's, so ``ViTLayer``'s gradient-checkpointing base and the output-capture hooks
(``output_attentions`` / ``output_hidden_states`` match modules by class) keep working. See
``fastvit.nn.fused`` for how the swap works and ``fastvit/patching/transformers.py`` for what is
checked first. Importing this module imports transformers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.activations import (
    AccurateGELUActivation,
    FastGELUActivation,
    GELUActivation,
    GELUTanh,
    NewGELUActivation,
    QuickGELUActivation,
    SiLUActivation,
)
from transformers.models.vit.modeling_vit import ViTAttention, ViTEmbeddings, ViTLayer

import fastvit
from fastvit.nn.attention import self_attention, warn_attention_dropout
from fastvit.nn.fused import FusedModule, conv_takes, dropout_active, warn_fallback
from fastvit.ops._fx import method_leaf
from fastvit.ops.patch_embed import crop_to_patches

__all__ = ["FusedViTAttention", "FusedViTEmbeddings", "FusedViTLayer", "activation_of", "gelu_approximate"]


def gelu_approximate(act: nn.Module) -> str | None:
    """``"none"`` / ``"tanh"`` for the GELU activations of ``ACT2FN``, None for any other."""
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is GELUActivation:  # "gelu" (also its python variant: the same erf formula)
        return "none"
    if type(act) in (GELUTanh, NewGELUActivation):  # "gelu_pytorch_tanh", "gelu_new"
        return "tanh"
    # "gelu_fast" (ViViT's default: its constant 0.7978845608 is sqrt(2 / pi) to 3e-12, far below
    # fp32's resolution) and "gelu_accurate": the tanh formula again, written otherwise
    if type(act) in (FastGELUActivation, AccurateGELUActivation):
        return "tanh"
    return None


def activation_of(act: nn.Module) -> str | None:
    """``fastvit.layernorm_mlp``'s ``activation=`` for an ``ACT2FN`` module (or torch's GELU/SiLU),
    None for one it does not compute (ClippedGELU, ReLU, ...).

    Example:
        >>> activation_of(ACT2FN["quick_gelu"]), activation_of(nn.GELU(approximate="tanh"))
        ('quick_gelu', 'gelu_tanh')
    """
    approximate = gelu_approximate(act)
    if approximate is not None:
        return "gelu" if approximate == "none" else "gelu_tanh"
    if type(act) is QuickGELUActivation:  # x * sigmoid(1.702 x), CLIP's
        return "quick_gelu"
    if type(act) in (SiLUActivation, nn.SiLU):
        return "silu"
    return None


class FusedViTAttention(FusedModule, ViTAttention):
    """``ViTAttention`` running ``fastvit.flash_attention``; returns ``(attn_output, None)``.

    An ``attention_mask`` (SDPA's convention, as Hugging Face passes it: bool or additive float,
    broadcastable to (B, H, N, N)) goes to the op's ``attn_mask``. Calls with ``output_attentions``
    (argument or config), or in training with attention dropout > 0, run Hugging Face's forward (its
    configured ``attn_implementation``), which returns the attention weights where it computes them.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        wants_weights = kwargs.get("output_attentions", getattr(self.config, "output_attentions", False))
        if wants_weights or self._fastvit_overridden():
            return super().forward(hidden_states, attention_mask, **kwargs)
        if dropout_active(self.attention_dropout, self.training):
            warn_attention_dropout("Hugging Face ViTAttention", self.attention_dropout)
            return super().forward(hidden_states, attention_mask, **kwargs)
        heads = (-1, self.head_dim)  # (B, N, H*D) -> (B, H, N, D) views, traceable by torch.fx
        q = self.q_proj(hidden_states).unflatten(-1, heads).transpose(1, 2)
        k = self.k_proj(hidden_states).unflatten(-1, heads).transpose(1, 2)
        v = self.v_proj(hidden_states).unflatten(-1, heads).transpose(1, 2)
        out = self_attention(q, k, v, scale=self.scaling, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).flatten(-2)), None

    def extra_repr(self) -> str:
        return f"heads={self.num_attention_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


class FusedViTLayer(FusedModule, ViTLayer):
    """``ViTLayer`` whose second half (``layernorm_after``, ``mlp``, dropout, residual) is one
    ``fastvit.layernorm_mlp`` call. A ``GradientCheckpointingLayer`` like ``ViTLayer``; in training
    with hidden dropout > 0 the second half runs Hugging Face's modules."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layernorm_after", "mlp", "mlp.fc1", "mlp.activation_fn", "mlp.fc2", "dropout")

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be ViTLayer.forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual
        return self._fastvit_mlp_half(hidden_states)

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module."""
        return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``dropout(mlp(layernorm_after(h))) + h``: one ``fastvit.layernorm_mlp`` call, or Hugging Face's
        modules."""
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_half(hidden_states)

        if dropout_active(self.dropout.p, self.dropout.training):
            warn_fallback(
                "patched-mlp-dropout:transformers",
                "fastvit: a patched Hugging Face ViTLayer has hidden dropout > 0 and is in training "
                "mode; fastvit.layernorm_mlp has no dropout, so its MLP half runs Hugging Face's modules",
            )
            return self._fastvit_original_half(hidden_states)
        norm, mlp = self.layernorm_after, self.mlp
        return fastvit.layernorm_mlp(
            hidden_states, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
            eps=norm.eps, approximate=gelu_approximate(mlp.activation_fn),
        )  # fmt: skip

    def extra_repr(self) -> str:
        norm = self.layernorm_after
        return f"dim={norm.normalized_shape[0]}, eps={norm.eps}, fastvit={self.fastvit_op}"


class FusedViTEmbeddings(FusedModule, ViTEmbeddings):
    """``ViTEmbeddings`` as one ``fastvit.patch_embed`` call (projection, ``cls_token``
    prepended, ``position_embeddings`` added) then dropout. Calls with ``bool_masked_pos`` or
    ``interpolate_pos_encoding``, or pixels its conv would refuse (other channels, another dtype
    outside autocast), run Hugging Face's forward."""

    fastvit_part = "patch_embed"
    fastvit_op = "patch_embed"
    fastvit_bypassed = ("patch_embeddings", "patch_embeddings.projection")

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        if (
            bool_masked_pos is not None
            or interpolate_pos_encoding
            or not self._fastvit_intact()
            or not conv_takes(pixel_values, self.patch_embeddings.projection)  # Hugging Face's errors
        ):
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        _, channels, height, width = pixel_values.shape  # Hugging Face's checks, with its messages
        if channels != self.patch_embeddings.num_channels:
            raise ValueError(
                "Make sure that the channel dimension of the pixel values match with the one set in the "
                f"configuration. Expected {self.patch_embeddings.num_channels} but got {channels}."
            )
        if height != self.image_size[0] or width != self.image_size[1]:
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model"
                f" ({self.image_size[0]}*{self.image_size[1]})."
            )
        projection = self.patch_embeddings.projection
        embeddings = fastvit.patch_embed(
            crop_to_patches(pixel_values, projection.weight.shape[-1]),  # its conv drops a partial patch
            projection.weight,
            projection.bias,
            pos_embed=self.position_embeddings,
            prefix_tokens=self.cls_token,
        )
        return self.dropout(embeddings)
