"""timm's Gemma 4 vision tower patched (fastvit.nn.timm_gemma4): each block's Gemma4Attention (RMS
norms on q, k, v, Gemma's 2-D RoPE, grouped-query heads, scale 1) runs fastvit.flash_attention,
with the tower's key-padding mask for padded patch batches; outputs and every gradient against the
unpatched model. Tiny random configs, no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import assert_outputs_and_grads_match, module_types, pair, perturb_, storage_map

timm = pytest.importorskip("timm")
pytest.importorskip("timm.models.gemma4_vit")

DEPTH, PATCH = 2, 4
ARGS = dict(img_size=16, patch_size=PATCH, embed_dim=32, depth=DEPTH, num_heads=4, head_dim=8, num_kv_heads=2,
            intermediate_size=48, num_classes=5, pooling_kernel_size=2, position_embedding_size=64)  # fmt: skip


def build(**overrides) -> torch.nn.Module:
    return perturb_(timm.create_model("gemma4_vit_167m", pretrained=False, **(ARGS | overrides))).eval()


def padded_patches(grids=((4, 4), (3, 2)), seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch of patches (B, seq, p*p*3), their (y, x) coordinates and the valid mask."""
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(len(grids), seq, PATCH * PATCH * 3, generator=gen)
    coord = torch.full((len(grids), seq, 2), -1, dtype=torch.long)
    valid = torch.zeros(len(grids), seq, dtype=torch.bool)
    for b, (h, w) in enumerate(grids):
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        coord[b, : h * w], valid[b, : h * w] = yx, True
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)


def test_images_match_unpatched(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts()["attention"] == DEPTH
    assert all(e.part != "attention" for e in report.skipped)
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 16, 16))
    calls = op_calls["flash_attention"]
    assert len(calls) == DEPTH and all(c["kwargs"]["scale"] == 1.0 for c in calls)
    assert all("attn_mask" not in c["kwargs"] for c in calls)  # a full grid: no padding mask
    assert calls[0]["args"][1].shape == (2, 4, 16, 8)  # k expanded from 2 kv heads to the 4 q heads
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_padded_patch_batch_takes_the_padding_mask(op_calls):
    reference, patched, _ = pair(build())
    batch = padded_patches()
    run = lambda m, x: m(x, patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])
    assert_outputs_and_grads_match(reference, patched, batch["patches"], run=run)
    mask = op_calls["flash_attention"][0]["kwargs"]["attn_mask"]  # the tower's own (B, 1, 1, N) float mask
    assert mask.shape == (2, 1, 1, 16) and torch.equal(mask[1, 0, 0] == 0, batch["patch_valid"][1])


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build(attn_drop_rate=0.3).train())
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        assert_outputs_and_grads_match(reference, patched, x, seed=0)
    assert op_calls["flash_attention"] == []


def test_compile_fullgraph(op_calls):
    reference, patched, _ = pair(build())
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    batch = padded_patches()
    run = lambda m, x: m(x, patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, batch["patches"], run=run, rtol=1e-4, atol=1e-5)


def test_report_names_the_patch_embedding():
    report = fastvit.patch(build())
    (skip,) = [e for e in report.skipped if e.part == "patch_embed"]
    assert skip.path == "" and "Gemma4VitClassifier's patch embedding is not fused yet" in skip.detail
