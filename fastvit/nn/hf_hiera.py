"""Fused subclass of Hugging Face's Hiera attention (``HieraMaskUnitAttention``: ``HieraModel``,
``HieraForImageClassification``, ``HieraBackbone``), swapped onto a model by ``fastvit.patch``.

Hiera's attention computes its scores in its own forward (it does not go through transformers'
``AttentionInterface``): in the first stages each mask unit attends within itself
(``use_mask_unit_attn``: the tokens arrive unrolled, mask unit by mask unit), later ones globally;
the first layer of a stage max-pools its queries over ``query_stride``. The fused forward keeps the
``qkv`` and ``proj`` Linears (called as modules) and runs one ``fastvit.flash_attention`` call, the
mask units as extra heads ((B, H * units, T, D): no mask). ``output_attentions=True`` runs Hugging
Face's forward (it has no attention dropout). ``HieraLayer``'s LayerNorm+MLP half is one
``fastvit.layernorm_mlp`` call (``fastvit.nn.hf_layers.FusedHieraLayer``). Importing this module
imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.hiera.modeling_hiera import HieraMaskUnitAttention

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.hf_attention import swapped_attention_covers

__all__ = ["FusedHieraMaskUnitAttention"]


class FusedHieraMaskUnitAttention(FusedModule, HieraMaskUnitAttention):
    """Hugging Face ``HieraMaskUnitAttention`` running one ``fastvit.flash_attention`` call.

    Same signature, ``forward(hidden_states, output_attentions=False)``: hidden_states (B, N, C_in),
    unrolled; returns ``(attn_output, None)``, attn_output (B, N / query_stride, C_out).

    Example:
        >>> model = transformers.HieraModel(transformers.HieraConfig())
        >>> fastvit.patch(model)  # encoder.stages.*.layers.*.attn -> FusedHieraMaskUnitAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # the projections are called as modules; the softmax is the op's

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, output_attentions)
        if not swapped_attention_covers(self, output_attentions, 0.0, False):
            return super().forward(hidden_states, output_attentions)
        batch, tokens, _ = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_dim
        units, unit_tokens = 1, tokens  # Hugging Face's num_windows, tokens_per_window
        if self.use_mask_unit_attn:
            units, unit_tokens = tokens // (self.query_stride * self.window_size), self.query_stride * self.window_size
        # (B, T, units, 3, H, D) -> (3, B, H, units, T, D): views, as Hugging Face's
        qkv = self.qkv(hidden_states).reshape(batch, unit_tokens, units, 3, heads, head_dim).permute(3, 0, 4, 2, 1, 5)
        query, key, value = qkv.unbind(0)
        if self.query_stride > 1:  # max over the query_stride groups of T / query_stride tokens, as Hugging Face's
            pooled = unit_tokens // self.query_stride
            query = query.view(batch, heads, units, self.query_stride, pooled, head_dim).max(dim=3).values
        # mask units as heads: (B, H, units, T, D) -> (B, H * units, T, D) (a view where units is 1)
        q, k, v = (t.reshape(batch, heads * units, t.shape[3], head_dim) for t in (query, key, value))
        out = fastvit.flash_attention(q, k, v, scale=self.scale).view(batch, heads, units, q.shape[2], head_dim)
        out = out.transpose(1, 3).reshape(batch, -1, self.hidden_size_output)  # (B, T', units, H, D) -> (B, N', C)
        return self.proj(out), None

    def extra_repr(self) -> str:
        kind = f"mask units of {self.window_size}" if self.use_mask_unit_attn else "global"
        return f"heads={self.num_heads}, {kind}, query_stride={self.query_stride}, fastvit={self.fastvit_op}"
