"""timm's Eva (EVA02, the RoPE ViTs, timm's DINOv3) patched (issue 14, item 1): the attention on
fastvit.rotary_qk + fastvit.flash_attention (RoPE in one pass, as timm computes it), ``EvaBlock``'s
MLP half on fastvit.layernorm_mlp (``Mlp``, packed ``GluMlp`` and ``SwiGLU``, ``gamma_2``, drop path)
and the embedding on fastvit.patch_embed (``dynamic_img_size`` too). Tiny random configs, no
downloads: the named models at their smallest, and ``Eva`` built directly (tests/patching/helpers.py
sizes: 16x16 images, 4x4 patches, dim 32, 2 heads, 2 blocks, batch 3).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    ATOL,
    BATCH,
    DEPTH,
    DIM,
    HEADS,
    IMG,
    PATCH,
    RTOL,
    assert_outputs_and_grads_match,
    expected_parts,
    images,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
from timm.layers import RmsNorm  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)
MODELS = {
    "eva02_tiny_patch14_224": dict(img_size=28, patch_size=14),  # RoPE, SwiGLU MLP, separate k bias
    "vit_base_patch16_rope_reg1_gap_256": dict(img_size=32, patch_size=16),  # RoPE + a register token
    "vit_small_patch16_dinov3": dict(img_size=32, patch_size=16),  # timm's DINOv3: RoPE, registers
}


def build(name: str, **overrides) -> torch.nn.Module:
    return perturb_(timm.create_model(name, pretrained=False, **(TINY | MODELS[name] | overrides))).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_matches_unpatched_with_rope(name, op_calls):
    reference = build(name)
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts() == expected_parts(attention=TINY["depth"], mlp=TINY["depth"], patch_embed=1)
    assert not report.skipped
    size = MODELS[name]["img_size"]
    assert_outputs_and_grads_match(reference, patched, torch.randn(3, 3, size, size))
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == TINY["depth"]


def test_rope_reaches_the_op_rotated_and_prefix_tokens_unrotated(op_calls):
    model = build("eva02_tiny_patch14_224")
    fastvit.patch(model)
    attn, seen = model.blocks[0].attn, {}
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    model(torch.randn(1, 3, 28, 28))
    q = op_calls["flash_attention"][0]["args"][0]  # (B, H, 1 + 4, D): cls + 2x2 patches
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    qkv = torch.nn.functional.linear(seen["x"], attn.qkv.weight, bias)
    raw_q = attn.q_norm(qkv.unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4)[0])
    assert q.shape == raw_q.shape and q.shape[2] == 5
    torch.testing.assert_close(q[:, :, :1], raw_q[:, :, :1])  # the class token is not rotated
    assert not torch.allclose(q[:, :, 1:], raw_q[:, :, 1:])  # the patch tokens are


def test_other_resolution_state_dict_and_unpatch():
    reference = build("vit_small_patch16_dinov3", dynamic_img_size=True)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    fastvit.patch(patched)
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 48, 32))  # RoPE grid 3x2
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_and_compile(op_calls):
    reference = build("eva02_tiny_patch14_224").train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x = torch.randn(2, 3, 28, 28)
    assert_outputs_and_grads_match(reference, patched, x, seed=0)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference = build("eva02_tiny_patch14_224")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 28, 28), rtol=1e-4, atol=1e-5)


# --- EvaBlock's MLP half and the Eva embedding, on Eva built directly -------------------------------
def eva(**overrides) -> torch.nn.Module:
    from timm.models.eva import Eva

    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=5)
    return perturb_(Eva(**(args | overrides)))


def glu_gate_last() -> torch.nn.Module:
    """Eva whose blocks hold timm's GluMlp with the gate in the second half ([value; gate])."""
    from timm.layers import GluMlp

    model = eva(init_values=0.3)
    for block in model.blocks:
        block.mlp = GluMlp(DIM, 2 * 48, act_layer=torch.nn.SiLU, gate_last=True)
    return perturb_(model, seed=1)


