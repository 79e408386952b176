"""timm's Eva attention (EVA02, the RoPE ViTs, timm's DINOv3) on fastvit.flash_attention (issue 14,
item 1: the attention; RoPE as timm computes it). Tiny random configs, no downloads."""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import assert_outputs_and_grads_match, module_types, perturb_, storage_map

timm = pytest.importorskip("timm")

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)
MODELS = {
    "eva02_tiny_patch14_224": dict(img_size=28, patch_size=14),  # RoPE, SwiGLU MLP, separate k bias
    "vit_base_patch16_rope_reg1_gap_256": dict(img_size=32, patch_size=16),  # RoPE + a register token
    "vit_small_patch16_dinov3": dict(img_size=32, patch_size=16),  # timm's DINOv3: RoPE, registers
}


def build(name: str, **overrides) -> torch.nn.Module:
    return perturb_(timm.create_model(name, pretrained=False, **(TINY | MODELS[name] | overrides))).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_matches_unpatched_with_rope(name, op_calls):
    reference = build(name)
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts()["attention"] == TINY["depth"]
    assert any(e.part == "mlp" and "Eva" in e.detail for e in report.skipped)  # the MLP half says why
    size = MODELS[name]["img_size"]
    assert_outputs_and_grads_match(reference, patched, torch.randn(3, 3, size, size))
    assert len(op_calls["flash_attention"]) == TINY["depth"]


def test_rope_reaches_the_op_rotated_and_prefix_tokens_unrotated(op_calls):
    model = build("eva02_tiny_patch14_224")
    fastvit.patch(model)
    attn, seen = model.blocks[0].attn, {}
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    model(torch.randn(1, 3, 28, 28))
    q = op_calls["flash_attention"][0]["args"][0]  # (B, H, 1 + 4, D): cls + 2x2 patches
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = torch.nn.functional.linear(seen["x"], attn.qkv.weight, bias)
    raw_q = attn.q_norm(qkv.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)[0])
    assert q.shape == raw_q.shape and q.shape[2] == 5
    torch.testing.assert_close(q[:, :, :1], raw_q[:, :, :1])  # the class token is not rotated
    assert not torch.allclose(q[:, :, 1:], raw_q[:, :, 1:])  # the patch tokens are


def test_other_resolution_state_dict_and_unpatch():
    reference = build("vit_small_patch16_dinov3", dynamic_img_size=True)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    fastvit.patch(patched)
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 48, 32))  # RoPE grid 3x2
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_and_compile(op_calls):
    reference = build("eva02_tiny_patch14_224").train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x = torch.randn(2, 3, 28, 28)
    assert_outputs_and_grads_match(reference, patched, x, seed=0)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference = build("eva02_tiny_patch14_224")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 28, 28), rtol=1e-4, atol=1e-5)
