"""timm's NaFlexVit patched (issue 14, item 5): its embedding on fastvit.patch_embed (image input:
the Linear's weight as a (D, C, p, p) view; pre-patchified input: the patches as a strided
channels_last image, timm's per-sample position embedding on the result) and padding masks as a
(B, 1, 1, N) key-padding mask. Blocks are timm's Block / EvaBlock, fused as elsewhere.

Tiny configs built locally (no downloads): 4x4 patches, dim 32, 2 heads, 2 blocks, a 4x4 position
table. Each patched fp32 model is held to the tolerance rule against the unpatched model in float64
(its fp32 error sets the budget): the pooled output, the valid tokens of ``forward_features`` and
every gradient (the input's and each Parameter's). Padded batches mix grids 4x4, 3x5 and 2x3 (16,
15 and 6 valid patches of 16) so that padding, prefix tokens and the interpolated position
embedding all meet in one batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    RTOL,
    assert_outputs_and_grads_match,
    expected_parts,
    module_types,
    pair,
    perturb_,
    storage_map,
)
from tests.tolerance import assert_close_to_reference

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")

PATCH, DIM, HEADS, DEPTH, CHANS = 4, 32, 2, 2, 3
GRIDS = ((4, 4), (3, 5), (2, 3))  # a full 4x4 sequence, 15 of 16 valid (another shape), 6 of 16 valid
SEQ = 16


def naflex(**overrides) -> nn.Module:
    args = dict(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, pos_embed_grid_size=(4, 4))
    cfg = naflexvit.NaFlexVitCfg(**(args | overrides))
    return perturb_(naflexvit.NaFlexVit(cfg, num_classes=5))


# name -> config overrides. prefix tokens: class + register; pooling of each kind NaFlex masks
CONFIGS = {
    # the named model's layout (Linear over (p, p, C) patches, learned table, 'avg' + fc_norm)
    "gap_learned": dict(class_token=True, reg_tokens=1, global_pool="avg"),
    # grid_sample lookup of the learned table, attention-pool head ('map': its own key mask)
    "map_grid_sample": dict(reg_tokens=2, global_pool="map", pos_embed_use_grid_sample=True),
    # factorized rows + columns, class token pooling, LayerScale
    "token_factorized": dict(class_token=True, global_pool="token", pos_embed="factorized", init_values=0.3),
    # RADIO's resampling: bilinear, aspect-ratio preserving (square, cropped), align_corners, no antialias
    "radio_token": dict(
        class_token=True, reg_tokens=2, global_pool="token", final_norm=False, init_values=0.3,
        pos_embed_interp_mode="bilinear", pos_embed_ar_preserving=True, pos_embed_antialias=False,
        pos_embed_align_corners=True,
    ),
    # axial RoPE: EvaBlock / EvaAttention get the key-padding mask
    "rope_max": dict(class_token=True, global_pool="max", rope_type="axial", attn_type="eva", pos_embed="none"),
    # timm's default attention for a rope_type, AttentionRope (fastvit.nn.timm_rope), here with
    # grouped-query attention (one kv head for two q heads, separate projections): the key-padding
    # mask and the RoPE of the valid rows reach the fused attention
    "rope_gqa": dict(class_token=True, global_pool="avg", rope_type="axial", num_kv_heads=1, qkv_fused=False),
    # per-block learned RoPE frequencies (timm's NaFlexRopeIterator), factorized table by grid_sample
    "mixed_rope_factorized_grid_sample": dict(
        reg_tokens=1, global_pool="avg", rope_type="mixed", attn_type="eva", pos_embed="factorized",
        pos_embed_use_grid_sample=True,
    ),
}


def images(batch: int = 3, size: tuple[int, int] = (16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, CHANS, *size, generator=torch.Generator().manual_seed(seed))


def padded_batch(grids=GRIDS, seq: int = SEQ, seed: int = 0) -> dict[str, torch.Tensor]:
    """NaFlex's collated input: patches (B, seq, p*p*C) in (p, p, C) order, padding at the end
    (random values, never zeros), patch_coord (B, seq, 2) as (y, x), patch_valid (B, seq)."""
    gen = torch.Generator().manual_seed(seed)
    patches = torch.randn(len(grids), seq, PATCH * PATCH * CHANS, generator=gen)
    coord = torch.zeros(len(grids), seq, 2, dtype=torch.long)
    valid = torch.zeros(len(grids), seq, dtype=torch.bool)
    for b, (h, w) in enumerate(grids):
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        coord[b, : h * w], valid[b, : h * w] = yx, True
    return dict(patches=patches, patch_coord=coord, patch_valid=valid)


def _run(model: nn.Module, x: torch.Tensor, naflex_args: dict | None) -> dict[str, torch.Tensor | None]:
    """Pooled logits, valid tokens and every gradient for fixed upstream gradients on both."""
    x = x.clone().requires_grad_(True)
    if naflex_args is None:
        tokens = model.forward_features(x)
        logits = model.forward_head(tokens)
    else:
        features = model.forward_features(x, **naflex_args)
        logits = model.forward_head(**features)
        prefix = torch.ones(x.shape[0], model.num_prefix_tokens, dtype=torch.bool, device=x.device)
        keep = torch.cat([prefix, naflex_args["patch_valid"]], dim=1)
        tokens = features["patches"][keep]  # valid tokens only: padded rows are free to differ
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)).sum() for t in (logits, tokens))
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
    return {"logits": logits.detach(), "tokens": tokens.detach(), "input": x.grad} | grads


def assert_matches_by_the_rule(reference: nn.Module, patched: nn.Module, x: torch.Tensor, **naflex_args) -> None:
    """Pooled output, valid tokens and every gradient within the tolerance rule, against the
    unpatched model in float64."""
    args = naflex_args or None
    oracle = _run(copy.deepcopy(reference).double(), x.double(), args)
    lowp, got = _run(reference, x, args), _run(patched, x, args)
    assert got.keys() == oracle.keys()
    for name, want in oracle.items():
        assert (want is None) == (got[name] is None), f"{name}: gradient present in one model only"
        if want is not None:
            assert_close_to_reference(got[name], want, lowp[name], name=name)
    assert all(got[name] is not None for name, _ in patched.named_parameters()), "a Parameter got no gradient"


def _call(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["patches"], patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])


def attentions(model: nn.Module) -> int:
    """The fused attention modules: one per block, plus the 'map' pool's (fastvit.nn.timm_pool)."""
    return DEPTH + (getattr(model, "attn_pool", None) is not None)


