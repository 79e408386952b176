"""The pre-norm layers of Hugging Face's video, pose and detection backbones patched
(fastvit.nn.hf_backbone_layers): V-JEPA 2, ViTPose, Pixio, Sapiens2 (RMSNorm; plain and gated MLP),
RF-DETR's windowed DINOv2 (plain and SwiGLU MLP, LayerScale) and LW-DETR's ViT (``gamma_2``). Each
layer's norm+MLP half is one fastvit.layernorm_mlp call; the attention goes through transformers'
interface. Outputs and every gradient by the tolerance rule against the unpatched model in float64,
with op-call counts; dropout and drop path in training run Hugging Face's modules in its order (a
seeded step matches); ViTPose+'s experts and a Sapiens2 ``layer_scale2`` that is not an Identity are
reported; a hook on an MLP runs Hugging Face's modules; unpatch; torch.compile; torch.export; the
Triton kernels in the interpreter.

Tiny random configs (dim 32, 2 heads, two layers; 32 px images in 8 px patches; V-JEPA 2: four
frames in tubelets of two), no downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    layer_skips,
    pair,
    perturb_,
    source_lines,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from transformers.models.lw_detr import configuration_lw_detr, modeling_lw_detr  # noqa: E402
from transformers.models.rf_detr import configuration_rf_detr, modeling_rf_detr  # noqa: E402

from fastvit.nn import hf_backbone_layers as fused  # noqa: E402

LAYERS = 2
SMALL = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2)


class Features(nn.Module):
    """A backbone or model on one tensor: its last hidden state, or its last feature map."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(**{self.key: x})
        return out.feature_maps[-1] if hasattr(out, "feature_maps") else out.last_hidden_state


@dataclass(frozen=True)
class Family:
    build: Callable[..., nn.Module]  # (**config overrides) -> the bare model
    key: str  # the input's keyword
    shape: tuple[int, ...]  # one input's shape, batch excluded
    fused: type  # the layers' fused class
    layers: int = LAYERS


def _vjepa2(**overrides) -> nn.Module:
    config = T.VJEPA2Config(crop_size=32, frames_per_clip=4, patch_size=8, tubelet_size=2, pred_hidden_size=32,
                            pred_num_hidden_layers=1, pred_num_attention_heads=2, **(SMALL | overrides))  # fmt: skip
    return T.VJEPA2Model(config)


def _sapiens2(gated: bool) -> Callable[..., nn.Module]:
    def build(**overrides) -> nn.Module:
        config = dict(image_size=32, patch_size=8, intermediate_size=64, use_gated_mlp=gated, layerscale_value=0.5)
        return T.Sapiens2Model(T.Sapiens2Config(**(SMALL | config | overrides)))

    return build


def _rf_detr(swiglu: bool) -> Callable[..., nn.Module]:
    def build(**overrides) -> nn.Module:
        config = dict(image_size=32, patch_size=8, num_windows=2, window_block_indexes=[0], out_features=["stage2"],
                      use_swiglu_ffn=swiglu, layerscale_value=0.5)  # fmt: skip
        config = configuration_rf_detr.RfDetrDinov2Config(**(SMALL | config | overrides))
        return modeling_rf_detr.RfDetrDinov2Backbone(config)

    return build


def _lw_detr(**overrides) -> nn.Module:
    config = dict(image_size=32, patch_size=8, num_windows=4, window_block_indices=[0], out_indices=[2], mlp_ratio=2)
    return modeling_lw_detr.LwDetrViTBackbone(configuration_lw_detr.LwDetrViTConfig(**(SMALL | config | overrides)))


def _vitpose(**overrides) -> nn.Module:
    config = dict(image_size=[32, 32], patch_size=[8, 8], out_indices=[2])
    return T.VitPoseBackbone(T.VitPoseBackboneConfig(**(SMALL | config | overrides)))


def _pixio(**overrides) -> nn.Module:
    return T.PixioModel(T.PixioConfig(**(SMALL | dict(image_size=32, patch_size=8) | overrides)))


