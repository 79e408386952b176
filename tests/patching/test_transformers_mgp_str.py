"""Hugging Face's MGP-STR (scene-text recognition) patched: each ``MgpstrLayer``'s LayerNorm+MLP half
(with drop path) is one fastvit.layernorm_mlp call (fastvit.nn.hf_layers.FusedMgpstrLayer); its
``MgpstrAttention`` returns the probabilities its encoder collects whenever asked for them, so it
stays Hugging Face's and the report says so. Outputs and every gradient by the tolerance rule against
the unpatched model in float64; the attentions still collected; drop path in training runs Hugging
Face's modules.

A tiny MGP-STR: 16 x 32 px word images in 4 px patches, dim 32, 2 heads, two layers; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import HFLastHiddenState, assert_matches_by_the_rule, pair, perturb_

T = pytest.importorskip("transformers")

from fastvit.nn import hf_layers  # noqa: E402

LAYERS = 2


def build(**overrides) -> torch.nn.Module:
    args = dict(image_size=[16, 32], patch_size=4, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                mlp_ratio=2.0, drop_path_rate=0.0)  # fmt: skip
    return HFLastHiddenState(perturb_(T.MgpstrModel(T.MgpstrConfig(**(args | overrides))))).eval()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 32, generator=torch.Generator().manual_seed(batch))


def test_mlp_halves_match_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"mlp": LAYERS}
    assert all(type(layer) is hf_layers.FusedMgpstrLayer for layer in patched.model.encoder.blocks)
    reasons = [e.detail for e in report.skipped if e.part == "attention"]
    assert len(reasons) == LAYERS and all("MgpstrAttention computes its attention in its own forward" in r
                                          for r in reasons)  # fmt: skip
    assert_matches_by_the_rule(reference, patched, images(2))
    assert len(op_calls["layernorm_mlp"]) == LAYERS


def test_the_attentions_are_still_collected(op_calls):
    reference, patched, _ = pair(build())
    x = images(2)
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == LAYERS
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(op_calls["layernorm_mlp"]) == LAYERS


def test_drop_path_in_training_runs_hugging_face(op_calls, fresh_warnings):
    model = build(drop_path_rate=0.2)
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert any("drop path" in entry.detail for entry in report.replaced if entry.part == "mlp")
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="drop path"):
        patched(images(2)).sum().backward()
    assert len(op_calls["layernorm_mlp"]) == 1  # the first layer's drop path is 0
