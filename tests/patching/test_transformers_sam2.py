"""The layers of Hugging Face's SAM 2 and SAM 3 image encoders patched (fastvit.nn.hf_layers): their
attention goes through transformers' ``AttentionInterface`` (routed to fastvit), and the
LayerNorm+MLP half of each SAM 2 Hiera block (``Sam2MultiScaleBlock``: query pooling and a widened
residual at a stage's first block, windows, global blocks) and of each SAM 3 ViT layer
(``Sam3ViTLayer``: RoPE, windows with padding, hidden dropout and its MLP's dropout) is one
fastvit.layernorm_mlp call over the (B, H, W, C) map. Outputs and every gradient by the tolerance
rule against the unpatched model in float64; dropout in training runs Hugging Face's modules; an
MLP the op cannot compute is reported; hooks; unpatch; torch.compile; torch.export; the Triton kernels in the
interpreter.

Tiny encoders, no downloads: a four-stage Hiera (dims 16-128, 64 px images) and a three-layer SAM 3
ViT (dim 32, 8 x 8 patches, windows of 3 and a global layer).
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_layers  # noqa: E402

HIERA_BLOCKS, VIT_LAYERS = 6, 3


def hiera(**overrides) -> torch.nn.Module:
    """SAM 2's Hiera: stages of 1, 2, 2, 1 blocks (query pooling at three stage changes), windows of
    4, 4, 3 (the 8 x 8 map of stage three padded to 9 x 9), 2; block 4 global."""
    args = dict(hidden_size=16, num_attention_heads=1, image_size=[64, 64], blocks_per_stage=[1, 2, 2, 1],
                embed_dim_per_stage=[16, 32, 64, 128], num_attention_heads_per_stage=[1, 2, 2, 4],
                window_size_per_stage=[4, 4, 3, 2], global_attention_blocks=[4],
                window_positional_embedding_background_size=[4, 4])  # fmt: skip
    return HFLastHiddenState(perturb_(T.Sam2HieraDetModel(T.Sam2HieraDetConfig(**(args | overrides))))).eval()


def sam3_vit(**overrides) -> torch.nn.Module:
    args = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=VIT_LAYERS, num_attention_heads=2,
                image_size=32, patch_size=4, window_size=3, global_attn_indexes=[2],
                pretrain_image_size=16)  # fmt: skip
    return HFLastHiddenState(perturb_(T.Sam3ViTModel(T.Sam3ViTConfig(**(args | overrides))))).eval()


MODELS = {"sam2_hiera": (hiera, 64, HIERA_BLOCKS, "FusedSam2MultiScaleBlock"),
          "sam3_vit": (sam3_vit, 32, VIT_LAYERS, "FusedSam3ViTLayer")}  # fmt: skip


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    build, size, layers, fused = MODELS[name]
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": layers, "mlp": layers} and unfused_embeddings_only(report)
    assert sum(type(m).__name__ == fused for m in patched.modules()) == layers
    assert_matches_by_the_rule(reference, patched, images(size))
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == layers and all(call["args"][0].dim() == 4 for call in calls)  # (B, H, W, C) maps
    if name == "sam2_hiera":  # the widths grow stage by stage: 16, 32, 64, 128
        assert [call["args"][0].shape[-1] for call in calls] == [16, 32, 32, 64, 64, 128]


def test_sam3_dropout_in_training_runs_hugging_face(op_calls, fresh_warnings):
    reference, patched, report = pair(sam3_vit(hidden_dropout=0.1))
    assert sum("hidden dropout 0.1 and MLP dropout 0.1" in e.detail for e in report.replaced) == VIT_LAYERS
    with pytest.warns(fastvit.FastvitFallbackWarning, match="Sam3ViTLayer has hidden dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(32), seed=0)
    assert not op_calls["layernorm_mlp"]
    # the MLP's own dropout alone (after fc1) also runs Hugging Face's modules
    reference, patched, _ = pair(sam3_vit())
    for model in (reference, patched):
        for layer in model.model.layers:
            layer.mlp.dropout.p = 0.2
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(32), seed=0)
    assert not op_calls["layernorm_mlp"]
    assert_outputs_and_grads_match(reference.eval(), patched.eval(), images(32))  # eval: fused again
    assert len(op_calls["layernorm_mlp"]) == VIT_LAYERS


def test_an_mlp_the_op_cannot_compute_is_reported(op_calls):
    model = hiera()
    model.model.blocks[2].mlp.layers.append(torch.nn.Linear(128, 128))  # a third layer: act between each
    model.model.blocks[2].mlp.num_layers = 3
    reference, patched, report = pair(model)
    embedding, skip = report.skipped  # Hiera's overlapping patch conv (named), then the MLP
    assert embedding.part == "patch_embed"
    assert skip.path == "model.blocks.2" and "mlp has 1 hidden layers" in skip.detail
    assert_outputs_and_grads_match(reference, patched, images(64))
    assert len(op_calls["layernorm_mlp"]) == HIERA_BLOCKS - 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hooks(name, op_calls):
    build, size, layers, _ = MODELS[name]
    reference, patched, _ = pair(build())
    fc1 = "proj_in" if name == "sam2_hiera" else "fc1"
    for model in (reference, patched):
        block = [m for m in model.modules() if hasattr(m, "layer_norm2")][1]
        getattr(block.mlp, fc1).register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match=f"a hook on mlp.{fc1}"):
        torch.testing.assert_close(patched(images(size)), reference(images(size)), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == layers - 1


def test_fused_classes_are_the_layer_table_entries():
    assert hf_layers.FUSED_LAYERS[T.models.sam2.modeling_sam2.Sam2MultiScaleBlock] is hf_layers.FusedSam2MultiScaleBlock
    assert hf_layers.FUSED_LAYERS[T.models.sam3.modeling_sam3.Sam3ViTLayer] is hf_layers.FusedSam3ViTLayer
    assert "mlp.dropout" in hf_layers.FusedSam3ViTLayer.fastvit_bypassed


class TestHieraChecks(ModelChecks):
    build = staticmethod(hiera)
    inputs = staticmethod(lambda batch: images(64, batch))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op, calls = "layernorm_mlp", HIERA_BLOCKS


class TestSam3ViTChecks(ModelChecks):
    build = staticmethod(sam3_vit)
    inputs = staticmethod(lambda batch: images(32, batch))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op, calls = "layernorm_mlp", VIT_LAYERS
