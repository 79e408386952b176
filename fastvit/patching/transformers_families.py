"""Hugging Face adapter, part two: the families beyond ViT. The LayerNorm+MLP half of pre-norm
encoder layers (``fastvit.nn.hf_layers``: DeiT, ViTMAE, I-JEPA, ViT-MSN, ViViT, Swin, BEiT, CLIP,
SigLIP, SigLIP2, AIMv2, Pixtral, DINOv2 (+ registers), DINOv3, the Qwen2-VL / Qwen2.5-VL / Qwen3-VL
vision blocks, Step3p7's and Llama 3.2 Vision's (Mllama: its gated global layers' gate as the layer
scale), the OCR towers' (Pix2Struct, Kosmos-2.5, Qianfan-OCR, DeepSeek-OCR 2), LFM3-VL's ...; Florence-2's
DaViT blocks' FFN halves on their channel-first maps (``fastvit.nn.hf_florence2``);
``fastvit.nn.hf_backbone_layers``: V-JEPA 2, ViTPose, Pixio, Sapiens2, RF-DETR's DINOv2, LW-DETR's
ViT, PVT, TimeSformer) and their patch embeddings
(``fastvit.nn.hf_embeddings``: CLIP, SigLIP, DINOv2 (+ registers), DINOv3, DeiT, OWL-ViT and the copies
Hugging Face made of them); and ConvNeXt's
``ConvNextLayer`` branch, ``residual=False`` (``fastvit.nn.hf_convnext``; ConvNeXt V2's layers are
reported); Swin V2's attention (``Swinv2SelfAttention``, which computes its scores itself) and
its post-norm layers' MLP alone (``fastvit.nn.hf_swinv2``); SAM's (and SAM-HQ's) image encoder attention
(decomposed relative position, its own forward: ``fastvit.nn.hf_sam``); the layers of SAM's, SAM 2's
and SAM 3's image encoders are ``hf_layers``' like the others; the layers still in ViT's 4.x layout
(``intermediate`` / ``output``: DPT, YOLOS, VideoMAE) are ``fastvit.nn.hf_intermediate_output``'s; the
other attentions computing their scores in their own forward are swapped too: ViTDet's (with the
SAM copies', ``fastvit.nn.hf_sam``), Hiera's (``fastvit.nn.hf_hiera``) and the Swin V1 copies of
Donut and MaskFormer (``fastvit.nn.hf_donut_swin``, with Donut's layer) and data2vec-vision's
(``fastvit.nn.hf_data2vec_vision``, with its layer), PVT's, GLPN's, PVTv2's, TimeSformer's and
MobileViT's, BLIP's, FLAVA's and CvT's (``fastvit.nn.hf_self_attention``; FLAVA's and CvT's
layers are ``hf_intermediate_output``'s), Swin2SR's (Swin V2's copy, ``fastvit.nn.hf_swinv2``)
and SegGPT's (SAM's design, ``fastvit.nn.hf_sam``, with its layer); and the Gemma 4 vision layers'
pre-MLP RMS norm and gated MLP (``fastvit.nn.hf_gemma4``); LeViT's attentions (their learned biases as
the op's float mask, ``fastvit.nn.hf_levit``).

A layer can be fused when its norm is an ``nn.LayerNorm`` over the last dim (or the family's RMSNorm:
AIMv2, Pixtral, Qwen2.5-VL, T5's in Pix2Struct), its MLP the family's own MLP class (plain, or gated with a
``gate_proj``: AIMv2, Pixtral, Qwen2.5-VL, DINOv2's SwiGLU FFN, DINOv3's gated MLP) of ``nn.Linear``
layers with an activation the op computes (GELU exact or tanh, quick_gelu, SiLU), and its
LayerScale, drop path and dropout the family's own modules. Other layers are reported with the
reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from transformers.models.aimv2.modeling_aimv2 import Aimv2MLP, Aimv2RMSNorm
from transformers.models.beit.modeling_beit import BeitDropPath, BeitMLP
from transformers.models.clip.modeling_clip import CLIPMLP
from transformers.models.convnext.modeling_convnext import ConvNextDropPath, ConvNextLayerNorm
from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Layer
from transformers.models.cosmos3_edge.modeling_cosmos3_edge import Cosmos3EdgeMLP
from transformers.models.data2vec.modeling_data2vec_vision import (
    Data2VecVisionDropPath,
    Data2VecVisionIntermediate,
    Data2VecVisionOutput,
)
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2VisionMLP, DeepseekOcr2VisionRMSNorm
from transformers.models.dinov2.modeling_dinov2 import (
    Dinov2DropPath,
    Dinov2LayerScale,
    Dinov2MLP,
    Dinov2SwiGLUFFN,
)
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as dinov2_registers
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    Dinov3ViTDropPath,
    DINOv3ViTGatedMLP,
    DINOv3ViTLayerScale,
    DINOv3ViTMLP,
)
from transformers.models.donut.modeling_donut_swin import DonutSwinIntermediate, DonutSwinOutput
from transformers.models.exaone4_5.modeling_exaone4_5 import Exaone4_5_RMSNorm, Exaone4_5_VisionBlock
from transformers.models.florence2.modeling_florence2 import Florence2DropPath, Florence2VisionMLP
from transformers.models.glm4v.modeling_glm4v import Glm4vRMSNorm, Glm4vVisionBlock
from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeRMSNorm, Glm4vMoeVisionBlock
from transformers.models.glm_ocr.modeling_glm_ocr import GlmOcrRMSNorm, GlmOcrVisionBlock
from transformers.models.groupvit.modeling_groupvit import GroupViTMLP
from transformers.models.hiera.modeling_hiera import HieraDropPath, HieraMlp
from transformers.models.inkling2.modeling_inkling2 import Inkling2VisionMLP
from transformers.models.internvl.modeling_internvl import InternVLVisionMLP, InternVLVisionRMSNorm
from transformers.models.janus.modeling_janus import JanusVisionMLP
from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5LayerNorm, Kosmos2_5VisionMlp
from transformers.models.lfm3_vl.modeling_lfm3_vl import Lfm3VlVisionMLP, Lfm3VlVisionRMSNorm
from transformers.models.llama4.modeling_llama4 import Llama4VisionMLP
from transformers.models.lw_detr.modeling_lw_detr import LwDetrViTMlp
from transformers.models.maskformer.modeling_maskformer_swin import MaskFormerSwinIntermediate, MaskFormerSwinOutput
from transformers.models.mgp_str.modeling_mgp_str import MgpStrDropPath, MgpstrMlp
from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLVisionMLP
from transformers.models.mlcd.modeling_mlcd import MLCDMLP
from transformers.models.mllama.modeling_mllama import MllamaVisionMLP
from transformers.models.ovis2.modeling_ovis2 import Ovis2RMSNorm, Ovis2VisionEncoderLayer
from transformers.models.pix2struct.modeling_pix2struct import Pix2StructLayerNorm, Pix2StructVisionMlp
from transformers.models.pixio.modeling_pixio import PixioDropPath, PixioMLP
from transformers.models.pixtral.modeling_pixtral import PixtralMLP, PixtralRMSNorm
from transformers.models.pvt.modeling_pvt import PvtDropPath, PvtFFN
from transformers.models.qianfan_ocr.modeling_qianfan_ocr import (
    QianfanOCRDropPath,
    QianfanOCRVisionMLP,
    QianfanOCRVisionRMSNorm,
)
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniRMSNorm, Qwen2_5OmniVisionBlock
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP, Qwen2_5_VLRMSNorm
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionMlp as Qwen2VLVisionMlp
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionMLP
from transformers.models.rf_detr.modeling_rf_detr import (
    RfDetrDinov2DropPath,
    RfDetrDinov2LayerScale,
    RfDetrDinov2MLP,
    RfDetrDinov2SwiGLUFFN,
)
from transformers.models.sam.modeling_sam import SamMLPBlock
from transformers.models.sam2.modeling_sam2 import Sam2FeedForward
from transformers.models.sam3.modeling_sam3 import Sam3MLP
from transformers.models.sam_hq.modeling_sam_hq import SamHQMLPBlock
from transformers.models.sapiens2.modeling_sapiens2 import (
    Sapiens2DropPath,
    Sapiens2GatedMLP,
    Sapiens2MLP,
    Sapiens2RMSNorm,
)
from transformers.models.seggpt.modeling_seggpt import SegGptDropPath, SegGptMlp
from transformers.models.siglip.modeling_siglip import SiglipMLP
from transformers.models.siglip2.modeling_siglip2 import Siglip2MLP
from transformers.models.step3p7.modeling_step3p7 import Step3p7VisionMLP
from transformers.models.swin.modeling_swin import SwinMLP
from transformers.models.swinv2.modeling_swinv2 import Swinv2Intermediate, Swinv2Layer, Swinv2Output
from transformers.models.timesformer.modeling_timesformer import (
    TimesformerDropPath,
    TimesformerIntermediate,
    TimesformerOutput,
)
from transformers.models.videoprism.modeling_videoprism import VideoPrismLayerNorm, VideoPrismMLP
from transformers.models.vitdet.modeling_vitdet import VitDetDropPath, VitDetMlp
from transformers.models.vitpose_backbone.modeling_vitpose_backbone import VitPoseBackboneMLP
from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2MLP, VJEPA2DropPath
from transformers.models.x_clip.modeling_x_clip import XCLIPMLP

from fastvit.nn import (
    hf_backbone_layers,
    hf_convnext,
    hf_data2vec_vision,
    hf_donut_swin,
    hf_embeddings,
    hf_florence2,
    hf_gemma4,
    hf_hiera,
    hf_intermediate_output,
    hf_layers,
    hf_levit,
    hf_sam,
    hf_self_attention,
    hf_swinv2,
)
from fastvit.nn.fused import FusedModule
from fastvit.nn.hf_vit import activation_of
from fastvit.patching.checks import (
    exact_type,
    layernorm_problems,
    linear_problems,
    missing_attributes,
    patch_conv_problems,
    unclamped_linear_problems,
)
from fastvit.patching.registry import Finding, Skip, fused_table, slot

__all__ = ["finding"]

# The plain MLP class, LayerScale class and drop-path class each family's layer may hold.
_MLPS = {
    hf_layers.FusedSwinLayer: SwinMLP,
    hf_layers.FusedBeitLayer: BeitMLP,
    hf_layers.FusedCLIPEncoderLayer: CLIPMLP,
    hf_layers.FusedAimv2EncoderLayer: Aimv2MLP,
    hf_layers.FusedPixtralAttentionLayer: PixtralMLP,
    hf_layers.FusedSiglipEncoderLayer: SiglipMLP,
    hf_layers.FusedSiglip2EncoderLayer: Siglip2MLP,
    hf_layers.FusedDinov2Layer: Dinov2MLP,
    hf_layers.FusedDinov2WithRegistersLayer: dinov2_registers.Dinov2WithRegistersMLP,
    hf_layers.FusedDINOv3ViTLayer: DINOv3ViTMLP,
    hf_layers.FusedDinov2GatedLayer: Dinov2SwiGLUFFN,
    hf_layers.FusedDinov2WithRegistersGatedLayer: dinov2_registers.Dinov2WithRegistersSwiGLUFFN,
    hf_layers.FusedDINOv3ViTGatedLayer: DINOv3ViTGatedMLP,
    hf_layers.FusedQwen2VLVisionBlock: Qwen2VLVisionMlp,
    hf_layers.FusedQwen2_5_VLVisionBlock: Qwen2_5_VLMLP,
    hf_layers.FusedQwen3VLVisionBlock: Qwen3VLVisionMLP,
    hf_layers.FusedSamVisionLayer: SamMLPBlock,
    hf_layers.FusedSamHQVisionLayer: SamHQMLPBlock,
    hf_layers.FusedSam2MultiScaleBlock: Sam2FeedForward,
    hf_layers.FusedSam3ViTLayer: Sam3MLP,
    hf_layers.FusedMLCDEncoderLayer: MLCDMLP,
    hf_layers.FusedJanusVisionEncoderLayer: JanusVisionMLP,
    hf_layers.FusedXCLIPVisionEncoderLayer: XCLIPMLP,
    hf_layers.FusedInternVLVisionLayer: InternVLVisionMLP,
    hf_layers.FusedVideoPrismLayer: VideoPrismMLP,
    hf_layers.FusedVitDetLayer: VitDetMlp,
    hf_layers.FusedHieraLayer: HieraMlp,
    hf_layers.FusedSegGptLayer: SegGptMlp,
    hf_layers.FusedMgpstrLayer: MgpstrMlp,
    hf_layers.FusedStep3p7VisionEncoderLayer: Step3p7VisionMLP,
    hf_layers.FusedMllamaVisionEncoderLayer: MllamaVisionMLP,
    hf_layers.FusedLlama4VisionEncoderLayer: Llama4VisionMLP,
    hf_layers.FusedInkling2VisionEncoderLayer: Inkling2VisionMLP,
    hf_layers.FusedQianfanOCRVisionLayer: QianfanOCRVisionMLP,
    hf_layers.FusedGroupViTCrossAttentionLayer: GroupViTMLP,
    hf_layers.FusedDeepseekOcr2VisionEncoderLayer: DeepseekOcr2VisionMLP,
    hf_layers.FusedPix2StructVisionLayer: Pix2StructVisionMlp,
    hf_layers.FusedKosmos2_5VisionLayer: Kosmos2_5VisionMlp,
    hf_layers.FusedLfm3VlVisionLayer: Lfm3VlVisionMLP,  # its forward applies F.silu (MlpHalf.activation)
    hf_florence2.FusedFlorence2VisionSpatialBlock: Florence2VisionMLP,
    hf_florence2.FusedFlorence2VisionChannelBlock: Florence2VisionMLP,
    hf_backbone_layers.FusedVJEPA2Layer: VJEPA2MLP,
    hf_backbone_layers.FusedVitPoseBackboneLayer: VitPoseBackboneMLP,
    hf_backbone_layers.FusedPixioLayer: PixioMLP,
    hf_backbone_layers.FusedSapiens2Layer: Sapiens2MLP,
    hf_backbone_layers.FusedSapiens2GatedLayer: Sapiens2GatedMLP,
    hf_backbone_layers.FusedRfDetrDinov2Layer: RfDetrDinov2MLP,
    hf_backbone_layers.FusedRfDetrDinov2GatedLayer: RfDetrDinov2SwiGLUFFN,
    hf_backbone_layers.FusedLwDetrViTLayer: LwDetrViTMlp,
    hf_backbone_layers.FusedPvtLayer: PvtFFN,
    hf_layers.FusedCosmos3EdgeVisionEncoderLayer: Cosmos3EdgeMLP,
    hf_layers.FusedMiniMaxM3VLVisionEncoderLayer: MiniMaxM3VLVisionMLP,
    **{layers[layer]: mlp  # the families made from a table
       for families, layers in ((hf_layers.VIT_LAYOUT_FAMILIES, hf_layers.VIT_LAYOUT_LAYERS),
                                (hf_layers.CLIP_LAYOUT_FAMILIES, hf_layers.CLIP_LAYOUT_LAYERS),
                                (hf_layers.BLIP_LAYOUT_FAMILIES, hf_layers.BLIP_LAYOUT_LAYERS),
                                (hf_layers.SAM_LAYOUT_FAMILIES, hf_layers.SAM_LAYOUT_LAYERS),
                                (hf_layers.PP_OCR_FAMILIES, hf_layers.PP_OCR_LAYERS),
                                (hf_layers.PACKED_ROPE_FAMILIES, hf_layers.PACKED_ROPE_LAYERS),
                                (hf_layers.QWEN2_VL_LAYOUT_FAMILIES, hf_layers.QWEN_LAYOUT_LAYERS),
                                (hf_layers.QWEN2_5_VL_LAYOUT_FAMILIES, hf_layers.QWEN_LAYOUT_LAYERS),
                                (hf_layers.QWEN3_VL_LAYOUT_FAMILIES, hf_layers.QWEN_LAYOUT_LAYERS),
                                (hf_layers.AIMV2_LAYOUT_FAMILIES, hf_layers.AIMV2_LAYOUT_LAYERS),
                                (hf_layers.PACKED_BLOCK_FAMILIES, hf_layers.PACKED_BLOCK_LAYERS))
       for layer, mlp in families.items()},
    **{fused: mlp for layer, pair in hf_layers.DINOV2_LAYOUT_LAYERS.items()
       for fused, mlp in zip(pair, hf_layers.DINOV2_LAYOUT_FAMILIES[layer][:2], strict=True)},  # plain, gated
}
_RMS_NORMS = {
    hf_layers.FusedAimv2EncoderLayer: Aimv2RMSNorm,
    hf_layers.FusedPixtralAttentionLayer: PixtralRMSNorm,
    hf_layers.FusedQwen2_5_VLVisionBlock: Qwen2_5_VLRMSNorm,
    hf_layers.FusedInternVLVisionLayer: InternVLVisionRMSNorm,  # or an nn.LayerNorm (MlpHalf.rms None)
    hf_layers.FusedQianfanOCRVisionLayer: QianfanOCRVisionRMSNorm,  # or an nn.LayerNorm (MlpHalf.rms None)
    hf_layers.FusedDeepseekOcr2VisionEncoderLayer: DeepseekOcr2VisionRMSNorm,
    hf_layers.FusedPix2StructVisionLayer: Pix2StructLayerNorm,  # T5's RMSNorm
    hf_layers.FusedKosmos2_5VisionLayer: Kosmos2_5LayerNorm,  # T5's RMSNorm
    hf_layers.FusedLfm3VlVisionLayer: Lfm3VlVisionRMSNorm,
    hf_backbone_layers.FusedSapiens2Layer: Sapiens2RMSNorm,
    hf_backbone_layers.FusedSapiens2GatedLayer: Sapiens2RMSNorm,
    **{hf_layers.QWEN_LAYOUT_LAYERS[layer]: norm for layer, norm in (  # Qwen2.5-VL's layout
        (Exaone4_5_VisionBlock, Exaone4_5_RMSNorm), (Glm4vVisionBlock, Glm4vRMSNorm),
        (Glm4vMoeVisionBlock, Glm4vMoeRMSNorm), (GlmOcrVisionBlock, GlmOcrRMSNorm),
        (Qwen2_5OmniVisionBlock, Qwen2_5OmniRMSNorm),
    )},
    hf_layers.AIMV2_LAYOUT_LAYERS[Ovis2VisionEncoderLayer]: Ovis2RMSNorm,
}  # fmt: skip
# the LayerNorm classes a family's layer may hold, where not nn.LayerNorm
_LAYER_NORMS = {hf_layers.FusedVideoPrismLayer: (VideoPrismLayerNorm,)}
_LAYER_SCALES = {
    hf_layers.FusedDinov2Layer: Dinov2LayerScale,
    hf_layers.FusedDinov2GatedLayer: Dinov2LayerScale,
    hf_layers.FusedDinov2WithRegistersLayer: dinov2_registers.Dinov2WithRegistersLayerScale,
    hf_layers.FusedDinov2WithRegistersGatedLayer: dinov2_registers.Dinov2WithRegistersLayerScale,
    hf_layers.FusedDINOv3ViTLayer: DINOv3ViTLayerScale,
    hf_layers.FusedDINOv3ViTGatedLayer: DINOv3ViTLayerScale,
    hf_backbone_layers.FusedRfDetrDinov2Layer: RfDetrDinov2LayerScale,
    hf_backbone_layers.FusedRfDetrDinov2GatedLayer: RfDetrDinov2LayerScale,
    **{fused: hf_layers.DINOV2_LAYOUT_FAMILIES[layer].layer_scale
       for layer, pair in hf_layers.DINOV2_LAYOUT_LAYERS.items() for fused in pair},
}
_DROP_PATHS = {
    hf_layers.FusedBeitLayer: BeitDropPath,
    hf_florence2.FusedFlorence2VisionSpatialBlock: Florence2DropPath,
    hf_florence2.FusedFlorence2VisionChannelBlock: Florence2DropPath,
    hf_layers.FusedVitDetLayer: VitDetDropPath,
    hf_layers.FusedQianfanOCRVisionLayer: QianfanOCRDropPath,
    hf_layers.FusedHieraLayer: HieraDropPath,
    hf_layers.FusedSegGptLayer: SegGptDropPath,
    hf_layers.FusedMgpstrLayer: MgpStrDropPath,
    hf_backbone_layers.FusedVJEPA2Layer: VJEPA2DropPath,
    hf_backbone_layers.FusedPvtLayer: PvtDropPath,
    hf_backbone_layers.FusedPixioLayer: PixioDropPath,
    hf_backbone_layers.FusedSapiens2Layer: Sapiens2DropPath,
    hf_backbone_layers.FusedSapiens2GatedLayer: Sapiens2DropPath,
    hf_backbone_layers.FusedRfDetrDinov2Layer: RfDetrDinov2DropPath,
    hf_backbone_layers.FusedRfDetrDinov2GatedLayer: RfDetrDinov2DropPath,
    hf_layers.FusedDinov2Layer: Dinov2DropPath,
    hf_layers.FusedDinov2GatedLayer: Dinov2DropPath,
    hf_layers.FusedDinov2WithRegistersLayer: dinov2_registers.Dinov2WithRegistersDropPath,
    hf_layers.FusedDinov2WithRegistersGatedLayer: dinov2_registers.Dinov2WithRegistersDropPath,
    hf_layers.FusedDINOv3ViTLayer: Dinov3ViTDropPath,
    hf_layers.FusedDINOv3ViTGatedLayer: Dinov3ViTDropPath,
    **{fused: hf_layers.DINOV2_LAYOUT_FAMILIES[layer].drop_path
       for layer, pair in hf_layers.DINOV2_LAYOUT_LAYERS.items() for fused in pair},
}


def _problems(layer: nn.Module) -> list[str]:
    fused = hf_layers.fused_layer(layer)
    parts = fused.fastvit_mlp
    present = (parts.norm, parts.mlp, parts.layer_scale, parts.drop_path, parts.dropout)
    problems = missing_attributes(layer, [name for name in present if name], "transformers")
    if problems:
        return problems
    mlp_cls = _MLPS[fused]
    problems += exact_type(getattr(layer, parts.mlp), parts.mlp, (mlp_cls,), mlp_cls.__name__)
    norm = getattr(layer, parts.norm)
    rms = parts.rms if parts.rms is not None else not isinstance(norm, nn.LayerNorm)
    if rms:
        norm_cls = _RMS_NORMS[fused]
        problems += exact_type(norm, parts.norm, (norm_cls,), norm_cls.__name__)
    else:
        problems += layernorm_problems(norm, parts.norm, _LAYER_NORMS.get(fused, (nn.LayerNorm,)))
    if parts.layer_scale:
        scale_cls = _LAYER_SCALES[fused]
        problems += exact_type(getattr(layer, parts.layer_scale), parts.layer_scale, (scale_cls,), scale_cls.__name__)
    if parts.drop_path:
        allowed = (nn.Identity, _DROP_PATHS[fused])
        problems += exact_type(getattr(layer, parts.drop_path), parts.drop_path, allowed, "its drop path")
    if parts.dropout:
        problems += exact_type(getattr(layer, parts.dropout), parts.dropout, (nn.Dropout,), "nn.Dropout")
    if fused is hf_layers.FusedSam2MultiScaleBlock and not problems:  # proj_in, activation, proj_out only
        mlp = getattr(layer, parts.mlp)
        if len(mlp.layers) or mlp.sigmoid_output:
            problems.append(f"mlp has {len(mlp.layers)} hidden layers and sigmoid_output={mlp.sigmoid_output}; the "
                            "op computes proj_out(act(proj_in(x)))")  # fmt: skip
    if parts.scale_param:  # a bare (D,) Parameter
        name = parts.scale_param
        scale, dim = getattr(layer, name, None), norm.weight.shape[0]
        plain = fused is hf_layers.FusedBeitLayer and isinstance(scale, float) and scale == 1.0  # BEiT without one
        if not (plain or (isinstance(scale, torch.Tensor) and scale.shape == (dim,))):
            problems.append(f"{name} is neither 1.0 nor a ({dim},) layer scale")
    if fused is hf_layers.FusedMllamaVisionEncoderLayer and layer.is_gated:  # a (1,) gate, its tanh the scale
        gate = getattr(layer, "gate_ffn", None)
        if not (isinstance(gate, torch.Tensor) and gate.shape == (1,)):
            problems.append("gate_ffn is not a (1,) gate")
    if fused in (hf_backbone_layers.FusedSapiens2Layer, hf_backbone_layers.FusedSapiens2GatedLayer):
        problems += exact_type(getattr(layer, "layer_scale2", None), "layer_scale2", (nn.Identity,), "nn.Identity")
    if problems:
        return problems
    mlp = getattr(layer, parts.mlp)
    linears = (parts.fc1, parts.fc2) + ((parts.gate,) if parts.gate else ())
    problems += missing_attributes(mlp, (*linears, *((parts.act,) if parts.act else ())), "transformers")
    if problems:
        return problems
    for name in linears:
        problems += exact_type(getattr(mlp, name), f"{parts.mlp}.{name}", (nn.Linear,), "nn.Linear")
    if parts.act is None:  # the MLP's forward applies parts.activation: its class, checked above, fixes it
        return problems
    act = getattr(mlp, parts.act)
    if activation_of(act) is None:
        problems.append(
            f"{parts.mlp}.{parts.act} is {type(act).__qualname__}; the fused op computes GELU (exact or tanh), "
            "quick_gelu and SiLU"
        )
    return problems


def _notes(layer: nn.Module) -> list[str]:
    parts = hf_layers.mlp_parts(layer)
    rates = []
    if parts.dropout and getattr(layer, parts.dropout).p > 0:
        rates.append(f"hidden dropout {getattr(layer, parts.dropout).p}")
    mlp_rates = [getattr(getattr(layer, parts.mlp), name).p for name in parts.mlp_dropouts]
    if any(p > 0 for p in mlp_rates):
        rates.append(f"MLP dropout {max(mlp_rates)}")
    if parts.drop_path and getattr(getattr(layer, parts.drop_path), "drop_prob", 0.0) > 0:
        rates.append(f"drop path {getattr(layer, parts.drop_path).drop_prob}")
    return [f"{' and '.join(rates)}: in training its MLP half runs Hugging Face's modules"] if rates else []


def _embedding_problems(embeddings: nn.Module) -> list[str]:
    """The projection must be a patchify Conv2d (inside ``patch_embeddings`` where the family has one)."""
    fused = hf_embeddings.FUSED_EMBEDDINGS[type(embeddings)]
    conv_path = fused.fastvit_bypassed[-1]  # "patch_embedding", "patch_embeddings" or "...projection"
    holder_cls = fused.fastvit_patch_holder
    if holder_cls is not None:  # the projection sits in the family's PatchEmbeddings module
        holder = getattr(embeddings, "patch_embeddings", None)
        problems = exact_type(holder, "patch_embeddings", (holder_cls,), holder_cls.__name__)
        if problems:
            return problems
    problems = []
    problems += patch_conv_problems(embeddings.get_submodule(conv_path), conv_path)
    if hasattr(embeddings, "position_embedding"):
        problems += exact_type(embeddings.position_embedding, "position_embedding", (nn.Embedding,), "nn.Embedding")
    return problems


_SWINV2_ATTENTIONS = fused_table(hf_swinv2.FusedSwinv2SelfAttention, *hf_swinv2.SWINV2_COPY_FUSED.values())
_SWINV2_LAYERS = fused_table(hf_swinv2.FusedSwinv2Layer, *hf_swinv2.SWINV2_LAYER_COPIES_FUSED.values())
# {original layer: (its intermediate class, its output class)}
_SWINV2_MLP_MODULES = {Swinv2Layer: (Swinv2Intermediate, Swinv2Output), **hf_swinv2.SWINV2_LAYER_COPIES}
_CONVNEXT_LAYERS = fused_table(hf_convnext.FusedConvNextLayer)
_CONVNEXT_V2 = (
    "ConvNeXt V2's layer applies a global response norm (ConvNextV2GRN: each channel scaled by its norm over "
    "the map) between the activation and pwconv2, which fastvit.layernorm_mlp does not compute: it runs "
    "Hugging Face's modules"
)


def _convnext_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a ``ConvNextLayer``'s branch: a channels-last
    ``ConvNextLayerNorm``, two Linears with an activation the op has, a (C,) layer scale or None, its
    drop path or Identity."""
    names = ("dwconv", "layernorm", "pwconv1", "act", "pwconv2", "layer_scale_parameter", "drop_path")
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    norm = layer.layernorm
    problems += layernorm_problems(norm, "layernorm", (ConvNextLayerNorm,))
    if not problems and norm.data_format != "channels_last":
        problems.append(f"layernorm's data_format is {norm.data_format!r}, not 'channels_last'")
    for name in ("pwconv1", "pwconv2"):
        problems += exact_type(getattr(layer, name), name, (nn.Linear,), "nn.Linear")
    problems += exact_type(layer.drop_path, "drop_path", (nn.Identity, ConvNextDropPath), "its drop path")
    if activation_of(layer.act) is None:
        problems.append(f"act is {type(layer.act).__qualname__}; the fused op computes GELU (exact or tanh), "
                        "quick_gelu and SiLU")  # fmt: skip
    scale, dim = layer.layer_scale_parameter, norm.normalized_shape[0]
    if scale is not None and tuple(scale.shape) != (dim,):
        problems.append(f"layer_scale_parameter has shape {tuple(scale.shape)}, not ({dim},)")
    return problems


