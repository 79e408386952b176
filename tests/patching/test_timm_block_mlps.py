"""timm's pre-norm ``Block`` with the MLPs and norms of today's ViTs (fastvit.nn.timm_vit,
fastvit.nn.timm_mlp): ``SwiGLU`` (AIMv2; FusedSwiGLUBlock), packed ``GluMlp``, SiLU / QuickGELU
``Mlp``, timm's ``RmsNorm`` or ``nn.RMSNorm`` as ``norm2``, LayerScale, ViTamin's ``GeGluMlp`` (its
own LayerNorm after the block's; fastvit.nn.timm_vitamin.FusedGeGluBlock). The MLP half is one
fastvit.layernorm_mlp call; outputs and every gradient by the tolerance rule against the unpatched
model in float64. Tiny random configs, no downloads.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    DEPTH,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
from timm.layers import GluMlp, RmsNorm, SwiGLU  # noqa: E402
from timm.layers.activations import QuickGELU  # noqa: E402
from timm.models.vitamin import GeGluMlp  # noqa: E402

from fastvit.nn import timm_vit, timm_vitamin  # noqa: E402

TINY = dict(embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5)
# name -> (model, create_model overrides, fused block class, the op's keywords it must see)
CASES = {
    "aimv2_rms_swiglu": ("aimv2_large_patch14_224", dict(img_size=28), "FusedSwiGLUBlock",
                         dict(norm="rms", activation="silu")),
    "swiglu_layernorm": ("vit_tiny_patch16_224", dict(img_size=32, mlp_layer=SwiGLU, act_layer=nn.SiLU),
                         "FusedSwiGLUBlock", dict(activation="silu")),
    "packed_glu_rmsnorm": ("vit_tiny_patch16_224", dict(  # the block passes its act_layer to the MLP
        img_size=32, mlp_ratio=2.0, norm_layer=RmsNorm, act_layer=nn.SiLU,
        mlp_layer=functools.partial(GluMlp, gate_last=False)), "FusedBlock",
        dict(norm="rms", gated=True, activation="silu")),
    "silu_mlp_torch_rmsnorm_layerscale": ("vit_tiny_patch16_224", dict(
        img_size=32, act_layer=nn.SiLU, norm_layer=nn.RMSNorm, init_values=0.3), "FusedBlock",
        dict(norm="rms", activation="silu")),
    "quick_gelu_mlp": ("vit_tiny_patch16_224", dict(img_size=32, act_layer=QuickGELU), "FusedBlock",
                       dict(activation="quick_gelu")),
    # scale_mlp_norm: a LayerNorm between the gating and fc2, the op's hidden norm
    "swiglu_scale_mlp_norm": ("vit_tiny_patch16_224", dict(img_size=32, mlp_layer=SwiGLU, act_layer=nn.SiLU,
                                                           scale_mlp_norm=True),
                              "FusedSwiGLUBlock", dict(activation="silu", hidden_norm="layernorm")),
    "packed_glu_scale_mlp_norm": ("vit_tiny_patch16_224", dict(
        img_size=32, mlp_ratio=2.0, act_layer=nn.SiLU, mlp_layer=functools.partial(GluMlp, gate_last=False),
        scale_mlp_norm=True), "FusedBlock", dict(gated=True, hidden_norm="layernorm")),
    # ViTamin's GELU-gated MLP with its own LayerNorm: norm2 runs as a module, the op adds no residual
    "vitamin_geglu_layerscale": ("vit_tiny_patch16_224", dict(img_size=32, mlp_ratio=2.0, mlp_layer=GeGluMlp,
                                                              init_values=0.3),
                                 "FusedGeGluBlock", dict(activation="gelu", residual=False)),
}  # fmt: skip


def build(case: str, **overrides) -> nn.Module:
    name, args, _, _ = CASES[case]
    return perturb_(timm.create_model(name, pretrained=False, **(TINY | args | overrides))).eval()


def images(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_mlp_halves_fused_and_match_by_the_rule(case, op_calls):
    reference = build(case)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts()["mlp"] == DEPTH
    assert all(type(block).__name__ == CASES[case][2] for block in patched.blocks)
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images(reference))
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == DEPTH  # one call per block (the rule runs the patched model once)
    assert all(calls[0]["kwargs"].get(k) == v for k, v in CASES[case][3].items()), calls[0]["kwargs"]
    fastvit.unpatch(patched)
    assert module_types(patched) == types


@pytest.mark.parametrize("case", ["aimv2_rms_swiglu", "vitamin_geglu_layerscale"])
def test_training_step_with_layer_scale_and_drop_path_matches_timm(case, op_calls):
    reference = build(case, init_values=0.3, drop_path_rate=0.3).train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    # same seed, same drop-path draws: timm's DropPath and the op's sample_scale
    assert_outputs_and_grads_match(reference, patched, images(reference), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == DEPTH


def test_vitamin_blocks_fused():
    """timm's ViTamin (its hybrid conv stem reported, every block's attention and MLP half fused)."""
    reference, patched, report = pair(perturb_(timm.create_model("vitamin_small_224", pretrained=False, depth=2,
                                                                 img_size=64)).eval())  # fmt: skip
    assert report.counts() == {"attention": 2, "mlp": 2}
    assert all(type(block) is timm_vitamin.FusedGeGluBlock for block in patched.blocks)
    assert "eps=1e-06, mlp=GeGluMlp" in patched.blocks[0].extra_repr()
    assert_matches_by_the_rule(reference, patched, torch.randn(1, 3, 64, 64))


def test_hook_on_the_geglu_norm_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("vitamin_geglu_layerscale"))
    for model in (reference, patched):
        model.blocks[0].mlp.norm.register_forward_hook(lambda m, args, out: out * 2)
    x = images(reference)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.norm"):
        torch.testing.assert_close(patched(x), reference(x))
    assert len(op_calls["layernorm_mlp"]) == DEPTH - 1


def test_mlp_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("swiglu_layernorm", proj_drop_rate=0.2).train())
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a patched timm Block has MLP dropout"):
        assert_outputs_and_grads_match(reference, patched, images(reference), seed=0)
    assert op_calls["layernorm_mlp"] == []


def test_hook_on_swiglu_gate_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("swiglu_layernorm"))
    for model in (reference, patched):
        model.blocks[0].mlp.fc1_g.register_forward_hook(lambda m, args, out: out * 2)
    x = images(reference)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.fc1_g"):
        torch.testing.assert_close(patched(x), reference(x))
    assert len(op_calls["layernorm_mlp"]) == DEPTH - 1  # the other block's half stays fused


def test_unfusable_norms_and_mlps_are_skipped_with_reasons():
    for overrides, reason in (
        (dict(norm_layer=nn.BatchNorm1d), "norm2 is BatchNorm1d, not nn.LayerNorm or an RMS norm"),
        (dict(act_layer=nn.ReLU), "mlp.act is ReLU"),
        # a hidden norm the op does not have (it takes a LayerNorm there)
        (dict(mlp_layer=SwiGLU, scale_mlp_norm=True, norm_layer=RmsNorm), "mlp.norm is RmsNorm, not nn.LayerNorm"),
        (dict(mlp_layer=GeGluMlp, act_layer=nn.ReLU), "mlp.act is ReLU"),
    ):
        model = perturb_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                           **(TINY | overrides))).eval()  # fmt: skip
        try:
            report = fastvit.patch(model, attention=False, patch_embed=False)
        except ValueError as error:  # nothing else to patch: the reasons are in the message
            assert reason in str(error), (reason, str(error))
            continue
        skipped = [e for e in report.skipped if e.part == "mlp"]
        assert len(skipped) == DEPTH and all(reason in e.detail for e in skipped), (reason, skipped)


def test_fused_block_classes():
    assert timm_vit.FusedBlock.fastvit_original() is timm_vit.FusedSwiGLUBlock.fastvit_original()
    assert {"mlp.fc1_g", "mlp.fc1_x", "ls2"} <= set(timm_vit.FusedSwiGLUBlock.fastvit_bypassed)
    assert {"mlp.fc1", "ls2"} <= set(timm_vit.FusedBlock.fastvit_bypassed)
    assert timm_vitamin.FusedGeGluBlock.fastvit_original() is timm_vit.FusedBlock.fastvit_original()
    assert "norm2" not in timm_vitamin.FusedGeGluBlock.fastvit_bypassed  # called as a module
    assert {"mlp.norm", "mlp.w0", "mlp.w1", "mlp.w2", "ls2"} <= set(timm_vitamin.FusedGeGluBlock.fastvit_bypassed)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    for case in ("aimv2_rms_swiglu", "packed_glu_rmsnorm", "swiglu_scale_mlp_norm", "packed_glu_scale_mlp_norm",
                 "vitamin_geglu_layerscale"):
        reference, patched, _ = pair(build(case))
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, images(reference))


def test_repr_gives_the_eps_the_op_uses():
    _, patched, _ = pair(build("silu_mlp_torch_rmsnorm_layerscale"))  # nn.RMSNorm(eps=None): float32's eps
    assert f"eps={torch.finfo(torch.float32).eps}, norm=rms, mlp=Mlp" in patched.blocks[0].extra_repr()


def test_repatch_after_the_mlp_changed_kind_fuses_the_other_class(op_calls, fresh_warnings):
    """A fused Block whose Mlp is replaced by a SwiGLU runs timm's modules; fastvit.patch called again
    fuses it as FusedSwiGLUBlock (its bypassed submodules differ), unpatch gives timm's Block."""
    reference = build("quick_gelu_mlp")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for model in (reference, patched):
        torch.manual_seed(0)
        model.blocks[0].mlp = perturb_(SwiGLU(32, 64, act_layer=nn.SiLU))
    report = fastvit.patch(patched)
    (entry,) = report.replaced
    assert entry.path == "blocks.0" and "fused anew as FusedSwiGLUBlock" in entry.detail
    assert type(patched.blocks[0]).__name__ == "FusedSwiGLUBlock"
    assert_matches_by_the_rule(reference, patched, images(reference))
    assert len(op_calls["layernorm_mlp"]) == DEPTH
    fastvit.unpatch(patched)
    assert type(patched.blocks[0]) is type(reference.blocks[0])
