"""Hugging Face's Swin V2 patched (fastvit.nn.hf_swinv2): ``Swinv2SelfAttention`` computes its scores
itself (cosine attention, logit scale, continuous position bias, the shifted-window mask added
twice), so it is swapped rather than routed through ``attn_implementation``: one
fastvit.flash_attention call per forward; and each post-norm ``Swinv2Layer``'s MLP alone is one
fastvit.layernorm_mlp call (``norm="none"``), its norm, drop path and residual add Hugging Face's.
Outputs and every gradient (the bias MLP and the logit scale included) by the tolerance rule against
the unpatched model in float64, on shifted and padded maps; ``output_attentions``, attention and
hidden dropout run Hugging Face's code; drop path in training; hooks; unpatch; torch.compile; torch.export; the
Triton kernels in the interpreter.

A tiny Swin V2: 2 x 2 patches, dim 32, two stages of two layers (2 and 4 heads), 4 x 4 windows
(every other layer shifted); no downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    HFLogits,
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

from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer, Swinv2SelfAttention  # noqa: E402

from fastvit.nn import hf_swinv2  # noqa: E402
from fastvit.nn.hf_swinv2 import FusedSwinv2Layer, FusedSwinv2SelfAttention  # noqa: E402

LAYERS = 4


def build(**overrides) -> torch.nn.Module:
    args = dict(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
                num_labels=5)  # fmt: skip
    return HFLogits(perturb_(T.Swinv2ForImageClassification(T.Swinv2Config(**(args | overrides))))).eval()


def images(size: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, Swinv2SelfAttention)]


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, Swinv2Layer)]


@pytest.mark.parametrize("size", [32, 20], ids=["shifted", "padded"])
def test_matches_unpatched_by_the_rule(size, op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert [type(a) for a in attentions(patched)] == [FusedSwinv2SelfAttention] * LAYERS
    assert [type(layer) for layer in layers(patched)] == [FusedSwinv2Layer] * LAYERS
    expected = {"attention": "Swinv2SelfAttention -> FusedSwinv2SelfAttention",
                "mlp": "Swinv2Layer -> FusedSwinv2Layer"}  # fmt: skip
    assert all(expected[e.part] in e.detail for e in report.replaced)
    assert_matches_by_the_rule(reference, patched, images(size))
    (mlp, *_) = op_calls["layernorm_mlp"]  # the MLP alone: the layer normalises its output itself
    assert len(op_calls["layernorm_mlp"]) == LAYERS
    assert mlp["kwargs"]["norm"] == "none" and mlp["kwargs"]["residual"] is False
    calls = op_calls["flash_attention"]
    assert len(calls) == LAYERS
    kwargs = calls[1]["kwargs"]  # layer 1 shifts: windows as heads, the bias plus the doubled mask
    assert kwargs["scale"] == 1.0 and kwargs["attn_mask"].requires_grad  # the bias MLP learns through it
    assert kwargs["attn_mask"].min().item() < -150  # HF adds its -100 mask twice


def test_attention_weights_and_dropout_run_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    want = reference.model(pixel_values=images(), output_attentions=True)
    got = patched.model(pixel_values=images(), output_attentions=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS  # the MLPs: fused
    op_calls["layernorm_mlp"].clear()
    reference, patched, report = pair(build(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1))
    assert sum("attention dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    assert sum("hidden dropout 0.1: in training its MLP runs" in e.detail for e in report.replaced) == LAYERS
    with pytest.warns(fastvit.FastvitFallbackWarning, match="Swinv2SelfAttention"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0)
    assert not op_calls["flash_attention"] and not op_calls["layernorm_mlp"]


def test_training_step_with_drop_path(op_calls):
    """The layer's drop path stays Hugging Face's (the same draws, around the fused MLP)."""
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=3, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == len(op_calls["flash_attention"]) == LAYERS


def test_hooks():
    # a hook on the dropout the op replaces: left alone, with why
    model = build()
    attentions(model)[1].dropout.register_forward_hook(lambda *args: None)
    report = fastvit.patch(model)
    (skip,) = layer_skips(report)
    assert skip.path.endswith("blocks.1.attention.self") and "dropout has a forward hook" in skip.detail
    # a hook on an MLP layer added after patching: that layer's MLP runs Hugging Face's modules
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        layers(model)[2].intermediate.dense.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on intermediate.dense"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    # hooks on the projections and the bias MLP run (the fused forward calls them)
    _, patched, _ = pair(build())
    seen = []
    attentions(patched)[0].query.register_forward_hook(lambda *args: seen.append("q"))
    attentions(patched)[0].continuous_position_bias_mlp.register_forward_hook(lambda *args: seen.append("cpb"))
    patched(images())
    assert seen == ["q", "cpb"]


class TestSwinv2Checks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(lambda batch: images(batch=batch))
    triton_inputs = staticmethod(lambda: images(20, batch=1))  # a padded map
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op, calls = "flash_attention", LAYERS


@pytest.mark.parametrize("attention", hf_swinv2.SWINV2_COPY_ATTENTIONS, ids=lambda c: c.__name__)
def test_the_copies_are_swinv2_line_for_line(attention):
    for method in ("__init__", "forward"):
        assert source_lines(getattr(attention, method), attention.__name__) == source_lines(
            getattr(Swinv2SelfAttention, method), Swinv2SelfAttention.__name__
        )
    fused = hf_swinv2.SWINV2_COPY_FUSED[attention]
    assert fused.fastvit_original() is attention and getattr(hf_swinv2, fused.__name__) is fused


@pytest.mark.parametrize("layer", list(hf_swinv2.SWINV2_LAYER_COPIES), ids=lambda c: c.__name__)
def test_the_layer_copies_are_swinv2_line_for_line(layer):
    assert source_lines(layer.forward, layer.__name__) == source_lines(Swinv2Layer.forward, Swinv2Layer.__name__)
    intermediate, output = hf_swinv2.SWINV2_LAYER_COPIES[layer]
    from transformers.models.swinv2.modeling_swinv2 import Swinv2Intermediate, Swinv2Output

    for ours, reference in ((intermediate, Swinv2Intermediate), (output, Swinv2Output)):
        assert source_lines(ours.forward, ours.__name__) == source_lines(reference.forward, reference.__name__)
    fused = hf_swinv2.SWINV2_LAYER_COPIES_FUSED[layer]
    assert fused.fastvit_original() is layer and getattr(hf_swinv2, fused.__name__) is fused


def test_swin2sr_matches_unpatched_by_the_rule(op_calls):
    config = T.Swin2SRConfig(image_size=16, patch_size=1, embed_dim=16, depths=[2], num_heads=[2], window_size=4)
    model = HFLastHiddenState(perturb_(T.Swin2SRModel(config))).eval()
    reference, patched, report = pair(model)
    assert report.counts() == {"attention": 2, "mlp": 2} and unfused_embeddings_only(report)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))  # a 12 x 12 map: 3 x 3 windows
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == 2
