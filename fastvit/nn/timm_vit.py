"""Fused subclasses of timm's ViT modules, swapped onto a model by ``fastvit.patch``.

timm's ``Attention``, its pre-norm ``Block`` and the ``VisionTransformer`` / DeiT
``VisionTransformerDistilled`` embedding (``PatchEmbed`` + class/distillation/register tokens +
``pos_embed``, fused in the model's ``forward_features``). See ``fastvit.nn.fused`` for how the
swap works and ``fastvit/patching/timm.py`` for what is checked before a module is swapped.
Importing this module imports timm.
"""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from timm.layers import Attention, resample_abs_pos_embed
from timm.models._manipulate import checkpoint_seq
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

import fastvit
from fastvit.nn.attention import (
    mask_refused,
    mask_with_causal,
    merge_heads,
    self_attention,
    split_packed_qkv,
    timm_scale,
)
from fastvit.nn.fused import FusedModule, conv_takes
from fastvit.nn.timm_mlp import MLP_BYPASSED, SWIGLU_BYPASSED, PreNormMlpHalf
from fastvit.ops.patch_embed import crop_to_patches

__all__ = [
    "FusedAttention",
    "FusedBlock",
    "FusedSwiGLUBlock",
    "FusedVisionTransformer",
    "FusedVisionTransformerDistilled",
]


