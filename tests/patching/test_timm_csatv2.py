"""timm's CSATv2 patched (fastvit.nn.timm_csatv2): each ``TransformerBlock``'s MLP half on its
(B, C, H, W) map is one fastvit.layernorm_mlp call (the branch over the map's tokens, laid out and
added as timm does: the block's output keeps timm's strides), its ``Attention`` one
fastvit.flash_attention call; the ConvNeXt-style DCT blocks run timm's modules. Outputs and every
gradient by the tolerance rule against the unpatched model in float64 (with and without LayerScale),
seeded training steps with drop path, MLP dropout and a hook run timm's modules, unpatch,
torch.compile, timm's FX feature extraction, TorchScript (the original math) and the Triton kernels
in the interpreter.

A narrow CSATv2: widths 32 / 32 / 64 / 64, one transformer block in each of the last two stages (8
heads of 32, as timm fixes them), 128 x 128 images (a 4 x 4 map in the third stage, 2 x 2 in the
fourth); no downloads.
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
    pair,
    perturb_,
)

timm = pytest.importorskip("timm")
pytest.importorskip("timm.models.csatv2")

from timm.models.csatv2 import TransformerBlock  # noqa: E402

from fastvit.nn.timm_csatv2 import FusedCsatv2TransformerBlock  # noqa: E402
from fastvit.nn.timm_vit import FusedAttention  # noqa: E402

NARROW = dict(dims=(32, 32, 64, 64), depths=(1, 1, 2, 2), transformer_depths=(0, 0, 1, 1), num_classes=5)


def build(**overrides) -> torch.nn.Module:
    return perturb_(timm.create_model("csatv2", pretrained=False, **(NARROW | overrides)), std=0.05).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer block of the third and of the fourth stage."""
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_matches_unpatched_by_the_rule(layer_scale, op_calls):
    reference, patched, report = pair(build(ls_init_value=layer_scale))
    assert report.counts() == {"attention": 2, "mlp": 2}
    assert [type(block) for block in blocks(patched)] == [FusedCsatv2TransformerBlock] * 2
    assert_matches_by_the_rule(reference, patched, images())
    first, second = op_calls["layernorm_mlp"]
    assert first["args"][0].shape == (2, 16, 64) and first["kwargs"]["residual"] is False
    assert second["args"][0].shape == (2, 4, 64)
    scale = first["kwargs"].get("layer_scale")
    assert (scale is None) == (layer_scale is None)
    assert len(op_calls["flash_attention"]) == 2


def test_every_block_keeps_timms_layout():
    reference, patched, _ = pair(build())
    outputs = {"reference": [], "patched": []}
    for name, model in (("reference", reference), ("patched", patched)):
        for block in blocks(model):
            block.register_forward_hook(lambda m, a, out, seen=outputs[name]: seen.append(out))
        model(images())
    for got, want in zip(outputs["patched"], outputs["reference"], strict=True):
        assert got.shape == want.shape and got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build(ls_init_value=0.1))


def test_training_step_with_drop_path(op_calls):
    # the transformer blocks' drop path is the op's per-sample scale, drawn as timm draws it
    reference, patched, _ = pair(build(drop_path_rate=0.5, transformer_drop_path=True))
    assert [block.drop_path2.drop_prob > 0 for block in blocks(patched)] == [True, True]
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 2


def test_mlp_dropout_and_a_hook_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for block in blocks(model):
            block.mlp.drop1.p = 0.2
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert op_calls["layernorm_mlp"] == []
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        blocks(model)[0].norm2.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 1  # the other block


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build(ls_init_value=0.1))
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build(ls_init_value=0.1))
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["layernorm_mlp"]) == 2


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(ls_init_value=0.1), images())
    assert op_calls["layernorm_mlp"]


def test_the_attention_is_timms_fused_attention():
    _, patched, _ = pair(build())
    assert [type(block.attn) for block in blocks(patched)] == [FusedAttention] * 2
