"""timm's DaViT patched (fastvit.nn.timm_davit): the window attention and the channel attention
(V1: k attends over v and mixes q; V2, Florence-2's ``davit_*_fl``: q over k, mixing v, scale
N^-0.5) run one fastvit.flash_attention call each, and both blocks' MLP halves one
fastvit.layernorm_mlp call. Outputs and every gradient by the tolerance rule against the unpatched
model in float64. The named configs shrunk to widths 16-128 and depths (1, 1, 2, 1); 96 px images
give 24 x 24 maps at the first stage, padded to 28 x 28 for the 7 x 7 windows (the Florence-2
config's 12 x 12 windows pad every stage); no downloads.
"""

from __future__ import annotations

import copy

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
davit = pytest.importorskip("timm.models.davit")
if not hasattr(davit, "ChannelAttentionV2"):
    pytest.skip("a timm without DaViT's ChannelAttentionV2", allow_module_level=True)

SHRUNK = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), num_heads=(2, 2, 4, 4), num_classes=5)
BLOCKS = sum(SHRUNK["depths"])  # each a (spatial, channel) pair
# config -> its channel attention's fused class
CONFIGS = {"davit_tiny": "FusedDaVitChannelAttention", "davit_base_fl": "FusedDaVitChannelAttentionV2"}


def build(name: str = "davit_tiny", **overrides) -> torch.nn.Module:
    return perturb_(timm.create_model(name, pretrained=False, **(SHRUNK | overrides))).eval()


def images(size: int = 96, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def fused_names(model: torch.nn.Module) -> dict[str, int]:
    names: dict[str, int] = {}
    for m in model.modules():
        if type(m).__name__.startswith("FusedDaVit"):
            names[type(m).__name__] = names.get(type(m).__name__, 0) + 1
    return names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    reference = build(name)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": 2 * BLOCKS, "mlp": 2 * BLOCKS}
    assert fused_names(patched) == {
        "FusedDaVitWindowAttention": BLOCKS, CONFIGS[name]: BLOCKS,
        "FusedDaVitSpatialBlock": BLOCKS, "FusedDaVitChannelBlock": BLOCKS,
    }  # fmt: skip
    (skip,) = report.skipped
    assert skip.part == "patch_embed" and "overlapping conv" in skip.detail
    assert storage_map(patched) == storages
    x = images()
    assert_matches_by_the_rule(reference, patched, x)
    # per forward: one attention call per block (windows as the batch; channels as the sequence),
    # but for the first stage's channel attention: 24 x 24 = 576 tokens, more than the kernels' 256
    # as head dim, run timm's math
    calls = op_calls["flash_attention"][: 2 * BLOCKS - 1]
    window, channel = calls[0]["args"][0], calls[2]["args"][0]
    window_tokens = 12 * 12 if name == "davit_base_fl" else 7 * 7
    assert window.shape[1:] == (2, window_tokens, 8)  # (B * windows, heads, window tokens, head dim)
    assert channel.shape == (2, 2, 16, 12 * 12)  # (B, heads, channels per head, tokens)
    assert len(op_calls["flash_attention"]) % (2 * BLOCKS - 1) == 0
    assert len(op_calls["layernorm_mlp"]) >= 2 * BLOCKS
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    # drop path drawn alike (seeded): the op's sample_scale where timm's DropPath scales the branch
    reference, patched, _ = pair(build(drop_path_rate=0.3))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


def test_mlp_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.5
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert op_calls["layernorm_mlp"] == []


def test_hook_on_window_softmax_runs_timm(op_calls, fresh_warnings):
    # timm's eager path (fused_attn=False) calls softmax: a hook on it runs there, once per window call
    reference, patched, _ = pair(build())
    seen = {"reference": 0, "patched": 0}
    for key, model in (("reference", reference), ("patched", patched)):
        attn = model.stages[2].blocks[0][0].attn
        attn.fused_attn = False
        attn.softmax.register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(key, seen[key] + 1))
    x = images()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on softmax"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-6)
    assert seen == {"reference": 1, "patched": 1}
    assert len(op_calls["flash_attention"]) == 2 * BLOCKS - 2  # the hooked one, the 576-token channel one


def test_blocks_without_mlp_are_reported():
    report = fastvit.patch(build(ffn=False))
    assert report.counts() == {"attention": 2 * BLOCKS}
    mlp = [e for e in report.skipped if e.part == "mlp"]
    assert len(mlp) == 2 * BLOCKS and all("no MLP (ffn=False)" in e.detail for e in mlp)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
@pytest.mark.parametrize(("name", "size", "window"), [("davit_tiny", 64, 7), ("davit_base_fl", 32, 6)])
def test_triton_route(name, size, window, op_calls):
    # the channel attentions' rows: 16 x 16 = 256 tokens at most (the kernels' widest head dim);
    # Florence-2's config with 6 x 6 windows, its 8 x 8 maps padded to 12 x 12 (interpreter time)
    reference, patched, _ = pair(build(name, window_size=window))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(size), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_kernels_on_the_gpu(name, op_calls):
    assert_matches_on_the_gpu(build(name), images(96))
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
