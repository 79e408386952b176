"""timm's HieraDet (SAM 2's image encoder) patched (fastvit.nn.timm_hieradet): each block's
MultiScaleAttention, windowed (padded windows too) or global, with q pooling at the stage changes,
runs fastvit.flash_attention; outputs and every gradient against the unpatched model. Tiny random
configs, no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_outputs_and_grads_match,
    expected_parts,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
hieradet = pytest.importorskip("timm.models.hieradet_sam2")

STAGES = (1, 2, 1, 1)  # 5 blocks: q pooling entering stages 2-4, block 2 global
ARGS = dict(embed_dim=16, num_heads=1, stages=STAGES, window_spec=(4, 4, 6, 2), global_att_blocks=(2,),
            global_pos_size=(4, 4), num_classes=5)  # fmt: skip


def build(**overrides) -> torch.nn.Module:
    return perturb_(hieradet.HieraDet(**(ARGS | overrides))).eval()


# 16 x 16 tokens; 20 x 20 (stage 2's 4 x 4 windows of its 10 x 10 grid padded to 12 x 12)
@pytest.mark.parametrize("size", [64, 80])
def test_matches_unpatched(size, op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == expected_parts(attention=sum(STAGES), mlp=sum(STAGES), patch_embed=0)
    assert all("FusedHieraDetAttention" in e.detail for e in report.replaced if e.part == "attention")
    assert all("FusedHieraDetBlock" in e.detail for e in report.replaced if e.part == "mlp")  # timm_blocks
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, size, size))
    calls = op_calls["flash_attention"]
    assert len(calls) == sum(STAGES)
    windows = (size // 4 // 4) ** 2
    q, k = calls[0]["args"][:2]  # the first block: 4 x 4 windows of the token grid
    assert q.shape == k.shape == (2 * windows, 1, 16, 16)
    q, k = calls[1]["args"][:2]  # q pooled 2 x 2 in each 4 x 4 window, keys unpooled
    assert q.shape[2] == 4 and k.shape[2] == 16
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_sam2_named_model_and_training_step(op_calls):
    reference = perturb_(timm.create_model("sam2_hiera_tiny", pretrained=False, **(ARGS | dict(drop_path_rate=0.1))))
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    assert_outputs_and_grads_match(reference.train(), patched.train(), torch.randn(2, 3, 64, 64), seed=0)


def test_hook_on_q_pool_runs_as_in_timm(op_calls):
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # q_pool is called by the fused forward too: the hook runs there
        model.blocks[1].attn.q_pool.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(op_calls["flash_attention"]) == sum(STAGES)


def test_compile_fullgraph(op_calls):
    reference, patched, _ = pair(build())
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 80, 80), rtol=1e-4, atol=1e-5)


def test_report_names_the_patch_embedding():
    report = fastvit.patch(build())
    (skip,) = [e for e in report.skipped if e.part == "patch_embed"]
    assert skip.path == "" and "overlapping conv" in skip.detail