def _swinv2_attention_problems(attn: nn.Module) -> list[str]:
    """What the fused Swin V2 attention reads: the projections, the bias MLP and its tables, the
    logit scale; Hugging Face's dropout module."""
    names = ("query", "key", "value", "dropout", "logit_scale", "continuous_position_bias_mlp", "relative_coords_table",
             "relative_position_index", "num_attention_heads", "attention_head_size", "window_size")  # fmt: skip
    problems = missing_attributes(attn, names, "transformers")
    return problems or exact_type(attn.dropout, "dropout", (nn.Dropout,), "nn.Dropout")


def _swinv2_attention_notes(attn: nn.Module) -> list[str]:
    p = attn.dropout.p
    return [f"attention dropout {p}: in training it runs Hugging Face's forward"] if p > 0 else []


def _swinv2_layer_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a Swin V2 layer's MLP (``intermediate``, ``output``):
    two Linears with an activation the op has, Hugging Face's dropout module."""
    names = ("intermediate", "output", "layernorm_before", "layernorm_after", "drop_path", "attention", "maybe_pad",
             "get_attn_mask", "window_size", "shift_size")  # fmt: skip
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    modules = _SWINV2_MLP_MODULES[_SWINV2_LAYERS[type(layer)].fastvit_original()]
    return problems + _intermediate_output_modules_problems(layer, *modules)


