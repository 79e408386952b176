"""The Hugging Face encoder layers still in ViT's 4.x layout (fastvit.nn.hf_intermediate_output: DPT's
``DPTViTLayer``, YOLOS's ``YolosLayer``, VideoMAE's ``VideoMAELayer``), whose MLP half is two modules,
``output(intermediate(layernorm_after(h)), h)``: one fastvit.layernorm_mlp call. That the three are one
layout is checked against the installed transformers' source (layer, intermediate and output
forwards); each family's tiny model patched matches the unpatched one by the tolerance rule (outputs
and every gradient, float64 oracle); hidden dropout in training and hooks run Hugging Face's modules;
an activation the op lacks is reported; unpatch, torch.compile, torch.export and the Triton kernels
in the interpreter on DPT.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    layer_skips,
    pair,
    perturb_,
    source_lines,
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_intermediate_output  # noqa: E402

LAYERS = 2
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32,
            patch_size=8)  # fmt: skip
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
# family -> (model class, config overrides, inputs)
FAMILIES = {
    "dpt": ("DPTModel", {}, IMAGES),
    "yolos": ("YolosModel", dict(num_detection_tokens=3, image_size=[32, 32]), IMAGES),
    "videomae": ("VideoMAEModel", dict(num_frames=2, tubelet_size=2),
                 torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))),
}


def build(family: str, **overrides) -> torch.nn.Module:
    name, args, _ = FAMILIES[family]
    cls = getattr(T, name)
    return HFLastHiddenState(perturb_(cls(cls.config_class(**{**TINY, **args, **overrides})))).eval()


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    originals = tuple(hf_intermediate_output.INTERMEDIATE_OUTPUT_FAMILIES)
    return [m for m in model.modules() if isinstance(m, originals)]


def test_the_families_are_one_layout():
    """Each layer, intermediate and output forward is VideoMAE's, line for line (the fused forward
    copies VideoMAE's attention half)."""
    from transformers.models.videomae.modeling_videomae import VideoMAEIntermediate, VideoMAELayer, VideoMAEOutput

    for layer, (intermediate, output) in hf_intermediate_output.INTERMEDIATE_OUTPUT_FAMILIES.items():
        for ours, reference in ((layer, VideoMAELayer), (intermediate, VideoMAEIntermediate), (output, VideoMAEOutput)):
            prefix = ours.__name__.removesuffix(reference.__name__.removeprefix("VideoMAE"))
            assert source_lines(ours.forward, prefix) == source_lines(reference.forward, "VideoMAE"), ours
        fused = hf_intermediate_output.INTERMEDIATE_OUTPUT_LAYERS[layer]
        assert fused.fastvit_original() is layer and getattr(hf_intermediate_output, fused.__name__) is fused


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(family, op_calls):
    reference, patched, report = pair(build(family))
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert all(type(m).__name__ == f"Fused{type(r).__name__}" for m, r in zip(layers(patched), layers(reference),
                                                                               strict=True))  # fmt: skip
    assert_matches_by_the_rule(reference, patched, FAMILIES[family][2])
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == LAYERS and calls[0]["kwargs"]["activation"] == "gelu"
    assert calls[0]["args"][3] is layers(patched)[0].intermediate.dense.weight


def test_hidden_dropout_in_training_runs_hugging_face(op_calls, fresh_warnings):
    reference, patched, report = pair(build("dpt", hidden_dropout_prob=0.2))
    assert sum("hidden dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    with pytest.warns(fastvit.FastvitFallbackWarning, match="DPTViTLayer has MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), IMAGES, seed=0)
    assert not op_calls["layernorm_mlp"]


def test_hooks_and_activations(op_calls, fresh_warnings):
    reference, patched, _ = pair(build("yolos"))
    for model in (reference, patched):
        layers(model)[1].output.dense.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on output.dense"):
        torch.testing.assert_close(patched(IMAGES), reference(IMAGES), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1
    report = fastvit.patch(build("videomae", hidden_act="relu"))
    assert [e.part for e in layer_skips(report)] == ["mlp"] * LAYERS
    assert "intermediate.intermediate_act_fn is ReLU" in layer_skips(report)[0].detail


class TestDPTChecks(ModelChecks):
    build = staticmethod(lambda: build("dpt"))
    inputs = staticmethod(lambda batch: IMAGES[:batch])
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op, calls = "layernorm_mlp", LAYERS
