"""timm's CrossViT patched: the two branches' blocks are timm's ``Block`` (fastvit.nn.timm_vit), and
the fusion blocks' ``CrossAttention`` (each branch's class token attending to the other branch's
tokens) runs one fastvit.flash_attention call with the class token as the only query
(fastvit.nn.timm_crossvit, CaiT's class attention). Outputs and every gradient by the tolerance
rule against the unpatched model in float64. ``crossvit_tiny_240`` shrunk to widths 32 / 64, patch
sizes 8 / 16, one block per branch and two multi-scale blocks, on 64 x 64 images; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_scripts_the_original,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")

STAGES = 2  # multi-scale blocks: per branch one Block and one fusion CrossAttention


def build(**overrides) -> torch.nn.Module:
    args = dict(num_classes=5, img_scale=(1.0, 1.0), img_size=64, patch_size=[8, 16], embed_dim=[32, 64],
                depth=[[1, 1, 0]] * STAGES, num_heads=[2, 2], mlp_ratio=[2, 2, 1])  # fmt: skip
    return perturb_(timm.create_model("crossvit_tiny_240", pretrained=False, **(args | overrides))).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": 4 * STAGES, "mlp": 2 * STAGES}
    cross = [m for m in patched.modules() if type(m).__name__ == "FusedCrossAttention"]
    assert len(cross) == 2 * STAGES
    (skip,) = report.skipped
    assert skip.part == "patch_embed" and "one per branch" in skip.detail
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    queries = [c["args"][0].shape for c in op_calls["flash_attention"]]
    assert (3, 2, 1, 16) in queries and (3, 2, 1, 32) in queries  # class-token queries of each branch
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for m in model.modules():
            if type(m).__name__.endswith("CrossAttention"):
                m.attn_drop.p = 0.2
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == 2 * STAGES  # the branches' own attention only


def test_compile_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    x = images()
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)
    assert_scripts_the_original(reference, patched, x)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"]
