"""Fused subclasses of the Hugging Face self-attentions that compute their scores in their own forward
(not through transformers' ``AttentionInterface``, so ``attn_implementation`` cannot route them) with
nothing between the projections but a softmax: PVT's and GLPN's efficient self-attention and PVTv2's
(keys and values from a spatially reduced map: a strided conv and a LayerNorm, or PVTv2-Li's pooling),
TimeSformer's (its divided space-time attention: the layer folds time or space into the batch),
MobileViT's (over the unfolded patches' pixels), BLIP's vision tower's, FLAVA's (its image, text and
multimodal encoders: BERT's self-attention, an additive mask added to the scores), ViLT's (FLAVA's
line for line, over its joint text and image tokens), GroupViT's (self- and cross-attention) and CvT's (queries,
keys and values from depthwise-conv projections of the map, keys and values strided).

Each fused forward keeps Hugging Face's Linears and reduction modules (called as modules, in Hugging
Face's order) and runs the softmax attention as one ``fastvit.flash_attention`` call (N queries over
the reduced map's M keys). The attention weights requested and attention dropout in training run
Hugging Face's forward. Importing this module imports transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.cvt.modeling_cvt import CvtSelfAttention
from transformers.models.flava.modeling_flava import FlavaSelfAttention
from transformers.models.glpn.modeling_glpn import GLPNEfficientSelfAttention
from transformers.models.groupvit.modeling_groupvit import GroupViTAttention
from transformers.models.mobilevit.modeling_mobilevit import MobileViTSelfAttention
from transformers.models.pvt.modeling_pvt import PvtEfficientSelfAttention
from transformers.models.pvt_v2.modeling_pvt_v2 import PvtV2SelfAttention
from transformers.models.timesformer.modeling_timesformer import TimesformerSelfAttention
from transformers.models.vilt.modeling_vilt import ViltSelfAttention

import fastvit
from fastvit.nn.attention import merge_heads, split_packed_qkv
from fastvit.nn.fused import FusedModule
from fastvit.nn.hf_attention import swapped_attention_covers

__all__ = [
    "FusedBlipAttention",
    "FusedCvtSelfAttention",
    "FusedFlavaSelfAttention",
    "FusedGLPNEfficientSelfAttention",
    "FusedGroupViTAttention",
    "FusedMobileViTSelfAttention",
    "FusedPvtEfficientSelfAttention",
    "FusedPvtV2SelfAttention",
    "FusedTimesformerSelfAttention",
    "FusedViltSelfAttention",
]


class _ReducedAttention(FusedModule):
    """The shared part of the fused attentions with ``query`` / ``key`` / ``value`` Linears (the
    PVT-style ones, MobileViT's, FLAVA's): heads, the op call."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    # the Linears and the reduction are called as modules; the softmax and the attention dropout are the op's
    fastvit_bypassed = ("dropout",)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H*D) -> (B, H, N, D), a view (Hugging Face's ``transpose_for_scores``)."""
        return x.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def _reduced(self, hidden_states: torch.Tensor, height: int, width: int, reduction: Callable) -> torch.Tensor:
        """Hugging Face's spatial reduction of the (B, N, C) tokens of a (height, width) map: ``reduction``
        (a strided conv) on the (B, C, height, width) map, its (B, M, C) tokens through ``layer_norm``."""
        batch_size, _, num_channels = hidden_states.shape
        hidden_states = hidden_states.permute(0, 2, 1).reshape(batch_size, num_channels, height, width)
        hidden_states = reduction(hidden_states).reshape(batch_size, num_channels, -1).permute(0, 2, 1)
        return self.layer_norm(hidden_states)

    def _attend(
        self, query: torch.Tensor, keys_from: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + attn_mask) v with k, v projected from ``keys_from`` (B, M, C):
        (B, N, H*D)."""
        k, v = self._heads(self.key(keys_from)), self._heads(self.value(keys_from))
        scale = 1 / math.sqrt(self.attention_head_size)
        return merge_heads(fastvit.flash_attention(self._heads(query), k, v, scale=scale, attn_mask=attn_mask))

    def extra_repr(self) -> str:
        return f"heads={self.num_attention_heads}, fastvit={self.fastvit_op}"


class _EfficientSelfAttentionForward(_ReducedAttention):
    """The forward of PVT's and GLPN's fused efficient self-attentions: queries from the (B, N, C)
    tokens, keys and values from the map reduced by the module named ``fastvit_reduction`` where the
    ratio named ``fastvit_reduction_ratio`` is above 1. Same signature as Hugging Face's, ``forward(hidden_states,
    height, width, output_attentions=False)``; returns ``(context,)``, context (B, N, C)."""

    fastvit_reduction_ratio: ClassVar[str]  # the attribute holding the reduction ratio
    fastvit_reduction: ClassVar[str]  # the strided conv's attribute

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, height, width, output_attentions)
        if not swapped_attention_covers(self, output_attentions, self.dropout.p, self.dropout.training):
            return super().forward(hidden_states, height, width, output_attentions)
        query = self.query(hidden_states)
        if getattr(self, self.fastvit_reduction_ratio) > 1:
            hidden_states = self._reduced(hidden_states, height, width, getattr(self, self.fastvit_reduction))
        return (self._attend(query, hidden_states),)


class FusedPvtEfficientSelfAttention(_EfficientSelfAttentionForward, PvtEfficientSelfAttention):
    """PVT's ``PvtEfficientSelfAttention`` running one ``fastvit.flash_attention`` call, keys and values
    from the map reduced by ``sequences_reduction_ratio``.

    Example:
        >>> model = transformers.PvtModel(transformers.PvtConfig())
        >>> fastvit.patch(model)  # encoder.block.*.*.attention.self -> FusedPvtEfficientSelfAttention
    """

    fastvit_reduction_ratio, fastvit_reduction = "sequences_reduction_ratio", "sequence_reduction"


class FusedGLPNEfficientSelfAttention(_EfficientSelfAttentionForward, GLPNEfficientSelfAttention):
    """GLPN's ``GLPNEfficientSelfAttention`` (SegFormer's) running one ``fastvit.flash_attention``
    call, keys and values from the map reduced by ``sr_ratio``.

    Example:
        >>> model = transformers.GLPNModel(transformers.GLPNConfig())
        >>> fastvit.patch(model)  # encoder.block.*.*.attention.self -> FusedGLPNEfficientSelfAttention
    """

    fastvit_reduction_ratio, fastvit_reduction = "sr_ratio", "sr"


class FusedPvtV2SelfAttention(_ReducedAttention, PvtV2SelfAttention):
    """PVTv2's ``PvtV2SelfAttention`` running one ``fastvit.flash_attention`` call, keys and values from
    the map reduced by ``spatial_reduction_ratio`` (or pooled to 7 x 7: ``linear_attention``); then
    its ``proj`` and ``proj_drop``, as Hugging Face's.

    Example:
        >>> model = transformers.PvtV2Model(transformers.PvtV2Config())
        >>> fastvit.patch(model)  # encoder.layers.*.blocks.*.attention -> FusedPvtV2SelfAttention
    """

    fastvit_bypassed = ("attn_drop",)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, height, width, output_attentions)
        if not swapped_attention_covers(self, output_attentions, self.attn_drop.p, self.attn_drop.training):
            return super().forward(hidden_states, height, width, output_attentions)
        query = self.query(hidden_states)
        if self.linear_attention:  # pooled to 7 x 7, then a 1 x 1 conv, the norm and GELU
            pooled = self._reduced(hidden_states, height, width, lambda x: self.spatial_reduction(self.pool(x)))
            hidden_states = self.act(pooled)
        elif self.spatial_reduction_ratio > 1:
            hidden_states = self._reduced(hidden_states, height, width, self.spatial_reduction)
        context_layer = self.proj(self._attend(query, hidden_states))
        return (self.proj_drop(context_layer),)


class FusedTimesformerSelfAttention(FusedModule, TimesformerSelfAttention):
    """TimeSformer's ``TimesformerSelfAttention`` (packed ``qkv``; the layer calls it over time with
    space in the batch, then over space with time in the batch) running one ``fastvit.flash_attention``
    call. Same signature, ``forward(hidden_states, output_attentions=False)``: hidden_states (B', N, C);
    returns ``(context,)``, context (B', N, C), before the layer's output projection.

    Example:
        >>> model = transformers.TimesformerModel(transformers.TimesformerConfig())
        >>> fastvit.patch(model)  # encoder.layer.*.{attention,temporal_attention}.attention -> this class
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # qkv is called as a module; the softmax and dropout are the op's

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, output_attentions)
        if not swapped_attention_covers(self, output_attentions, self.attn_drop.p, self.attn_drop.training):
            return super().forward(hidden_states, output_attentions)
        qkv = self.qkv(hidden_states)
        q, k, v = split_packed_qkv(qkv, self.num_heads, qkv.shape[-1] // (3 * self.num_heads))  # (B, H, N, D) views
        return (merge_heads(fastvit.flash_attention(q, k, v, scale=self.scale)),)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"


class FusedMobileViTSelfAttention(_ReducedAttention, MobileViTSelfAttention):
    """MobileViT's ``MobileViTSelfAttention`` (its transformer over the unfolded patches: (B * pixels
    per patch, patches, C)) running one ``fastvit.flash_attention`` call. Same signature,
    ``forward(hidden_states)``; returns the context (B', N, C). Attention dropout in training runs
    Hugging Face's forward.

    Example:
        >>> model = transformers.MobileViTModel(transformers.MobileViTConfig())
        >>> fastvit.patch(model)  # encoder.layer.*.transformer.layer.*.attention.attention -> this class
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states)
        if not swapped_attention_covers(self, False, self.dropout.p, self.dropout.training):
            return super().forward(hidden_states)
        return self._attend(self.query(hidden_states), hidden_states)


class FusedBlipAttention(FusedModule, BlipAttention):
    """BLIP's ``BlipAttention`` (its vision tower; packed ``qkv``, ``projection``) running one
    ``fastvit.flash_attention`` call. Same signature, ``forward(hidden_states, **kwargs)``; returns
    ``(output, None)``: the attention weights Hugging Face's forward returns are computed only when
    asked for (transformers' output capture collecting ``attentions``, ``output_attentions=True`` on
    the model), by Hugging Face's forward, as are the calls with attention dropout in training.

    Example:
        >>> model = transformers.BlipVisionModel(transformers.BlipVisionConfig())
        >>> fastvit.patch(model)  # encoder.layers.*.self_attn -> FusedBlipAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("dropout",)  # qkv and projection are called as modules; the softmax and dropout are the op's

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states)
        if not swapped_attention_covers(
            self, kwargs.get("output_attentions"), self.dropout.p, self.dropout.training
        ):
            return super().forward(hidden_states, **kwargs)
        qkv = self.qkv(hidden_states)
        q, k, v = split_packed_qkv(qkv, self.num_heads, self.head_dim)  # (B, H, N, D) views
        return self.projection(merge_heads(fastvit.flash_attention(q, k, v, scale=self.scale))), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"


class _BertSelfAttentionForward(_ReducedAttention):
    """BERT's self-attention (``query`` / ``key`` / ``value`` Linears, an additive mask added to the
    scores) running one ``fastvit.flash_attention`` call, the mask as its floating ``attn_mask``. Same
    signature, ``forward(hidden_states, attention_mask=None, output_attentions=False)``:
    hidden_states (B, N, C), attention_mask broadcastable to (B, H, N, N) (an extended (B, 1, 1, N)
    padding mask); returns ``(context,)``, context (B, N, C), before the output projection. The
    weights requested, attention dropout in training and a mask that is not floating (Hugging Face
    adds even a bool mask to the scores, as 0 / 1) run Hugging Face's forward."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, attention_mask, output_attentions)
        additive = attention_mask is None or (attention_mask.is_floating_point() and attention_mask.dim() <= 4)
        if not additive or not swapped_attention_covers(
            self, output_attentions, self.dropout.p, self.dropout.training
        ):
            return super().forward(hidden_states, attention_mask, output_attentions)
        return (self._attend(self.query(hidden_states), hidden_states, attention_mask),)


class FusedFlavaSelfAttention(_BertSelfAttentionForward, FlavaSelfAttention):
    """FLAVA's ``FlavaSelfAttention`` (BERT's, in FLAVA's image, text and multimodal encoders) running one
    ``fastvit.flash_attention`` call (``_BertSelfAttentionForward``).

    Example:
        >>> model = transformers.FlavaModel.from_pretrained("facebook/flava-full")
        >>> fastvit.patch(model)  # {image,text,multimodal}_model.encoder.layer.*.attention.attention
    """


class FusedViltSelfAttention(_BertSelfAttentionForward, ViltSelfAttention):
    """ViLT's ``ViltSelfAttention`` (FLAVA's line for line: BERT's, over the joint text and image tokens
    with their extended padding mask) running one ``fastvit.flash_attention`` call
    (``_BertSelfAttentionForward``).

    Example:
        >>> model = transformers.ViltModel.from_pretrained("dandelin/vilt-b32-mlm")
        >>> fastvit.patch(model)  # encoder.layer.*.attention.attention
    """


class FusedGroupViTAttention(FusedModule, GroupViTAttention):
    """GroupViT's ``GroupViTAttention`` (CLIP's projections; its vision stages' self-attention, the
    cross-attention of its token assignment from the group tokens to the image tokens, and its text
    tower's causal self-attention) running one ``fastvit.flash_attention`` call.

    Same signature, ``forward(hidden_states, attention_mask=None, encoder_hidden_states=None)``:
    hidden_states (B, N, C) the queries; keys and values from ``encoder_hidden_states`` (B, M, C)
    where given (cross-attention), else from hidden_states; attention_mask an additive float
    (B, 1, N, M) mask (the text tower's causal and padding mask). Returns ``(output, None)``: the
    weights Hugging Face's forward returns are computed only when asked for (transformers' output
    capture collecting ``attentions``), by Hugging Face's forward, as are the calls with attention
    dropout in training and masks of another shape or kind (Hugging Face raises on the shape, and adds
    a bool mask to the scores as 0 / 1).

    Example:
        >>> model = transformers.GroupViTModel.from_pretrained("nvidia/groupvit-gcc-yfcc")
        >>> fastvit.patch(model)  # *.self_attn and the token assignment's pre_assign_attn.attn
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, attention_mask, encoder_hidden_states)
        keys_from = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        (batch, queries), keys = hidden_states.shape[:2], keys_from.shape[1]
        additive = attention_mask is None or (
            attention_mask.is_floating_point() and tuple(attention_mask.shape) == (batch, 1, queries, keys)
        )
        # GroupViT's attention has no dropout module: the functional dropout with its float p, in training
        if not additive or not swapped_attention_covers(self, kwargs.get("output_attentions"), self.dropout,
                                                        self.training):  # fmt: skip
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, **kwargs)
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).unflatten(-1, heads).transpose(1, 2)  # (B, H, N, D) views
        k = self.k_proj(keys_from).unflatten(-1, heads).transpose(1, 2)
        v = self.v_proj(keys_from).unflatten(-1, heads).transpose(1, 2)
        out = fastvit.flash_attention(q, k, v, scale=self.scale, **({} if attention_mask is None else
                                                                    {"attn_mask": attention_mask}))  # fmt: skip
        return self.out_proj(merge_heads(out)), None

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"


