"""Fused subclasses of Hugging Face's pre-norm encoder layers beyond ViT: the LayerNorm+MLP half
of each layer as one ``fastvit.layernorm_mlp`` call.

Covered: the layers that are ViT's line for line (``VIT_LAYOUT_FAMILIES``: DeiT, ViT-MAE, I-JEPA,
ViT-MSN, ViViT, AST), ``SwinLayer`` (ViT's layout), ``BeitLayer`` (its ``lambda_2``),
``CLIPEncoderLayer`` and the layers that are CLIP's line for line (``CLIP_LAYOUT_FAMILIES``:
Chinese-CLIP, AltCLIP, OWL-ViT, OWLv2, X-CLIP, GIT, Idefics2, Idefics3, SmolVLM, Granite-Docling,
Kosmos-2, CLIPSeg, MetaCLIP 2, Phi-4-multimodal, GroupViT, MiniCPM-V, Molmo 2, Unlimited-OCR,
HunYuan-VL, HY-V4-VL; and ``PP_OCR_FAMILIES``, PP-OCR's recognisers' SVTR blocks), the packed
towers whose layer is PaddleOCR-VL's line for line (``PACKED_ROPE_FAMILIES``: PaddleOCR-VL,
VideoLLaMA 3, Ovis2.5), Cosmos 3 Edge's and MiniMax-M3-VL's, the layers that are BLIP's line for line
(``BLIP_LAYOUT_FAMILIES``: BLIP, BLIP-2, InstructBLIP, InstructBLIP-Video), ``InternVLVisionLayer``
(``lambda_2``; LayerNorm or RMSNorm) and Qianfan-OCR's copy with drop path, the OCR towers' layers of
their own: Pix2Struct's and Kosmos-2.5's (T5's RMSNorm and gated feed-forward), DeepSeek-OCR 2's
vision encoder (a Qwen2 decoder layer: RMSNorm + SwiGLU), LFM3-VL's (conv or attention, then
RMSNorm + SwiGLU), GroupViT's ``GroupViTCrossAttentionLayer`` (before each token assignment; its
post norm Hugging Face's), ``MLCDEncoderLayer``, ``JanusVisionEncoderLayer``,
``XCLIPVisionEncoderLayer``, ``VideoPrismLayer`` (``weight + 1`` LayerNorms), ``SiglipEncoderLayer``,
``Siglip2EncoderLayer``, MGP-STR's ``MgpstrLayer``, ``Dinov2Layer``, ``Dinov2WithRegistersLayer``, the
layers that are DINOv2's line
for line (``DINOV2_LAYOUT_FAMILIES``: C-RADIO, EoMT, TIPSv2, VidEoMT) and ``DINOv3ViTLayer``
(LayerScale, drop path), ``Aimv2EncoderLayer`` and ``PixtralAttentionLayer`` (RMSNorm + SwiGLU), and
the vision blocks of the Qwen-VL towers: ``Qwen2VLVisionBlock`` (QuickGELU MLP),
``Qwen2_5_VLVisionBlock`` (RMSNorm + SwiGLU) and ``Qwen3VLVisionBlock`` (tanh-GELU MLP), on their
packed (T, D) tokens; and the image encoders' layers of SAM (``SamVisionLayer``, SAM-HQ's copy),
the SAM encoders copied into other models (``SAM_LAYOUT_FAMILIES``: DeepSeek-OCR 2, GOT-OCR 2.0,
PP-FormulaNet, SLANeXt, Unlimited-OCR), SAM 2 (``Sam2MultiScaleBlock``, Hiera) and SAM 3
(``Sam3ViTLayer``), Hugging Face's Hiera (``HieraLayer``), the ViTDet backbone's (``VitDetLayer``)
and SegGPT's (``SegGptLayer``) on their (B, H, W, C) maps.
Their attention runs as in Hugging Face (through transformers' attention interface, which
``fastvit.patch`` points at fastvit; SAM's, ViTDet's and SegGPT's own attentions are swapped by
``fastvit.nn.hf_sam``, Hiera's by ``fastvit.nn.hf_hiera``); the
attention half of each forward below is Hugging Face's,
line for line. The second half, ``x + drop_path(layer_scale * mlp(norm(x)))`` (or with hidden
dropout), is one op call; calls it does not cover (dropout or drop path active in training, a hook
or a replaced submodule) run the layer's own modules in Hugging Face's order. Importing this
module imports transformers.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
from transformers.models.aimv2.modeling_aimv2 import Aimv2EncoderLayer
from transformers.models.altclip.modeling_altclip import AltCLIPEncoderLayer, AltCLIPMLP
from transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer import ASTMLP, ASTLayer
from transformers.models.beit.modeling_beit import BeitLayer
from transformers.models.blip.modeling_blip import BlipEncoderLayer, BlipMLP
from transformers.models.blip_2.modeling_blip_2 import Blip2EncoderLayer, Blip2MLP
from transformers.models.chinese_clip.modeling_chinese_clip import ChineseCLIPVisionLayer, ChineseCLIPVisionMLP
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.clipseg.modeling_clipseg import CLIPSegEncoderLayer, CLIPSegMLP
from transformers.models.cohere_compass.modeling_cohere_compass import CohereCompassVisionBlock, CohereCompassVisionMLP
from transformers.models.cosmos3_edge.modeling_cosmos3_edge import Cosmos3EdgeVisionEncoderLayer
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2SamMLPBlock,
    DeepseekOcr2SamVisionLayer,
    DeepseekOcr2VisionEncoderLayer,
)
from transformers.models.deit.modeling_deit import DeiTLayer, DeiTMLP
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2SwiGLUFFN
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersSwiGLUFFN,
)
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTGatedMLP, DINOv3ViTLayer
from transformers.models.eomt.modeling_eomt import EomtDropPath, EomtLayer, EomtLayerScale, EomtMLP, EomtSwiGLUFFN
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeVisionBlock, Ernie4_5VLVisionMLP
from transformers.models.exaone4_5.modeling_exaone4_5 import Exaone4_5_MLP, Exaone4_5_VisionBlock
from transformers.models.git.modeling_git import GitVisionEncoderLayer, GitVisionMLP
from transformers.models.glm4v.modeling_glm4v import Glm4VisionMlp, Glm4vVisionBlock
from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeisionMlp, Glm4vMoeVisionBlock
from transformers.models.glm_image.modeling_glm_image import GlmImageVisionBlock, GlmImageVisionMLP
from transformers.models.glm_ocr.modeling_glm_ocr import GlmOcrVisionBlock, GlmOcrVisionMlp
from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2MLPBlock, GotOcr2VisionLayer
from transformers.models.granite_docling.modeling_granite_docling import (
    GraniteDoclingEncoderLayer,
    GraniteDoclingVisionMLP,
)
from transformers.models.groupvit.modeling_groupvit import (
    GroupViTCrossAttentionLayer,
    GroupViTEncoderLayer,
    GroupViTMLP,
)
from transformers.models.hiera.modeling_hiera import HieraLayer
from transformers.models.hunyuan_vl.modeling_hunyuan_vl import HunYuanVLVisionBlock, HunYuanVLVisionMLP
from transformers.models.hy_v4_vl.modeling_hy_v4_vl import HYV4VLVisionBlock, HYV4VLVisionMLP
from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer, Idefics2VisionMLP
from transformers.models.idefics3.modeling_idefics3 import Idefics3EncoderLayer, Idefics3VisionMLP
from transformers.models.ijepa.modeling_ijepa import IJepaLayer, IJepaMLP
from transformers.models.inkling2.modeling_inkling2 import Inkling2VisionEncoderLayer
from transformers.models.instructblip.modeling_instructblip import InstructBlipEncoderLayer, InstructBlipMLP
from transformers.models.instructblipvideo.modeling_instructblipvideo import (
    InstructBlipVideoEncoderLayer,
    InstructBlipVideoMLP,
)
from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
from transformers.models.janus.modeling_janus import JanusVisionEncoderLayer
from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25VisionEncoderLayer, Kimi_K25VisionMLP
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2VisionEncoderLayer, Kosmos2VisionMLP
from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5VisionLayer
from transformers.models.lfm3_vl.modeling_lfm3_vl import Lfm3VlVisionLayer
from transformers.models.llama4.modeling_llama4 import Llama4VisionEncoderLayer
from transformers.models.llava_onevision1_5.modeling_llava_onevision1_5 import (
    LlavaOnevision15VisionBlock,
    LlavaOnevision15VisionMLP,
)
from transformers.models.metaclip_2.modeling_metaclip_2 import MetaClip2EncoderLayer, MetaClip2MLP
from transformers.models.mgp_str.modeling_mgp_str import MgpstrLayer
from transformers.models.minicpm_ocr.modeling_minicpm_ocr import MiniCPMOcrVisionEncoderLayer, MiniCPMOcrVisionMLP
from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import MiniCPMV4_6VisionEncoderLayer, MiniCPMV4_6VisionMLP
from transformers.models.minicpmv4_7.modeling_minicpmv4_7 import MiniCPMV4_7VisionEncoderLayer, MiniCPMV4_7VisionMLP
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLVisionEncoderLayer
from transformers.models.mlcd.modeling_mlcd import MLCDEncoderLayer
from transformers.models.mllama.modeling_mllama import MllamaVisionEncoderLayer
from transformers.models.molmo2.modeling_molmo2 import Molmo2VisionEncoderLayer, Molmo2VisionMLP
from transformers.models.muse_glimmer.modeling_muse_glimmer import MuseGlimmerVisionEncoderLayer, MuseGlimmerVisionMLP
from transformers.models.muse_spark.modeling_muse_spark import MuseSparkVisionEncoderLayer, MuseSparkVisionMLP
from transformers.models.ovis2.modeling_ovis2 import Ovis2MLP, Ovis2VisionEncoderLayer
from transformers.models.ovis2_5.modeling_ovis2_5 import Ovis2_5VisionEncoderLayer, Ovis2_5VisionMLP
from transformers.models.owlv2.modeling_owlv2 import Owlv2EncoderLayer, Owlv2MLP
from transformers.models.owlvit.modeling_owlvit import OwlViTEncoderLayer, OwlViTMLP
from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionEncoderLayer, PaddleOCRVisionMLP
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (
    Phi4MultimodalVisionEncoderLayer,
    Phi4MultimodalVisionMLP,
)
from transformers.models.pix2struct.modeling_pix2struct import Pix2StructVisionLayer
from transformers.models.pixtral.modeling_pixtral import PixtralAttentionLayer
from transformers.models.pp_formulanet.modeling_pp_formulanet import PPFormulaNetMLPBlock, PPFormulaNetVisionLayer
from transformers.models.pp_ocrv5_mobile_rec.modeling_pp_ocrv5_mobile_rec import (
    PPOCRV5MobileRecBlock,
    PPOCRV5MobileRecMLP,
)
from transformers.models.pp_ocrv5_server_rec.modeling_pp_ocrv5_server_rec import (
    PPOCRV5ServerRecBlock,
    PPOCRV5ServerRecMLP,
)
from transformers.models.pp_ocrv6_small_rec.modeling_pp_ocrv6_small_rec import PPOCRV6SmallRecBlock, PPOCRV6SmallRecMLP
from transformers.models.qianfan_ocr.modeling_qianfan_ocr import QianfanOCRVisionLayer
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniMLP, Qwen2_5OmniVisionBlock
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionBlock
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionBlock, Qwen3_5VisionMLP
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionBlock, Qwen3_5MoeVisionMLP
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionBlock, Qwen3OmniMoeVisionMLP
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionBlock
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionBlock, Qwen3VLMoeVisionMLP
from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpVisionBlock, Qwen4ExpVisionMLP
from transformers.models.radio.modeling_radio import (
    RadioDropPath,
    RadioLayer,
    RadioLayerScale,
    RadioMLP,
    RadioSwiGLUFFN,
)
from transformers.models.sam.modeling_sam import SamVisionLayer
from transformers.models.sam2.modeling_sam2 import Sam2MultiScaleBlock
from transformers.models.sam2.modeling_sam2 import do_pool as sam2_do_pool
from transformers.models.sam2.modeling_sam2 import window_partition as sam2_window_partition
from transformers.models.sam2.modeling_sam2 import window_unpartition as sam2_window_unpartition
from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer
from transformers.models.sam3.modeling_sam3 import window_partition as sam3_window_partition
from transformers.models.sam3.modeling_sam3 import window_unpartition as sam3_window_unpartition
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionLayer
from transformers.models.seggpt.modeling_seggpt import SegGptLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.siglip2.modeling_siglip2 import Siglip2EncoderLayer
from transformers.models.slanext.modeling_slanext import SLANeXtMLPBlock, SLANeXtVisionLayer
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMEncoderLayer, SmolVLMVisionMLP
from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionEncoderLayer
from transformers.models.swin.modeling_swin import SwinLayer, window_partition, window_reverse
from transformers.models.tipsv2.modeling_tipsv2 import (
    Tipsv2VisionDropPath,
    Tipsv2VisionLayer,
    Tipsv2VisionLayerScale,
    Tipsv2VisionMLP,
    Tipsv2VisionSwiGLUFFN,
)
from transformers.models.unlimited_ocr.modeling_unlimited_ocr import (
    UnlimitedOcrEncoderLayer,
    UnlimitedOcrMLP,
    UnlimitedOcrSamMLPBlock,
    UnlimitedOcrSamVisionLayer,
)
from transformers.models.video_llama_3.modeling_video_llama_3 import VideoLlama3VisionEncoderLayer, VideoLlama3VisionMLP
from transformers.models.videomt.modeling_videomt import (
    VideomtDropPath,
    VideomtLayer,
    VideomtLayerScale,
    VideomtMLP,
    VideomtSwiGLUFFN,
)
from transformers.models.videoprism.modeling_videoprism import VideoPrismLayer
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer, ViTMAEMLP
from transformers.models.vit_msn.modeling_vit_msn import ViTMSNLayer, ViTMSNMLP
from transformers.models.vitdet.modeling_vitdet import VitDetLayer
from transformers.models.vitdet.modeling_vitdet import window_partition as vitdet_window_partition
from transformers.models.vitdet.modeling_vitdet import window_unpartition as vitdet_window_unpartition
from transformers.models.vivit.modeling_vivit import VivitLayer, VivitMLP
from transformers.models.x_clip.modeling_x_clip import XCLIPMLP, XCLIPEncoderLayer, XCLIPVisionEncoderLayer
from transformers.utils.deprecation import deprecate_kwarg

import fastvit
from fastvit.nn.fused import FusedModule, declare_fused, regularisation_fallback
from fastvit.nn.hf_vit import activation_of
from fastvit.ops._fx import method_leaf

__all__ = [
    "AIMV2_LAYOUT_FAMILIES",
    "AIMV2_LAYOUT_LAYERS",
    "BLIP_LAYOUT_FAMILIES",
    "BLIP_LAYOUT_LAYERS",
    "CLIP_LAYOUT_FAMILIES",
    "CLIP_LAYOUT_LAYERS",
    "DINOV2_LAYOUT_FAMILIES",
    "DINOV2_LAYOUT_LAYERS",
    "PACKED_BLOCK_FAMILIES",
    "PACKED_BLOCK_LAYERS",
    "PACKED_ROPE_FAMILIES",
    "PACKED_ROPE_LAYERS",
    "PP_OCR_FAMILIES",
    "PP_OCR_LAYERS",
    "QWEN2_5_VL_LAYOUT_FAMILIES",
    "QWEN2_VL_LAYOUT_FAMILIES",
    "QWEN3_VL_LAYOUT_FAMILIES",
    "QWEN_LAYOUT_LAYERS",
    "SAM_LAYOUT_FAMILIES",
    "SAM_LAYOUT_LAYERS",
    "VIT_LAYOUT_FAMILIES",
    "VIT_LAYOUT_LAYERS",
    "DINOv3LayoutForward",
    "DinoParts",
    "FusedAimv2EncoderLayer",
    "FusedBeitLayer",
    "FusedCLIPEncoderLayer",
    "FusedCosmos3EdgeVisionEncoderLayer",
    "FusedDINOv3ViTGatedLayer",
    "FusedDINOv3ViTLayer",
    "FusedDeepseekOcr2VisionEncoderLayer",
    "FusedDinov2GatedLayer",
    "FusedDinov2Layer",
    "FusedDinov2WithRegistersGatedLayer",
    "FusedDinov2WithRegistersLayer",
    "FusedGroupViTCrossAttentionLayer",
    "FusedHieraLayer",
    "FusedInkling2VisionEncoderLayer",
    "FusedInternVLVisionLayer",
    "FusedJanusVisionEncoderLayer",
    "FusedKosmos2_5VisionLayer",
    "FusedLfm3VlVisionLayer",
    "FusedLlama4VisionEncoderLayer",
    "FusedMLCDEncoderLayer",
    "FusedMgpstrLayer",
    "FusedMiniMaxM3VLVisionEncoderLayer",
    "FusedMllamaVisionEncoderLayer",
    "FusedPix2StructVisionLayer",
    "FusedPixtralAttentionLayer",
    "FusedPreNormLayer",
    "FusedQianfanOCRVisionLayer",
    "FusedQwen2VLVisionBlock",
    "FusedQwen2_5_VLVisionBlock",
    "FusedQwen3VLVisionBlock",
    "FusedSam2MultiScaleBlock",
    "FusedSam3ViTLayer",
    "FusedSamHQVisionLayer",
    "FusedSamVisionLayer",
    "FusedSegGptLayer",
    "FusedSiglip2EncoderLayer",
    "FusedSiglipEncoderLayer",
    "FusedStep3p7VisionEncoderLayer",
    "FusedSwinLayer",
    "FusedVideoPrismLayer",
    "FusedVitDetLayer",
    "FusedXCLIPVisionEncoderLayer",
    "MlpHalf",
    "register",
]


class MlpHalf:
    """Where a layer keeps the parts of its MLP half (attribute names; None: the layer has none).

    Attributes:
        norm: the norm before the MLP (``layernorm_after``, ``norm2``, ``layer_norm2``, ``ffn_norm``).
        fc1, act, fc2: the MLP's first Linear (the value projection of a gated MLP), activation and
            second Linear, inside the layer's ``mlp`` module; ``act`` None where the MLP's forward
            applies a function (``F.silu``) rather than a module: ``activation`` names it.
        mlp: the MLP module's name in the layer (``mlp``, ``ffn``, ``feed_forward``).
        gate: a gated MLP's gate projection (``gate_proj``: ``fc2(act(gate(x)) * fc1(x))``), or None.
        rms: the norm is an RMSNorm (``weight``, ``variance_epsilon``), not a LayerNorm; None: the
            norm module's class says (InternVL's ``norm_type``: an ``nn.LayerNorm`` or its RMSNorm).
        norm_offset: added to the norm's weight (VideoPrism's LayerNorm scales by ``weight + 1``).
        layer_scale: a module with a ``lambda1`` (D,) Parameter (DINOv2/v3), or None.
        scale_param: the layer's own (D,) layer-scale Parameter (``lambda_2``: BEiT, InternVL ...;
            ``gamma_2``: LW-DETR), or None. BEiT's is the float 1.0 where it has none: no scale.
        drop_path: the layer's drop path (Identity or a ``drop_prob`` module), or None.
        dropout: the hidden dropout applied to the MLP's output (ViT layout), or None.
        mlp_dropouts: the dropouts inside the MLP module (SAM 3's between fc1 and the activation,
            Janus's after the activation and after fc2).
        activation: the op's ``activation`` for an MLP whose forward calls a function (``act`` None;
            the MLP's class, checked by the patcher, fixes it), else None.
    """

    def __init__(
        self,
        norm: str,
        fc1: str = "fc1",
        act: str | None = "activation_fn",
        fc2: str = "fc2",
        *,
        mlp: str = "mlp",
        gate: str | None = None,
        rms: bool | None = False,
        norm_offset: float = 0.0,
        layer_scale: str | None = None,
        scale_param: str | None = None,
        drop_path: str | None = None,
        dropout: str | None = None,
        mlp_dropouts: tuple[str, ...] = (),
        activation: str | None = None,
    ) -> None:
        self.norm, self.fc1, self.act, self.fc2 = norm, fc1, act, fc2
        self.mlp, self.gate, self.rms, self.norm_offset = mlp, gate, rms, norm_offset
        self.layer_scale, self.scale_param, self.drop_path, self.dropout = layer_scale, scale_param, drop_path, dropout
        self.mlp_dropouts, self.activation = mlp_dropouts, activation

    def bypassed(self) -> tuple[str, ...]:
        """The submodules the fused half reads without calling (``FusedModule.fastvit_bypassed``)."""
        inner = (self.fc1, *((self.act,) if self.act else ()), self.fc2, *((self.gate,) if self.gate else ()),
                 *self.mlp_dropouts)  # fmt: skip
        names = (self.norm, self.mlp, *(f"{self.mlp}.{name}" for name in inner))
        optional = (self.layer_scale, self.drop_path, self.dropout)
        return names + tuple(name for name in optional if name is not None)


class FusedPreNormLayer(FusedModule):
    """The fused MLP half the layer classes below share; each names its parts in ``fastvit_mlp``."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_mlp: ClassVar[MlpHalf]
    # True: the op returns the branch alone (``residual=False``) and the half adds it to the residual
    # as Hugging Face does, so the sum takes the residual's memory layout (Florence-2's channel-first
    # maps seen as (B, H*W, C) tokens); False: the op adds the residual itself
    fastvit_residual_after: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        """A class naming its ``fastvit_mlp`` bypasses what that half reads (``MlpHalf.bypassed``),
        unless it lists its ``fastvit_bypassed`` itself."""
        super().__init_subclass__(**kwargs)
        if "fastvit_mlp" in cls.__dict__ and "fastvit_bypassed" not in cls.__dict__:
            cls.fastvit_bypassed = cls.fastvit_mlp.bypassed()

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        parts = self.fastvit_mlp
        out = getattr(self, parts.mlp)(getattr(self, parts.norm)(hidden_states))
        for name in (parts.layer_scale, parts.drop_path, parts.dropout):
            if name is not None:
                out = getattr(self, name)(out)
        return out + hidden_states

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        """The (D,) layer scale of the MLP branch (the layer's ``lambda_2``, a module's ``lambda1``:
        DINOv2/v3), or None (BEiT's float 1.0 included, which the patcher checks is 1.0)."""
        parts = self.fastvit_mlp
        if parts.scale_param:
            scale = getattr(self, parts.scale_param)
            return scale if isinstance(scale, torch.Tensor) else None
        return getattr(self, parts.layer_scale).lambda1 if parts.layer_scale else None

    def _fastvit_regularisers(self) -> tuple[list[nn.Module], nn.Module | None]:
        """The MLP half's dropouts and drop path (or None), which the op has not."""
        parts = self.fastvit_mlp
        dropouts = [getattr(self, parts.dropout)] if parts.dropout else []
        dropouts += [getattr(getattr(self, parts.mlp), name) for name in parts.mlp_dropouts]
        return dropouts, getattr(self, parts.drop_path) if parts.drop_path else None

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states + [drop_path/dropout](layer_scale * mlp(norm(hidden_states)))``, fused."""
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or not self._fastvit_op_covers(hidden_states):
            return self._fastvit_original_half(hidden_states)
        name = type(self).fastvit_original().__name__
        if regularisation_fallback("Hugging Face", name, *self._fastvit_regularisers()):
            return self._fastvit_original_half(hidden_states)
        parts = self.fastvit_mlp
        norm, mlp = getattr(self, parts.norm), getattr(self, parts.mlp)
        fc1, fc2 = getattr(mlp, parts.fc1), getattr(mlp, parts.fc2)
        layer_scale = self._fastvit_layer_scale()
        gate = getattr(mlp, parts.gate) if parts.gate else None
        variant = {"activation": activation_of(getattr(mlp, parts.act)) if parts.act else parts.activation}
        rms = self._fastvit_rms()
        if rms:
            variant.update(norm="rms", eps=norm.variance_epsilon)
        else:
            variant.update(eps=norm.eps)
        if gate is not None:  # fc2(act(gate(x)) * fc1(x)): fc1 is the value (up) projection
            variant.update(fc1_gate_weight=gate.weight, fc1_gate_bias=gate.bias)
        norm_weight = norm.weight + parts.norm_offset if parts.norm_offset else norm.weight
        residual_after = self.fastvit_residual_after
        out = fastvit.layernorm_mlp(
            hidden_states, norm_weight, None if rms else norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
            layer_scale=layer_scale, residual=not residual_after, **variant,
        )  # fmt: skip
        return hidden_states + out if residual_after else out

    def _fastvit_op_covers(self, hidden_states: torch.Tensor) -> bool:
        """Whether the op computes this call as the layer's own modules would (read once its modules
        are known intact); False runs Hugging Face's half. Every call, unless a family says otherwise."""
        return True

    def _fastvit_rms(self) -> bool:
        """Whether the MLP half's norm is an RMSNorm (``MlpHalf.rms``; by the module's class where None)."""
        rms = self.fastvit_mlp.rms
        return rms if rms is not None else not isinstance(getattr(self, self.fastvit_mlp.norm), nn.LayerNorm)

    def extra_repr(self) -> str:
        norm = getattr(self, self.fastvit_mlp.norm)
        eps = norm.variance_epsilon if self._fastvit_rms() else norm.eps
        return f"dim={norm.weight.shape[0]}, eps={eps}, fastvit={self.fastvit_op}"