def _intermediate_output_modules_problems(
    layer: nn.Module, intermediate_cls: type, output_cls: type, activation: str = "intermediate_act_fn"
) -> list[str]:
    """What the op must be able to compute of a layer's ``intermediate`` (``dense``, an activation the
    op has, named ``activation``) and ``output`` (``dense``, Hugging Face's dropout module), of the
    family's classes."""
    problems = exact_type(layer.intermediate, "intermediate", (intermediate_cls,), intermediate_cls.__name__)
    problems += exact_type(layer.output, "output", (output_cls,), output_cls.__name__)
    if problems:
        return problems
    problems += linear_problems(layer, ("intermediate.dense", "output.dense"))
    problems += exact_type(layer.output.dropout, "output.dropout", (nn.Dropout,), "nn.Dropout")
    act = getattr(layer.intermediate, activation)
    if activation_of(act) is None:
        problems.append(f"intermediate.{activation} is {type(act).__qualname__}; the fused op computes GELU "
                        "(exact or tanh), quick_gelu and SiLU")  # fmt: skip
    return problems


def _swinv2_layer_notes(layer: nn.Module) -> list[str]:
    p = layer.output.dropout.p
    return [f"hidden dropout {p}: in training its MLP runs Hugging Face's modules"] if p > 0 else []