class FusedAttention(FusedModule, Attention):
    """timm ``Attention`` running ``fastvit.flash_attention``.

    Same signature, ``forward(x, attn_mask=None, is_causal=False)``; q, k, v are views into the
    packed ``qkv`` projection (no copies), ``q_norm``/``k_norm``, ``norm`` (scale_norm) and the
    optional gate apply as in timm; ``attn_mask`` (timm's, SDPA's convention) goes to the op's
    ``attn_mask``. Calls in training with attention dropout > 0 run timm's own forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        refused = mask_with_causal(attn_mask, is_causal) or mask_refused(attn_mask, x, self.num_heads)
        if refused or self._fastvit_unfused("timm Attention"):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        gate_layer = getattr(self, "gate", None)
        gate = gate_layer(x).sigmoid() if gate_layer is not None else None
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, self.head_dim)  # (B, H, N, D) views
        q, k = self.q_norm(q), self.k_norm(k)
        scale = timm_scale(self)
        x = self.norm(merge_heads(self_attention(q, k, v, scale=scale, causal=is_causal, attn_mask=attn_mask)))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


class _BlockForward(PreNormMlpHalf):
    """timm's pre-norm ``Block`` whose second half, ``x + drop_path2(ls2(mlp(norm2(x))))``, is one
    ``fastvit.layernorm_mlp`` call (``fastvit.nn.timm_mlp.PreNormMlpHalf``: LayerScale as
    ``layer_scale``, drop-path as ``sample_scale``, a LayerNorm or timm's ``RmsNorm``, an ``Mlp``,
    ``GluMlp`` or ``SwiGLU``).

    The attention half runs as in timm (through ``self.attn``, fused or not). In training with MLP
    dropout > 0 the second half runs timm's modules.
    """

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self._fastvit_overridden():  # the whole forward: the override may be Block.forward itself
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return self._fastvit_mlp_half(x)



class FusedBlock(_BlockForward, Block):
    """timm ``Block`` with an ``Mlp`` (GELU, QuickGELU or SiLU) or a packed ``GluMlp``: its MLP half
    is one ``fastvit.layernorm_mlp`` call."""

    fastvit_bypassed = (*MLP_BYPASSED, "ls2")


class FusedSwiGLUBlock(_BlockForward, Block):
    """timm ``Block`` with a ``SwiGLU`` MLP (``fc1_g`` gate, ``fc1_x`` value; AIMv2): its MLP half is
    one gated ``fastvit.layernorm_mlp`` call."""

    fastvit_bypassed = (*SWIGLU_BYPASSED, "ls2")


class _FusedEmbedding(FusedModule):
    """What the fused timm models share (the ``VisionTransformer`` classes, ``fastvit.nn.timm_eva.FusedEva``
    and ``fastvit.nn.timm_embeddings``' models): each one's ``forward_features`` embeds with one
    ``fastvit.patch_embed`` call (``_fastvit_tokens``), in place of ``patch_embed`` then
    ``_pos_embed`` (or the model's own concat and add), and runs the rest as timm's.

    That call projects the patches, prepends the tokens ``_fastvit_prefix`` names (class /
    distillation / register) and adds ``_fastvit_pos_embed`` (resampled as timm does under
    ``dynamic_img_size``); ``pos_drop``, ``patch_drop``, ``norm_pre``, the blocks and ``norm`` then
    run as in timm. ``model.patch_embed`` itself is not
    touched: called on its own (or by ``forward_intermediates``, which runs timm's embedding) it
    returns what it always did. A hook on ``patch_embed`` or its ``proj`` / ``norm``, or a
    replaced ``patch_embed``, sends the call to timm's ``forward_features``.
    """

    fastvit_part = "patch_embed"
    fastvit_op = "patch_embed"
    fastvit_bypassed = ("patch_embed", "patch_embed.proj", "patch_embed.norm")
    fastvit_bypassed_methods = ("_pos_embed",)  # timm's forward_features calls it; the op embeds
    # whether the model's patch_embed gives timm's (B, H, W, D) map, the op's tokens viewed so
    fastvit_patch_grid: ClassVar[bool] = False

    def _fastvit_prefix(self) -> list[torch.Tensor]:
        """The tokens timm puts before the patches, in its order."""
        return [t for t in (self.cls_token, self.reg_token) if t is not None]

    def _fastvit_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position embedding timm adds, (1, P+N, D) or (1, N, D), for a (H, W) patch grid
        (rounded up under ``dynamic_img_pad``): resampled under ``dynamic_img_size``."""
        pos_embed = self.pos_embed
        if pos_embed is not None and self.dynamic_img_size:
            # looked up on the original class's timm module, where timm's FX tracer wraps it (a leaf,
            # as in timm's _pos_embed: its size checks would be control flow on traced values)
            module = sys.modules.get(type(self).fastvit_original().__module__)
            resample = getattr(module, "resample_abs_pos_embed", resample_abs_pos_embed)
            pos_embed = resample(
                pos_embed,
                new_size=grid,
                old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
        return pos_embed

    def _fastvit_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """The (H, W) patch grid of images ``x`` (rounded up under ``dynamic_img_pad``), the size
        ``pos_embed`` is resampled to. Under ``torch.compile``, where ``patch_embed`` gives timm's
        (B, H, W, D) map, it is read off that map's shape, as timm's ``_pos_embed`` reads it (the
        conv is then dead code the compiler drops): from the images' own symbolic shape, PyTorch
        2.14's fake ``_upsample_bicubic2d_aa_backward`` failed at a second image size with autograd
        on ("isIntList() INTERNAL ASSERT FAILED"; dynamic_img_size ViTs, EVA, SAM), which timm's
        path does not hit."""
        embed = self.patch_embed
        if torch.compiler.is_compiling() and getattr(embed, "output_fmt", None) == "NHWC":
            return tuple(embed(x).shape[1:3])
        return embed.dynamic_feat_size(x.shape[-2:])

    def _fastvit_takes(self, x: torch.Tensor) -> bool:
        """Whether the fused embedding computes this call as timm's: nothing overridden or hooked
        (``_fastvit_intact``) and images the conv takes as they are (other channels, no batch
        dimension or another dtype outside autocast: timm raises its own error, ``conv_takes``)."""
        return self._fastvit_intact() and conv_takes(x, self.patch_embed.proj)  # intact: proj is a conv

    def _fastvit_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, P+N, D) tokens with prefix tokens and pos_embed."""
        embed = self.patch_embed
        if embed.img_size is not None:  # timm's PatchEmbed checks, with timm's messages
            height, width = x.shape[-2], x.shape[-1]
            (model_height, model_width), (patch_height, patch_width) = embed.img_size, embed.patch_size
            if embed.strict_img_size:
                torch._assert(height == model_height, f"Input height ({height}) doesn't match model ({model_height}).")
                torch._assert(width == model_width, f"Input width ({width}) doesn't match model ({model_width}).")
            elif not embed.dynamic_img_pad:
                message = "Input {} ({}) should be divisible by patch size ({})."
                torch._assert(height % patch_height == 0, message.format("height", height, patch_height))
                torch._assert(width % patch_width == 0, message.format("width", width, patch_width))
        prefix = self._fastvit_prefix()
        prefix_tokens = None if not prefix else prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1)
        pos_embed = self._fastvit_pos_embed(self._fastvit_grid(x))
        padding = {"dynamic_img_pad": True} if embed.dynamic_img_pad else {}  # zero-pads bottom/right
        if not embed.dynamic_img_pad:  # timm's conv drops a partial patch (a strict img_size of 384 / 14)
            x = crop_to_patches(x, embed.proj.weight.shape[-1])
        return fastvit.patch_embed(
            x, embed.proj.weight, embed.proj.bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens, **padding
        )  # fmt: skip


class _VisionTransformerForward(_FusedEmbedding):
    """``VisionTransformer.forward_features`` with the embedding as one ``fastvit.patch_embed``
    call (``_FusedEmbedding``)."""

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        if not self._fastvit_takes(x):
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self._fastvit_tokens(x)
        if self.pos_embed is not None:  # timm applies pos_drop only with a pos_embed
            x = self.pos_drop(x)
        x = self.norm_pre(self.patch_drop(x))
        if attn_mask is not None or is_causal:  # timm's block loop, as in its forward_features
            for block in self.blocks:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


class FusedVisionTransformer(_VisionTransformerForward, VisionTransformer):
    """timm ``VisionTransformer`` embedding its input with ``fastvit.patch_embed``."""


class FusedVisionTransformerDistilled(_VisionTransformerForward, VisionTransformerDistilled):
    """DeiT ``VisionTransformerDistilled``: class then distillation token, then the patches."""

    def _fastvit_prefix(self) -> list[torch.Tensor]:
        return [self.cls_token, self.dist_token]
