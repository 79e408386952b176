"""Fused subclass of the transformer block of timm's CSATv2 (``csatv2*``: DCT-domain ConvNeXt stages,
then transformer stages), swapped onto a model by ``fastvit.patch``.

CSATv2's ``TransformerBlock`` works on a (B, C, H, W) map: its attention half (optionally
max-pooled and projected, a conv position encoding, timm's ``Attention``: fused on its own) and its
MLP half, ``x + drop_path2(ls2(mlp(norm2(tokens))))`` with ``tokens`` the map seen as (B, H*W, C),
the branch laid back out as (B, C, H, W) before the residual add. The MLP half's branch is one
``fastvit.layernorm_mlp`` call (``residual=False``; LayerScale as ``layer_scale``, drop path as
``sample_scale``), laid out and added to the map as timm does, so the block's output has timm's
strides. Its ConvNeXt-style ``Block``s (a global response norm and a spatial attention gate inside)
run timm's modules. See ``fastvit.nn.fused`` for how the swap works. Importing this module imports
timm.
"""

from __future__ import annotations

import torch
from timm.models.csatv2 import TransformerBlock as Csatv2TransformerBlock

from fastvit.nn.timm_mlp import PreNormMlpHalf, fused_mlp_branch, mlp_dropout_falls_back

__all__ = ["FusedCsatv2TransformerBlock"]


class FusedCsatv2TransformerBlock(PreNormMlpHalf, Csatv2TransformerBlock):
    """timm CSATv2 ``TransformerBlock`` whose MLP half's branch is one ``fastvit.layernorm_mlp`` call.

    Same signature, ``forward(x)``: x (B, C, H, W) -> (B, C', H', W') (C' and the pooled H', W' where
    the block downsamples). Its attention half is timm's, line for line (``self.attn`` fused on its
    own). In training with MLP dropout > 0, or with a hook on a module the half reads, the MLP half
    runs timm's modules.

    Example:
        >>> model = timm.create_model("csatv2")
        >>> fastvit.patch(model)  # its TransformerBlocks -> FusedCsatv2TransformerBlock
    """

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's MLP half on the (B, C, H, W) map, module by module."""
        B, C, H, W = x.shape
        x_t = self.ls2(self.mlp(self.norm2(x.flatten(2).transpose(1, 2))))
        return x + self.drop_path2(x_t.transpose(1, 2).reshape(B, C, H, W))

    def _fastvit_fused_half(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP half on the (B, C, H, W) map: the branch over the (B, H*W, C) tokens (a transposed
        view, which the op copies once to a unit channel stride, as timm's LayerNorm does), reshaped
        to (B, C, H, W) as timm reshapes it (a copy: the map's layout is timm's) and added to ``x``."""
        if not self._fastvit_submodules_intact() or mlp_dropout_falls_back(self, self.mlp):
            return self._fastvit_original_half(x)
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        branch = fused_mlp_branch(tokens, self.norm2, self.mlp, self.drop_path2, self._fastvit_layer_scale())
        return x + branch.transpose(1, 2).reshape(B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be TransformerBlock.forward
            return super().forward(x)
        # timm's attention half, as in TransformerBlock.forward
        if self.downsample:
            shortcut = self.proj(self.pool1(x))
            x_t = self.pool2(x)
        else:
            shortcut = x_t = x
        B, _, H, W = x_t.shape
        x_t = x_t.flatten(2).transpose(1, 2)
        x_t = self.norm1(x_t)
        x_t = self.pos_embed(x_t, (H, W))
        x_t = self.ls1(self.attn(x_t))
        x_t = x_t.transpose(1, 2).reshape(B, -1, H, W)
        x = shortcut + self.drop_path1(x_t)
        return self._fastvit_mlp_half(x)
