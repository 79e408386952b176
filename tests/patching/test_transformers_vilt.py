"""Hugging Face's ViLT patched: its encoder is pre-norm BERT layers in ViT's 4.x layout over the joint
text and image tokens, whose ``ViltSelfAttention`` (FLAVA's line for line) computes its scores in its
own forward, the extended padding mask added to them. The attention is swapped
(fastvit.nn.hf_self_attention.FusedViltSelfAttention: one fastvit.flash_attention call, the mask as
``attn_mask``); each ``ViltLayer``'s LayerNorm+MLP half is one fastvit.layernorm_mlp call
(fastvit.nn.hf_intermediate_output.FusedViltLayer). Outputs and every gradient by the tolerance rule
against the unpatched model in float64, with padded text; attention weights requested and dropout in
training run Hugging Face's forward; the attention is FLAVA's line for line in the installed source;
unpatch; torch.compile; the Triton kernels in the interpreter.

ViLT's embedding samples its image patches at random in every call (eval included): each forward
here draws them from one seed, so both models see the same tokens. A tiny ViLT: 16 px images in 4 px
patches, 9 text tokens (the second text padded after 6), dim 32, 2 heads, two layers; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_, source_lines

T = pytest.importorskip("transformers")

from transformers.models.flava.modeling_flava import FlavaSelfAttention  # noqa: E402
from transformers.models.vilt.modeling_vilt import ViltSelfAttention  # noqa: E402

from fastvit.nn import hf_intermediate_output, hf_self_attention  # noqa: E402

LAYERS = 2
TOKENS = 9


class Vilt(nn.Module):
    """``ViltModel`` on a batch of images and fixed token ids, the second text padded; its patches
    sampled from one seed in every call. Returns the last hidden state (B, tokens + 1 + patches, D)."""

    def __init__(self, **config_args) -> None:
        super().__init__()
        config = T.ViltConfig(
            hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=16,
            patch_size=4, vocab_size=100, max_position_embeddings=16, **config_args,
        )  # fmt: skip
        self.model = perturb_(T.ViltModel(config))
        ids = torch.randint(0, 100, (2, TOKENS), generator=torch.Generator().manual_seed(0))
        self.register_buffer("input_ids", ids)
        mask = torch.ones(2, TOKENS, dtype=torch.long)
        mask[1, 6:] = 0
        self.register_buffer("attention_mask", mask)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> torch.Tensor:
        batch = x.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)  # the embedding's patch sampling
            out = self.model(input_ids=self.input_ids[:batch], attention_mask=self.attention_mask[:batch],
                             pixel_values=x, output_attentions=output_attentions)  # fmt: skip
        return out.attentions if output_attentions else out.last_hidden_state


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(Vilt().eval())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS}
    assert [e.path for e in report.skipped] == ["model.embeddings.patch_embeddings"]  # named, left alone
    kinds = {type(m) for m in patched.modules()}
    assert {hf_self_attention.FusedViltSelfAttention, hf_intermediate_output.FusedViltLayer} <= kinds
    assert_matches_by_the_rule(reference, patched, images())
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == LAYERS
    mask = op_calls["flash_attention"][0]["kwargs"]["attn_mask"]  # the extended padding mask, additive
    assert mask.is_floating_point() and mask.shape[-1] == TOKENS + 1 + 16


def test_the_attention_is_flavas_line_for_line():
    # the fused forward is FLAVA's (one base class): a transformers release changing either fails here
    names = ("ViltSelfAttention", "FlavaSelfAttention")
    vilt, flava = (source_lines(cls.forward, *names) for cls in (ViltSelfAttention, FlavaSelfAttention))
    flava_signature = flava[: flava.index(") -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor]:") + 1]
    assert vilt[0] == "def forward(self, hidden_states, attention_mask=None, output_attentions=False):"
    assert len(flava_signature) == 6
    body = [line.replace("nn.Softmax(dim=-1)(attention_scores)", "nn.functional.softmax(attention_scores, dim=-1)")
            for line in vilt[1:]]  # fmt: skip
    assert body == flava[len(flava_signature):]


def test_attention_weights_and_dropout_run_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair(Vilt().eval())
    expected, found = reference(images(), output_attentions=True), patched(images(), output_attentions=True)
    assert len(found) == len(expected) == LAYERS
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"]
    op_calls["layernorm_mlp"].clear()  # the MLP halves ran fused beside the weights
    model = Vilt(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.2)
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    model.train(), patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        torch.manual_seed(3)
        got = patched(images())
    torch.manual_seed(3)
    torch.testing.assert_close(got, model(images()), rtol=1e-5, atol=1e-5)  # draw for draw
    assert not op_calls["layernorm_mlp"]


def test_unpatch_restores_hugging_faces_classes():
    model = Vilt().eval()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    fastvit.unpatch(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(patched(images()), model(images()))


def test_torch_compile(op_calls):
    torch._dynamo.reset()
    reference, patched, _ = pair(Vilt().eval())
    compiled = torch.compile(patched.model, backend="eager", fullgraph=False)
    ids, mask = patched.input_ids, patched.attention_mask
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        got = compiled(input_ids=ids, attention_mask=mask, pixel_values=images()).last_hidden_state
    torch.testing.assert_close(got, reference(images()), rtol=1e-5, atol=1e-5)
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(Vilt().eval())
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["flash_attention"]) == LAYERS