def block_calls(calls: list[dict]) -> list[dict]:
    """The blocks' flash_attention calls (the 'map' pool's has a single latent query)."""
    return [c for c in calls if c["args"][0].shape[2] > 1]


# --- image input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_image_input_matches_by_the_rule(name, op_calls):
    reference, patched, report = pair(naflex(**CONFIGS[name]).eval())
    expected = expected_parts(attention=attentions(patched), mlp=DEPTH, patch_embed=1)
    assert report.counts() == expected and not report.skipped
    for size in ((16, 16), (12, 20)):  # the table's own 4x4 grid, then resampled to 3x5
        assert_matches_by_the_rule(reference, patched, images(size=size))
    calls = op_calls["patch_embed"]
    assert len(calls) == 2  # one per size (the float64 oracle is the unpatched model)
    weight, proj = calls[0]["args"][1], patched.embeds.proj.weight
    # the Linear's (D, p*p*C) weight as a (D, C, p, p) view of the same storage, (p, p, C) order
    assert weight.shape == (DIM, CHANS, PATCH, PATCH) and weight.data_ptr() == proj.data_ptr()
    assert torch.equal(weight.permute(0, 2, 3, 1).flatten(1), proj)
    prefix = calls[0]["kwargs"]["prefix_tokens"]
    assert (prefix is None) == (patched.num_prefix_tokens == 0)
    assert prefix is None or prefix.shape == (1, patched.num_prefix_tokens, DIM)
    pos = calls[-1]["kwargs"]["pos_embed"]  # patches only, timm's resampling to 3x5
    assert pos is None if name == "rope_max" else pos.shape == (1, 15, DIM)
    assert all(c["kwargs"].get("attn_mask") is None for c in block_calls(op_calls["flash_attention"]))


def test_conv_projection_dynamic_pad_and_channels_first_patches(op_calls):
    # embed_proj_type="conv" with dynamic_img_pad (18x14 images padded to 20x16); (C, p, p) patches
    for overrides, size in (
        (dict(embed_proj_type="conv", dynamic_img_pad=True, class_token=True, global_pool="token"), (18, 14)),
        (dict(patchify_channels_last=False, reg_tokens=1, global_pool="avg", pos_embed="factorized"), (16, 12)),
    ):
        reference, patched, report = pair(naflex(**overrides).eval())
        assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
        assert_matches_by_the_rule(reference, patched, images(size=size))
    assert op_calls["patch_embed"][0]["kwargs"]["dynamic_img_pad"] is True
    weight = op_calls["patch_embed"][-1]["args"][1]  # (D, C*p*p) -> (D, C, p, p): a plain view
    assert weight.is_contiguous() and weight.data_ptr() == patched.embeds.proj.weight.data_ptr()


