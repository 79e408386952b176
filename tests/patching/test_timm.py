"""fastvit.patch on timm ViTs: vit_* variants, DeiT (distilled), DeiT-III (LayerScale).

Every model is compared with an unpatched deep copy on the CPU (the torch route of each op, fp32):
same output and the same gradient on every parameter and on the input.
"""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    BATCH,
    DEPTH,
    HAS_PATCH_EMBED,
    HEADS,
    assert_outputs_and_grads_match,
    expected_parts,
    images,
    module_types,
    pair,
    storage_map,
    timm_model,
    timm_vit,
)

timm = pytest.importorskip("timm")
from timm.layers import Attention  # noqa: E402
from timm.models.vision_transformer import Block, ResPostBlock  # noqa: E402

from fastvit.nn import timm_vit as fused  # noqa: E402

# (name, builder): each exercises a different token layout or block.
MODELS = {
    "vit": lambda: timm_vit(),
    "reg_tokens_qk_norm": lambda: timm_vit(reg_tokens=2, qk_norm=True),  # prefix = cls + 2 registers
    "no_class_token_no_embed_class": lambda: timm_vit(
        class_token=False, reg_tokens=1, no_embed_class=True, global_pool="avg"
    ),  # pos_embed covers the patches only; the prefix is one register token
    "no_pos_embed": lambda: timm_vit(pos_embed="none"),  # timm then skips pos_drop too
    "deit_distilled": lambda: timm_model("deit_tiny_distilled_patch16_224"),  # cls + dist tokens
    "deit3_layerscale": lambda: timm_model("deit3_small_patch16_224"),  # LayerScale, no_embed_class
}


@pytest.mark.parametrize("name", MODELS)
def test_patched_matches_unpatched(name, op_calls):
    reference, patched, report = pair(MODELS[name]().eval())
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert report.skipped == [] or not HAS_PATCH_EMBED
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["flash_attention"]) == DEPTH
    assert len(op_calls["layernorm_mlp"]) == DEPTH
    assert len(op_calls["patch_embed"]) == (1 if HAS_PATCH_EMBED else 0)


def test_layer_scale_and_eps_reach_the_op(op_calls):
    _, patched, _ = pair(MODELS["deit3_layerscale"]().eval())
    patched(images())
    call = op_calls["layernorm_mlp"][0]
    assert call["kwargs"]["layer_scale"] is patched.blocks[0].ls2.gamma
    assert call["kwargs"]["eps"] == patched.blocks[0].norm2.eps == 1e-6
    assert call["kwargs"]["fc1_weight"] is patched.blocks[0].mlp.fc1.weight  # the model's own Parameters


def test_dynamic_img_size_resamples_pos_embed(op_calls):
    # 20x24 images: a 5x6 grid against the 4x4 pos_embed, so timm resamples it (bicubic)
    reference, patched, _ = pair(timm_vit(dynamic_img_size=True, reg_tokens=1).eval())
    assert_outputs_and_grads_match(reference, patched, images(size=(20, 24)))
    assert_outputs_and_grads_match(reference, patched, images())  # and the native size
    # dynamic_img_pad: 18x22 images are zero-padded to 20x24 (bottom and right)
    reference, patched, _ = pair(timm_vit(dynamic_img_size=True, dynamic_img_pad=True).eval())
    assert_outputs_and_grads_match(reference, patched, images(size=(18, 22)))
    if HAS_PATCH_EMBED:
        assert op_calls["patch_embed"][-1]["kwargs"]["dynamic_img_pad"] is True


def test_fx_feature_extraction_of_a_dynamic_img_size_vit():
    # timm's FX tracer keeps resample_abs_pos_embed a leaf where timm's module calls it; the fused
    # embedding called its own import, whose size checks were control flow on traced values
    # ("symbolically traced variables cannot be used as inputs to control flow")
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    reference, patched, _ = pair(timm_vit(dynamic_img_size=True, reg_tokens=1).eval())
    x = images(size=(20, 24))
    nodes = {get_graph_node_names(reference)[1][-1]: "out"}
    want = create_feature_extractor(reference, return_nodes=nodes)(x)["out"]
    torch.testing.assert_close(create_feature_extractor(patched, return_nodes=nodes)(x)["out"], want)


