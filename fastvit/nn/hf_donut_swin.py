"""Fused subclasses of the Swin (V1) copies in Hugging Face whose window attention computes its scores
in its own forward (not through transformers' ``AttentionInterface``, so ``attn_implementation`` cannot
route it): Donut's image encoder (``DonutSwinModel``: Donut, Nougat and the document models built on
it) and MaskFormer's backbone (``MaskFormerSwinModel``), swapped onto a model by ``fastvit.patch``.

The fused attention keeps Hugging Face's ``query`` / ``key`` / ``value`` Linears (called as modules)
and runs the softmax attention as one ``fastvit.flash_attention`` call per window batch: the
relative-position bias (``relative_position_bias_table`` gathered by ``relative_position_index``,
learning through the op's gradient) and the shifted windows' mask as the op's ``attn_mask``.
``output_attentions=True`` and attention dropout in training run Hugging Face's forward.

``DonutSwinLayer``'s and ``MaskFormerSwinLayer``'s second half,
``h + output(intermediate(layernorm_after(h)))`` (ViT's 4.x module layout), is one
``fastvit.layernorm_mlp`` call; each forward up to there is Hugging Face's, line for line. Importing
this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.donut.modeling_donut_swin import (
    DonutSwinLayer,
    DonutSwinSelfAttention,
    window_partition,
    window_reverse,
)
from transformers.models.maskformer import modeling_maskformer_swin as maskformer_swin
from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinLayer, MaskFormerSwinSelfAttention

from fastvit.nn.attention import windowed_attention
from fastvit.nn.fused import FusedModule, declare_fused, mlp_dropout_fallback
from fastvit.nn.hf_attention import swapped_attention_covers
from fastvit.nn.hf_intermediate_output import fused_intermediate_output
from fastvit.ops._fx import method_leaf

__all__ = [
    "SWIN_COPY_ATTENTIONS", "SWIN_COPY_FUSED", "FusedDonutSwinLayer", "FusedMaskFormerSwinLayer", "SwinCopyAttention",
    "SwinCopyMlpHalf",
]


class SwinCopyAttention(FusedModule):
    """The forward of the fused Swin-copy self-attentions (the base of each).

    Same signature as Hugging Face's, ``forward(hidden_states, attention_mask=None,
    output_attentions=False)``: hidden_states (B*nW, N, C) windows, image-major; attention_mask
    (nW, N, N) or None; returns ``(context,)``, context (B*nW, N, C).
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("dropout",)  # the op replaces Hugging Face's softmax and attention dropout

    def _fastvit_bias(self) -> torch.Tensor:
        """Hugging Face's relative-position bias, (1, H, N, N)."""
        tokens = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

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
        head_dim = self.attention_head_size
        q, k, v = (
            proj(hidden_states).view(windows, tokens, -1, head_dim).transpose(1, 2)  # (B*nW, H, N, D) views
            for proj in (self.query, self.key, self.value)
        )
        return (windowed_attention(q, k, v, self._fastvit_bias(), attention_mask, None),)

    def extra_repr(self) -> str:
        return f"heads={self.num_attention_heads}, window={tuple(self.window_size)}, fastvit={self.fastvit_op}"


# The Swin V1 self-attentions computing their scores in their own forward, each Donut's line for line
# (checked against Hugging Face's source in the tests)
SWIN_COPY_ATTENTIONS: tuple[type, ...] = (DonutSwinSelfAttention, MaskFormerSwinSelfAttention)
# {original attention class: its fused class}, ``Fused<original>`` in this module (a patched model pickles)
SWIN_COPY_FUSED: dict[type, type[SwinCopyAttention]] = {
    original: declare_fused(
        original, SwinCopyAttention, globals(),
        f"Hugging Face ``{original.__name__}`` (Swin V1's window attention, its scores in its own forward) "
        "running one ``fastvit.flash_attention`` call per forward.",
    )
    for original in SWIN_COPY_ATTENTIONS
}


