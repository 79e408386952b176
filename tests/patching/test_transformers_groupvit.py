"""Hugging Face's GroupViT patched: its ``GroupViTAttention`` computes its scores in its own forward
(CLIP's projections) as the vision stages' self-attention, the token assignment's cross-attention
from the group tokens to the image tokens, and the text tower's causal self-attention (an additive
causal and padding mask). Each is swapped (fastvit.nn.hf_self_attention.FusedGroupViTAttention: one
fastvit.flash_attention call); the encoder layers' LayerNorm+MLP halves are CLIP's layout, and so is
the cross-attention layer's before each assignment (fastvit.nn.hf_layers.FusedGroupViTCrossAttentionLayer),
one fastvit.layernorm_mlp call each. The image and text embeddings, every gradient of the image tower and
the text tower's output by the tolerance rule against the unpatched model in float64 (the text padded);
the attention weights captured, dropout in training and masks Hugging Face adds as they are run
Hugging Face's forward; the hard group assignment (a Gumbel-softmax over groups) is reported as left
alone; unpatch; the Triton kernels in the interpreter.

A tiny GroupViT: 16 px images in 4 px patches (16 image tokens, 4 group tokens assigned to 4
output groups), 9 text tokens, dim 32, 2 heads; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_

T = pytest.importorskip("transformers")

from fastvit.nn import hf_self_attention  # noqa: E402

TOKENS = 9
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100,
            max_position_embeddings=16)  # fmt: skip
VISION = dict(hidden_size=32, intermediate_size=64, depths=[1, 1], num_hidden_layers=2, num_group_tokens=[4, 0],
              num_output_groups=[4, 4], num_attention_heads=2, image_size=16, patch_size=4)  # fmt: skip


def groupvit(**vision_args) -> nn.Module:
    config = T.GroupViTConfig(text_config=TEXT, vision_config=VISION | vision_args, projection_dim=16,
                              projection_intermediate_dim=32)  # fmt: skip
    return perturb_(T.GroupViTModel(config)).eval()


class ImageTower(nn.Module):
    """GroupViT's vision model: its pooled output (B, D), through both stages and the assignment."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=x).pooler_output


class TextTower(nn.Module):
    """GroupViT's text model on token ids given as floats (the rule's inputs are floats), the second
    text padded after 6 tokens: its last hidden state (B, 9, D)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        mask = torch.ones(2, TOKENS, dtype=torch.long)
        mask[1, 6:] = 0
        self.register_buffer("attention_mask", mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        out = self.model.text_model(input_ids=ids, attention_mask=self.attention_mask[: ids.shape[0]])
        return out.last_hidden_state


IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 100, (2, TOKENS), generator=torch.Generator().manual_seed(1))


def test_image_tower_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(ImageTower(groupvit()))
    counts = report.counts()
    # vision and text self-attention, the assignment's; the encoder layers' and the cross-attention layer's MLPs
    assert counts == {"attention": 2 + 1 + 2, "mlp": 2 + 2 + 1}
    assign = [e for e in report.skipped if e.part == "attention"]
    assert [e.where.rsplit(".", 1)[-1] for e in assign] == ["assign"]  # the hard group assignment, said
    assert not [e for e in report.skipped if e.part == "mlp"]
    assert_matches_by_the_rule(reference, patched, IMAGES)
    shapes = [call["args"][0].shape for call in op_calls["flash_attention"]]
    assert shapes == [(2, 2, 20, 16), (2, 2, 4, 16), (2, 2, 4, 16)]  # 16 + 4 tokens; 4 groups over 16; the groups
    mlp_shapes = [call["args"][0].shape for call in op_calls["layernorm_mlp"]]
    assert mlp_shapes == [(2, 20, 32), (2, 4, 32), (2, 4, 32)]  # stage 1; the 4 groups after their cross-attention
    layer = patched.model.vision_model.encoder.stages[0].downsample.pre_assign_attn
    assert type(layer).__name__ == "FusedGroupViTCrossAttentionLayer"
    assert op_calls["layernorm_mlp"][1]["args"][3] is layer.mlp.fc1.weight


def test_text_tower_matches_unpatched_with_its_causal_padding_mask(op_calls):
    reference, patched, _ = pair(TextTower(groupvit()))
    assert_matches_by_the_rule(reference, patched, IDS.float())  # every parameter's gradient too
    assert len(op_calls["flash_attention"]) == 2
    mask = op_calls["flash_attention"][0]["kwargs"]["attn_mask"]
    assert mask.shape == (2, 1, TOKENS, TOKENS) and mask.is_floating_point()


def test_weights_captured_and_dropout_run_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair(groupvit())
    want = reference.text_model(input_ids=IDS, output_attentions=True).attentions
    got = patched.text_model(input_ids=IDS, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"]
    model = groupvit(attention_dropout=0.2)
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    model.train(), patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        torch.manual_seed(3)
        got = patched.vision_model(pixel_values=IMAGES).pooler_output
    torch.manual_seed(3)
    torch.testing.assert_close(got, model.vision_model(pixel_values=IMAGES).pooler_output, rtol=1e-5, atol=1e-5)
    assert not op_calls["flash_attention"]


def test_a_mask_hugging_face_would_refuse_runs_hugging_face(op_calls):
    _, patched, _ = pair(groupvit())
    attention = patched.text_model.encoder.layers[0].self_attn
    assert type(attention) is hf_self_attention.FusedGroupViTAttention
    x = torch.randn(2, TOKENS, 32)
    with pytest.raises(ValueError, match="Attention mask should be of size"):
        attention(x, attention_mask=torch.zeros(2, TOKENS, TOKENS))
    assert not op_calls["flash_attention"]


def test_unpatch_restores_hugging_faces_classes():
    model = groupvit()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    fastvit.unpatch(patched)
    assert [type(m) for m in patched.modules()] == [type(m) for m in model.modules()]


def test_torch_compile(op_calls):
    """The image tower compiled (its fused attentions, encoder layers and cross-attention layer)."""
    torch._dynamo.reset()
    reference, patched, _ = pair(ImageTower(groupvit()))
    compiled = torch.compile(patched, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(IMAGES), reference(IMAGES), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == 3 and len(op_calls["layernorm_mlp"]) == 3


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(ImageTower(groupvit()))
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, IMAGES[:1])
    assert len(op_calls["flash_attention"]) == 3
