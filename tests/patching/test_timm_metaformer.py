"""timm's MetaFormer models patched (fastvit.nn.timm_metaformer): CAFormer's ``Attention`` (the token
mixer of its last two stages) runs one fastvit.flash_attention call over the stage's tokens; the
SepConv / pooling stages, the StarReLU MLPs with their residual scales and the conv stem are
reported as left alone, and a ConvFormer (no attention) is refused with those reasons. Outputs and
every gradient by the tolerance rule against the unpatched model in float64, seeded training steps
with drop path, attention dropout (timm's SDPA and eager paths) and a hook, torch.compile, timm's
FX feature extraction, TorchScript (the original math) and the Triton kernels in the interpreter.

A narrow CAFormer: one block per stage, widths 32 / 48 / 64 / 96 (the attentions: 2 and 3 heads of 32), 64 x 64
images (a 4 x 4 map in the third stage, 16 tokens; 2 x 2 in the fourth); no downloads.
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

from timm.models import metaformer  # noqa: E402

from fastvit.nn.timm_metaformer import FusedMetaFormerAttention  # noqa: E402


def _metaformer(token_mixers: list[type], **overrides) -> torch.nn.Module:
    """A MetaFormer as timm's caformer_* / convformer_* build it (their norms), one block per stage
    (their factories fix the depths and widths)."""
    norms = [metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias if m is metaformer.Attention
                                                    else metaformer.LayerNorm2dNoBias for m in token_mixers[2:]]
    args = dict(depths=(1, 1, 1, 1), dims=(32, 48, 64, 96), num_classes=5, token_mixers=token_mixers,
                norm_layers=norms)  # fmt: skip
    return metaformer.MetaFormer(**(args | overrides))


def build(**overrides) -> torch.nn.Module:
    """caformer_s18's layout: SepConv, SepConv, Attention, Attention."""
    mixers = [metaformer.SepConv] * 2 + [metaformer.Attention] * 2
    return perturb_(_metaformer(mixers, **overrides), std=0.05).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [model.stages[i].blocks[0].token_mixer for i in (2, 3)]


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": 2}
    assert [type(a) for a in attentions(patched)] == [FusedMetaFormerAttention] * 2
    skipped = {(e.part, e.where) for e in report.skipped}
    assert skipped == {("patch_embed", "(model)"), *(("mlp", f"stages.{i}.blocks.0") for i in range(4))}
    assert all("StarReLU" in e.detail for e in report.skipped if e.part == "mlp")
    assert_matches_by_the_rule(reference, patched, images())
    first, second = op_calls["flash_attention"]
    assert [call["args"][0].shape for call in (first, second)] == [(2, 2, 16, 32), (2, 3, 4, 32)]
    assert first["kwargs"]["scale"] is None  # timm's SDPA default


def test_a_convformer_is_refused_with_the_reasons():
    model = _metaformer([metaformer.SepConv] * 4)
    with pytest.raises(ValueError, match=r"(?s)nothing to patch in MetaFormer.*stem is an overlapping conv.*StarReLU"):
        fastvit.patch(model)


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build())


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == 2


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_and_a_hook_run_timm(fused_attn, op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # timm's MetaFormer passes no attention dropout: set it
        for attention in attentions(model):
            attention.attn_drop.p = 0.2
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for attention in attentions(model):
            attention.fused_attn = False  # timm's eager path calls attn_drop
            attention.attn_drop.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert op_calls["flash_attention"] == []


def test_eager_path_scale_is_read(op_calls):
    # timm's eager path multiplies by attn.scale, its SDPA path uses SDPA's default: both kept
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for attention in attentions(model):
            attention.fused_attn, attention.scale = False, 0.1
    assert_matches_by_the_rule(reference, patched, images())
    assert [call["kwargs"]["scale"] for call in op_calls["flash_attention"][:2]] == [0.1, 0.1]


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["flash_attention"]) == 2


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"]


def test_heads_narrower_than_the_tokens_keep_timms_error():
    # dim 80 with heads of 32: two heads (64 channels); timm's reshape to (B, N, 80) raises, patched too
    reference, patched, _ = pair(build(dims=(32, 48, 80, 96)))
    x = images(batch=1)
    for model in (reference, patched):
        with pytest.raises(RuntimeError):
            model(x)
