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
forward. The MLP half of ``Swinv2Layer`` is post-norm and stays Hugging Face's. Importing this
module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

from fastvit.nn.attention import cosine_qk, warn_attention_dropout, windowed_attention
from fastvit.nn.fused import FusedModule, dropout_active

__all__ = ["FusedSwinv2SelfAttention"]


class FusedSwinv2SelfAttention(FusedModule, Swinv2SelfAttention):
    """Hugging Face ``Swinv2SelfAttention`` running one ``fastvit.flash_attention`` call per forward.

    Same signature, ``forward(hidden_states, attention_mask=None, output_attentions=False)``:
    hidden_states (B*nW, N, C) windows, image-major; attention_mask (nW, N, N) or None; returns
    ``(context,)``, context (B*nW, N, C).

    Example:
        >>> model = transformers.Swinv2Model(transformers.Swinv2Config())
        >>> fastvit.patch(model)  # encoder.layers.*.blocks.*.attention.self -> FusedSwinv2SelfAttention
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

    def _fastvit_covers(self, output_attentions: bool | None) -> bool:
        """Whether the op computes this call: no attention weights asked for, no dropout that
        Hugging Face's forward would apply (said once), the bypassed dropout as at patch time."""
        if output_attentions or not self._fastvit_intact():
            return False
        if dropout_active(self.dropout.p, self.dropout.training):
            warn_attention_dropout("Hugging Face Swinv2SelfAttention", self.dropout.p)
            return False
        return True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, attention_mask, output_attentions)
        if not self._fastvit_covers(output_attentions):
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
