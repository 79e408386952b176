"""Fused subclasses of Hugging Face's LeViT attentions (``LevitAttention`` and the stage-changing
``LevitAttentionSubsample``: ``LevitModel`` / ``LevitForImageClassification``), swapped onto a model
by ``fastvit.patch``.

Both compute their scores in their own forward (not through transformers' ``AttentionInterface``):
per-head q, k (width ``key_dim``) and v (``attention_ratio * key_dim``) from Linear+BatchNorm
projections, ``softmax(scale * q.k + bias) v`` with a learned per-head bias gathered over the
(query, key) offsets, then Hardswish and the output projection. The fused forwards keep every
projection (called as modules, in Hugging Face's order) and the bias (``get_attention_biases``,
Hugging Face's eval-mode cache included), and run the softmax attention as one
``fastvit.flash_attention`` call with the bias as its learnable float mask (q and k zero-padded to
the value width: ``fastvit.nn.attention.biased_attention``). Importing this module imports
transformers.
"""

from __future__ import annotations

import torch
from transformers.models.levit.modeling_levit import LevitAttention, LevitAttentionSubsample

from fastvit.nn.attention import biased_attention, merge_heads, per_head_biased_attention
from fastvit.nn.fused import FusedModule

__all__ = ["FusedLevitAttention", "FusedLevitAttentionSubsample"]


class FusedLevitAttention(FusedModule, LevitAttention):
    """Hugging Face ``LevitAttention`` running one ``fastvit.flash_attention`` call with its (H, N, N)
    attention biases as ``attn_mask`` (they learn through the mask's gradient). Same signature,
    ``forward(hidden_state)``: (B, N, C) -> (B, N, C').

    Example:
        >>> model = transformers.LevitForImageClassification.from_pretrained("facebook/levit-128S")
        >>> fastvit.patch(model)  # levit.encoder.stages.*.layers.*.module -> FusedLevitAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # every projection is called as a module; the softmax is the op's

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_state)
        if not self._fastvit_intact():
            return super().forward(hidden_state)
        bias = self.get_attention_biases(hidden_state.device)  # (H, N, N)
        hidden_state = per_head_biased_attention(
            self.queries_keys_values(hidden_state), self.num_attention_heads, self.key_dim,
            self.attention_ratio * self.key_dim, bias, self.scale,
        )  # fmt: skip
        return self.projection(self.activation(hidden_state))

    def extra_repr(self) -> str:
        return f"heads={self.num_attention_heads}, key_dim={self.key_dim}, fastvit={self.fastvit_op}"


class FusedLevitAttentionSubsample(FusedModule, LevitAttentionSubsample):
    """Hugging Face ``LevitAttentionSubsample``: the subsampled grid's queries (N) over the full grid's
    keys (M) in one ``fastvit.flash_attention`` call with its (H, N, M) attention biases as
    ``attn_mask``. Same signature, ``forward(hidden_state)``: (B, M, C) -> (B, N, C').

    Example:
        >>> model = transformers.LevitForImageClassification.from_pretrained("facebook/levit-128S")
        >>> fastvit.patch(model)  # levit.encoder.stages.*.layers.0.attention_subsample -> this class
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # every projection and the subsample are called as modules

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_state)
        if not self._fastvit_intact():
            return super().forward(hidden_state)
        batch_size, seq_length, _ = hidden_state.shape
        val_dim = self.attention_ratio * self.key_dim
        key, value = (
            self.keys_values(hidden_state)
            .view(batch_size, seq_length, self.num_attention_heads, -1)
            .split([self.key_dim, val_dim], dim=3)
        )
        query = self.queries(self.queries_subsample(hidden_state))
        query = query.view(batch_size, self.resolution_out**2, self.num_attention_heads, self.key_dim)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, N|M, D) views
        bias = self.get_attention_biases(hidden_state.device)  # (H, N, M)
        hidden_state = biased_attention(query, key, value, bias, self.scale, key_dim=self.key_dim, val_dim=val_dim)
        return self.projection(self.activation(merge_heads(hidden_state)))

    def extra_repr(self) -> str:
        return f"heads={self.num_attention_heads}, key_dim={self.key_dim}, fastvit={self.fastvit_op}"