def _line_for_line_classes(
    families: dict[type, type], base: type[FusedPreNormLayer], layout: MlpHalf, what: str
) -> dict[type, type[FusedPreNormLayer]]:
    """{original: its fused class} for a table of layers that are ``what``'s line for line: ``base``'s
    forward on each original, ``Fused<original>`` in this module (the registry needs a class per
    original; the name lets a patched model pickle)."""
    return {
        original: declare_fused(
            original, base, globals(),
            f"``{original.__name__}`` ({what}'s layer, line for line) whose LayerNorm+MLP half is one op call.",
            fastvit_mlp=layout,
        )
        for original in families
    }


_VIT_LAYOUT = MlpHalf("layernorm_after", dropout="dropout")


class _ViTLayoutForward(FusedPreNormLayer):
    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual
        return self._fastvit_mlp_half(hidden_states)


# The families whose encoder layer is ViT's 5.x layer line for line (its forward, its attribute
# names, an MLP of fc1, activation, fc2 with hidden dropout after it: checked against Hugging Face's
# source of transformers 5.25): {original layer class: its MLP class}. Each gets a fused class of
# its own (the registry needs one per original), ``Fused<original>`` in this module.
VIT_LAYOUT_FAMILIES: dict[type, type] = {
    DeiTLayer: DeiTMLP,
    ViTMAELayer: ViTMAEMLP,
    IJepaLayer: IJepaMLP,  # I-JEPA
    ViTMSNLayer: ViTMSNMLP,
    VivitLayer: VivitMLP,  # ViViT's tubelet tokens
    ASTLayer: ASTMLP,  # the Audio Spectrogram Transformer (ViT on spectrogram patches)
}
# {original layer class: its fused class}
VIT_LAYOUT_LAYERS = _line_for_line_classes(VIT_LAYOUT_FAMILIES, _ViTLayoutForward, _VIT_LAYOUT, "ViT")


