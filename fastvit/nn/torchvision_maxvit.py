"""Fused subclass of torchvision's MaxViT attention (``maxvit_t``), swapped onto a model by
``fastvit.patch``.

``RelativePositionalMultiHeadAttention`` runs on MaxViT's partitioned tokens, (B, G, P, C): G
windows (block attention) or grid cells (grid attention, after the model's axis swap) of P tokens
each. The partition, the axis swap and ``get_relative_positional_bias`` stay the model's; the
softmax attention is one ``fastvit.flash_attention`` call over B*G sequences of P tokens with the
(1, H, P, P) relative-position bias as ``attn_mask`` (read through its strides, never expanded
over B*G; the bias table learns through the mask gradient). MaxViT scales k by
``feat_dim ** -0.5`` (the full width, not the head dim): that is the op's ``scale``.

``PartitionAttentionLayer`` (a window or grid attention layer) ends in the pre-norm MLP half
``x + stochastic_dropout(mlp_layer(x))`` over the same partitioned tokens, ``mlp_layer`` being
(LayerNorm, Linear, GELU, Linear, Dropout): one ``fastvit.layernorm_mlp`` call, the row-wise
stochastic depth as its ``sample_scale`` (drawn as torchvision draws it: the layer's one
``StochasticDepth`` module draws anew in each half). See ``fastvit.nn.fused`` for how the swap
works. Importing this module imports torchvision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.maxvit import PartitionAttentionLayer, RelativePositionalMultiHeadAttention

import fastvit
from fastvit.nn.attention import merge_heads, self_attention, split_packed_qkv
from fastvit.nn.fused import FusedModule, mlp_dropout_fallback
from fastvit.nn.torchvision_swin import row_keep
from fastvit.ops._fx import method_leaf

__all__ = ["FusedPartitionAttentionLayer", "FusedRelativePositionalMultiHeadAttention"]


class FusedRelativePositionalMultiHeadAttention(FusedModule, RelativePositionalMultiHeadAttention):
    """torchvision MaxViT ``RelativePositionalMultiHeadAttention`` whose attention is one
    ``fastvit.flash_attention`` call with the relative-position bias as ``attn_mask``. Same input
    and output, (B, G, P, C); ``to_qkv`` and ``merge`` are called as modules (their hooks run)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        B, G, P, _ = x.shape
        qkv = self.to_qkv(x).flatten(0, 1)  # (B*G, P, 3*H*DH), rows [q; k; v] as torch.chunk splits them
        q, k, v = split_packed_qkv(qkv, self.n_heads, self.head_dim)  # (B*G, H, P, DH) views
        out = self_attention(q, k, v, scale=self.scale_factor, attn_mask=self.get_relative_positional_bias())
        return self.merge(merge_heads(out).reshape(B, G, P, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, head_dim={self.head_dim}, tokens={self.max_seq_len}, "
            f"scale={self.scale_factor:.4g}, fastvit={self.fastvit_op}"
        )


def torchvision_activation(act: nn.Module) -> str | None:
    """``fastvit.layernorm_mlp``'s ``activation`` for a torchvision MLP's activation module (GELU, either
    form, or SiLU), None for any other."""
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return "silu" if type(act) is nn.SiLU else None


class FusedPartitionAttentionLayer(FusedModule, PartitionAttentionLayer):
    """torchvision MaxViT ``PartitionAttentionLayer`` whose MLP half, ``x + stochastic_dropout(
    mlp_layer(x))`` over the partitioned (B, G, P, C) tokens, is one ``fastvit.layernorm_mlp`` call.
    Same signature, ``forward(x)``: x (B, C, H, W) -> (B, C, H, W); the partition, the attention half
    (its attention fused on its own) and the departition run as torchvision's. MLP dropout in
    training, or a hook on (or a replacement of) a bypassed submodule, run torchvision's modules.

    Example:
        >>> model = torchvision.models.maxvit_t()
        >>> fastvit.patch(model)  # blocks.*.layers.*.layers.{window,grid}_attention -> FusedPartitionAttentionLayer
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("mlp_layer", "mlp_layer.0", "mlp_layer.1", "mlp_layer.2", "mlp_layer.3", "mlp_layer.4",
                        "stochastic_dropout")  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's own forward
            return super().forward(x)
        # torchvision's partition and attention half, as in PartitionAttentionLayer.forward
        gh, gw = self.grid_size[0] // self.p, self.grid_size[1] // self.p
        torch._assert(
            self.grid_size[0] % self.p == 0 and self.grid_size[1] % self.p == 0,
            f"Grid size must be divisible by partition size. Got grid size of {self.grid_size} and partition "
            f"size of {self.p}",
        )
        x = self.partition_op(x, self.p)
        x = self.partition_swap(x)
        x = x + self.stochastic_dropout(self.attn_layer(x))
        x = self._fastvit_mlp_half(x)
        x = self.departition_swap(x)
        return self.departition_op(x, self.p, gh, gw)

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's MLP half, module by module."""
        return x + self.stochastic_dropout(self.mlp_layer(x))

    def _fastvit_mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G, P, C) -> (B, G, P, C): ``x + stochastic_dropout(mlp_layer(x))``, one op call."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_half(x)
        traced = method_leaf(self, "_fastvit_mlp_half", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_half(x)
        norm, fc1, act, fc2, drop = self.mlp_layer  # LayerNorm, Linear, GELU, Linear, Dropout
        if mlp_dropout_fallback("torchvision", "PartitionAttentionLayer", drop):
            return self._fastvit_original_half(x)
        return fastvit.layernorm_mlp(
            x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=norm.eps,
            activation=torchvision_activation(act), sample_scale=row_keep(self.stochastic_dropout, x),
        )  # fmt: skip

    def extra_repr(self) -> str:
        kind = "grid" if self.partition_type == "grid" else "window"
        return f"{kind}, dim={self.mlp_layer[0].normalized_shape[0]}, fastvit={self.fastvit_op}"
