"""timm's MaxxVit family patched (fastvit.nn.timm_maxxvit): MaxViT's block and grid attention and
CoAtNet's transformer stages (``AttentionCl`` channels-last, ``Attention2d`` channels-first) run
fastvit.flash_attention with their relative-position bias (``RelPosMlp``, ``RelPosBias``,
``RelPosBiasTf``) as the op's learnable float mask; CoAtNet's channels-first ``TransformerBlock2d``
runs its MLP half as one fastvit.layernorm_mlp call. Outputs and every gradient (the bias tables'
too) by the tolerance rule against the unpatched model in float64. The named models' configs,
shrunk to two stages of width 16 / 32 on 128 x 128 images; no downloads.
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
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
from timm.models import maxxvit  # noqa: E402

IMG = 128  # partitions of img_size / 32 = 4 x 4 tokens (window and grid), CoAtNet's last stage 8 x 8

# timm config -> (fused class, its bias module, head_first)
CONFIGS = {
    "maxvit_rmlp_nano_rw": ("FusedAttentionCl", "RelPosMlp", True),
    "maxvit_tiny_tf": ("FusedAttentionCl", "RelPosBiasTf", False),
    "maxxvitv2_nano_rw": ("FusedAttentionCl", "RelPosBias", True),
    "coatnet_nano_rw": ("FusedAttention2d", "RelPosBias", True),
    "coatnet_rmlp_nano_rw": ("FusedAttention2d", "RelPosMlp", True),
}


def build(name: str, img_size: int = IMG, **transformer) -> torch.nn.Module:
    """timm's ``name`` config with its last two stages only, widths 16 / 32, head dim 8."""
    cfg = maxxvit.model_cfgs[name]
    cfg = dataclasses.replace(
        cfg, embed_dim=(16, 32), depths=(1, 1), block_type=cfg.block_type[-2:], stem_width=16,
        transformer_cfg=dataclasses.replace(cfg.transformer_cfg, dim_head=8, **transformer),
    )  # fmt: skip
    return perturb_(maxxvit.MaxxVit(cfg, img_size=img_size, num_classes=5)).eval()


def fused_attentions(model: torch.nn.Module) -> set[tuple[str, str, bool]]:
    return {(type(m).__name__, type(m.rel_pos).__name__, m.head_first)
            for m in model.modules() if type(m).__name__.startswith("FusedAttention")}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    reference = build(name)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    attentions = sum(type(m) in (maxxvit.AttentionCl, maxxvit.Attention2d) for m in reference.modules())
    assert report.counts()["attention"] == attentions > 0
    assert fused_attentions(patched) == {CONFIGS[name]}
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, torch.randn(2, 3, IMG, IMG))
    masks = [c["kwargs"]["attn_mask"] for c in op_calls["flash_attention"][-attentions:]]
    assert all(m.requires_grad and m.dtype == torch.float32 for m in masks)  # the learnable bias, shared by the batch
    assert all(m.shape[-2:] == (q["args"][0].shape[2],) * 2 and m.shape[-2] > 1
               for m, q in zip(masks, op_calls["flash_attention"][-attentions:], strict=True))  # fmt: skip
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("maxvit_rmlp_nano_rw", attn_drop=0.3).train())
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        torch.manual_seed(0)
        got = patched(x)
    torch.manual_seed(0)
    torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-6)
    assert op_calls["flash_attention"] == []


def test_compile_fullgraph(op_calls):
    reference, patched, _ = pair(build("coatnet_rmlp_nano_rw"))
    x = torch.randn(2, 3, IMG, IMG)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("name, size", [("coatnet_rmlp_nano_rw", 32), ("maxxvitv2_nano_rw", 64)])
def test_triton_route(name, size, op_calls):
    # small images for the interpreter: CoAtNet attends over 8 x 8 then 4 x 4 tokens, MaxxViTv2 over
    # 4 x 4 windows and grid cells (partition ratio 16: timm's 32 gives 2 x 2 cells, four times the
    # windows, the interpreter's cost, for no other path)
    transformer = {"partition_ratio": 16} if name.startswith("maxxvit") else {}
    reference, patched, _ = pair(build(name, img_size=size, **transformer))
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, torch.randn(2, 3, size, size))
    if name.startswith("coatnet"):  # its TransformerBlock2d's MLP halves too, through the MLP kernels
        assert len(op_calls["layernorm_mlp"]) == 2


