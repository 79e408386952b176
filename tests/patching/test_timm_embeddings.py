"""The embeddings of timm's BEiT, VisionTransformerRelPos, CaiT, ConViT and SAM models as one
fastvit.patch_embed call (fastvit.nn.timm_embeddings).

Each model's output and every gradient (the conv's, the class token's, ``pos_embed``'s, the
input's) by the tolerance rule against the unpatched model in float64; the op's arguments are the
model's own Parameters (prefix tokens only where timm prepends them before the blocks, SAM's
(1, H, W, D) ``pos_embed`` read as a (1, N, D) view); SAM at another grid (``pos_embed`` resampled
by timm's function); position dropout drawn as in timm; grad checkpointing; the fallbacks (a hook
on ``patch_embed``); ``model.patch_embed`` keeping its meaning; unpatch, torch.compile,
torch.export and the Triton kernels in the interpreter. Tiny random configs, no downloads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    images,
    module_types,
    pair,
    timm_model,
)
from tests.patching.model_checks import ModelChecks

timm = pytest.importorskip("timm")

from fastvit.nn import timm_embeddings  # noqa: E402


def samvit(**overrides) -> nn.Module:
    args = dict(window_size=3, global_attn_indexes=(1,), neck_chans=16, img_size=32)
    return timm_model("samvit_base_patch16", **(args | overrides))


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    fused: type
    size: int = 16
    prefix: Callable[[nn.Module], torch.Tensor | None] = lambda m: None  # what the op gets as prefix_tokens
    pos_embed: Callable[[nn.Module], torch.Tensor | None] = lambda m: None  # the Parameter pos_embed reads
    embedder: Callable[[nn.Module], nn.Module] = lambda m: m  # the module fused (an encoder in a classifier)


CASES = {
    # the class token, no absolute position embedding (BEiT's checkpoints)
    "beit": Case(lambda **kw: timm_model("beitv2_base_patch16_224", init_values=0.1, **kw), timm_embeddings.FusedBeit,
                 prefix=lambda m: m.cls_token),
    # the class token and a (1, 1+N, D) pos_embed, a shared relative-position bias
    "beit_abs_pos": Case(
        lambda **kw: timm_model("beit_base_patch16_224", use_abs_pos_emb=True, use_rel_pos_bias=False,
                                use_shared_rel_pos_bias=True, **kw),
        timm_embeddings.FusedBeit,
        prefix=lambda m: m.cls_token,
        pos_embed=lambda m: m.pos_embed,
    ),
    "relpos_cls": Case(lambda **kw: timm_model("vit_relpos_medium_patch16_cls_224", **kw),
                       timm_embeddings.FusedVisionTransformerRelPos, prefix=lambda m: m.cls_token),
    "relpos_no_cls": Case(lambda **kw: timm_model("vit_srelpos_small_patch16_224", **kw),
                          timm_embeddings.FusedVisionTransformerRelPos),
    # pos_embed over the patches; the class token joins in the class-attention blocks
    "cait": Case(lambda **kw: timm_model("cait_xxs24_224", depth_token_only=1, init_values=0.1, **kw),
                 timm_embeddings.FusedCait, pos_embed=lambda m: m.pos_embed),
    # pos_embed over the patches; the class token joins before block local_up_to_layer
    "convit": Case(lambda **kw: timm_model("convit_tiny", local_up_to_layer=1, **kw), timm_embeddings.FusedConVit,
                   pos_embed=lambda m: m.pos_embed),
    "convit_no_pos": Case(lambda **kw: timm_model("convit_tiny", local_up_to_layer=1, use_pos_embed=False, **kw),
                          timm_embeddings.FusedConVit),
    # (B, H, W, D) patches plus the (1, H, W, D) pos_embed, read as (1, N, D)
    "sam": Case(samvit, timm_embeddings.FusedVisionTransformerSAM, size=32, pos_embed=lambda m: m.pos_embed),
}
if timm_embeddings.qwen3_vit is not None:
    CASES |= {
        # the Qwen3-VL tower in its classifier: a 4 x 4 pos_embed table (48 x 48 in the checkpoints), RoPE
        "qwen3_vit": Case(
            lambda **kw: timm_model("qwen3_vit_88m", img_size=32, patch_size=8, pos_embed_grid_size=4, mlp_ratio=2.0,
                                    **kw),
            timm_embeddings.FusedQwen3VitEncoder,
            size=32,
            pos_embed=lambda m: m.encoder.pos_embed,
            embedder=lambda m: m.encoder,
        ),
        # the DeepSeek tower: no absolute position embedding, a final norm
        "deepseek_vit": Case(lambda **kw: timm_model("deepseek_vit_412m", img_size=32, patch_size=8, **kw),
                             timm_embeddings.FusedDeepseekVitEncoder, size=32, embedder=lambda m: m.encoder),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_embedding_matches_unpatched_with_the_models_parameters(name, op_calls):
    case = CASES[name]
    reference, patched, report = pair(case.build().eval())
    embedder = case.embedder(patched)
    assert type(embedder) is case.fused and isinstance(embedder, type(case.embedder(reference)))
    assert report.counts()["patch_embed"] == 1 and not [e for e in report.skipped if e.part == "patch_embed"]
    assert_matches_by_the_rule(reference, patched, images(size=case.size))
    (call, *_) = op_calls["patch_embed"]
    _, weight, bias = call["args"]
    assert weight is embedder.patch_embed.proj.weight and bias is embedder.patch_embed.proj.bias
    assert call["kwargs"]["prefix_tokens"] is case.prefix(patched)
    pos_embed, want = call["kwargs"]["pos_embed"], case.pos_embed(patched)
    if want is None or want.dim() == 3:
        assert pos_embed is want
    else:  # SAM's (1, H, W, D) Parameter, viewed
        assert pos_embed._base is want and pos_embed.shape == (1, want.shape[1] * want.shape[2], want.shape[3])


@pytest.mark.parametrize("size", [(48, 40), (24, 32)], ids=["larger", "smaller"])
def test_sam_resamples_pos_embed_for_another_grid(size, op_calls):
    reference, patched, _ = pair(samvit().eval())
    assert_matches_by_the_rule(reference, patched, images(size=size))
    pos_embed = op_calls["patch_embed"][0]["kwargs"]["pos_embed"]
    assert pos_embed.shape == (1, size[0] // 4 * (size[1] // 4), 32)  # timm's bicubic resample, flattened


def test_sam_dynamic_img_pad(op_calls):
    # 30x30 images: the 8x8 grid of timm's padded patches, zero-padded in the kernel's masks
    from timm.layers import PatchEmbed

    embed_layer = partial(PatchEmbed, output_fmt="NHWC", strict_img_size=False, dynamic_img_pad=True)
    reference, patched, _ = pair(samvit(embed_layer=embed_layer).eval())
    assert_matches_by_the_rule(reference, patched, images(size=30))
    assert op_calls["patch_embed"][0]["kwargs"]["dynamic_img_pad"] is True


@pytest.mark.parametrize("name", ["beit_abs_pos", "cait", "convit", "sam"])
def test_position_dropout_draws_as_timm_in_training(name, op_calls):
    # pos_drop runs as a module on the op's tokens: a seeded training step draws the same mask
    case = CASES[name]
    reference, patched, _ = pair(case.build(pos_drop_rate=0.25))
    assert patched.pos_drop.p == 0.25
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(size=case.size), seed=3)
    assert len(op_calls["patch_embed"]) == 1


@pytest.mark.skipif(timm_embeddings.qwen3_vit is None, reason="this timm has no Qwen3-VL tower")
@pytest.mark.parametrize("size", [(48, 40), (16, 24)], ids=["larger", "smaller"])
def test_qwen_resamples_pos_embed_and_casts_it_to_the_patches_dtype(size, op_calls):
    # timm's bilinear resample of the table to the 6 x 5 (2 x 3) grid; under autocast timm adds
    # pos_embed.to(x.dtype) to the bf16 patches, so the op gets it in bf16 and the tokens stay bf16
    case = CASES["qwen3_vit"]
    reference, patched, _ = pair(case.build().eval())
    x = images(size=size)
    assert_matches_by_the_rule(reference, patched, x)
    grid = (size[0] // 8, size[1] // 8)
    assert op_calls["patch_embed"][0]["kwargs"]["pos_embed"].shape == (1, grid[0] * grid[1], 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = patched.forward_features(x), reference.forward_features(x)
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == (3, *grid, 32)
    assert op_calls["patch_embed"][-1]["kwargs"]["pos_embed"].dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["beit", "relpos_no_cls", "cait", "sam", "qwen3_vit", "deepseek_vit"])
def test_grad_checkpointing(name, op_calls):
    if name not in CASES:
        pytest.skip("this timm has no Qwen3-VL / DeepSeek tower")
    case = CASES[name]
    reference, patched, _ = pair(case.build().eval())
    for model in (reference, patched):
        model.set_grad_checkpointing(True)
        assert case.embedder(model).grad_checkpointing
    assert_outputs_and_grads_match(reference, patched, images(size=case.size))
    assert len(op_calls["patch_embed"]) == 1


@pytest.mark.parametrize("name", ["beit", "sam", "qwen3_vit"])
def test_hook_on_patch_embed_runs_timms_embedding(name, op_calls, fresh_warnings):
    if name not in CASES:
        pytest.skip("this timm has no Qwen3-VL tower")
    case = CASES[name]
    reference, patched, _ = pair(case.build().eval())
    for model in (reference, patched):
        case.embedder(model).patch_embed.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on patch_embed"):
        assert_outputs_and_grads_match(reference, patched, images(size=case.size))
    assert op_calls["patch_embed"] == []


def test_patch_embed_called_alone_keeps_its_meaning(op_calls):
    # SAM's patch_embed gives timm's (B, H, W, D) map, BEiT's the (B, N, D) patches without the class token
    for name in ("sam", "beit"):
        case = CASES[name]
        reference, patched, _ = pair(case.build().eval())
        x = images(size=case.size)
        assert torch.equal(patched.patch_embed(x), reference.patch_embed(x))
    assert op_calls["patch_embed"] == []


def test_hybrid_convit_stem_is_reported():
    # ConViT with a CNN backbone embeds through timm's HybridEmbed: left alone, with the reason
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
    model = timm_model("convit_tiny", local_up_to_layer=1, hybrid_backbone=backbone, img_size=16)
    types = module_types(model)
    report = fastvit.patch(model)
    (skip,) = [e for e in report.skipped if e.part == "patch_embed"]
    assert "HybridEmbed" in skip.detail and "PatchEmbed" in skip.detail
    assert type(model) is types[""]


def test_beit_compiles_fx_traces_and_scripts(op_calls, fresh_warnings):
    # torch.compile keeps the op; timm's FX feature extraction traces the fused forward_features (the op a
    # leaf); torch.jit.script compiles timm's math (SAM: test_timm_blocks, CaiT: test_timm_other_attention)
    case = CASES["beit"]
    reference, patched, _ = pair(case.build().eval())
    assert_compiles_and_traces(reference, patched, images(size=case.size))
    assert op_calls["patch_embed"]


@pytest.mark.interpreter
def test_triton_route(op_calls):
    names = [n for n in ("beit_abs_pos", "relpos_cls", "cait", "convit", "sam", "qwen3_vit") if n in CASES]
    for name in names:
        case = CASES[name]
        reference, patched, _ = pair(case.build().eval())
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, images(batch=1, size=case.size))
    assert len(op_calls["patch_embed"]) == len(names)


class TestSamChecks(ModelChecks):
    """SAM: the (B, N, D) tokens viewed as timm's grid under compile and export."""

    build = staticmethod(lambda: samvit().eval())
    inputs = staticmethod(lambda batch: images(batch=batch, size=32))
    export_ops = frozenset(
        {"fastvit.patch_embed_fwd.default", "fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"}
    )
    counted_op = "patch_embed"
    calls = 1


def test_unpatch_restores_each_model():
    for case in CASES.values():
        model = case.build().eval()
        x = images(size=case.size)
        types, before = module_types(model), model(x)
        fastvit.patch(model)
        fastvit.unpatch(model)
        assert module_types(model) == types and torch.equal(model(x), before)
        assert copy.deepcopy(model)(x).shape == before.shape
