"""Hugging Face's CvT patched: ``CvtSelfAttention`` computes its scores in its own forward (queries
from a depthwise-conv projection of the map, keys and values from strided ones, the class token
prepended in the last stage), so it is swapped (fastvit.nn.hf_self_attention.FusedCvtSelfAttention:
one fastvit.flash_attention call, N queries over M <= N keys); each ``CvtLayer``'s LayerNorm+MLP half
is one fastvit.layernorm_mlp call (fastvit.nn.hf_intermediate_output.FusedCvtLayer). Outputs and
every gradient by the tolerance rule against the unpatched model in float64; drop path in training
(a module call on both sides: the same draws) matches Hugging Face, attention and hidden dropout in
training run its modules; the report names no submodule of a swapped attention; unpatch;
torch.compile; torch.export; the Triton kernels in the interpreter.

A tiny CvT: 32 px images, three stages (dims 16 / 32 / 48, 1 / 2 / 3 heads, 1 / 2 / 3 layers; the
class token in the last), keys and values at stride 2; no downloads.
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
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_intermediate_output, hf_self_attention  # noqa: E402

LAYERS = 6  # 1 + 2 + 3 (Hugging Face reads the drop path rates of stage s at index s: depth > s)


def build(**overrides) -> torch.nn.Module:
    config = T.CvtConfig(**(dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3]) | overrides))
    return HFLastHiddenState(perturb_(T.CvtModel(config))).eval()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    kinds = {type(m) for m in patched.modules()}
    assert {hf_self_attention.FusedCvtSelfAttention, hf_intermediate_output.FusedCvtLayer} <= kinds
    assert_matches_by_the_rule(reference, patched, images(2))
    calls = op_calls["flash_attention"]
    assert len(calls) == len(op_calls["layernorm_mlp"]) == LAYERS
    q, k = calls[-1]["args"][:2]  # the last stage: a 2 x 2 map with its class token, keys strided to 1 x 1
    assert q.shape[2] == 1 + 4 and k.shape[2] == 1 + 1
    assert calls[-1]["kwargs"]["scale"] == 48**-0.5  # Hugging Face's embed_dim ** -0.5, not head_dim's


def test_drop_path_in_training_matches_hugging_face(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=[0.0, 0.3, 0.3]))
    reference.train(), patched.train()
    assert_outputs_and_grads_match(reference, patched, images(2), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS  # its draws are the layer's module calls, on both sides


def test_dropout_in_training_runs_hugging_face(op_calls, fresh_warnings):
    model = build(attention_drop_rate=[0.1, 0.1, 0.1], drop_rate=[0.1, 0.1, 0.1])
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert all("dropout 0.1" in entry.detail for entry in report.replaced)
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        patched(images(2)).sum().backward()
    assert not op_calls["flash_attention"] and not op_calls["layernorm_mlp"]


class TestCvtChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "flash_attention"
    calls = LAYERS