_SAM_ATTENTIONS = fused_table(hf_sam.FusedSamVisionAttention, hf_sam.FusedSamVisionSdpaAttention,
                              hf_sam.FusedSamHQVisionAttention, hf_sam.FusedSamHQVisionSdpaAttention,
                              hf_sam.FusedSegGptAttention, *hf_sam.SAM_COPY_FUSED.values())


def _sam_attention_problems(attn: nn.Module) -> list[str]:
    """What the fused SAM (ViTDet, SegGPT) attention reads: the packed ``qkv`` and ``proj`` Linears, the
    head count and scale, the relative position embeddings where used (the attribute names differ),
    the dropout where Hugging Face's forward applies one."""
    if type(attn) in _VITDET_ATTENTIONS:
        heads, uses_rel_pos, reads = "num_heads", "use_relative_position_embeddings", ()
    else:
        fused = _SAM_ATTENTIONS[type(attn)]
        heads, uses_rel_pos = "num_attention_heads", fused.rel_pos_flag
        reads = ("get_rel_pos", *(("dropout",) if fused.drops_attention else ()))
    problems = missing_attributes(attn, ("qkv", "proj", heads, "scale", uses_rel_pos, *reads), "transformers")
    if problems:
        return problems
    problems += linear_problems(attn, ("qkv", "proj"))
    if not problems and attn.qkv.out_features % (3 * getattr(attn, heads)):
        problems.append(f"qkv has {attn.qkv.out_features} outputs, not 3 x {heads} x head_dim")
    if getattr(attn, uses_rel_pos):
        problems += missing_attributes(attn, ("rel_pos_h", "rel_pos_w"), "transformers")
    return problems