ROPE = dict(use_rot_pos_emb=True, num_reg_tokens=2)  # RoPE on the patches, class + 2 register tokens
# name -> (builder, the MLP class the fused blocks hold, the fused block class)
VARIANTS = {
    "mlp": (lambda: eva(), "Mlp", "FusedEvaBlock"),  # GELU, no gamma, abs pos_embed only
    "mlp_gamma_rope_reg": (lambda: eva(init_values=0.3, **ROPE), "Mlp", "FusedEvaBlock"),
    # norm_pre: patch_embed.proj has no bias
    "norm_pre_no_proj_bias": (lambda: eva(use_pre_transformer_norm=True, **ROPE), "Mlp", "FusedEvaBlock"),
    # swiglu_mlp: packed GluMlp [gate; value] (hidden 2 * 42 = int(32 * 4 * 2 / 3) * 2)
    "glu": (lambda: eva(swiglu_mlp=True, mlp_ratio=4 * 2 / 3, init_values=0.3, **ROPE), "GluMlp", "FusedEvaBlock"),
    "glu_gate_last": (glu_gate_last, "GluMlp", "FusedEvaBlock"),
    # swiglu_align_to: timm's SwiGLU (fc1_g, fc1_x), hidden 42 rounded up to 48
    "swiglu": (
        lambda: eva(swiglu_mlp=True, swiglu_align_to=16, mlp_ratio=4 * 2 / 3, no_embed_class=True, **ROPE),
        "SwiGLU",
        "FusedEvaSwiGLUBlock",
    ),
    "dinov3_rope": (lambda: eva(rope_type="dinov3", init_values=0.3, **ROPE), "Mlp", "FusedEvaBlock"),
    # learnable per-block RoPE frequencies: the model hands each block its own embedding
    "mixed_rope": (lambda: eva(rope_type="mixed", init_values=0.3, **ROPE), "Mlp", "FusedEvaBlock"),
    # scale_mlp (EVA02-B/L): a LayerNorm between the activation (gating) and fc2, the op's hidden norm
    "scale_mlp": (lambda: eva(scale_mlp=True, **ROPE), "Mlp", "FusedEvaBlock"),
    "swiglu_scale_mlp": (
        lambda: eva(swiglu_mlp=True, swiglu_align_to=16, scale_mlp=True, mlp_ratio=4 * 2 / 3, **ROPE),
        "SwiGLU",
        "FusedEvaSwiGLUBlock",
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_eva_variants_match_unpatched(name, op_calls):
    build, mlp_kind, fused_name = VARIANTS[name]
    reference, patched, report = pair(build().eval())
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1) and not report.skipped
    details = [e.detail for e in report.replaced if e.part == "mlp"]
    assert all(d.startswith(f"EvaBlock -> {fused_name} (fastvit.layernorm_mlp)") for d in details)
    assert type(patched.blocks[0].mlp).__name__ == mlp_kind
    assert_outputs_and_grads_match(reference, patched, images())
    assert all(p.grad is not None for p in patched.parameters())  # every Parameter learns
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == DEPTH and len(op_calls["patch_embed"]) == 1
    block, kwargs = patched.blocks[0], calls[0]["kwargs"]
    assert kwargs["layer_scale"] is block.gamma_2  # the block's own Parameter, or None
    if name.endswith("scale_mlp"):  # the MLP's own LayerNorm between the activation and fc2
        assert kwargs["hidden_norm"] == "layernorm" and kwargs["hidden_norm_bias"] is block.mlp.norm.bias
    else:
        assert "hidden_norm" not in kwargs
    if mlp_kind == "SwiGLU":  # act(fc1_g(x)) * fc1_x(x): fc1_g is the gate, fc1_x the value
        assert kwargs["fc1_gate_weight"] is block.mlp.fc1_g.weight and kwargs["fc1_weight"] is block.mlp.fc1_x.weight
    elif name == "glu":  # packed [gate; value]: the op's own layout, no views
        assert kwargs["gated"] is True and kwargs["fc1_weight"] is block.mlp.fc1.weight
    elif name == "glu_gate_last":  # [value; gate]: row views of fc1, no copies
        assert kwargs["fc1_gate_weight"].data_ptr() == block.mlp.fc1.weight[48:].data_ptr()
    else:
        assert kwargs["gated"] is False and kwargs["activation"] == "gelu"


def test_unfusable_mlp_halves_are_skipped_with_reasons(op_calls):
    # scale_mlp with a norm other than a LayerNorm between the activation and fc2 (Mlp and SwiGLU:
    # Eva builds SwiGLU for swiglu_mlp with scale_mlp): the op's hidden norm is a LayerNorm;
    # post-norm blocks' MLPs are fused alone (test_timm_post_norm)
    cases = {
        "scale_mlp": eva(scale_mlp=True),
        "swiglu_scale_mlp": eva(swiglu_mlp=True, scale_mlp=True, init_values=0.3),
    }
    for name, model in cases.items():
        for block in model.blocks:
            block.mlp.norm = RmsNorm(block.mlp.fc2.in_features)
        reference, patched, report = pair(model.eval())
        assert report.counts() == expected_parts(attention=DEPTH, mlp=0, patch_embed=1), name
        reasons = [(e.path, e.detail) for e in report.skipped]
        assert [path for path, _ in reasons] == [f"blocks.{i}" for i in range(DEPTH)], name
        assert all("mlp.norm is RmsNorm, not nn.LayerNorm (scale_mlp" in detail for _, detail in reasons), reasons
        assert_outputs_and_grads_match(reference, patched, images())
    assert op_calls["layernorm_mlp"] == []


def test_dynamic_img_size_other_resolution_with_rope_and_prefix_tokens(op_calls):
    # 20x28 images: a 5x7 grid against the 4x4 pos_embed (resampled as timm does) and RoPE on 5x7
    reference, patched, report = pair(eva(dynamic_img_size=True, init_values=0.3, **ROPE).eval())
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert_outputs_and_grads_match(reference, patched, images(size=(20, 28)))
    kwargs = op_calls["patch_embed"][0]["kwargs"]
    assert kwargs["pos_embed"].shape == (1, 3 + 35, DIM) and kwargs["prefix_tokens"].shape == (1, 3, DIM)
    assert_outputs_and_grads_match(reference, patched, images())  # and the native size
    # dynamic_img_pad: 18x26 images are zero-padded to 20x28
    reference, patched, _ = pair(eva(dynamic_img_size=True, dynamic_img_pad=True, no_embed_class=True, **ROPE).eval())
    assert_outputs_and_grads_match(reference, patched, images(size=(18, 26)))
    assert op_calls["patch_embed"][-1]["kwargs"]["dynamic_img_pad"] is True


def test_state_dict_untouched_and_unpatch_exact():
    model = eva(swiglu_mlp=True, swiglu_align_to=16, init_values=0.3, **ROPE).eval()
    x = images()
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    fastvit.patch(model)
    assert storage_map(model) == before_storage  # keys (in order), shapes and data pointers
    torch.testing.assert_close(model(x), before_out, rtol=RTOL, atol=ATOL)
    report = fastvit.unpatch(model)
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)


