"""The LayerNorm+MLP halves of Hugging Face's pre-norm layers beyond ViT (fastvit.nn.hf_layers):
what is fused and what is reported, LayerScale, drop path and hooks. Outputs and gradients of every
covered family are compared in test_transformers_interface.py::test_patched_matches_unpatched."""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    ATOL,
    DEPTH,
    RTOL,
    assert_outputs_and_grads_match,
    images,
    module_types,
    perturb_,
    storage_map,
    unfused_embeddings_only,
)

T = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, image_size=16, patch_size=4)


def dinov2(**overrides) -> torch.nn.Module:
    return perturb_(T.Dinov2Model(T.Dinov2Config(**(VISION | overrides)))).eval()


def hidden(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state


def test_layer_scale_goes_to_the_op(op_calls):
    reference = dinov2(layerscale_value=0.3)
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts()["mlp"] == DEPTH
    assert_outputs_and_grads_match(reference, patched, images(), run=hidden)
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == DEPTH
    assert calls[0]["kwargs"]["layer_scale"] is patched.encoder.layer[0].layer_scale2.lambda1


def test_drop_path_in_training_runs_hugging_face_and_says_so(op_calls, fresh_warnings):
    reference = dinov2(drop_path_rate=0.5).train()
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert all("drop path 0.5" in e.detail for e in report.replaced if e.part == "mlp")
    with pytest.warns(UserWarning, match="hidden dropout or drop path"):
        assert_outputs_and_grads_match(reference, patched, images(), run=hidden, seed=0)
    assert not op_calls["layernorm_mlp"]
    patched.eval()
    reference.eval()
    torch.testing.assert_close(hidden(patched, images()), hidden(reference, images()), rtol=RTOL, atol=ATOL)
    assert len(op_calls["layernorm_mlp"]) == DEPTH


def test_activations_go_to_the_op_and_others_are_reported(op_calls):
    clip = perturb_(T.CLIPVisionModel(T.CLIPVisionConfig(**VISION, intermediate_size=64))).eval()  # quick_gelu
    patched = copy.deepcopy(clip)
    assert fastvit.patch(patched).counts()["mlp"] == DEPTH
    assert_outputs_and_grads_match(clip, patched, images(), run=hidden)
    assert [c["kwargs"]["activation"] for c in op_calls["layernorm_mlp"]] == ["quick_gelu"] * DEPTH
    # gelu_fast and gelu_accurate are the tanh formula written otherwise (ViViT's default is gelu_fast)
    for name in ("gelu_fast", "gelu_accurate"):
        clip = perturb_(T.CLIPVisionModel(T.CLIPVisionConfig(**VISION, intermediate_size=64, hidden_act=name))).eval()
        patched = copy.deepcopy(clip)
        assert fastvit.patch(patched).counts()["mlp"] == DEPTH
        assert_outputs_and_grads_match(clip, patched, images(), run=hidden, rtol=1e-4, atol=1e-5)
        assert op_calls["layernorm_mlp"][-1]["kwargs"]["activation"] == "gelu_tanh"
    relu = T.CLIPVisionModel(T.CLIPVisionConfig(**VISION, intermediate_size=64, hidden_act="relu"))
    reasons = [e.detail for e in fastvit.patch(relu).skipped if e.part == "mlp"]
    assert len(reasons) == DEPTH and "ReLU" in reasons[0]


def test_rms_norm_swiglu_layers_go_to_the_op(op_calls):
    """AIMv2 and Pixtral: RMSNorm + SwiGLU (gate_proj / up_proj) as norm="rms" with fc1_gate_weight."""
    block = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2)
    aimv2 = perturb_(T.Aimv2VisionModel(T.Aimv2VisionConfig(**VISION, intermediate_size=64))).eval()
    patched = copy.deepcopy(aimv2)
    assert fastvit.patch(patched).counts()["mlp"] == DEPTH
    assert_outputs_and_grads_match(aimv2, patched, images(), run=hidden, rtol=1e-4, atol=1e-5)
    call = op_calls["layernorm_mlp"][0]["kwargs"]
    layer = patched.encoder.layers[0]
    assert call["norm"] == "rms" and call["activation"] == "silu"
    assert call["fc1_gate_weight"] is layer.ffn.gate_proj.weight and call["eps"] == layer.rms_norm2.variance_epsilon
    pixtral = perturb_(T.PixtralVisionModel(T.PixtralVisionConfig(**block, image_size=16, patch_size=4, head_dim=16)))
    pixtral_patched = copy.deepcopy(pixtral.eval())
    assert fastvit.patch(pixtral_patched).counts()["mlp"] == DEPTH

    def run(model, x):
        return model(pixel_values=x, image_sizes=[(16, 16)] * x.shape[0]).last_hidden_state

    assert_outputs_and_grads_match(pixtral, pixtral_patched, images(), run=run, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "build, fused",
    [
        (lambda: dinov2(use_swiglu_ffn=True, layerscale_value=0.3), "FusedDinov2GatedLayer"),  # DINOv2-giant's
        (lambda: perturb_(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
            **VISION, use_swiglu_ffn=True, num_register_tokens=2))).eval(), "FusedDinov2WithRegistersGatedLayer"),
        (lambda: perturb_(T.DINOv3ViTModel(T.DINOv3ViTConfig(
            **VISION, intermediate_size=64, use_gated_mlp=True, hidden_act="silu", num_register_tokens=1))).eval(),
         "FusedDINOv3ViTGatedLayer"),  # DINOv3 ViT-L and larger
    ],
)  # fmt: skip
def test_gated_mlps_go_to_the_op(build, fused, op_calls):
    """DINOv2-giant's SwiGLU FFN and DINOv3-L+'s gated MLP: fc2(silu(gate_proj(x)) * up_proj(x)) with
    LayerScale, one gated op call (they were reported as not swapped)."""
    reference = build()
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts()["mlp"] == DEPTH and not [e for e in report.skipped if e.part == "mlp"]
    layers = [m for m in patched.modules() if type(m).__name__ == fused]
    assert len(layers) == DEPTH
    assert_outputs_and_grads_match(reference, patched, images(), run=hidden, rtol=1e-4, atol=1e-5)
    call = op_calls["layernorm_mlp"][0]["kwargs"]
    assert call["fc1_gate_weight"] is layers[0].mlp.gate_proj.weight and call["activation"] == "silu"
    assert call["layer_scale"] is layers[0].layer_scale2.lambda1


