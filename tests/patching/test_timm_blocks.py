"""The MLP halves of timm's windowed and hierarchical blocks (fastvit.nn.timm_blocks): Swin V1's
block, SAM's ``Block`` (windowed with padding, and global), HieraDet's ``MultiScaleBlock`` (q
pooling and the projected residual at stage changes), Hiera's ``HieraBlock``, MaxViT's
``PartitionAttentionCl`` and ``RelPosBlock``: each block's attention half runs as timm's, its MLP
half ``x + drop_path2(ls2(mlp(norm2(x))))`` is one fastvit.layernorm_mlp call. Outputs and every
gradient by the tolerance rule against the unpatched model in float64 (LayerScale where the family
has it), seeded training steps with drop path, the fallbacks (MLP dropout, a hook on the MLP),
TorchScript, torch.compile and the Triton kernels in the interpreter. Tiny configs of the named
models; no downloads.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
pytest.importorskip("timm.models.hieradet_sam2")

# name -> (timm model, its tiny config, image size, fused block class, blocks)
MODELS = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2),
                                                  num_heads=(2, 4), window_size=4), 32, "FusedSwinTransformerBlock", 4),
    "sam": ("samvit_base_patch16", dict(img_size=40, patch_size=4, embed_dim=32, depth=2, num_heads=2, window_size=3,
                                        global_attn_indexes=(1,), neck_chans=16, init_values=0.1), 40,
            "FusedSamBlock", 2),
    "hieradet": ("hieradet_small", dict(embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), window_spec=(4, 4, 6, 2),
                                        global_att_blocks=(2,), global_pos_size=(4, 4), init_values=0.1), 80,
                 "FusedHieraDetBlock", 5),
    "hiera": ("hiera_tiny_224", dict(img_size=32, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                                     mask_unit_size=(4, 4), init_values=0.1), 32, "FusedHieraBlock", 4),
    "maxvit": ("maxvit_rmlp_nano_rw", dict(img_size=64), 64, "FusedPartitionAttentionCl", 4),
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2,
                                                    init_values=0.1), 32, "FusedRelPosBlock", 2),
}  # fmt: skip


def build(name: str, **overrides) -> torch.nn.Module:
    model, config, *_ = MODELS[name]
    if name == "maxvit":  # timm's config with its last two stages only, widths 16 / 32, head dim 8,
        # 4 x 4 windows and grids (partition ratio 16 at 64 px; timm's 32 gives 2 x 2 windows: four
        # times the windows, the cost of the interpreter test, for no other path)
        from timm.models import maxxvit

        cfg = maxxvit.model_cfgs["maxvit_rmlp_nano_rw"]
        cfg = dataclasses.replace(
            cfg, embed_dim=(16, 32), depths=(1, 1), block_type=cfg.block_type[-2:], stem_width=16,
            transformer_cfg=dataclasses.replace(cfg.transformer_cfg, dim_head=8, partition_ratio=16),
        )  # fmt: skip
        return perturb_(maxxvit.MaxxVit(cfg, num_classes=5, **(config | overrides))).eval()
    return perturb_(timm.create_model(model, pretrained=False, num_classes=5, **(config | overrides))).eval()


def images(name: str, batch: int = 3, seed: int = 0) -> torch.Tensor:
    size = MODELS[name][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fused_blocks(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == MODELS[name][3]]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    reference = build(name)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    blocks = MODELS[name][4]
    assert report.counts()["mlp"] == blocks and len(fused_blocks(patched, name)) == blocks
    assert not [e for e in report.skipped if e.part == "mlp"]
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images(name))
    assert len(op_calls["layernorm_mlp"]) >= blocks
    if name in ("sam", "hieradet", "hiera", "relpos"):  # LayerScale (init_values) as the op's layer_scale
        assert all(c["kwargs"]["layer_scale"] is not None for c in op_calls["layernorm_mlp"])
    fastvit.unpatch(patched)
    assert module_types(patched) == types


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_step_with_drop_path(name, op_calls):
    reference, patched, _ = pair(build(name, drop_path_rate=0.3))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(name), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


@pytest.mark.parametrize("name", ["swin", "hieradet"])
def test_mlp_dropout_and_hooks_run_timm(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(name))
    path = next(p for p, m in patched.named_modules() if type(m).__name__ == MODELS[name][3])
    for model in (reference, patched):  # the same hook on the first block's fc1 in both models
        model.get_submodule(path).mlp.fc1.register_forward_hook(lambda m, args, out: out * 2)
    x = images(name)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.fc1"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == MODELS[name][4] - 1
    for model in (reference, patched):  # MLP dropout in training: timm's modules, drawn alike
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.3
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_fx_and_torchscript(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(name))
    # timm's Hiera itself neither scripts (its unroll's list sizes) nor FX-traces
    others = name != "hiera"
    assert_compiles_and_traces(reference, patched, images(name), script=others, fx=others)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["sam", "hieradet", "maxvit"])
def test_triton_route(name, op_calls):
    reference, patched, _ = pair(build(name))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(name, batch=2), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_kernels_on_the_gpu(name, op_calls):
    assert_matches_on_the_gpu(build(name), images(name))
    assert op_calls["layernorm_mlp"]
