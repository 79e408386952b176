"""Fused subclass of Hugging Face's ``Swinv2SelfAttention`` (``microsoft/swinv2-*``), swapped onto a
model by ``fastvit.patch``.

Swin V2's attention computes its scores in its own forward (it does not go through transformers'
``AttentionInterface``, so ``attn_implementation`` cannot route it): cosine attention, the per-head
logit scale, the continuous position bias (``16 * sigmoid(cpb_mlp(...))``) and the layer's
shifted-window mask. The fused forward keeps Hugging Face's projections and bias MLP (called as
modules) and runs the softmax attention as one ``fastvit.flash_attention`` call: exact attention
on normalised q times the logit scale and normalised k (``scale=1``), the bias plus the mask as
``attn_mask``, so the bias MLP and the logit scale learn through the op's gradients. Hugging
Face's forward adds the window mask to the scores twice; so does the fused one (the mask, doubled,
in ``attn_mask``). ``output_attentions=True`` and attention dropout in training run Hugging Face's
forward.

``Swinv2Layer`` is post-norm: ``h + drop_path(layernorm_after(output(intermediate(h))))``. Its MLP
alone (``intermediate.dense``, the activation, ``output.dense``) is one
``fastvit.layernorm_mlp(..., norm="none", residual=False)`` call; the norm, drop path and residual
add stay Hugging Face's. The layer's forward is Hugging Face's, line for line, up to that call
(the window partition, shift, attention, and the attention half's post-norm). Importing this module
imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.swin2sr.modeling_swin2sr import (
    Swin2SRIntermediate,
    Swin2SRLayer,
    Swin2SROutput,
    Swin2SRSelfAttention,
)
from transformers.models.swinv2.modeling_swinv2 import (
    Swinv2Layer,
    Swinv2SelfAttention,
    window_partition,
    window_reverse,
)

import fastvit
from fastvit.nn.attention import cosine_qk, windowed_attention
from fastvit.nn.fused import FusedModule, declare_fused, mlp_dropout_fallback
from fastvit.nn.hf_attention import swapped_attention_covers
from fastvit.nn.hf_vit import activation_of
from fastvit.ops._fx import method_leaf

__all__ = [
    "SWINV2_COPY_ATTENTIONS",
    "SWINV2_COPY_FUSED",
    "SWINV2_LAYER_COPIES",
    "SWINV2_LAYER_COPIES_FUSED",
    "FusedSwinv2Layer",
    "FusedSwinv2SelfAttention",
    "Swinv2AttentionForward",
    "Swinv2LayerForward",
]


class Swinv2AttentionForward(FusedModule):
    """The forward of the fused Swin V2 self-attentions (the base of each): Hugging Face's
    ``Swinv2SelfAttention`` and its copies (``SWINV2_COPY_ATTENTIONS``).

    Same signature, ``forward(hidden_states, attention_mask=None, output_attentions=False)``:
    hidden_states (B*nW, N, C) windows, image-major; attention_mask (nW, N, N) or None; returns
    ``(context,)``, context (B*nW, N, C).
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("dropout",)  # the op replaces Hugging Face's softmax and attention dropout

    def _fastvit_bias(self) -> torch.Tensor:
        """Hugging Face's continuous position bias, (1, H, N, N)."""
        tokens = self.window_size[0] * self.window_size[1]
        table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)  # N, N, H
        return (16 * torch.sigmoid(bias.permute(2, 0, 1))).unsqueeze(0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, attention_mask, output_attentions)
        if not swapped_attention_covers(self, output_attentions, self.dropout.p, self.dropout.training):
            return super().forward(hidden_states, attention_mask, output_attentions)
        windows, tokens, _ = hidden_states.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        q, k, v = (
            proj(hidden_states).view(windows, tokens, heads, head_dim).transpose(1, 2)  # (B*nW, H, N, D) views
            for proj in (self.query, self.key, self.value)
        )
        q, k = cosine_qk(q, k, self.logit_scale)
        mask = None if attention_mask is None else attention_mask + attention_mask  # added twice, as Hugging Face does
        return (windowed_attention(q, k, v, self._fastvit_bias(), mask, 1.0),)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_attention_heads}, window={tuple(self.window_size)}, cosine, fastvit={self.fastvit_op}"
        )


class FusedSwinv2SelfAttention(Swinv2AttentionForward, Swinv2SelfAttention):
    """Hugging Face ``Swinv2SelfAttention`` running one ``fastvit.flash_attention`` call per forward.

    Example:
        >>> model = transformers.Swinv2Model(transformers.Swinv2Config())
        >>> fastvit.patch(model)  # encoder.layers.*.blocks.*.attention.self -> FusedSwinv2SelfAttention
    """


# Swin V2's self-attention copied into other models (checked line for line in the tests): Swin2SR's
# (image super-resolution)
SWINV2_COPY_ATTENTIONS: tuple[type, ...] = (Swin2SRSelfAttention,)
# {original attention class: its fused class}, ``Fused<original>`` in this module (a patched model pickles)
SWINV2_COPY_FUSED: dict[type, type[Swinv2AttentionForward]] = {
    original: declare_fused(
        original, Swinv2AttentionForward, globals(),
        f"Hugging Face ``{original.__name__}`` (Swin V2's, line for line) running one ``fastvit.flash_attention`` "
        "call per forward.",
    )
    for original in SWINV2_COPY_ATTENTIONS
}

