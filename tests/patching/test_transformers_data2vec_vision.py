"""Hugging Face's data2vec-vision patched (fastvit.nn.hf_data2vec_vision): its self-attention (eager
and SDPA classes) computes its scores itself, so it is swapped: one fastvit.flash_attention call, the
layer's relative position bias or the encoder's shared one as ``attn_mask``; each
``Data2VecVisionLayer``'s LayerNorm+MLP half with ``lambda_2`` is one fastvit.layernorm_mlp call.
Outputs and every gradient (the bias tables included) by the tolerance rule against the unpatched
model in float64; the attention weights requested and attention / hidden dropout and drop path in
training run Hugging Face's code; unpatch; torch.compile; torch.export; the Triton kernels in the
interpreter.

A tiny data2vec-vision: 16 px images in 4 x 4 patches (16 tokens and the class token), dim 32,
2 heads, two layers with layer scale; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_data2vec_vision  # noqa: E402

LAYERS = 2
FUSED = {"sdpa": hf_data2vec_vision.FusedData2VecVisionSdpaSelfAttention,
         "eager": hf_data2vec_vision.FusedData2VecVisionSelfAttention}  # fmt: skip


def build(implementation: str = "sdpa", bias: str = "own", **overrides) -> torch.nn.Module:
    args = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=16,
                patch_size=4, layer_scale_init_value=0.1, use_relative_position_bias=bias == "own",
                use_shared_relative_position_bias=bias == "shared")  # fmt: skip
    config = T.Data2VecVisionConfig(**(args | overrides))
    config._attn_implementation = implementation
    model = T.Data2VecVisionModel(config, add_pooling_layer=False)
    with torch.no_grad():  # HF initialises the bias tables to zeros: make them matter
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    return HFLastHiddenState(perturb_(model)).eval()


def images(batch: int, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("implementation", sorted(FUSED))
@pytest.mark.parametrize("bias", ["own", "shared", "none"])
def test_matches_unpatched_by_the_rule(implementation, bias, op_calls):
    reference, patched, report = pair(build(implementation, bias))
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS, "patch_embed": 1} and unfused_embeddings_only(report)
    assert [type(m) for m in patched.modules()].count(FUSED[implementation]) == LAYERS
    assert_matches_by_the_rule(reference, patched, images(2))
    calls = op_calls["flash_attention"]
    assert len(calls) == len(op_calls["layernorm_mlp"]) == LAYERS
    assert all((call["kwargs"]["attn_mask"] is None) == (bias == "none") for call in calls)
    assert all(call["kwargs"]["layer_scale"] is not None for call in op_calls["layernorm_mlp"])


def test_another_resolution_interpolates_the_bias(op_calls):
    reference, patched, _ = pair(build())
    x = images(1, 24)  # a 6 x 6 grid: Hugging Face's bias table read for it
    expected, found = (m.model(x, interpolate_pos_encoding=True).last_hidden_state for m in (reference, patched))
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == LAYERS


def test_attention_weights_run_hugging_face(op_calls):
    reference, patched, _ = pair(build("eager"))
    x = images(2)
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == len(expected) == LAYERS
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS


def test_attention_weights_over_sdpa_stay_fused(op_calls):
    # Hugging Face's SDPA class returns None for the weights even when asked: so does the fused
    # one, with the op (it ran Hugging Face's forward, unfused, without a word)
    reference, patched, _ = pair(build("sdpa"))
    x = images(2)
    expected = reference.model(x, output_attentions=True)
    found = patched.model(x, output_attentions=True)
    assert len(found.attentions) == len(expected.attentions) == LAYERS
    assert all(a is None for a in (*found.attentions, *expected.attentions))
    torch.testing.assert_close(found.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == LAYERS


@pytest.mark.parametrize("implementation", sorted(FUSED))
def test_dropout_and_drop_path_in_training_run_hugging_face(implementation, op_calls, fresh_warnings):
    model = build(implementation, attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.2, drop_path_rate=0.1)
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert sum("attention dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    assert sum("hidden dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        patched(images(2)).sum().backward()
    assert not op_calls["flash_attention"] and not op_calls["layernorm_mlp"]
    patched.eval()
    torch.testing.assert_close(patched(images(2)), model(images(2)), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == LAYERS


class TestData2VecVisionChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset(
        {"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default", "fastvit.patch_embed_fwd.default"}
    )
    counted_op = "flash_attention"
    calls = LAYERS
