"""timm's ConvNeXt patched (fastvit.nn.timm_convnext): each ``ConvNeXtBlock``'s MLP half,
drop_path(gamma * mlp(norm(conv_dw(x)))) + shortcut(x), is one fastvit.layernorm_mlp call with
``residual=False`` over the conv output's channels-last view, in both of timm's layouts (Linears
after a permute; ``conv_mlp``: LayerNorm2d and 1x1 convs); ConvNeXt V2's GlobalResponseNormMlp and
the stem are reported. Outputs and every gradient (gamma included) by the tolerance rule against the
unpatched model in float64, seeded training steps with drop path, MLP dropout and hooks (timm's
modules), torch.compile, timm's FX feature extraction, TorchScript (the original math) and the
Triton kernels in the interpreter.

A narrow ConvNeXt: widths 16, 24, 32, 48, one block per stage, 64 x 64 images (16 x 16, 8 x 8,
4 x 4 and 2 x 2 maps); no downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_patch_and_unpatch_keep_the_weights,
    output_strides,
    pair,
    perturb_,
)

timm = pytest.importorskip("timm")

from fastvit.nn.timm_convnext import FusedConvNeXtBlock  # noqa: E402

BLOCKS = 4
LAYOUTS = {"linear": "convnext_tiny", "conv_mlp": "convnext_atto"}  # conv_mlp=False / True in timm's configs


def build(layout: str = "linear", **overrides) -> torch.nn.Module:
    args = dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), num_classes=5)
    return perturb_(timm.create_model(LAYOUTS[layout], pretrained=False, **(args | overrides))).eval()


def images(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, timm.models.convnext.ConvNeXtBlock)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_unpatched_by_the_rule(layout, op_calls):
    reference, patched, report = pair(build(layout))
    assert report.counts() == {"mlp": BLOCKS}
    assert [type(b) for b in blocks(patched)] == [FusedConvNeXtBlock] * BLOCKS
    assert blocks(patched)[0].use_conv_mlp == (layout == "conv_mlp")
    (stem,) = report.skipped
    assert stem.part == "patch_embed" and "LayerNorm2d" in stem.detail
    assert_matches_by_the_rule(reference, patched, images())
    # the conv outputs' channels-last views, the branch alone (the block adds its input), gamma as the layer scale
    calls = op_calls["layernorm_mlp"]
    assert [tuple(c["args"][0].shape) for c in calls] == [(2, 16, 16, 16), (2, 8, 8, 24), (2, 4, 4, 32),
                                                         (2, 2, 2, 48)]  # fmt: skip
    assert all(c["kwargs"]["residual"] is False for c in calls)
    assert calls[1]["kwargs"]["layer_scale"] is blocks(patched)[1].gamma
    # each block's output laid out as timm's (a channels-last view of the MLP's output, plus the input)
    assert output_strides(blocks(patched), patched, images()) == output_strides(blocks(reference), reference, images())


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build("conv_mlp"))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_training_step_with_drop_path(layout, op_calls):
    reference, patched, _ = pair(build(layout, drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    dropping = [isinstance(b.drop_path, timm.layers.DropPath) for b in blocks(patched)]
    assert any(dropping)  # the first block's rate is 0: timm's Identity, no scale
    assert [c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"]] == dropping


def test_blocks_without_layer_scale(op_calls):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for block in blocks(model):
            block.gamma = None  # timm's ls_init_value=None
    assert_matches_by_the_rule(reference, patched, images())
    assert [c["kwargs"]["layer_scale"] for c in op_calls["layernorm_mlp"]] == [None] * BLOCKS


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_mlp_dropout_and_hooks_run_timm_modules(layout, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(layout))
    for model in (reference, patched):
        blocks(model)[0].mlp.drop2.p = 0.3
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a patched timm ConvNeXtBlock has MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS - 1
    op_calls["layernorm_mlp"].clear()
    reference, patched, _ = pair(build(layout))
    for model in (reference, patched):
        blocks(model)[2].norm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on norm"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS - 1


def test_convnext_v2_global_response_norm_is_reported():
    model = perturb_(timm.create_model("convnextv2_atto", pretrained=False, depths=(1, 1, 1, 1),
                                       dims=(16, 24, 32, 48), num_classes=5))  # fmt: skip
    with pytest.raises(ValueError, match="GlobalResponseNormMlp"):  # nothing else to fuse: the model is unchanged
        fastvit.patch(model)
    assert not any(isinstance(m, FusedConvNeXtBlock) for m in model.modules())


def test_unfusable_blocks_are_reported_with_why():
    with pytest.raises(ValueError, match=r"mlp\.act is ReLU"):  # nothing else to fuse: the model is unchanged
        fastvit.patch(build(act_layer="relu"))
    model = build()
    blocks(model)[1].gamma = torch.nn.Parameter(torch.ones(1))  # broadcasts in timm; no (C,) layer scale
    report = fastvit.patch(model)
    (skip,) = [e for e in report.skipped if e.part == "mlp"]
    assert skip.path == "stages.1.blocks.0" and "gamma is neither None nor a (24,) layer scale" in skip.detail
    assert report.counts() == {"mlp": BLOCKS - 1}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compile_fx_and_torchscript(layout, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(layout))
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_triton_route(layout, op_calls):
    reference, patched, _ = pair(build(layout))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=1), rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS


@pytest.mark.gpu
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compiled_kernels_on_the_gpu(layout, op_calls):
    assert_matches_on_the_gpu(build(layout), images())
    assert len(op_calls["layernorm_mlp"]) >= BLOCKS
