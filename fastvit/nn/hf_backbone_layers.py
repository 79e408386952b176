"""Fused subclasses of the pre-norm layers of Hugging Face's video, pose and detection backbones: the
LayerNorm (or RMSNorm) + MLP half of each layer as one ``fastvit.layernorm_mlp`` call.

Covered: V-JEPA 2's ``VJEPA2Layer`` (its RoPE attention returns its weights beside the output),
ViTPose's ``VitPoseBackboneLayer`` (one MLP; the multi-expert MLP of ViTPose+ is reported),
Pixio's ``PixioLayer`` (hidden dropout then drop path), Sapiens2's ``Sapiens2Layer`` (RMSNorm, a plain
or gated MLP, ``layer_scale2`` an ``nn.Identity``), RF-DETR's windowed DINOv2 backbone
(``RfDetrDinov2Layer``: the windows merged for its global layers; a plain or SwiGLU MLP, LayerScale),
LW-DETR's ViT (``LwDetrViTLayer``: its MLP named ``intermediate``, ``gamma_2`` a bare (D,) layer
scale), PVT's ``PvtLayer`` (its ``PvtFFN``) and TimeSformer's ``TimesformerLayer`` (its MLP half in
ViT's 4.x module layout, with drop path). The attention half of each forward below is Hugging
Face's, line for line (the attention goes through transformers' ``AttentionInterface``, routed by
``fastvit.patch``, or is swapped on its own: PVT's and TimeSformer's by
``fastvit.nn.hf_self_attention``); the MLP half's calls the op does not cover (dropout or drop path
active in training, a hook on or a replacement of a module it reads) run the layer's own modules in
Hugging Face's order. Importing this module imports transformers and enters the
``FusedPreNormLayer`` classes in ``fastvit.nn.hf_layers``' tables.
"""

from __future__ import annotations

import torch
from transformers.models.lw_detr.modeling_lw_detr import LwDetrViTLayer
from transformers.models.pixio.modeling_pixio import PixioLayer
from transformers.models.pvt.modeling_pvt import PvtLayer
from transformers.models.rf_detr.modeling_rf_detr import RfDetrDinov2Layer, RfDetrDinov2SwiGLUFFN
from transformers.models.sapiens2.modeling_sapiens2 import Sapiens2GatedMLP, Sapiens2Layer
from transformers.models.timesformer.modeling_timesformer import TimesformerLayer
from transformers.models.vitpose_backbone.modeling_vitpose_backbone import VitPoseBackboneLayer
from transformers.models.vjepa2.modeling_vjepa2 import VJEPA2Layer

from fastvit.nn.fused import FusedModule, regularisation_fallback
from fastvit.nn.hf_intermediate_output import fused_intermediate_output
from fastvit.nn.hf_layers import DINOv3LayoutForward, FusedPreNormLayer, MlpHalf, register
from fastvit.ops._fx import method_leaf

__all__ = [
    "FusedLwDetrViTLayer",
    "FusedPixioLayer",
    "FusedPvtLayer",
    "FusedRfDetrDinov2GatedLayer",
    "FusedRfDetrDinov2Layer",
    "FusedSapiens2GatedLayer",
    "FusedSapiens2Layer",
    "FusedTimesformerLayer",
    "FusedVJEPA2Layer",
    "FusedVitPoseBackboneLayer",
]


