"""Hugging Face's SegGPT patched: ``SegGptAttention`` (SAM's design, decomposed relative position)
computes its scores itself, so it is swapped (fastvit.nn.hf_sam.FusedSegGptAttention: one
fastvit.flash_attention call with the op's ``rel_pos`` tables); each ``SegGptLayer``'s LayerNorm+MLP
half (with drop path) is one fastvit.layernorm_mlp call over its (B, H, W, C) map, after Hugging
Face's feature ensemble over the prompts (fastvit.nn.hf_layers.FusedSegGptLayer). Outputs and every
gradient (the relative position embeddings included) by the tolerance rule against the unpatched
model in float64, with and without relative position and feature ensemble; attention weights
requested and drop path in training run Hugging Face's code; unpatch; torch.compile; torch.export;
the Triton kernels in the interpreter.

A tiny SegGPT: 16 x 16 px images and prompts in 4 px patches (the input and its prompt stacked into
an 8 x 4 map), dim 32, 2 heads, four layers, the two prompt batches merged after the second; no
downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_, unfused_embeddings_only
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_layers, hf_sam  # noqa: E402

LAYERS = 4
SIZE = 16


class SegGptMaps(nn.Module):
    """``SegGptModel`` on one (B, 9, S, S) tensor: the image, its prompt image and the prompt's mask
    stacked on the channels; returns the encoder's last (B', H, W, C) map."""

    def __init__(self, model: nn.Module, feature_ensemble: bool) -> None:
        super().__init__()
        self.model, self.feature_ensemble = model, feature_ensemble

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        image, prompt, mask = x.chunk(3, dim=1)
        out = self.model(image, prompt, mask, feature_ensemble=self.feature_ensemble,
                         output_attentions=output_attentions)  # fmt: skip
        return out if output_attentions else out.last_hidden_state


def build(rel_pos: bool = True, feature_ensemble: bool = False, **overrides) -> nn.Module:
    args = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=[2 * SIZE, SIZE],
                pretrain_image_size=SIZE, patch_size=4, mlp_dim=64, merge_index=1, drop_path_rate=0.0,
                intermediate_hidden_state_indices=[1, 3])  # fmt: skip
    model = T.SegGptModel(T.SegGptConfig(**(args | overrides | {"use_relative_position_embeddings": True})))
    if not rel_pos:  # Hugging Face's _init_weights reads the tables whatever the flag: turn them off after
        for layer in model.encoder.layers:
            layer.attention.use_relative_position_embeddings = False
    return SegGptMaps(perturb_(model, std=0.3), feature_ensemble).eval()  # the zero-init rel_pos tables matter


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 9, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("rel_pos", [True, False], ids=["rel_pos", "plain"])
@pytest.mark.parametrize("feature_ensemble", [False, True], ids=["single", "ensemble"])
def test_matches_unpatched_by_the_rule(rel_pos, feature_ensemble, op_calls):
    reference, patched, report = pair(build(rel_pos, feature_ensemble))
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    kinds = {type(m) for m in patched.modules()}
    assert {hf_sam.FusedSegGptAttention, hf_layers.FusedSegGptLayer} <= kinds
    assert_matches_by_the_rule(reference, patched, images(4))  # four prompts: both ensemble branches
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == LAYERS
    assert all((call["kwargs"].get("rel_pos") is not None) == rel_pos for call in op_calls["flash_attention"])


def test_attention_weights_run_hugging_face(op_calls):
    reference, patched, _ = pair(build())
    x = images(2)
    expected, found = reference(x, output_attentions=True), patched(x, output_attentions=True)
    assert len(found.attentions) == LAYERS
    for a, b in zip(found.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-6)
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


def test_a_hook_on_the_mlp_runs_hugging_face(op_calls):
    reference, patched, _ = pair(build())
    seen = []
    patched.model.encoder.layers[2].mlp.register_forward_hook(lambda *args: seen.append(1))
    x = images(2)
    torch.testing.assert_close(patched(x), reference(x), rtol=1e-4, atol=1e-5)
    assert seen == [1] and len(op_calls["layernorm_mlp"]) == LAYERS - 1


class TestSegGptChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "flash_attention"
    calls = LAYERS
