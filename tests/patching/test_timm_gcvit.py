"""timm's GCViT patched (fastvit.nn.timm_gcvit): the local and global window attention
(``WindowAttentionGlobal``: the global blocks' queries from the stage's global query, repeated
over each image's windows) as one fastvit.flash_attention call with the relative-position bias as
the op's learnable float mask, and the blocks' MLP halves (LayerScale'd or not) as one
fastvit.layernorm_mlp call. Outputs and every gradient, the bias tables' too, by the tolerance
rule against the unpatched model in float64. GCViT shrunk to width 16, depths (2, 2, 2, 2), on
96 x 96 images (windows of 3 x 3 tokens, 6 x 6 at the third stage); no downloads.
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

gcvit = pytest.importorskip("timm.models.gcvit")

DEPTHS = (2, 2, 2, 2)


def build(**overrides) -> torch.nn.Module:
    args = dict(img_size=96, embed_dim=16, depths=DEPTHS, num_heads=(2, 2, 4, 4), num_classes=5)
    return perturb_(gcvit.GlobalContextVit(**(args | overrides))).eval()


def images(batch: int = 2, size: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer_scale", [None, 1e-2])
def test_matches_unpatched_by_the_rule(layer_scale, op_calls):
    reference = build(layer_scale=layer_scale)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": sum(DEPTHS), "mlp": sum(DEPTHS)}
    (skip,) = report.skipped
    assert skip.part == "patch_embed" and "strided convolutions" in skip.detail
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["flash_attention"][: sum(DEPTHS)]
    assert calls[0]["args"][0].shape == (2 * 64, 2, 9, 8)  # 2 images x 8 x 8 windows of 3 x 3 tokens
    bias = calls[0]["kwargs"]["attn_mask"]
    assert bias.shape == (1, 2, 9, 9) and bias.requires_grad  # rel_pos.get_bias(), learnt through the op
    if layer_scale is not None:
        assert op_calls["layernorm_mlp"][0]["kwargs"]["layer_scale"] is not None
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.3, layer_scale=1e-2))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert op_calls["flash_attention"] == []


def test_hook_on_rel_pos_runs_timm(op_calls, fresh_warnings):
    # timm calls rel_pos as a module (attn + bias); the op adds its bias itself: a hook on it sends
    # that attention to timm's forward, where the hook runs
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        model.stages[1].blocks[0].attn.rel_pos.register_forward_hook(lambda m, args, out: out * 0.5)
    x = images()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on rel_pos"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(op_calls["flash_attention"]) == sum(DEPTHS) - 1


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build(depths=(1, 1, 1, 1), layer_scale=1e-2))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(layer_scale=1e-2), images())
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