class FusedVJEPA2Layer(FusedPreNormLayer, VJEPA2Layer):
    """V-JEPA 2's ``VJEPA2Layer`` (its encoder and predictor) whose LayerNorm+MLP half (with drop
    path) is one op call."""

    fastvit_mlp = MlpHalf("norm2", act="activation", drop_path="drop_path")

    def forward(
        self, hidden_states: torch.Tensor, position_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, position_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.norm1(hidden_states)
        attention_output, attn_weights = self.attention(
            hidden_states,
            position_mask=position_mask,
        )
        hidden_states = self.drop_path(attention_output) + residual
        return self._fastvit_mlp_half(hidden_states), attn_weights


class FusedVitPoseBackboneLayer(FusedPreNormLayer, VitPoseBackboneLayer):
    """ViTPose's ``VitPoseBackboneLayer`` with one MLP (``num_experts == 1``) whose LayerNorm+MLP half
    is one op call."""

    fastvit_mlp = MlpHalf("layernorm_after", act="activation")

    def forward(self, hidden_states: torch.Tensor, dataset_index: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden() or self.num_experts > 1:  # the whole forward (the experts: Hugging Face's)
            return super().forward(hidden_states, dataset_index, **kwargs)
        hidden_states_norm = self.layernorm_before(hidden_states)
        attention_output = self.attention(hidden_states_norm, **kwargs)
        hidden_states = attention_output + hidden_states
        return self._fastvit_mlp_half(hidden_states)


class FusedPixioLayer(FusedPreNormLayer, PixioLayer):
    """Pixio's ``PixioLayer`` whose LayerNorm+MLP half (hidden dropout, then drop path) is one op call."""

    fastvit_mlp = MlpHalf("layernorm_after", drop_path="drop_path", dropout="dropout")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order (dropout before drop path)."""
        return self.drop_path(self.dropout(self.mlp(self.layernorm_after(hidden_states)))) + hidden_states

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.drop_path(hidden_states) + residual
        return self._fastvit_mlp_half(hidden_states)


class _Sapiens2LayerForward(DINOv3LayoutForward):
    """The forward of the fused Sapiens2 layers: DINOv3's, line for line (``layer_scale2``, an
    ``nn.Identity`` checked by the patcher, is bypassed with the MLP half and called by Hugging Face's
    half)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.fastvit_bypassed = (*cls.fastvit_mlp.bypassed(), "layer_scale2")

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states


_SAPIENS2 = {"fc1": "up_proj", "act": "act_fn", "fc2": "down_proj", "rms": True, "drop_path": "drop_path"}


class FusedSapiens2Layer(_Sapiens2LayerForward, Sapiens2Layer):
    """Sapiens2's ``Sapiens2Layer`` (plain MLP) whose RMSNorm+MLP half is one op call."""

    fastvit_mlp = MlpHalf("norm2", **_SAPIENS2)


class FusedSapiens2GatedLayer(_Sapiens2LayerForward, Sapiens2Layer):
    """Sapiens2's ``Sapiens2Layer`` with the gated MLP (``use_gated_mlp``) whose RMSNorm + gated MLP
    half is one gated op call."""

    fastvit_mlp = MlpHalf("norm2", gate="gate_proj", **_SAPIENS2)


class _RfDetrDinov2LayerForward(FusedPreNormLayer):
    """The forward of the fused RF-DETR DINOv2 layers: Hugging Face's windowed attention half, then
    ``h + drop_path(layer_scale2(mlp(norm2(h))))`` as one op call."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, attention_mask, **kwargs)
        residual = hidden_states
        if self.global_attention:
            hidden_states = self.window_unpartition_before_attention(hidden_states)
        hidden_states_norm = self.norm1(hidden_states)
        self_attention_output, _ = self.attention(hidden_states_norm, attention_mask=attention_mask, **kwargs)
        if self.global_attention:
            self_attention_output = self.window_partition_after_attention(hidden_states.shape, self_attention_output)
        self_attention_output = self.layer_scale1(self_attention_output)
        hidden_states = self.drop_path(self_attention_output) + residual
        return self._fastvit_mlp_half(hidden_states)


class FusedRfDetrDinov2Layer(_RfDetrDinov2LayerForward, RfDetrDinov2Layer):
    """RF-DETR's ``RfDetrDinov2Layer`` (plain MLP) whose LayerNorm+MLP half with LayerScale is one op call."""

    fastvit_mlp = MlpHalf("norm2", act="activation_fn", layer_scale="layer_scale2", drop_path="drop_path")


class FusedRfDetrDinov2GatedLayer(_RfDetrDinov2LayerForward, RfDetrDinov2Layer):
    """RF-DETR's ``RfDetrDinov2Layer`` with the SwiGLU FFN (``use_swiglu_ffn``) whose LayerNorm + gated
    MLP half with LayerScale is one gated op call."""

    fastvit_mlp = MlpHalf("norm2", "up_proj", "act_fn", "down_proj", gate="gate_proj", layer_scale="layer_scale2",
                          drop_path="drop_path")  # fmt: skip


class FusedLwDetrViTLayer(FusedPreNormLayer, LwDetrViTLayer):
    """LW-DETR's ``LwDetrViTLayer`` (its windows merged for the global layers) whose LayerNorm+MLP half,
    ``h + gamma_2 * intermediate(layernorm_after(h))``, is one op call (``gamma_2``, a (D,) Parameter,
    as the layer scale)."""

    fastvit_mlp = MlpHalf("layernorm_after", act="act", mlp="intermediate", mlp_dropouts=("drop",),
                          scale_param="gamma_2")  # fmt: skip

    def _fastvit_original_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hugging Face's second half, module by module, in its order."""
        return hidden_states + self.intermediate(self.layernorm_after(hidden_states)) * self.gamma_2

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, **kwargs)
        batch_size, seq_len, channels = hidden_states.shape
        hidden_states_norm = self.layernorm_before(hidden_states)
        if not self.window:
            hidden_states_norm = hidden_states_norm.reshape(
                batch_size // self.num_windows, self.num_windows * seq_len, channels
            )
        attention_output, _ = self.attention(hidden_states_norm, **kwargs)
        attention_output = attention_output * self.gamma_1
        if not self.window:
            attention_output = attention_output.reshape(batch_size, seq_len, channels)
        hidden_states = hidden_states + attention_output
        return self._fastvit_mlp_half(hidden_states)