def test_attention_splits_packed_qkv_without_copies(op_calls):
    # without qk_norm, q, k and v are strided views into one qkv output; with it, v still is
    for qk_norm in (False, True):
        op_calls["flash_attention"].clear()
        _, patched, _ = pair(timm_vit(qk_norm=qk_norm).eval())
        patched(images())
        q, k, v = op_calls["flash_attention"][0]["args"]
        tokens = 17  # 16 patches + cls
        assert q.shape == k.shape == v.shape == (BATCH, HEADS, tokens, 16)
        assert not v.is_contiguous() and v.stride(-1) == 1
        storages = {t.untyped_storage().data_ptr() for t in (q, k, v)}
        assert len(storages) == (3 if qk_norm else 1)
        # timm's fused path calls SDPA without a scale (its default, 16 ** -0.5 here): so does this
        assert op_calls["flash_attention"][0]["kwargs"]["scale"] is None


def test_state_dict_is_untouched_and_unpatch_restores_exactly():
    model = timm_vit(reg_tokens=1, init_values=0.1).eval()
    x = images()
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    params = list(model.parameters())
    fastvit.patch(model)
    assert storage_map(model) == before_storage  # keys (in order), shapes and data pointers
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert isinstance(model.blocks[0].attn, Attention) and isinstance(model.blocks[0], Block)
    report = fastvit.unpatch(model)
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert module_types(model) == before_types
    assert storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)
    assert not any("_fastvit_watched" in module.__dict__ for module in model.modules())


def test_patching_twice_is_a_no_op():
    model = timm_vit()
    first = fastvit.patch(model)
    types = module_types(model)
    second = fastvit.patch(model)
    assert second.replaced == [] and second.skipped == first.skipped
    assert len(second.already_patched) == len(first.replaced)
    assert module_types(model) == types
    assert "already patched" in str(second)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    reference, patched, _ = pair(timm_vit(reg_tokens=1, init_values=0.5))
    x = images()
    with torch.autocast("cpu", dtype=dtype):
        out_ref, out = reference(x), patched(x)
    assert out.dtype == out_ref.dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # 8 / 11 mantissa bits
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    out.float().sum().backward()
    out_ref.float().sum().backward()  # expanded (stride-0) upstream gradient
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=5 * tol, atol=5 * tol, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_mask_and_causal_keep_timm_semantics(op_calls):
    reference, patched, _ = pair(timm_vit(reg_tokens=1).eval())
    tokens = 18  # 16 patches + cls + register

    def causal(model, x):
        return model(x, is_causal=True)

    assert_outputs_and_grads_match(reference, patched, images(), run=causal)
    assert [c["kwargs"]["causal"] for c in op_calls["flash_attention"]] == [True] * DEPTH
    mask = torch.rand(tokens, tokens, generator=torch.Generator().manual_seed(0)) > 0.3
    mask |= torch.eye(tokens, dtype=torch.bool)  # every query sees at least itself

    def masked(model, x):
        return model(x, attn_mask=mask)

    assert_outputs_and_grads_match(reference, patched, images(), run=masked)
    assert len(op_calls["flash_attention"]) == 2 * DEPTH  # the masked calls run the fused op too
    assert all(c["kwargs"]["attn_mask"] is mask for c in op_calls["flash_attention"][DEPTH:])
    additive = torch.zeros(tokens, tokens).masked_fill(~mask, float("-inf"))

    def masked_float(model, x):
        return model(x, attn_mask=additive)

    assert_outputs_and_grads_match(reference, patched, images(), run=masked_float)


def test_grad_checkpointing(op_calls):
    reference, patched, _ = pair(timm_vit(init_values=0.5).train())
    patched.set_grad_checkpointing(True)
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["flash_attention"]) == 2 * DEPTH  # forward, then the recompute in backward
    assert len(op_calls["layernorm_mlp"]) == 2 * DEPTH


def test_drop_path_runs_through_sample_scale(op_calls):
    # drop-path 0.5 on both residual branches: with the same seed the patched model draws the
    # same per-sample masks as timm, and hands the MLP branch's to the op as sample_scale
    depth = 3
    reference, patched, report = pair(timm_vit(drop_path_rate=0.5, init_values=0.5, depth=depth).train())
    assert any("drop path" in e.detail for e in report.replaced)
    assert_outputs_and_grads_match(reference, patched, images(), seed=3)
    scales = [c["kwargs"]["sample_scale"] for c in op_calls["layernorm_mlp"]]
    assert len(scales) == depth and scales[0] is None  # block 0: drop-path rate 0 (timm's decay)
    for scale, keep in zip(scales[1:], (0.75, 0.5), strict=True):  # rates 0.25, 0.5: kept / keep_prob
        assert scale.shape == (BATCH,)
        assert all(v == 0.0 or v == pytest.approx(1 / keep) for v in scale.tolist())
    patched.eval()
    patched(images())
    assert all(c["kwargs"]["sample_scale"] is None for c in op_calls["layernorm_mlp"][depth:])


