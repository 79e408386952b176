"""Hugging Face's own-forward self-attentions patched (fastvit.nn.hf_self_attention): PVT's and GLPN's
efficient self-attention and PVTv2's (keys and values from the spatially reduced map; PVTv2-Li's
pooled) TimeSformer's divided space-time attention and MobileViT's, each one fastvit.flash_attention call
(MobileViT's transformer layers' LayerNorm+MLP halves one fastvit.layernorm_mlp call each).
Outputs and every gradient (the reduction convs and norms included) by the tolerance rule against
the unpatched model in float64; the attention weights requested and attention dropout in training
run Hugging Face's forward; unpatch; torch.compile; torch.export; the Triton kernels in the
interpreter.

Tiny models, no downloads: two stages (dims 16 / 32, 1 and 2 heads, the first reducing its keys 2 x 2)
on 32 px images (64 px for PVTv2-Li's 7 x 7 pooling), and a TimeSformer of two 16 px frames.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    layer_skips,
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_self_attention  # noqa: E402

STAGES = dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
OVERLAPPING = dict(STAGES, sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pvt_v2(**overrides) -> torch.nn.Module:
    return HFLastHiddenState(perturb_(T.PvtV2Model(T.PvtV2Config(**(OVERLAPPING | overrides))))).eval()


# family -> (builder, inputs, fused class, its calls)
FAMILIES = {
    "pvt": (lambda: HFLastHiddenState(perturb_(T.PvtModel(T.PvtConfig(
        image_size=32, sequence_reduction_ratios=[2, 1], patch_sizes=[4, 2], strides=[4, 2], **STAGES)))).eval(),
        torch.randn(2, 3, 32, 32, generator=_gen(0)), hf_self_attention.FusedPvtEfficientSelfAttention, 2),
    "glpn": (lambda: HFLastHiddenState(perturb_(T.GLPNModel(T.GLPNConfig(**OVERLAPPING)))).eval(),
             torch.randn(2, 3, 32, 32, generator=_gen(0)), hf_self_attention.FusedGLPNEfficientSelfAttention, 2),
    "pvt_v2": (pvt_v2, torch.randn(2, 3, 32, 32, generator=_gen(0)), hf_self_attention.FusedPvtV2SelfAttention, 2),
    "pvt_v2_li": (lambda: pvt_v2(linear_attention=True), torch.randn(2, 3, 64, 64, generator=_gen(0)),
                  hf_self_attention.FusedPvtV2SelfAttention, 2),
    # two frames of 16 x 16 in 4 x 4 patches: time attention (2 frames) then space attention (16 patches + cls)
    "timesformer": (lambda: HFLastHiddenState(perturb_(T.TimesformerModel(T.TimesformerConfig(
        image_size=16, patch_size=4, num_frames=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64)))).eval(), torch.randn(2, 2, 3, 16, 16, generator=_gen(1)),
        hf_self_attention.FusedTimesformerSelfAttention, 4),
    # 64 px: three MobileViT blocks (2, 4 and 3 transformer layers) over 2 x 2 patches of their maps
    "mobilevit": (lambda: HFLastHiddenState(perturb_(T.MobileViTModel(T.MobileViTConfig(
        image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2)))).eval(), torch.randn(2, 3, 64, 64, generator=_gen(2)),
        hf_self_attention.FusedMobileViTSelfAttention, 9),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(family, op_calls):
    build, x, fused, calls = FAMILIES[family]
    reference, patched, report = pair(build())
    assert report.counts()["attention"] == calls and not [e for e in report.skipped if e.part == "attention"]
    # their layers' MLP halves (PVT's FFN, the Mix-FFN's depthwise conv, TimeSformer's layer) are named
    assert all("is not a layer fastvit fuses" in e.detail for e in layer_skips(report))
    assert [type(m) for m in patched.modules()].count(fused) == calls
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["flash_attention"]) == calls


@pytest.mark.parametrize("family", ["mobilevit", "pvt", "timesformer"])
def test_their_layers_fuse_their_mlp_half_too(family, op_calls):
    """MobileViT's transformer layers (ViT's 4.x module layout:
    ``hf_intermediate_output.FusedMobileViTTransformerLayer``), PVT's (``PvtFFN``:
    ``hf_backbone_layers.FusedPvtLayer``) and TimeSformer's (its divided space-time layer:
    ``hf_backbone_layers.FusedTimesformerLayer``) also get their LayerNorm+MLP half fused."""
    from fastvit.nn import hf_backbone_layers, hf_intermediate_output

    fused, layers = {"mobilevit": (hf_intermediate_output.FusedMobileViTTransformerLayer, 9),
                     "pvt": (hf_backbone_layers.FusedPvtLayer, 2),
                     "timesformer": (hf_backbone_layers.FusedTimesformerLayer, 2)}[family]  # fmt: skip
    build, x, _, calls = FAMILIES[family]
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": calls, "mlp": layers} and unfused_embeddings_only(report)
    assert [type(m) for m in patched.modules()].count(fused) == layers
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == layers


def test_timesformer_drop_path_in_training_runs_hugging_face(op_calls, fresh_warnings):
    from transformers.models.timesformer.modeling_timesformer import TimesformerDropPath

    model = perturb_(T.TimesformerModel(T.TimesformerConfig(
        image_size=16, patch_size=4, num_frames=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, attention_type="space_only")))  # fmt: skip
    model.encoder.layer[1].drop_path = TimesformerDropPath(0.3)  # its config types the rate as an int
    reference, patched, report = pair(HFLastHiddenState(model).eval())
    assert any("drop path" in e.detail for e in report.replaced if e.part == "mlp")
    reference.train(), patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="TimesformerLayer has hidden dropout or drop path"):
        assert_outputs_and_grads_match(reference, patched, FAMILIES["timesformer"][1], seed=0, rtol=1e-4,
                                       atol=1e-5)  # fmt: skip
    assert len(op_calls["layernorm_mlp"]) == 1  # the first layer's drop path is 0


def test_reduced_keys_reach_the_op(op_calls):
    build, x, _, _ = FAMILIES["pvt_v2"]
    _, patched, _ = pair(build())
    patched(x)
    first, second = (call["args"] for call in op_calls["flash_attention"])
    assert first[0].shape == (2, 1, 64, 16) and first[1].shape == (2, 1, 16, 16)  # 8 x 8 queries, 4 x 4 keys
    assert second[0].shape == second[1].shape == (2, 2, 16, 16)  # no reduction


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"mobilevit"}))  # MobileViT never returns weights
def test_attention_weights_run_hugging_face(family, op_calls):
    build, x, _, _ = FAMILIES[family]
    reference, patched, _ = pair(build())
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == len(expected) > 0
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # TimeSformer asks its temporal attention for no weights: those two calls stay fused
    assert len(op_calls["flash_attention"]) == (2 if family == "timesformer" else 0)


def test_attention_dropout_in_training_runs_hugging_face(op_calls, fresh_warnings):
    model = pvt_v2(attention_probs_dropout_prob=0.2)
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert sum("attention dropout 0.2" in e.detail for e in report.replaced) == 2
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="PvtV2SelfAttention"):
        patched(FAMILIES["pvt_v2"][1]).sum().backward()
    assert not op_calls["flash_attention"]


@pytest.mark.parametrize("family, dropout", [("pvt_v2", "attn_drop"), ("glpn", "dropout"),
                                             ("timesformer", "attn_drop")])  # fmt: skip
def test_a_hook_on_the_skipped_dropout_runs_hugging_face(family, dropout, op_calls, fresh_warnings):
    """The fused forward skips the attention dropout module (the op has none): a hook on it added after
    patching sends the calls to Hugging Face's forward, which calls it."""
    build, x, fused, calls = FAMILIES[family]
    reference, patched, _ = pair(build())
    seen = []
    first = next(m for m in patched.modules() if type(m) is fused)
    getattr(first, dropout).register_forward_hook(lambda *args: seen.append(True))
    with pytest.warns(fastvit.FastvitFallbackWarning, match=f"a hook on {dropout}"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert seen and len(op_calls["flash_attention"]) < calls


class TestPvtV2Checks(ModelChecks):
    build = staticmethod(pvt_v2)
    inputs = staticmethod(lambda batch: torch.randn(batch, 3, 32, 32, generator=_gen(batch)))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default"})
    counted_op = "flash_attention"
    calls = 2