class FusedPvtLayer(FusedPreNormLayer, PvtLayer):
    """PVT's ``PvtLayer`` whose LayerNorm+MLP half (``PvtFFN``: ``dense1``, the activation, ``dense2``,
    its dropout twice; drop path) is one op call."""

    fastvit_mlp = MlpHalf("layer_norm_2", "dense1", "intermediate_act_fn", "dense2", drop_path="drop_path",
                          mlp_dropouts=("dropout",))  # fmt: skip

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, height, width, output_attentions)
        self_attention_outputs = self.attention(
            hidden_states=self.layer_norm_1(hidden_states),
            height=height,
            width=width,
            output_attentions=output_attentions,
        )
        attention_output = self_attention_outputs[0]
        outputs = self_attention_outputs[1:]
        attention_output = self.drop_path(attention_output)
        hidden_states = attention_output + hidden_states
        return (self._fastvit_mlp_half(hidden_states), *outputs)


class FusedTimesformerLayer(FusedModule, TimesformerLayer):
    """TimeSformer's ``TimesformerLayer`` whose LayerNorm+MLP half, ``h + drop_path(output(intermediate(
    layernorm_after(h))))``, is one op call; the attention half (space-only, joint, or divided: time
    then space, the class token averaged over the frames) is Hugging Face's, line for line. Same
    signature, ``forward(hidden_states, output_attentions=False)``. Hidden dropout or drop path in
    training, or a hook on (or a replacement of) an MLP submodule, run Hugging Face's modules.

    Example:
        >>> model = transformers.TimesformerForVideoClassification.from_pretrained(
        ...     "facebook/timesformer-base-finetuned-k400")
        >>> fastvit.patch(model)  # timesformer.encoder.layer.* -> FusedTimesformerLayer
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layernorm_after", "intermediate", "intermediate.dense", "intermediate.intermediate_act_fn",
                        "intermediate.dropout", "output", "output.dense", "output.dropout")  # fmt: skip

    def _fastvit_mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``h + drop_path(output(intermediate(layernorm_after(h))))`` (B, N, D) -> (B, N, D): one op
        call, or Hugging Face's modules."""
        traced = method_leaf(self, "_fastvit_mlp_half", hidden_states)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        dropouts = (self.intermediate.dropout, self.output.dropout)
        if not self._fastvit_submodules_intact() or regularisation_fallback(
            "Hugging Face", "TimesformerLayer", dropouts, self.drop_path
        ):
            layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
            return hidden_states + self.drop_path(layer_output)
        return fused_intermediate_output(self, hidden_states)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, ...]:
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's forward itself
            return super().forward(hidden_states, output_attentions)
        num_frames = self.config.num_frames
        num_patch_width = self.config.image_size // self.config.patch_size
        batch_size = hidden_states.shape[0]
        num_spatial_tokens = (hidden_states.size(1) - 1) // num_frames
        num_patch_height = num_spatial_tokens // num_patch_width
        if self.attention_type in ["space_only", "joint_space_time"]:
            self_attention_outputs = self.attention(
                self.layernorm_before(hidden_states), output_attentions=output_attentions
            )
            attention_output = self_attention_outputs[0]
            outputs = self_attention_outputs[1:]
            hidden_states = hidden_states + self.drop_path(attention_output)
            return (self._fastvit_mlp_half(hidden_states), *outputs)
        # divided_space_time: temporal, then spatial
        temporal_embedding = hidden_states[:, 1:, :]
        temporal_embedding = temporal_embedding.reshape(
            batch_size, num_patch_height, num_patch_width, num_frames, temporal_embedding.shape[2]
        ).reshape(batch_size * num_patch_height * num_patch_width, num_frames, temporal_embedding.shape[2])
        temporal_attention_outputs = self.temporal_attention(
            self.temporal_layernorm(temporal_embedding),
        )
        attention_output = temporal_attention_outputs[0]
        residual_temporal = self.drop_path(attention_output)
        residual_temporal = residual_temporal.reshape(
            batch_size, num_patch_height, num_patch_width, num_frames, residual_temporal.shape[2]
        ).reshape(batch_size, num_patch_height * num_patch_width * num_frames, residual_temporal.shape[2])
        residual_temporal = self.temporal_dense(residual_temporal)
        temporal_embedding = hidden_states[:, 1:, :] + residual_temporal
        init_cls_token = hidden_states[:, 0, :].unsqueeze(1)
        cls_token = init_cls_token.repeat(1, num_frames, 1)
        cls_token = cls_token.reshape(batch_size * num_frames, 1, cls_token.shape[2])
        spatial_embedding = temporal_embedding
        spatial_embedding = (
            spatial_embedding.reshape(
                batch_size, num_patch_height, num_patch_width, num_frames, spatial_embedding.shape[2]
            )
            .permute(0, 3, 1, 2, 4)
            .reshape(batch_size * num_frames, num_patch_height * num_patch_width, spatial_embedding.shape[2])
        )
        spatial_embedding = torch.cat((cls_token, spatial_embedding), 1)
        spatial_attention_outputs = self.attention(
            self.layernorm_before(spatial_embedding), output_attentions=output_attentions
        )
        attention_output = spatial_attention_outputs[0]
        outputs = spatial_attention_outputs[1:]
        residual_spatial = self.drop_path(attention_output)
        cls_token = residual_spatial[:, 0, :]
        cls_token = cls_token.reshape(batch_size, num_frames, cls_token.shape[1])
        cls_token = torch.mean(cls_token, 1, True)
        residual_spatial = residual_spatial[:, 1:, :]
        residual_spatial = (
            residual_spatial.reshape(
                batch_size, num_frames, num_patch_height, num_patch_width, residual_spatial.shape[2]
            )
            .permute(0, 2, 3, 1, 4)
            .reshape(batch_size, num_patch_height * num_patch_width * num_frames, residual_spatial.shape[2])
        )
        residual = residual_spatial
        hidden_states = temporal_embedding
        hidden_states = torch.cat((init_cls_token, hidden_states), 1) + torch.cat((cls_token, residual), 1)
        return (self._fastvit_mlp_half(hidden_states), *outputs)

    def extra_repr(self) -> str:
        norm = self.layernorm_after
        return f"dim={norm.normalized_shape[0]}, eps={norm.eps}, {self.attention_type}, fastvit={self.fastvit_op}"


for _fused in (FusedVJEPA2Layer, FusedVitPoseBackboneLayer, FusedPixioLayer, FusedLwDetrViTLayer, FusedPvtLayer):
    register(_fused)
register(FusedSapiens2Layer, FusedSapiens2GatedLayer, Sapiens2GatedMLP)
register(FusedRfDetrDinov2Layer, FusedRfDetrDinov2GatedLayer, RfDetrDinov2SwiGLUFFN)