class FusedSwinLayer(FusedPreNormLayer, SwinLayer):
    """``SwinLayer`` (Swin V1, pre-norm) whose LayerNorm+MLP half (with hidden dropout) is one op call;
    its window attention half is Hugging Face's, line for line (the attention itself goes through
    transformers' ``AttentionInterface``, which ``fastvit.patch`` routes to fastvit)."""

    fastvit_mlp = _VIT_LAYOUT

    def forward(
        self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, input_dimensions, always_partition, **kwargs)
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.size()
        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states = hidden_states.view(batch_size, height, width, channels)
        hidden_states, pad_values = self.maybe_pad(hidden_states, height, width)
        _, height_pad, width_pad, _ = hidden_states.shape
        hidden_states_windows = window_partition(self.cyclic_shift(hidden_states), self.window_size)
        hidden_states_windows = hidden_states_windows.view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(
            height_pad, width_pad, dtype=hidden_states.dtype, device=hidden_states_windows.device
        )
        attention_output, attn_weights = self.attention(hidden_states_windows, attn_mask, **kwargs)
        attention_output = self.dropout(attention_output)
        attention_windows = attention_output.view(-1, self.window_size, self.window_size, channels)
        attention_windows = self.cyclic_shift(
            window_reverse(attention_windows, self.window_size, height_pad, width_pad), reverse=True
        )
        if pad_values[3] > 0 or pad_values[5] > 0:
            attention_windows = attention_windows[:, :height, :width, :].contiguous()
        attention_windows = attention_windows.view(batch_size, height * width, channels)
        hidden_states = shortcut + self.drop_path(attention_windows)
        return self._fastvit_mlp_half(hidden_states), attn_weights