def test_hook_on_the_mlp_skips_the_layer_and_unpatch_is_exact():
    model = dinov2()
    x = images()
    before, storages, types = hidden(model, x), storage_map(model), module_types(model)
    model.encoder.layer[1].layer_scale2.register_forward_hook(lambda m, args, out: out * 2)
    hooked = hidden(model, x)
    report = fastvit.patch(model)
    assert [(e.path, e.part) for e in report.skipped] == [("encoder.layer.1", "mlp")]
    assert "layer_scale2 has a forward hook" in report.skipped[0].detail
    torch.testing.assert_close(hidden(model, x), hooked, rtol=RTOL, atol=ATOL)
    fastvit.unpatch(model)
    model.encoder.layer[1].layer_scale2._forward_hooks.clear()
    assert module_types(model) == types and storage_map(model) == storages
    assert torch.equal(hidden(model, x), before)


def test_embeddings_at_another_resolution_or_masked_run_hugging_face_partial_patches_fused(op_calls):
    reference = dinov2()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    assert_outputs_and_grads_match(reference, patched, images(), run=hidden)
    assert len(op_calls["patch_embed"]) == 1
    assert_outputs_and_grads_match(reference, patched, images(size=24), run=hidden)  # resampled pos_embed
    assert len(op_calls["patch_embed"]) == 1
    # not whole patches: the conv drops 2 rows and columns, leaving the trained grid; the op gets the rest
    assert_outputs_and_grads_match(reference, patched, images(size=(18, 18)), run=hidden)
    assert len(op_calls["patch_embed"]) == 2
    masked = torch.zeros(3, 16, dtype=torch.bool)
    masked[:, ::3] = True
    reference.embeddings.mask_token.data.normal_()
    patched.embeddings.mask_token.data.copy_(reference.embeddings.mask_token)

    def run_masked(model, x):
        return model(pixel_values=x, bool_masked_pos=masked).last_hidden_state

    assert_outputs_and_grads_match(reference, patched, images(), run=run_masked)
    assert len(op_calls["patch_embed"]) == 2  # the resampled and the masked calls ran Hugging Face's
    clip = T.CLIPVisionModel(T.CLIPVisionConfig(**VISION, intermediate_size=64)).eval()
    clip_patched = copy.deepcopy(clip)
    fastvit.patch(clip_patched)

    def interpolated(model, x):
        return model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state

    assert_outputs_and_grads_match(clip, clip_patched, images(size=24), run=interpolated)
    assert len(op_calls["patch_embed"]) == 2


