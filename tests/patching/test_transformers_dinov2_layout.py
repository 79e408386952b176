"""The Hugging Face encoder layers that are DINOv2's line for line (fastvit.nn.hf_layers.DINOV2_LAYOUT_FAMILIES:
NVIDIA's C-RADIO, EoMT, TIPSv2's image tower, VidEoMT): each layer's LayerNorm+MLP half with its
LayerScale is one fastvit.layernorm_mlp call, the plain MLP or the SwiGLU FFN (``use_swiglu_ffn``,
gated), by ``FusedDinov2Layer``'s / ``FusedDinov2GatedLayer``'s forward on fused classes of the
family's own. That the layers are DINOv2's is checked against the installed transformers' source
(forward, MLP, SwiGLU FFN, LayerScale, drop path); stacks of two layers of each family, both MLP
kinds, match the unpatched ones by the tolerance rule (outputs and every gradient, float64 oracle);
drop path in training runs Hugging Face's modules; a layer whose MLP is swapped for the other kind
is fused anew as that kind; the Triton kernels in the interpreter on one family.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    pair,
    perturb_,
    source_lines,
)

T = pytest.importorskip("transformers")

from transformers.models.dinov2 import modeling_dinov2 as dinov2  # noqa: E402

from fastvit.nn import hf_layers  # noqa: E402

LAYERS = 2
# family -> (module, layer class, config class)
FAMILIES = {
    "radio": ("radio", "RadioLayer", "RadioConfig"),
    "eomt": ("eomt", "EomtLayer", "EomtConfig"),
    "tipsv2": ("tipsv2", "Tipsv2VisionLayer", "Tipsv2VisionConfig"),
    "videomt": ("videomt", "VideomtLayer", "VideomtConfig"),
}
TOKENS = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))


class LayerStack(torch.nn.Module):
    """Two of a family's layers on (B, N, D) tokens (each called as its encoder calls it)."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, None)
        return x


def build(family: str, **config_args) -> torch.nn.Module:
    module, layer, config = FAMILIES[family]
    configs = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    cfg = getattr(configs, config)(**{"hidden_size": 32, "num_attention_heads": 2, "layerscale_value": 0.5,
                                      **config_args})  # fmt: skip
    cfg._attn_implementation = "sdpa"
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), layer)
    return LayerStack(perturb_(torch.nn.ModuleList([cls(cfg) for _ in range(LAYERS)]))).eval()


@pytest.mark.parametrize("layer", list(hf_layers.DINOV2_LAYOUT_FAMILIES), ids=lambda c: c.__name__)
def test_the_families_are_dinov2_line_for_line(layer):
    parts = hf_layers.DINOV2_LAYOUT_FAMILIES[layer]
    references = (dinov2.Dinov2Layer, dinov2.Dinov2MLP, dinov2.Dinov2SwiGLUFFN, dinov2.Dinov2LayerScale,
                  dinov2.Dinov2DropPath)  # fmt: skip
    for ours, reference in zip((layer, *parts), references, strict=True):
        assert source_lines(ours.forward, ours.__name__) == source_lines(reference.forward, reference.__name__), ours
    plain, gated = hf_layers.DINOV2_LAYOUT_LAYERS[layer]
    assert plain.fastvit_original() is gated.fastvit_original() is layer
    assert getattr(hf_layers, plain.__name__) is plain and getattr(hf_layers, gated.__name__) is gated


@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(family, gated, op_calls):
    reference, patched, report = pair(build(family, use_swiglu_ffn=gated))
    assert report.counts()["mlp"] == LAYERS
    original = next(iter(type(m) for m in reference.modules() if type(m) in hf_layers.DINOV2_LAYOUT_FAMILIES))
    fused = hf_layers.DINOV2_LAYOUT_LAYERS[original][int(gated)]
    assert [type(m) for m in patched.layers] == [fused] * LAYERS
    assert_matches_by_the_rule(reference, patched, TOKENS)
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == LAYERS
    assert calls[0]["kwargs"]["layer_scale"] is patched.layers[0].layer_scale2.lambda1
    assert ("fc1_gate_weight" in calls[0]["kwargs"]) == gated


def test_drop_path_in_training_runs_hugging_face(op_calls, fresh_warnings):
    reference, patched, report = pair(build("radio", drop_path_rate=0.5))
    assert sum("drop path 0.5" in e.detail for e in report.replaced) == LAYERS
    with pytest.warns(fastvit.FastvitFallbackWarning, match="RadioLayer has hidden dropout or drop path"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), TOKENS, seed=0)
    assert not op_calls["layernorm_mlp"]


def test_an_mlp_swapped_for_the_other_kind_is_fused_anew_as_that_kind():
    from transformers.models.eomt.modeling_eomt import EomtConfig, EomtSwiGLUFFN

    model = build("eomt")
    fastvit.patch(model)
    model.layers[1].mlp = EomtSwiGLUFFN(EomtConfig(hidden_size=32, num_attention_heads=2))
    report = fastvit.patch(model)
    plain, gated = hf_layers.DINOV2_LAYOUT_LAYERS[model.layers[0].fastvit_original()]
    assert [type(m) for m in model.layers] == [plain, gated] and report.counts()["mlp"] == 1


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build("radio", use_swiglu_ffn=True))
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, TOKENS[:1])
    assert len(op_calls["layernorm_mlp"]) == LAYERS
