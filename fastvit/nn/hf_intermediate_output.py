"""Fused subclasses of the Hugging Face encoder layers still in ViT's 4.x layout, whose MLP half is two
modules: ``intermediate`` (``dense``, ``intermediate_act_fn``) and ``output`` (``dense``, ``dropout``
and the residual add, ``output(h, input)``). DPT's ``DPTViTLayer`` (DPT, and the depth models built on
it), YOLOS's ``YolosLayer`` and VideoMAE's ``VideoMAELayer`` (``INTERMEDIATE_OUTPUT_FAMILIES``,
checked line for line against one another in the tests), MobileViT's ``MobileViTTransformerLayer``,
FLAVA's ``FlavaLayer`` (its image, text and multimodal encoders), ViLT's ``ViltLayer`` (FLAVA's over
its joint text and image tokens) and CvT's ``CvtLayer`` (its activation
``intermediate.activation``; its drop path applied to the whole layer's output, as Hugging Face's).

    hidden_states = attention(layernorm_before(h)) + h                     (Hugging Face's, kept)
    layer_output  = output(intermediate(layernorm_after(hidden_states)), hidden_states)

The second line is one ``fastvit.layernorm_mlp`` call (residual included); hidden dropout in
training, or a hook on (or a replacement of) one of those modules, runs Hugging Face's modules. The
attention goes through transformers' ``AttentionInterface`` (routed by ``fastvit.patch``). Importing
this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.cvt.modeling_cvt import CvtIntermediate, CvtLayer, CvtOutput
from transformers.models.dpt.modeling_dpt import DPTViTIntermediate, DPTViTLayer, DPTViTOutput
from transformers.models.flava.modeling_flava import FlavaIntermediate, FlavaLayer, FlavaOutput
from transformers.models.mobilevit.modeling_mobilevit import (
    MobileViTIntermediate,
    MobileViTOutput,
    MobileViTTransformerLayer,
)
from transformers.models.videomae.modeling_videomae import VideoMAEIntermediate, VideoMAELayer, VideoMAEOutput
from transformers.models.vilt.modeling_vilt import ViltIntermediate, ViltLayer, ViltOutput
from transformers.models.yolos.modeling_yolos import YolosIntermediate, YolosLayer, YolosOutput

import fastvit
from fastvit.nn.fused import FusedModule, declare_fused, mlp_dropout_fallback
from fastvit.nn.hf_vit import activation_of
from fastvit.ops._fx import method_leaf

__all__ = [
    "INTERMEDIATE_OUTPUT_FAMILIES",
    "INTERMEDIATE_OUTPUT_LAYERS",
    "INTERMEDIATE_OUTPUT_MODULES",
    "FusedCvtLayer",
    "FusedFlavaLayer",
    "FusedMobileViTTransformerLayer",
    "FusedViltLayer",
    "IntermediateOutputLayer",
    "fused_intermediate_output",
]


def fused_intermediate_output(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    layer_scale: torch.Tensor | None = None,
    activation: str = "intermediate_act_fn",
) -> torch.Tensor:
    """``h + layer_scale * output.dense(act(intermediate.dense(layernorm_after(h))))`` as one
    ``fastvit.layernorm_mlp`` call, from a layer in ViT's 4.x module layout (``layernorm_after``,
    ``intermediate.dense`` / ``intermediate.<activation>``, ``output.dense``): (..., D) -> (..., D)."""
    norm, fc1, fc2 = layer.layernorm_after, layer.intermediate.dense, layer.output.dense
    return fastvit.layernorm_mlp(
        hidden_states, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=norm.eps,
        layer_scale=layer_scale, activation=activation_of(getattr(layer.intermediate, activation)),
    )  # fmt: skip

# {original layer class: (its intermediate class, its output class)}
INTERMEDIATE_OUTPUT_FAMILIES: dict[type, tuple[type, type]] = {
    DPTViTLayer: (DPTViTIntermediate, DPTViTOutput),  # DPT (dpt-large, dpt-hybrid's ViT)
    YolosLayer: (YolosIntermediate, YolosOutput),  # YOLOS detection
    VideoMAELayer: (VideoMAEIntermediate, VideoMAEOutput),  # VideoMAE
}


class IntermediateOutputLayer(FusedModule):
    """The forward of the fused layers in ViT's 4.x layout (the base of each): Hugging Face's attention
    half line for line, then ``output(intermediate(layernorm_after(h)), h)`` as one op call."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layernorm_after", "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn",
                        "output", "output.dense", "output.dropout")  # fmt: skip
    fastvit_activation = "intermediate_act_fn"  # the activation's name in ``intermediate``

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``output(intermediate(layernorm_after(h)), h)`` (..., D) -> (..., D): one op call, or
        Hugging Face's modules."""
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_fallback(
            "Hugging Face", type(self).fastvit_original().__name__, self.output.dropout
        ):
            return self.output(self.intermediate(self.layernorm_after(hidden_states)), hidden_states)
        return fused_intermediate_output(self, hidden_states, activation=self.fastvit_activation)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, **kwargs)
        hidden_states_norm = self.layernorm_before(hidden_states)
        attention_output = self.attention(hidden_states_norm, **kwargs)
        hidden_states = attention_output + hidden_states
        return self._fastvit_mlp_half(hidden_states)

    def extra_repr(self) -> str:
        norm = self.layernorm_after
        return f"dim={norm.normalized_shape[0]}, eps={norm.eps}, fastvit={self.fastvit_op}"


