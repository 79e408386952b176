"""Fused subclasses of the attention and the block of timm's Gemma 4 vision tower (``gemma4_vit_*``),
swapped onto a model by ``fastvit.patch``.

``timm.models.gemma4_vit.Gemma4Attention`` projects q, k, v separately, RMS-normalises all three
(q and k with a gain, v without), applies Gemma's 2-D RoPE to q and k, expands k and v to the q
heads (``num_kv_heads``: ``repeat_interleave``) and attends with scale 1 (q and k are normalised)
under the tower's additive key-padding mask. All of that stays as in timm, line for line; only the
softmax attention becomes one ``fastvit.flash_attention`` call (its output (B, N, heads, D) in
memory, so the reshape back to (B, N, heads * D) for ``o_proj`` is free).

``Gemma4Block`` wraps each half in two RMS norms (the "sandwich"): its MLP half is
``x + drop_path(norm4(mlp(norm3(x))))`` with ``Gemma4GatedMlp``, ``down_proj(act(gate_proj(x)) *
up_proj(x))``. The norm before and the gated MLP are one ``fastvit.layernorm_mlp(...,
residual=False)`` call; ``norm4`` (over the MLP's output), the drop path and the residual add stay
the block's modules. Importing this module imports timm (a release with the Gemma 4 tower).
"""

from __future__ import annotations

import torch
from timm.models.gemma4_vit import (
    Gemma4Attention,
    Gemma4Block,
    Gemma4ClippableLinear,
    Gemma4GatedMlp,
    apply_multidimensional_rope,
)

import fastvit
from fastvit.nn.attention import merge_heads
from fastvit.nn.fused import FusedModule, mlp_dropout_fallback
from fastvit.nn.timm_mlp import mlp_activation, norm_arguments
from fastvit.ops._fx import method_leaf

__all__ = ["FusedGemma4Attention", "FusedGemma4Block", "Gemma4ClippableLinear", "Gemma4GatedMlp"]


class FusedGemma4Attention(FusedModule, Gemma4Attention):
    """timm ``Gemma4Attention`` running ``fastvit.flash_attention``. Same signature,
    ``forward(x, rope_cos, rope_sin, attn_mask=None)``: x (B, N, dim), rope_cos / rope_sin timm's
    (B, N, head_dim) tables, attn_mask the tower's float (B, 1, 1, N) key-padding mask (0 or -inf);
    returns (B, N, dim) in x's dtype. Calls in training with attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("gemma4_vit_167m")
        >>> fastvit.patch(model)  # each block's Gemma4Attention becomes a FusedGemma4Attention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope_cos, rope_sin, attn_mask=attn_mask)
        if self._fastvit_unfused("timm Gemma4Attention"):
            return super().forward(x, rope_cos, rope_sin, attn_mask=attn_mask)
        batch, tokens, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, tokens, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim))
        v = self.v_norm(self.v_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim))
        q = apply_multidimensional_rope(q, rope_cos, rope_sin, ndim=2, unsqueeze_dim=2)
        k = apply_multidimensional_rope(k, rope_cos, rope_sin, ndim=2, unsqueeze_dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, D) views
        if self.num_kv_groups > 1:  # grouped-query attention: head h reads kv head h // groups, as timm
            k = k.repeat_interleave(self.num_kv_groups, dim=1)
            v = v.repeat_interleave(self.num_kv_groups, dim=1)
        if attn_mask is None:
            out = fastvit.flash_attention(q, k, v, scale=1.0)
        else:
            out = fastvit.flash_attention(q, k, v, scale=1.0, attn_mask=attn_mask)
        return self.proj_drop(self.o_proj(merge_heads(out)))

    def extra_repr(self) -> str:
        heads = f"heads={self.num_heads}" + (f", kv_heads={self.num_kv_heads}" if self.num_kv_groups > 1 else "")
        return f"{heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


class FusedGemma4Block(FusedModule, Gemma4Block):
    """timm ``Gemma4Block`` whose ``norm3`` and gated MLP are one ``fastvit.layernorm_mlp`` call (RMS
    norm, GELU-tanh gate ``gate_proj``, value ``up_proj``, ``down_proj``; no biases, no residual);
    the attention half, ``norm4``, the drop path and the residual adds are timm's, line for line.
    Same signature, ``forward(x, rope_cos, rope_sin, attn_mask=None)``: x (B, N, dim) -> (B, N, dim).
    MLP dropout in training, or a hook on (or a replacement of) a module the op reads, runs timm's
    modules; clamped linears (``use_clipped_linears``, Gemma 4 E4B) are left to timm by the patcher.

    Example:
        >>> model = timm.create_model("gemma4_vit_167m")
        >>> fastvit.patch(model)  # blocks.* -> FusedGemma4Block
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("norm3", "mlp", "mlp.gate_proj", "mlp.gate_proj.linear", "mlp.up_proj", "mlp.up_proj.linear",
                        "mlp.down_proj", "mlp.down_proj.linear", "mlp.act", "mlp.drop")  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope_cos, rope_sin, attn_mask=attn_mask)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, rope_cos, rope_sin, attn_mask=attn_mask)
        residual = x
        x = self.norm1(x)
        x = self.attn(x, rope_cos, rope_sin, attn_mask=attn_mask)
        x = self.norm2(x)
        x = residual + self.drop_path(x)
        return x + self.drop_path(self.norm4(self._fastvit_mlp_branch(x)))

    def _fastvit_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``mlp(norm3(x))`` (B, N, dim) -> (B, N, dim): one op call, or timm's modules."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self.mlp(self.norm3(x))
        traced = method_leaf(self, "_fastvit_mlp_branch", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        mlp = self.mlp
        if not self._fastvit_submodules_intact() or mlp_dropout_fallback("timm", "Gemma4Block", mlp.drop):
            return mlp(self.norm3(x))
        gate, up, down = mlp.gate_proj.linear, mlp.up_proj.linear, mlp.down_proj.linear
        return fastvit.layernorm_mlp(
            x, fc1_weight=up.weight, fc1_bias=up.bias, fc1_gate_weight=gate.weight, fc1_gate_bias=gate.bias,
            fc2_weight=down.weight, fc2_bias=down.bias, activation=mlp_activation(mlp.act), residual=False,
            **norm_arguments(self.norm3),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dim={self.norm3.normalized_shape[0]}, eps={self.norm3.eps}, norm=rms, fastvit={self.fastvit_op}"
