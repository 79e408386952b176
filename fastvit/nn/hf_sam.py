"""Fused subclasses of Hugging Face's SAM vision encoder (``facebook/sam-vit-*``, ``SamModel`` /
``SamVisionModel``; SAM-HQ's, ``SamHQModel``, whose encoder classes are copies of SAM's), swapped
onto a model by ``fastvit.patch``.

SAM's image encoder is a ViTDet: window layers (14 x 14 windows of the padded 64 x 64 map) and a
few global layers, each ``h + attn(layer_norm1(h))`` then ``h + mlp(layer_norm2(h))``, with a
decomposed relative position in every attention. Its attention (``SamVisionAttention``, and
``SamVisionSdpaAttention`` which passes the (N, N) bias to SDPA) computes its scores in its own
forward, not through transformers' ``AttentionInterface``, so ``attn_implementation`` cannot route
it. The fused attention keeps the ``qkv`` and ``proj`` Linears (called as modules) and runs one
``fastvit.flash_attention`` call whose ``rel_pos=(rel_h, rel_w)`` are the two tables Hugging Face's
``get_decomposed_rel_pos`` broadcasts into that bias (``rel_h[b, i, j // w] + rel_w[b, i, j % w]``):
the (N, N) bias is never built, and ``rel_pos_h`` / ``rel_pos_w`` learn through the tables'
gradients. The attention weights requested (``output_attentions=True``, or transformers' output
capture collecting ``attentions``) and the eager class's attention dropout in training run Hugging
Face's forward (the SDPA class applies no dropout).

``SamVisionLayer``'s second half, ``h + mlp(layer_norm2(h))`` (``SamMLPBlock``: lin1, act, lin2), is
one ``fastvit.layernorm_mlp`` call over the (B, H, W, C) map; its first half (norm, window
partition and padding, attention, unpartition, residual add) is Hugging Face's, line for line.
Importing this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionLayer, SamVisionSdpaAttention
from transformers.models.sam_hq.modeling_sam_hq import (
    SamHQVisionAttention,
    SamHQVisionLayer,
    SamHQVisionSdpaAttention,
)

import fastvit
from fastvit.nn.attention import decomposed_rel_pos_tables, merge_heads, split_packed_qkv, warn_attention_dropout
from fastvit.nn.fused import FusedModule, dropout_active
from fastvit.nn.hf_attention import capturing_attentions
from fastvit.nn.hf_vit import activation_of
from fastvit.ops._fx import method_leaf

__all__ = [
    "FusedSamHQVisionAttention", "FusedSamHQVisionLayer", "FusedSamHQVisionSdpaAttention", "FusedSamVisionAttention",
    "FusedSamVisionLayer", "FusedSamVisionSdpaAttention",
]  # fmt: skip


class _SamAttentionForward(FusedModule):
    """The forward of the fused SAM attentions (the base of each)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # the projections are called as modules; the softmax and dropout are the op's
    # whether Hugging Face's forward drops attention probabilities in training (the SDPA classes never do)
    drops_attention = True

    def _fastvit_covers(self, output_attentions: bool | None) -> bool:
        """Whether the op computes this call: no attention weights asked for, no attention dropout
        Hugging Face's forward would apply (said once), nothing overridden since patching."""
        if output_attentions or capturing_attentions() or not self._fastvit_intact():
            return False
        if self.drops_attention and dropout_active(self.dropout, self.training):
            warn_attention_dropout(f"Hugging Face {type(self).fastvit_original().__name__}", self.dropout)
            return False
        return True

    def _fastvit_rel_pos(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hugging Face's decomposed relative position as the op's (rel_h, rel_w) tables."""
        r_h = self.get_rel_pos(height, height, self.rel_pos_h)  # (h, h, D): [query row, key row]
        r_w = self.get_rel_pos(width, width, self.rel_pos_w)  # (w, w, D): [query column, key column]
        return decomposed_rel_pos_tables(q, r_h, r_w, (height, width))

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, output_attentions)
        if not self._fastvit_covers(output_attentions):
            return super().forward(hidden_states, output_attentions)
        batch, height, width, channels = hidden_states.shape
        heads = self.num_attention_heads
        qkv = self.qkv(hidden_states.reshape(batch, height * width, channels))
        q, k, v = split_packed_qkv(qkv, heads, qkv.shape[-1] // (3 * heads))  # (B, H, N, D) views
        rel_pos = self._fastvit_rel_pos(q, height, width) if self.use_rel_pos else None
        out = fastvit.flash_attention(q, k, v, scale=self.scale, rel_pos=rel_pos)
        return self.proj(merge_heads(out).view(batch, height, width, -1)), None

    def extra_repr(self) -> str:
        kind = "rel_pos" if self.use_rel_pos else "plain"
        return f"heads={self.num_attention_heads}, {kind}, fastvit={self.fastvit_op}"


class FusedSamVisionAttention(_SamAttentionForward, SamVisionAttention):
    """Hugging Face ``SamVisionAttention`` (``attn_implementation="eager"``) running one
    ``fastvit.flash_attention`` call, decomposed relative position as ``rel_pos``.

    Same signature, ``forward(hidden_states, output_attentions=None)``: hidden_states (B, H, W, C),
    windows or the whole map; returns ``(attn_output, None)``, attn_output (B, H, W, C).

    Example:
        >>> model = transformers.SamModel.from_pretrained("facebook/sam-vit-base", attn_implementation="eager")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamVisionAttention
    """


class FusedSamVisionSdpaAttention(_SamAttentionForward, SamVisionSdpaAttention):
    """Hugging Face ``SamVisionSdpaAttention`` (the default) running one ``fastvit.flash_attention``
    call; the (N, N) bias it hands SDPA becomes the op's ``rel_pos`` tables.

    Same signature and output as ``FusedSamVisionAttention``.

    Example:
        >>> model = transformers.SamModel.from_pretrained("facebook/sam-vit-base")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamVisionSdpaAttention
    """

    drops_attention = False


class FusedSamHQVisionAttention(_SamAttentionForward, SamHQVisionAttention):
    """SAM-HQ's ``SamHQVisionAttention``, as ``FusedSamVisionAttention``.

    Example:
        >>> model = transformers.SamHQModel.from_pretrained("syscv-community/sam-hq-vit-base",
        ...                                                 attn_implementation="eager")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamHQVisionAttention
    """


class FusedSamHQVisionSdpaAttention(_SamAttentionForward, SamHQVisionSdpaAttention):
    """SAM-HQ's ``SamHQVisionSdpaAttention``, as ``FusedSamVisionSdpaAttention``.

    Example:
        >>> model = transformers.SamHQModel.from_pretrained("syscv-community/sam-hq-vit-base")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamHQVisionSdpaAttention
    """

    drops_attention = False


class _SamLayerForward(FusedModule):
    """The forward of the fused SAM layers (the base of each)."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layer_norm2", "mlp", "mlp.lin1", "mlp.act", "mlp.lin2")

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states + mlp(layer_norm2(hidden_states))``: one op call, or Hugging Face's modules."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return hidden_states + self.mlp(self.layer_norm2(hidden_states))
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return hidden_states + self.mlp(self.layer_norm2(hidden_states))
        norm, lin1, lin2 = self.layer_norm2, self.mlp.lin1, self.mlp.lin2
        return fastvit.layernorm_mlp(
            hidden_states, norm.weight, norm.bias, lin1.weight, lin1.bias, lin2.weight, lin2.bias, eps=norm.eps,
            activation=activation_of(self.mlp.act),
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states)
        if self._fastvit_overridden():  # the whole forward: the override may be SamVisionLayer.forward itself
            return super().forward(hidden_states)
        # -- Hugging Face's attention half, line for line --
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, padding_shape = self.window_partition(hidden_states, self.window_size)
        hidden_states, _ = self.attn(
            hidden_states=hidden_states,
        )
        if self.window_size > 0:
            hidden_states = self.window_unpartition(hidden_states, self.window_size, padding_shape, (height, width))
        hidden_states = residual + hidden_states
        # -- the LayerNorm+MLP half, fused --
        return self._fastvit_mlp_half(hidden_states)

    def extra_repr(self) -> str:
        norm = self.layer_norm2
        return f"dim={norm.normalized_shape[0]}, eps={norm.eps}, window={self.window_size}, fastvit={self.fastvit_op}"


class FusedSamVisionLayer(_SamLayerForward, SamVisionLayer):
    """Hugging Face ``SamVisionLayer`` whose second half, ``h + mlp(layer_norm2(h))``, is one
    ``fastvit.layernorm_mlp`` call over the (B, H, W, C) map. Same signature, ``forward(hidden_states)``
    -> (B, H, W, C); its ``attn`` is patched on its own. A hook on (or a replacement of) a bypassed
    submodule runs Hugging Face's modules.

    Example:
        >>> model = transformers.SamVisionModel(transformers.SamVisionConfig())
        >>> fastvit.patch(model)  # vision_encoder.layers.* -> FusedSamVisionLayer
    """


class FusedSamHQVisionLayer(_SamLayerForward, SamHQVisionLayer):
    """SAM-HQ's ``SamHQVisionLayer``, as ``FusedSamVisionLayer``.

    Example:
        >>> model = transformers.SamHQVisionModel(transformers.SamHQVisionConfig())
        >>> fastvit.patch(model)  # vision_encoder.layers.* -> FusedSamHQVisionLayer
    """