def test_drop_path_training_step_matches_timm(op_calls):
    # drop path 0.5 (timm's decay: 0 then 0.5): the same seed draws the same per-sample masks as
    # timm's DropPath, the MLP branch's handed to the op as sample_scale
    reference, patched, report = pair(eva(drop_path_rate=0.5, init_values=0.3, **ROPE).train())
    assert any("drop path 0.5" in e.detail for e in report.replaced if e.part == "mlp")
    assert_outputs_and_grads_match(reference, patched, images(), seed=3)
    scales = [c["kwargs"]["sample_scale"] for c in op_calls["layernorm_mlp"]]
    assert scales[0] is None and scales[1].shape == (BATCH,)
    assert all(v == 0.0 or v == pytest.approx(2.0) for v in scales[1].tolist())
    # a whole SGD step: the updated Parameters agree too
    for model in (reference, patched):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert_outputs_and_grads_match(reference, patched, images(seed=1), seed=4)


def test_rope_train_augmentation_draws_as_timm(op_calls):
    # DINOv3's RoPE shifts and jitters its coordinates in training (random draws inside
    # rope.get_embed): the fused embedding keeps timm's order of draws (embedding, RoPE, drop path)
    build = lambda: eva(rope_type="dinov3", rope_shift_coords=1.0, rope_jitter_coords=2.0, drop_path_rate=0.5,
                        init_values=0.3, **ROPE)  # fmt: skip
    reference, patched, _ = pair(build().train())
    assert_outputs_and_grads_match(reference, patched, images(), seed=7)
    assert len(op_calls["patch_embed"]) == 1 and len(op_calls["layernorm_mlp"]) == DEPTH


def test_patch_dropout_keeps_timm_rope_rows(op_calls):
    # patch_drop in training: the same seed keeps the same patches and their rotary rows
    for rope_type in ("cat", "mixed"):
        reference, patched, _ = pair(eva(patch_drop_rate=0.5, rope_type=rope_type, **ROPE).train())
        assert_outputs_and_grads_match(reference, patched, images(), seed=6)
    assert len(op_calls["patch_embed"]) == 2


def test_mlp_dropout_runs_timm_in_training(op_calls, fresh_warnings):
    reference, patched, report = pair(eva(proj_drop_rate=0.25, swiglu_mlp=True).train())
    assert any("MLP dropout 0.25" in e.detail for e in report.replaced if e.part == "mlp")
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference, patched, images(), seed=5)
    assert op_calls["layernorm_mlp"] == []


