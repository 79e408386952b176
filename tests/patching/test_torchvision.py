"""fastvit.patch on torchvision's VisionTransformer (EncoderBlock, nn.MultiheadAttention, MLPBlock,
conv_proj, LayerNorm eps 1e-6), compared with an unpatched copy on the CPU (torch route, fp32)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    BATCH,
    DEPTH,
    DIM,
    HAS_PATCH_EMBED,
    HEADS,
    assert_outputs_and_grads_match,
    expected_parts,
    images,
    module_types,
    pair,
    storage_map,
    torchvision_vit,
)

pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import ConvStemConfig, EncoderBlock

from fastvit.nn import torchvision_vit as fused


def test_patched_matches_unpatched(op_calls):
    reference, patched, report = pair(torchvision_vit().eval())
    assert report.counts() == expected_parts(attention=DEPTH, mlp=DEPTH, patch_embed=1)
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["flash_attention"]) == DEPTH
    assert len(op_calls["layernorm_mlp"]) == DEPTH
    assert op_calls["layernorm_mlp"][0]["kwargs"]["eps"] == 1e-6
    assert len(op_calls["patch_embed"]) == (1 if HAS_PATCH_EMBED else 0)
    block = patched.encoder.layers[0]
    assert isinstance(block, EncoderBlock) and isinstance(block.self_attention, nn.MultiheadAttention)


def test_state_dict_is_untouched_and_unpatch_restores_exactly():
    model = torchvision_vit().eval()
    x = images()
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    fastvit.patch(model)
    assert storage_map(model) == before_storage
    fastvit.unpatch(model)
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)


def test_grad_checkpointing_and_training(op_calls):
    # torchvision has no checkpointing switch: wrap each block as a user would
    reference, patched, _ = pair(torchvision_vit().train())
    layers = patched.encoder.layers
    for name, block in list(layers.named_children()):
        layers._modules[name] = _Checkpointed(block)
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["layernorm_mlp"]) == 2 * DEPTH  # forward, then the recompute


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def test_multihead_attention_keeps_its_signature():
    reference, patched, _ = pair(torchvision_vit().eval())
    mha_ref = reference.encoder.layers[0].self_attention
    mha = patched.encoder.layers[0].self_attention
    x = torch.randn(BATCH, 17, DIM)
    out, weights = mha(x, x, x, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, mha_ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    # calls the fused path does not cover run PyTorch's: attention weights, masks, cross-attention
    for args, kwargs in [
        ((x, x, x), {}),  # need_weights defaults to True
        ((x, x, x), {"need_weights": False, "attn_mask": torch.zeros(17, 17)}),
        ((x, x, x), {"need_weights": False, "key_padding_mask": torch.zeros(BATCH, 17, dtype=torch.bool)}),
        ((x, torch.randn(BATCH, 5, DIM), torch.randn(BATCH, 5, DIM)), {"need_weights": False}),
    ]:
        got, got_weights = mha(*args, **kwargs)
        want, want_weights = mha_ref(*args, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got_weights is None) == (want_weights is None)


def test_multihead_attention_sequence_first(op_calls):
    # batch_first=False (PyTorch's default layout, (N, B, E)); torchvision itself is batch first
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=False).eval()
    reference = copy.deepcopy(mha)
    fused.FusedMultiheadAttention.swap_in(mha)

    def run(module, x):
        return module(x, x, x, need_weights=False)[0]

    assert_outputs_and_grads_match(reference, mha, torch.randn(19, BATCH, DIM), run=run)
    assert len(op_calls["flash_attention"]) == 1


def test_dropout_runs_torchvision_in_training(op_calls, fresh_warnings):
    reference, patched, report = pair(torchvision_vit(dropout=0.2, attention_dropout=0.2).train())
    notes = " ".join(e.detail for e in report.replaced)
    assert "attention dropout 0.2" in notes and "MLP dropout 0.2" in notes
    with pytest.warns(fastvit.FastvitFallbackWarning):
        assert_outputs_and_grads_match(reference, patched, images(), seed=7)
    assert op_calls["flash_attention"] == [] and op_calls["layernorm_mlp"] == []
    reference.eval(), patched.eval()
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == DEPTH


def test_block_dropout_draws_the_same_mask_for_the_same_seed(op_calls, fresh_warnings):
    """With the encoder block's dropout > 0 (attention_dropout 0, so the attention runs fused) in
    training, one seed gives the same output and gradients as the unpatched model: the fused
    attention's output is laid out as PyTorch's batch-first MHA returns it before that dropout,
    which draws its mask in memory order (a contiguous output dropped other elements: 0.44 apart)."""
    reference, patched, _ = pair(torchvision_vit(dropout=0.2).train())
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference, patched, images(), seed=7)
    assert len(op_calls["flash_attention"]) == DEPTH  # the attention ran fused


def test_autocast_bf16():
    reference, patched, _ = pair(torchvision_vit().eval())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, out = reference(images()), patched(images())
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)


def test_conv_stem_is_left_alone():
    stem = [ConvStemConfig(out_channels=8, kernel_size=3, stride=2), ConvStemConfig(8, 3, 2)]
    reference, patched, report = pair(torchvision_vit(conv_stem_configs=stem).eval())
    if HAS_PATCH_EMBED:
        (entry,) = [e for e in report.skipped if e.part == "patch_embed"]
        assert "conv_proj is Sequential, not nn.Conv2d" in entry.detail
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH}
    assert_outputs_and_grads_match(reference, patched, images())


def test_dynamically_quantized_mlps_are_reported_by_their_own_class():
    # quantize_dynamic swaps the MLP's Linears for torch.ao's (also named "Linear"): the report
    # read "mlp holds (Linear, GELU, ...), not (Linear, GELU, ...)"; it names their module now, and
    # the quantized MLPs run as they are
    if "fbgemm" not in torch.backends.quantized.supported_engines and "qnnpack" not in (
        torch.backends.quantized.supported_engines
    ):
        pytest.skip("no quantized engine")
    model = torch.ao.quantization.quantize_dynamic(torchvision_vit().eval(), {nn.Linear}, dtype=torch.qint8)
    reference, patched, report = pair(model)
    mlps = [e for e in report.skipped if e.part == "mlp"]
    assert len(mlps) == DEPTH
    assert all("mlp holds (torch.ao.nn.quantized.dynamic.modules.linear.Linear, GELU" in e.detail for e in mlps)
    with torch.no_grad():
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    # the checks every adapter shares name it the same way ("mlp.fc1 is Linear, not nn.Linear" before)
    from fastvit.patching.checks import exact_type

    (reason,) = exact_type(model.encoder.layers[0].mlp[0], "mlp.fc1", (nn.Linear,), "nn.Linear")
    assert reason.startswith("mlp.fc1 is torch.ao.nn.quantized.dynamic.modules.linear.Linear, not")
