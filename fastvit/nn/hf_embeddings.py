"""Fused subclasses of Hugging Face's patch embeddings beyond ViT: the projection, the prefix tokens
and the position embedding as one ``fastvit.patch_embed`` call.

Covered: ``CLIPVisionEmbeddings``, ``SiglipVisionEmbeddings``, ``Dinov2Embeddings``,
``Dinov2WithRegistersEmbeddings``, ``DINOv3ViTEmbeddings``, ``DeiTEmbeddings``, ViT's copies
``ViTMSNEmbeddings`` and ``IJepaEmbeddings`` (no class token), ``ViTMAEEmbeddings`` (the patches
before its random masking), and BEiT's ``BeitEmbeddings`` and its copy ``Data2VecVisionEmbeddings``
(the absolute position embedding optional), InternVL's ``InternVLVisionEmbeddings`` (BEiT's forward,
the pixels cast to the conv's dtype), OWL-ViT's ``OwlViTVisionEmbeddings``, and the copies
Hugging Face made of these, ``forward`` line for line and ``__init__`` too but for the lines the
tests name (Step3p7's conv without a bias, EoMT-DINOv3's ``num_prefix_tokens``, CLIPSeg's
``interpolate_pos_encoding`` default) (``EMBEDDING_COPIES``: AltCLIP, BridgeTower, Chinese-CLIP,
CLIPSeg, GIT, Kosmos-2, MetaCLIP 2 and X-CLIP of CLIP's; OWLv2 of
OWL-ViT's; Granite Docling and Step3p7 of SigLIP's; TIPSv2 of DINOv2-with-registers'; EoMT-DINOv3
of DINOv3's; Qianfan-OCR of InternVL's). Calls the op does not cover
(``interpolate_pos_encoding`` or a resolution where Hugging Face resamples the position embedding,
``bool_masked_pos``, a hook on the projection) run Hugging Face's forward, which also keeps its own
error messages. Importing this module imports transformers.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from transformers.models.altclip.modeling_altclip import AltCLIPVisionEmbeddings
from transformers.models.beit.modeling_beit import BeitEmbeddings, BeitPatchEmbeddings
from transformers.models.bridgetower.modeling_bridgetower import BridgeTowerVisionEmbeddings
from transformers.models.chinese_clip.modeling_chinese_clip import ChineseCLIPVisionEmbeddings
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings
from transformers.models.clipseg.modeling_clipseg import CLIPSegVisionEmbeddings
from transformers.models.data2vec.modeling_data2vec_vision import (
    Data2VecVisionEmbeddings,
    Data2VecVisionPatchEmbeddings,
)
from transformers.models.deit.modeling_deit import DeiTEmbeddings, DeiTPatchEmbeddings
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings, Dinov2PatchEmbeddings
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
    Dinov2WithRegistersPatchEmbeddings,
)
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTEmbeddings
from transformers.models.eomt_dinov3.modeling_eomt_dinov3 import EomtDinov3Embeddings
from transformers.models.git.modeling_git import GitVisionEmbeddings
from transformers.models.granite_docling.modeling_granite_docling import GraniteDoclingVisionEmbeddings
from transformers.models.ijepa.modeling_ijepa import IJepaEmbeddings, IJepaPatchEmbeddings
from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings, InternVLVisionPatchEmbeddings
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2VisionEmbeddings
from transformers.models.metaclip_2.modeling_metaclip_2 import MetaClip2VisionEmbeddings
from transformers.models.owlv2.modeling_owlv2 import Owlv2VisionEmbeddings
from transformers.models.owlvit.modeling_owlvit import OwlViTVisionEmbeddings
from transformers.models.qianfan_ocr.modeling_qianfan_ocr import (
    QianfanOCRVisionEmbeddings,
    QianfanOCRVisionPatchEmbeddings,
)
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings
from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionEmbeddings
from transformers.models.tipsv2.modeling_tipsv2 import Tipsv2VisionEmbeddings, Tipsv2VisionPatchEmbeddings
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings, ViTMAEPatchEmbeddings
from transformers.models.vit_msn.modeling_vit_msn import ViTMSNEmbeddings, ViTMSNPatchEmbeddings
from transformers.models.x_clip.modeling_x_clip import XCLIPVisionEmbeddings

import fastvit
from fastvit.nn.fused import FusedModule, conv_takes, declare_fused
from fastvit.ops.patch_embed import crop_to_patches

__all__ = [
    "EMBEDDING_COPIES",
    "FUSED_EMBEDDINGS",
    "EmbeddingCopy",
    "FusedBeitEmbeddings",
    "FusedCLIPVisionEmbeddings",
    "FusedDINOv3ViTEmbeddings",
    "FusedData2VecVisionEmbeddings",
    "FusedDeiTEmbeddings",
    "FusedDinov2Embeddings",
    "FusedDinov2WithRegistersEmbeddings",
    "FusedIJepaEmbeddings",
    "FusedInternVLVisionEmbeddings",
    "FusedOwlViTVisionEmbeddings",
    "FusedSiglipVisionEmbeddings",
    "FusedViTMAEEmbeddings",
    "FusedViTMSNEmbeddings",
]


class _FusedEmbeddings(FusedModule):
    fastvit_part = "patch_embed"
    fastvit_op = "patch_embed"
    # the family's PatchEmbeddings class holding the projection, where it has one (checked exactly)
    fastvit_patch_holder: ClassVar[type | None] = None


def _patch_pixels(pixel_values: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The pixels Hugging Face's patchifying Conv2d reads, a view: it drops a partial patch at the
    bottom and right (SigLIP so400m at 384 / 14), which ``fastvit.patch_embed`` would refuse."""
    return crop_to_patches(pixel_values, conv.weight.shape[-1])