def _sam_attention_notes(attn: nn.Module) -> list[str]:
    if not _SAM_ATTENTIONS[type(attn)].drops_attention or not attn.dropout:
        return []  # Hugging Face's SDPA classes apply no attention dropout
    return [f"attention dropout {attn.dropout}: in training it runs Hugging Face's forward"]


_INTERMEDIATE_OUTPUT = fused_table(*hf_intermediate_output.INTERMEDIATE_OUTPUT_LAYERS.values(),
                                   hf_intermediate_output.FusedMobileViTTransformerLayer,
                                   hf_intermediate_output.FusedFlavaLayer, hf_intermediate_output.FusedCvtLayer,
                                   hf_intermediate_output.FusedViltLayer)


def _intermediate_output_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a layer in ViT's 4.x layout: an ``nn.LayerNorm`` over the
    last dim, the family's ``intermediate`` and ``output`` of Linears, an activation the op has,
    Hugging Face's dropout module."""
    names = ("layernorm_before", "attention", "layernorm_after", "intermediate", "output")
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    fused = _INTERMEDIATE_OUTPUT[type(layer)]
    intermediate_cls, output_cls = hf_intermediate_output.INTERMEDIATE_OUTPUT_MODULES[fused.fastvit_original()]
    problems += layernorm_problems(layer.layernorm_after, "layernorm_after")
    return problems + _intermediate_output_modules_problems(layer, intermediate_cls, output_cls,
                                                            fused.fastvit_activation)  # fmt: skip


