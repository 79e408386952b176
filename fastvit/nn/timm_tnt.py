"""Fused subclasses of timm's TNT (Transformer in Transformer, ``tnt_*``) modules, swapped onto a
model by ``fastvit.patch``.

Each TNT ``Block`` runs an inner transformer over the pixel tokens of every patch (B*N, P, C_in)
and an outer one over the patch tokens (B, N+1, C), both with timm's ``Attention``: q and k from
one ``qk`` projection, v from its own, plain softmax attention. Each attention becomes one
``fastvit.flash_attention`` call on views of the projections. The block's two MLP halves,
``pixel + drop_path(mlp_in(norm_mlp_in(pixel)))`` and ``patch + drop_path(mlp(norm_mlp(patch)))``
(one ``drop_path`` module, called in every branch, each call its own draw, as in timm), are one
``fastvit.layernorm_mlp`` call each; the attention halves and the pixel-to-patch projection run as
timm's. In training with MLP dropout > 0 the MLP halves run timm's modules. See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models import tnt

import fastvit
from fastvit.nn.attention import biased_attention, merge_heads
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import fused_mlp_half
from fastvit.ops._fx import method_leaf

__all__ = ["FusedTntAttention", "FusedTntBlock"]


class FusedTntAttention(FusedModule, tnt.Attention):
    """timm TNT ``Attention`` (inner and outer) running one ``fastvit.flash_attention`` call.

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C). q and k are views of the ``qk``
    projection, v of ``v``'s (values of another width than the keys are zero-padded to one head
    dim, ``biased_attention``; timm builds them equal). Calls in training with attention dropout
    > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("tnt_s_patch16_224")
        >>> fastvit.patch(model)  # blocks.*.attn_in, blocks.*.attn_out -> FusedTntAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm TNT Attention"):
            return super().forward(x)
        q, k = self.qk(x).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, H, N, Dv), a view
        value_dim = self.v.out_features // self.num_heads
        if value_dim == self.head_dim:
            out = fastvit.flash_attention(q, k, v, scale=self.scale)
        else:
            out = biased_attention(q, k, v, None, self.scale, key_dim=self.head_dim, val_dim=value_dim)
        return self.proj_drop(self.proj(merge_heads(out)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


def _mlp_modules(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}.{name}" for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"))


class FusedTntBlock(FusedModule, tnt.Block):
    """timm TNT ``Block`` whose inner and outer MLP halves are one ``fastvit.layernorm_mlp`` call
    each (same signature, ``forward(pixel_embed, patch_embed)`` -> both updated); its attention
    halves (fused on their own) and the pixel-to-patch projection run as timm's."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("norm_mlp_in", "mlp_in", *_mlp_modules("mlp_in"), "norm_mlp", "mlp", *_mlp_modules("mlp"),
                        "drop_path")  # fmt: skip

    def _fastvit_inner_original(self, pixel_embed: torch.Tensor) -> torch.Tensor:
        """timm's inner MLP half, module by module."""
        return pixel_embed + self.drop_path(self.mlp_in(self.norm_mlp_in(pixel_embed)))

    def _fastvit_outer_original(self, patch_embed: torch.Tensor) -> torch.Tensor:
        """timm's outer MLP half, module by module."""
        return patch_embed + self.drop_path(self.mlp(self.norm_mlp(patch_embed)))

    def _fastvit_inner_half(self, pixel_embed: torch.Tensor) -> torch.Tensor:
        """(B*N, P, C_in) -> the same: the inner MLP half, fused."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_inner_original(pixel_embed)
        traced = method_leaf(self, "_fastvit_inner_half", pixel_embed)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_inner_original(pixel_embed)
        return fused_mlp_half(self, pixel_embed, self.norm_mlp_in, self.mlp_in, self.drop_path, None,
                              self._fastvit_inner_original)  # fmt: skip

    def _fastvit_outer_half(self, patch_embed: torch.Tensor) -> torch.Tensor:
        """(B, N+1, C) -> the same: the outer MLP half, fused."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_outer_original(patch_embed)
        traced = method_leaf(self, "_fastvit_outer_half", patch_embed)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_outer_original(patch_embed)
        return fused_mlp_half(self, patch_embed, self.norm_mlp, self.mlp, self.drop_path, None,
                              self._fastvit_outer_original)  # fmt: skip

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(pixel_embed, patch_embed)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(pixel_embed, patch_embed)
        # inner transformer, over each patch's pixel tokens
        pixel_embed = pixel_embed + self.drop_path(self.attn_in(self.norm_in(pixel_embed)))
        pixel_embed = self._fastvit_inner_half(pixel_embed)
        # the pixels projected into their patch tokens (the class token kept), as in timm
        B, N = patch_embed.shape[:2]
        if self.norm2_proj is None:
            patch_embed = torch.cat([
                patch_embed[:, 0:1],
                patch_embed[:, 1:] + self.proj(self.norm1_proj(pixel_embed).reshape(B, N - 1, -1)),
            ], dim=1)  # fmt: skip
        else:
            patch_embed = torch.cat([
                patch_embed[:, 0:1],
                patch_embed[:, 1:] + self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, N - 1, -1)))),
            ], dim=1)  # fmt: skip
        # outer transformer, over the patch tokens
        patch_embed = patch_embed + self.drop_path(self.attn_out(self.norm_out(patch_embed)))
        return pixel_embed, self._fastvit_outer_half(patch_embed)

    def extra_repr(self) -> str:
        return f"inner and outer MLP halves, fastvit={self.fastvit_op}"
