"""Hugging Face's Swin (V1) patched: each ``SwinLayer``'s LayerNorm+MLP half,
``residual + dropout(mlp(layernorm_after(h)))``, is one fastvit.layernorm_mlp call
(fastvit.nn.hf_layers.FusedSwinLayer, its window attention half Hugging Face's, line for line), and
the attention is routed through transformers' AttentionInterface (test_transformers_interface).
Outputs and every gradient by the tolerance rule against the unpatched model in float64, on shifted
and padded maps; drop path in training (the attention half's, Hugging Face's draws); hidden dropout
and hooks run Hugging Face's modules; unpatch; torch.compile; torch.export; the Triton kernels in
the interpreter.

A tiny Swin: 2 x 2 patches, dim 32, two stages of two layers (2 and 4 heads), 4 x 4 windows; no
downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLogits,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    pair,
    perturb_,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from transformers.models.swin.modeling_swin import SwinLayer  # noqa: E402

from fastvit.nn.hf_layers import FusedSwinLayer  # noqa: E402

LAYERS = 4


def build(**overrides) -> torch.nn.Module:
    args = dict(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
                num_labels=5)  # fmt: skip
    return HFLogits(perturb_(T.SwinForImageClassification(T.SwinConfig(**(args | overrides))))).eval()


def images(size: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, SwinLayer)]


@pytest.mark.parametrize("size", [32, 20], ids=["shifted", "padded"])
def test_matches_unpatched_by_the_rule(size, op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert [type(layer) for layer in layers(patched)] == [FusedSwinLayer] * LAYERS
    assert_matches_by_the_rule(reference, patched, images(size))
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == LAYERS and calls[0]["args"][1] is layers(patched)[0].layernorm_after.weight


def test_training_with_drop_path_and_dropout_fallback(op_calls, fresh_warnings):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=3, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS
    op_calls["layernorm_mlp"].clear()
    reference, patched, report = pair(build(hidden_dropout_prob=0.1))
    assert sum("hidden dropout 0.1" in e.detail for e in report.replaced) == LAYERS
    with pytest.warns(fastvit.FastvitFallbackWarning, match="SwinLayer has hidden dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0)
    assert not op_calls["layernorm_mlp"]


def test_hooks_run_hugging_face_modules(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        layers(model)[1].mlp.fc1.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.fc1"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1


class TestSwinChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(lambda batch: images(batch=batch))
    triton_inputs = staticmethod(lambda: images(20, batch=1))  # a padded map
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op, calls = "layernorm_mlp", LAYERS
