"""timm's TNT (Transformer in Transformer) patched (fastvit.nn.timm_tnt): every block's inner
(pixel) and outer (patch) attention runs one fastvit.flash_attention call each, and both its MLP
halves one fastvit.layernorm_mlp call each (one ``drop_path`` module for every branch, each call
its own draw, as in timm); the PixelEmbed is reported. Outputs and every gradient by the tolerance
rule against the unpatched model in float64, seeded training steps with drop path, the fallbacks
(attention dropout, MLP dropout, a hook), torch.compile, timm's FX feature extraction, TorchScript
(the original math) and the Triton kernels in the interpreter.

A tiny TNT: 32 x 32 images in 8 x 8 patches (16 patches + the class token), 2 x 2 pixel tokens
of width 8 per patch (inner: 2 heads of 4; outer: width 32, 2 heads of 16), two blocks; no
downloads.
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

from fastvit.nn.timm_tnt import FusedTntAttention, FusedTntBlock  # noqa: E402

BLOCKS = 2


def build(**overrides) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=8, embed_dim=32, inner_dim=8, depth=BLOCKS, num_heads_inner=2,
                num_heads_outer=2, first_stride=4, num_classes=5)  # fmt: skip
    return perturb_(timm.create_model("tnt_s_patch16_224", pretrained=False, **(args | overrides))).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": 2 * BLOCKS, "mlp": BLOCKS}
    assert all(type(b) is FusedTntBlock for b in patched.blocks)
    assert all(type(b.attn_in) is type(b.attn_out) is FusedTntAttention for b in patched.blocks)
    assert [e.part for e in report.skipped] == ["patch_embed"] and "PixelEmbed" in report.skipped[0].detail
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    # per block: the inner attention over each patch's 4 pixel tokens, the outer over 17 patch tokens
    shapes = [tuple(c["args"][0].shape) for c in op_calls["flash_attention"]]
    assert shapes == [(2 * 16, 2, 4, 4), (2, 2, 17, 16)] * BLOCKS
    assert [tuple(c["args"][0].shape) for c in op_calls["layernorm_mlp"]] == [(2 * 16, 4, 8), (2, 17, 32)] * BLOCKS
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    # forward only: timm's TNT drops its softmax output in place (nn.Dropout(inplace=True)), which
    # autograd refuses in a backward, patched or not
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    torch.manual_seed(0)
    with torch.no_grad():
        want = reference.train()(images())
    torch.manual_seed(0)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"), torch.no_grad():
        got = patched.train()(images())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same draws: timm's forward ran
    assert op_calls["flash_attention"] == []


def test_hooks_and_mlp_dropout_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # a hook on the last block's inner MLP
        model.blocks[-1].mlp_in.fc2.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 2 * (BLOCKS - 1)  # the hooked block runs both halves as timm's
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
    assert len(op_calls["flash_attention"]) == 2 * BLOCKS and len(op_calls["layernorm_mlp"]) == 2 * BLOCKS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
