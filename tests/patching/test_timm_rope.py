"""timm's ``AttentionRope`` patched (fastvit.nn.timm_rope): the RoPE attention of the Perception
Encoder ViTs (``vit_pe_*``: Eva with attn_type='rope'), of timm's Qwen3-VL and DeepSeek vision towers
and of NaFlexVit with a rope_type (tests/patching/test_timm_naflex.py: padded batches, grouped-query
attention). RoPE on fastvit.rotary_qk where q and k share a shape (timm's apply_rot_embed_cat
otherwise), then fastvit.flash_attention; outputs and every gradient against the unpatched model.
Tiny random configs, no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    ATOL,
    RTOL,
    assert_outputs_and_grads_match,
    expected_parts,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
attention_module = pytest.importorskip("timm.layers.attention")
if not hasattr(attention_module, "AttentionRope"):
    pytest.skip("this timm has no AttentionRope", allow_module_level=True)
from timm.layers.attention import AttentionRope  # noqa: E402

DEPTH = 2
TINY = dict(embed_dim=32, depth=DEPTH, num_heads=2, num_classes=5)
# name -> (overrides, expected fused parts (attention, mlp, patch_embed), rotary_qk calls per forward)
MODELS = {
    # Qwen3-VL tower: EvaBlock + AttentionRope, rotate_half RoPE, no prefix tokens, pos embed resampled
    "qwen3_vit_88m": (dict(img_size=32, patch_size=8, pos_embed_grid_size=4, mlp_ratio=2.0), (DEPTH, DEPTH, 1)),
    # DeepSeek tower: its own block (fp32 RMSNorm, bias-free packed SwiGLU: fastvit.nn.timm_deepseek)
    "deepseek_vit_412m": (dict(img_size=32, patch_size=8), (DEPTH, DEPTH, 1)),
    # Perception Encoder: Eva with attn_type='rope', class token, attention-pool head ('map')
    "vit_pe_core_small_patch16_384": (dict(img_size=32, patch_size=8), (DEPTH + 1, DEPTH, 1)),
}


def build(name: str, **overrides) -> nn.Module:
    return perturb_(timm.create_model(name, pretrained=False, **(TINY | MODELS[name][0] | overrides))).eval()


def rope_attention(**overrides) -> AttentionRope:
    """AttentionRope on its own with every option timm's forward reads: separate projections with
    two q heads per kv head, q/k norms, the output norm, the gate, one prefix token."""
    args = dict(dim=32, num_heads=4, qkv_fused=False, num_kv_heads=2, num_prefix_tokens=1,
                norm_layer=nn.LayerNorm, qk_norm=True, scale_norm=True, gated=True)  # fmt: skip
    return perturb_(AttentionRope(**(args | overrides))).eval()


def rope_table(n_patches: int, head_dim: int = 8) -> torch.Tensor:
    """timm's [sin, cos] embedding of a 2 x (n_patches / 2) grid, (n_patches, 2 * head_dim)."""
    from timm.layers import RotaryEmbeddingCat

    return RotaryEmbeddingCat(dim=head_dim, in_pixels=False).get_embed(shape=(2, n_patches // 2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_match_unpatched(name, op_calls):
    reference = build(name)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    attention, mlp, patch_embed = MODELS[name][1]
    assert report.counts() == expected_parts(attention=attention, mlp=mlp, patch_embed=patch_embed)
    fused = [e for e in report.replaced if "FusedAttentionRope" in e.detail]
    assert len(fused) == DEPTH
    assert all("AttentionRope" not in e.detail for e in report.skipped)
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 32, 32))
    assert len([c for c in op_calls["flash_attention"] if c["args"][0].shape[2] > 1]) == DEPTH
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_rope_is_one_rotary_qk_call_per_block(monkeypatch):
    calls = []
    real = fastvit.rotary_qk

    def spy(q, k, rope, **kwargs):
        calls.append(kwargs)
        return real(q, k, rope, **kwargs)

    monkeypatch.setattr(fastvit, "rotary_qk", spy)
    reference, patched, _ = pair(build("qwen3_vit_88m"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(patched(x), reference(x), rtol=RTOL, atol=ATOL)
    assert calls == [dict(num_prefix_tokens=0, rotate_half=True)] * DEPTH  # Qwen's 'half' layout


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # grouped-query: k has fewer heads than q, so timm's apply_rot_embed_cat rotates them
        dict(num_kv_heads=None, rotate_half=True),  # one shape: fastvit.rotary_qk
        dict(qkv_fused=True, num_kv_heads=None, qk_norm=False, scale_norm=False, gated=False, num_prefix_tokens=0),
    ],
)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_options_mask_and_rope(overrides, masked, op_calls):
    reference = rope_attention(**overrides)
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    n_tokens = reference.num_prefix_tokens + 6
    rope = rope_table(6)
    mask = None
    if masked:  # NaFlexVit's key padding: the last two tokens of the second sample
        mask = torch.ones(2, 1, 1, n_tokens, dtype=torch.bool)
        mask[1, ..., -2:] = False
    run = lambda m, x: m(x, rope=rope, attn_mask=mask)
    assert_outputs_and_grads_match(reference, patched, torch.randn(2, n_tokens, 32), run=run)
    (call,) = op_calls["flash_attention"]
    q, k = call["args"][:2]
    assert q.shape == k.shape == (2, 4, n_tokens, 8)  # k and v expanded to the q heads, as timm
    assert (call["kwargs"].get("attn_mask") is None) == (not masked)


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference = rope_attention(attn_drop=0.5).train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x, rope = torch.randn(2, 7, 32), rope_table(6)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        torch.manual_seed(0)
        got = patched(x, rope=rope)
    torch.manual_seed(0)
    torch.testing.assert_close(got, reference(x, rope=rope), rtol=RTOL, atol=ATOL)
    assert op_calls["flash_attention"] == []
    patched.eval()  # no dropout in eval: the fused op again
    torch.testing.assert_close(patched(x, rope=rope), reference.eval()(x, rope=rope), rtol=RTOL, atol=ATOL)
    assert len(op_calls["flash_attention"]) == 1


def test_training_step_and_compile(op_calls):
    reference = build("qwen3_vit_88m", drop_path_rate=0.2).train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x = torch.randn(2, 3, 32, 32)
    assert_outputs_and_grads_match(reference, patched, x, seed=0)
    compiled = torch.compile(patched.eval(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_triton_route(op_calls):
    for name in ("qwen3_vit_88m", "vit_pe_core_small_patch16_384"):
        reference, patched, _ = pair(build(name))
        with fastvit.backend("triton"):
            assert_outputs_and_grads_match(reference, patched, torch.randn(2, 3, 32, 32), rtol=1e-4, atol=1e-5)
    reference = rope_attention()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    run = lambda m, x: m(x, rope=rope_table(6))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, torch.randn(2, 7, 32), run=run, rtol=1e-4, atol=1e-5)


def test_deepseek_block_mlp_half_is_one_op_call(op_calls):
    reference, patched, _ = pair(build("deepseek_vit_412m", drop_path_rate=0.2))
    assert all(type(block).__name__ == "FusedDeepseekVitBlock" for block in patched.encoder.blocks)
    x = torch.randn(2, 3, 32, 32)
    assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0)  # drop path drawn alike
    call = op_calls["layernorm_mlp"][-1]["kwargs"]  # the last block (timm's drop path rate rises from 0)
    assert call["norm"] == "rms" and call["gated"] and call["activation"] == "silu" and call["fc1_bias"] is None
    assert call["sample_scale"] is not None  # drop path as the op's per-sample scale


@pytest.mark.parametrize("fused_attn", [True, False])
def test_mask_with_is_causal_is_timms_to_decide(fused_attn, op_calls):
    """attn_mask with is_causal=True: timm's SDPA path raises (SDPA's own error), its eager path lets
    causal take precedence and drops the mask; the fused attentions (AttentionRope, timm's Attention,
    Eva's) applied both, silently."""
    from timm.layers import Attention
    from timm.models.eva import EvaAttention

    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., -2:] = False
    x = torch.randn(2, 7, 32)
    for reference in (rope_attention(), perturb_(Attention(32, num_heads=4, norm_layer=nn.LayerNorm)).eval(),
                      perturb_(EvaAttention(32, num_heads=4, norm_layer=nn.LayerNorm)).eval()):  # fmt: skip
        reference.fused_attn = fused_attn
        patched = copy.deepcopy(reference)
        fastvit.patch(patched)
        if fused_attn:
            for model in (reference, patched):
                with pytest.raises(RuntimeError):
                    model(x, attn_mask=mask, is_causal=True)
        else:
            torch.testing.assert_close(patched(x, attn_mask=mask, is_causal=True),
                                       reference(x, attn_mask=mask, is_causal=True), rtol=RTOL, atol=ATOL)  # fmt: skip
    assert op_calls["flash_attention"] == []
