"""Fused subclass of Hugging Face's Gemma 4 vision encoder layer (``Gemma4VisionEncoderLayer``: the
vision tower of ``Gemma4ForConditionalGeneration``, ``Gemma4VisionModel``), swapped onto a model by
``fastvit.patch``.

Each half of the layer sits between two RMS norms (the "sandwich"): its MLP half is
``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`` with ``Gemma4VisionMLP``,
``down_proj(act(gate_proj(x)) * up_proj(x))`` (no biases). The norm before and the gated MLP are one
``fastvit.layernorm_mlp(..., norm="rms", residual=False)`` call; the norm after (over the MLP's
output) and the residual add stay Hugging Face's. The attention goes through transformers'
``AttentionInterface`` (routed by ``fastvit.patch``). A hook on (or a replacement of) a module the op
reads runs Hugging Face's modules; clamped linears (``use_clipped_linears``) are left to Hugging Face
by the patcher. Importing this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.gemma4.modeling_gemma4 import (
    Gemma4ClippableLinear,
    Gemma4RMSNorm,
    Gemma4VisionEncoderLayer,
    Gemma4VisionMLP,
)

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.hf_vit import activation_of
from fastvit.ops._fx import method_leaf

__all__ = ["FusedGemma4VisionEncoderLayer", "Gemma4ClippableLinear", "Gemma4RMSNorm", "Gemma4VisionMLP"]


class FusedGemma4VisionEncoderLayer(FusedModule, Gemma4VisionEncoderLayer):
    """Hugging Face ``Gemma4VisionEncoderLayer`` whose pre-MLP RMS norm and gated MLP are one
    ``fastvit.layernorm_mlp`` call; the attention half, the post-MLP norm and the residual adds are
    Hugging Face's, line for line. Same signature, ``forward(hidden_states, position_embeddings=None,
    attention_mask=None, position_ids=None, **kwargs)``: hidden_states (B, N, D) -> (B, N, D).

    Example:
        >>> model = transformers.Gemma4ForConditionalGeneration.from_pretrained("google/gemma-4-31b-it")
        >>> fastvit.patch(model)  # model.vision_tower.encoder.layers.* -> FusedGemma4VisionEncoderLayer
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("pre_feedforward_layernorm", "mlp", "mlp.gate_proj", "mlp.gate_proj.linear", "mlp.up_proj",
                        "mlp.up_proj.linear", "mlp.down_proj", "mlp.down_proj.linear", "mlp.act_fn")  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, position_embeddings, attention_mask, position_ids, **kwargs)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_feedforward_layernorm(self._fastvit_mlp_branch(hidden_states))
        return residual + hidden_states

    def _fastvit_mlp_branch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``mlp(pre_feedforward_layernorm(h))`` (B, N, D) -> (B, N, D): one op call, or Hugging Face's modules."""
        traced = method_leaf(self, "_fastvit_mlp_branch", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        norm, mlp = self.pre_feedforward_layernorm, self.mlp
        if not self._fastvit_submodules_intact():
            return mlp(norm(hidden_states))
        gate, up, down = mlp.gate_proj.linear, mlp.up_proj.linear, mlp.down_proj.linear
        return fastvit.layernorm_mlp(
            hidden_states, norm.weight if norm.with_scale else None, None, up.weight, up.bias, down.weight, down.bias,
            eps=norm.variance_epsilon, norm="rms", fc1_gate_weight=gate.weight, fc1_gate_bias=gate.bias,
            activation=activation_of(mlp.act_fn), residual=False,
        )  # fmt: skip

    def extra_repr(self) -> str:
        norm = self.pre_feedforward_layernorm
        return f"dim={self.hidden_size}, eps={norm.variance_epsilon}, norm=rms, fastvit={self.fastvit_op}"
