"""timm's EfficientFormer (V1) patched (fastvit.nn.timm_efficientformer): the last stage's
``MetaBlock1d`` attention (LeViT-style: keys 32 wide, values 128, the learned offset bias) runs one
fastvit.flash_attention call with the bias as its learnable mask, and the block's MLP half
``x + drop_path2(ls2(mlp(norm2(x))))`` one fastvit.layernorm_mlp call; the pooling blocks
(``MetaBlock2d``) and the conv stem are reported. Outputs and every gradient (attention_biases,
the layer scales included) by the tolerance rule against the unpatched model in float64, seeded
training steps with drop path, the fallbacks (a hook on ls2, MLP dropout), torch.compile, timm's
FX feature extraction, TorchScript (the original math) and the Triton kernels in the interpreter.

A narrow model: stages of depth 1, 1, 1, 3 and widths 8, 8, 16, 32, the last two blocks
``MetaBlock1d`` (8 heads, as timm builds them); 224 x 224 images, since timm fixes the attention
bias to the 7 x 7 map (49 tokens) that 224 px gives; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
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

from fastvit.nn.timm_efficientformer import FusedEfficientFormerAttention, FusedMetaBlock1d  # noqa: E402

ATTENTION_BLOCKS, TOKENS = 2, 49


def build(**overrides) -> torch.nn.Module:
    args = dict(depths=(1, 1, 1, 3), embed_dims=(8, 8, 16, 32), num_vit=ATTENTION_BLOCKS, num_classes=5)
    return perturb_(timm.create_model("efficientformer_l1", pretrained=False, **(args | overrides))).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def metablocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [b for b in model.stages[-1].blocks if hasattr(b, "token_mixer") and hasattr(b, "norm1")]


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": ATTENTION_BLOCKS, "mlp": ATTENTION_BLOCKS}
    blocks = metablocks(patched)
    assert [type(b) for b in blocks] == [FusedMetaBlock1d] * ATTENTION_BLOCKS
    assert all(type(b.token_mixer) is FusedEfficientFormerAttention for b in blocks)
    pooling = [e for e in report.skipped if e.part == "mlp"]
    assert len(pooling) == 4 and all("MetaBlock2d" in e.detail for e in pooling)  # 1 + 1 + 1 + 1 pooling blocks
    assert [e.part for e in report.skipped if e.part != "mlp"] == ["patch_embed"]  # the conv stem
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    q, k, v = op_calls["flash_attention"][0]["args"][:3]
    assert q.shape == k.shape == v.shape == (2, 8, TOKENS, 128)  # keys 32 wide, zero-padded to the values' 128
    bias = op_calls["flash_attention"][0]["kwargs"]["attn_mask"]
    assert bias.shape == (8, TOKENS, TOKENS) and bias.requires_grad
    mlp_calls = op_calls["layernorm_mlp"]
    assert [tuple(c["args"][0].shape) for c in mlp_calls] == [(2, TOKENS, 32)] * ATTENTION_BLOCKS
    assert mlp_calls[0]["kwargs"]["layer_scale"] is blocks[0].ls2.gamma
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])
    assert len(op_calls["flash_attention"]) == ATTENTION_BLOCKS


def test_hooks_and_mlp_dropout_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # a hook on the last block's layer scale
        metablocks(model)[-1].ls2.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == ATTENTION_BLOCKS - 1
    reference, patched, _ = pair(build(proj_drop_rate=0.3))  # MLP dropout in training: timm's modules, alike
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=1), rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == ATTENTION_BLOCKS == len(op_calls["layernorm_mlp"])


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
