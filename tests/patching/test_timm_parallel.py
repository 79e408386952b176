"""timm's parallel ViT blocks patched (fastvit.nn.timm_parallel): ``ParallelScalingBlock`` (ViT-22B's
layout: ``vit_*_xp_*`` with RMSNorm and qk norm, ``vit_pwee_*`` with LayerScale and a separate MLP
bias) runs its attention as one fastvit.flash_attention call on views of its shared input
projection, ``DiffParallelScalingBlock`` (``vit_dpwee_*``: differential attention, q / k heads half
as wide as v's) as two calls, q and k zero-padded to v's width; their MLP branch, which shares that
projection, runs timm's modules and is reported.
Outputs and every gradient by the tolerance rule against the unpatched model in float64 (separate
and fused output projections), masks and causal calls, seeded training steps with drop path,
attention dropout (timm's SDPA and eager paths) and a hook, unpatch, torch.compile, timm's FX
feature extraction, TorchScript (the original math) and the Triton kernels in the interpreter.

Narrow models: width 64, 2 heads of 32, two blocks, 32 x 32 images in 8 x 8 patches (16 tokens and
a class token, or the pwee model's register token); no downloads.
"""

from __future__ import annotations

import functools

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

from timm.models.vision_transformer import ParallelScalingBlock  # noqa: E402

from fastvit.nn.timm_parallel import FusedDiffParallelScalingBlock, FusedParallelScalingBlock  # noqa: E402

NARROW = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5)
MODELS = {
    "xp": lambda **kw: timm.create_model("vit_base_patch16_xp_224", pretrained=False, **NARROW, **kw),
    "pwee": lambda **kw: timm.create_model("vit_pwee_patch16_reg1_gap_256", pretrained=False, **NARROW, **kw),
    "dpwee": lambda **kw: timm.create_model("vit_dpwee_patch16_reg1_gap_256", pretrained=False, **NARROW, **kw),
    "fused_out_proj": lambda **kw: timm.create_model(
        "vit_base_patch16_xp_224", pretrained=False, block_fn=functools.partial(ParallelScalingBlock,
                                                                                fuse_out_proj=True), **NARROW, **kw
    ),
}  # fmt: skip


def build(name: str = "xp", **overrides) -> torch.nn.Module:
    """A narrow model, perturbed (the differential blocks' lambdas too: timm starts them near 0)."""
    return perturb_(MODELS[name](**overrides), std=0.05).eval()


FUSED = {"dpwee": FusedDiffParallelScalingBlock}


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    reference, patched, report = pair(build(name))
    assert report.counts() == {"patch_embed": 1, "attention": 2}
    assert [type(block) for block in patched.blocks] == [FUSED.get(name, FusedParallelScalingBlock)] * 2
    assert [(e.part, e.where) for e in report.skipped] == [("mlp", "blocks.0"), ("mlp", "blocks.1")]
    assert all("shares the block's norm and input projection" in e.detail for e in report.skipped)
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["flash_attention"]
    if name == "dpwee":  # two calls a block: q, k (16 wide) padded to v's 32, the scale 16's
        assert len(calls) == 4 and calls[0]["args"][0].shape == calls[0]["args"][2].shape == (2, 2, 17, 32)
        assert calls[0]["kwargs"]["scale"] == 16**-0.5
    else:  # 16 patches and a class or register token
        assert len(calls) == 2 and calls[0]["args"][0].shape == (2, 2, 17, 32)
        assert calls[0]["kwargs"]["scale"] is None  # timm's SDPA default


@pytest.mark.parametrize("name", ["xp", "dpwee"])
@pytest.mark.parametrize("mask", ["bool", "float", "causal"])
def test_masks_and_causal_calls_match(name, mask, op_calls):
    reference, patched, _ = pair(build(name))
    block, fused = reference.blocks[0], patched.blocks[0]
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    keep = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    keep |= torch.eye(9, dtype=torch.bool)  # no fully masked row
    kwargs = {"bool": dict(attn_mask=keep), "causal": dict(is_causal=True),
              "float": dict(attn_mask=torch.zeros(2, 1, 9, 9).masked_fill(~keep, -1e4))}[mask]  # fmt: skip
    torch.testing.assert_close(fused(x, **kwargs), block(x, **kwargs), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == (2 if name == "dpwee" else 1)


@pytest.mark.parametrize("name", ["xp", "dpwee"])
def test_a_mask_with_causal_runs_timm(name, op_calls):
    # timm's SDPA path refuses both (SDPA raises); the patched block leaves the call to timm, which does too
    reference, patched, _ = pair(build(name))
    x, keep = torch.randn(1, 9, 64), torch.ones(1, 1, 9, 9, dtype=torch.bool)
    for block in (reference.blocks[0], patched.blocks[0]):
        with pytest.raises(RuntimeError):
            block(x, attn_mask=keep, is_causal=True)
    assert op_calls["flash_attention"] == []


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build("pwee"))


@pytest.mark.parametrize("name", ["pwee", "dpwee"])
def test_training_step_with_drop_path(name, op_calls):
    reference, patched, _ = pair(build(name, drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == (4 if name == "dpwee" else 2)


@pytest.mark.parametrize("name", ["xp", "dpwee"])
@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_and_a_hook_run_timm(name, fused_attn, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(name, attn_drop_rate=0.2))
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    reference, patched, _ = pair(build(name))
    for model in (reference, patched):
        for block in model.blocks:
            block.fused_attn = False  # timm's eager path calls attn_drop
            block.attn_drop.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert op_calls["flash_attention"] == []


def test_differential_sdpa_dropout_is_its_float(op_calls, fresh_warnings):
    # DiffParallelScalingBlock's SDPA path drops with attn_drop_p, a float beside its attn_drop module:
    # set alone, it still sends training calls to timm
    reference, patched, _ = pair(build("dpwee"))
    for model in (reference, patched):
        for block in model.blocks:
            block.attn_drop_p = 0.2
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert op_calls["flash_attention"] == []


def test_a_hook_on_a_called_module_still_fires(op_calls):
    # the fused forward calls the block's modules (in_proj, q_norm ...) as timm does: their hooks run
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for block in model.blocks:
            block.in_proj.register_forward_hook(lambda m, args, out: out * 0.5)
    torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == 2


@pytest.mark.parametrize("name", ["xp", "dpwee"])
def test_eager_path_scale_is_read(name, op_calls):
    reference, patched, _ = pair(build(name))
    for model in (reference, patched):
        for block in model.blocks:
            block.fused_attn, block.scale = False, 0.1
    assert_matches_by_the_rule(reference, patched, images())
    assert {call["kwargs"]["scale"] for call in op_calls["flash_attention"]} == {0.1}


@pytest.mark.parametrize("name", ["xp", "dpwee"])
def test_compile_fx_and_torchscript(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(name))
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["pwee", "dpwee"])
def test_triton_route(name, op_calls):
    reference, patched, _ = pair(build(name))
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["flash_attention"]) == (4 if name == "dpwee" else 2)


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"]
