"""Fused subclasses of Florence-2's vision blocks (Hugging Face's ``Florence2VisionSpatialBlock`` and
``Florence2VisionChannelBlock``, the DaViT tower of ``Florence2Model``), swapped onto a model by
``fastvit.patch``.

Each block works on a (B, C, H, W) map: a depthwise conv position encoding added, the map seen as
(B, H*W, C) tokens (a transposed view, the channels at stride H*W), an attention half (window
attention in the spatial block, channel attention in the channel block: both through transformers'
``AttentionInterface``, routed by ``fastvit.patch``; the channel attention's calls, whose head dim
is the map's tokens as a strided view, run SDPA, and the report lists it as left alone), a second
conv position encoding, then the FFN half ``residual + drop_path2(ffn(norm2(tokens)))``, back to
(B, C, H, W). The FFN half is one ``fastvit.layernorm_mlp`` call on the tokens (the op reads the
transposed view; it copies it once to a unit channel stride, as Hugging Face's LayerNorm does), the
branch alone (``residual=False``): the residual add is Hugging Face's, so the map comes out with the
strides it has unpatched (``FusedPreNormLayer.fastvit_residual_after``). The rest of each forward is
Hugging Face's, line for line; drop path in training, or a hook on (or a replacement of) a module
the half reads, run Hugging Face's modules. Importing this module imports transformers and enters
the fused classes in ``fastvit.nn.hf_layers``' tables."""

from __future__ import annotations

import torch
from transformers.models.florence2.modeling_florence2 import (
    Florence2VisionChannelBlock,
    Florence2VisionSpatialBlock,
)

from fastvit.nn.hf_layers import FusedPreNormLayer, MlpHalf, register

__all__ = ["FLORENCE2_FFN_HALF", "FusedFlorence2VisionChannelBlock", "FusedFlorence2VisionSpatialBlock"]

# the FFN half of both blocks: residual + drop_path2(ffn(norm2(x))), Florence2VisionMLP (fc1, act, fc2)
FLORENCE2_FFN_HALF = MlpHalf("norm2", mlp="ffn", drop_path="drop_path2")


class _Florence2MapBlock(FusedPreNormLayer):
    """The FFN half of Florence-2's blocks on their (B, C, H, W) maps."""

    fastvit_mlp = FLORENCE2_FFN_HALF
    fastvit_residual_after = True

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's FFN half, module by module, the residual first (the sum's layout is the
        residual's, as unpatched)."""
        return hidden_states + self.drop_path2(self.ffn(self.norm2(hidden_states)))

    def _fastvit_map_ffn_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second block, (B, C, H, W) -> (B, C, H, W): the conv position encoding
        added, then the FFN half on the map's (B, H*W, C) tokens as one op call."""
        batch_size, embed_dim, height, width = hidden_states.shape
        hidden_states = self.conv2(hidden_states) + hidden_states
        hidden_states = self._fastvit_mlp_half(hidden_states.flatten(2).transpose(1, 2))
        return hidden_states.transpose(1, 2).view(batch_size, embed_dim, height, width)


class FusedFlorence2VisionSpatialBlock(_Florence2MapBlock, Florence2VisionSpatialBlock):
    """Florence-2's spatial block (window attention) whose FFN half is one ``fastvit.layernorm_mlp``
    call. Same signature, ``forward(hidden_states)``: (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> model = transformers.Florence2VisionBackbone(transformers.Florence2VisionConfig())
        >>> fastvit.patch(model)  # blocks.*.*.spatial_block -> FusedFlorence2VisionSpatialBlock
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the block's forward itself
            return super().forward(hidden_states)
        # -- Hugging Face's conv and window attention half, line for line --
        batch_size, embed_dim, height, width = hidden_states.shape
        hidden_states = self.conv1(hidden_states) + hidden_states
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        hidden_states = hidden_states.view(batch_size, height, width, embed_dim)
        hidden_states = self.window_attn(hidden_states)
        hidden_states = residual + self.drop_path1(hidden_states)
        hidden_states = hidden_states.transpose(1, 2).view(batch_size, embed_dim, height, width)
        # -- the conv and the FFN half, fused --
        return self._fastvit_map_ffn_half(hidden_states)


class FusedFlorence2VisionChannelBlock(_Florence2MapBlock, Florence2VisionChannelBlock):
    """Florence-2's channel block (channel group attention) whose FFN half is one
    ``fastvit.layernorm_mlp`` call. Same signature, ``forward(hidden_states)``: (B, C, H, W) ->
    (B, C, H, W).

    Example:
        >>> model = transformers.Florence2VisionBackbone(transformers.Florence2VisionConfig())
        >>> fastvit.patch(model)  # blocks.*.*.channel_block -> FusedFlorence2VisionChannelBlock
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the block's forward itself
            return super().forward(hidden_states)
        # -- Hugging Face's conv and channel attention half, line for line --
        batch_size, embed_dim, height, width = hidden_states.shape
        hidden_states = self.conv1(hidden_states) + hidden_states
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        hidden_states = self.channel_attn(hidden_states)
        hidden_states = residual + self.drop_path1(hidden_states)
        hidden_states = hidden_states.transpose(1, 2).view(batch_size, embed_dim, height, width)
        # -- the conv and the FFN half, fused --
        return self._fastvit_map_ffn_half(hidden_states)


for _fused in (FusedFlorence2VisionSpatialBlock, FusedFlorence2VisionChannelBlock):
    register(_fused)
