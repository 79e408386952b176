"""Fused subclasses of Hugging Face's data2vec-vision (``Data2VecVisionModel``: BEiT's architecture in
transformers' 4.x classes), swapped onto a model by ``fastvit.patch``.

Its self-attention (``Data2VecVisionSelfAttention``, and ``Data2VecVisionSdpaSelfAttention``, the
default, which hands the bias to SDPA) computes its scores in its own forward, not through
transformers' ``AttentionInterface``. The fused attention keeps the ``query`` / ``key`` / ``value``
Linears (called as modules) and runs one ``fastvit.flash_attention`` call, the layer's own relative
position bias plus the encoder's shared one as ``attn_mask`` (both learn through the op's gradient).
The attention weights requested (eager class) and attention dropout in training run Hugging Face's
forward.

``Data2VecVisionLayer``'s second half, ``h + drop_path(lambda_2 * output(intermediate(layernorm_after(h))))``,
is one ``fastvit.layernorm_mlp`` call (``lambda_2`` as the layer scale); drop path or hidden dropout
in training run Hugging Face's modules. Importing this module imports transformers.
"""

from __future__ import annotations

import math

import torch
from transformers.models.data2vec.modeling_data2vec_vision import (
    Data2VecVisionLayer,
    Data2VecVisionSdpaSelfAttention,
    Data2VecVisionSelfAttention,
)

import fastvit
from fastvit.nn.attention import merge_heads
from fastvit.nn.fused import FusedModule, dropout_active, mlp_dropout_fallback, warn_fallback
from fastvit.nn.hf_attention import swapped_attention_covers
from fastvit.nn.hf_intermediate_output import fused_intermediate_output
from fastvit.ops._fx import method_leaf

__all__ = ["FusedData2VecVisionLayer", "FusedData2VecVisionSdpaSelfAttention", "FusedData2VecVisionSelfAttention"]


class _SelfAttentionForward(FusedModule):
    """The forward of the fused data2vec-vision self-attentions (the base of each)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # the projections are called as modules; the softmax and dropout are the op's
    sdpa = False  # the SDPA class: dropout from the config, no weights, returns (context, None)

    def _fastvit_dropout(self) -> tuple[float, bool]:
        """The attention dropout Hugging Face's forward would apply: (p, active in training)."""
        if self.sdpa:
            return self.config.attention_probs_dropout_prob, self.training
        return self.dropout.p, self.dropout.training

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        relative_position_bias: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int] | None = None,
    ) -> tuple[torch.Tensor] | tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(
                hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution
            )
        # the SDPA class returns None for the weights even when asked (Hugging Face warns): so does this
        dropout = self._fastvit_dropout()
        if not swapped_attention_covers(self, output_attentions, *dropout, returns_weights=not self.sdpa):
            return super().forward(
                hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution
            )
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.attention_head_size)
        q, k, v = (  # (B, H, N, D) views
            proj(hidden_states).view(hidden_shape).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        bias = None
        if self.has_relative_position_bias:  # (1, H, N, N)
            height, width = resolution
            window_size = (height // self.config.patch_size, width // self.config.patch_size)
            bias = self.relative_position_bias(window_size, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        if relative_position_bias is not None:  # the encoder's shared bias
            bias = relative_position_bias if bias is None else bias + relative_position_bias
        out = fastvit.flash_attention(q, k, v, scale=1 / math.sqrt(self.attention_head_size), attn_mask=bias)
        context = merge_heads(out)
        return (context, None) if self.sdpa else (context,)

    def extra_repr(self) -> str:
        kind = "relative position bias" if self.has_relative_position_bias else "shared or no bias"
        return f"heads={self.num_attention_heads}, {kind}, fastvit={self.fastvit_op}"


class FusedData2VecVisionSelfAttention(_SelfAttentionForward, Data2VecVisionSelfAttention):
    """``Data2VecVisionSelfAttention`` (``attn_implementation="eager"``) running one
    ``fastvit.flash_attention`` call; returns ``(context,)``, context (B, N, C).

    Example:
        >>> model = transformers.Data2VecVisionModel(config, attn_implementation="eager")
        >>> fastvit.patch(model)  # encoder.layer.*.attention.attention -> FusedData2VecVisionSelfAttention
    """

    fastvit_bypassed = ("dropout",)  # the eager class's attention dropout is the op's (it has none)


class FusedData2VecVisionSdpaSelfAttention(_SelfAttentionForward, Data2VecVisionSdpaSelfAttention):
    """``Data2VecVisionSdpaSelfAttention`` (the default) running one ``fastvit.flash_attention`` call;
    returns ``(context, None)``, as Hugging Face's.

    Example:
        >>> model = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig())
        >>> fastvit.patch(model)  # encoder.layer.*.attention.attention -> FusedData2VecVisionSdpaSelfAttention
    """

    sdpa = True


class FusedData2VecVisionLayer(FusedModule, Data2VecVisionLayer):
    """``Data2VecVisionLayer`` whose LayerNorm+MLP half with ``lambda_2`` is one ``fastvit.layernorm_mlp``
    call; its attention half is Hugging Face's, line for line. Same signature and outputs.

    Example:
        >>> model = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig())
        >>> fastvit.patch(model)  # encoder.layer.* -> FusedData2VecVisionLayer
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layernorm_after", "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn",
                        "output", "output.dense", "output.dropout", "drop_path")  # fmt: skip

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        if self.lambda_2 is not None:
            layer_output = self.lambda_2 * layer_output
        return self.drop_path(layer_output) + hidden_states

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``h + drop_path(lambda_2 * output(intermediate(layernorm_after(h))))`` (B, N, C) -> (B, N, C):
        one op call, or Hugging Face's modules."""
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_fallback(
            "Hugging Face", "Data2VecVisionLayer", self.output.dropout
        ):
            return self._fastvit_original_half(hidden_states)
        drop_path = self.drop_path
        if dropout_active(getattr(drop_path, "drop_prob", 0.0), drop_path.training):
            warn_fallback(
                "patched-mlp-dropout:Data2VecVisionLayer",
                "fastvit: a patched Hugging Face Data2VecVisionLayer has drop path > 0 and is in training mode; "
                "fastvit.layernorm_mlp has none, so its MLP half runs Hugging Face's modules",
            )
            return self._fastvit_original_half(hidden_states)
        return fused_intermediate_output(self, hidden_states, self.lambda_2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        output_attentions: bool = False,
        relative_position_bias: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor] | tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(
                hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution
            )
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(
                hidden_states, output_attentions, relative_position_bias, interpolate_pos_encoding, resolution
            )
        self_attention_outputs = self.attention(
            self.layernorm_before(hidden_states),
            output_attentions=output_attentions,
            relative_position_bias=relative_position_bias,
            interpolate_pos_encoding=interpolate_pos_encoding,
            resolution=resolution,
        )
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        if self.lambda_1 is not None:
            attention_output = self.lambda_1 * attention_output
        hidden_states = self.drop_path(attention_output) + hidden_states
        return (self._fastvit_mlp_half(hidden_states), *outputs)

    def extra_repr(self) -> str:
        norm = self.layernorm_after
        return f"dim={norm.normalized_shape[0]}, eps={norm.eps}, fastvit={self.fastvit_op}"
