"""Hugging Face's FLAVA patched: its image, text and multimodal encoders are pre-norm BERT layers in
ViT's 4.x layout whose ``FlavaSelfAttention`` computes its scores in its own forward, an additive
mask added to them. The attention is swapped (fastvit.nn.hf_self_attention.FusedFlavaSelfAttention:
one fastvit.flash_attention call, the mask as ``attn_mask``); each ``FlavaLayer``'s LayerNorm+MLP half
is one fastvit.layernorm_mlp call (fastvit.nn.hf_intermediate_output.FusedFlavaLayer). Outputs and
every gradient by the tolerance rule against the unpatched model in float64, through all three
encoders with padded text; a bool mask (which Hugging Face adds to the scores as 0 / 1), attention
weights requested and attention dropout in training run Hugging Face's forward; unpatch;
torch.compile; torch.export; the Triton kernels in the interpreter.

A tiny FLAVA: 16 px images in 4 px patches, 9 text tokens (the second text padded after 6), dim 32,
2 heads, two layers per encoder; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_intermediate_output, hf_self_attention  # noqa: E402

LAYERS = 2  # per encoder
TOKENS = 9
ENCODER = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64)


def flava_config(**overrides) -> T.FlavaConfig:
    return T.FlavaConfig(
        image_config=ENCODER | dict(image_size=16, patch_size=4) | overrides,
        text_config=ENCODER | dict(vocab_size=100, max_position_embeddings=TOKENS) | overrides,
        multimodal_config=ENCODER | overrides,
        hidden_size=32,
        projection_dim=16,
    )


class FlavaMultimodal(nn.Module):
    """``FlavaModel`` on a batch of images and fixed token ids, the second text padded: returns the
    multimodal encoder's output (B, 1 + patches + 1 + tokens, D), which reads all three encoders."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        ids = torch.randint(0, 100, (4, TOKENS), generator=torch.Generator().manual_seed(0))
        self.register_buffer("input_ids", ids)
        mask = torch.ones(4, TOKENS, dtype=torch.long)
        mask[1, 6:] = 0
        self.register_buffer("text_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        out = self.model(pixel_values=x, input_ids=self.input_ids[:batch], attention_mask=self.text_mask[:batch])
        return out.multimodal_embeddings


def build(**overrides) -> nn.Module:
    return FlavaMultimodal(perturb_(T.FlavaModel(flava_config(**overrides)))).eval()


def image_model(**overrides) -> nn.Module:
    config = T.FlavaImageConfig(**ENCODER, image_size=16, patch_size=4, **overrides)
    return HFLastHiddenState(perturb_(T.FlavaImageModel(config))).eval()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": 3 * LAYERS, "mlp": 3 * LAYERS} and unfused_embeddings_only(report)
    kinds = {type(m) for m in patched.modules()}
    assert {hf_self_attention.FusedFlavaSelfAttention, hf_intermediate_output.FusedFlavaLayer} <= kinds
    assert_matches_by_the_rule(reference, patched, images(2))
    calls = op_calls["flash_attention"]
    assert len(calls) == len(op_calls["layernorm_mlp"]) == 3 * LAYERS
    masks = [call["kwargs"].get("attn_mask") for call in calls]
    assert sum(mask is None for mask in masks) == LAYERS  # the image encoder's; text and multimodal: padded
    text_mask = next(mask for mask in masks if mask is not None)  # (B, 1, N, N), finfo.min at the padding
    assert text_mask.dtype == torch.float32 and text_mask.shape == (2, 1, TOKENS, TOKENS)
    assert (text_mask[1, :, :, 6:] < -1e30).all() and not text_mask[0].any()


def test_a_floating_mask_on_the_image_model_is_added(op_calls):
    reference, patched, _ = pair(image_model())
    x = images(2)
    bias = torch.randn(2, 1, 17, 17, generator=torch.Generator().manual_seed(3))  # the CLS token and 16 patches
    expected = reference.model(pixel_values=x, attention_mask=bias).last_hidden_state
    torch.testing.assert_close(patched.model(pixel_values=x, attention_mask=bias).last_hidden_state, expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert [call["kwargs"]["attn_mask"] is bias for call in op_calls["flash_attention"]] == [True] * LAYERS


def test_a_bool_mask_runs_hugging_face(op_calls):
    # Hugging Face adds the mask to the scores: a bool one as 0 / 1, which the op would read as "may attend"
    reference, patched, _ = pair(image_model())
    x, mask = images(2), torch.rand(17, 17, generator=torch.Generator().manual_seed(4)) > 0.5
    expected = reference.model(pixel_values=x, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(patched.model(pixel_values=x, attention_mask=mask).last_hidden_state, expected,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS


def test_attention_weights_run_hugging_face(op_calls):
    reference, patched, _ = pair(image_model())
    x = images(2)
    expected = reference.model(pixel_values=x, output_attentions=True).attentions
    found = patched.model(pixel_values=x, output_attentions=True).attentions
    assert len(found) == LAYERS
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS


def test_attention_dropout_in_training_runs_hugging_face(op_calls, fresh_warnings):
    model = image_model(attention_probs_dropout_prob=0.1)
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert all("attention dropout 0.1" in entry.detail for entry in report.replaced if entry.part == "attention")
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        patched(images(2)).sum().backward()
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS


class TestFlavaChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(images)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "flash_attention"
    calls = 3 * LAYERS