class _CLIPLayoutEmbeddings(_FusedEmbeddings):
    """CLIP's embedding, and Hugging Face's copies of it (``EMBEDDING_COPIES``): class embedding
    prepended, ``position_embedding(position_ids)`` added, at the configured image size. There
    ``interpolate_pos_encoding`` changes nothing (Hugging Face's interpolation returns the learned
    embedding at the trained square size, outside ``torch.jit.trace``), so such calls are fused too."""

    fastvit_bypassed = ("patch_embedding",)
    # Hugging Face calls it when asked to interpolate: the fused call at the trained size stands for it
    fastvit_bypassed_methods = ("interpolate_pos_encoding",)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        exact = height == self.image_size and width == self.image_size
        interpolates = interpolate_pos_encoding and torch.jit.is_tracing()  # Hugging Face resamples when traced
        if interpolates or not exact or not self._fastvit_intact():
            return super().forward(pixel_values, interpolate_pos_encoding)
        conv = self.patch_embedding
        if not conv_takes(pixel_values, conv, cast=True):  # other channels: its conv's error
            return super().forward(pixel_values, interpolate_pos_encoding)
        return fastvit.patch_embed(
            _patch_pixels(pixel_values, conv).to(dtype=conv.weight.dtype),  # as Hugging Face casts
            conv.weight,
            conv.bias,
            pos_embed=self.position_embedding(self.position_ids),  # (1, 1+N, D)
            prefix_tokens=self.class_embedding.view(1, 1, -1),
        )


class FusedCLIPVisionEmbeddings(_CLIPLayoutEmbeddings, CLIPVisionEmbeddings):
    """``CLIPVisionEmbeddings`` as one ``fastvit.patch_embed`` call (``_CLIPLayoutEmbeddings``)."""


class _CLIPSegLayoutEmbeddings(_CLIPLayoutEmbeddings):
    """CLIPSeg's embedding: CLIP's line for line, ``interpolate_pos_encoding`` True by default (other
    image sizes resample the position embedding: Hugging Face's forward)."""

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = True) -> torch.Tensor:
        return _CLIPLayoutEmbeddings.forward(self, pixel_values, interpolate_pos_encoding)


