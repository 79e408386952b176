"""Hugging Face's Hiera patched: ``HieraMaskUnitAttention`` computes its scores itself (attention within
each mask unit in the first stages, global later, queries max-pooled over ``query_stride`` in a
stage's first layer), so it is swapped (fastvit.nn.hf_hiera: one fastvit.flash_attention call, the
mask units as extra heads); each ``HieraLayer``'s LayerNorm+MLP half (with drop path) is one
fastvit.layernorm_mlp call (fastvit.nn.hf_layers.FusedHieraLayer). Outputs and every gradient by the
tolerance rule against the unpatched model in float64; attention weights requested and drop path in
training run Hugging Face's code; unpatch; torch.compile; torch.export; the Triton kernels in the
interpreter.

A tiny Hiera: 32 px images, a 3 x 3 stride-2 patch embedding (16 x 16 tokens), dims 16 / 32 / 64 /
128 over stages of 1, 2, 1 and 1 layers, 8 x 8 mask units (the first two stages attend within them),
query pooling 2 x 2 between stages; no downloads.
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

from fastvit.nn import hf_hiera, hf_layers  # noqa: E402

LAYERS = 5


def build(**overrides) -> torch.nn.Module:
    args = dict(embed_dim=16, image_size=[32, 32], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1],
                depths=[1, 2, 1, 1], num_heads=[1, 2, 4, 8], query_stride=[2, 2], masked_unit_size=[8, 8],
                mlp_ratio=2.0)  # fmt: skip
    return HFLastHiddenState(perturb_(T.HieraModel(T.HieraConfig(**(args | overrides))))).eval()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    kinds = [type(m) for m in patched.modules()]
    assert kinds.count(hf_hiera.FusedHieraMaskUnitAttention) == kinds.count(hf_layers.FusedHieraLayer) == LAYERS
    assert_matches_by_the_rule(reference, patched, images(2))
    calls = op_calls["flash_attention"]
    assert len(calls) == len(op_calls["layernorm_mlp"]) == LAYERS
    # the first layer: 4 mask units of 64 tokens, one head -> 4 "heads" of 64; the second stage's
    # first layer pools its queries 4 to 1 within each unit (16 of its 64 tokens)
    assert calls[0]["args"][0].shape == (2, 4, 64, 16)
    assert calls[1]["args"][0].shape == (2, 8, 16, 16) and calls[1]["args"][1].shape == (2, 8, 64, 16)
    assert calls[-1]["args"][0].shape == (2, 8, 4, 16)  # global over the last stage's 2 x 2 map


def test_attention_weights_run_hugging_face(op_calls):
    reference, patched, _ = pair(build())
    x = images(2)
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == len(expected) == 4  # one per stage
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS


def test_drop_path_in_training_runs_hugging_face(op_calls, fresh_warnings):
    model = build(drop_path_rate=0.2)
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert any("drop path" in entry.detail for entry in report.replaced if entry.part == "mlp")
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="drop path"):
        patched(images(2)).sum().backward()
    # drop path rates rise from 0 over the layers: the first layer's MLP half (an Identity) stays fused
    assert len(op_calls["layernorm_mlp"]) == 1 and len(op_calls["flash_attention"]) == LAYERS


class TestHieraChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "flash_attention"
    calls = LAYERS
