"""Fused subclasses of torchvision's ViT modules, swapped onto a model by ``fastvit.patch``.

``nn.MultiheadAttention`` (self-attention calls), ``EncoderBlock`` (its LayerNorm+MLP half) and
the ``VisionTransformer`` embedding (``conv_proj`` + ``class_token`` + ``encoder.pos_embedding``,
fused in the model's ``forward``).
See ``fastvit.nn.fused`` for how the swap works and ``fastvit/patching/torchvision.py`` for what
is checked first. Importing this module imports torchvision.

Annotations here are evaluated (no ``from __future__ import annotations``): ``torch.fx`` copies the
root ``forward``'s annotations into a ``GraphModule``'s code, and TorchScript must resolve them.
"""


import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

import fastvit
from fastvit.nn.attention import merge_heads, self_attention, split_packed_qkv, warn_attention_dropout
from fastvit.nn.fused import FusedModule, conv_takes, dropout_active, mlp_dropout_fallback
from fastvit.ops._fx import method_leaf

__all__ = ["FusedEncoderBlock", "FusedMultiheadAttention", "FusedVisionTransformer"]


class FusedMultiheadAttention(FusedModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose self-attention calls run ``fastvit.flash_attention``.

    Same signature and return, ``(out, weights)``. Covered: ``query is key is value`` (3-D, batch
    first or not), ``need_weights=False``, no masks, no ``bias_k``/``bias_v``/``add_zero_attn``,
    packed ``in_proj``, and dropout inactive; the fused call returns ``(out, None)`` exactly as
    PyTorch does with ``need_weights=False``. Every other call runs PyTorch's forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def _fastvit_covers(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
    ) -> bool:
        return (
            query is key
            and key is value
            and query.dim() == 3
            and not need_weights
            and key_padding_mask is None
            and attn_mask is None
            and not is_causal
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        covered = self._fastvit_covers(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        )
        if covered and dropout_active(self.dropout, self.training):
            warn_attention_dropout("nn.MultiheadAttention", self.dropout)
            covered = False
        if not covered or self._fastvit_overridden():
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3E) or (N, B, 3E)
        q, k, v = split_packed_qkv(qkv, self.num_heads, self.head_dim, batch_first=self.batch_first)
        out = merge_heads(self_attention(q, k, v), batch_first=self.batch_first)  # scale 1/sqrt(D), as MHA
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


def _mlp_layers(block: EncoderBlock) -> tuple[nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout]:
    fc1, act, drop1, fc2, drop2 = block.mlp  # torchvision's MLPBlock: Linear, GELU, Dropout, Linear, Dropout
    return fc1, act, drop1, fc2, drop2


class FusedEncoderBlock(FusedModule, EncoderBlock):
    """torchvision ``EncoderBlock`` whose second half, ``x + mlp(ln_2(x))``, is one
    ``fastvit.layernorm_mlp`` call. The attention half runs as in torchvision; in training with
    MLP dropout > 0 the second half runs torchvision's modules."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("ln_2", "mlp", "mlp.0", "mlp.1", "mlp.2", "mlp.3", "mlp.4")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(input)
        if self._fastvit_overridden():  # the whole forward: the override may be EncoderBlock.forward itself
            return super().forward(input)
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        drop = self.dropout
        if dropout_active(drop.p, drop.training) or (isinstance(x, torch.fx.Proxy) and drop.p > 0.0):
            # the fused attention's (B, N, E) output, laid out as PyTorch's batch-first MHA returns it
            # (a transposed view of (N, B, E) memory): dropout draws its mask in memory order, so a
            # seed drops the same elements as in the unpatched model (one copy, in training only; none
            # where PyTorch's forward ran). Under torch.fx the graph decides training when it runs.
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        x = self.dropout(x)
        x = x + input
        return self._fastvit_mlp_half(x)

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's second half, module by module."""
        return x + self.mlp(self.ln_2(x))

    def _fastvit_mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """``x + mlp(ln_2(x))``: one ``fastvit.layernorm_mlp`` call, or torchvision's modules."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_half(x)
        traced = method_leaf(self, "_fastvit_mlp_half", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_half(x)
        fc1, act, drop1, fc2, drop2 = _mlp_layers(self)
        if mlp_dropout_fallback("torchvision", "EncoderBlock", drop1, drop2):
            return self._fastvit_original_half(x)
        norm = self.ln_2
        return fastvit.layernorm_mlp(
            x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
            eps=norm.eps, approximate=act.approximate,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dim={self.ln_2.normalized_shape[0]}, eps={self.ln_2.eps}, fastvit={self.fastvit_op}"


class FusedVisionTransformer(FusedModule, VisionTransformer):
    """torchvision ``VisionTransformer`` embedding its input with one ``fastvit.patch_embed`` call
    (``conv_proj``, ``class_token`` prepended, ``encoder.pos_embedding`` added), then running the
    encoder's dropout, layers and norm. ``conv_proj`` and ``encoder`` keep their classes and
    meaning; a hook on either, or a replaced one, sends the call to torchvision's forward."""

    fastvit_part = "patch_embed"
    fastvit_op = "patch_embed"
    fastvit_bypassed = ("conv_proj", "encoder")  # the encoder's own forward adds pos_embedding
    fastvit_bypassed_methods = ("_process_input",)  # torchvision's forward calls it; the op embeds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact() or not conv_takes(x, self.conv_proj):  # torchvision's errors
            return super().forward(x)
        _, _, height, width = x.shape  # torchvision's checks, with its messages
        torch._assert(
            height == self.image_size, f"Wrong image height! Expected {self.image_size} but got {height}!"
        )
        torch._assert(
            width == self.image_size, f"Wrong image width! Expected {self.image_size} but got {width}!"
        )
        encoder = self.encoder
        x = fastvit.patch_embed(
            x,
            self.conv_proj.weight,
            self.conv_proj.bias,
            pos_embed=encoder.pos_embedding,
            prefix_tokens=self.class_token,
        )
        x = encoder.ln(encoder.layers(encoder.dropout(x)))
        return self.heads(x[:, 0])
