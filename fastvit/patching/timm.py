"""timm adapter: ``Attention`` anywhere, the pre-norm ``Block``'s LayerNorm+MLP half, and the
``VisionTransformer`` / ``VisionTransformerDistilled`` embedding (and the embeddings of BEiT,
``VisionTransformerRelPos``, CaiT, ConViT, SAM and the Qwen3-VL / DeepSeek towers:
``timm_embeddings``).

That covers vit_* (register tokens, ``qk_norm``, ``no_embed_class``, ``class_token=False``,
``dynamic_img_size``), deit_* (distilled too), deit3_* (LayerScale) and the other timm models built from
the same blocks. The attention of the relative-position-bias families (BEiT / BEiTv2,
``VisionTransformerRelPos``, TinyViT, LeViT: ``fastvit.nn.timm_relpos``), of Swin V1 / V2
(``WindowAttention``, and V2-CR's ``WindowMultiHeadAttention``: ``timm_swin``), of SAM / ViTDet
(windowed and global: ``timm_sam``) and of Hiera (mask-unit and global: ``timm_hiera``), of Eva (EVA02,
RoPE ViTs, timm's DINOv3: ``timm_eva``, RoPE as timm computes it; and timm's ``AttentionRope`` of
vit_pe_*, NaFlexVit's RoPE and the Qwen3-VL / DeepSeek towers: ``timm_rope``), of SAM 2's HieraDet
(windowed and global, q pooling: ``timm_hieradet``), of the Gemma 4 tower (its 2-D RoPE and padding
mask: ``timm_gemma4``), of MaxViT / CoAtNet (``AttentionCl``, ``Attention2d``, their relative-position
bias as the op's learnable mask: ``timm_maxxvit``), of PVTv2 (spatial-reduction attention:
``timm_pvt``), of CaiT's class attention and both its blocks' MLP halves (``timm_cait``; its
TalkingHeadAttn cannot be one attention call), of XCiT's cross-covariance attention (``timm_xcit``: the
channels attend, the tokens are the head dim; and its XCABlock's MLP half; EdgeNeXt's, the same
attention, and the MLP halves of its ConvBlock and SplitTransposeBlock: ``timm_edgenext``), of the
MLP halves of ConvNeXt's blocks (``timm_convnext``), the MLP of timm's post-norm blocks
(``x + drop_path2(norm2(mlp(x)))``: Swin V2, Swin V2-CR, ``EvaBlockPostNorm``, ``ResPostRelPosBlock``,
``ResPostBlock``; the MLP module alone, ``norm="none"``: ``timm_post_norm``), of
Next-ViT's spatial-reduction attention (``timm_nextvit``), of EfficientFormer's attention and
MetaBlock1d MLP halves (``timm_efficientformer``), of the last-stage
attention of Apple's FastViT (``fastvit_sa*``, ``fastvit_mci*``: ``timm_fastvit``), of TNT's inner and
outer attention and its blocks' two MLP halves (``timm_tnt``), of MViTv2 (pooling attention with its
relative position, and its blocks' MLP halves: ``timm_mvit``), of VOLO (self- and class attention, and
the MLP halves of its three kinds of block: ``timm_volo``), of ConViT (its MHSA and its blocks' MLP
halves: ``timm_convit``) and of the attention-pooling head (``AttentionPoolLatent``, the 'map' pool:
``timm_pool``) is fused too, and so are Eva's embedding and the MLP halves of ``EvaBlock`` and BEiT's
``Block`` (``Mlp``, ``GluMlp`` or ``SwiGLU``, ``gamma_2``: ``timm_mlp``) and of the DeepSeek tower's
block (``timm_deepseek``), DaViT's window and channel attentions and its blocks' MLP halves
(Florence-2's encoders: ``timm_davit``), Twins' grouped and sub-sampled attentions and its blocks' MLP
halves (``timm_twins``), NesT's block-local attention and layers (``timm_nest``), GCViT's local / global
window attention and blocks (``timm_gcvit``), Visformer's attention (``timm_visformer``), CrossViT's
cross attention (``timm_crossvit``), the attention of ViT-22B's parallel blocks
(``ParallelScalingBlock``, ``DiffParallelScalingBlock``: ``timm_parallel``), the MLP halves of
CSATv2's transformer blocks (``timm_csatv2``), CAFormer's attention (MetaFormer's token mixer:
``timm_metaformer``), and NaFlexVit's embedding and padding mask (``timm_naflex``); the
other families' MLP halves and embeddings are reported as left alone, with the reason. Other timm
architectures are left alone."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import ConvMlp, DropPath, GluMlp, LayerScale, LayerScale2d, Mlp, PatchEmbed, SwiGLU
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d as TimmLayerNorm2d
from timm.layers.format import Format
from timm.models.tiny_vit import NormMlp as TinyVitNormMlp

from fastvit.nn import (
    timm_cait,
    timm_convit,
    timm_convnext,
    timm_edgenext,
    timm_efficientformer,
    timm_embeddings,
    timm_eva,
    timm_fastvit,
    timm_hiera,
    timm_maxxvit,
    timm_mlp,
    timm_mvit,
    timm_nextvit,
    timm_pool,
    timm_post_norm,
    timm_pvt,
    timm_relpos,
    timm_sam,
    timm_swin,
    timm_tnt,
    timm_volo,
    timm_xcit,
)
from fastvit.nn import timm_vit as fused
from fastvit.nn.fused import FusedModule
from fastvit.patching.checks import (
    exact_type,
    layernorm_problems,
    missing_attributes,
    patch_conv_problems,
    unclamped_linear_problems,
)
from fastvit.patching.registry import Finding, Skip, foreign, fused_table, join, slot

try:  # NaFlexVit, in timm's recent releases: its embedding and padding mask (fastvit.nn.timm_naflex)
    from fastvit.nn import timm_naflex

    _NAFLEX = fused_table(timm_naflex.FusedNaFlexVit)
except ImportError:
    _NAFLEX = {}

try:  # AttentionRope, in timm's recent releases (vit_pe_*, NaFlexVit's RoPE, Qwen3-VL and DeepSeek towers)
    from fastvit.nn import timm_rope

    _RECENT_ATTENTIONS = ((fused_table(timm_rope.FusedAttentionRope), (
        "qkv", "q_proj", "k_proj", "v_proj", "attn_drop", "proj", "proj_drop", "num_heads", "num_kv_heads",
        "num_kv_groups", "head_dim", "scale", "q_norm", "k_norm", "norm", "gate", "num_prefix_tokens",
    )),)  # fmt: skip
except ImportError:
    _RECENT_ATTENTIONS = ()

# the other families' blocks: {original or fused class: fused class}
_OTHER_BLOCKS: dict[type, type[FusedModule]] = {}

try:  # the Gemma 4 vision tower, in timm's recent releases (fastvit.nn.timm_gemma4)
    from fastvit.nn import timm_gemma4

    _RECENT_ATTENTIONS += ((fused_table(timm_gemma4.FusedGemma4Attention), (
        "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "v_norm", "attn_drop", "proj_drop", "num_heads",
        "num_kv_heads", "num_kv_groups", "head_dim",
    )),)  # fmt: skip
    _OTHER_BLOCKS |= fused_table(timm_gemma4.FusedGemma4Block)
except ImportError:
    timm_gemma4 = None

try:  # the DeepSeek tower's block (its AttentionRope: fastvit.nn.timm_rope), in timm's recent releases
    from fastvit.nn import timm_deepseek

    _OTHER_BLOCKS |= fused_table(timm_deepseek.FusedDeepseekVitBlock)
except ImportError:
    pass

try:  # DaViT (Florence-2's encoders), in timm's recent releases (fastvit.nn.timm_davit)
    from fastvit.nn import timm_davit

    _RECENT_ATTENTIONS += (
        (
            fused_table(timm_davit.FusedDaVitWindowAttention),
            ("qkv", "proj", "num_heads", "scale", "dim", "window_size"),
        ),
        (fused_table(timm_davit.FusedDaVitChannelAttention), ("qkv", "proj", "num_heads", "scale")),
        (fused_table(timm_davit.FusedDaVitChannelAttentionV2), ("qkv", "proj", "groups", "head_dim", "dynamic_scale")),
    )
    _OTHER_BLOCKS |= fused_table(timm_davit.FusedDaVitSpatialBlock, timm_davit.FusedDaVitChannelBlock)
except ImportError:
    pass

try:  # Twins (SVT's grouped and sub-sampled attentions, PCPVT's), in timm's recent releases (fastvit.nn.timm_twins)
    from fastvit.nn import timm_twins

    _RECENT_ATTENTIONS += (
        (fused_table(timm_twins.FusedLocallyGroupedAttn), ("qkv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                           "scale", "ws")),
        (fused_table(timm_twins.FusedGlobalSubSampleAttn), ("q", "kv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                            "scale", "sr", "norm", "sr_ratio")),
    )  # fmt: skip
    _OTHER_BLOCKS |= fused_table(timm_twins.FusedTwinsBlock)
except ImportError:
    pass

try:  # NesT's block-local attention and layers (fastvit.nn.timm_nest)
    from fastvit.nn import timm_nest

    _RECENT_ATTENTIONS += (
        (fused_table(timm_nest.FusedNestAttention), ("qkv", "attn_drop", "proj", "proj_drop", "num_heads", "scale")),
    )
    _OTHER_BLOCKS |= fused_table(timm_nest.FusedNestTransformerLayer)
except ImportError:
    pass

try:  # GCViT's local / global window attention and blocks (fastvit.nn.timm_gcvit)
    from fastvit.nn import timm_gcvit

    _RECENT_ATTENTIONS += ((fused_table(timm_gcvit.FusedWindowAttentionGlobal), (
        "qkv", "rel_pos", "attn_drop", "proj", "proj_drop", "num_heads", "head_dim", "scale", "use_global",
        "window_size",
    )),)  # fmt: skip
    _OTHER_BLOCKS |= fused_table(timm_gcvit.FusedGlobalContextVitBlock)
except ImportError:
    pass

try:  # Visformer's conv-projected attention (fastvit.nn.timm_visformer)
    from fastvit.nn import timm_visformer

    _RECENT_ATTENTIONS += ((fused_table(timm_visformer.FusedVisformerAttention), (
        "qkv", "attn_drop", "proj", "proj_drop", "num_heads", "head_dim", "scale",
    )),)  # fmt: skip
except ImportError:
    pass

try:  # CAFormer's attention (MetaFormer's token mixer; fastvit.nn.timm_metaformer)
    from fastvit.nn import timm_metaformer

    _RECENT_ATTENTIONS += ((fused_table(timm_metaformer.FusedMetaFormerAttention), (
        "qkv", "attn_drop", "proj", "proj_drop", "num_heads", "head_dim", "scale",
    )),)  # fmt: skip
except ImportError:
    pass

try:  # the attention of ViT-22B's parallel block (fastvit.nn.timm_parallel)
    from fastvit.nn import timm_parallel

    _PARALLEL = ("in_norm", "in_proj", "in_split", "mlp_bias", "q_norm", "k_norm", "attn_drop", "mlp_act",
                 "mlp_drop", "out_proj", "ls", "drop_path", "num_heads", "head_dim", "scale")  # fmt: skip
    _RECENT_ATTENTIONS += (
        (fused_table(timm_parallel.FusedParallelScalingBlock), (*_PARALLEL, "attn_out_proj", "mlp_out_proj")),
        (fused_table(timm_parallel.FusedDiffParallelScalingBlock), (*_PARALLEL, "attn_drop_p", "sub_norm",
                                                                    "lambda_init", "_compute_lambda")),
    )  # fmt: skip
    # {fused class: why the block's MLP branch, beside the attention fused, runs timm's modules}
    _SHARED_MLP_NOTES = {
        cls: f"{cls.fastvit_original().__name__}'s MLP branch shares the block's norm and input projection with "
        "its attention (fc1 is rows of in_proj, fc2 is added to the attention's output projection before the "
        "residual), which is no LayerNorm+MLP half fastvit.layernorm_mlp computes: it runs timm's modules"
        for cls in (timm_parallel.FusedParallelScalingBlock, timm_parallel.FusedDiffParallelScalingBlock)
    }
except ImportError:
    _SHARED_MLP_NOTES = {}

try:  # CSATv2's transformer blocks' MLP halves, on their (B, C, H, W) maps (fastvit.nn.timm_csatv2)
    from fastvit.nn import timm_csatv2

    _OTHER_BLOCKS |= fused_table(timm_csatv2.FusedCsatv2TransformerBlock)
except ImportError:
    pass

try:  # CrossViT's cross attention between its branches (fastvit.nn.timm_crossvit)
    from fastvit.nn import timm_crossvit

    _RECENT_ATTENTIONS += ((fused_table(timm_crossvit.FusedCrossAttention), (
        "wq", "wk", "wv", "attn_drop", "proj", "proj_drop", "num_heads", "scale",
    )),)  # fmt: skip
except ImportError:
    pass

try:  # the MLP halves of the windowed / hierarchical blocks (fastvit.nn.timm_blocks)
    from fastvit.nn import timm_blocks

    _OTHER_BLOCKS |= fused_table(
        timm_blocks.FusedSwinTransformerBlock, timm_blocks.FusedSamBlock, timm_blocks.FusedHieraDetBlock,
        timm_blocks.FusedHieraBlock, timm_blocks.FusedPartitionAttentionCl, timm_blocks.FusedRelPosBlock,
    )
except ImportError:
    pass

# VOLO's outlooker, transformer and class blocks (their attentions below: fastvit.nn.timm_volo),
# CaiT's two blocks, MViTv2's, XCiT's XCABlock, ConViT's, EfficientFormer's MetaBlock1d, TinyViT's, TNT's,
# CoAtNet's TransformerBlock2d, EdgeNeXt's two blocks and ConvNeXt's (checked by _BLOCK_CHECKS)
_OTHER_BLOCKS |= fused_table(
    timm_volo.FusedVoloOutlooker, timm_volo.FusedVoloTransformer, timm_volo.FusedVoloClassBlock,
    timm_cait.FusedLayerScaleBlock, timm_cait.FusedLayerScaleBlockClassAttn, timm_mvit.FusedMultiScaleBlock,
    timm_xcit.FusedXCABlock, timm_convit.FusedConvitBlock, timm_efficientformer.FusedMetaBlock1d,
    timm_relpos.FusedTinyVitBlock, timm_tnt.FusedTntBlock, timm_maxxvit.FusedTransformerBlock2d,
    timm_edgenext.FusedEdgeNextConvBlock, timm_edgenext.FusedSplitTransposeBlock, timm_convnext.FusedConvNeXtBlock,
)

try:  # HieraDet, SAM 2's image encoder, in timm's recent releases (fastvit.nn.timm_hieradet)
    from fastvit.nn import timm_hieradet

    _RECENT_ATTENTIONS += ((fused_table(timm_hieradet.FusedHieraDetAttention), (
        "qkv", "proj", "num_heads", "scale", "q_pool", "dim_out",
    )),)  # fmt: skip
except ImportError:
    pass

__all__ = ["FAMILY", "find"]

FAMILY = "timm"
_ATTENTIONS = fused_table(fused.FusedAttention)
# timm's pre-norm Block: {its MLP's class: the fused class}, None for Mlp / GluMlp
_BLOCK_KINDS: dict[type | None, type[FusedModule]] = {None: fused.FusedBlock, SwiGLU: fused.FusedSwiGLUBlock}
try:  # ViTamin's GeGluMlp (fastvit.nn.timm_vitamin), in timm's recent releases
    from fastvit.nn import timm_vitamin

    _BLOCK_KINDS[timm_vitamin.GeGluMlp] = timm_vitamin.FusedGeGluBlock
except ImportError:
    timm_vitamin = None
_BLOCKS = {cls: _BLOCK_KINDS for cls in (fused.FusedBlock.fastvit_original(), *_BLOCK_KINDS.values())}
_MODELS = fused_table(fused.FusedVisionTransformer, fused.FusedVisionTransformerDistilled, timm_eva.FusedEva)
# models whose forward_features embeds (B, C, H, W) -> tokens with timm's plain PatchEmbed
_OTHER_MODELS = fused_table(
    timm_embeddings.FusedBeit,
    timm_embeddings.FusedVisionTransformerRelPos,
    timm_embeddings.FusedCait,
    timm_embeddings.FusedConVit,
    timm_embeddings.FusedVisionTransformerSAM,
    *(
        (timm_embeddings.FusedQwen3VitEncoder, timm_embeddings.FusedDeepseekVitEncoder)
        if timm_embeddings.qwen3_vit is not None
        else ()
    ),
)
# blocks ending in x + drop_path2(gamma_2 * mlp(norm2(x))): {class: {its MLP's class: the fused class}}
_GAMMA_BLOCKS = {
    cls: kinds
    for kinds in (
        {None: timm_eva.FusedEvaBlock, SwiGLU: timm_eva.FusedEvaSwiGLUBlock},
        {None: timm_relpos.FusedBeitBlock, SwiGLU: timm_relpos.FusedBeitSwiGLUBlock},
    )
    for cls in (kinds[None].fastvit_original(), *kinds.values())
}
# the other families' attentions: {class: (fused class, attributes its forward reads)}
_QKV = ("qkv", "attn_drop", "proj", "proj_drop", "num_heads", "scale")
_BIASED = ("proj", "num_heads", "scale", "key_dim", "val_dim", "get_attention_biases")  # TinyViT, LeViT
_MAXXVIT = ("qkv", "rel_pos", "attn_drop", "proj", "proj_drop", "num_heads", "dim_head", "head_first", "scale")
_OTHER_ATTENTIONS = {
    cls: (table[cls], names)
    for table, names in (
        (fused_table(timm_relpos.FusedBeitAttention), (*_QKV, "q_bias", "k_bias", "v_bias", "qkv_bias_separate",
                                                      "relative_position_bias_table")),
        (fused_table(timm_relpos.FusedRelPosAttention), (*_QKV, "head_dim", "q_norm", "k_norm", "rel_pos")),
        (fused_table(timm_swin.FusedSwinWindowAttention), (*_QKV, "softmax", "relative_position_bias_table",
                                                           "relative_position_index")),
        (fused_table(timm_swin.FusedSwinV2WindowAttention), (*_QKV[:-1], "softmax", "logit_scale", "cpb_mlp",
                                                             "q_bias", "k_bias", "v_bias", "qkv_bias_separate",
                                                             "relative_coords_table", "relative_position_index")),
        (fused_table(timm_swin.FusedSwinV2CrWindowAttention), ("qkv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                               "logit_scale", "meta_mlp", "window_size",
                                                               "_relative_positional_encodings")),
        (fused_table(timm_sam.FusedSamAttention), (*_QKV, "head_dim", "q_norm", "k_norm", "use_rel_pos", "rope")),
        (
            fused_table(timm_hiera.FusedMaskUnitAttention),
            ("qkv", "proj", "heads", "head_dim", "scale", "q_stride", "window_size", "use_mask_unit_attn", "dim_out"),
        ),
        (fused_table(timm_eva.FusedEvaAttention), (*_QKV, "q_proj", "k_proj", "v_proj", "q_bias", "k_bias",
                                                   "v_bias", "qkv_bias_separate", "q_norm", "k_norm", "norm",
                                                   "gate", "num_prefix_tokens")),
        (fused_table(timm_pvt.FusedPvtAttention), ("q", "kv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                   "head_dim", "scale", "sr", "norm", "pool", "act")),
        (fused_table(timm_pool.FusedAttentionPoolLatent), ("pos_embed", "latent", "latent_len", "q", "kv", "q_norm",
                                                           "k_norm", "proj", "proj_drop", "norm", "mlp", "pool",
                                                           "num_heads", "head_dim", "scale")),
        (fused_table(timm_cait.FusedClassAttn), ("q", "k", "v", "attn_drop", "proj", "proj_drop", "num_heads",
                                                 "scale")),
        (fused_table(timm_xcit.FusedXCA), ("qkv", "attn_drop", "proj", "proj_drop", "num_heads", "temperature")),
        (fused_table(timm_edgenext.FusedCrossCovarianceAttn), ("qkv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                               "temperature")),
        (fused_table(timm_nextvit.FusedEfficientAttention), ("q", "k", "v", "attn_drop", "proj", "proj_drop",
                                                             "num_heads", "head_dim", "scale", "sr", "norm")),
        (fused_table(timm_fastvit.FusedAppleFastVitAttention), ("qkv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                                "head_dim", "scale")),
        (fused_table(timm_tnt.FusedTntAttention), ("qk", "v", "attn_drop", "proj", "proj_drop", "num_heads",
                                                   "head_dim", "scale")),
        (fused_table(timm_volo.FusedVoloAttention), _QKV),
        (fused_table(timm_convit.FusedConvitMHSA), _QKV),
        (fused_table(timm_volo.FusedVoloClassAttention), ("q", "kv", "attn_drop", "proj", "proj_drop", "num_heads",
                                                          "head_dim", "scale")),
        (fused_table(timm_mvit.FusedMultiScaleAttention), ("qkv", "proj", "num_heads", "scale", "has_cls_token",
                                                           "pool_q", "pool_k", "pool_v", "norm_q", "norm_k",
                                                           "norm_v", "rel_pos_type", "residual_pooling")),
        (fused_table(timm_relpos.FusedTinyVitAttention), (*_BIASED, "qkv", "norm")),
        (fused_table(timm_relpos.FusedLevitAttention), (*_BIASED, "qkv", "use_conv")),
        (fused_table(timm_efficientformer.FusedEfficientFormerAttention), (*_BIASED, "qkv")),
        (fused_table(timm_relpos.FusedLevitAttentionDownsample), (*_BIASED, "q", "kv", "use_conv", "stride",
                                                                  "val_attn_dim")),
        (fused_table(timm_maxxvit.FusedAttentionCl, timm_maxxvit.FusedAttention2d), _MAXXVIT),
        *_RECENT_ATTENTIONS,
    )
    for cls in table
}
# Blocks and models of those families whose other parts are not fused: (module, class) -> (part, reason)
# Post-norm blocks, x + drop_path2(norm2(mlp(x))): their ``mlp`` module alone is fused (timm_post_norm),
# the block's norm2, drop_path2 and residual add run as timm's
_POST_NORM_BLOCKS = {
    ("timm.models.eva", "EvaBlockPostNorm"),
    ("timm.models.vision_transformer_relpos", "ResPostRelPosBlock"),
    ("timm.models.vision_transformer", "ResPostBlock"),
    ("timm.models.swin_transformer_v2", "SwinTransformerV2Block"),
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock"),
}
# {timm's Mlp / GluMlp / SwiGLU or its fused class: the fused class} for those blocks' mlp
_MLPS_ALONE = fused_table(
    timm_post_norm.FusedMlpAlone, timm_post_norm.FusedGluMlpAlone, timm_post_norm.FusedSwiGLUAlone
)
_LEFT_ALONE = {
    ("timm.models.pvt_v2", "Block"): (
        "mlp", "PVTv2's MLP (MlpWithDepthwiseConv: a 3x3 depthwise conv between fc1 and the GELU) is not a "
        "LayerNorm+GELU MLP: it runs timm's modules",
    ),
    ("timm.models.visformer", "Block"): (
        "mlp", "Visformer's Block normalises with BatchNorm2d and its MLP is 1x1 convolutions (SpatialMlp), not a "
        "LayerNorm MLP: it runs timm's modules",
    ),
    ("timm.models.convit", "GPSA"): (
        "attention", "ConViT's GPSA blends a softmax over relative positions into the content softmax through a "
        "learned per-head gate, which no single flash_attention call computes: it runs timm's forward",
    ),
    ("timm.models.volo", "OutlookAttention"): (
        "attention", "VOLO's OutlookAttention mixes each position's k x k neighbourhood with weights predicted from "
        "that position alone (no query-key product, no softmax over keys), which no flash_attention call computes: "
        "it runs timm's forward",
    ),
    ("timm.models.cait", "TalkingHeadAttn"): (
        "attention", "CaiT's TalkingHeadAttn mixes the heads with a linear layer before and after the softmax "
        "(proj_l, proj_w), which no single flash_attention call computes: it runs timm's forward",
    ),
    ("timm.models.mvitv2", "MultiScaleAttentionPoolFirst"): (
        "attention", "MViTv2's MultiScaleAttentionPoolFirst (pool_first=True) is left alone: its timm forward "
        "multiplies q by an untransposed k ((B, M, H, D)) and fails for real shapes, so there is no result to "
        "match",
    ),
    ("timm.models.xcit", "ClassAttentionBlock"): (
        "mlp", "XCiT's ClassAttentionBlock normalises its residual stream before the MLP and runs the MLP on the "
        "class token only (x + drop_path(cat(gamma2 * mlp(norm2(x)[:, :1]), norm2(x)[:, 1:]))); "
        "fastvit.layernorm_mlp computes x + mlp(layer_norm(x)) over every token: it runs timm's modules",
    ),
    ("timm.models.efficientformer", "MetaBlock2d"): (
        "mlp", "EfficientFormer's MetaBlock2d mixes its (B, C, H, W) map by pooling and its MLP is 1x1 convolutions "
        "with BatchNorm (ConvMlpWithNorm), not a LayerNorm MLP: it runs timm's modules",
    ),
    ("timm.models.nextvit", "NextTransformerBlock"): (
        "mlp", "Next-ViT's NextTransformerBlock normalises with BatchNorm2d and its MLP is 1x1 convolutions (ConvMlp), "
        "not a LayerNorm MLP: it runs timm's modules",
    ),
    ("timm.models.levit", "LevitBlock"): (
        "mlp", "LeViT's LevitMlp is Linear+BatchNorm with Hardswish, not a LayerNorm+GELU MLP: it runs timm's "
        "modules",
    ),
    ("timm.models.metaformer", "MetaFormerBlock"): (
        "mlp", "MetaFormer's block activates its MLP with StarReLU (s * relu(x)^2 + b: CAFormer, ConvFormer, "
        "PoolFormer v2) or normalises with a GroupNorm over the (B, C, H, W) map (PoolFormer), and may scale its "
        "residual stream (res_scale2), which fastvit.layernorm_mlp does not compute: it runs timm's modules",
    ),
}
_NORMED_PATCHES = (
    "patch embedding normalises the patches (timm's PatchEmbed with a LayerNorm, feeding the window stages as a "
    "map), which fastvit.patch_embed does not compute: left alone"
)
_CONV_STEM = "stem is a stack of strided convolutions, not one patchify conv (fastvit.patch_embed): left alone"
_LEFT_ALONE_MODELS = {
    ("timm.models.swin_transformer", "SwinTransformer"): _NORMED_PATCHES,
    ("timm.models.swin_transformer_v2", "SwinTransformerV2"): _NORMED_PATCHES,
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2Cr"): _NORMED_PATCHES,
    ("timm.models.tiny_vit", "TinyVit"): _CONV_STEM,
    ("timm.models.levit", "Levit"): _CONV_STEM,
    ("timm.models.levit", "LevitDistilled"): _CONV_STEM,
    ("timm.models.efficientformer", "EfficientFormer"): _CONV_STEM,
    ("timm.models.nextvit", "NextViT"): _CONV_STEM,
    ("timm.models.tnt", "TNT"): "patch embedding is a PixelEmbed (each patch unfolded into pixel tokens for the "
    "inner transformer) beside the patch tokens, not a ViT's single patchify conv (fastvit.patch_embed): left alone",
    ("timm.models.convnext", "ConvNeXt"): "stem is a patchify conv followed by a LayerNorm2d over the (B, C, H, W) "
    "map, feeding conv stages, not a ViT's token embedding (fastvit.patch_embed): left alone",
    ("timm.models.edgenext", "EdgeNeXt"): "stem is a conv over a (B, C, H, W) map followed by a LayerNorm2d, "
    "feeding conv stages, not a ViT's token embedding (fastvit.patch_embed): left alone",
    ("timm.models.volo", "VOLO"): _CONV_STEM,
    ("timm.models.xcit", "Xcit"): _CONV_STEM,
    ("timm.models.pvt_v2", "PyramidVisionTransformerV2"): "patch embedding is an overlapping conv (kernel 7, "
    "stride 4, padding 3) followed by a LayerNorm, not a patchify conv (fastvit.patch_embed): left alone",
    ("timm.models.mvitv2", "MultiScaleVit"): "patch embedding is an overlapping conv (kernel 7, stride 4, "
    "padding 3), not a patchify conv (fastvit.patch_embed): left alone",
    ("timm.models.hiera", "Hiera"): "patch embedding is an overlapping conv (kernel 7, stride 4, padding 3), not "
    "a patchify conv (fastvit.patch_embed): left alone",
    ("timm.models.hieradet_sam2", "HieraDet"): "patch embedding is an overlapping conv (kernel 7, stride 4, "
    "padding 3), not a patchify conv (fastvit.patch_embed): left alone",
    ("timm.models.maxxvit", "MaxxVit"): _CONV_STEM,
    ("timm.models.twins", "Twins"): "patch embeddings are one per stage (a patchify conv and a LayerNorm before "
    "each stage), not a ViT's single embedding with its position embedding (fastvit.patch_embed): left alone",
    ("timm.models.nest", "Nest"): "patch embedding feeds image blocks (its tokens blockified, a position "
    "embedding per block), not a ViT's token sequence (fastvit.patch_embed): left alone",
    ("timm.models.gcvit", "GlobalContextVit"): _CONV_STEM,
    ("timm.models.visformer", "Visformer"): _CONV_STEM,
    ("timm.models.crossvit", "CrossVit"): "patch embeddings are one per branch (two patch sizes, each with its "
    "own class token and position embedding), not a ViT's single embedding (fastvit.patch_embed): left alone",
    ("timm.models.metaformer", "MetaFormer"): "stem is an overlapping conv (kernel 7, stride 4, padding 2) "
    "followed by a LayerNorm2d, feeding conv stages, not a patchify conv (fastvit.patch_embed): left alone",
    ("timm.models.davit", "DaVit"): "stem is an overlapping conv (kernel 7, stride 4, padding 3) followed by a "
    "LayerNorm2d, not a patchify conv (fastvit.patch_embed): left alone",
    **{
        ("timm.models.gemma4_vit", cls): "patch embedding is a Linear over patches flattened in P-P-C order (or "
        "NaFlex's pre-patchified ones) plus a 2-D position table looked up by patch coordinate, not a patchify "
        "Conv2d with one position embedding (fastvit.patch_embed): left alone"
        for cls in ("Gemma4VitClassifier", "Gemma4VitEncoder")
    },
}


def _attention_problems(attn: nn.Module) -> list[str]:
    names = (
        "qkv",
        "q_norm",
        "k_norm",
        "attn_drop",
        "norm",
        "proj",
        "proj_drop",
        "num_heads",
        "head_dim",
        "scale",
    )
    return missing_attributes(attn, names, "timm")


def _attention_notes(attn: nn.Module) -> list[str]:
    p = attn.attn_drop.p
    return [f"attention dropout {p}: in training it runs timm's forward"] if p > 0 else []


def _other_attention_notes(attn: nn.Module) -> list[str]:
    """``_attention_notes`` for the attentions that may have no ``attn_drop`` (TinyViT, LeViT)."""
    return _attention_notes(attn) if hasattr(attn, "attn_drop") else []


def _block_problems(block: nn.Module) -> list[str]:
    """Why timm's Block, x + drop_path1(ls1(attn(norm1(x)))) then x + drop_path2(ls2(mlp(norm2(x)))),
    cannot have its MLP half fused."""
    problems = missing_attributes(
        block, ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"), "timm"
    )
    if problems:
        return problems
    problems += exact_type(block.ls2, "ls2", (nn.Identity, LayerScale), "LayerScale")
    if timm_vitamin is not None and type(block.mlp) is timm_vitamin.GeGluMlp:
        return problems + _geglu_mlp_half_problems(block)
    return problems + _mlp_half_problems(block)


def _geglu_mlp_half_problems(block: nn.Module) -> list[str]:
    """What the op must be able to compute of a ViTamin block's ``mlp`` (``GeGluMlp``: its own norm,
    then w2(act(w0(x)) * w1(x))) and ``drop_path2``; ``norm2`` runs as the block's module, whatever it is."""
    problems = exact_type(block.drop_path2, "drop_path2", (nn.Identity, DropPath), "DropPath")
    problems += _norm_problems(block.mlp.norm, "mlp.norm")
    return problems + _mlp_layers_problems(block.mlp, ("w0", "w1", "w2"))