def test_fx_traces_and_feature_extraction(op_calls):
    """torch.fx and timm's FX feature extraction trace a patched MaxViT as the unpatched one (the
    channels-last reshape once unpacked a traced size: TraceError)."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    reference, patched, _ = pair(build("maxvit_tiny_tf"))
    x = torch.randn(2, 3, IMG, IMG)
    attention = next(m for m in patched.modules() if type(m).__name__ == "FusedAttentionCl")
    torch.fx.symbolic_trace(attention)
    last = get_graph_node_names(patched)[1][-1]
    want = create_feature_extractor(reference, return_nodes=[last])(x)[last]
    torch.testing.assert_close(create_feature_extractor(patched, return_nodes=[last])(x)[last], want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("cls", ["AttentionCl", "Attention2d"])
def test_eager_path_hook_on_rel_pos_runs_timm(cls, op_calls, fresh_warnings):
    """With fused_attn=False timm calls its rel_pos module (rel_pos(attn)), so a hook on it runs there;
    the fused forward reads get_bias() only, so such calls run timm's forward. With fused_attn=True
    timm calls get_bias() too: the op runs."""
    bias = lambda num_heads, **kw: maxxvit.RelPosBias(window_size=(2, 3), num_heads=num_heads, **kw)
    reference = perturb_(getattr(maxxvit, cls)(32, dim_head=8, rel_pos_cls=bias)).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for model in (reference, patched):
        model.rel_pos.register_forward_hook(lambda module, args, out: out * 0)
    x = torch.randn(2, 2, 3, 32) if cls == "AttentionCl" else torch.randn(2, 32, 2, 3)
    torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-6)  # fused_attn: the hook runs nowhere
    assert len(op_calls["flash_attention"]) == 1
    reference.fused_attn = patched.fused_attn = False
    with pytest.warns(fastvit.FastvitFallbackWarning, match="calls its rel_pos module"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(op_calls["flash_attention"]) == 1


def _transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, maxxvit.TransformerBlock2d)]


@pytest.mark.parametrize("init_values", [None, 1e-2], ids=["no-layer-scale", "layer-scale"])
def test_coatnet_transformer_block_mlp_half_is_one_call(init_values, op_calls):
    """CoAtNet's channels-first TransformerBlock2d: its MLP half (LayerNorm2d, 1x1-conv ConvMlp,
    LayerScale2d) is one fastvit.layernorm_mlp call over the map's channels-last view; the block
    hands on a channels-first contiguous map, as timm's does."""
    reference = build("coatnet_nano_rw", init_values=init_values)
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    blocks = _transformer_blocks(patched)
    assert report.counts()["mlp"] == len(blocks) == 2
    assert all(type(b).__name__ == "FusedTransformerBlock2d" for b in blocks)
    x = torch.randn(2, 3, IMG, IMG)
    layouts = []
    for block in blocks:
        block.register_forward_hook(lambda m, args, out: layouts.append(out.is_contiguous()))
    assert_matches_by_the_rule(reference, patched, x)
    assert layouts and all(layouts)  # channels-first contiguous, as timm's blocks hand it on
    calls = op_calls["layernorm_mlp"]
    tokens = calls[0]["args"][0]
    assert tokens.shape == (2, 32, 32, 16) and tokens.stride(-1) == 32 * 32  # the (B, C, H, W) map as (B, H, W, C)
    scale = calls[0]["kwargs"]["layer_scale"]
    assert (scale is None) if init_values is None else (scale is blocks[0].ls2.gamma)


def test_coatnet_training_step_and_fallbacks(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("coatnet_nano_rw"))
    x = torch.randn(2, 3, IMG, IMG)
    for model in (reference, patched):  # drop path in both transformer blocks
        for block in _transformer_blocks(model):
            block.drop_path2 = timm.layers.DropPath(0.5)
    assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0, rtol=1e-4, atol=1e-5)
    assert all(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])
    reference, patched, _ = pair(build("coatnet_nano_rw"))
    for model in (reference, patched):  # a hook on the first block's fc2
        _transformer_blocks(model)[0].mlp.fc2.register_forward_hook(lambda m, args, out: out * 2)
    calls = len(op_calls["layernorm_mlp"])
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == calls + 1
    reference, patched, _ = pair(build("coatnet_nano_rw", proj_drop=0.3))  # MLP dropout: timm's modules
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0, rtol=1e-4, atol=1e-5)


def test_coatnet_compiles_traces_and_scripts(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("coatnet_nano_rw"))
    assert_compiles_and_traces(reference, patched, torch.randn(2, 3, IMG, IMG))
