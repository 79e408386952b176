"""Hugging Face's ConvNeXt patched (fastvit.nn.hf_convnext): each ``ConvNextLayer``'s branch,
drop_path(layer_scale * pwconv2(act(pwconv1(layernorm(dwconv(x)))))) over the conv output's
channels-last view, is one fastvit.layernorm_mlp call with ``residual=False``, the layer adding its
input. Outputs and every gradient by the tolerance rule against the unpatched model in float64,
seeded training with drop path (drawn as ConvNextDropPath draws it), hooks (Hugging Face's modules),
ConvNeXt V2's GRN and other unfusable layers reported with why, unpatch, torch.compile, torch.export, torch.fx
and the Triton kernels in the interpreter (Hugging Face's ConvNeXt does not script, patched or not).

A narrow ConvNeXt: widths 16, 24, 32, 48, one layer per stage (two in the third), 64 x 64 images
(16 x 16 to 2 x 2 maps); no downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLogits,
    assert_exports_with_ops,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_patch_and_unpatch_keep_the_weights,
    layer_skips,
    output_strides,
    pair,
    perturb_,
    unfused_embeddings_only,
)

T = pytest.importorskip("transformers")

from transformers.models.convnext.modeling_convnext import ConvNextLayer  # noqa: E402

from fastvit.nn.hf_convnext import FusedConvNextLayer  # noqa: E402

LAYERS = 5


def build(v2: bool = False, **overrides) -> torch.nn.Module:
    args = dict(hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 2, 1], num_labels=5, layer_scale_init_value=0.5)
    if v2:
        args.pop("layer_scale_init_value")
        return HFLogits(perturb_(T.ConvNextV2ForImageClassification(T.ConvNextV2Config(**(args | overrides))))).eval()
    return HFLogits(perturb_(T.ConvNextForImageClassification(T.ConvNextConfig(**(args | overrides))))).eval()


def images(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, ConvNextLayer)]


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"mlp": LAYERS} and unfused_embeddings_only(report)
    assert [type(layer) for layer in layers(patched)] == [FusedConvNextLayer] * LAYERS
    # accelerate's device_map / FSDP look the layers up by class name
    assert set(patched.model._no_split_modules) == {"FusedConvNextLayer", "ConvNextStage"}
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["layernorm_mlp"]
    assert [tuple(c["args"][0].shape) for c in calls[:2]] == [(2, 16, 16, 16), (2, 8, 8, 24)]  # channels-last views
    assert all(c["kwargs"]["residual"] is False for c in calls)
    assert calls[1]["kwargs"]["layer_scale"] is layers(patched)[1].layer_scale_parameter
    # each layer's output laid out as Hugging Face's (a channels-last view of the MLP's output plus the input)
    assert output_strides(layers(patched), patched, images()) == output_strides(layers(reference), reference, images())


def test_without_layer_scale(op_calls):
    reference, patched, _ = pair(build(layer_scale_init_value=0.0))
    assert_matches_by_the_rule(reference, patched, images())
    assert [c["kwargs"]["layer_scale"] for c in op_calls["layernorm_mlp"]] == [None] * LAYERS


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build())


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    scales = [c["kwargs"]["sample_scale"] for c in op_calls["layernorm_mlp"]]
    assert scales[0] is None and all(s is not None for s in scales[1:])  # the first layer's rate is 0: Identity


def test_hooks_run_hugging_face_modules(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        layers(model)[2].layernorm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on layernorm"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1


def test_unfusable_layers_are_reported_with_why():
    with pytest.raises(ValueError, match="global response norm"):  # V2: nothing to fuse, the model unchanged
        fastvit.patch(build(v2=True))
    with pytest.raises(ValueError, match="act is ReLU"):
        fastvit.patch(build(hidden_act="relu"))
    model = build()
    layers(model)[1].layernorm.data_format = "channels_first"
    report = fastvit.patch(model)
    (skip,) = layer_skips(report)
    assert skip.path == "model.convnext.encoder.stages.1.layers.0" and "data_format is 'channels_first'" in skip.detail
    assert report.counts() == {"mlp": LAYERS - 1}


def test_compile_and_fx(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    x = images()
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    encoder = patched.model.convnext.encoder  # Hugging Face's output dataclasses do not trace; its stages do
    traced = torch.fx.symbolic_trace(encoder.stages[2])
    branches = [n for n in traced.graph.nodes if n.op == "call_method" and n.target == "_fastvit_mlp_branch"]
    assert len(branches) == 2
    stage_in = torch.randn(2, 24, 8, 8)
    want = reference.model.convnext.encoder.stages[2](stage_in)
    torch.testing.assert_close(traced(stage_in), want, rtol=1e-5, atol=1e-5)
    # no TorchScript check: Hugging Face's ConvNextLayerNorm calls super().forward, which TorchScript
    # rejects in the unpatched model too


@pytest.mark.interpreter
def test_torch_export_keeps_the_custom_ops():
    assert_exports_with_ops(build(), images(batch=1), {"fastvit.layernorm_mlp_fwd.default"})


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=1), rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert len(op_calls["layernorm_mlp"]) >= LAYERS