def _intermediate_output_notes(layer: nn.Module) -> list[str]:
    p = layer.output.dropout.p
    return [f"hidden dropout {p}: in training its MLP half runs Hugging Face's modules"] if p > 0 else []


_VITDET_ATTENTIONS = fused_table(hf_sam.FusedVitDetAttention)
_SWIN_COPY_ATTENTIONS = fused_table(*hf_donut_swin.SWIN_COPY_FUSED.values())
_DONUT_SWIN_LAYERS = fused_table(hf_donut_swin.FusedDonutSwinLayer, hf_donut_swin.FusedMaskFormerSwinLayer)
# {fused Swin-copy layer: (its intermediate class, its output class)}
_SWIN_COPY_MLP_MODULES = {
    hf_donut_swin.FusedDonutSwinLayer: (DonutSwinIntermediate, DonutSwinOutput),
    hf_donut_swin.FusedMaskFormerSwinLayer: (MaskFormerSwinIntermediate, MaskFormerSwinOutput),
}


def _swin_copy_attention_problems(attn: nn.Module) -> list[str]:
    """What the fused Swin-copy attention reads: the projections, the bias table and its index,
    Hugging Face's dropout module."""
    names = ("query", "key", "value", "dropout", "relative_position_bias_table", "relative_position_index",
             "num_attention_heads", "attention_head_size", "window_size")  # fmt: skip
    problems = missing_attributes(attn, names, "transformers")
    if problems:
        return problems
    problems += linear_problems(attn, ("query", "key", "value"))
    return problems + exact_type(attn.dropout, "dropout", (nn.Dropout,), "nn.Dropout")


def _donut_swin_layer_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a Donut (or MaskFormer) Swin layer's second half: an ``nn.LayerNorm``
    over the last dim, the family's ``intermediate`` and ``output`` of Linears, an activation the op
    has, Hugging Face's dropout module."""
    names = ("layernorm_before", "attention", "layernorm_after", "intermediate", "output", "drop_path")
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    problems += layernorm_problems(layer.layernorm_after, "layernorm_after")
    modules = _SWIN_COPY_MLP_MODULES[_DONUT_SWIN_LAYERS[type(layer)]]
    return problems + _intermediate_output_modules_problems(layer, *modules)


