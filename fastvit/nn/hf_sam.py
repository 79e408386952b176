"""Fused subclasses of Hugging Face's SAM vision encoder (``facebook/sam-vit-*``, ``SamModel`` /
``SamVisionModel``; SAM-HQ's, ``SamHQModel``, whose encoder classes are copies of SAM's) and of the
ViTDet backbone's attention (``VitDetAttention``: ``VitDetModel`` / ``VitDetBackbone``, the same
design) and SegGPT's (``SegGptAttention``, SAM's design again), swapped onto a model by ``fastvit.patch``.

SAM's image encoder is a ViTDet: window layers (14 x 14 windows of the padded 64 x 64 map) and a
few global layers, each ``h + attn(layer_norm1(h))`` then ``h + mlp(layer_norm2(h))``, with a
decomposed relative position in every attention. Its attention (``SamVisionAttention``, and
``SamVisionSdpaAttention`` which passes the (N, N) bias to SDPA) computes its scores in its own
forward, not through transformers' ``AttentionInterface``, so ``attn_implementation`` cannot route
it. The fused attention keeps the ``qkv`` and ``proj`` Linears (called as modules) and runs one
``fastvit.flash_attention`` call whose ``rel_pos=(rel_h, rel_w)`` are the two tables Hugging Face's
``get_decomposed_rel_pos`` broadcasts into that bias (``rel_h[b, i, j // w] + rel_w[b, i, j % w]``):
the (N, N) bias is never built, and ``rel_pos_h`` / ``rel_pos_w`` learn through the tables'
gradients. The attention weights requested (``output_attentions=True``, or transformers' output
capture collecting ``attentions``) and the eager class's attention dropout in training run Hugging
Face's forward (the SDPA class applies no dropout).

``SamVisionLayer``'s second half, ``h + mlp(layer_norm2(h))``, is one ``fastvit.layernorm_mlp``
call (``fastvit.nn.hf_layers.FusedSamVisionLayer``). Importing this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamVisionAttention,
    DeepseekOcr2SamVisionSdpaAttention,
)
from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2VisionAttention
from transformers.models.pp_formulanet.modeling_pp_formulanet import PPFormulaNetVisionAttention
from transformers.models.sam.modeling_sam import SamVisionAttention, SamVisionSdpaAttention
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionAttention, SamHQVisionSdpaAttention
from transformers.models.seggpt.modeling_seggpt import SegGptAttention
from transformers.models.slanext.modeling_slanext import SLANeXtVisionAttention
from transformers.models.unlimited_ocr.modeling_unlimited_ocr import (
    UnlimitedOcrSamVisionAttention,
    UnlimitedOcrSamVisionSdpaAttention,
)
from transformers.models.vitdet.modeling_vitdet import VitDetAttention
from transformers.models.vitdet.modeling_vitdet import get_rel_pos as vitdet_get_rel_pos

import fastvit
from fastvit.nn.attention import decomposed_rel_pos_tables, merge_heads, split_packed_qkv
from fastvit.nn.fused import FusedModule, declare_fused
from fastvit.nn.hf_attention import swapped_attention_covers

__all__ = [
    "SAM_COPY_ATTENTIONS",
    "SAM_COPY_FUSED",
    "FusedSamHQVisionAttention",
    "FusedSamHQVisionSdpaAttention",
    "FusedSamVisionAttention",
    "FusedSamVisionSdpaAttention",
    "FusedSegGptAttention",
    "FusedVitDetAttention",
]


class _SamAttentionForward(FusedModule):
    """The forward of the fused SAM attentions (the base of each)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # the projections are called as modules; the softmax and dropout are the op's
    # whether Hugging Face's forward drops attention probabilities in training (the SDPA classes never do)
    drops_attention = True
    # the attribute saying whether the relative position is used (SegGPT's has another name)
    rel_pos_flag = "use_rel_pos"

    def _fastvit_rel_pos(self, q: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Hugging Face's decomposed relative position as the op's (rel_h, rel_w) tables."""
        r_h = self.get_rel_pos(height, height, self.rel_pos_h)  # (h, h, D): [query row, key row]
        r_w = self.get_rel_pos(width, width, self.rel_pos_w)  # (w, w, D): [query column, key column]
        return decomposed_rel_pos_tables(q, r_h, r_w, (height, width))

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_states, output_attentions)
        dropout = self.dropout if self.drops_attention else 0.0
        if not swapped_attention_covers(self, output_attentions, dropout, self.training):
            return super().forward(hidden_states, output_attentions)
        batch, height, width, channels = hidden_states.shape
        heads = self.num_attention_heads
        qkv = self.qkv(hidden_states.reshape(batch, height * width, channels))
        q, k, v = split_packed_qkv(qkv, heads, qkv.shape[-1] // (3 * heads))  # (B, H, N, D) views
        rel_pos = self._fastvit_rel_pos(q, height, width) if getattr(self, self.rel_pos_flag) else None
        out = fastvit.flash_attention(q, k, v, scale=self.scale, rel_pos=rel_pos)
        return self.proj(merge_heads(out).view(batch, height, width, -1)), None

    def extra_repr(self) -> str:
        kind = "rel_pos" if getattr(self, self.rel_pos_flag) else "plain"
        return f"heads={self.num_attention_heads}, {kind}, fastvit={self.fastvit_op}"


class FusedSamVisionAttention(_SamAttentionForward, SamVisionAttention):
    """Hugging Face ``SamVisionAttention`` (``attn_implementation="eager"``) running one
    ``fastvit.flash_attention`` call, decomposed relative position as ``rel_pos``.

    Same signature, ``forward(hidden_states, output_attentions=None)``: hidden_states (B, H, W, C),
    windows or the whole map; returns ``(attn_output, None)``, attn_output (B, H, W, C).

    Example:
        >>> model = transformers.SamModel.from_pretrained("facebook/sam-vit-base", attn_implementation="eager")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamVisionAttention
    """


class FusedSamVisionSdpaAttention(_SamAttentionForward, SamVisionSdpaAttention):
    """Hugging Face ``SamVisionSdpaAttention`` (the default) running one ``fastvit.flash_attention``
    call; the (N, N) bias it hands SDPA becomes the op's ``rel_pos`` tables.

    Same signature and output as ``FusedSamVisionAttention``.

    Example:
        >>> model = transformers.SamModel.from_pretrained("facebook/sam-vit-base")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamVisionSdpaAttention
    """

    drops_attention = False


class FusedSamHQVisionAttention(_SamAttentionForward, SamHQVisionAttention):
    """SAM-HQ's ``SamHQVisionAttention``, as ``FusedSamVisionAttention``.

    Example:
        >>> model = transformers.SamHQModel.from_pretrained("syscv-community/sam-hq-vit-base",
        ...                                                 attn_implementation="eager")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamHQVisionAttention
    """


class FusedSamHQVisionSdpaAttention(_SamAttentionForward, SamHQVisionSdpaAttention):
    """SAM-HQ's ``SamHQVisionSdpaAttention``, as ``FusedSamVisionSdpaAttention``.

    Example:
        >>> model = transformers.SamHQModel.from_pretrained("syscv-community/sam-hq-vit-base")
        >>> fastvit.patch(model)  # vision_encoder.layers.*.attn -> FusedSamHQVisionSdpaAttention
    """

    drops_attention = False


class FusedSegGptAttention(_SamAttentionForward, SegGptAttention):
    """SegGPT's ``SegGptAttention`` (SAM's design: packed ``qkv``, decomposed relative position where
    ``use_relative_position_embeddings``, no attention dropout) running one ``fastvit.flash_attention``
    call, as ``FusedSamVisionAttention``; ``output_attentions=True`` runs Hugging Face's forward.

    Same signature, ``forward(hidden_states, output_attentions=False)``: hidden_states (B, H, W, C);
    returns ``(attn_output, None)``, attn_output (B, H, W, C).

    Example:
        >>> model = transformers.SegGptForImageSegmentation.from_pretrained("BAAI/seggpt-vit-large")
        >>> fastvit.patch(model)  # model.encoder.layers.*.attention -> FusedSegGptAttention
    """

    drops_attention = False
    rel_pos_flag = "use_relative_position_embeddings"


# SAM's image encoder attention copied into other models' SAM encoders (each checked line for line
# against SAM's in the tests): {its eager class: its SDPA class, or None where it has none}
SAM_COPY_ATTENTIONS: dict[type, type | None] = {
    DeepseekOcr2SamVisionAttention: DeepseekOcr2SamVisionSdpaAttention,  # DeepSeek-OCR 2
    GotOcr2VisionAttention: None,  # GOT-OCR 2.0
    PPFormulaNetVisionAttention: None,  # PP-FormulaNet
    SLANeXtVisionAttention: None,  # SLANeXt (table recognition)
    UnlimitedOcrSamVisionAttention: UnlimitedOcrSamVisionSdpaAttention,
}
# {original attention class: its fused class}, ``Fused<original>`` in this module (a patched model pickles)
SAM_COPY_FUSED: dict[type, type[_SamAttentionForward]] = {
    original: declare_fused(
        original, _SamAttentionForward, globals(),
        f"``{original.__name__}`` (SAM's image encoder attention, line for line), as ``FusedSamVisionAttention``.",
        drops_attention=not original.__name__.endswith("SdpaAttention"),  # the SDPA classes apply no dropout
    )
    for eager, sdpa in SAM_COPY_ATTENTIONS.items()
    for original in (eager, sdpa)
    if original is not None
}

class FusedVitDetAttention(FusedModule, VitDetAttention):
    """Hugging Face ``VitDetAttention`` (the ViTDet backbone's, windowed or global, decomposed relative
    position where ``use_relative_position_embeddings``) running one ``fastvit.flash_attention``
    call, the relative position as ``rel_pos`` tables (``rel_pos_h`` / ``rel_pos_w`` learn through
    them). ``output_attentions=True`` runs Hugging Face's forward (it has no attention dropout).

    Same signature, ``forward(hidden_state, output_attentions=False)``: hidden_state (B, H, W, C),
    windows or the whole map; returns ``(attn_output,)``, attn_output (B, H, W, C).

    Example:
        >>> model = transformers.VitDetBackbone(transformers.VitDetConfig(use_relative_position_embeddings=True))
        >>> fastvit.patch(model)  # encoder.layer.*.attention -> FusedVitDetAttention
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ()  # the projections are called as modules; the softmax is the op's

    def forward(self, hidden_state: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(hidden_state, output_attentions)
        if not swapped_attention_covers(self, output_attentions, 0.0, False):
            return super().forward(hidden_state, output_attentions)
        batch, height, width, channels = hidden_state.shape
        qkv = self.qkv(hidden_state.reshape(batch, height * width, channels))
        q, k, v = split_packed_qkv(qkv, self.num_heads, qkv.shape[-1] // (3 * self.num_heads))  # (B, H, N, D) views
        rel_pos = None
        if self.use_relative_position_embeddings:
            r_h = vitdet_get_rel_pos(height, height, self.rel_pos_h)  # (h, h, D): [query row, key row]
            r_w = vitdet_get_rel_pos(width, width, self.rel_pos_w)  # (w, w, D): [query column, key column]
            rel_pos = decomposed_rel_pos_tables(q, r_h, r_w, (height, width))
        out = fastvit.flash_attention(q, k, v, scale=self.scale, rel_pos=rel_pos)
        return (self.proj(merge_heads(out).view(batch, height, width, -1)),)

    def extra_repr(self) -> str:
        kind = "rel_pos" if self.use_relative_position_embeddings else "plain"
        return f"heads={self.num_heads}, {kind}, fastvit={self.fastvit_op}"