def test_forward_intermediates_run_timm_embedding_and_fused_blocks(op_calls):
    reference, patched, _ = pair(eva(init_values=0.3, **ROPE).eval())
    x = images()
    want = reference.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    got = patched.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    assert op_calls["patch_embed"] == [] and len(op_calls["layernorm_mlp"]) == DEPTH  # timm's embedding
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=ATOL)
    for (spatial, prefix), (ref_spatial, ref_prefix) in zip(got[1], want[1], strict=True):
        assert spatial.shape == (BATCH, DIM, 4, 4) and prefix.shape == (BATCH, 3, DIM)
        torch.testing.assert_close(spatial, ref_spatial, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(prefix, ref_prefix, rtol=RTOL, atol=ATOL)
    assert torch.equal(patched.patch_embed(x), reference.patch_embed(x))  # patch_embed keeps its meaning


def test_hook_on_patch_embed_runs_timm_embedding(op_calls, fresh_warnings):
    reference, patched, _ = pair(eva(**ROPE).eval())
    patched.patch_embed.register_forward_hook(lambda m, args, out: out * 2)
    reference.patch_embed.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on patch_embed"):
        assert_outputs_and_grads_match(reference, patched, images())
    assert op_calls["patch_embed"] == [] and len(op_calls["layernorm_mlp"]) == DEPTH


def test_grad_checkpointing(op_calls):
    reference, patched, _ = pair(eva(init_values=0.3, **ROPE).train())
    for model in (reference, patched):
        model.set_grad_checkpointing(True)
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["patch_embed"]) == 1 and len(op_calls["layernorm_mlp"]) == 2 * DEPTH  # + recompute


@pytest.mark.interpreter
def test_triton_route_swiglu_dynamic_drop_path(op_calls):
    # the two-linear gated kernel with gamma and drop path's sample_scale, patch_embed with a
    # resampled pos_embed on a 5x3 grid, RoPE on that grid
    build = lambda: eva(swiglu_mlp=True, swiglu_align_to=16, init_values=0.3, dynamic_img_size=True,
                        drop_path_rate=0.5, **ROPE)  # fmt: skip
    reference, patched, _ = pair(build().train())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(size=(20, 12)), rtol=1e-4, atol=1e-5, seed=2)
    assert len(op_calls["layernorm_mlp"]) == DEPTH and len(op_calls["patch_embed"]) == 1


@pytest.mark.parametrize(
    "rope_type, overrides",
    [("cat", {}), ("dinov3", {"rope_rotate_half": True}), ("mixed", {})],  # mixed: a learnable embedding
)
def test_rope_is_one_rotary_qk_call_per_block(monkeypatch, rope_type, overrides):
    """q and k are rotated by one fastvit.rotary_qk call per block (class + 2 register tokens left
    unrotated), matching timm's apply_rot_embed_cat + torch.cat, gradients included."""
    calls, real = [], fastvit.rotary_qk

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fastvit, "rotary_qk", spy)
    reference, patched, _ = pair(eva(rope_type=rope_type, init_values=0.3, **ROPE, **overrides))
    assert_outputs_and_grads_match(reference, patched, images())
    half = overrides.get("rope_rotate_half", False)
    assert calls and len(calls) % DEPTH == 0
    assert {(c["num_prefix_tokens"], c["rotate_half"]) for c in calls} == {(3, half)}


def test_rope_the_op_does_not_take_runs_timms_code():
    from fastvit.nn.timm_eva import _rotary_qk_takes

    q, rope = torch.randn(2, 3, 5, 8), torch.randn(4, 16)
    assert _rotary_qk_takes(q, q, rope, 1)
    assert _rotary_qk_takes(q, q, rope.expand(3, 4, 16), 1)  # (H, N - P, 2D): mixed RoPE's per block
    assert not _rotary_qk_takes(q, q.half(), rope, 1)  # q and k of different dtypes
    assert not _rotary_qk_takes(q, q, rope, 2)  # the embedding covers other tokens
    assert not _rotary_qk_takes(q, q, torch.randn(2, 2, 4, 16), 1)  # 2 heads for 3


def test_fx_feature_extraction_records_rotary_qk_and_scripts():
    """timm's FX feature extraction of a patched Eva: each block's rotation is one rotary_qk leaf node;
    the GraphModule matches timm, and so does its TorchScript form."""
    import warnings

    from timm.models._features_fx import create_feature_extractor

    reference = build("eva02_tiny_patch14_224")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    graph = create_feature_extractor(patched, return_nodes=["norm"])
    called = [getattr(n.target, "__name__", "") for n in graph.graph.nodes if n.op == "call_function"]
    assert called.count("rotary_qk") == TINY["depth"]
    x = torch.randn(2, 3, 28, 28)
    expected = reference.forward_features(x)
    torch.testing.assert_close(graph(x)["norm"], expected, rtol=RTOL, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(graph)
    torch.testing.assert_close(scripted(x)["norm"], expected, rtol=RTOL, atol=ATOL)
