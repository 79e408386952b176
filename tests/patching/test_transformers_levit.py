"""Hugging Face's LeViT patched: ``LevitAttention`` and ``LevitAttentionSubsample`` compute their scores
in their own forward (per-head q / k narrower than v, a learned bias per (query, key) offset), so they
are swapped (fastvit.nn.hf_levit: one fastvit.flash_attention call each, the gathered bias as the
op's learnable float mask, q and k zero-padded to the value width). Outputs and every gradient (the
attention biases included) by the tolerance rule against the unpatched model in float64, in eval mode
(Hugging Face's cached bias) and in training (BatchNorm's batch statistics, the bias gathered each
call); a hook on a projection is still called; unpatch; torch.compile; torch.export; the Triton
kernels in the interpreter.

A tiny LeViT: 64 px images, three stages (dims 32 / 48 / 64, 2 / 3 / 4 heads of key_dim 8, values 2x
wider; one layer each) with two subsampling attentions between them; no downloads.
"""

from __future__ import annotations

import pytest
import torch

from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_levit  # noqa: E402

ATTENTIONS, SUBSAMPLES = 3, 2


def build() -> torch.nn.Module:
    config = T.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1],
                           key_dim=[8, 8, 8])  # fmt: skip
    model = perturb_(T.LevitModel(config))
    with torch.no_grad():  # Hugging Face initialises the biases to zeros: make them matter
        for module in model.modules():
            if hasattr(module, "attention_biases"):
                module.attention_biases.normal_(0, 0.5)
    return HFLastHiddenState(model).eval()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": ATTENTIONS + SUBSAMPLES} and unfused_embeddings_only(report)
    kinds = [type(m) for m in patched.modules()]
    assert kinds.count(hf_levit.FusedLevitAttention) == ATTENTIONS
    assert kinds.count(hf_levit.FusedLevitAttentionSubsample) == SUBSAMPLES
    assert_matches_by_the_rule(reference, patched, images(2))
    calls = op_calls["flash_attention"]
    assert len(calls) == ATTENTIONS + SUBSAMPLES
    assert all(call["kwargs"]["attn_mask"] is not None for call in calls)
    q, k, v = calls[1]["args"][:3]  # the first subsample: a 2 x 2 grid's queries over the 4 x 4 grid's keys
    assert q.shape[2] == 4 and k.shape[2] == 16
    assert q.shape[-1] == v.shape[-1] == 4 * 8  # key_dim 8 padded to the value width (the subsample's ratio 4)


def test_training_mode_matches_hugging_face(op_calls):
    reference, patched, _ = pair(build())
    reference.train(), patched.train()
    assert_matches_by_the_rule(reference, patched, images(4))
    assert len(op_calls["flash_attention"]) == ATTENTIONS + SUBSAMPLES


def test_a_hook_on_a_projection_is_called(op_calls):
    reference, patched, _ = pair(build())
    seen = []
    for model in (reference, patched):
        model.model.encoder.stages[0].layers[0].module.queries_keys_values.register_forward_hook(
            lambda m, args, out: seen.append(out.shape)
        )
    x = images(2)
    torch.testing.assert_close(patched(x), reference(x), rtol=1e-4, atol=1e-5)
    assert len(seen) == 2 and seen[0] == seen[1] and len(op_calls["flash_attention"]) == ATTENTIONS + SUBSAMPLES


class TestLevitChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default"})
    counted_op = "flash_attention"
    calls = ATTENTIONS + SUBSAMPLES
