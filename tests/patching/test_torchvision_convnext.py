"""fastvit.patch on torchvision's ConvNeXt (fastvit.nn.torchvision_convnext): each ``CNBlock``'s
LayerNorm+MLP, ``stochastic_depth(layer_scale * block(x)) + x`` after the depthwise conv, is one
fastvit.layernorm_mlp call with ``residual=False`` over the conv output's channels-last view.
Outputs and every gradient (layer_scale included) by the tolerance rule against the unpatched
model in float64, the output's layout, seeded training steps with stochastic depth, a hook
(torchvision's modules), torch.compile, torchvision's FX feature extraction, TorchScript (the
original math) and the Triton kernels in the interpreter.

A narrow ConvNeXt: widths 16 and 32, one block per stage, 32 x 32 images (8 x 8 and 4 x 4 maps);
no downloads.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_patch_and_unpatch_keep_the_weights,
    output_strides,
    pair,
    perturb_,
)

pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt

from fastvit.nn.torchvision_convnext import FusedCNBlock

BLOCKS = 2


def build(**overrides) -> torch.nn.Module:
    args = dict(block_setting=[CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], stochastic_depth_prob=0.0,
                num_classes=5)  # fmt: skip
    return perturb_(ConvNeXt(**(args | overrides)))


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, CNBlock)]


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build().eval())
    assert report.counts() == {"mlp": BLOCKS} and not report.skipped
    assert [type(b) for b in blocks(patched)] == [FusedCNBlock] * BLOCKS
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["layernorm_mlp"]
    assert [tuple(c["args"][0].shape) for c in calls] == [(2, 8, 8, 16), (2, 4, 4, 32)]
    assert all(c["kwargs"]["residual"] is False for c in calls)
    # the (C, 1, 1) Parameter as a (C,) view: its gradient reaches the Parameter
    assert calls[0]["kwargs"]["layer_scale"].shape == (16,)
    assert calls[0]["kwargs"]["layer_scale"].data_ptr() == blocks(patched)[0].layer_scale.data_ptr()
    assert output_strides(blocks(patched), patched, images()) == output_strides(blocks(reference), reference, images())


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build().eval())


def test_training_step_with_stochastic_depth(op_calls):
    reference, patched, _ = pair(build(stochastic_depth_prob=0.5).train())
    assert_outputs_and_grads_match(reference, patched, images(batch=4), seed=0, rtol=1e-4, atol=1e-5)
    scales = [c["kwargs"]["sample_scale"] for c in op_calls["layernorm_mlp"]]
    assert scales[0] is None and scales[1] is not None  # the first block's p is 0


def test_hook_runs_torchvision_modules(op_calls, fresh_warnings):
    reference, patched, _ = pair(build().eval())
    for model in (reference, patched):
        blocks(model)[1].block[3].register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on block.3"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS - 1


def test_unfusable_blocks_are_reported_with_why():
    model = build().eval()
    blocks(model)[0].stochastic_depth.mode = "batch"  # one draw for the whole batch: no per-sample scale
    blocks(model)[1].block[4] = torch.nn.ReLU()
    with pytest.raises(ValueError, match="stochastic_depth mode 'batch', not 'row'") as raised:
        fastvit.patch(model)  # nothing else to fuse: the model is unchanged
    assert "block.4 is ReLU" in str(raised.value)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    from torchvision.models.feature_extraction import create_feature_extractor

    reference, patched, _ = pair(build().eval())
    x = images()
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    nodes = {"features.3": "out"}
    want = create_feature_extractor(reference, return_nodes=nodes)(x)["out"]
    torch.testing.assert_close(create_feature_extractor(patched, return_nodes=nodes)(x)["out"], want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    calls = len(op_calls["layernorm_mlp"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream; fastvit says it scripts the original
        scripted = torch.jit.script(patched)
    torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == calls  # TorchScript ran torchvision's math


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build().eval())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(), rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build().eval(), images())
    assert len(op_calls["layernorm_mlp"]) >= BLOCKS