class Swinv2LayerForward(FusedModule):
    """The forward of the fused Swin V2 layers (the base of each: ``Swinv2Layer`` and its copies,
    ``SWINV2_LAYER_COPIES``): the MLP (``intermediate``, ``output``) is one ``fastvit.layernorm_mlp``
    call with ``norm="none"``, between Hugging Face's attention half and its post-norm, drop path and
    residual add. Same signature, ``forward(hidden_states, input_dimensions, output_attentions=False)``;
    the ``attention`` is patched on its own. Hidden dropout in training, or a hook on (or a replacement
    of) an MLP submodule, run Hugging Face's modules.
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("intermediate", "intermediate.dense", "intermediate.intermediate_act_fn", "output",
                        "output.dense", "output.dropout")  # fmt: skip

    def _fastvit_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``output(intermediate(hidden_states))`` (B, N, C) -> (B, N, C): one op call, or Hugging
        Face's modules."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self.output(self.intermediate(hidden_states))
        traced = method_leaf(self, "_fastvit_mlp", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_fallback(
            "Hugging Face", type(self).fastvit_original().__name__, self.output.dropout
        ):
            return self.output(self.intermediate(hidden_states))
        fc1, fc2 = self.intermediate.dense, self.output.dense
        return fastvit.layernorm_mlp(
            hidden_states, None, None, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm="none", residual=False,
            activation=activation_of(self.intermediate.intermediate_act_fn),
        )  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        output_attentions: bool | None = False,
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, input_dimensions, output_attentions)
        if self._fastvit_overridden():  # the whole forward: the override may be Swinv2Layer.forward itself
            return super().forward(hidden_states, input_dimensions, output_attentions)
        # -- Hugging Face's attention half, line for line --
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        shortcut = hidden_states
        hidden_states = hidden_states.view(batch_size, height, width, channels)
        hidden_states, pad_values = self.maybe_pad(hidden_states, height, width)
        _, height_pad, width_pad, _ = hidden_states.shape
        if self.shift_size > 0:
            shifted_hidden_states = torch.roll(hidden_states, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shifted_hidden_states = hidden_states
        hidden_states_windows = window_partition(shifted_hidden_states, self.window_size)
        hidden_states_windows = hidden_states_windows.view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(
            height_pad, width_pad, dtype=hidden_states.dtype, device=hidden_states_windows.device
        )
        attention_outputs = self.attention(hidden_states_windows, attn_mask, output_attentions=output_attentions)
        attention_output = attention_outputs[0]
        attention_windows = attention_output.view(-1, self.window_size, self.window_size, channels)
        shifted_windows = window_reverse(attention_windows, self.window_size, height_pad, width_pad)
        if self.shift_size > 0:
            attention_windows = torch.roll(shifted_windows, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            attention_windows = shifted_windows
        was_padded = pad_values[3] > 0 or pad_values[5] > 0
        if was_padded:
            attention_windows = attention_windows[:, :height, :width, :].contiguous()
        attention_windows = attention_windows.view(batch_size, height * width, channels)
        hidden_states = self.layernorm_before(attention_windows)
        hidden_states = shortcut + self.drop_path(hidden_states)
        # -- the MLP alone, fused; Hugging Face's post-norm, drop path and residual add --
        layer_output = hidden_states + self.drop_path(self.layernorm_after(self._fastvit_mlp(hidden_states)))
        return (layer_output, attention_outputs[1]) if output_attentions else (layer_output,)

    def extra_repr(self) -> str:
        return f"window={self.window_size}, shift={self.shift_size}, MLP alone (post-norm), fastvit={self.fastvit_op}"


class FusedSwinv2Layer(Swinv2LayerForward, Swinv2Layer):
    """Hugging Face ``Swinv2Layer`` whose MLP is one ``fastvit.layernorm_mlp`` call (``Swinv2LayerForward``).

    Example:
        >>> model = transformers.Swinv2Model(transformers.Swinv2Config())
        >>> fastvit.patch(model)  # encoder.layers.*.blocks.* -> FusedSwinv2Layer
    """


# Swin V2's layer copied into other models (checked line for line in the tests), with the MLP module
# classes it holds: {original layer: (its intermediate class, its output class)}
SWINV2_LAYER_COPIES: dict[type, tuple[type, type]] = {Swin2SRLayer: (Swin2SRIntermediate, Swin2SROutput)}
SWINV2_LAYER_COPIES_FUSED: dict[type, type[Swinv2LayerForward]] = {
    original: declare_fused(
        original, Swinv2LayerForward, globals(),
        f"Hugging Face ``{original.__name__}`` (Swin V2's, line for line) whose MLP is one ``fastvit.layernorm_mlp`` "
        "call.",
    )
    for original in SWINV2_LAYER_COPIES
}