_DATA2VEC_ATTENTIONS = fused_table(hf_data2vec_vision.FusedData2VecVisionSelfAttention,
                                   hf_data2vec_vision.FusedData2VecVisionSdpaSelfAttention)
_DATA2VEC_LAYERS = fused_table(hf_data2vec_vision.FusedData2VecVisionLayer)


def _data2vec_attention_problems(attn: nn.Module) -> list[str]:
    """What the fused data2vec-vision attention reads: the projections, the head size, its bias module."""
    names = ("query", "key", "value", "attention_head_size", "has_relative_position_bias", "config")
    problems = missing_attributes(attn, names, "transformers")
    if problems:
        return problems
    problems += linear_problems(attn, ("query", "key", "value"))
    if attn.has_relative_position_bias:
        problems += missing_attributes(attn, ("relative_position_bias",), "transformers")
    return problems


def _data2vec_attention_notes(attn: nn.Module) -> list[str]:
    p = attn.config.attention_probs_dropout_prob
    return [f"attention dropout {p}: in training it runs Hugging Face's forward"] if p > 0 else []


def _data2vec_layer_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a data2vec-vision layer's second half: an ``nn.LayerNorm``,
    the family's ``intermediate`` and ``output``, a (D,) ``lambda_2`` or None, its drop path."""
    names = ("layernorm_before", "attention", "layernorm_after", "intermediate", "output", "drop_path", "lambda_2")
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    problems += layernorm_problems(layer.layernorm_after, "layernorm_after")
    problems += exact_type(layer.drop_path, "drop_path", (nn.Identity, Data2VecVisionDropPath), "its drop path")
    scale, dim = layer.lambda_2, layer.layernorm_after.normalized_shape[0]
    if scale is not None and tuple(scale.shape) != (dim,):
        problems.append(f"lambda_2 has shape {tuple(scale.shape)}, not ({dim},)")
    return problems + _intermediate_output_modules_problems(layer, Data2VecVisionIntermediate, Data2VecVisionOutput)


def _output_dropout_and_drop_path_notes(layer: nn.Module) -> list[str]:
    """The report's note on a layer whose ``output.dropout`` or ``drop_path`` falls back in training
    (data2vec-vision's, TimeSformer's)."""
    rates = [f"hidden dropout {layer.output.dropout.p}"] if layer.output.dropout.p > 0 else []
    if getattr(layer.drop_path, "drop_prob", 0.0) > 0:
        rates.append(f"drop path {layer.drop_path.drop_prob}")
    return [f"{' and '.join(rates)}: in training its MLP half runs Hugging Face's modules"] if rates else []


# {fused class: (the Linears it reads, its dropout's name)} of the own-forward self-attentions
_SELF_ATTENTIONS = {
    hf_self_attention.FusedPvtEfficientSelfAttention: (("query", "key", "value"), "dropout"),
    hf_self_attention.FusedGLPNEfficientSelfAttention: (("query", "key", "value"), "dropout"),
    hf_self_attention.FusedPvtV2SelfAttention: (("query", "key", "value", "proj"), "attn_drop"),
    hf_self_attention.FusedTimesformerSelfAttention: (("qkv",), "attn_drop"),
    hf_self_attention.FusedMobileViTSelfAttention: (("query", "key", "value"), "dropout"),
    hf_self_attention.FusedBlipAttention: (("qkv", "projection"), "dropout"),
    hf_self_attention.FusedFlavaSelfAttention: (("query", "key", "value"), "dropout"),
    hf_self_attention.FusedViltSelfAttention: (("query", "key", "value"), "dropout"),
    hf_self_attention.FusedGroupViTAttention: (("q_proj", "k_proj", "v_proj", "out_proj"), None),
    hf_self_attention.FusedCvtSelfAttention: (("projection_query", "projection_key", "projection_value"), "dropout"),
}
# what else they read, where more than their Linears and dropout
_SELF_ATTENTION_READS = {
    hf_self_attention.FusedGroupViTAttention: ("num_heads", "head_dim", "scale"),
    hf_self_attention.FusedCvtSelfAttention: ("convolution_projection_query", "convolution_projection_key",
                                              "convolution_projection_value", "with_cls_token", "scale", "num_heads",
                                              "rearrange_for_multi_head_attention"),
}
_SELF_ATTENTION_TABLE = fused_table(*_SELF_ATTENTIONS)


def _self_attention_problems(attn: nn.Module) -> list[str]:
    """What a fused own-forward self-attention reads: its Linears and Hugging Face's dropout module
    (GroupViT's, None: a float its forward passes to the functional dropout)."""
    fused = _SELF_ATTENTION_TABLE[type(attn)]
    linears, dropout = _SELF_ATTENTIONS[fused]
    names = (*linears, dropout or "dropout", *_SELF_ATTENTION_READS.get(fused, ()))
    problems = missing_attributes(attn, names, "transformers")
    if problems:
        return problems
    problems += linear_problems(attn, linears)
    if dropout is None:
        return problems
    return problems + exact_type(getattr(attn, dropout), dropout, (nn.Dropout,), "nn.Dropout")


def _self_attention_notes(attn: nn.Module) -> list[str]:
    _, dropout = _SELF_ATTENTIONS[_SELF_ATTENTION_TABLE[type(attn)]]
    p = attn.dropout if dropout is None else getattr(attn, dropout).p
    return [f"attention dropout {p}: in training it runs Hugging Face's forward"] if p > 0 else []


_HIERA_ATTENTIONS = fused_table(hf_hiera.FusedHieraMaskUnitAttention)


def _hiera_attention_problems(attn: nn.Module) -> list[str]:
    """What the fused Hiera attention reads: the ``qkv`` and ``proj`` Linears, the heads, the mask units."""
    names = ("qkv", "proj", "num_heads", "head_dim", "scale", "query_stride", "window_size", "use_mask_unit_attn",
             "hidden_size_output")  # fmt: skip
    problems = missing_attributes(attn, names, "transformers")
    if problems:
        return problems
    problems += linear_problems(attn, ("qkv", "proj"))
    if not problems and attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        problems.append(f"qkv has {attn.qkv.out_features} outputs, not 3 x num_heads x head_dim")
    return problems