def _block_fused(block: nn.Module, table: dict) -> type[FusedModule]:
    """The fused class for a timm, Eva or BEiT block (``table``: ``_BLOCKS`` / ``_GAMMA_BLOCKS``):
    by its MLP's kind (the submodules it bypasses), for a block fused earlier too (its MLP replaced
    by another kind since: fused anew as that kind's class)."""
    kinds = table[type(block)]
    return kinds.get(type(getattr(block, "mlp", None)), kinds[None])


def _gamma_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of an Eva / BEiT block, x + drop_path2(gamma_2 * mlp(norm2(x))), cannot be fused."""
    problems = missing_attributes(block, ("norm2", "mlp", "gamma_2", "drop_path2"), "timm")
    return problems or _mlp_half_problems(block)


def _other_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of another family's pre-norm block, x + drop_path2([ls2](mlp(norm2(x))))
    (DeepSeek's, DaViT's, Twins', NesT's, GCViT's), cannot be fused."""
    if hasattr(block, "mlp") and block.mlp is None:  # DaViT's ffn=False
        return [f"{type(block).__name__} has no MLP (ffn=False): nothing to fuse"]
    problems = missing_attributes(block, ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"), "timm")
    if not problems and hasattr(block, "ls2"):  # GCViT's LayerScale
        problems += exact_type(block.ls2, "ls2", (nn.Identity, LayerScale), "LayerScale")
    return problems or _mlp_half_problems(block)


def _shared_drop_path_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of a block with one drop_path for both branches, x + drop_path([gamma_2 *]
    mlp(norm2(x))) (CaiT's, with the gammas; ConViT's), cannot be fused."""
    gammas = ("gamma_1", "gamma_2") if _OTHER_BLOCKS[type(block)].fastvit_gamma else ()  # CaiT's
    problems = missing_attributes(block, ("norm1", "attn", "drop_path", "norm2", "mlp", *gammas), "timm")
    return problems or _mlp_half_problems(block, "drop_path")


def _mvit_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of an MViTv2 block cannot be fused: the other blocks' checks, and a residual
    that is x itself (no ``shortcut_proj_mlp``)."""
    problems = _other_block_problems(block)
    if not problems and getattr(block, "shortcut_proj_mlp", None) is not None:
        problems.append(
            "its MLP widens the tokens (expand_attn=False at a stage change): the residual is "
            "shortcut_proj_mlp(norm2(x)), not x, where fastvit.layernorm_mlp adds x"
        )
    return problems


def _xca_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of an XCiT block, x + drop_path2(gamma2 * mlp(norm2(x))) after its
    attention and local patch interaction, cannot be fused."""
    names = ("norm1", "attn", "gamma1", "drop_path1", "norm3", "local_mp", "gamma3", "drop_path3", "norm2", "mlp",
             "gamma2", "drop_path2")  # fmt: skip
    return missing_attributes(block, names, "timm") or _mlp_half_problems(block)


def _metablock1d_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of an EfficientFormer MetaBlock1d, x + drop_path2(ls2(mlp(norm2(x)))) after
    its attention half x + drop_path1(ls1(token_mixer(norm1(x)))), cannot be fused."""
    names = ("norm1", "token_mixer", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    problems = missing_attributes(block, names, "timm")
    if not problems:
        problems += exact_type(block.ls2, "ls2", (nn.Identity, LayerScale), "LayerScale")
    return problems or _mlp_half_problems(block)


def _tinyvit_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of a TinyViT block, x + drop_path2(mlp(x)) with timm's NormMlp
    (fc2(act(fc1(norm(x))))), cannot be fused."""
    names = ("attn", "drop_path1", "local_conv", "mlp", "drop_path2", "window_size")
    problems = missing_attributes(block, names, "timm")
    if problems:
        return problems
    mlp = block.mlp
    problems += exact_type(mlp, "mlp", (TinyVitNormMlp,), "TinyViT's NormMlp")
    problems += exact_type(block.drop_path2, "drop_path2", (nn.Identity, DropPath), "DropPath")
    if problems:
        return problems
    problems += layernorm_problems(mlp.norm, "mlp.norm", (nn.LayerNorm, TimmLayerNorm))
    return problems + _mlp_layers_problems(mlp, ("fc1", "fc2"))


def _edgenext_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of an EdgeNeXt ConvBlock or SplitTransposeBlock, shortcut +
    drop_path(gamma * mlp(norm(x))) over its (B, H, W, C) map, cannot be fused."""
    names = ("norm", "mlp", "gamma", "drop_path")
    names += ("conv_dw", "shortcut_after_dw") if hasattr(block, "conv_dw") else ("convs", "pos_embd", "xca")
    problems = missing_attributes(block, names, "timm")
    if problems:
        return problems
    problems = _mlp_half_problems(block, "drop_path", norm="norm")
    return problems or _gamma_problems(block.gamma, block.mlp.fc2.out_features)


def _gamma_problems(gamma: object, dim: int) -> list[str]:
    """Why a block's ``gamma`` cannot be the op's ``layer_scale``: neither None nor a (dim,) tensor."""
    if gamma is None or (isinstance(gamma, torch.Tensor) and gamma.shape == (dim,)):
        return []
    return [f"gamma is neither None nor a ({dim},) layer scale"]


def _convnext_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of a ConvNeXt block, drop_path(gamma * mlp(norm(conv_dw(x)))) + shortcut(x),
    cannot be fused: with ``conv_mlp`` a LayerNorm2d and an Mlp of plain 1x1 convs, else a
    LayerNorm (or RMS norm) and timm's Mlp / GluMlp / SwiGLU of Linears."""
    names = ("conv_dw", "norm", "mlp", "gamma", "shortcut", "drop_path", "use_conv_mlp")
    problems = missing_attributes(block, names, "timm")
    if problems:
        return problems
    mlp = block.mlp
    if type(mlp).__name__ == "GlobalResponseNormMlp":
        return ["mlp is ConvNeXt V2's GlobalResponseNormMlp (a response norm over the hidden activations' H x W "
                "between the activation and fc2); fastvit.layernorm_mlp normalises only its input"]  # fmt: skip
    if not block.use_conv_mlp:
        problems = _mlp_half_problems(block, "drop_path", norm="norm")
        return problems or _gamma_problems(block.gamma, mlp.fc2.out_features)
    problems += layernorm_problems(block.norm, "norm", (TimmLayerNorm2d,))
    problems += exact_type(block.drop_path, "drop_path", (nn.Identity, DropPath), "DropPath")
    problems += exact_type(mlp, "mlp", (Mlp,), "timm's Mlp (of 1x1 convs)")
    if problems:
        return problems
    problems += _pointwise_conv_problems(mlp, ("fc1", "fc2"))
    if type(mlp.norm) is not nn.Identity:
        problems.append(f"mlp.norm is {type(mlp.norm).__qualname__}; fastvit.layernorm_mlp normalises only its input")
    problems += exact_type(mlp.drop1, "mlp.drop1", (nn.Dropout,), "nn.Dropout")
    problems += exact_type(mlp.drop2, "mlp.drop2", (nn.Dropout,), "nn.Dropout")
    if timm_mlp.mlp_activation(mlp.act) is None:
        problems.append(
            f"mlp.act is {type(mlp.act).__qualname__}; the fused op computes GELU (exact or tanh), QuickGELU or SiLU"
        )
    return problems or _gamma_problems(block.gamma, mlp.fc2.out_channels)


def _pointwise_conv_problems(mlp: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Why the named convs of an MLP are not plain 1x1 convs (an nn.Linear's (out, in) weight as a view)."""
    problems = []
    for name in names:
        conv = getattr(mlp, name)
        problems += exact_type(conv, f"mlp.{name}", (nn.Conv2d,), "nn.Conv2d")
        if not problems and (tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1
                             or conv.padding not in ((0, 0), "valid") or tuple(conv.dilation) != (1, 1)):
            problems.append(f"mlp.{name} is not a plain 1x1 conv (kernel {tuple(conv.kernel_size)}, stride "
                            f"{tuple(conv.stride)}, groups {conv.groups}, padding {conv.padding})")  # fmt: skip
    return problems


def _tnt_block_problems(block: nn.Module) -> list[str]:
    """Why the MLP halves of a TNT block, pixel + drop_path(mlp_in(norm_mlp_in(pixel))) and
    patch + drop_path(mlp(norm_mlp(patch))), cannot be fused."""
    names = ("norm_in", "attn_in", "norm_mlp_in", "mlp_in", "norm1_proj", "proj", "norm2_proj", "norm_out",
             "attn_out", "drop_path", "norm_mlp", "mlp")  # fmt: skip
    problems = missing_attributes(block, names, "timm")
    if problems:
        return problems
    inner = _mlp_half_problems(block, "drop_path", norm="norm_mlp_in", mlp="mlp_in")
    return inner + [p for p in _mlp_half_problems(block, "drop_path", norm="norm_mlp") if p not in inner]


def _transformer_block2d_problems(block: nn.Module) -> list[str]:
    """Why the MLP half of a CoAtNet TransformerBlock2d, x + drop_path2(ls2(mlp(norm2(x)))) on a
    (B, C, H, W) map with LayerNorm2d and a 1x1-conv ConvMlp, cannot be fused."""
    names = ("shortcut", "norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    problems = missing_attributes(block, names, "timm")
    if problems:
        return problems
    problems += layernorm_problems(block.norm2, "norm2", (TimmLayerNorm2d,))
    problems += exact_type(block.ls2, "ls2", (nn.Identity, LayerScale2d), "LayerScale2d")
    problems += exact_type(block.drop_path2, "drop_path2", (nn.Identity, DropPath), "DropPath")
    mlp = block.mlp
    problems += exact_type(mlp, "mlp", (ConvMlp,), "timm's ConvMlp")
    if problems:
        return problems
    problems += _pointwise_conv_problems(mlp, ("fc1", "fc2"))
    if type(mlp.norm) is not nn.Identity:
        problems.append(f"mlp.norm is {type(mlp.norm).__qualname__}; fastvit.layernorm_mlp normalises only its input")
    problems += exact_type(mlp.drop, "mlp.drop", (nn.Dropout,), "nn.Dropout")
    if timm_mlp.mlp_activation(mlp.act) is None:
        problems.append(
            f"mlp.act is {type(mlp.act).__qualname__}; the fused op computes GELU (exact or tanh), QuickGELU or SiLU"
        )
    return problems


# the blocks of _OTHER_BLOCKS whose MLP half is checked otherwise than _other_block_problems
_BLOCK_CHECKS = {
    timm_xcit.FusedXCABlock: _xca_block_problems,
    timm_cait.FusedLayerScaleBlock: _shared_drop_path_problems,
    timm_cait.FusedLayerScaleBlockClassAttn: _shared_drop_path_problems,
    timm_convit.FusedConvitBlock: _shared_drop_path_problems,
    timm_mvit.FusedMultiScaleBlock: _mvit_block_problems,
    timm_efficientformer.FusedMetaBlock1d: _metablock1d_problems,
    timm_relpos.FusedTinyVitBlock: _tinyvit_block_problems,
    timm_tnt.FusedTntBlock: _tnt_block_problems,
    timm_maxxvit.FusedTransformerBlock2d: _transformer_block2d_problems,
    timm_edgenext.FusedEdgeNextConvBlock: _edgenext_block_problems,
    timm_edgenext.FusedSplitTransposeBlock: _edgenext_block_problems,
    timm_convnext.FusedConvNeXtBlock: _convnext_block_problems,
}
# the blocks of _OTHER_BLOCKS whose report notes differ from _block_notes
_BLOCK_NOTES: dict[type[FusedModule], Callable[[nn.Module], list[str]]] = {}


def _gemma4_block_problems(block: nn.Module) -> list[str]:
    """What the op must be able to compute of a Gemma 4 block's ``norm3`` and ``mlp``: an RMS norm (or
    LayerNorm) over the last dim, ``Gemma4GatedMlp`` of unclamped linears with an activation the op has."""
    names = ("norm1", "attn", "norm2", "norm3", "mlp", "norm4", "drop_path")
    problems = missing_attributes(block, names, "timm")
    if problems:
        return problems
    problems += _norm_problems(block.norm3, "norm3")
    mlp_cls = timm_gemma4.Gemma4GatedMlp
    problems += exact_type(block.mlp, "mlp", (mlp_cls,), mlp_cls.__name__)
    if problems:
        return problems
    problems += unclamped_linear_problems(block.mlp, "mlp", timm_gemma4.Gemma4ClippableLinear, "use_clipped")
    problems += exact_type(block.mlp.drop, "mlp.drop", (nn.Dropout,), "nn.Dropout")
    if timm_mlp.mlp_activation(block.mlp.act) is None:
        problems.append(f"mlp.act is {type(block.mlp.act).__qualname__}; the fused op computes GELU (exact or tanh), "
                        "QuickGELU or SiLU")  # fmt: skip
    return problems


def _mlp_dropout_notes(block: nn.Module) -> list[str]:
    """The report's note on a block whose MLP dropout falls back in training (``_block_notes``' first
    half; the Gemma 4 block's whole note, its drop path being a module call outside the op)."""
    p = timm_mlp.mlp_dropout_p(block.mlp)
    return [f"MLP dropout {p}: in training its MLP half runs timm's modules"] if p > 0 else []


if timm_gemma4 is not None:  # its drop path runs as the block's module, outside the op
    _BLOCK_CHECKS[timm_gemma4.FusedGemma4Block] = _gemma4_block_problems
    _BLOCK_NOTES[timm_gemma4.FusedGemma4Block] = _mlp_dropout_notes


def _mlp_half_problems(
    block: nn.Module, drop_path: str = "drop_path2", norm: str = "norm2", mlp: str = "mlp"
) -> list[str]:
    """What the op must be able to compute of a block's ``norm2``, ``mlp`` and ``drop_path2`` (or
    the modules named): a LayerNorm or RMS norm over the last dim, timm's ``Mlp``, ``GluMlp`` or
    ``SwiGLU`` of Linears with an activation the op has, no norm inside the MLP."""
    problems = _norm_problems(getattr(block, norm), norm)
    problems += exact_type(getattr(block, drop_path), drop_path, (nn.Identity, DropPath), "DropPath")
    mlp_name, mlp = mlp, getattr(block, mlp)
    problems += exact_type(mlp, mlp_name, (Mlp, GluMlp, SwiGLU), "timm's Mlp, GluMlp or SwiGLU")
    return problems or _mlp_module_problems(mlp, mlp_name)


def _norm_problems(norm: nn.Module, name: str) -> list[str]:
    """What the op must be able to compute of the norm named ``name``: a LayerNorm or RMS norm over the last dim."""
    layernorms = (nn.LayerNorm, TimmLayerNorm)
    if type(norm) in timm_mlp.RMS_NORMS:
        return layernorm_problems(norm, name, timm_mlp.RMS_NORMS)  # over the last dim only
    if type(norm) in layernorms:
        return layernorm_problems(norm, name, layernorms)
    return [f"{name} is {type(norm).__qualname__}, not nn.LayerNorm or an RMS norm (timm's RmsNorm)"]


def _mlp_module_problems(mlp: nn.Module, name: str = "mlp") -> list[str]:
    """What the op must be able to compute of timm's ``Mlp``, ``GluMlp`` or ``SwiGLU`` (the module
    named ``name`` in the reasons): no norm inside or a LayerNorm over the hidden features (``scale_mlp``:
    the op's ``hidden_norm``), Linears, an activation the op has."""
    problems = []
    if type(mlp.norm) is not nn.Identity:
        problems += layernorm_problems(mlp.norm, f"{name}.norm", (nn.LayerNorm, TimmLayerNorm))
        if problems:
            problems[-1] += " (scale_mlp: the op's hidden_norm is a LayerNorm)"
    linears = ("fc1_g", "fc1_x", "fc2") if type(mlp) is SwiGLU else ("fc1", "fc2")
    return problems + _mlp_layers_problems(mlp, linears, name)


def _post_norm_mlp(path: str, block: nn.Module) -> Finding:
    """The finding for a post-norm block's ``mlp`` (``_POST_NORM_BLOCKS``): timm's Mlp, GluMlp or
    SwiGLU becomes its fused class (``timm_post_norm``), the block itself stays timm's."""
    mlp, mlp_path = block._modules.get("mlp"), join(path, "mlp")
    fused_cls = _MLPS_ALONE.get(type(mlp))
    if fused_cls is None:
        return Skip(mlp_path, "mlp", foreign(mlp, "timm's Mlp, GluMlp or SwiGLU"))
    return slot(mlp_path, mlp, "mlp", fused_cls, _mlp_module_problems, _mlp_alone_notes)


def _mlp_alone_notes(mlp: nn.Module) -> list[str]:
    p = timm_mlp.mlp_dropout_p(mlp)
    return [f"MLP dropout {p}: in training it runs timm's modules"] if p > 0 else []


def _mlp_layers_problems(mlp: nn.Module, linears: tuple[str, ...], name: str = "mlp") -> list[str]:
    """What the op must be able to compute of an MLP's layers (the MLP named ``name`` in the
    reasons): the ``linears`` named are nn.Linear, ``drop1`` / ``drop2`` nn.Dropout, ``act`` an
    activation the op has."""
    problems = []
    for linear in linears:
        problems += exact_type(getattr(mlp, linear), f"{name}.{linear}", (nn.Linear,), "nn.Linear")
    problems += exact_type(mlp.drop1, f"{name}.drop1", (nn.Dropout,), "nn.Dropout")
    problems += exact_type(mlp.drop2, f"{name}.drop2", (nn.Dropout,), "nn.Dropout")
    if timm_mlp.mlp_activation(mlp.act) is None:
        problems.append(
            f"{name}.act is {type(mlp.act).__qualname__}; the fused op computes GELU (exact or tanh), QuickGELU or SiLU"
        )
    return problems


def _block_notes(block: nn.Module) -> list[str]:
    notes = _mlp_dropout_notes(block)
    # CaiT's and ConViT's blocks have one drop_path for both halves
    drop_path = block.drop_path2 if hasattr(block, "drop_path2") else getattr(block, "drop_path", None)
    if isinstance(drop_path, DropPath) and drop_path.drop_prob > 0:
        notes.append(f"drop path {drop_path.drop_prob} as the op's sample_scale")
    return notes


def _embed_problems(model: nn.Module, nhwc: bool = False) -> list[str]:
    """Why ``model``'s embedding cannot be one ``fastvit.patch_embed`` call: timm's ``PatchEmbed``
    with a patchify conv and no norm, giving flat (B, N, D) tokens, or (B, H, W, D) patches where
    the fused model views the op's tokens so (``nhwc``: SAM) or resamples ``pos_embed`` for them
    (``dynamic_img_size``)."""
    embed = model.patch_embed
    problems = exact_type(embed, "patch_embed", (PatchEmbed,), "timm's PatchEmbed (e.g. a hybrid CNN stem)")
    if problems:
        return problems
    problems += patch_conv_problems(embed.proj, "patch_embed.proj")
    problems += exact_type(
        embed.norm, "patch_embed.norm", (nn.Identity,), "Identity (a norm before the tokens)"
    )
    flat = embed.flatten and embed.output_fmt == Format.NCHW
    grid = embed.output_fmt == Format.NHWC and not embed.flatten
    if not (grid if nhwc else flat or (getattr(model, "dynamic_img_size", False) and grid)):
        problems.append(f"patch_embed output format {embed.output_fmt} (flatten={embed.flatten})")
    return problems


def _is_transformer_block(module: nn.Module) -> bool:
    """Whether ``module`` holds an attention and an MLP submodule (``attn``, ``mlp``), as timm's
    transformer blocks do."""
    return all(isinstance(module._modules.get(name), nn.Module) for name in ("attn", "mlp"))


# submodules an attention module projects its queries / keys with, in timm's families
_PROJECTIONS = ("qkv", "q", "kv", "qk", "wq", "q_proj")


def _is_attention(module: nn.Module) -> bool:
    """Whether ``module`` looks like a timm attention: its class named for one (``...Attention``,
    ``...Attn``, ``Attention2d``, ``AttentionCl``) with a query / key projection submodule
    (``_PROJECTIONS``): named in the report when no entry fuses it."""
    name = type(module).__name__
    return ("Attention" in name or "Attn" in name) and any(
        isinstance(module._modules.get(p), nn.Module) for p in _PROJECTIONS
    )


def _reported_on_its_own(attn: object) -> bool:
    """Whether ``find`` reports a block's ``attn`` where it visits that module: one of the fused
    classes' originals, or another timm attention (``_is_attention``); else the block says it."""
    cls = type(attn)
    return cls in _ATTENTIONS or cls in _OTHER_ATTENTIONS or (
        isinstance(attn, nn.Module) and cls.__module__.startswith("timm.") and _is_attention(attn)
    )


def find(model: nn.Module) -> list[Finding]:
    """What can be fused in ``model``'s timm modules (see ``fastvit.patching.registry``)."""
    findings: list[Finding] = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls in _ATTENTIONS:
            findings.append(
                slot(path, module, "attention", _ATTENTIONS[cls], _attention_problems, _attention_notes)
            )
        elif cls in _BLOCKS:
            findings.append(slot(path, module, "mlp", _block_fused(module, _BLOCKS), _block_problems, _block_notes))
            attn = getattr(module, "attn", None)
            if not _reported_on_its_own(attn):
                findings.append(Skip(join(path, "attn"), "attention", foreign(attn, "timm's Attention")))
        elif cls in _GAMMA_BLOCKS:
            findings.append(
                slot(path, module, "mlp", _block_fused(module, _GAMMA_BLOCKS), _gamma_block_problems, _block_notes)
            )
        elif cls in _OTHER_BLOCKS:
            fused_cls = _OTHER_BLOCKS[cls]
            problems = _BLOCK_CHECKS.get(fused_cls, _other_block_problems)
            findings.append(slot(path, module, "mlp", fused_cls, problems, _BLOCK_NOTES.get(fused_cls, _block_notes)))
        elif cls in _MODELS:
            findings.append(slot(path, module, "patch_embed", _MODELS[cls], _embed_problems))
        elif cls in _OTHER_MODELS:
            fused_cls = _OTHER_MODELS[cls]
            problems = lambda m, nhwc=fused_cls.fastvit_patch_grid: _embed_problems(m, nhwc=nhwc)
            findings.append(slot(path, module, "patch_embed", fused_cls, problems))
        elif cls in _NAFLEX:
            problems, notes = timm_naflex.embed_problems, timm_naflex.embed_notes
            findings.append(slot(path, module, "patch_embed", _NAFLEX[cls], problems, notes))
        elif cls in _OTHER_ATTENTIONS:
            fused_cls, names = _OTHER_ATTENTIONS[cls]
            problems = lambda m, names=names: missing_attributes(m, names, "timm")
            findings.append(slot(path, module, "attention", fused_cls, problems, _other_attention_notes))
            if fused_cls in _SHARED_MLP_NOTES:
                findings.append(Skip(path, "mlp", _SHARED_MLP_NOTES[fused_cls]))
        elif (cls.__module__, cls.__name__) in _POST_NORM_BLOCKS:
            findings.append(_post_norm_mlp(path, module))
        elif (cls.__module__, cls.__name__) in _LEFT_ALONE:
            findings.append(Skip(path, *_LEFT_ALONE[cls.__module__, cls.__name__]))
        elif (cls.__module__, cls.__name__) in _LEFT_ALONE_MODELS and not path:
            reason = _LEFT_ALONE_MODELS[cls.__module__, cls.__name__]
            findings.append(Skip(path, "patch_embed", f"{cls.__name__}'s {reason}"))
        elif cls.__module__ == "timm.models.vision_transformer" and cls.__name__.endswith("Block"):
            findings.append(Skip(path, "mlp", f"{cls.__name__} is not timm's pre-norm Block: left alone"))
        elif path and cls.__module__.startswith("timm.") and _is_transformer_block(module):
            # a block of a family fastvit has no entry for: said, not left out of the report
            findings.append(Skip(path, "mlp", f"{cls.__name__} ({cls.__module__}) is not a block fastvit fuses: "
                                 "its MLP half runs timm's modules"))  # fmt: skip
        elif path and cls.__module__.startswith("timm.") and _is_attention(module):
            # an attention of a family fastvit has no entry for: said, not left out of the report
            findings.append(Skip(path, "attention", f"{cls.__name__} ({cls.__module__}) is not an attention "
                                 "fastvit fuses: it runs timm's attention"))  # fmt: skip
        elif cls.__module__ == "timm.models.fastvit" and not path:
            findings.append(
                Skip(path, "model", "timm's fastvit_* models are Apple's FastViT, a different architecture: its "
                     "conv stem, RepMixer blocks and BatchNorm conv MLPs are no ViT patch-embed or MLP modules and "
                     "are left alone (the attention of its last stage, in the fastvit_sa* / ma* / mci* models, is "
                     "fused)")
            )  # fmt: skip
    return findings
