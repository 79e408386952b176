"""Fused embeddings of timm's other plain-patchify ViTs, swapped onto a model by ``fastvit.patch``.

Each model's ``forward_features`` embeds its images with one ``fastvit.patch_embed`` call in place
of ``patch_embed`` (Conv2d, flatten, transpose), the class-token ``torch.cat`` and the
position-embedding add; the rest of ``forward_features`` runs as timm's, line for line:

- ``Beit`` (BEiT, BEiTv2): the class token, then ``pos_embed`` when the model has one (BEiT's
  checkpoints use the attention's relative position instead); the blocks get the shared
  ``rel_pos_bias`` as in timm.
- ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``): the class token when the model
  has one, no absolute position embedding; the blocks get the shared ``shared_rel_pos`` bias.
- ``Cait``: ``pos_embed`` over the patches only; the class token joins later, in the class-attention
  blocks (``forward_cls``), as in timm.
- ``ConVit``: ``pos_embed`` when ``use_pos_embed``; the class token joins before block
  ``local_up_to_layer``, as in timm.
- ``VisionTransformerSAM`` (SAM / ViTDet image encoders): the patches in timm's (B, H, W, D) layout
  (the op's (B, N, D) tokens viewed as the grid, no copy) plus the (1, H, W, D) ``pos_embed``,
  resampled as timm does for another grid and read as (1, N, D).
- ``Qwen3VitEncoder`` and ``DeepseekVitEncoder`` (the ``qwen3_vit_*`` / ``deepseek_vit_*`` towers,
  also inside their classifiers): the patches, plus Qwen's learned 48 x 48 ``pos_embed`` resampled
  by timm's function to the grid and cast to the patches' dtype, as timm does (DeepSeek has none);
  the rotary table for the grid and the blocks as timm's, the output viewed as (B, H, W, D).

``model.patch_embed`` is untouched: called on its own, or by ``forward_intermediates`` (timm's
embedding), it returns what it always did. A hook on ``patch_embed`` or its ``proj`` / ``norm``, or
a replaced ``patch_embed``, sends the call to timm's ``forward_features`` (``_FusedEmbedding``).
timm's helpers (``checkpoint``, ``resample_abs_pos_embed_nhwc``) are called through timm's modules,
where timm's FX tracer finds them. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models import beit, cait, convit, vision_transformer_relpos, vision_transformer_sam

try:  # the Qwen3-VL and DeepSeek towers, in timm's recent releases
    from timm.models import deepseek_vit, qwen3_vit
except ImportError:
    deepseek_vit = qwen3_vit = None

from fastvit.nn.timm_vit import _FusedEmbedding
from fastvit.ops._checks import autocast_dtype

__all__ = ["FusedBeit", "FusedCait", "FusedConVit", "FusedVisionTransformerRelPos", "FusedVisionTransformerSAM"]


class _ModelEmbedding(_FusedEmbedding):
    """What these models share: no prefix tokens and no position embedding unless the class says
    so, and (but for the Qwen3-VL / DeepSeek towers) no ``_pos_embed`` method: their
    ``forward_features`` concatenates and adds itself."""

    def _fastvit_prefix(self) -> list[torch.Tensor]:
        return []

    def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return None


class FusedBeit(_ModelEmbedding, beit.Beit):
    """timm ``Beit`` embedding its input (patches, class token, ``pos_embed``) with
    ``fastvit.patch_embed``."""

    def _fastvit_prefix(self) -> list[torch.Tensor]:
        return [self.cls_token]

    def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return self.pos_embed  # (1, 1+N, D) or None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x)
        if not self._fastvit_takes(x):
            return super().forward_features(x)
        x = self.pos_drop(self._fastvit_tokens(x))
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for block in self.blocks:
            if self.grad_checkpointing:
                x = beit.checkpoint(block, x, shared_rel_pos_bias=rel_pos_bias)
            else:
                x = block(x, shared_rel_pos_bias=rel_pos_bias)
        return self.norm(x)


class FusedVisionTransformerRelPos(_ModelEmbedding, vision_transformer_relpos.VisionTransformerRelPos):
    """timm ``VisionTransformerRelPos`` embedding its input (patches, class token when it has one)
    with ``fastvit.patch_embed``; it has no absolute position embedding."""

    def _fastvit_prefix(self) -> list[torch.Tensor]:
        return [] if self.cls_token is None else [self.cls_token]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x)
        if not self._fastvit_takes(x):
            return super().forward_features(x)
        x = self._fastvit_tokens(x)
        shared_rel_pos = self.shared_rel_pos.get_bias() if self.shared_rel_pos is not None else None
        for block in self.blocks:
            if self.grad_checkpointing:
                x = vision_transformer_relpos.checkpoint(block, x, shared_rel_pos=shared_rel_pos)
            else:
                x = block(x, shared_rel_pos=shared_rel_pos)
        return self.norm(x)


class FusedCait(_ModelEmbedding, cait.Cait):
    """timm ``Cait`` embedding its patches with ``pos_embed`` in one ``fastvit.patch_embed`` call; its
    class token joins in the class-attention blocks, as in timm."""

    def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return self.pos_embed  # (1, N, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x)
        if not self._fastvit_takes(x):
            return super().forward_features(x)
        x = self.pos_drop(self._fastvit_tokens(x))
        x = cait.checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x)


class FusedConVit(_ModelEmbedding, convit.ConVit):
    """timm ``ConVit`` embedding its patches (with ``pos_embed`` when ``use_pos_embed``) in one
    ``fastvit.patch_embed`` call; its class token joins before block ``local_up_to_layer``, as in
    timm."""

    def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        return self.pos_embed if self.use_pos_embed else None  # (1, N, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x)
        if not self._fastvit_takes(x):
            return super().forward_features(x)
        x = self.pos_drop(self._fastvit_tokens(x))
        for index, block in enumerate(self.blocks):
            if index == self.local_up_to_layer and self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = block(x)
        return self.norm(x)


class FusedVisionTransformerSAM(_ModelEmbedding, vision_transformer_sam.VisionTransformerSAM):
    """timm ``VisionTransformerSAM`` embedding its patches and ``pos_embed`` with one
    ``fastvit.patch_embed`` call: the op's (B, N, D) tokens are viewed as timm's (B, H, W, D) map."""

    fastvit_patch_grid = True

    def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        # (1, H, W, D), resampled by timm's function when the grid differs; (1, N, D) a view of it.
        # Looked up on timm's module: timm's FX tracer wraps it there (a leaf, as in timm's forward)
        resample = vision_transformer_sam.resample_abs_pos_embed_nhwc
        return resample(self.pos_embed, grid).flatten(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x)
        if not self._fastvit_takes(x):
            return super().forward_features(x)
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        x = self._fastvit_tokens(x).unflatten(1, grid)  # (B, N, D) -> (B, H, W, D), a view
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        x = vision_transformer_sam.checkpoint_seq(self.blocks, x) if self.grad_checkpointing else self.blocks(x)
        return self.neck(x.permute(0, 3, 1, 2))


class _RopeTowerForward(_ModelEmbedding):
    """The Qwen3-VL / DeepSeek encoders' ``forward_features``: the patches (and Qwen's resampled
    ``pos_embed``) as one ``fastvit.patch_embed`` call in place of ``patch_embed`` then
    ``_pos_embed``; the rotary table for the patch grid, the blocks and (DeepSeek) the final norm as
    timm's; (B, N, D) -> (B, H, W, D) a view."""

    fastvit_bypassed_methods = ("_pos_embed",)  # timm's forward_features calls it; the op embeds
    fastvit_patch_grid = True
    _fastvit_module = None  # timm's module of the model (its checkpoint helper)
    _fastvit_final_norm = False  # whether forward_features ends in self.norm (DeepSeek)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x)
        if not self._fastvit_takes(x):
            return super().forward_features(x)
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        x = self._fastvit_tokens(x)
        rope = self.rope.get_embed(shape=grid)
        checkpoint = self._fastvit_module.checkpoint
        for block in self.blocks:
            x = checkpoint(block, x, rope=rope) if self.grad_checkpointing else block(x, rope=rope)
        if self._fastvit_final_norm:
            x = self.norm(x)
        return x.unflatten(1, grid)