class FusedBeitLayer(FusedPreNormLayer, BeitLayer):
    """``BeitLayer`` (BEiT, data2vec-vision) whose LayerNorm+MLP half,
    ``h + drop_path(lambda_2 * dropout(mlp(layernorm_after(h))))``, is one op call (``lambda_2``, a
    (D,) Parameter, as the layer scale; the float 1.0 of a model without layer scale: none); its
    attention half (the relative position bias added to the mask) is Hugging Face's, line for line."""

    fastvit_mlp = MlpHalf("layernorm_after", scale_param="lambda_2", drop_path="drop_path", dropout="dropout")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        out = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return self.drop_path(self.lambda_2 * out) + hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int, int] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, interpolate_pos_encoding, resolution, **kwargs)
        if self.relative_position_bias is not None:
            height, width = resolution
            window_size = (height // self.patch_size, width // self.patch_size)
            relative_position_bias = self.relative_position_bias(
                window_size, interpolate_pos_encoding, dim_size=hidden_states.shape[1]
            )
            attention_mask = (
                relative_position_bias + attention_mask if attention_mask is not None else relative_position_bias
            )
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.lambda_1 * hidden_states
        hidden_states = self.drop_path(hidden_states) + residual
        return self._fastvit_mlp_half(hidden_states)


class _SiglipLayoutForward(FusedPreNormLayer):
    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
        return self._fastvit_mlp_half(residual + hidden_states)


_SIGLIP_LAYOUT = MlpHalf("layer_norm2")


class FusedSiglipEncoderLayer(_SiglipLayoutForward, SiglipEncoderLayer):
    """``SiglipEncoderLayer`` (vision and text towers) whose LayerNorm+MLP half is one op call."""

    fastvit_mlp = _SIGLIP_LAYOUT


class FusedSiglip2EncoderLayer(_SiglipLayoutForward, Siglip2EncoderLayer):
    """``Siglip2EncoderLayer`` whose LayerNorm+MLP half is one op call."""

    fastvit_mlp = _SIGLIP_LAYOUT


class FusedCLIPEncoderLayer(_SiglipLayoutForward, CLIPEncoderLayer):
    """``CLIPEncoderLayer`` (vision and text towers) whose LayerNorm+MLP half is one op call."""

    fastvit_mlp = _SIGLIP_LAYOUT


# The families whose encoder layer is CLIP's, line for line (its forward, its attribute names), with
# an MLP that is CLIP's fc2(act(fc1(x))) (checked against Hugging Face's source of transformers 5.25):
# {original layer class: its MLP class}. Each gets a fused class of its own (the registry needs one
# per original), made by ``_clip_layout_class``.
CLIP_LAYOUT_FAMILIES: dict[type, type] = {
    ChineseCLIPVisionLayer: ChineseCLIPVisionMLP,  # Chinese-CLIP's vision tower
    AltCLIPEncoderLayer: AltCLIPMLP,
    OwlViTEncoderLayer: OwlViTMLP,  # OWL-ViT
    Owlv2EncoderLayer: Owlv2MLP,  # OWLv2
    XCLIPEncoderLayer: XCLIPMLP,  # X-CLIP's frame encoder
    GitVisionEncoderLayer: GitVisionMLP,  # GIT's CLIP tower (its attention stays eager: see the report)
    Idefics3EncoderLayer: Idefics3VisionMLP,  # Idefics3's SigLIP tower
    SmolVLMEncoderLayer: SmolVLMVisionMLP,  # SmolVLM's SigLIP tower
    Kosmos2VisionEncoderLayer: Kosmos2VisionMLP,
    CLIPSegEncoderLayer: CLIPSegMLP,
    MetaClip2EncoderLayer: MetaClip2MLP,  # MetaCLIP 2
    Phi4MultimodalVisionEncoderLayer: Phi4MultimodalVisionMLP,  # Phi-4-multimodal's SigLIP tower
    Idefics2EncoderLayer: Idefics2VisionMLP,  # Idefics2's SigLIP tower
    GraniteDoclingEncoderLayer: GraniteDoclingVisionMLP,  # Granite-Docling's SigLIP tower
    GroupViTEncoderLayer: GroupViTMLP,  # GroupViT's encoder (its grouping blocks and attention stay its own)
    MiniCPMOcrVisionEncoderLayer: MiniCPMOcrVisionMLP,  # MiniCPM's packed SigLIP towers
    MiniCPMV4_6VisionEncoderLayer: MiniCPMV4_6VisionMLP,
    MiniCPMV4_7VisionEncoderLayer: MiniCPMV4_7VisionMLP,
    Molmo2VisionEncoderLayer: Molmo2VisionMLP,  # Molmo 2's vision tower
    UnlimitedOcrEncoderLayer: UnlimitedOcrMLP,
    HunYuanVLVisionBlock: HunYuanVLVisionMLP,  # HunYuan-VL's packed vision tower
    HYV4VLVisionBlock: HYV4VLVisionMLP,  # HY-V4-VL's
}


# {original layer class: its fused class}
CLIP_LAYOUT_LAYERS = _line_for_line_classes(CLIP_LAYOUT_FAMILIES, _SiglipLayoutForward, _SIGLIP_LAYOUT, "CLIP")


# PP-OCR's text recognisers' SVTR blocks: CLIP's forward line for line (called without a mask), an MLP
# whose activation is ``activation`` with a dropout (``drop``) after it and after fc2:
# {original block: its MLP class}
PP_OCR_FAMILIES: dict[type, type] = {
    PPOCRV5MobileRecBlock: PPOCRV5MobileRecMLP,
    PPOCRV5ServerRecBlock: PPOCRV5ServerRecMLP,
    PPOCRV6SmallRecBlock: PPOCRV6SmallRecMLP,
}
PP_OCR_LAYERS = _line_for_line_classes(
    PP_OCR_FAMILIES, _SiglipLayoutForward, MlpHalf("layer_norm2", act="activation", mlp_dropouts=("drop",)), "CLIP"
)


class _PackedRopeForward(FusedPreNormLayer):
    """PaddleOCR-VL's vision layer: CLIP's on packed (T, D) tokens, ``cu_seqlens`` and the rotary
    ``position_embeddings`` passed to the attention."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states,
            cu_seqlens=cu_seqlens,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self._fastvit_mlp_half(residual + hidden_states)


# The packed vision towers whose layer is PaddleOCR-VL's line for line, with CLIP's MLP (checked against
# Hugging Face's source of transformers 5.25): {original layer class: its MLP class}
PACKED_ROPE_FAMILIES: dict[type, type] = {
    PaddleOCRVisionEncoderLayer: PaddleOCRVisionMLP,  # PaddleOCR-VL
    VideoLlama3VisionEncoderLayer: VideoLlama3VisionMLP,  # VideoLLaMA 3
    Ovis2_5VisionEncoderLayer: Ovis2_5VisionMLP,  # Ovis2.5
}
PACKED_ROPE_LAYERS = _line_for_line_classes(PACKED_ROPE_FAMILIES, _PackedRopeForward, _SIGLIP_LAYOUT, "PaddleOCR-VL")


class _PackedBlockForward(FusedPreNormLayer):
    """LLaVA-OneVision-1.5's vision block forward (``PACKED_BLOCK_FAMILIES``): packed (T, D) tokens
    and ``cu_seqlens``, an attention returning a tensor, then the LayerNorm+MLP half fused."""

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the block's forward itself
            return super().forward(hidden_states, cu_seqlens, **kwargs)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        hidden_states = self.attn(hidden_states, cu_seqlens=cu_seqlens, **kwargs)
        return self._fastvit_mlp_half(residual + hidden_states)


# The vision blocks that are LLaVA-OneVision-1.5's line for line (forward and MLP: checked against
# transformers' source in the tests): {original block: its MLP class (fc1, activation_fn, fc2)}
PACKED_BLOCK_FAMILIES: dict[type, type] = {
    LlavaOnevision15VisionBlock: LlavaOnevision15VisionMLP,  # LLaVA-OneVision-1.5
    GlmImageVisionBlock: GlmImageVisionMLP,  # GLM-Image
}
PACKED_BLOCK_LAYERS = _line_for_line_classes(
    PACKED_BLOCK_FAMILIES, _PackedBlockForward, MlpHalf("norm2"), "LLaVA-OneVision-1.5"
)


class FusedInkling2VisionEncoderLayer(FusedPreNormLayer, Inkling2VisionEncoderLayer):
    """Inkling2's vision layer (packed tokens, rotary angles, layer scales ``lambda_1`` /
    ``lambda_2``) whose LayerNorm+MLP half, ``h + lambda_2 * mlp(layernorm_after(h))``, is one op
    call; its attention half is Hugging Face's, line for line."""

    fastvit_mlp = MlpHalf("layernorm_after", scale_param="lambda_2")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        return hidden_states + self.lambda_2 * self.mlp(self.layernorm_after(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs
        )
        return self._fastvit_mlp_half(residual + self.lambda_1 * hidden_states)


class FusedCosmos3EdgeVisionEncoderLayer(FusedPreNormLayer, Cosmos3EdgeVisionEncoderLayer):
    """Cosmos 3 Edge's vision layer (packed tokens; its attention returns a tensor) whose
    LayerNorm+MLP half is one op call."""

    fastvit_mlp = _SIGLIP_LAYOUT

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, cu_seqlens, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states = self.self_attn(
            hidden_states=hidden_states,
            cu_seqlens=cu_seqlens,
            **kwargs,
        )
        return self._fastvit_mlp_half(residual + hidden_states)


class FusedMiniMaxM3VLVisionEncoderLayer(FusedPreNormLayer, MiniMaxM3VLVisionEncoderLayer):
    """MiniMax-M3-VL's vision layer (one packed sequence; its attention takes the tokens without the
    batch dim and no mask) whose LayerNorm+MLP half is one op call."""

    fastvit_mlp = _SIGLIP_LAYOUT

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states.squeeze(0), **kwargs)
        return self._fastvit_mlp_half(residual + hidden_states)

