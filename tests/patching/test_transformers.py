"""fastvit.patch on Hugging Face ViTModel / ViTForImageClassification (transformers 5.x layout,
LayerNorm eps 1e-12), compared with an unpatched copy on the CPU (torch route, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    BATCH,
    DEPTH,
    HAS_PATCH_EMBED,
    assert_outputs_and_grads_match,
    expected_parts,
    hf_classifier,
    hf_config,
    images,
    module_types,
    pair,
    perturb_,
    storage_map,
)

transformers = pytest.importorskip("transformers")
from transformers import ViTModel  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402

from fastvit.patching import transformers as hf_adapter  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hf_adapter.INSTALLED_LAYOUT_SUPPORTED, reason="the installed transformers has the 4.x ViT layout"
)


def logits(model, x):
    return model(x).logits


def test_patched_matches_unpatched(op_calls):
    reference, patched, report = pair(hf_classifier().eval())
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert_outputs_and_grads_match(reference, patched, images(), run=logits)
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == DEPTH
    assert op_calls["layernorm_mlp"][0]["kwargs"]["eps"] == 1e-12
    assert len(op_calls["patch_embed"]) == (1 if HAS_PATCH_EMBED else 0)
    assert isinstance(patched.vit.layers[0], GradientCheckpointingLayer)


def test_vit_model_outputs_and_return_tuples():
    reference, patched, _ = pair(perturb_(ViTModel(hf_config())).eval())
    x = images()
    want, got = reference(x), patched(x)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-5, atol=1e-6)
    got_tuple = patched(x, return_dict=False)
    assert isinstance(got_tuple, tuple) and len(got_tuple) == len(reference(x, return_dict=False))
    attn_out = patched.layers[0].attention(torch.randn(BATCH, 17, 32))
    assert isinstance(attn_out, tuple) and attn_out[1] is None  # (attn_output, attn_weights)


def test_state_dict_is_untouched_and_unpatch_restores_exactly():
    model = hf_classifier().eval()
    x = images()
    before_out, before_storage, before_types = model(x).logits, storage_map(model), module_types(model)
    fastvit.patch(model)
    assert storage_map(model) == before_storage
    fastvit.unpatch(model)
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x).logits, before_out)


def test_no_split_modules_name_the_fused_layers():
    # accelerate's device maps and the Trainer's FSDP find the layers by the class names the model
    # lists; patched layers are instances of the fused classes, and a name matching no module raises
    from transformers.trainer_pt_utils import get_module_class_from_name

    def no_split(model):
        return {path: set(m._no_split_modules) for path, m in model.named_modules()
                if getattr(m, "_no_split_modules", None)}  # fmt: skip

    model = hf_classifier().eval()
    before = no_split(model)
    assert before[""] == {"ViTEmbeddings", "ViTLayer"}
    fastvit.patch(model)
    for path in before:
        names = model.get_submodule(path)._no_split_modules
        assert {"ViTLayer", "ViTEmbeddings"}.isdisjoint(names)  # every instance was swapped
        assert all(get_module_class_from_name(model, name) is not None for name in names)
    assert {"FusedViTLayer", "FusedViTEmbeddings"} <= set(model._no_split_modules)
    fastvit.unpatch(model)
    assert no_split(model) == before
    assert not any("_fastvit_previous_no_split_modules" in vars(m) for m in model.modules())


def test_no_split_modules_after_patching_a_submodule_then_the_model():
    # fastvit.patch(model.vit.layers) first: the second call's swaps were the embedding alone, and
    # the model's list kept "ViTLayer", which no module was any more, without "FusedViTLayer"
    from transformers.trainer_pt_utils import get_module_class_from_name

    model = hf_classifier().eval()
    layers = next(m for name, m in model.named_modules() if name.endswith("layers") or name.endswith("layer"))
    fastvit.patch(layers)
    fastvit.patch(model)
    names = set(model._no_split_modules)
    assert {"FusedViTLayer", "FusedViTEmbeddings"} <= names and "ViTLayer" not in names
    assert all(get_module_class_from_name(model, name) is not None for name in names)


def test_output_attentions_and_hidden_states(op_calls):
    # output_attentions runs Hugging Face's attention for that call (eager returns the weights);
    # hidden states are captured by hooks matched on ViTLayer, which the fused layer still is
    reference, patched, _ = pair(hf_classifier(attn_implementation="eager").eval())
    x = images()
    want, got = reference(x, output_attentions=True), patched(x, output_attentions=True)
    assert op_calls["flash_attention"] == []
    assert len(got.attentions) == DEPTH
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    want, got = reference(x, output_hidden_states=True), patched(x, output_hidden_states=True)
    assert len(op_calls["flash_attention"]) == DEPTH
    assert len(got.hidden_states) == DEPTH + 1
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_interpolate_pos_encoding_and_bool_masked_pos(op_calls):
    reference, patched, _ = pair(perturb_(ViTModel(hf_config(), use_mask_token=True)).eval())

    def run(model, x):
        return model(x, interpolate_pos_encoding=True).last_hidden_state

    assert_outputs_and_grads_match(reference, patched, images(size=24), run=run)  # 6x6 grid vs 4x4
    mask = torch.rand(BATCH, 16, generator=torch.Generator().manual_seed(0)) > 0.5

    def run_masked(model, x):
        return model(x, bool_masked_pos=mask).last_hidden_state

    assert_outputs_and_grads_match(reference, patched, images(), run=run_masked)
    assert op_calls["patch_embed"] == []  # both calls ran Hugging Face's embedding
    assert len(op_calls["flash_attention"]) == 2 * DEPTH


def test_gradient_checkpointing(op_calls):
    reference, patched, _ = pair(hf_classifier().train())
    # Hugging Face's switch (renamed activation_checkpointing_enable in transformers 5.x)
    enable = getattr(patched, "activation_checkpointing_enable", patched.gradient_checkpointing_enable)
    enable()
    assert patched.vit.layers[0].gradient_checkpointing
    assert_outputs_and_grads_match(reference, patched, images(), run=logits)
    assert len(op_calls["layernorm_mlp"]) == 2 * DEPTH  # forward, then the recompute


def test_dropout_runs_hugging_face_in_training(op_calls, fresh_warnings):
    model = hf_classifier(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2).train()
    reference, patched, report = pair(model)
    notes = " ".join(e.detail for e in report.replaced)
    assert "attention dropout 0.2" in notes and "hidden dropout 0.2" in notes
    with pytest.warns(fastvit.FastvitFallbackWarning):
        assert_outputs_and_grads_match(reference, patched, images(), run=logits, seed=11)
    assert op_calls["flash_attention"] == [] and op_calls["layernorm_mlp"] == []
    reference.eval(), patched.eval()
    assert_outputs_and_grads_match(reference, patched, images(), run=logits)
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == DEPTH


def test_autocast_bf16():
    reference, patched, _ = pair(hf_classifier().eval())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, out = reference(images()).logits, patched(images()).logits
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)


def test_activations(op_calls):
    # gelu_new (tanh formula written out) maps to the op's tanh GELU; relu is not fused
    reference, patched, _ = pair(hf_classifier(hidden_act="gelu_new").eval())
    assert_outputs_and_grads_match(reference, patched, images(), run=logits)
    assert op_calls["layernorm_mlp"][0]["kwargs"]["approximate"] == "tanh"
    reference, patched, report = pair(hf_classifier(hidden_act="relu").eval())
    reasons = [e.detail for e in report.skipped if e.part == "mlp"]
    assert len(reasons) == DEPTH and "mlp.activation_fn is ReLU;" in reasons[0]
    assert_outputs_and_grads_match(reference, patched, images(), run=logits)


@pytest.mark.parametrize("installed_layout_supported", [True, False])
def test_transformers_4_layout_is_recognised(installed_layout_supported, monkeypatch):
    # True: a 4.x-layout module beside transformers 5.x; False: as with transformers 4.x installed
    monkeypatch.setattr(hf_adapter, "INSTALLED_LAYOUT_SUPPORTED", installed_layout_supported)
    class ViTLayer(nn.Module):  # with the children of transformers 4.x's ViTLayer
        def __init__(self):
            super().__init__()
            self.attention = nn.Module()
            self.attention.attention = nn.ModuleDict({n: nn.Linear(8, 8) for n in ("query", "key", "value")})
            self.intermediate = nn.ModuleDict({"dense": nn.Linear(8, 16)})
            self.output = nn.ModuleDict({"dense": nn.Linear(16, 8)})

    model = nn.Sequential(ViTLayer(), ViTLayer())
    with pytest.raises(ValueError, match=r"(?s)nothing to patch.*transformers 4\.x layout.*>= 5"):
        fastvit.patch(model)


def test_a_layer_fastvit_does_not_know_is_named_in_the_report():
    """A transformers layer with an attention and an MLP that no entry covers (GLPN's, whose Mix-FFN
    has a depthwise conv inside; BLIP's text layers) is listed, so that its MLP half is not left out of
    the report; the layers fastvit fuses are not."""
    stages = dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2])
    config = transformers.GLPNConfig(**stages, mlp_ratios=[2, 2], sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2])
    report = fastvit.patch(transformers.GLPNModel(config))
    assert report.counts() == {"attention": 2}  # its efficient self-attentions
    skipped = [e for e in report.skipped if e.part == "mlp"]
    assert [e.path for e in skipped] == ["encoder.block.0.0", "encoder.block.1.0"]
    reason = "GLPNLayer (transformers.models.glpn.modeling_glpn) is not a layer fastvit fuses"
    assert all(reason in e.detail for e in skipped)
    block = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    vit = fastvit.patch(ViTModel(transformers.ViTConfig(image_size=16, patch_size=8, **block)))
    assert not vit.skipped
