"""Hugging Face's Swin V1 copies whose window attention computes its scores itself, patched
(fastvit.nn.hf_donut_swin): Donut's encoder (``DonutSwinModel``) and MaskFormer's backbone
(``MaskFormerSwinModel``). Their ``*SwinSelfAttention`` is swapped: one fastvit.flash_attention call,
the relative-position bias and the shifted-window mask as ``attn_mask``; each ``DonutSwinLayer``'s
LayerNorm+MLP half is one fastvit.layernorm_mlp call. The copies are checked line for line against
Donut's source; outputs and every gradient (the bias tables included) by the tolerance rule against
the unpatched model in float64, on a padded, shifted map (MaskFormer's layers' MLP halves too);
``output_attentions`` and attention /
hidden dropout in training run Hugging Face's code; unpatch; torch.compile; torch.export; the
Triton kernels in the interpreter.

A tiny Donut Swin: 40 x 32 px images in 4 x 4 patches (a 10 x 8 map, padded to 12 x 9 for 3 x 3
windows), dims 16 / 32, two stages of two layers (every other one shifted); no downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    pair,
    perturb_,
    source_lines,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from transformers.models.donut.modeling_donut_swin import DonutSwinSelfAttention  # noqa: E402
from transformers.models.maskformer.modeling_maskformer_swin import (  # noqa: E402
    MaskFormerSwinConfig,
    MaskFormerSwinModel,
)

from fastvit.nn import hf_donut_swin  # noqa: E402

LAYERS = 4
SWIN = dict(patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=3)


def donut(**overrides) -> torch.nn.Module:
    config = T.DonutSwinConfig(**(dict(SWIN, image_size=[40, 32]) | overrides))
    model = T.DonutSwinModel(config)
    with torch.no_grad():  # HF initialises the bias tables to zeros: make them matter
        for module in model.modules():
            if isinstance(module, DonutSwinSelfAttention):
                module.relative_position_bias_table.normal_(0, 0.5)
    return HFLastHiddenState(perturb_(model)).eval()


def maskformer() -> torch.nn.Module:
    return HFLastHiddenState(perturb_(MaskFormerSwinModel(MaskFormerSwinConfig(**SWIN, image_size=32)))).eval()


def images(batch: int, height: int = 40, width: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("attention", hf_donut_swin.SWIN_COPY_ATTENTIONS, ids=lambda c: c.__name__)
def test_the_copies_are_donut_line_for_line(attention):
    for method in ("__init__", "forward"):
        assert source_lines(getattr(attention, method), attention.__name__) == source_lines(
            getattr(DonutSwinSelfAttention, method), DonutSwinSelfAttention.__name__
        )
    fused = hf_donut_swin.SWIN_COPY_FUSED[attention]
    assert fused.fastvit_original() is attention and getattr(hf_donut_swin, fused.__name__) is fused


def test_donut_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(donut())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert_matches_by_the_rule(reference, patched, images(2))
    calls = op_calls["flash_attention"]
    assert len(calls) == len(op_calls["layernorm_mlp"]) == LAYERS
    assert all(call["kwargs"]["attn_mask"] is not None for call in calls)  # the bias (and the shift's mask)


def test_maskformer_backbone_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(maskformer())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert [type(m) for m in patched.modules()].count(hf_donut_swin.FusedMaskFormerSwinLayer) == LAYERS
    assert_matches_by_the_rule(reference, patched, images(2, 32, 32))
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == LAYERS


def test_maskformer_hidden_dropout_in_training_runs_hugging_face(op_calls, fresh_warnings):
    config = MaskFormerSwinConfig(**SWIN, image_size=32, hidden_dropout_prob=0.1)
    reference, patched, report = pair(HFLastHiddenState(perturb_(MaskFormerSwinModel(config))).eval())
    assert all("hidden dropout 0.1" in e.detail for e in report.replaced if e.part == "mlp")
    reference.train(), patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MaskFormerSwinLayer has MLP dropout"):
        assert_outputs_and_grads_match(reference, patched, images(2, 32, 32), seed=0, rtol=1e-4, atol=1e-5)
    assert not op_calls["layernorm_mlp"]


def test_attention_weights_and_dropout_run_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair(donut())
    x = images(2)
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == len(expected) == 2  # one per stage
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS
    reference, patched, report = pair(donut(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.2))
    assert sum("attention dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    assert sum("hidden dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    op_calls["flash_attention"].clear()
    op_calls["layernorm_mlp"].clear()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0)
    assert not op_calls["flash_attention"] and not op_calls["layernorm_mlp"]


class TestMaskFormerSwinChecks(ModelChecks):
    build = staticmethod(maskformer)
    inputs = staticmethod(lambda batch: images(batch, 32, 32))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS


class TestDonutSwinChecks(ModelChecks):
    build = staticmethod(donut)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "flash_attention"
    calls = LAYERS