class _BlipLayoutForward(FusedPreNormLayer):
    """BLIP's encoder layer: CLIP's with no attention mask (``forward(hidden_states, **kwargs)``)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            **kwargs,
        )
        return self._fastvit_mlp_half(hidden_states + residual)


# The vision towers' layers that are BLIP's line for line (its forward, an MLP that is CLIP's: checked
# against Hugging Face's source of transformers 5.25): {original layer class: its MLP class}. BLIP's
# attention computes its scores in its own forward (it stays Hugging Face's); BLIP-2's and the
# InstructBLIP copies' go through transformers' ``AttentionInterface``.
BLIP_LAYOUT_FAMILIES: dict[type, type] = {
    BlipEncoderLayer: BlipMLP,
    Blip2EncoderLayer: Blip2MLP,  # BLIP-2's EVA ViT-g tower
    InstructBlipEncoderLayer: InstructBlipMLP,
    InstructBlipVideoEncoderLayer: InstructBlipVideoMLP,
}
BLIP_LAYOUT_LAYERS = _line_for_line_classes(BLIP_LAYOUT_FAMILIES, _BlipLayoutForward, _SIGLIP_LAYOUT, "BLIP")


class FusedMLCDEncoderLayer(FusedPreNormLayer, MLCDEncoderLayer):
    """MLCD's ``MLCDEncoderLayer`` (CLIP's layer with the rotary position embeddings passed to its
    attention) whose LayerNorm+MLP half is one op call."""

    fastvit_mlp = _SIGLIP_LAYOUT

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **kwargs,
        )
        return self._fastvit_mlp_half(residual + hidden_states)


class FusedJanusVisionEncoderLayer(_SiglipLayoutForward, JanusVisionEncoderLayer):
    """Janus's ``JanusVisionEncoderLayer`` (CLIP's forward; its MLP drops after the activation and
    after fc2) whose LayerNorm+MLP half is one op call (those dropouts active in training run Hugging
    Face's modules)."""

    fastvit_mlp = MlpHalf("layer_norm2", mlp_dropouts=("dropout1", "dropout2"))


class FusedXCLIPVisionEncoderLayer(FusedPreNormLayer, XCLIPVisionEncoderLayer):
    """X-CLIP's frame encoder layer (``XCLIPVisionEncoderLayer``: a message token per frame, attended
    across the video's frames, joins each frame's tokens for the attention) whose LayerNorm+MLP half
    is one op call; the message and attention steps are Hugging Face's, line for line."""

    fastvit_mlp = _SIGLIP_LAYOUT

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        batch_time, seq_length, hidden_size = hidden_states.size()
        batch_size = batch_time // self.num_frames
        msg_token = self.message_fc(hidden_states[:, 0, :])
        msg_token = msg_token.view(batch_size, self.num_frames, hidden_size)
        msg_token = msg_token + self.drop_path(self.message_attn(self.message_ln(msg_token), **kwargs)[0])
        msg_token = msg_token.view(-1, 1, hidden_size)
        hidden_states = torch.cat([hidden_states, msg_token], dim=1)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return self._fastvit_mlp_half(hidden_states[:, :seq_length, :])


class FusedInternVLVisionLayer(FusedPreNormLayer, InternVLVisionLayer):
    """InternVL's ``InternVLVisionLayer`` (InternViT) whose norm+MLP half,
    ``h + lambda_2 * dropout(mlp(layernorm_after(h)))``, is one op call: ``lambda_2`` (D,) as the
    layer scale, the norm a LayerNorm or InternViT-6B's RMSNorm (``norm_type``); its attention half
    (``lambda_1``) is Hugging Face's, line for line."""

    fastvit_mlp = MlpHalf("layernorm_after", scale_param="lambda_2", rms=None, dropout="dropout")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        layer_output = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        if self.lambda_2 is not None:
            layer_output = self.lambda_2 * layer_output
        return layer_output + hidden_states

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states)
        attention_output, _ = self.attention(
            self.layernorm_before(hidden_states),
        )
        attention_output = self.lambda_1 * attention_output
        hidden_states = attention_output + hidden_states
        return self._fastvit_mlp_half(hidden_states)


class FusedStep3p7VisionEncoderLayer(FusedPreNormLayer, Step3p7VisionEncoderLayer):
    """Step3p7's vision layer (pre-norm, RoPE attention, layer scales ``lambda_1`` / ``lambda_2``)
    whose LayerNorm+MLP half, ``h + lambda_2 * mlp(layernorm_after(h))``, is one op call
    (``lambda_2``, a (D,) Parameter, as the layer scale); its attention half is Hugging Face's, line
    for line."""

    fastvit_mlp = MlpHalf("layernorm_after", scale_param="lambda_2")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        return self.lambda_2 * self.mlp(self.layernorm_after(hidden_states)) + hidden_states

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )
        hidden_states = self.lambda_1 * hidden_states + residual
        return self._fastvit_mlp_half(hidden_states)


class FusedMllamaVisionEncoderLayer(FusedPreNormLayer, MllamaVisionEncoderLayer):
    """Llama 3.2 Vision's encoder layer (Mllama: the local layers and the gated global ones) whose
    LayerNorm+MLP half, ``h + gate_ffn.tanh() * mlp(post_attention_layernorm(h))`` (no gate where
    the layer is not gated), is one op call: the gate's tanh, a (1,) Parameter's, as the layer
    scale, a (D,) view expanding it (its gradient the sum the expand gives); the attention half is
    Hugging Face's, line for line."""

    fastvit_mlp = MlpHalf("post_attention_layernorm")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        out = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.is_gated:
            out = self.gate_ffn.tanh() * out
        return hidden_states + out

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        if not self.is_gated:
            return None
        return self.gate_ffn.tanh().expand(self.post_attention_layernorm.weight.shape[0])

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        if self.is_gated:
            hidden_states = self.gate_attn.tanh() * hidden_states
        hidden_states = residual + hidden_states
        return self._fastvit_mlp_half(hidden_states)


class FusedLlama4VisionEncoderLayer(FusedPreNormLayer, Llama4VisionEncoderLayer):
    """Llama 4's vision encoder layer (Scout, Maverick) whose LayerNorm+MLP half,
    ``h + mlp(post_attention_layernorm(h))`` (fc1, GELU, fc2), is one op call; its attention half
    (complex rotary ``freqs_ci``) is Hugging Face's, line for line, and so are its outputs (a tuple,
    with the attention weights when asked for)."""

    fastvit_mlp = MlpHalf("post_attention_layernorm")

    def forward(
        self,
        hidden_state: torch.Tensor,
        freqs_ci: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_state, freqs_ci, attention_mask, output_attentions)
        residual = hidden_state
        hidden_state = self.input_layernorm(hidden_state)
        hidden_state, attn_weights = self.self_attn(hidden_state, freqs_ci=freqs_ci, attention_mask=attention_mask)
        hidden_state = self._fastvit_mlp_half(residual + hidden_state)
        return (hidden_state, attn_weights) if output_attentions else (hidden_state,)


class FusedQianfanOCRVisionLayer(FusedPreNormLayer, QianfanOCRVisionLayer):
    """Qianfan-OCR's vision layer (InternViT's, with drop path) whose norm+MLP half,
    ``h + drop_path2(lambda_2 * dropout(mlp(layernorm_after(h))))``, is one op call: ``lambda_2`` (D,)
    as the layer scale, the norm a LayerNorm or its RMSNorm (``norm_type``); its attention half is
    Hugging Face's, line for line."""

    fastvit_mlp = MlpHalf("layernorm_after", scale_param="lambda_2", rms=None, dropout="dropout",
                          drop_path="drop_path2")  # fmt: skip

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        layer_output = self.lambda_2 * self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return self.drop_path2(layer_output) + hidden_states

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, **kwargs)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, **kwargs)
        hidden_states = self.lambda_1 * hidden_states
        hidden_states = self.drop_path1(hidden_states)
        return self._fastvit_mlp_half(hidden_states + residual)


class FusedDeepseekOcr2VisionEncoderLayer(FusedPreNormLayer, DeepseekOcr2VisionEncoderLayer):
    """DeepSeek-OCR 2's vision encoder layer (a Qwen2 decoder layer over the SAM features and the
    learned queries, under a mask bidirectional over the image tokens and causal over the queries)
    whose RMSNorm+SwiGLU half, ``h + down_proj(silu(gate_proj(x)) * up_proj(x))`` with
    ``x = post_attention_layernorm(h)``, is one op call; its attention half is Hugging Face's, line
    for line."""

    fastvit_mlp = MlpHalf("post_attention_layernorm", fc1="up_proj", act="act_fn", fc2="down_proj",
                          gate="gate_proj", rms=True)  # fmt: skip

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(
                hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
            )  # fmt: skip
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self._fastvit_mlp_half(residual + hidden_states)


class FusedGroupViTCrossAttentionLayer(FusedPreNormLayer, GroupViTCrossAttentionLayer):
    """GroupViT's cross-attention layer (the group tokens attending to the image tokens before each
    token assignment), ``norm_post(x + mlp(norm2(x)))`` with ``x = query + attn(query, key)``: its
    LayerNorm+MLP half (CLIP's MLP) is one op call; its attention and post norm are Hugging Face's."""

    fastvit_mlp = MlpHalf("norm2")

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(query, key)
        x = query
        x = x + self.attn(query, encoder_hidden_states=key)[0]
        return self.norm_post(self._fastvit_mlp_half(x))


class FusedLfm3VlVisionLayer(FusedPreNormLayer, Lfm3VlVisionLayer):
    """LFM3-VL's vision layer (packed frames; a gated depthwise conv or a grouped-query attention as
    its first half, by ``layer_types``) whose RMSNorm+SwiGLU half,
    ``h + w2(silu(w1(x)) * w3(x))`` with ``x = ffn_norm(h)``, is one op call in both kinds of layer;
    its first half is Hugging Face's, line for line."""

    fastvit_mlp = MlpHalf("ffn_norm", fc1="w3", act=None, fc2="w2", mlp="feed_forward", gate="w1", rms=True,
                          activation="silu")  # fmt: skip

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                position_ids=position_ids, cache=cache, **kwargs,
            )  # fmt: skip
        residual = hidden_states
        if self.is_attention_layer:
            hidden_states, _ = self.self_attn(
                hidden_states=self.operator_norm(hidden_states),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                **kwargs,
            )
        else:
            hidden_states = self.conv(
                hidden_states=self.operator_norm(hidden_states),
                cache=cache,
                attention_mask=attention_mask,
                **kwargs,
            )
        return self._fastvit_mlp_half(hidden_states + residual)


# T5's gated feed-forward (``wo(dropout(act(wi_0(x)) * wi_1(x)))``, no biases) after T5's RMSNorm
_T5_LAYOUT = MlpHalf("pre_mlp_layer_norm", fc1="wi_1", act="act", fc2="wo", gate="wi_0", rms=True,
                     mlp_dropouts=("dropout",))  # fmt: skip


