"""timm's NesT patched (fastvit.nn.timm_nest): the block-local attention (every image block of
every image in one fastvit.flash_attention call, the heads merged as timm merges them) and the
layers' MLP halves (one fastvit.layernorm_mlp call over the (B, T, N, C) tokens). Outputs and every
gradient by the tolerance rule against the unpatched model in float64. NesT's three levels shrunk to
widths 16 / 32 / 64 and depths (1, 1, 2) on 64 x 64 images with 4 px patches (16, 4 and 1 blocks
of 4 x 4 tokens); no downloads.
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

nest = pytest.importorskip("timm.models.nest")

DEPTHS = (1, 1, 2)


def build(**overrides) -> torch.nn.Module:
    args = dict(img_size=64, patch_size=4, num_levels=3, embed_dims=(16, 32, 64), num_heads=(2, 2, 4), depths=DEPTHS,
                num_classes=5, drop_path_rate=0.0)  # fmt: skip
    return perturb_(nest.Nest(**(args | overrides))).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": sum(DEPTHS), "mlp": sum(DEPTHS)}
    (skip,) = report.skipped
    assert skip.part == "patch_embed" and "image blocks" in skip.detail
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    # level 0: 3 images x 16 blocks of 4 x 4 tokens as the batch of one call
    assert op_calls["flash_attention"][0]["args"][0].shape == (3 * 16, 2, 16, 8)
    assert op_calls["layernorm_mlp"][0]["args"][0].shape == (3, 16, 16, 16)  # (B, T, N, C)
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.3))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


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
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
