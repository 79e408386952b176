"""timm's Apple FastViT patched (fastvit.nn.timm_fastvit): the last stage's ``Attention`` (the
token mixer of its ``AttentionBlock``s in ``fastvit_sa*``, ``fastvit_ma*`` and the MobileCLIP towers
``fastvit_mci*``) runs one fastvit.flash_attention call over the (B, C, H, W) map's positions; the
RepMixer blocks, the BatchNorm conv MLPs and the stem are reported as left alone. Outputs and
every gradient by the tolerance rule against the unpatched model in float64, seeded training steps
with drop path, attention dropout (timm's SDPA and eager paths) and a hook, torch.compile, timm's
FX feature extraction, TorchScript (the original math) and the Triton kernels in the interpreter.

A narrow MCi0 (MobileCLIP-S0's image tower): one block per stage, width 64 (timm's smallest; the
attention: 2 heads of 32), 128 x 128 images (a 4 x 4 map, 16 tokens, in the last stage); no
downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_attention_dropout_runs_timm,
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_patch_and_unpatch_keep_the_weights,
    pair,
    perturb_,
)

timm = pytest.importorskip("timm")

from fastvit.nn.timm_fastvit import FusedAppleFastVitAttention  # noqa: E402


def build(**overrides) -> torch.nn.Module:
    args = dict(layers=(1, 1, 1, 1), embed_dims=(64, 64, 64, 64), num_classes=5)  # timm groups convs by 64
    return perturb_(timm.create_model("fastvit_mci0", pretrained=False, **(args | overrides)), std=0.05).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def attention(model: torch.nn.Module) -> torch.nn.Module:
    return model.stages[3].blocks[0].token_mixer


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": 1}
    assert type(attention(patched)) is FusedAppleFastVitAttention
    assert [e.part for e in report.skipped] == ["model"] and "RepMixer" in report.skipped[0].detail
    assert_matches_by_the_rule(reference, patched, images())
    (call,) = op_calls["flash_attention"]
    assert call["args"][0].shape == (2, 2, 16, 32) and call["kwargs"]["scale"] is None  # timm's SDPA default


def test_a_model_without_attention_is_left_alone_with_the_reason():
    with pytest.raises(ValueError, match=r"(?s)nothing to patch in FastVit.*RepMixer blocks"):
        fastvit.patch(timm.create_model("fastvit_t8", pretrained=False, num_classes=5))


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build())


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == 1


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_and_a_hook_run_timm(fused_attn, op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # timm's FastVit passes no attention dropout: set it
        attention(model).attn_drop.p = 0.2
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        attention(model).fused_attn = False  # timm's eager path calls attn_drop
        attention(model).attn_drop.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert op_calls["flash_attention"] == []


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["flash_attention"]) == 1


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"]