class _Pix2StructLayoutHalf(FusedPreNormLayer):
    """The MLP half of Pix2Struct's vision layer and of its copy in Kosmos-2.5: T5's RMSNorm and gated
    feed-forward. Hugging Face casts between them (the norm's output to a 16-bit norm weight's dtype,
    the product to ``wo``'s dtype: T5 keeps ``wo`` in fp32 in 16-bit models); outside autocast, a call
    whose tensors are not all of one dtype runs Hugging Face's modules, which make those casts."""

    fastvit_mlp = _T5_LAYOUT

    def _fastvit_op_covers(self, hidden_states: torch.Tensor) -> bool:
        """All of one dtype, or under autocast: the op's casts are Hugging Face's."""
        mlp = self.mlp
        weights = (self.pre_mlp_layer_norm.weight, mlp.wi_0.weight, mlp.wi_1.weight, mlp.wo.weight)
        mixed = any(weight.dtype != hidden_states.dtype for weight in weights)
        return not mixed or torch.is_autocast_enabled(hidden_states.device.type)

    def _fastvit_layer(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pix2Struct's layer, line for line, but for its MLP half: (tokens, attention weights)."""
        residual = hidden_states
        hidden_states = self.pre_attention_layer_norm(hidden_states)
        attention_output, attn_weights = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = attention_output + residual
        return self._fastvit_mlp_half(hidden_states), attn_weights


class FusedPix2StructVisionLayer(_Pix2StructLayoutHalf, Pix2StructVisionLayer):
    """Pix2Struct's vision layer (Pix2Struct, DePlot, MatCha) whose T5-style half,
    ``h + wo(act(wi_0(x)) * wi_1(x))`` with ``x = pre_mlp_layer_norm(h)`` (an RMSNorm; tanh GELU by
    default), is one op call; its attention half and its outputs (the attention weights beside the
    tokens) are Hugging Face's, line for line."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        return self._fastvit_layer(hidden_states, attention_mask, kwargs)


class FusedKosmos2_5VisionLayer(_Pix2StructLayoutHalf, Kosmos2_5VisionLayer):
    """Kosmos-2.5's vision layer (Pix2Struct's, returning the tokens alone) whose T5-style half is one
    op call; its attention half is Hugging Face's, line for line."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        return self._fastvit_layer(hidden_states, attention_mask, kwargs)[0]


class FusedVideoPrismLayer(_ViTLayoutForward, VideoPrismLayer):
    """VideoPrism's ``VideoPrismLayer`` (ViT's layer, line for line, whose LayerNorms scale by
    ``weight + 1``) whose LayerNorm+MLP half (with hidden dropout) is one op call, the norm's weight
    passed as ``weight + 1``."""

    fastvit_mlp = MlpHalf("layernorm_after", dropout="dropout", norm_offset=1.0)


_DINOV2_LAYOUT = MlpHalf("norm2", layer_scale="layer_scale2", drop_path="drop_path")
_DINOV3_LAYOUT = MlpHalf("norm2", "up_proj", "act_fn", "down_proj", layer_scale="layer_scale2", drop_path="drop_path")
# DINOv2-giant's SwiGLU FFN and DINOv3-L+'s gated MLP: fc2(act(gate_proj(x)) * up_proj(x))
_DINO_GATED_LAYOUT = MlpHalf(
    "norm2", "up_proj", "act_fn", "down_proj", gate="gate_proj", layer_scale="layer_scale2", drop_path="drop_path"
)


class _Dinov2LayoutForward(FusedPreNormLayer):
    fastvit_mlp = _DINOV2_LAYOUT

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
        hidden_states = self.layer_scale1(hidden_states)
        return self._fastvit_mlp_half(self.drop_path(hidden_states) + residual)


class FusedDinov2Layer(_Dinov2LayoutForward, Dinov2Layer):
    """``Dinov2Layer`` whose LayerNorm+MLP half with LayerScale is one op call (drop path in
    training runs Hugging Face's modules)."""


class FusedDinov2WithRegistersLayer(_Dinov2LayoutForward, Dinov2WithRegistersLayer):
    """``Dinov2WithRegistersLayer``: DINOv2's layout, as ``FusedDinov2Layer``."""


class FusedDinov2GatedLayer(_Dinov2LayoutForward, Dinov2Layer):
    """``Dinov2Layer`` with the SwiGLU FFN (``use_swiglu_ffn``: DINOv2-giant) whose LayerNorm + SwiGLU
    half with LayerScale is one gated op call."""

    fastvit_mlp = _DINO_GATED_LAYOUT


class FusedDinov2WithRegistersGatedLayer(_Dinov2LayoutForward, Dinov2WithRegistersLayer):
    """``Dinov2WithRegistersLayer`` with the SwiGLU FFN, as ``FusedDinov2GatedLayer``."""

    fastvit_mlp = _DINO_GATED_LAYOUT


class DinoParts(NamedTuple):
    """The module classes a DINOv2-layout family's layer may hold (what the patcher checks)."""

    mlp: type  # the plain MLP (fc1, activation, fc2)
    gated_mlp: type  # the SwiGLU FFN (``use_swiglu_ffn``)
    layer_scale: type
    drop_path: type


# The families whose encoder layer is DINOv2's line for line (its forward, its attribute names, its
# MLP, SwiGLU FFN, LayerScale and drop path: checked against Hugging Face's source of transformers
# 5.25): {original layer class: its parts}. Each gets two fused classes of its own (plain and gated
# MLP), made by ``_dinov2_layout_classes``.
DINOV2_LAYOUT_FAMILIES: dict[type, DinoParts] = {
    RadioLayer: DinoParts(RadioMLP, RadioSwiGLUFFN, RadioLayerScale, RadioDropPath),  # NVIDIA C-RADIO
    EomtLayer: DinoParts(EomtMLP, EomtSwiGLUFFN, EomtLayerScale, EomtDropPath),  # EoMT segmentation
    Tipsv2VisionLayer: DinoParts(Tipsv2VisionMLP, Tipsv2VisionSwiGLUFFN, Tipsv2VisionLayerScale,
                                 Tipsv2VisionDropPath),  # TIPSv2's image tower
    VideomtLayer: DinoParts(VideomtMLP, VideomtSwiGLUFFN, VideomtLayerScale, VideomtDropPath),  # VidEoMT
}


def _dinov2_layout_classes(original: type) -> tuple[type[FusedPreNormLayer], type[FusedPreNormLayer]]:
    """The fused classes (plain MLP, SwiGLU FFN) of a layer in ``DINOV2_LAYOUT_FAMILIES``:
    ``FusedDinov2Layer``'s and ``FusedDinov2GatedLayer``'s forward on ``original``, named
    ``Fused<original>`` and ``Fused<original without "Layer">GatedLayer`` in this module."""
    doc = f"``{original.__name__}`` (DINOv2's layer, line for line) whose LayerNorm+MLP half with %s is one op call."
    plain = declare_fused(original, _Dinov2LayoutForward, globals(), doc % "its LayerScale")
    gated_name = f"Fused{original.__name__.removesuffix('Layer')}GatedLayer"
    gated = declare_fused(original, _Dinov2LayoutForward, globals(), doc % "its SwiGLU FFN and LayerScale", gated_name,
                          fastvit_mlp=_DINO_GATED_LAYOUT)  # fmt: skip
    return plain, gated


# {original layer class: (its plain fused class, its gated fused class)}
DINOV2_LAYOUT_LAYERS: dict[type, tuple[type[FusedPreNormLayer], type[FusedPreNormLayer]]] = {
    original: _dinov2_layout_classes(original) for original in DINOV2_LAYOUT_FAMILIES
}


class DINOv3LayoutForward(FusedPreNormLayer):
    """The forward of the fused ``DINOv3ViTLayer`` classes (and of Sapiens2's layer, DINOv3's line for
    line: ``fastvit.nn.hf_backbone_layers``): Hugging Face's attention half with LayerScale, then the
    fused MLP half."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        hidden_states, _ = self.attention(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )
        hidden_states = self.layer_scale1(hidden_states)
        return self._fastvit_mlp_half(self.drop_path(hidden_states) + residual)


class FusedDINOv3ViTLayer(DINOv3LayoutForward, DINOv3ViTLayer):
    """``DINOv3ViTLayer`` (non-gated MLP) whose LayerNorm+MLP half with LayerScale is one op call."""

    fastvit_mlp = _DINOV3_LAYOUT


class FusedDINOv3ViTGatedLayer(DINOv3LayoutForward, DINOv3ViTLayer):
    """``DINOv3ViTLayer`` with the gated MLP (``use_gated_mlp``: DINOv3 ViT-L and larger) whose
    LayerNorm + gated MLP half with LayerScale is one gated op call."""

    fastvit_mlp = _DINO_GATED_LAYOUT


_GATED_RMS = {"fc1": "up_proj", "act": "act_fn", "fc2": "down_proj", "gate": "gate_proj", "rms": True}
_AIMV2_LAYOUT = MlpHalf("rms_norm2", mlp="ffn", **_GATED_RMS)
_PIXTRAL_LAYOUT = MlpHalf("ffn_norm", mlp="feed_forward", **_GATED_RMS)


class _Aimv2LayoutForward(FusedPreNormLayer):
    """AIMv2's layer forward (and its copies', ``AIMV2_LAYOUT_FAMILIES``): the attention half as
    Hugging Face's, then the RMSNorm + SwiGLU half fused."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        norm_hidden_states = self.rms_norm1(hidden_states)
        attn_output, _ = self.attention(hidden_states=norm_hidden_states, attention_mask=attention_mask, **kwargs)
        return self._fastvit_mlp_half(hidden_states + attn_output)


class FusedAimv2EncoderLayer(_Aimv2LayoutForward, Aimv2EncoderLayer):
    """``Aimv2EncoderLayer`` whose RMSNorm + SwiGLU half is one op call (``norm="rms"``, gated)."""

    fastvit_mlp = _AIMV2_LAYOUT


# The layers that are AIMv2's line for line (forward and MLP: checked against transformers' source in
# the tests): {original layer class: its MLP class}
AIMV2_LAYOUT_FAMILIES: dict[type, type] = {Ovis2VisionEncoderLayer: Ovis2MLP}  # Ovis2's AIMv2 tower
AIMV2_LAYOUT_LAYERS = _line_for_line_classes(AIMV2_LAYOUT_FAMILIES, _Aimv2LayoutForward, _AIMV2_LAYOUT, "AIMv2")