class SwinCopyMlpHalf(FusedModule):
    """The second half of the fused Swin-copy layers (the base of each): ``h + output(intermediate(
    layernorm_after(h)))`` as one op call. Hidden dropout in training, or a hook on (or a replacement of)
    an MLP submodule, run Hugging Face's modules."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layernorm_after", "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn",
                        "output", "output.dense", "output.dropout")  # fmt: skip

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``h + output(intermediate(layernorm_after(h)))`` (B, N, C) -> (B, N, C): one op call, or
        Hugging Face's modules."""
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_fallback(
            "Hugging Face", type(self).fastvit_original().__name__, self.output.dropout
        ):
            return hidden_states + self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return fused_intermediate_output(self, hidden_states)

    def extra_repr(self) -> str:
        return f"window={self.window_size}, shift={self.shift_size}, fastvit={self.fastvit_op}"


class FusedDonutSwinLayer(SwinCopyMlpHalf, DonutSwinLayer):
    """Hugging Face ``DonutSwinLayer`` whose LayerNorm+MLP half (``layernorm_after``, ``intermediate``,
    ``output``, the residual add) is one ``fastvit.layernorm_mlp`` call after Hugging Face's window
    attention half. Same signature, ``forward(hidden_states, input_dimensions, output_attentions=False,
    always_partition=False)``; its attention is patched on its own. Hidden dropout in training, or a
    hook on (or a replacement of) an MLP submodule, run Hugging Face's modules.

    Example:
        >>> model = transformers.DonutSwinModel(transformers.DonutSwinConfig())
        >>> fastvit.patch(model)  # encoder.layers.*.blocks.* -> FusedDonutSwinLayer
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        output_attentions: bool | None = False,
        always_partition: bool | None = False,
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, input_dimensions, output_attentions, always_partition)
        if self._fastvit_overridden():  # the whole forward: the override may be DonutSwinLayer.forward itself
            return super().forward(hidden_states, input_dimensions, output_attentions, always_partition)
        # -- Hugging Face's attention half, line for line --
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
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
        hidden_states = shortcut + self.drop_path(attention_windows)
        # -- the LayerNorm+MLP half, fused --
        layer_output = self._fastvit_mlp_half(hidden_states)
        return (layer_output, attention_outputs[1]) if output_attentions else (layer_output,)


class FusedMaskFormerSwinLayer(SwinCopyMlpHalf, MaskFormerSwinLayer):
    """MaskFormer's ``MaskFormerSwinLayer`` (its backbone, a Swin V1 copy) whose LayerNorm+MLP half,
    ``h + output(intermediate(layernorm_after(h)))``, is one ``fastvit.layernorm_mlp`` call; the
    shifted-window attention half is Hugging Face's, line for line. Same signature,
    ``forward(hidden_states, input_dimensions, output_attentions=False)``; its attention is patched on
    its own.

    Example:
        >>> model = transformers.MaskFormerSwinModel(transformers.MaskFormerSwinConfig())
        >>> fastvit.patch(model)  # encoder.layers.*.blocks.* -> FusedMaskFormerSwinLayer
    """

    def forward(
        self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, input_dimensions, output_attentions)
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's own forward
            return super().forward(hidden_states, input_dimensions, output_attentions)
        # -- Hugging Face's attention half, line for line --
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states = hidden_states.view(batch_size, height, width, channels)
        hidden_states, pad_values = self.maybe_pad(hidden_states, height, width)
        _, height_pad, width_pad, _ = hidden_states.shape
        if self.shift_size > 0:
            shifted_hidden_states = torch.roll(hidden_states, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shifted_hidden_states = hidden_states
        hidden_states_windows = maskformer_swin.window_partition(shifted_hidden_states, self.window_size)
        hidden_states_windows = hidden_states_windows.view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(
            (height_pad, width_pad), device=hidden_states_windows.device, dtype=hidden_states_windows.dtype
        )
        self_attention_outputs = self.attention(hidden_states_windows, attn_mask, output_attentions=output_attentions)
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        attention_windows = attention_output.view(-1, self.window_size, self.window_size, channels)
        shifted_windows = maskformer_swin.window_reverse(attention_windows, self.window_size, height_pad, width_pad)
        if self.shift_size > 0:
            attention_windows = torch.roll(shifted_windows, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            attention_windows = shifted_windows
        was_padded = pad_values[3] > 0 or pad_values[5] > 0
        if was_padded:
            attention_windows = attention_windows[:, :height, :width, :].contiguous()
        attention_windows = attention_windows.view(batch_size, height * width, channels)
        hidden_states = shortcut + self.drop_path(attention_windows)
        # -- the LayerNorm+MLP half, fused --
        return (self._fastvit_mlp_half(hidden_states), *outputs)
