"""timm's Gemma 4 vision tower patched (fastvit.nn.timm_gemma4): each block's Gemma4Attention (RMS
norms on q, k, v, Gemma's 2-D RoPE, grouped-query heads, scale 1) runs fastvit.flash_attention,
with the tower's key-padding mask for padded patch batches, and each Gemma4Block's pre-MLP RMS norm
and GELU-tanh gated MLP are one fastvit.layernorm_mlp call (its post-MLP norm, drop path and
residual timm's); outputs and every gradient against the unpatched model, and by the tolerance
rule against it in float64; MLP dropout in training, a hook on the MLP and clamped linears run
timm's modules. Tiny random configs, no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
pytest.importorskip("timm.models.gemma4_vit")

DEPTH, PATCH = 2, 4
ARGS = dict(img_size=16, patch_size=PATCH, embed_dim=32, depth=DEPTH, num_heads=4, head_dim=8, num_kv_heads=2,
            intermediate_size=48, num_classes=5, pooling_kernel_size=2, position_embedding_size=64)  # fmt: skip


def build(**overrides) -> torch.nn.Module:
    """A tiny tower with the 167M (E2B / E4B) tower's clamped linears, unless ``use_clipped_linears=False``
    (the 570M tower's: then the blocks' MLP halves are fused too)."""
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
    reference = build(use_clipped_linears=False)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH}
    assert all(e.part not in ("attention", "mlp") for e in report.skipped)
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 16, 16))
    calls = op_calls["flash_attention"]
    assert len(calls) == DEPTH and all(c["kwargs"]["scale"] == 1.0 for c in calls)
    assert all("attn_mask" not in c["kwargs"] for c in calls)  # a full grid: no padding mask
    assert calls[0]["args"][1].shape == (2, 4, 16, 8)  # k expanded from 2 kv heads to the 4 q heads
    mlp_calls = op_calls["layernorm_mlp"]
    assert len(mlp_calls) == DEPTH
    assert all(c["kwargs"]["norm"] == "rms" and c["kwargs"]["activation"] == "gelu_tanh" and not c["kwargs"]["residual"]
               and c["kwargs"]["fc1_gate_weight"] is not None for c in mlp_calls)  # fmt: skip
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_blocks_match_by_the_rule(op_calls):
    reference, patched, _ = pair(build(use_clipped_linears=False))
    assert_matches_by_the_rule(reference, patched, torch.randn(2, 3, 16, 16))
    assert len(op_calls["layernorm_mlp"]) == DEPTH


def test_mlp_dropout_hooks_and_clamps_run_timm(op_calls, fresh_warnings):
    reference, patched, report = pair(build(use_clipped_linears=False, drop_path_rate=0.2))
    assert not any("sample_scale" in e.detail for e in report.replaced)  # the block's own drop path runs
    for model in (reference, patched):
        model.encoder.blocks[0].mlp.up_proj.linear.register_forward_hook(lambda m, args, out: out * 2)
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.up_proj.linear"):
        assert_outputs_and_grads_match(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == DEPTH - 1
    model = build(use_clipped_linears=False)
    for block in model.encoder.blocks:
        block.mlp.drop.p = 0.1
    _, patched, report = pair(model)
    assert all("MLP dropout 0.1" in e.detail for e in report.replaced if e.part == "mlp")
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        patched.train()(x).sum().backward()
    assert len(op_calls["layernorm_mlp"]) == DEPTH - 1  # the eval call above only
    report = fastvit.patch(build())  # the 167M tower's clamped linears: its attention alone is fused
    assert report.counts() == {"attention": DEPTH}
    assert all("clamps its input and output" in e.detail for e in report.skipped if e.part == "mlp")


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
    reference, patched, _ = pair(build(use_clipped_linears=False))
    batch = padded_patches()
    run = lambda m, x: m(x, patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, batch["patches"], run=run, rtol=1e-4, atol=1e-5)
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]


def test_report_names_the_patch_embedding():
    report = fastvit.patch(build())
    (skip,) = [e for e in report.skipped if e.part == "patch_embed"]
    assert skip.path == "" and "Gemma4VitClassifier's patch embedding is a Linear over patches" in skip.detail
