"""timm's post-norm blocks patched (fastvit.nn.timm_post_norm): in ``x + drop_path2(norm2(mlp(x)))``
the MLP module alone is one fastvit.layernorm_mlp call with ``norm="none"`` and ``residual=False``,
the block's norm2, drop path and residual add running as timm's. Swin V2, Swin V2-CR,
``EvaBlockPostNorm`` (Mlp and packed SwiGLU), ``ResPostRelPosBlock`` and ViT's ``ResPostBlock``
(with timm's Mlp and its two-projection SwiGLU): outputs and every gradient by the tolerance rule
against the unpatched model in float64, seeded training with drop path, MLP dropout and hooks
(timm's modules), scale_mlp's hidden norm, unpatch, torch.compile, timm's FX feature extraction,
TorchScript (the original math) and the Triton kernels in the interpreter.

Small models (no downloads): the sizes of the families' own test files.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    DEPTH,
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_patch_and_unpatch_keep_the_weights,
    images,
    pair,
    timm_model,
    timm_vit,
)

timm = pytest.importorskip("timm")

from timm.layers import Mlp, RmsNorm, SwiGLU  # noqa: E402
from timm.models.vision_transformer import ResPostBlock  # noqa: E402

from fastvit.nn.timm_post_norm import FusedGluMlpAlone, FusedMlpAlone, FusedSwiGLUAlone  # noqa: E402
from tests.patching import test_timm_eva, test_timm_swinv2_cr, test_timm_windows  # noqa: E402

# name -> (builder, images, post-norm blocks, fused MLP class)
MODELS = {
    "swinv2": (lambda **kw: test_timm_windows.swin(v2=True, **kw), test_timm_windows.images, 4, FusedMlpAlone),
    "swinv2_cr": (test_timm_swinv2_cr.build, test_timm_swinv2_cr.images, 4, FusedMlpAlone),
    "eva_post_norm": (lambda **kw: test_timm_eva.eva(use_post_norm=True, **kw), images, DEPTH, FusedMlpAlone),
    "eva_post_norm_swiglu": (lambda **kw: test_timm_eva.eva(use_post_norm=True, swiglu_mlp=True, **kw), images,
                             DEPTH, FusedGluMlpAlone),
    # scale_mlp: the MLP's LayerNorm between the activation and fc2, the op's hidden norm
    "eva_post_norm_scale_mlp": (lambda **kw: test_timm_eva.eva(use_post_norm=True, scale_mlp=True, **kw), images,
                                DEPTH, FusedMlpAlone),
    "relpos_res_post": (lambda **kw: timm_model("vit_relpos_small_patch16_rpn_224", **kw), images, DEPTH,
                        FusedMlpAlone),
    "vit_res_post": (lambda **kw: timm_vit(block_fn=ResPostBlock, **kw), images, DEPTH, FusedMlpAlone),
    "vit_res_post_swiglu": (lambda **kw: timm_vit(block_fn=ResPostBlock, mlp_layer=SwiGLU, act_layer=torch.nn.SiLU,
                                                  **kw), images, DEPTH, FusedSwiGLUAlone),
}  # fmt: skip


def build(name: str, **overrides) -> torch.nn.Module:
    return MODELS[name][0](**overrides).eval()


def inputs(name: str) -> torch.Tensor:
    return MODELS[name][1]()


POST_NORM_BLOCKS = ("SwinTransformerV2Block", "SwinTransformerV2CrBlock", "EvaBlockPostNorm", "ResPostRelPosBlock",
                    "ResPostBlock")  # fmt: skip


def mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The post-norm blocks' MLPs, in order."""
    return [m.mlp for m in model.modules() if type(m).__name__ in POST_NORM_BLOCKS]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    _, _, blocks, fused_cls = MODELS[name]
    reference, patched, report = pair(build(name))
    assert report.counts()["mlp"] == blocks
    assert [type(m) for m in mlps(patched)] == [fused_cls] * blocks
    assert all(e.part != "mlp" for e in report.skipped), report.skipped
    assert_matches_by_the_rule(reference, patched, inputs(name))
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == blocks
    # the MLP alone: no norm, no residual, no scales (the block applies norm2 and drop_path2 itself)
    kwargs = calls[0]["kwargs"]
    assert kwargs["norm"] == "none" and kwargs["residual"] is False
    assert kwargs["norm_weight"] is None and kwargs["norm_bias"] is None
    assert "layer_scale" not in kwargs and "sample_scale" not in kwargs
    assert kwargs["fc2_weight"] is mlps(patched)[0].fc2.weight
    if name.endswith("scale_mlp"):
        assert kwargs["hidden_norm"] == "layernorm" and kwargs["hidden_norm_weight"] is mlps(patched)[0].norm.weight
    else:
        assert "hidden_norm" not in kwargs