class FusedPixtralAttentionLayer(FusedPreNormLayer, PixtralAttentionLayer):
    """Pixtral's vision layer whose RMSNorm + SwiGLU half is one op call (``norm="rms"``, gated)."""

    fastvit_mlp = _PIXTRAL_LAYOUT

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.attention_norm(hidden_states)
        hidden_states, _ = self.attention(
            hidden_states=hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
            **kwargs,
        )  # fmt: skip
        return self._fastvit_mlp_half(residual + hidden_states)


class _QwenVisionForward(FusedPreNormLayer):
    """The Qwen-VL vision blocks' forward: the attention half as Hugging Face's (packed (T, D) tokens,
    ``cu_seqlens``), then ``hidden_states + mlp(norm2(hidden_states))`` fused."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the block's forward itself
            return super().forward(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        hidden_states = hidden_states + self.attn(
            self.norm1(hidden_states), cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs
        )
        return self._fastvit_mlp_half(hidden_states)


_QWEN2_VL_LAYOUT = MlpHalf("norm2", act="act")
_QWEN2_5_VL_LAYOUT = MlpHalf("norm2", **_GATED_RMS)
_QWEN3_VL_LAYOUT = MlpHalf("norm2", "linear_fc1", "act_fn", "linear_fc2")


class FusedQwen2VLVisionBlock(_QwenVisionForward, Qwen2VLVisionBlock):
    """Qwen2-VL's vision block whose LayerNorm + QuickGELU MLP half is one op call."""

    fastvit_mlp = _QWEN2_VL_LAYOUT


class FusedQwen2_5_VLVisionBlock(_QwenVisionForward, Qwen2_5_VLVisionBlock):
    """Qwen2.5-VL's vision block whose RMSNorm + SwiGLU half is one op call (``norm="rms"``, gated)."""

    fastvit_mlp = _QWEN2_5_VL_LAYOUT


class FusedQwen3VLVisionBlock(_QwenVisionForward, Qwen3VLVisionBlock):
    """Qwen3-VL's vision block whose LayerNorm + GELU MLP half is one op call."""

    fastvit_mlp = _QWEN3_VL_LAYOUT


# The vision blocks whose forward is the Qwen-VL blocks' line for line (packed tokens, cu_seqlens,
# rotary angles), each with the MLP of one Qwen-VL generation (forward and norm checked against
# transformers' source in the tests): {original block: its MLP class}
QWEN2_VL_LAYOUT_FAMILIES: dict[type, type] = {  # LayerNorm; fc1, act, fc2
    Ernie4_5_VLMoeVisionBlock: Ernie4_5VLVisionMLP,  # ERNIE 4.5 VL
    Kimi_K25VisionEncoderLayer: Kimi_K25VisionMLP,  # Kimi K2.5
    MuseGlimmerVisionEncoderLayer: MuseGlimmerVisionMLP,
    MuseSparkVisionEncoderLayer: MuseSparkVisionMLP,
}
QWEN2_5_VL_LAYOUT_FAMILIES: dict[type, type] = {  # RMSNorm; SwiGLU (gate_proj, up_proj, down_proj)
    Exaone4_5_VisionBlock: Exaone4_5_MLP,  # EXAONE 4.5
    Glm4vVisionBlock: Glm4VisionMlp,  # GLM-4.1V
    Glm4vMoeVisionBlock: Glm4vMoeisionMlp,  # GLM-4.5V
    GlmOcrVisionBlock: GlmOcrVisionMlp,  # GLM-OCR
    Qwen2_5OmniVisionBlock: Qwen2_5OmniMLP,  # Qwen2.5-Omni (its signature annotates the angles otherwise)
}
QWEN3_VL_LAYOUT_FAMILIES: dict[type, type] = {  # LayerNorm; linear_fc1, act_fn, linear_fc2
    Qwen3VLMoeVisionBlock: Qwen3VLMoeVisionMLP,  # Qwen3-VL MoE (30B-A3B, 235B-A22B)
    Qwen3_5VisionBlock: Qwen3_5VisionMLP,  # Qwen3.5
    Qwen3_5MoeVisionBlock: Qwen3_5MoeVisionMLP,
    Qwen3OmniMoeVisionBlock: Qwen3OmniMoeVisionMLP,  # Qwen3-Omni
    Qwen4ExpVisionBlock: Qwen4ExpVisionMLP,
    CohereCompassVisionBlock: CohereCompassVisionMLP,
}
# {original block: its fused class}
QWEN_LAYOUT_LAYERS: dict[type, type[FusedPreNormLayer]] = {
    **_line_for_line_classes(QWEN2_VL_LAYOUT_FAMILIES, _QwenVisionForward, _QWEN2_VL_LAYOUT, "Qwen2-VL"),
    **_line_for_line_classes(QWEN2_5_VL_LAYOUT_FAMILIES, _QwenVisionForward, _QWEN2_5_VL_LAYOUT, "Qwen2.5-VL"),
    **_line_for_line_classes(QWEN3_VL_LAYOUT_FAMILIES, _QwenVisionForward, _QWEN3_VL_LAYOUT, "Qwen3-VL"),
}


# SAM's image encoder (ViTDet) and SAM-HQ's copy of it: h + mlp(layer_norm2(h)), SamMLPBlock (lin1, act, lin2)
_SAM_LAYOUT = MlpHalf("layer_norm2", fc1="lin1", act="act", fc2="lin2")


class _SamLayerForward(FusedPreNormLayer):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, padding_shape = self.window_partition(hidden_states, self.window_size)
        hidden_states, _ = self.attn(
            hidden_states=hidden_states,
        )
        if self.window_size > 0:
            hidden_states = self.window_unpartition(hidden_states, self.window_size, padding_shape, (height, width))
        hidden_states = residual + hidden_states
        return self._fastvit_mlp_half(hidden_states)


class FusedSamVisionLayer(_SamLayerForward, SamVisionLayer):
    """SAM's ``SamVisionLayer`` whose LayerNorm+MLP half is one op call over its (B, H, W, C) map; its
    attention (``fastvit.nn.hf_sam``) is patched on its own."""

    fastvit_mlp = _SAM_LAYOUT


class FusedSamHQVisionLayer(_SamLayerForward, SamHQVisionLayer):
    """SAM-HQ's ``SamHQVisionLayer`` (SAM's, copied), as ``FusedSamVisionLayer``."""

    fastvit_mlp = _SAM_LAYOUT


# The layers of other models' SAM image encoders, SAM's line for line (forward, window partition and
# MLP block: checked against Hugging Face's source of transformers 5.25): {original layer: its MLP block}
SAM_LAYOUT_FAMILIES: dict[type, type] = {
    DeepseekOcr2SamVisionLayer: DeepseekOcr2SamMLPBlock,  # DeepSeek-OCR 2
    GotOcr2VisionLayer: GotOcr2MLPBlock,  # GOT-OCR 2.0
    PPFormulaNetVisionLayer: PPFormulaNetMLPBlock,  # PP-FormulaNet
    SLANeXtVisionLayer: SLANeXtMLPBlock,  # SLANeXt
    UnlimitedOcrSamVisionLayer: UnlimitedOcrSamMLPBlock,
}
SAM_LAYOUT_LAYERS = _line_for_line_classes(SAM_LAYOUT_FAMILIES, _SamLayerForward, _SAM_LAYOUT, "SAM")


# SAM 2's Hiera block: h + mlp(layer_norm2(h)), Sam2FeedForward with two layers (proj_in, activation, proj_out)
_SAM2_LAYOUT = MlpHalf("layer_norm2", fc1="proj_in", act="activation", fc2="proj_out")


class FusedSam2MultiScaleBlock(FusedPreNormLayer, Sam2MultiScaleBlock):
    """SAM 2's ``Sam2MultiScaleBlock`` (its Hiera image encoder) whose LayerNorm+MLP half is one op call
    over the (B, H, W, C) map; its first half (the pooled projection of a stage's first block, the
    window partition, the attention with query pooling, the unpartition) is Hugging Face's, line
    for line (the attention goes through transformers' ``AttentionInterface``)."""

    fastvit_mlp = _SAM2_LAYOUT
    fastvit_bypassed = (*_SAM2_LAYOUT.bypassed(), "mlp.layers")

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the block's forward itself
            return super().forward(hidden_states, **kwargs)
        residual = hidden_states  # batch_size, height, width, channel
        hidden_states = self.layer_norm1(hidden_states)
        if self.dim != self.dim_out:
            residual = sam2_do_pool(self.proj(hidden_states), self.query_stride)
        window_size = self.window_size
        if self.window_size > 0:
            H, W = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, pad_hw = sam2_window_partition(hidden_states, window_size)
        attn_output = self.attn(
            hidden_states=hidden_states,
            **kwargs,
        )
        hidden_states = attn_output
        if self.query_stride:
            window_size = self.window_size // self.query_stride[0]
            H, W = residual.shape[1:3]
            pad_h = (-H) % window_size
            pad_w = (-W) % window_size
            pad_hw = (H + pad_h, W + pad_w)
        if self.window_size > 0:
            hidden_states = sam2_window_unpartition(hidden_states, window_size, pad_hw, (H, W))
        hidden_states = residual + hidden_states
        return self._fastvit_mlp_half(hidden_states)


# SAM 3's ViT layer: residual + dropout(mlp(layer_norm2(h))), Sam3MLP (fc1, dropout, activation_fn, fc2)
_SAM3_LAYOUT = MlpHalf("layer_norm2", dropout="dropout", mlp_dropouts=("dropout",))


class FusedSam3ViTLayer(FusedPreNormLayer, Sam3ViTLayer):
    """SAM 3's ``Sam3ViTLayer`` (its image encoder, RoPE and windows) whose LayerNorm+MLP half (with
    hidden dropout, and its MLP's dropout after fc1) is one op call over the (B, H, W, C) map; its
    attention half is Hugging Face's, line for line (the attention goes through transformers'
    ``AttentionInterface``)."""

    fastvit_mlp = _SAM3_LAYOUT

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, **kwargs)
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, pad_height_width = sam3_window_partition(hidden_states, self.window_size)
        position_embeddings = self.rotary_emb(hidden_states, self.position_ids)
        hidden_states, _ = self.attention(hidden_states, position_embeddings, **kwargs)
        if self.window_size > 0:
            hidden_states = sam3_window_unpartition(hidden_states, self.window_size, pad_height_width, (height, width))
        hidden_states = residual + hidden_states
        return self._fastvit_mlp_half(hidden_states)