def test_no_split_modules_name_each_fused_class_present():
    """A DINOv2 layer has two fused classes (plain and gated MLP): each model's _no_split_modules
    names those its own layers are, whatever the order of the patch (it named one per original,
    which one depending on a set's order: a teacher's gated layers or a student's plain ones were
    named nowhere, and a name matching no module makes accelerate / the Trainer's FSDP raise)."""
    from transformers.trainer_pt_utils import get_module_class_from_name

    for _ in range(3):
        teacher, student = dinov2(use_swiglu_ffn=True), dinov2()
        fastvit.patch(torch.nn.ModuleList([teacher, student]))
        assert {"FusedDinov2GatedLayer", "FusedDinov2Embeddings"} == set(teacher._no_split_modules)
        assert {"FusedDinov2Layer", "FusedDinov2Embeddings"} == set(student._no_split_modules)
    mixed = dinov2()
    mixed.encoder.layer[0].mlp = T.models.dinov2.modeling_dinov2.Dinov2SwiGLUFFN(mixed.config)
    fastvit.patch(mixed)
    assert {"FusedDinov2GatedLayer", "FusedDinov2Layer"} <= set(mixed._no_split_modules)
    assert all(get_module_class_from_name(mixed, name) is not None for name in mixed._no_split_modules)


def test_repatch_after_the_mlp_changed_kind_fuses_the_other_class(op_calls, fresh_warnings):
    """A fused DINOv2 / DINOv3 layer whose MLP is replaced by the other kind (plain <-> gated) falls
    back to Hugging Face's modules (said once); fastvit.patch called again fuses it as the other
    class (it was skipped: "not Dinov2MLP"), as a fresh patch would, and unpatch gives the original."""
    from transformers.models.dinov2.modeling_dinov2 import Dinov2MLP, Dinov2SwiGLUFFN

    reference = dinov2(layerscale_value=0.3)
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for model in (reference, patched):
        torch.manual_seed(0)
        model.encoder.layer[0].mlp = perturb_(Dinov2SwiGLUFFN(model.config))
    with pytest.warns(fastvit.FastvitFallbackWarning, match="mlp replaced or wrapped"):
        torch.testing.assert_close(hidden(patched, images()), hidden(reference, images()), rtol=RTOL, atol=ATOL)
    report = fastvit.patch(patched)
    (entry,) = report.replaced
    assert entry.path == "encoder.layer.0" and "fused anew as FusedDinov2GatedLayer" in entry.detail
    assert type(patched.encoder.layer[0]).__name__ == "FusedDinov2GatedLayer"
    assert {"FusedDinov2GatedLayer", "FusedDinov2Layer"} <= set(patched._no_split_modules)
    op_calls["layernorm_mlp"].clear()
    assert_outputs_and_grads_match(reference, patched, images(), run=hidden, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == DEPTH
    # and back: the gated layer's MLP replaced by a plain one
    for model in (reference, patched):
        torch.manual_seed(1)
        model.encoder.layer[0].mlp = perturb_(Dinov2MLP(model.config))
    fastvit.patch(patched)
    assert type(patched.encoder.layer[0]).__name__ == "FusedDinov2Layer"
    assert set(patched._no_split_modules) == {"FusedDinov2Layer", "FusedDinov2Embeddings"}  # no stale name
    assert_outputs_and_grads_match(reference, patched, images(), run=hidden, rtol=1e-4, atol=1e-5)
    fastvit.unpatch(patched)
    assert type(patched.encoder.layer[0]).__name__ == "Dinov2Layer"


def beit(**overrides) -> torch.nn.Module:
    args = VISION | dict(use_relative_position_bias=True, layer_scale_init_value=0.1)
    return perturb_(T.BeitModel(T.BeitConfig(**(args | overrides)))).eval()


@pytest.mark.parametrize("layer_scale", [0.1, 0.0], ids=["lambda", "none"])
def test_beit_layer_scale_goes_to_the_op(layer_scale, op_calls):
    """BEiT's MLP half, h + drop_path(lambda_2 * dropout(mlp(layernorm_after(h)))): lambda_2 (a bare (D,)
    Parameter) as the layer scale, none for the float 1.0 of a model built without it."""
    reference = beit(layer_scale_init_value=layer_scale)
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH, "patch_embed": 1} and unfused_embeddings_only(report)
    assert_outputs_and_grads_match(reference, patched, images(), run=hidden)
    scale = op_calls["layernorm_mlp"][0]["kwargs"]["layer_scale"]
    assert scale is (patched.layers[0].lambda_2 if layer_scale else None)


def test_beit_drop_path_and_dropout_run_hugging_face(op_calls, fresh_warnings):
    reference = beit(drop_path_rate=0.5, hidden_dropout_prob=0.1).train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with pytest.warns(UserWarning, match="hidden dropout or drop path"):
        assert_outputs_and_grads_match(reference, patched, images(), run=hidden, seed=0)
    assert not op_calls["layernorm_mlp"]
    model = beit()
    model.layers[1].lambda_2 = torch.nn.Parameter(torch.ones(1))  # broadcasts in HF; no (D,) layer scale
    report = fastvit.patch(model)
    (skip,) = [e for e in report.skipped if e.part == "mlp"]
    assert skip.path == "layers.1" and "lambda_2 is neither 1.0 nor a (32,) layer scale" in skip.detail
