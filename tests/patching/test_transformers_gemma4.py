"""Hugging Face's Gemma 4 vision tower patched: its attention goes through transformers'
``AttentionInterface`` (routed to fastvit), and each ``Gemma4VisionEncoderLayer``'s pre-MLP RMS norm
and GELU-tanh gated MLP are one fastvit.layernorm_mlp call (fastvit.nn.hf_gemma4; the "sandwich"'s
post-MLP norm and the residual stay Hugging Face's). Outputs and every gradient by the tolerance rule
against the unpatched model in float64, on a full and a padded patch batch; a hook on the MLP and
clamped linears run Hugging Face's modules; unpatch; torch.compile; torch.export; the Triton kernels
in the interpreter.

A tiny tower: 4 px patches on a 4 x 4 grid (a second image 3 x 2, padded), dim 64, 2 heads of 32,
two layers, 2 x 2 pooling; no downloads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_, unfused_embeddings_only
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.gemma4")

from transformers.models.gemma4 import configuration_gemma4, modeling_gemma4  # noqa: E402

from fastvit.nn import hf_gemma4  # noqa: E402

LAYERS, PATCH, GRID = 2, 4, 4


class Gemma4Patches(nn.Module):
    """``Gemma4VisionModel`` on (B, 16, 48) patches: the first image a full 4 x 4 grid, any other a
    3 x 2 grid padded to 16 (position (-1, -1)); returns its pooled soft tokens (valid ones only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        positions = torch.full((patches.shape[0], GRID * GRID, 2), -1, dtype=torch.long)
        for b, (h, w) in enumerate([(GRID, GRID)] + [(3, 2)] * (patches.shape[0] - 1)):
            xy = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy"), -1).reshape(-1, 2)
            positions[b, : h * w] = xy
        return self.model(patches, positions).last_hidden_state


def build(**overrides) -> nn.Module:
    args = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=2,
                num_key_value_heads=2, head_dim=32, patch_size=PATCH, pooling_kernel_size=2,
                position_embedding_size=16)  # fmt: skip
    model = modeling_gemma4.Gemma4VisionModel(configuration_gemma4.Gemma4VisionConfig(**(args | overrides)))
    return Gemma4Patches(perturb_(model)).eval()


def patches(batch: int) -> torch.Tensor:
    return torch.rand(batch, GRID * GRID, 3 * PATCH * PATCH, generator=torch.Generator().manual_seed(batch))


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert all(type(layer) is hf_gemma4.FusedGemma4VisionEncoderLayer for layer in patched.model.encoder.layers)
    assert_matches_by_the_rule(reference, patched, patches(2))  # the second image padded
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == LAYERS
    assert all(c["kwargs"]["norm"] == "rms" and c["kwargs"]["activation"] == "gelu_tanh" and not c["kwargs"]["residual"]
               and c["kwargs"]["fc1_gate_weight"] is not None for c in calls)  # fmt: skip
    assert len(op_calls["flash_attention"]) == LAYERS


def test_a_hook_on_the_mlp_runs_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        model.model.encoder.layers[1].mlp.gate_proj.register_forward_hook(lambda m, args, out: out * 2)
    x = patches(2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.gate_proj"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1


def test_clamped_linears_are_left_to_hugging_face():
    report = fastvit.patch(build(use_clipped_linears=True))
    assert report.counts() == {"attention": LAYERS}
    skipped = [e for e in report.skipped if e.part == "mlp"]
    assert len(skipped) == LAYERS and all("clamps its input and output" in e.detail for e in skipped)


class TestGemma4Checks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(patches)
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS
