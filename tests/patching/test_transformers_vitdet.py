"""Hugging Face's ViTDet backbone patched: ``VitDetAttention`` computes its scores itself (decomposed
relative position where ``use_relative_position_embeddings``), so it is swapped
(fastvit.nn.hf_sam.FusedVitDetAttention: one fastvit.flash_attention call with the op's ``rel_pos``
tables); each ``VitDetLayer``'s LayerNorm+MLP half (with drop path) is one fastvit.layernorm_mlp call
over its (B, H, W, C) map (fastvit.nn.hf_layers.FusedVitDetLayer). Outputs and every gradient (the
relative position embeddings included) by the tolerance rule against the unpatched model in float64,
on a padded window layer, a window layer, a global layer and the residual bottleneck block, with and
without relative position, and at a resolution the embeddings are resized for; attention weights
requested and drop path in training run Hugging Face's code; unpatch; torch.compile; torch.export;
the Triton kernels in the interpreter.

A tiny ViTDet: 8 x 8 patches of 4 px (32 px images), dim 32, 2 heads, four layers (windows of 3: the
map padded to 9 x 9; a global layer with the residual block; windows of 4; a global layer); no
downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import HFLastHiddenState, assert_matches_by_the_rule, pair, perturb_
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_layers, hf_sam  # noqa: E402

LAYERS = 4


def build(rel_pos: bool = True, **overrides) -> torch.nn.Module:
    args = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32, pretrain_image_size=32,
                patch_size=4, mlp_ratio=2, use_relative_position_embeddings=rel_pos, window_size=3,
                window_block_indices=[0, 2], residual_block_indices=[1])  # fmt: skip
    model = T.VitDetModel(T.VitDetConfig(**(args | overrides)))
    # HF takes one window size: the second window layer's is 4, its tables (built for windows of 3)
    # read resized through Hugging Face's get_rel_pos
    model.encoder.layer[2].window_size = 4
    return HFLastHiddenState(perturb_(model)).eval()


def images(batch: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("rel_pos", [True, False], ids=["rel_pos", "plain"])
def test_matches_unpatched_by_the_rule(rel_pos, op_calls):
    reference, patched, report = pair(build(rel_pos))
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS}
    kinds = {type(m) for m in patched.modules()}
    assert {hf_sam.FusedVitDetAttention, hf_layers.FusedVitDetLayer} <= kinds
    assert_matches_by_the_rule(reference, patched, images(2))
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == LAYERS
    assert all((call["kwargs"].get("rel_pos") is not None) == rel_pos for call in op_calls["flash_attention"])


def test_another_resolution_resizes_the_tables(op_calls):
    reference, patched, _ = pair(build())
    assert_matches_by_the_rule(reference, patched, images(1, 48))  # a 12 x 12 map: the global layers' tables resized
    assert len(op_calls["flash_attention"]) == LAYERS


def test_attention_weights_run_hugging_face(op_calls):
    reference, patched, _ = pair(build())
    x = images(2)
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == LAYERS
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


class TestVitDetChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "flash_attention"
    calls = LAYERS
