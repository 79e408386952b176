"""Fused subclasses of timm's EfficientFormer (V1, ``efficientformer_l*``) modules, swapped onto a
model by ``fastvit.patch``.

EfficientFormer's last stage ends in ``MetaBlock1d`` blocks over the flattened tokens (the 7 x 7
map at 224 px): ``x + drop_path1(ls1(token_mixer(norm1(x))))`` then
``x + drop_path2(ls2(mlp(norm2(x))))``, ``ls1`` / ``ls2`` timm's ``LayerScale``.

- Its ``Attention`` (the token mixer) is LeViT's: a per-head [q; k; v] projection with values
  ``attn_ratio`` (4) times wider than the keys (32), and a learned (H, N, N) bias gathered from
  ``attention_biases`` by offset (``get_attention_biases()``). It becomes one
  ``fastvit.flash_attention`` call with that bias as ``attn_mask`` (learning through the op's mask
  gradient), q and k zero-padded to the value width (``fastvit.nn.timm_relpos.biased_attention``).
- The block's MLP half is one ``fastvit.layernorm_mlp`` call (``ls2``'s gamma as ``layer_scale``,
  ``drop_path2`` as ``sample_scale``: ``fastvit.nn.timm_mlp.PreNormMlpHalf``); its attention half
  runs as timm's.

The ``MetaBlock2d`` blocks of the earlier stages (pooling token mixer, BatchNorm conv MLP) and the
conv stem run timm's modules (reported). See ``fastvit.nn.fused`` for how the swap works.
Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models import efficientformer

from fastvit.nn.attention import per_head_biased_attention
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import MLP_BYPASSED, PreNormMlpHalf

__all__ = ["FusedEfficientFormerAttention", "FusedMetaBlock1d"]


class FusedEfficientFormerAttention(FusedModule, efficientformer.Attention):
    """timm EfficientFormer ``Attention`` running ``fastvit.flash_attention`` with
    ``get_attention_biases()`` (H, N, N) as ``attn_mask``; q and k zero-padded to the value width.

    Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C).

    Example:
        >>> model = timm.create_model("efficientformer_l1")
        >>> fastvit.patch(model)  # stages.3.blocks.4.token_mixer -> FusedEfficientFormerAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        bias = self.get_attention_biases(x.device)  # (H, N, N)
        out = per_head_biased_attention(self.qkv(x), self.num_heads, self.key_dim, self.val_dim, bias, self.scale)
        return self.proj(out)  # (B, N, H*Dv) -> (B, N, C)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, fastvit={self.fastvit_op}"


class FusedMetaBlock1d(PreNormMlpHalf, efficientformer.MetaBlock1d):
    """timm EfficientFormer ``MetaBlock1d`` whose MLP half is one ``fastvit.layernorm_mlp`` call
    (same signature, ``forward(x)``: x (B, N, C) -> (B, N, C)); its attention half runs as timm's
    (the token mixer fused on its own)."""

    fastvit_bypassed = (*MLP_BYPASSED, "ls2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return self._fastvit_mlp_half(x)
