"""Fused subclasses of timm's hierarchical and windowed blocks whose MLP half is one
``fastvit.layernorm_mlp`` call, swapped onto a model by ``fastvit.patch``.

Each block runs its attention half as timm does (window partition, padding, q pooling, the
residual projection between stages; the attention module itself fused on its own), then
``x + drop_path2(ls2(mlp(norm2(x))))`` as one op call over its (B, H, W, C) or (B, N, C) tokens
(``fastvit.nn.timm_mlp.PreNormMlpHalf``: ``ls2``'s gamma as ``layer_scale``, drop path as
``sample_scale``):

- Swin V1's ``SwinTransformerBlock`` (``swin_*``; its ``_attn``: shift, pad, partition);
- SAM / ViTDet's ``Block`` (``samvit_*``: windowed with padding, or global);
- SAM 2's HieraDet ``MultiScaleBlock`` (``sam2_hiera_*``, ``hieradet_*``);
- Hiera's ``HieraBlock`` (``hiera_*``: mask units, the pooled residual between stages);
- MaxViT's ``PartitionAttentionCl`` (``maxvit_*``: block and grid partitions, channels-last);
- ``RelPosBlock`` (``vit_relpos_*``, ``vit_srelpos_*``: the shared relative position passed on).

In training with MLP dropout > 0 the MLP half runs timm's modules. See ``fastvit.nn.fused`` for how
the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import hiera, hieradet_sam2, maxxvit, swin_transformer, vision_transformer_relpos
from timm.models import vision_transformer_sam as sam

from fastvit.nn.timm_mlp import MLP_BYPASSED, PreNormMlpHalf

__all__ = [
    "FusedHieraBlock", "FusedHieraDetBlock", "FusedPartitionAttentionCl", "FusedRelPosBlock", "FusedSamBlock",
    "FusedSwinTransformerBlock",
]  # fmt: skip

_WITH_LAYER_SCALE = (*MLP_BYPASSED, "ls2")


class FusedSwinTransformerBlock(PreNormMlpHalf, swin_transformer.SwinTransformerBlock):
    """timm Swin V1 ``SwinTransformerBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call
    (same signature, ``forward(x)``: x (B, H, W, C) -> (B, H, W, C)).

    Example:
        >>> model = timm.create_model("swin_tiny_patch4_window7_224")
        >>> fastvit.patch(model)  # layers.*.blocks.* -> FusedSwinTransformerBlock
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return self._fastvit_mlp_half(x)  # timm flattens H, W first; the op takes (B, H, W, C) as it is


class FusedSamBlock(PreNormMlpHalf, sam.Block):
    """timm SAM / ViTDet ``Block`` (``vision_transformer_sam``) whose MLP half is one
    ``fastvit.layernorm_mlp`` call (same signature, ``forward(x)``: x (B, H, W, C) -> (B, H, W, C))."""

    fastvit_bypassed = _WITH_LAYER_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        # timm's attention half, as in Block.forward
        _, H, W, _ = x.shape
        shortcut = x
        x = self.norm1(x)
        pad_hw: tuple[int, int] | None = None
        if self.window_size > 0:
            x, pad_hw = sam.window_partition(x, self.window_size)
        x = self.drop_path1(self.ls1(self.attn(x)))
        if self.window_size > 0:
            x = sam.window_unpartition(x, self.window_size, (H, W), pad_hw)
        return self._fastvit_mlp_half(shortcut + x)


class FusedHieraDetBlock(PreNormMlpHalf, hieradet_sam2.MultiScaleBlock):
    """timm HieraDet ``MultiScaleBlock`` (SAM 2's image encoder) whose MLP half is one
    ``fastvit.layernorm_mlp`` call (same signature, ``forward(x)``: x (B, H, W, C) ->
    (B, H', W', C'), pooled at a stage change)."""

    fastvit_bypassed = _WITH_LAYER_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        # timm's attention half, as in MultiScaleBlock.forward
        shortcut = x  # B, H, W, C
        x = self.norm1(x)
        if self.dim != self.dim_out:  # the residual projected (and pooled) to the next stage
            shortcut = self.proj(x)
            if self.pool is not None:
                shortcut = self.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        window_size = self.window_size
        H, W = x.shape[1:3]
        Hp, Wp = H, W
        if self.is_windowed:
            Hp, Wp, pad_h, pad_w = hieradet_sam2._calc_pad(H, W, window_size)
            x = hieradet_sam2.window_partition(F.pad(x, (0, 0, 0, pad_w, 0, pad_h)), window_size)
        x = self.attn(x)  # window attention, q pooled at a stage change
        if self.q_stride is not None:  # the shapes changed with the q pooling
            window_size = (self.window_size[0] // self.q_stride[0], self.window_size[1] // self.q_stride[1])
            H, W = shortcut.shape[1:3]
            Hp, Wp, pad_h, pad_w = hieradet_sam2._calc_pad(H, W, window_size)
        if self.is_windowed:
            x = hieradet_sam2.window_unpartition(x, window_size, (Hp, Wp))[:, :H, :W, :].contiguous()
        return self._fastvit_mlp_half(shortcut + self.drop_path1(self.ls1(x)))


class FusedHieraBlock(PreNormMlpHalf, hiera.HieraBlock):
    """timm Hiera ``HieraBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, N, C) tokens in mask-unit order -> (B, N', C'))."""

    fastvit_bypassed = _WITH_LAYER_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        # timm's attention half, as in HieraBlock.forward: the residual pooled at a stage change
        x_norm = self.norm1(x)
        if self.do_expand:
            stride = self.attn.q_stride
            if self.proj is not None:
                x = self.proj(x_norm)
                x = x.view(x.shape[0], stride, -1, x.shape[-1]).amax(dim=1)  # max-pool
            else:
                x = torch.cat([
                    x.view(x.shape[0], stride, -1, x.shape[-1]).amax(dim=1),  # max-pool
                    x.view(x.shape[0], stride, -1, x.shape[-1]).mean(dim=1),  # avg-pool
                ], dim=-1)  # fmt: skip
        x = x + self.drop_path1(self.ls1(self.attn(x_norm)))
        return self._fastvit_mlp_half(x)


class FusedPartitionAttentionCl(PreNormMlpHalf, maxxvit.PartitionAttentionCl):
    """timm MaxViT ``PartitionAttentionCl`` (block or grid attention, channels-last) whose MLP half is
    one ``fastvit.layernorm_mlp`` call (same signature, ``forward(x)``: x (B, H, W, C) -> (B, H, W, C))."""

    fastvit_bypassed = _WITH_LAYER_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        x = x + self.drop_path1(self.ls1(self._partition_attn(self.norm1(x))))
        return self._fastvit_mlp_half(x)


class FusedRelPosBlock(PreNormMlpHalf, vision_transformer_relpos.RelPosBlock):
    """timm ``RelPosBlock`` (``vit_relpos_*``) whose MLP half is one ``fastvit.layernorm_mlp`` call
    (same signature, ``forward(x, shared_rel_pos=None)``: x (B, N, C) -> (B, N, C))."""

    fastvit_bypassed = _WITH_LAYER_SCALE

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, shared_rel_pos=shared_rel_pos)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, shared_rel_pos=shared_rel_pos)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos)))
        return self._fastvit_mlp_half(x)