def test_partial_patch_without_padding_is_dropped_as_timms_conv_drops_it(op_calls):
    # 18x16 images without dynamic_img_pad: timm's conv drops the last 2 rows; the op gets a view of the rest
    reference, patched, _ = pair(naflex(embed_proj_type="conv", class_token=True, global_pool="token").eval())
    x = images(size=(18, 16))
    assert_matches_by_the_rule(reference, patched, x)
    (call,) = op_calls["patch_embed"]  # the oracle is unpatched
    assert call["args"][0].shape[-2:] == (16, 16) and call["args"][0]._is_view()  # of the input (a clone)
    # timm's Linear projection refuses a partial patch: its error, from timm's path
    reference, patched, _ = pair(naflex(class_token=True, global_pool="token").eval())
    with pytest.raises(Exception) as unpatched_error:
        reference(x)
    with pytest.raises(type(unpatched_error.value)):
        patched(x)
    assert len(op_calls["patch_embed"]) == 1


# --- pre-patchified input with padding -------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_padded_patches_match_by_the_rule(name, op_calls):
    reference, patched, _ = pair(naflex(**CONFIGS[name]).eval())
    batch = padded_batch()
    patches, args = batch["patches"], {k: v for k, v in batch.items() if k != "patches"}
    assert_matches_by_the_rule(reference, patched, patches, **args)
    (call,) = op_calls["patch_embed"]  # the oracle is unpatched
    image = call["args"][0]  # (B, C, L*p, p): the patches as a channels_last image, no copy
    assert image.shape == (3, CHANS, SEQ * PATCH, PATCH) and image.stride()[1:] == (1, PATCH * CHANS, CHANS)
    assert "pos_embed" not in call["kwargs"]  # per sample: timm's code adds it afterwards
    masks = [c["kwargs"]["attn_mask"] for c in block_calls(op_calls["flash_attention"])]
    assert len(masks) == DEPTH and all(m is masks[0] for m in masks)  # one mask for every block
    n = patched.num_prefix_tokens + SEQ
    assert masks[0].shape == (3, 1, 1, n)  # key padding, broadcast over heads and queries
    assert (masks[0][:, 0, 0, : patched.num_prefix_tokens] == 0).all()  # prefix tokens always valid
    assert torch.equal(masks[0][:, 0, 0, patched.num_prefix_tokens :] == 0, batch["patch_valid"])


def test_strided_patches(op_calls):
    # patches sliced out of a wider buffer: the image view cannot be formed, reshape copies them once
    reference, patched, _ = pair(naflex(**CONFIGS["gap_learned"]).eval())
    batch = padded_batch()
    wide = torch.cat([batch["patches"], torch.randn_like(batch["patches"])], dim=-1)
    strided = batch | {"patches": wide[..., : PATCH * PATCH * CHANS]}
    assert not strided["patches"].is_contiguous()
    torch.testing.assert_close(_call(patched, strided), _call(reference, batch), rtol=RTOL, atol=1e-5)
    assert len(op_calls["patch_embed"]) == 1


def test_padded_rows_are_the_only_difference_and_forward_matches():
    reference, patched, _ = pair(naflex(**CONFIGS["gap_learned"]).eval())
    batch = padded_batch()
    torch.testing.assert_close(_call(patched, batch), _call(reference, batch), rtol=RTOL, atol=1e-5)
    want = reference.forward_features(**batch)["patches"]
    got = patched.forward_features(**batch)["patches"]
    valid = torch.cat([torch.ones(3, 2, dtype=torch.bool), batch["patch_valid"]], dim=1)
    torch.testing.assert_close(got[valid], want[valid], rtol=RTOL, atol=1e-5)
    assert torch.isfinite(got).all()  # padded rows attend to the valid keys: finite, not timm's average
    # a caller's own mask is used as given: timm's symmetric (B, 1, N, N) one gives timm's values
    mask = naflexvit.create_attention_mask(batch["patch_valid"], num_prefix_tokens=2)
    want = reference.forward_features(**batch, attn_mask=mask)["patches"]
    got = patched.forward_features(**batch, attn_mask=mask)["patches"]
    torch.testing.assert_close(got[valid], want[valid], rtol=RTOL, atol=1e-5)