def test_attention_dropout_runs_timm_in_training(op_calls, fresh_warnings):
    reference, patched, report = pair(timm_vit(attn_drop_rate=0.25).train())
    assert any("attention dropout 0.25" in e.detail for e in report.replaced if e.part == "attention")
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        assert_outputs_and_grads_match(reference, patched, images(), seed=5)
    assert op_calls["flash_attention"] == []
    reference.eval(), patched.eval()
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["flash_attention"]) == DEPTH


def test_attention_dropout_warning_is_said_again_for_another_p(fresh_warnings):
    # the warning's key left p out: a second model with another p was not said, its message
    # naming the first model's p
    for p in (0.25, 0.5):
        _, patched, _ = pair(timm_vit(attn_drop_rate=p).train())
        with pytest.warns(fastvit.FastvitFallbackWarning, match=f"attention dropout p={p}"):
            patched(images())


def test_a_fallback_warning_names_the_line_that_called_the_model(monkeypatch):
    # stacklevel 3 named a line inside fastvit (fastvit/nn/fused.py), not the caller's
    import timm.models.vision_transformer as timm_vit_module

    backend_module = importlib.import_module("fastvit.backend")
    _, patched, _ = pair(timm_vit(attn_drop_rate=0.25).train())
    for call, caller in (
        (lambda: patched(images()), timm_vit_module.__file__),  # timm's block called the attention
        (lambda: patched.blocks[0].attn(torch.randn(1, 5, patched.embed_dim)), __file__),
    ):
        monkeypatch.setattr(backend_module, "_warned", set())
        with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout") as record:
            call()
        assert [w.filename for w in record] == [caller]


def test_mlp_dropout_runs_timm_in_training(op_calls, fresh_warnings):
    reference, patched, _ = pair(timm_vit(proj_drop_rate=0.25).train())
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference, patched, images(), seed=5)
    assert op_calls["layernorm_mlp"] == []
    patched.eval(), reference.eval()
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["layernorm_mlp"]) == DEPTH


def test_optimizer_built_before_patching_keeps_working():
    reference = timm_vit(init_values=0.5).train()
    patched = copy.deepcopy(reference)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, patched)]
    fastvit.patch(patched)
    for step in range(2):
        for model, opt in zip((reference, patched), optimizers, strict=True):
            opt.zero_grad()
            model(images(seed=step)).square().mean().backward()
            opt.step()
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_checkpoints_load_and_save_as_before():
    reference, patched, _ = pair(timm_vit(reg_tokens=1).eval())
    buffer = io.BytesIO()
    torch.save(patched.state_dict(), buffer)  # a patched model's checkpoint ...
    buffer.seek(0)
    fresh = timm_vit(reg_tokens=1).eval()
    fresh.load_state_dict(torch.load(buffer))  # ... loads into timm's model, strict
    torch.testing.assert_close(fresh(images()), reference(images()), rtol=1e-5, atol=1e-6)
    other = timm_vit(reg_tokens=1).eval()
    perturbed = copy.deepcopy(other.state_dict())
    patched.load_state_dict(perturbed)  # and timm's checkpoint loads into the patched model
    torch.testing.assert_close(patched(images()), other(images()), rtol=1e-5, atol=1e-6)


def test_hooks_deepcopy_and_pickle():
    model = timm_vit(reg_tokens=1).eval()
    seen = []
    hook = model.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    reference_out = model(images())
    fastvit.patch(model)
    model(images())
    assert seen == ["Attention", "FusedAttention"]  # a hook registered before patching still fires
    hook.remove()  # (a lambda does not pickle)
    for clone in (copy.deepcopy(model), _pickled(model)):
        assert type(clone.blocks[1].attn) is fused.FusedAttention
        torch.testing.assert_close(clone(images()), reference_out, rtol=1e-5, atol=1e-6)
        watched = clone.blocks[1]._fastvit_watched  # the copy watches its own submodules
        assert all(parent in set(clone.modules()) for parent, *_ in watched)
        fastvit.unpatch(clone)
        assert type(clone.blocks[1].attn) is Attention


