"""timm's Next-ViT patched (fastvit.nn.timm_nextvit): the transformer blocks' ``EfficientAttention``
(q from every token, k and v from the tokens pooled ``sr_ratio ** 2`` at a time and BatchNorm'd)
runs one fastvit.flash_attention call; the conv blocks, the blocks' BatchNorm conv MLPs and the
stem are reported. Outputs and every gradient by the tolerance rule against the unpatched model in
float64, seeded training steps with drop path, attention dropout (timm's SDPA path) and a hook on
its eager path, torch.compile, timm's FX feature extraction, TorchScript (the original math) and the
Triton kernels in the interpreter.

Next-ViT's widths are fixed by timm (96 to 1024 channels); the model is shortened to depths
1, 2, 5, 1 (one transformer block in each of the last three stages) and run on 64 x 64 images:
8 x 8 maps with sr_ratio 4 (64 tokens to 4), 4 x 4 with sr_ratio 2 (16 to 4), 2 x 2 with none
(4 to 4); heads of 32; no downloads.
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

from fastvit.nn.timm_nextvit import FusedEfficientAttention  # noqa: E402

ATTENTIONS = 3


def build(std: float = 0.05, **overrides) -> torch.nn.Module:
    args = dict(depths=(1, 2, 5, 1), drop_path_rate=0.0, num_classes=5)
    # std 0.05: 0.1 on every weight of these 1024-wide conv stacks grows the activations to 1e9
    return perturb_(timm.create_model("nextvit_small", pretrained=False, **(args | overrides)), std=std).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, timm.models.nextvit.EfficientAttention)]


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": ATTENTIONS}
    assert [type(a) for a in attentions(patched)] == [FusedEfficientAttention] * ATTENTIONS
    mlps = [e for e in report.skipped if e.part == "mlp"]
    assert len(mlps) == ATTENTIONS and all("BatchNorm2d" in e.detail for e in mlps)
    assert_matches_by_the_rule(reference, patched, images())
    shapes = [(tuple(c["args"][0].shape), tuple(c["args"][1].shape)) for c in op_calls["flash_attention"]]
    # (B, H, N, 32) queries to (B, H, M, 32) reduced keys: 64 -> 4 (sr 4), 16 -> 4 (sr 2), 4 -> 4
    heads = [a.num_heads for a in attentions(patched)]
    assert shapes == [((2, heads[0], 64, 32), (2, heads[0], 4, 32)), ((2, heads[1], 16, 32), (2, heads[1], 4, 32)),
                      ((2, heads[2], 4, 32), (2, heads[2], 4, 32))]  # fmt: skip
    # timm's fused path: SDPA without a scale, its default 32 ** -0.5 (timm_scale)
    assert all(c["kwargs"]["scale"] is None for c in op_calls["flash_attention"])


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build())


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == ATTENTIONS


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    # timm's SDPA path (its default); the eager path, which calls attn_drop, in the hook test below
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn=True)
    assert op_calls["flash_attention"] == []


def test_a_hook_on_the_attention_dropout_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        attention = attentions(model)[-1]
        attention.fused_attn = False  # timm's eager path calls attn_drop
        attention.attn_drop.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == ATTENTIONS - 1


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    # scores of |s| < 10 (std 0.02; 0.05 gives |s| ~ 300 in the last stage): the interpreter's dots
    # round the backward's scores otherwise than the forward's, an error growing as |s| 2^-24
    # (README, fp32 attention backward) that the tolerance rule does not budget for
    reference, patched, _ = pair(build(std=0.02))
    with fastvit.backend("triton"):  # the rule: the deep BatchNorm'd conv stacks amplify the fp32 error
        assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["flash_attention"]) == ATTENTIONS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert len(op_calls["flash_attention"]) >= ATTENTIONS