_GEMMA4_LAYERS = fused_table(hf_gemma4.FusedGemma4VisionEncoderLayer)


def _gemma4_layer_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a Gemma 4 vision layer's ``pre_feedforward_layernorm``
    and ``mlp``: Gemma's RMS norm, ``Gemma4VisionMLP`` of unclamped linears with an activation the op has."""
    names = ("input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
             "post_feedforward_layernorm")  # fmt: skip
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    norm, mlp = layer.pre_feedforward_layernorm, layer.mlp
    problems += exact_type(norm, "pre_feedforward_layernorm", (hf_gemma4.Gemma4RMSNorm,), "Gemma4RMSNorm")
    problems += exact_type(mlp, "mlp", (hf_gemma4.Gemma4VisionMLP,), "Gemma4VisionMLP")
    if problems:
        return problems
    problems += unclamped_linear_problems(mlp, "mlp", hf_gemma4.Gemma4ClippableLinear, "use_clipped_linears")
    if activation_of(mlp.act_fn) is None:
        problems.append(f"mlp.act_fn is {type(mlp.act_fn).__qualname__}; the fused op computes GELU (exact or tanh), "
                        "quick_gelu and SiLU")  # fmt: skip
    return problems


_LEVIT_ATTENTIONS = fused_table(hf_levit.FusedLevitAttention, hf_levit.FusedLevitAttentionSubsample)
# {fused class: the projections it reads}
_LEVIT_PROJECTIONS = {
    hf_levit.FusedLevitAttention: ("queries_keys_values",),
    hf_levit.FusedLevitAttentionSubsample: ("keys_values", "queries", "queries_subsample", "resolution_out"),
}


def _levit_attention_problems(attn: nn.Module) -> list[str]:
    """What the fused LeViT attentions read: their projections, the bias gather, the head sizes."""
    names = (*_LEVIT_PROJECTIONS[_LEVIT_ATTENTIONS[type(attn)]], "activation", "projection", "get_attention_biases",
             "num_attention_heads", "key_dim", "attention_ratio", "scale")  # fmt: skip
    return missing_attributes(attn, names, "transformers")


_TIMESFORMER_LAYERS = fused_table(hf_backbone_layers.FusedTimesformerLayer)


def _timesformer_layer_problems(layer: nn.Module) -> list[str]:
    """What the op must be able to compute of a TimeSformer layer's second half: an ``nn.LayerNorm``,
    the family's ``intermediate`` (with its dropout) and ``output`` of Linears, an activation the op
    has, its drop path."""
    names = ("layernorm_before", "attention", "layernorm_after", "intermediate", "output", "drop_path", "config",
             "attention_type")  # fmt: skip
    problems = missing_attributes(layer, names, "transformers")
    if problems:
        return problems
    problems += layernorm_problems(layer.layernorm_after, "layernorm_after")
    problems += exact_type(layer.drop_path, "drop_path", (nn.Identity, TimesformerDropPath), "its drop path")
    problems += _intermediate_output_modules_problems(layer, TimesformerIntermediate, TimesformerOutput)
    if not problems:
        problems += exact_type(layer.intermediate.dropout, "intermediate.dropout", (nn.Dropout,), "nn.Dropout")
    return problems


# (its fused classes, the part, why an instance cannot be fused, the report's notes) of each family
# whose modules are looked up by class; the tables of hf_layers and hf_embeddings come after these
_Reasons = Callable[[nn.Module], list[str]]
_FAMILIES: tuple[tuple[dict[type, type[FusedModule]], str, _Reasons, _Reasons | None], ...] = (
    (_INTERMEDIATE_OUTPUT, "mlp", _intermediate_output_problems, _intermediate_output_notes),
    (_SAM_ATTENTIONS, "attention", _sam_attention_problems, _sam_attention_notes),
    (_SELF_ATTENTION_TABLE, "attention", _self_attention_problems, _self_attention_notes),
    (_DATA2VEC_ATTENTIONS, "attention", _data2vec_attention_problems, _data2vec_attention_notes),
    (_DATA2VEC_LAYERS, "mlp", _data2vec_layer_problems, _output_dropout_and_drop_path_notes),
    (_SWIN_COPY_ATTENTIONS, "attention", _swin_copy_attention_problems, _swinv2_attention_notes),
    (_DONUT_SWIN_LAYERS, "mlp", _donut_swin_layer_problems, _swinv2_layer_notes),
    (_HIERA_ATTENTIONS, "attention", _hiera_attention_problems, None),
    (_VITDET_ATTENTIONS, "attention", _sam_attention_problems, None),
    (_SWINV2_LAYERS, "mlp", _swinv2_layer_problems, _swinv2_layer_notes),
    (_SWINV2_ATTENTIONS, "attention", _swinv2_attention_problems, _swinv2_attention_notes),
    (_CONVNEXT_LAYERS, "mlp", _convnext_problems, None),
    (_GEMMA4_LAYERS, "mlp", _gemma4_layer_problems, None),
    (_LEVIT_ATTENTIONS, "attention", _levit_attention_problems, None),
    (_TIMESFORMER_LAYERS, "mlp", _timesformer_layer_problems, _output_dropout_and_drop_path_notes),
)


def finding(path: str, module: nn.Module) -> Finding | None:
    """The finding for ``module`` if it is one of the covered layer, attention or embedding classes
    (or their fused classes), else None."""
    for table, part, problems, notes in _FAMILIES:
        fused = table.get(type(module))
        if fused is not None:
            return slot(path, module, part, fused, problems, notes)
    if type(module) is ConvNextV2Layer:
        return Skip(path, "mlp", _CONVNEXT_V2)
    layer = hf_layers.fused_layer(module)
    if layer is not None:
        return slot(path, module, "mlp", layer, _problems, _notes)
    embeddings = hf_embeddings.FUSED_EMBEDDINGS.get(type(module))
    if embeddings is not None:
        return slot(path, module, "patch_embed", embeddings, _embedding_problems)
    return None


def fused_embedding(cls: type | None) -> bool:
    """Whether ``cls`` is an embedding class these families fuse (its original or fused class)."""
    return cls in hf_embeddings.FUSED_EMBEDDINGS
