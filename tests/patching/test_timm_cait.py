"""The MLP halves of timm's CaiT blocks (fastvit.nn.timm_cait): ``LayerScaleBlock`` (talking-heads
attention, left as timm's) and ``LayerScaleBlockClassAttn`` (the class token's update, its class
attention fused on its own) end in ``x + drop_path(gamma_2 * mlp(norm2(x)))``, one
fastvit.layernorm_mlp call with ``gamma_2`` as ``layer_scale``; the block's one ``drop_path`` is
called by both halves, as in timm. Outputs and every gradient by the tolerance rule against the
unpatched model in float64, seeded training steps with drop path (two draws per block, in timm's
order), the fallbacks (MLP dropout, a hook on the shared drop path or on the MLP), forward
intermediates, TorchScript, torch.compile, timm's FX feature extraction and the Triton kernels in
the interpreter. A tiny cait_xxs24 config; no downloads.
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

from fastvit.nn.timm_cait import FusedLayerScaleBlock, FusedLayerScaleBlockClassAttn  # noqa: E402

TALKING_BLOCKS, CLASS_BLOCKS = 2, 2


def cait(**overrides) -> torch.nn.Module:
    config = dict(img_size=16, patch_size=4, embed_dim=32, depth=TALKING_BLOCKS, num_heads=2,
                  depth_token_only=CLASS_BLOCKS, num_classes=5, init_values=0.1)  # fmt: skip
    return perturb_(timm.create_model("cait_xxs24_224", pretrained=False, **(config | overrides))).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_both_blocks_mlp_halves_match_unpatched(op_calls):
    reference = cait()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": CLASS_BLOCKS, "mlp": TALKING_BLOCKS + CLASS_BLOCKS, "patch_embed": 1}
    assert [type(b) for b in patched.blocks] == [FusedLayerScaleBlock] * TALKING_BLOCKS
    assert [type(b) for b in patched.blocks_token_only] == [FusedLayerScaleBlockClassAttn] * CLASS_BLOCKS
    assert not [e for e in report.skipped if e.part == "mlp"]
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == TALKING_BLOCKS + CLASS_BLOCKS
    assert all(c["kwargs"]["layer_scale"] is not None for c in calls)  # gamma_2
    # the talking-heads blocks over the 16 patch tokens (CaiT adds the class token for its class
    # blocks only), the class blocks over the class token alone
    shapes = [tuple(c["args"][0].shape) for c in calls]
    assert shapes == [(3, 16, 32)] * TALKING_BLOCKS + [(3, 1, 32)] * CLASS_BLOCKS
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    # timm's one drop_path draws twice per block (attention half, then MLP half): the fused half
    # draws its sample scale in the same place, so one seed drops the same samples
    reference, patched, _ = pair(cait(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    # timm builds the class blocks without drop path
    scales = [c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"]]
    assert scales == [True] * TALKING_BLOCKS + [False] * CLASS_BLOCKS


def test_mlp_dropout_and_hooks_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(cait(drop_path_rate=0.2))
    x = images()
    for model in (reference, patched):  # a hook on the first block's shared drop_path (eval: identity)
        model.blocks[0].drop_path.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on drop_path"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == TALKING_BLOCKS + CLASS_BLOCKS - 1
    reference, patched, _ = pair(cait(proj_drop_rate=0.3))  # MLP dropout in training: timm's modules, alike
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0, rtol=1e-4, atol=1e-5)


def test_forward_intermediates(op_calls):
    reference, patched, _ = pair(cait())
    want_final, want = reference.forward_intermediates(images())
    got_final, got = patched.forward_intermediates(images())
    assert len(op_calls["layernorm_mlp"]) == TALKING_BLOCKS + CLASS_BLOCKS
    torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(cait())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(cait())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == TALKING_BLOCKS + CLASS_BLOCKS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(cait(), images())
    assert len(op_calls["layernorm_mlp"]) == 2 * (TALKING_BLOCKS + CLASS_BLOCKS)