def test_named_model_dict_input_and_intermediates(op_calls):
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, patch_size=PATCH, embed_dim=DIM,
                              depth=DEPTH, num_heads=HEADS, num_classes=5, pos_embed_grid_size=(4, 4))  # fmt: skip
    reference, patched, report = pair(perturb_(model).eval())
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    batch = padded_batch()
    torch.testing.assert_close(patched(batch), reference(batch), rtol=RTOL, atol=1e-5)  # the collator's dict
    want = reference.forward_intermediates(batch, indices=2, output_fmt="NLC", output_dict=True)
    got = patched.forward_intermediates(batch, indices=2, output_fmt="NLC", output_dict=True)
    valid = batch["patch_valid"]
    for g, w in zip(got["image_intermediates"], want["image_intermediates"], strict=True):
        torch.testing.assert_close(g[valid], w[valid], rtol=RTOL, atol=1e-5)
    assert len(op_calls["patch_embed"]) == 2  # forward and forward_intermediates both fused
    # model.embeds keeps its meaning: timm's module, called on its own
    out, grid = patched.embeds(batch["patches"], patch_coord=batch["patch_coord"])
    ref_out, ref_grid = reference.embeds(batch["patches"], patch_coord=batch["patch_coord"])
    assert torch.equal(out, ref_out) and grid is ref_grid is None and len(op_calls["patch_embed"]) == 2


# --- parameters, training, compile, report --------------------------------------------------------
def test_state_dict_untouched_and_unpatch_exact():
    model = naflex(**CONFIGS["token_factorized"]).eval()
    batch = padded_batch()
    before, storages, types = _call(model, batch), storage_map(model), module_types(model)
    fastvit.patch(model)
    assert storage_map(model) == storages and type(model).__name__ == "FusedNaFlexVit"
    torch.testing.assert_close(_call(model, batch), before, rtol=RTOL, atol=1e-5)
    report = fastvit.unpatch(model)
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert module_types(model) == types and storage_map(model) == storages
    assert torch.equal(_call(model, batch), before)


def test_training_step_with_drop_path_and_patch_dropout(op_calls):
    # drop path 0.5 and patch dropout 0.25 in training: the same seed draws the same masks and keeps
    # the same patches (patch_valid gathered alike); then an SGD step, and the updated models agree
    build = lambda: naflex(class_token=True, global_pool="avg", drop_path_rate=0.5, patch_drop_rate=0.25)
    reference, patched, _ = pair(build().train())
    batch = padded_batch()
    run = lambda m, x: m(x, patch_coord=batch["patch_coord"], patch_valid=batch["patch_valid"])
    for step in range(2):
        assert_outputs_and_grads_match(reference, patched, batch["patches"], run=run, atol=1e-5, seed=step)
        for model in (reference, patched):
            torch.optim.SGD(model.parameters(), lr=0.1).step()
            model.zero_grad()
    assert len(op_calls["patch_embed"]) == 2


def test_compile_fullgraph_image_input(op_calls):
    torch._dynamo.reset()
    reference, patched, _ = pair(naflex(**CONFIGS["gap_learned"]).eval())
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    x = images(size=(12, 20))
    torch.testing.assert_close(compiled(x), reference(x), rtol=RTOL, atol=1e-5)
    assert len(op_calls["patch_embed"]) == 1
    # pre-patchified input compiles with graph breaks, as timm's own: its per-sample pos_embed
    # lookup is @torch.compiler.disable'd (and reads the grid sizes on the host)
    torch._dynamo.reset()
    batch = padded_batch()
    compiled = torch.compile(patched, backend="eager")
    torch.testing.assert_close(_call(compiled, batch), _call(reference, batch), rtol=RTOL, atol=1e-5)
    assert len(op_calls["patch_embed"]) == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["gap_learned", "map_grid_sample"])
def test_timm_fx_feature_extraction(name):
    """timm's FX feature extraction keeps NaFlexEmbeds a leaf (one node): the patched model traces
    too (the fused embedding branched on the traced input's shapes and patch_coord), and its last
    node matches the unpatched model's."""
    from timm.models import create_feature_extractor, get_graph_node_names

    reference, patched, _ = pair(naflex(**CONFIGS[name]).eval())
    x = images()
    for model in (reference, patched):
        last = get_graph_node_names(model)[1][-1]
        extractor = create_feature_extractor(model, return_nodes=[last])
        torch.testing.assert_close(extractor(x)[last], reference(x), rtol=RTOL, atol=1e-5)