# {original layer class: its fused class}
INTERMEDIATE_OUTPUT_LAYERS: dict[type, type[IntermediateOutputLayer]] = {
    original: declare_fused(
        original, IntermediateOutputLayer, globals(),
        f"``{original.__name__}`` (ViT's 4.x layout) whose LayerNorm+MLP half is one op call.",
    )
    for original in INTERMEDIATE_OUTPUT_FAMILIES
}


class FusedMobileViTTransformerLayer(IntermediateOutputLayer, MobileViTTransformerLayer):
    """MobileViT's ``MobileViTTransformerLayer`` (ViT's 4.x layout over the unfolded patches, its
    attention called without arguments) whose LayerNorm+MLP half is one op call."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states)
        attention_output = self.attention(self.layernorm_before(hidden_states))
        hidden_states = attention_output + hidden_states
        return self._fastvit_mlp_half(hidden_states)


class FusedFlavaLayer(IntermediateOutputLayer, FlavaLayer):
    """FLAVA's ``FlavaLayer`` (ViT's 4.x layout; the attention takes the additive mask and returns a
    tuple, its weights after the output) whose LayerNorm+MLP half is one op call. Its attention
    (``fastvit.nn.hf_self_attention.FusedFlavaSelfAttention``) is patched on its own."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, output_attentions)
        self_attention_outputs = self.attention(
            self.layernorm_before(hidden_states),
            attention_mask=attention_mask,
            output_attentions=output_attentions,
        )
        hidden_states = self_attention_outputs[0] + hidden_states
        return (self._fastvit_mlp_half(hidden_states), *self_attention_outputs[1:])


class FusedViltLayer(IntermediateOutputLayer, ViltLayer):
    """ViLT's ``ViltLayer`` (FLAVA's layer over the joint text and image tokens: ViT's 4.x layout; the
    attention takes the additive mask and returns a tuple, its weights after the output) whose
    LayerNorm+MLP half is one op call. Its attention (``fastvit.nn.hf_self_attention.FusedViltSelfAttention``)
    is patched on its own."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, output_attentions)
        self_attention_outputs = self.attention(
            self.layernorm_before(hidden_states),
            attention_mask,
            output_attentions=output_attentions,
        )
        attention_output = self_attention_outputs[0]
        hidden_states = attention_output + hidden_states.to(attention_output.device)
        return (self._fastvit_mlp_half(hidden_states), *self_attention_outputs[1:])


class FusedCvtLayer(IntermediateOutputLayer, CvtLayer):
    """CvT's ``CvtLayer`` (ViT's 4.x layout over its stage's tokens, the class token first in the last
    stage; its attention takes the map's height and width) whose LayerNorm+MLP half is one op call.
    Its drop path applies to the attention's output and then to the whole layer's output (the
    residual included), as Hugging Face's: both stay the layer's module calls. Its attention
    (``fastvit.nn.hf_self_attention.FusedCvtSelfAttention``) is patched on its own."""

    fastvit_bypassed = ("layernorm_after", "intermediate", "intermediate.dense", "intermediate.activation", "output",
                        "output.dense", "output.dropout")  # fmt: skip
    fastvit_activation = "activation"

    def forward(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_state, height, width)
        self_attention_output = self.attention(self.layernorm_before(hidden_state), height, width)
        hidden_state = self.drop_path(self_attention_output) + hidden_state
        return self.drop_path(self._fastvit_mlp_half(hidden_state))


# {original layer class: (its intermediate class, its output class)}: the table's families, MobileViT's,
# FLAVA's and CvT's
INTERMEDIATE_OUTPUT_MODULES: dict[type, tuple[type, type]] = {
    **INTERMEDIATE_OUTPUT_FAMILIES,
    MobileViTTransformerLayer: (MobileViTIntermediate, MobileViTOutput),
    FlavaLayer: (FlavaIntermediate, FlavaOutput),
    ViltLayer: (ViltIntermediate, ViltOutput),
    CvtLayer: (CvtIntermediate, CvtOutput),
}