def test_report_names_the_mlp_and_keeps_the_block():
    model = build("swinv2")
    report = fastvit.patch(model)
    (first, *_) = [e for e in report.replaced if e.part == "mlp"]
    assert first.path == "layers.0.blocks.0.mlp" and "Mlp -> FusedMlpAlone" in first.detail
    block = model.layers[0].blocks[0]
    assert type(block) is timm.models.swin_transformer_v2.SwinTransformerV2Block  # the block stays timm's
    assert isinstance(block.mlp, Mlp) and "no input norm" in repr(block.mlp)


@pytest.mark.parametrize("name", ["swinv2", "eva_post_norm_swiglu", "vit_res_post_swiglu"])
def test_patch_and_unpatch_keep_the_weights(name):
    assert_patch_and_unpatch_keep_the_weights(build(name))


@pytest.mark.parametrize("name", ["swinv2_cr", "eva_post_norm", "relpos_res_post"])
def test_training_step_with_drop_path(name, op_calls):
    reference, patched, _ = pair(build(name, drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), inputs(name), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == MODELS[name][2]


def test_mlp_dropout_and_hooks_run_timm_modules(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("swinv2"))
    for model in (reference, patched):
        mlps(model)[0].drop1.p = 0.3
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a patched timm Mlp has MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), inputs("swinv2"), seed=0)
    assert len(op_calls["layernorm_mlp"]) == 3
    op_calls["layernorm_mlp"].clear()
    reference, patched, _ = pair(build("swinv2"))
    for model in (reference, patched):
        mlps(model)[2].fc1.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on fc1"):
        torch.testing.assert_close(patched(inputs("swinv2")), reference(inputs("swinv2")), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 3


def test_mlps_the_op_cannot_compute_are_reported_with_why():
    # scale_mlp with an RMS norm between the activation and fc2 (the op's hidden norm is a LayerNorm)
    model = build("eva_post_norm", scale_mlp=True)
    for mlp in mlps(model):
        mlp.norm = RmsNorm(mlp.fc2.in_features)
    report = fastvit.patch(model)
    skipped = [e for e in report.skipped if e.part == "mlp"]
    assert [e.path for e in skipped] == [f"blocks.{i}.mlp" for i in range(DEPTH)]
    assert all("mlp.norm is RmsNorm, not nn.LayerNorm (scale_mlp" in e.detail for e in skipped)
    # a hook on a submodule the fused forward bypasses, at patch time
    model = build("swinv2")
    mlps(model)[1].act.register_forward_hook(lambda *args: None)
    report = fastvit.patch(model)
    (skip,) = [e for e in report.skipped if e.part == "mlp"]
    assert skip.path == "layers.0.blocks.1.mlp" and "act has a forward hook" in skip.detail
    # an MLP of another kind in a post-norm block's slot
    model = build("vit_res_post")
    model.blocks[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    report = fastvit.patch(model)
    (skip,) = [e for e in report.skipped if e.part == "mlp"]
    assert skip.path == "blocks.0.mlp" and "Sequential is not timm's Mlp, GluMlp or SwiGLU" in skip.detail


@pytest.mark.parametrize("name", ["swinv2", "eva_post_norm_swiglu", "vit_res_post_swiglu"])
def test_compile_fx_and_torchscript(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(name))
    assert_compiles_and_traces(reference, patched, inputs(name))


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["swinv2", "eva_post_norm_swiglu", "vit_res_post_swiglu"])
def test_triton_route(name, op_calls):
    reference, patched, _ = pair(build(name))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, inputs(name)[:1], rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == MODELS[name][2]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["swinv2", "eva_post_norm_swiglu"])
def test_compiled_kernels_on_the_gpu(name, op_calls):
    assert_matches_on_the_gpu(build(name), inputs(name))
    assert len(op_calls["layernorm_mlp"]) >= MODELS[name][2]