def test_report_entries():
    _, _, report = pair(naflex(**CONFIGS["gap_learned"]).eval())
    (entry,) = [e for e in report.replaced if e.part == "patch_embed"]
    assert entry.path == "" and entry.detail.startswith("NaFlexVit -> FusedNaFlexVit (fastvit.patch_embed)")
    for said in ("image input: one fastvit.patch_embed call", "strided view of the patches",
                 "timm's per-sample pos_embed", "key-only (B, 1, 1, N)"):  # fmt: skip
        assert said in entry.detail, said
    _, _, report = pair(naflex(patchify_channels_last=False).eval())
    assert "pre-patchified input runs timm's embeds" in report.replaced[0].detail
    # unfusable embeddings: skipped with the reason, the blocks still fused
    with_input_norm = naflex()  # NaFlexVitCfg.input_norm_layer is not passed on by timm 1.0.31: set by hand
    with_input_norm.embeds.norm_input = nn.LayerNorm(PATCH * PATCH * CHANS)
    for model, reason in (
        (with_input_norm, "embeds.norm_input is LayerNorm"),
        (naflex(embed_norm_layer="layernorm"), "embeds.norm is LayerNorm"),
        (naflex(patch_size=(4, 2)), "square patches"),
    ):
        reference, patched, report = pair(model.eval())
        assert report.counts() == expected_parts(attention=attentions(patched), mlp=DEPTH, patch_embed=0), reason
        (skip,) = report.skipped
        assert skip.part == "patch_embed" and skip.path == "" and reason in skip.detail, skip
        x = images()
        torch.testing.assert_close(patched(x), reference(x), rtol=RTOL, atol=1e-5)
    _, _, report = pair(naflex().eval(), patch_embed=False)
    assert "patch_embed" not in report.counts() and not report.skipped
    # RoPE with timm's default attn_type="rope": AttentionRope is fused (fastvit.nn.timm_rope)
    _, patched, report = pair(naflex(rope_type="axial").eval())
    assert report.counts() == expected_parts(attention=attentions(patched), mlp=DEPTH, patch_embed=1)
    assert not report.skipped
    rope_attentions = [e for e in report.replaced if e.path.endswith(".attn")]
    assert len(rope_attentions) == DEPTH and all("FusedAttentionRope" in e.detail for e in rope_attentions)


def test_hook_on_the_projection_runs_timm_embedding(op_calls, fresh_warnings):
    reference, patched, _ = pair(naflex(**CONFIGS["gap_learned"]).eval())
    for model in (reference, patched):
        model.embeds.proj.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on embeds.proj"):
        torch.testing.assert_close(_call(patched, padded_batch()), _call(reference, padded_batch()),
                                   rtol=RTOL, atol=1e-5)  # fmt: skip
    assert op_calls["patch_embed"] == [] and len(op_calls["flash_attention"]) == DEPTH


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")  # finfo.min * log2 e
def test_triton_route(op_calls):
    # the kernels on the strided patch view and on a resampled image, the padded key mask in-kernel
    reference, patched, _ = pair(naflex(**CONFIGS["gap_learned"]).eval())
    batch = padded_batch()
    patches, args = batch["patches"], {k: v for k, v in batch.items() if k != "patches"}
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, patches, **args)
        assert_matches_by_the_rule(reference, patched, images(size=(12, 20)))
    assert len(op_calls["patch_embed"]) == 2 and len(op_calls["flash_attention"]) == 2 * DEPTH


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    # fp32 through the compiled kernels by the rule (padded patches, resampled image); then bf16
    # autocast within bf16's error, pooled output
    device = torch.device("cuda")
    reference, patched, _ = pair(naflex(**CONFIGS["gap_learned"]).to(device).eval())
    batch = {k: v.to(device) for k, v in padded_batch().items()}
    patches, args = batch["patches"], {k: v for k, v in batch.items() if k != "patches"}
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, patches, **args)
        assert_matches_by_the_rule(reference, patched, images(size=(12, 20)).to(device))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = _call(patched, batch), _call(reference, batch)
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 3e-2 * scale
    assert len(op_calls["patch_embed"]) == 3