# ViTDet's layer (VitDetMlp: fc1, act, drop, fc2, drop): h + drop_path(mlp(norm2(h))) on the (B, H, W, C) map
_VITDET_LAYOUT = MlpHalf("norm2", act="act", drop_path="drop_path", mlp_dropouts=("drop",))


class FusedVitDetLayer(FusedPreNormLayer, VitDetLayer):
    """The ViTDet backbone's ``VitDetLayer`` whose LayerNorm+MLP half (with drop path) is one op call
    over its (B, H, W, C) map; the rest (the NCHW permutes, the window partition, the attention,
    the optional residual bottleneck block) is Hugging Face's, line for line. Its attention
    (``fastvit.nn.hf_sam.FusedVitDetAttention``) is patched on its own."""

    fastvit_mlp = _VITDET_LAYOUT

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, output_attentions)
        hidden_states = hidden_states.permute(0, 2, 3, 1)
        shortcut = hidden_states
        hidden_states = self.norm1(hidden_states)
        if self.window_size > 0:
            height, width = hidden_states.shape[1], hidden_states.shape[2]
            hidden_states, pad_height_width = vitdet_window_partition(hidden_states, self.window_size)
        self_attention_outputs = self.attention(
            hidden_states,
            output_attentions=output_attentions,
        )
        hidden_states = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        if self.window_size > 0:
            hidden_states = vitdet_window_unpartition(
                hidden_states, self.window_size, pad_height_width, (height, width)
            )
        hidden_states = shortcut + self.drop_path(hidden_states)
        hidden_states = self._fastvit_mlp_half(hidden_states)
        hidden_states = hidden_states.permute(0, 3, 1, 2)
        if self.use_residual_block:
            hidden_states = self.residual(hidden_states)
        return (hidden_states, *outputs)


class FusedMgpstrLayer(FusedPreNormLayer, MgpstrLayer):
    """MGP-STR's ``MgpstrLayer`` (scene-text recognition: a ViT over the word image) whose LayerNorm+MLP
    half (with drop path) is one op call; its attention half is Hugging Face's, line for line (its
    ``MgpstrAttention`` returns the probabilities the encoder collects whenever asked for them, so it
    stays Hugging Face's: ``fastvit.patch`` reports it)."""

    fastvit_mlp = MlpHalf("norm2", act="act", drop_path="drop_path", mlp_dropouts=("drop",))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states)
        self_attention_outputs = self.attn(self.norm1(hidden_states))
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1]
        hidden_states = self.drop_path(attention_output) + hidden_states
        return (self._fastvit_mlp_half(hidden_states), outputs)


class FusedSegGptLayer(FusedPreNormLayer, SegGptLayer):
    """SegGPT's ``SegGptLayer`` (a ViT-L over the (B, H, W, C) map of the input and prompt images)
    whose LayerNorm+MLP half (with drop path) is one op call; the rest (the attention, the feature
    ensemble over the prompts) is Hugging Face's, line for line. Its attention
    (``fastvit.nn.hf_sam.FusedSegGptAttention``) is patched on its own."""

    fastvit_mlp = MlpHalf("layernorm_after", fc1="lin1", act="act", fc2="lin2", drop_path="drop_path")

    def forward(
        self,
        hidden_states: torch.Tensor,
        ensemble_cond: int,
        feature_ensemble: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, ensemble_cond, feature_ensemble, output_attentions)
        self_attention_outputs = self.attention(
            self.layernorm_before(hidden_states),
            output_attentions=output_attentions,
        )
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        if feature_ensemble and attention_output.shape[0] // 2 >= ensemble_cond:
            prompt, inputs = attention_output.split(attention_output.shape[1] // 2, dim=1)
            if ensemble_cond == 2:
                num_prompts = attention_output.shape[0] // 2
                inputs = inputs.reshape(2, num_prompts, -1)
                inputs = inputs.mean(dim=1, keepdim=True).expand_as(inputs)
                inputs = inputs.reshape(*prompt.shape)
            else:
                inputs = inputs.mean(dim=0, keepdim=True).expand_as(inputs)
            attention_output = torch.cat([prompt, inputs], dim=1)
        hidden_states = self.drop_path(attention_output) + hidden_states
        hidden_states = self._fastvit_mlp_half(hidden_states)
        return (hidden_states, *outputs)


class FusedHieraLayer(FusedPreNormLayer, HieraLayer):
    """Hugging Face's Hiera ``HieraLayer`` whose LayerNorm+MLP half (with drop path) is one op call;
    its first half (a stage's widening projection with its pooled residual, the attention) is Hugging
    Face's, line for line. Its attention (``fastvit.nn.hf_hiera.FusedHieraMaskUnitAttention``) is
    patched on its own."""

    fastvit_mlp = MlpHalf("layernorm_after", drop_path="drop_path")

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, output_attentions)
        batch_size = hidden_states.shape[0]
        hidden_states_norm = self.layernorm_before(hidden_states)
        if self.hidden_size != self.hidden_size_output:
            hidden_states = self.proj(hidden_states_norm)
            hidden_states = (
                hidden_states.view(batch_size, self.query_stride, -1, self.hidden_size_output).max(dim=1).values
            )
        (hidden_states_norm, attn_weights) = self.attn(hidden_states_norm, output_attentions=output_attentions)
        hidden_states = hidden_states + self.drop_path(hidden_states_norm)
        return (self._fastvit_mlp_half(hidden_states), attn_weights)


def fused_layer(module: nn.Module) -> type[FusedPreNormLayer] | None:
    """The fused class for ``module`` (a covered layer, or one already fused): by its MLP's kind
    where the family has a plain and a gated one (DINOv2, DINOv3), so a layer fused earlier whose MLP
    was replaced by the other kind is fused anew as the other class; None for another class."""
    fused = FUSED_LAYERS.get(type(module))
    if fused is None:
        return None
    original = fused.fastvit_original()
    gated = GATED_LAYERS.get(original)
    if gated is not None and type(getattr(module, "mlp", None)) in _GATED_MLPS:
        return gated
    return FUSED_LAYERS[original]  # a layer fused as gated whose MLP became a plain one: the plain class


def mlp_parts(module: nn.Module) -> MlpHalf:
    """The ``MlpHalf`` of a fused layer or of an instance of a covered original."""
    return fused_layer(module).fastvit_mlp


# the gated MLP classes of the families with two kinds (their layer's ``mlp``)
_GATED_MLPS: set[type] = set()
# {original layer or fused class: the fused class} (the plain MLP's, where there are two)
FUSED_LAYERS: dict[type, type[FusedPreNormLayer]] = {}
# {original layer: its fused class for the gated MLP}
GATED_LAYERS: dict[type, type[FusedPreNormLayer]] = {}


def register(
    plain: type[FusedPreNormLayer], gated: type[FusedPreNormLayer] | None = None, gated_mlp: type | None = None
) -> None:
    """Enter a family's fused classes in the tables ``fused_layer`` reads, under their original layer
    class and under themselves: its plain MLP's, and where it has both kinds its gated MLP's with the
    class of that gated MLP (the layer's ``mlp``). ``fastvit.nn.hf_backbone_layers`` enters its own."""
    original = plain.fastvit_original()
    FUSED_LAYERS[original] = FUSED_LAYERS[plain] = plain
    if gated is not None:
        GATED_LAYERS[original] = FUSED_LAYERS[gated] = gated
        _GATED_MLPS.add(gated_mlp)


for _plain, _gated, _gated_mlp in (
    (FusedDinov2Layer, FusedDinov2GatedLayer, Dinov2SwiGLUFFN),
    (FusedDinov2WithRegistersLayer, FusedDinov2WithRegistersGatedLayer, Dinov2WithRegistersSwiGLUFFN),
    (FusedDINOv3ViTLayer, FusedDINOv3ViTGatedLayer, DINOv3ViTGatedMLP),
    *((*DINOV2_LAYOUT_LAYERS[layer], parts.gated_mlp) for layer, parts in DINOV2_LAYOUT_FAMILIES.items()),
):
    register(_plain, _gated, _gated_mlp)
for _fused in (
    FusedCLIPEncoderLayer, FusedSiglipEncoderLayer, FusedSiglip2EncoderLayer, FusedAimv2EncoderLayer,
    FusedPixtralAttentionLayer, FusedQwen2VLVisionBlock, FusedQwen2_5_VLVisionBlock, FusedQwen3VLVisionBlock,
    FusedSwinLayer, FusedBeitLayer, FusedSamVisionLayer, FusedSamHQVisionLayer, FusedSam2MultiScaleBlock,
    FusedSam3ViTLayer, FusedMLCDEncoderLayer, FusedJanusVisionEncoderLayer, FusedXCLIPVisionEncoderLayer,
    FusedInternVLVisionLayer, FusedVideoPrismLayer, FusedVitDetLayer, *VIT_LAYOUT_LAYERS.values(),
    FusedCosmos3EdgeVisionEncoderLayer, FusedMiniMaxM3VLVisionEncoderLayer, FusedHieraLayer, FusedSegGptLayer,
    FusedMgpstrLayer, FusedStep3p7VisionEncoderLayer, FusedMllamaVisionEncoderLayer, FusedLlama4VisionEncoderLayer,
    *CLIP_LAYOUT_LAYERS.values(),
    *BLIP_LAYOUT_LAYERS.values(), *SAM_LAYOUT_LAYERS.values(), *PP_OCR_LAYERS.values(), *PACKED_ROPE_LAYERS.values(),
    *QWEN_LAYOUT_LAYERS.values(), *AIMV2_LAYOUT_LAYERS.values(), *PACKED_BLOCK_LAYERS.values(),
    FusedInkling2VisionEncoderLayer, FusedQianfanOCRVisionLayer, FusedDeepseekOcr2VisionEncoderLayer,
    FusedPix2StructVisionLayer, FusedKosmos2_5VisionLayer, FusedLfm3VlVisionLayer, FusedGroupViTCrossAttentionLayer,
):  # fmt: skip
    register(_fused)