class _OwlViTLayoutEmbeddings(_FusedEmbeddings):
    """OWL-ViT's embedding (and OWLv2's, its copy): CLIP's without its size check and dtype cast,
    so any image of the trained patch count takes the position embedding as Hugging Face adds it
    (a non-square grid included). ``interpolate_pos_encoding``, another patch count, or images
    the conv would refuse (another dtype outside autocast, other channels) run Hugging Face's
    forward, which keeps its results and errors."""

    fastvit_bypassed = ("patch_embedding",)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        conv = self.patch_embedding
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        grid = (height // self.patch_size) * (width // self.patch_size)
        if interpolate_pos_encoding or grid != self.num_patches or not self._fastvit_intact():
            return super().forward(pixel_values, interpolate_pos_encoding)
        if not conv_takes(pixel_values, conv):  # other channels or another dtype: its conv's errors
            return super().forward(pixel_values, interpolate_pos_encoding)
        return fastvit.patch_embed(
            _patch_pixels(pixel_values, conv),
            conv.weight,
            conv.bias,
            pos_embed=self.position_embedding(self.position_ids),  # (1, 1+N, D)
            prefix_tokens=self.class_embedding.view(1, 1, -1),
        )


class _SiglipLayoutEmbeddings(_FusedEmbeddings):
    """SigLIP's embedding, and Hugging Face's copies of it (``EMBEDDING_COPIES``): patches plus
    ``position_embedding(position_ids)``, no prefix tokens."""

    fastvit_bypassed = ("patch_embedding",)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        grid = (height // self.patch_size) * (width // self.patch_size)
        if interpolate_pos_encoding or grid != self.num_patches or not self._fastvit_intact():
            return super().forward(pixel_values, interpolate_pos_encoding)  # its shape error, if any
        conv = self.patch_embedding
        if not conv_takes(pixel_values, conv, cast=True):  # other channels: its conv's error
            return super().forward(pixel_values, interpolate_pos_encoding)
        return fastvit.patch_embed(
            _patch_pixels(pixel_values, conv).to(dtype=conv.weight.dtype),
            conv.weight,
            conv.bias,
            pos_embed=self.position_embedding(self.position_ids),  # (1, N, D)
        )


class FusedSiglipVisionEmbeddings(_SiglipLayoutEmbeddings, SiglipVisionEmbeddings):
    """``SiglipVisionEmbeddings`` as one ``fastvit.patch_embed`` call (``_SiglipLayoutEmbeddings``)."""


class _DinoEmbeddings(_FusedEmbeddings):
    """DINOv2's embedding at the trained resolution (Hugging Face resamples the position embedding
    at any other, or for non-square images): class token, position embedding, dropout."""

    fastvit_bypassed = ("patch_embeddings", "patch_embeddings.projection")
    fastvit_bypassed_methods = ("interpolate_pos_encoding",)  # Hugging Face calls it at every size

    def _fastvit_covers(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> bool:
        projection = self.patch_embeddings.projection
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        patch_h, patch_w = projection.stride
        grid = (height // patch_h) * (width // patch_w)
        return (
            bool_masked_pos is None
            and height == width
            and grid == self.position_embeddings.shape[1] - 1
            and pixel_values.shape[1] == self.patch_embeddings.num_channels
            and not torch.jit.is_tracing()  # Hugging Face always resamples when tracing
            and self._fastvit_intact()
        )

    def _fastvit_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix tokens and the position embedding over prefix + patches."""
        return self.cls_token, self.position_embeddings

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        if not self._fastvit_covers(pixel_values, bool_masked_pos):
            return super().forward(pixel_values, bool_masked_pos)
        projection = self.patch_embeddings.projection
        prefix, pos_embed = self._fastvit_prefix()
        tokens = fastvit.patch_embed(
            _patch_pixels(pixel_values, projection).to(projection.weight.dtype), projection.weight, projection.bias,
            pos_embed=pos_embed, prefix_tokens=prefix,
        )  # fmt: skip
        return self.dropout(tokens)


class FusedDinov2Embeddings(_DinoEmbeddings, Dinov2Embeddings):
    """``Dinov2Embeddings`` as one ``fastvit.patch_embed`` call, then its dropout."""

    fastvit_patch_holder = Dinov2PatchEmbeddings


class _Dinov2WithRegistersLayoutEmbeddings(_DinoEmbeddings):
    """DINOv2 with registers (and Hugging Face's copies, ``EMBEDDING_COPIES``): class token,
    registers (no position embedding), patches."""

    def _fastvit_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        registers = self.register_tokens
        pos = self.position_embeddings  # (1, 1+N, D): the registers get none, so zeros in their slots
        pos = torch.cat((pos[:, :1], pos.new_zeros(1, registers.shape[1], pos.shape[2]), pos[:, 1:]), dim=1)
        return torch.cat((self.cls_token, registers), dim=1), pos


class FusedDinov2WithRegistersEmbeddings(_Dinov2WithRegistersLayoutEmbeddings, Dinov2WithRegistersEmbeddings):
    """``Dinov2WithRegistersEmbeddings`` as one ``fastvit.patch_embed`` call, then its dropout."""

    fastvit_patch_holder = Dinov2WithRegistersPatchEmbeddings


class _DINOv3LayoutEmbeddings(_FusedEmbeddings):
    """DINOv3's embedding (position comes from RoPE in attention), and Hugging Face's copies of it
    (``EMBEDDING_COPIES``): class token, registers, patches."""

    fastvit_bypassed = ("patch_embeddings",)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        if bool_masked_pos is not None or not self._fastvit_intact():
            return super().forward(pixel_values, bool_masked_pos)
        conv = self.patch_embeddings
        if not conv_takes(pixel_values, conv, cast=True):  # other channels: its conv's error
            return super().forward(pixel_values, bool_masked_pos)
        return fastvit.patch_embed(
            _patch_pixels(pixel_values, conv).to(dtype=conv.weight.dtype), conv.weight, conv.bias,
            prefix_tokens=torch.cat((self.cls_token, self.register_tokens), dim=1),
        )  # fmt: skip


class FusedDINOv3ViTEmbeddings(_DINOv3LayoutEmbeddings, DINOv3ViTEmbeddings):
    """``DINOv3ViTEmbeddings`` as one ``fastvit.patch_embed`` call (``_DINOv3LayoutEmbeddings``)."""


class _ViTLayoutEmbeddings(_FusedEmbeddings):
    """ViT's embedding as Hugging Face copies it (DeiT, ViT-MSN, I-JEPA): the projection, the
    family's prefix tokens (``_fastvit_prefix``), ``position_embeddings`` (1, P+N, D), then dropout,
    at the configured image size. ``bool_masked_pos``, ``interpolate_pos_encoding``, another
    size or pixels of another dtype than the conv's outside autocast (Hugging Face's errors) run
    Hugging Face's forward."""

    fastvit_bypassed = ("patch_embeddings", "patch_embeddings.projection")

    def _fastvit_prefix(self) -> torch.Tensor | None:
        return self.cls_token

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        channels = pixel_values.shape[1] == self.patch_embeddings.num_channels
        exact = (height, width) == tuple(self.image_size) and channels
        if bool_masked_pos is not None or interpolate_pos_encoding or not exact or not self._fastvit_intact():
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        projection = self.patch_embeddings.projection
        if not conv_takes(pixel_values, projection):  # another dtype outside autocast: its conv's error
            return super().forward(pixel_values, bool_masked_pos, interpolate_pos_encoding)
        tokens = fastvit.patch_embed(
            _patch_pixels(pixel_values, projection), projection.weight, projection.bias,
            pos_embed=self.position_embeddings, prefix_tokens=self._fastvit_prefix(),
        )  # fmt: skip
        return self.dropout(tokens)


class FusedDeiTEmbeddings(_ViTLayoutEmbeddings, DeiTEmbeddings):
    """``DeiTEmbeddings``: class and distillation tokens, position embedding, then dropout."""

    fastvit_patch_holder = DeiTPatchEmbeddings

    def _fastvit_prefix(self) -> torch.Tensor | None:
        return torch.cat((self.cls_token, self.distillation_token), dim=1)


class FusedViTMSNEmbeddings(_ViTLayoutEmbeddings, ViTMSNEmbeddings):
    """``ViTMSNEmbeddings`` (ViT's): class token, position embedding, then dropout."""

    fastvit_patch_holder = ViTMSNPatchEmbeddings


class FusedIJepaEmbeddings(_ViTLayoutEmbeddings, IJepaEmbeddings):
    """``IJepaEmbeddings``: ViT's without a class token, the position embedding (1, N, D) over the
    patches."""

    fastvit_patch_holder = IJepaPatchEmbeddings

    def _fastvit_prefix(self) -> torch.Tensor | None:
        return None


class FusedViTMAEEmbeddings(_FusedEmbeddings, ViTMAEEmbeddings):
    """``ViTMAEEmbeddings``: the patches plus the position embedding's patch rows as one
    ``fastvit.patch_embed`` call; then, as Hugging Face's, the random masking (``noise``) and the
    class token plus its position row prepended. ``interpolate_pos_encoding``, another size or
    pixels of another dtype than the conv's outside autocast (Hugging Face's errors) run Hugging
    Face's forward."""

    fastvit_bypassed = ("patch_embeddings", "patch_embeddings.projection")
    fastvit_patch_holder = ViTMAEPatchEmbeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        channels = pixel_values.shape[1] == self.patch_embeddings.num_channels
        exact = (height, width) == tuple(self.image_size) and channels
        if interpolate_pos_encoding or not exact or not self._fastvit_intact():
            return super().forward(pixel_values, noise, interpolate_pos_encoding)
        projection = self.patch_embeddings.projection
        if not conv_takes(pixel_values, projection):  # another dtype outside autocast: its conv's error
            return super().forward(pixel_values, noise, interpolate_pos_encoding)
        position_embeddings = self.position_embeddings  # (1, 1+N, D); its patch rows, a view, go to the op
        embeddings = fastvit.patch_embed(
            _patch_pixels(pixel_values, projection), projection.weight, projection.bias,
            pos_embed=position_embeddings[:, 1:],
        )
        embeddings, mask, ids_restore = self.random_masking(embeddings, noise)
        cls_tokens = (self.cls_token + position_embeddings[:, :1]).expand(embeddings.shape[0], -1, -1)
        return torch.cat((cls_tokens, embeddings), dim=1), mask, ids_restore


class _BeitLayoutEmbeddings(_FusedEmbeddings):
    """BEiT's embedding (and data2vec-vision's copy): the projection, the class token, the absolute
    position embedding where the config has one (``use_absolute_position_embeddings``; BEiT's
    checkpoints use the relative one), then dropout. With a position embedding, only at the trained
    grid of a square image (Hugging Face resamples it at any other, and always while tracing);
    without one, at any size (a partial patch dropped, as its conv drops it). ``bool_masked_pos``
    runs Hugging Face's forward."""

    fastvit_bypassed = ("patch_embeddings", "patch_embeddings.projection")
    fastvit_bypassed_methods = ("interpolate_pos_encoding",)  # Hugging Face calls it with a position embedding
    # whether the family's projection holder casts the pixels to the conv's dtype (data2vec-vision's,
    # InternVL's); BEiT's convolves them as given, so another dtype outside autocast runs its error
    fastvit_casts_pixels: ClassVar[bool] = False

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.BoolTensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
        projection = self.patch_embeddings.projection
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        covered = (
            bool_masked_pos is None
            and pixel_values.shape[1] == self.patch_embeddings.num_channels
            and self._fastvit_intact()
            and conv_takes(pixel_values, projection, cast=self.fastvit_casts_pixels)  # else its conv's error
        )
        pos_embed = self.position_embeddings
        if covered and pos_embed is not None:
            patch_h, patch_w = projection.stride
            grid = (height // patch_h) * (width // patch_w)
            covered = grid == pos_embed.shape[1] - 1 and height == width and not torch.jit.is_tracing()
        if not covered:
            return super().forward(pixel_values, bool_masked_pos)
        tokens = fastvit.patch_embed(
            self._fastvit_pixels(pixel_values, projection), projection.weight, projection.bias, pos_embed=pos_embed,
            prefix_tokens=self.cls_token,
        )
        return self._fastvit_output(self.dropout(tokens), pixel_values)

    def _fastvit_pixels(self, pixel_values: torch.Tensor, projection: torch.nn.Conv2d) -> torch.Tensor:
        """The pixels the projection reads, cast to its dtype where the family's holder casts them."""
        pixels = _patch_pixels(pixel_values, projection)
        return pixels.to(dtype=projection.weight.dtype) if self.fastvit_casts_pixels else pixels

    def _fastvit_output(
        self, tokens: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
        return tokens


class _InternVLLayoutEmbeddings(_BeitLayoutEmbeddings):
    """InternVL's embedding (InternViT's, and Qianfan-OCR's copy): BEiT's ``forward`` line for line
    (its masked-token blend names its weight ``w``) and BEiT's interpolation rule, with a projection
    holder of its own that casts the pixels to the conv's dtype, as the fused call does."""

    fastvit_casts_pixels = True


class FusedInternVLVisionEmbeddings(_InternVLLayoutEmbeddings, InternVLVisionEmbeddings):
    """``InternVLVisionEmbeddings`` as one ``fastvit.patch_embed`` call, then its dropout
    (``_InternVLLayoutEmbeddings``)."""

    fastvit_patch_holder = InternVLVisionPatchEmbeddings


class FusedBeitEmbeddings(_BeitLayoutEmbeddings, BeitEmbeddings):
    """``BeitEmbeddings`` as one ``fastvit.patch_embed`` call, then its dropout."""

    fastvit_patch_holder = BeitPatchEmbeddings


class FusedData2VecVisionEmbeddings(_BeitLayoutEmbeddings, Data2VecVisionEmbeddings):
    """``Data2VecVisionEmbeddings`` (BEiT's earlier layout) as one ``fastvit.patch_embed`` call, then
    its dropout; it returns the tokens with the (H, W) patch grid, as Hugging Face's."""

    fastvit_patch_holder = Data2VecVisionPatchEmbeddings
    fastvit_casts_pixels = True  # its holder casts the pixels to the conv's dtype

    def _fastvit_output(
        self, tokens: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[int, int]]:
        patch_h, patch_w = self.patch_embeddings.projection.stride
        return tokens, (pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w)


class EmbeddingCopy(NamedTuple):
    """An embedding Hugging Face copied: the class it copies (``forward`` line for line, ``__init__``
    too but for the lines the tests name, checked against the installed source), the fused forward
    it takes, and its own patch projection holder where the layout checks one
    (``_FusedEmbeddings.fastvit_patch_holder``)."""

    copies: type
    layout: type[_FusedEmbeddings]
    patch_holder: type | None = None


# {Hugging Face's copy: what it copies}; each gets a fused class ``Fused<copy>`` in this module
EMBEDDING_COPIES: dict[type, EmbeddingCopy] = {
    **{copy: EmbeddingCopy(CLIPVisionEmbeddings, _CLIPLayoutEmbeddings) for copy in (
        AltCLIPVisionEmbeddings, BridgeTowerVisionEmbeddings, ChineseCLIPVisionEmbeddings, GitVisionEmbeddings,
        Kosmos2VisionEmbeddings, MetaClip2VisionEmbeddings, XCLIPVisionEmbeddings,
    )},
    CLIPSegVisionEmbeddings: EmbeddingCopy(CLIPVisionEmbeddings, _CLIPSegLayoutEmbeddings),  # interpolating by default
    Owlv2VisionEmbeddings: EmbeddingCopy(OwlViTVisionEmbeddings, _OwlViTLayoutEmbeddings),
    GraniteDoclingVisionEmbeddings: EmbeddingCopy(SiglipVisionEmbeddings, _SiglipLayoutEmbeddings),
    Step3p7VisionEmbeddings: EmbeddingCopy(SiglipVisionEmbeddings, _SiglipLayoutEmbeddings),  # its conv without bias
    Tipsv2VisionEmbeddings: EmbeddingCopy(
        Dinov2WithRegistersEmbeddings, _Dinov2WithRegistersLayoutEmbeddings, Tipsv2VisionPatchEmbeddings
    ),
    EomtDinov3Embeddings: EmbeddingCopy(DINOv3ViTEmbeddings, _DINOv3LayoutEmbeddings),  # + num_prefix_tokens
    QianfanOCRVisionEmbeddings: EmbeddingCopy(
        InternVLVisionEmbeddings, _InternVLLayoutEmbeddings, QianfanOCRVisionPatchEmbeddings
    ),
}  # fmt: skip


class FusedOwlViTVisionEmbeddings(_OwlViTLayoutEmbeddings, OwlViTVisionEmbeddings):
    """``OwlViTVisionEmbeddings`` as one ``fastvit.patch_embed`` call (``_OwlViTLayoutEmbeddings``)."""


FUSED_EMBEDDINGS: dict[type, type[FusedModule]] = {}
for _fused in (
    FusedCLIPVisionEmbeddings, FusedSiglipVisionEmbeddings, FusedDinov2Embeddings, FusedDinov2WithRegistersEmbeddings,
    FusedDINOv3ViTEmbeddings, FusedDeiTEmbeddings, FusedViTMSNEmbeddings, FusedIJepaEmbeddings, FusedViTMAEEmbeddings,
    FusedBeitEmbeddings, FusedData2VecVisionEmbeddings, FusedInternVLVisionEmbeddings, FusedOwlViTVisionEmbeddings,
    *(declare_fused(
        copy, entry.layout, globals(),
        f"Hugging Face ``{copy.__name__}`` ({entry.copies.__name__}'s, line for line) as one ``fastvit.patch_embed`` "
        "call.",
        **({"fastvit_patch_holder": entry.patch_holder} if entry.patch_holder else {}),
    ) for copy, entry in EMBEDDING_COPIES.items()),
):  # fmt: skip
    FUSED_EMBEDDINGS[_fused.fastvit_original()] = FUSED_EMBEDDINGS[_fused] = _fused