def _pickled(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_model_inside_a_larger_model():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = timm_vit(num_classes=0)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.backbone(x))

    reference, patched, report = pair(Wrapper().eval())
    attention = {e.path for e in report.replaced if e.part == "attention"}
    assert attention == {"backbone.blocks.0.attn", "backbone.blocks.1.attn"}
    assert_outputs_and_grads_match(reference, patched, images())


def test_unsupported_parts_are_left_alone_with_reasons():
    model = timm_vit(act_layer=nn.ReLU, embed_norm_layer=nn.LayerNorm)  # no ReLU in the op (SiLU is)
    reference, patched, report = pair(model.eval())
    reasons = {(e.path, e.part): e.detail for e in report.skipped}
    assert "mlp.act is ReLU" in reasons[("blocks.0", "mlp")]
    if HAS_PATCH_EMBED:
        assert "patch_embed.norm is LayerNorm" in reasons[("", "patch_embed")]
    assert report.counts() == {"attention": DEPTH}
    assert type(patched.blocks[0]) is Block and type(patched.patch_embed) is type(reference.patch_embed)
    assert_outputs_and_grads_match(reference, patched, images())

    post_norm = timm_vit(block_fn=ResPostBlock).eval()
    reference, patched, report = pair(post_norm)
    assert not any(e.part == "mlp" for e in report.skipped)  # its MLP alone is fused (test_timm_post_norm)
    assert report.counts()["attention"] == report.counts()["mlp"] == DEPTH  # its attention is timm's Attention
    assert_outputs_and_grads_match(reference, patched, images())


def test_module_replaced_by_something_else_is_left_alone():
    class OtherAttention(nn.Module):  # e.g. installed by another library
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, x, attn_mask=None, is_causal=False):
            return self.proj(x)

    model = timm_vit().eval()
    model.blocks[0].attn = OtherAttention()
    reference, patched, report = pair(model)
    skipped = [e for e in report.skipped if e.path == "blocks.0.attn"]
    assert len(skipped) == 1 and "replaced by something else" in skipped[0].detail
    assert type(patched.blocks[0].attn) is OtherAttention
    assert type(patched.blocks[1].attn) is fused.FusedAttention
    assert_outputs_and_grads_match(reference, patched, images())


def test_timm_fastvit_models_are_left_alone():
    model = timm.create_model("fastvit_t8", pretrained=False, num_classes=5)  # Apple's FastViT
    types = module_types(model)
    with pytest.raises(ValueError, match=r"(?s)nothing to patch in FastVit.*Apple's FastViT"):
        fastvit.patch(model)
    assert module_types(model) == types


def test_blocks_of_a_family_without_an_entry_are_reported():
    """A transformer block (``attn`` and ``mlp`` submodules) of a timm family fastvit has no entry
    for is named in the report with a reason, not left out of it (XCiT's blocks were)."""
    model = timm.create_model("mobilevitv2_050", pretrained=False, num_classes=5)
    with pytest.raises(ValueError, match=r"(?s)nothing to patch in ByobNet.*stages\.2\.1\.transformer\.0: "
                       r"LinearTransformerBlock \(timm\.models\.mobilevit\) is not a block fastvit fuses: its "
                       r"MLP half runs timm's modules"):  # fmt: skip
        fastvit.patch(model)


def test_attentions_of_a_family_without_an_entry_are_reported():
    """A timm attention module fastvit has no entry for (CoaT's factorized attention, HaloNet's ...) is
    named in the report with a reason, not left out of it: the blocks' entries said nothing of their
    attention."""
    with pytest.raises(ValueError) as error:
        fastvit.patch(timm.create_model("coat_lite_tiny", pretrained=False, num_classes=5))
    for path in ("serial_blocks1.0.factoratt_crpe", "serial_blocks4.1.factoratt_crpe"):
        assert (f"attention    {path}: FactorAttnConvRelPosEnc (timm.models.coat) is not an attention fastvit fuses"
                in str(error.value))  # fmt: skip


def test_a_block_holding_another_fused_attention_is_reported_once(op_calls):
    """timm's Block built with another attention fastvit fuses (attn_layer=AttentionRope): the
    attention is fused and reported as replaced only (it was also listed as skipped, "not timm's
    Attention")."""
    attention = pytest.importorskip("timm.layers.attention")
    if not hasattr(attention, "AttentionRope"):
        pytest.skip("this timm has no AttentionRope")
    reference = timm_vit(attn_layer=attention.AttentionRope).eval()
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert not report.skipped
    assert [e.path for e in report.replaced if e.part == "attention"] == [f"blocks.{i}.attn" for i in range(DEPTH)]
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["flash_attention"]) == DEPTH