class FusedCvtSelfAttention(FusedModule, CvtSelfAttention):
    """CvT's ``CvtSelfAttention`` running one ``fastvit.flash_attention`` call: the (B, 1 + N, C) tokens
    (class token first where ``with_cls_token``) of a (height, width) map, queries from its
    depthwise-conv projection, keys and values from the strided ones (M <= N), then the Linear
    projections, all Hugging Face's modules in its order; its scale ``embed_dim ** -0.5``, as Hugging
    Face's. Same signature, ``forward(hidden_state, height, width)``; returns the context (B, 1 + N, C)
    before the output projection. Attention dropout in training runs Hugging Face's forward.

    Example:
        >>> model = transformers.CvtForImageClassification.from_pretrained("microsoft/cvt-13")
        >>> fastvit.patch(model)  # cvt.encoder.stages.*.layers.*.attention.attention -> this class
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("dropout",)  # the projections are called as modules; the softmax and dropout are the op's

    def forward(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_state, height, width)
        if not swapped_attention_covers(self, False, self.dropout.p, self.dropout.training):
            return super().forward(hidden_state, height, width)
        if self.with_cls_token:
            cls_token, hidden_state = torch.split(hidden_state, [1, height * width], 1)
        batch_size, _, num_channels = hidden_state.shape
        hidden_state = hidden_state.permute(0, 2, 1).view(batch_size, num_channels, height, width)
        key = self.convolution_projection_key(hidden_state)
        query = self.convolution_projection_query(hidden_state)
        value = self.convolution_projection_value(hidden_state)
        if self.with_cls_token:
            query = torch.cat((cls_token, query), dim=1)
            key = torch.cat((cls_token, key), dim=1)
            value = torch.cat((cls_token, value), dim=1)
        query = self.rearrange_for_multi_head_attention(self.projection_query(query))  # (B, H, N, D) views
        key = self.rearrange_for_multi_head_attention(self.projection_key(key))
        value = self.rearrange_for_multi_head_attention(self.projection_value(value))
        return merge_heads(fastvit.flash_attention(query, key, value, scale=self.scale))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, fastvit={self.fastvit_op}"
