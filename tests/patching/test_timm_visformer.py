"""timm's Visformer patched (fastvit.nn.timm_visformer): the conv-projected attention of its
second and third stages runs one fastvit.flash_attention call over each map's positions (q, k, v
laid out token-major, as timm's SDPA path does). Outputs and every gradient by the tolerance rule
against the unpatched model in float64; the BatchNorm + conv MLP blocks are reported as not fused.
``visformer_tiny`` shrunk to width 48, 2 heads, one block per stage, on 64 x 64 images (4 x 4 and
2 x 2 maps at the attention stages); no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_attention_dropout_runs_timm,
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")


def build(**overrides) -> torch.nn.Module:
    args = dict(num_classes=5, img_size=64, init_channels=8, embed_dim=48, depth=(1, 1, 1), num_heads=2)
    return perturb_(timm.create_model("visformer_tiny", pretrained=False, **(args | overrides)), std=0.02).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": 2}
    skipped = {e.part for e in report.skipped}
    assert skipped == {"mlp", "patch_embed"} and all("BatchNorm" in e.detail for e in report.skipped if e.part == "mlp")
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    q = op_calls["flash_attention"][0]["args"][0]
    assert q.shape == (3, 2, 4 * 4, 24) and q.stride(-1) == 1  # (B, heads, positions, head_dim)
    fastvit.unpatch(patched)
    assert module_types(patched) == types


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_in_training_runs_timm(fused_attn, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    assert op_calls["flash_attention"] == []


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"]