FAMILIES = {
    # the encoder's two layers and the predictor's one
    "vjepa2": Family(_vjepa2, "pixel_values_videos", (4, 3, 32, 32), fused.FusedVJEPA2Layer, LAYERS + 1),
    "vitpose": Family(_vitpose, "pixel_values", (3, 32, 32), fused.FusedVitPoseBackboneLayer),
    "pixio": Family(_pixio, "pixel_values", (3, 32, 32), fused.FusedPixioLayer),
    "sapiens2": Family(_sapiens2(False), "pixel_values", (3, 32, 32), fused.FusedSapiens2Layer),
    "sapiens2_gated": Family(_sapiens2(True), "pixel_values", (3, 32, 32), fused.FusedSapiens2GatedLayer),
    "rf_detr": Family(_rf_detr(False), "pixel_values", (3, 32, 32), fused.FusedRfDetrDinov2Layer),
    "rf_detr_swiglu": Family(_rf_detr(True), "pixel_values", (3, 32, 32), fused.FusedRfDetrDinov2GatedLayer),
    "lw_detr": Family(_lw_detr, "pixel_values", (3, 32, 32), fused.FusedLwDetrViTLayer),
}


def build(name: str, **overrides) -> nn.Module:
    family = FAMILIES[name]
    return Features(perturb_(family.build(**overrides)), family.key).eval()


def inputs(name: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *FAMILIES[name].shape, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(name, op_calls):
    family = FAMILIES[name]
    reference, patched, report = pair(build(name))
    assert report.counts() == {"attention": family.layers, "mlp": family.layers} and unfused_embeddings_only(report)
    assert [type(m) for m in patched.modules()].count(family.fused) == family.layers
    assert_matches_by_the_rule(reference, patched, inputs(name))
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == family.layers
    gated = name.endswith(("_gated", "_swiglu"))
    assert all((call["kwargs"].get("fc1_gate_weight") is not None) == gated for call in calls)
    if name.startswith("sapiens2"):
        assert all(call["kwargs"]["norm"] == "rms" for call in calls)
    if name.startswith(("rf_detr", "lw_detr")):
        assert all(call["kwargs"]["layer_scale"] is not None for call in calls)


@pytest.mark.parametrize(("name", "overrides"), [
    ("pixio", dict(hidden_dropout_prob=0.2, drop_path_rate=0.2)),  # dropout, then drop path: Hugging Face's order
    ("vjepa2", dict(drop_path_rate=0.2)),
    ("lw_detr", dict(dropout_prob=0.2)),
])  # fmt: skip
def test_regularisation_in_training_runs_hugging_face_in_its_order(name, overrides, op_calls, fresh_warnings):
    reference, patched, report = pair(build(name, **overrides))
    # (a drop path's rate rises from 0 over the layers: the first has none)
    assert any("in training its MLP half runs Hugging Face's modules" in e.detail for e in report.replaced)
    reference.train(), patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning):
        assert_outputs_and_grads_match(reference, patched, inputs(name), seed=0, rtol=1e-4, atol=1e-5)


def test_sapiens2_layer_is_dinov3_line_for_line():
    """The fused Sapiens2 layers run DINOv3's fused forward (``hf_layers.DINOv3LayoutForward``)."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer
    from transformers.models.sapiens2.modeling_sapiens2 import Sapiens2Layer

    assert source_lines(Sapiens2Layer.forward) == source_lines(DINOv3ViTLayer.forward)


def test_what_the_op_cannot_compute_is_reported():
    report = fastvit.patch(build("vitpose", num_experts=2, part_features=8))  # ViTPose+: an MLP per dataset
    assert report.counts() == {"attention": LAYERS}
    assert all("mlp is VitPoseBackboneMoeMLP, not VitPoseBackboneMLP" in e.detail for e in layer_skips(report))
    model = build("sapiens2")
    for layer in model.model.model.layer:
        layer.layer_scale2 = nn.Dropout(0.0)
    report = fastvit.patch(model)
    assert all("layer_scale2 is Dropout, not nn.Identity" in e.detail for e in report.skipped if e.part == "mlp")


def test_a_hook_on_the_mlp_runs_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("sapiens2_gated"))
    for model in (reference, patched):
        model.model.model.layer[0].layer_scale2.register_forward_hook(lambda m, args, out: out * 2)
    x = inputs("sapiens2_gated")
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on layer_scale2"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1


class TestVJEPA2Checks(ModelChecks):
    build = staticmethod(lambda: build("vjepa2"))
    inputs = staticmethod(lambda batch: inputs("vjepa2", batch))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS + 1


class TestRfDetrChecks(ModelChecks):
    build = staticmethod(lambda: build("rf_detr_swiglu"))
    inputs = staticmethod(lambda batch: inputs("rf_detr_swiglu", batch))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS
