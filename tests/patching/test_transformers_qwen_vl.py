"""The Qwen-VL vision towers of Hugging Face patched (fastvit.nn.hf_layers): Qwen2-VL (LayerNorm +
QuickGELU MLP), Qwen2.5-VL (RMSNorm + SwiGLU, window and full attention) and Qwen3-VL (LayerNorm +
tanh-GELU MLP, deepstack), and GLM-4V's tower. Their attention goes through transformers' attention
interface under ``"fastvit_flash_varlen"`` (one flash_attention_varlen call over all the packed
images or windows of a block), their MLP halves are one fastvit.layernorm_mlp call each over the
packed (T, D) tokens of images of different sizes. Outputs and every gradient against the
unpatched tower; tiny random configs, no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import assert_outputs_and_grads_match, module_types, perturb_, storage_map

T = pytest.importorskip("transformers")
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5  # noqa: E402
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2  # noqa: E402
from transformers.models.qwen3_vl import modeling_qwen3_vl as qwen3  # noqa: E402

DEPTH, PATCH = 2, 4
GRID = torch.tensor([[1, 4, 4], [1, 4, 8]])  # two images: 16 and 32 patches, packed
TOKENS = int(GRID.prod(-1).sum())
SHARED = dict(depth=DEPTH, num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)


def qwen2_vl() -> torch.nn.Module:
    cfg = T.Qwen2VLConfig().vision_config.__class__(embed_dim=32, hidden_size=32, mlp_ratio=2, **SHARED)
    return qwen2.Qwen2VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa")


def qwen2_5_vl() -> torch.nn.Module:  # block 0 in 16-token windows, block 1 full attention
    cfg = T.Qwen2_5_VLConfig().vision_config.__class__(
        hidden_size=32, intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1], **SHARED
    )
    return qwen2_5.Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa")


def qwen3_vl() -> torch.nn.Module:
    cfg = T.Qwen3VLConfig().vision_config.__class__(
        hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16,
        deepstack_visual_indexes=[1], **SHARED,
    )  # fmt: skip
    return qwen3.Qwen3VLVisionModel._from_config(cfg, attn_implementation="sdpa")


# tower -> (builder, fused block class, the op's keywords it must see)
TOWERS = {
    "qwen2_vl": (qwen2_vl, "FusedQwen2VLVisionBlock", dict(activation="quick_gelu")),
    "qwen2_5_vl": (qwen2_5_vl, "FusedQwen2_5_VLVisionBlock", dict(norm="rms", activation="silu")),
    "qwen3_vl": (qwen3_vl, "FusedQwen3VLVisionBlock", dict(activation="gelu_tanh")),
}


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(hidden_states=x, grid_thw=GRID)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def patches() -> torch.Tensor:
    return torch.randn(TOKENS, 3 * 2 * PATCH * PATCH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_tower_matches_unpatched(tower, op_calls):
    build, fused, keywords = TOWERS[tower]
    reference = perturb_(build()).eval()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH}
    assert [type(b).__name__ for b in patched.blocks] == [fused] * DEPTH
    assert storage_map(patched) == storages
    assert_outputs_and_grads_match(reference, patched, patches(), run=features, rtol=1e-4, atol=1e-5)
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == DEPTH and calls[0]["args"][0].shape == (TOKENS, 32)  # the packed tokens
    assert all(calls[0]["kwargs"].get(k) == v for k, v in keywords.items()), calls[0]["kwargs"]
    # the attention: one varlen call per block over the packed images (or windows), not one
    # flash_attention call per image or window
    assert len(op_calls["flash_attention_varlen"]) == DEPTH and not op_calls["flash_attention"]
    assert patched.config._attn_implementation == "fastvit_flash_varlen"
    fastvit.unpatch(patched)
    assert module_types(patched) == types
    assert patched.config._attn_implementation == "sdpa"


def test_windows_and_images_are_one_launch(op_calls):
    # Qwen2.5-VL's block 0 attends within 16-token windows (3 over the two images), block 1
    # over each image: one varlen call each, where attn_implementation="fastvit" set by hand (a name
    # transformers does not read as flash) calls the op once per window or image
    reference = perturb_(qwen2_5_vl()).eval()
    patched, by_hand = copy.deepcopy(reference), copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert all("fastvit_flash_varlen" in e.detail for e in report.replaced if e.part == "attention")
    by_hand.set_attn_implementation("fastvit")
    x = patches()
    with torch.no_grad():
        want = features(reference, x)
        torch.testing.assert_close(features(patched, x), want, rtol=1e-5, atol=1e-6)
        assert len(op_calls["flash_attention_varlen"]) == DEPTH and not op_calls["flash_attention"]
        window_bounds = op_calls["flash_attention_varlen"][0]["args"][3]
        assert window_bounds.tolist() == [0, 16, 32, 48]  # block 0's windows, each its own sequence
        torch.testing.assert_close(features(by_hand, x), want, rtol=1e-5, atol=1e-6)
    assert len(op_calls["flash_attention"]) == 3 + 2


def test_second_patch_and_unpatch(op_calls):
    tower = qwen2_vl().eval()
    fastvit.patch(tower)
    again = fastvit.patch(tower)
    assert not again.replaced and len(again.already_patched) == 2 * DEPTH  # attention and MLP halves
    assert all("an earlier fastvit.patch" in e.detail for e in again.already_patched if e.part == "attention")
    restored = fastvit.unpatch(tower)
    assert tower.config._attn_implementation == "sdpa"
    assert any("'fastvit_flash_varlen' -> 'sdpa'" in e.detail for e in restored.replaced)


def test_config_shared_with_an_attention_that_does_not_pack_stays_on_fastvit(op_calls):
    # The implementation's name is the config's: a CLIP attention reading the tower's config would
    # take a flash name for flash-attn's conventions without packing, so the whole config keeps
    # "fastvit" (the tower then calls the op once per image, as under attn_implementation="fastvit")
    tower = qwen2_vl().eval()
    clip = T.models.clip.modeling_clip.CLIPAttention(T.CLIPVisionConfig(hidden_size=32, num_attention_heads=2))
    clip.config = tower.config
    holder = torch.nn.ModuleDict({"tower": tower, "clip": clip})
    report = fastvit.patch(holder)
    assert report.counts()["attention"] == DEPTH + 1
    assert holder["tower"].config is holder["clip"].config
    assert holder["tower"].config._attn_implementation == "fastvit"
    with torch.no_grad():
        features(holder["tower"], patches())
    assert len(op_calls["flash_attention"]) == DEPTH * 2 and not op_calls["flash_attention_varlen"]


def test_hook_on_the_mlp_runs_hugging_face(op_calls, fresh_warnings):
    reference = perturb_(qwen2_5_vl()).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for model in (reference, patched):
        model.blocks[0].mlp.gate_proj.register_forward_hook(lambda m, args, out: out * 2)
    x = patches()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.gate_proj"):
        torch.testing.assert_close(features(patched, x), features(reference, x), rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == DEPTH - 1


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference = perturb_(qwen2_5_vl()).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, patches(), run=features, rtol=1e-4, atol=1e-5)


def test_glm4v_tower_packs_its_images(op_calls):
    # GLM-4V's vision tower is written like Qwen2-VL's (cu_seq_lens_q for flash-named implementations):
    # found by its source, not by name; one varlen call per block, outputs as unpatched
    from transformers.models.glm4v import modeling_glm4v as glm4v

    cfg = T.Glm4vConfig().vision_config.__class__(
        depth=DEPTH, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=32, image_size=16,
    )  # fmt: skip
    reference = perturb_(glm4v.Glm4vVisionModel._from_config(cfg, attn_implementation="sdpa")).eval()
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts()["attention"] == DEPTH and patched.config._attn_implementation == "fastvit_flash_varlen"
    assert_outputs_and_grads_match(reference, patched, patches(), run=features, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention_varlen"]) == DEPTH and not op_calls["flash_attention"]


def test_patched_config_builds_and_switches_models(op_calls):
    # transformers checks a config's implementation when it builds or switches a model, and sends
    # names holding "flash" to its flash-attn loader: the patched tower's config must still build
    # another tower (an EMA copy, type(model)(model.config)) and switch back and forth
    reference = perturb_(qwen2_vl()).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    rebuilt = type(patched)(patched.config).eval()
    rebuilt.load_state_dict(reference.state_dict())
    assert rebuilt.config._attn_implementation == "fastvit_flash_varlen"
    x = patches()
    with torch.no_grad():
        torch.testing.assert_close(features(rebuilt, x), features(reference, x), rtol=1e-5, atol=1e-6)
    assert len(op_calls["flash_attention_varlen"]) == DEPTH
    rebuilt.set_attn_implementation("sdpa")
    rebuilt.set_attn_implementation("fastvit_flash_varlen")
    assert rebuilt.config._attn_implementation == "fastvit_flash_varlen"