if qwen3_vit is not None:
    __all__ += ["FusedDeepseekVitEncoder", "FusedQwen3VitEncoder"]

    class FusedQwen3VitEncoder(_RopeTowerForward, qwen3_vit.Qwen3VitEncoder):
        """timm ``Qwen3VitEncoder`` embedding its patches and resampled ``pos_embed`` with one
        ``fastvit.patch_embed`` call."""

        _fastvit_module = qwen3_vit

        def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
            # timm's bilinear resample of the 48 x 48 table (looked up on timm's module: its FX tracer
            # wraps it there), cast to the patches' dtype as timm's x + pos_embed.to(x.dtype)
            pos_embed = qwen3_vit.resample_pos_embed_grid(self.pos_embed, self.pos_embed_grid_size, grid)
            weight = self.patch_embed.proj.weight
            autocast = autocast_dtype(weight.device) if weight.dtype != torch.float64 else None  # as conv2d's
            return pos_embed.to(autocast or weight.dtype)

    class FusedDeepseekVitEncoder(_RopeTowerForward, deepseek_vit.DeepseekVitEncoder):
        """timm ``DeepseekVitEncoder`` embedding its patches with one ``fastvit.patch_embed`` call (it
        has no absolute position embedding)."""

        _fastvit_module = deepseek_vit
        _fastvit_final_norm = True
