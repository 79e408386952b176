"""Hugging Face's SAM vision encoder (and SAM-HQ's, copies of SAM's classes) patched
(fastvit.nn.hf_sam): ``SamVisionAttention`` and ``SamVisionSdpaAttention`` compute their scores
themselves (decomposed relative position), so they are swapped rather than routed through
``attn_implementation``: one fastvit.flash_attention call with the op's ``rel_pos`` tables; and each
``SamVisionLayer``'s LayerNorm+MLP half is one fastvit.layernorm_mlp call. Outputs and every
gradient (the relative position embeddings included) by the tolerance rule against the unpatched
model in float64, on window layers with and without padding and a global layer, for both attention
classes of both families; attention weights (``output_attentions``, transformers' output capture)
and the eager class's attention dropout run Hugging Face's code; hooks; unpatch; torch.compile;
torch.export; the Triton kernels in the interpreter.

The SAM encoders other models copy (DeepSeek-OCR 2, GOT-OCR 2.0, PP-FormulaNet, SLANeXt,
Unlimited-OCR: ``hf_layers.SAM_LAYOUT_FAMILIES``, ``hf_sam.SAM_COPY_ATTENTIONS``) are checked line for
line against SAM's source and, as a stack of a window layer and a global layer, by the rule.

A tiny SAM encoder: 8 x 8 patches of 4 px (32 px images), dim 32, 2 heads, three layers (windows of
3: the 8 x 8 map padded to 9 x 9; then windows of 4; then a global layer); no downloads.
"""

from __future__ import annotations

import importlib

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

from transformers.models.sam.modeling_sam import (  # noqa: E402
    SamMLPBlock,
    SamVisionAttention,
    SamVisionLayer,
    SamVisionSdpaAttention,
)
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionAttention, SamHQVisionLayer  # noqa: E402

from fastvit.nn import hf_layers, hf_sam  # noqa: E402

LAYERS = 3


# family -> (model, config) classes of transformers
FAMILIES = {"sam": ("SamVisionModel", "SamVisionConfig"), "sam_hq": ("SamHQVisionModel", "SamHQVisionConfig")}


def build(attn_implementation: str = "sdpa", windows: tuple[int, ...] = (3, 4), family: str = "sam",
          **overrides) -> torch.nn.Module:
    """Layer i has window ``windows[i]`` (0: global); the layers past ``windows`` are global. The
    relative position embeddings keep the sizes HF built them for (window 4, the 8 x 8 map): the
    window of 3 reads them resized, through Hugging Face's ``get_rel_pos``."""
    args = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32, patch_size=4,
                output_channels=16, mlp_dim=64, window_size=4, global_attn_indexes=[], use_rel_pos=True,
                attn_implementation=attn_implementation)  # fmt: skip
    model_class, config_class = (getattr(T, name) for name in FAMILIES[family])
    config = config_class(**(args | overrides))
    model = model_class(config)
    for layer, window in zip(model.vision_encoder.layers, windows, strict=False):  # HF takes one window size
        layer.window_size = window
    for layer in model.vision_encoder.layers[len(windows):]:
        layer.window_size = 0
    with torch.no_grad():  # HF initialises the embeddings to zeros: make the bias matter
        for attn in attentions(model) if config.use_rel_pos else ():
            attn.rel_pos_h.normal_(0, 0.5)
            attn.rel_pos_w.normal_(0, 0.5)
    return HFLastHiddenState(perturb_(model)).eval()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SamVisionAttention, SamHQVisionAttention))]


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SamVisionLayer, SamHQVisionLayer))]


# family, attention implementation -> (fused attention, fused layer)
FUSED = {
    ("sam", "sdpa"): (hf_sam.FusedSamVisionSdpaAttention, hf_layers.FusedSamVisionLayer),
    ("sam", "eager"): (hf_sam.FusedSamVisionAttention, hf_layers.FusedSamVisionLayer),
    ("sam_hq", "sdpa"): (hf_sam.FusedSamHQVisionSdpaAttention, hf_layers.FusedSamHQVisionLayer),
    ("sam_hq", "eager"): (hf_sam.FusedSamHQVisionAttention, hf_layers.FusedSamHQVisionLayer),
}


@pytest.mark.parametrize("family,implementation", sorted(FUSED), ids=["-".join(k) for k in sorted(FUSED)])
def test_matches_unpatched_by_the_rule(family, implementation, op_calls):
    reference, patched, report = pair(build(implementation, family=family))
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    fused_attention, fused_layer = FUSED[family, implementation]
    assert [type(a) for a in attentions(patched)] == [fused_attention] * LAYERS
    assert [type(layer) for layer in layers(patched)] == [fused_layer] * LAYERS
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["flash_attention"]
    assert len(calls) == LAYERS and len(op_calls["layernorm_mlp"]) == LAYERS
    # windows of 3 over the map padded to 9 x 9: 9 windows an image; the global layer's 8 x 8 map
    rel_h, rel_w = calls[0]["kwargs"]["rel_pos"]
    assert rel_h.shape == (2 * 9, 2, 9, 3) and rel_w.shape == (2 * 9, 2, 9, 3)
    assert calls[2]["kwargs"]["rel_pos"][0].shape == (2, 2, 64, 8)
    mlp = op_calls["layernorm_mlp"][0]
    assert mlp["args"][0].shape == (2, 8, 8, 32) and mlp["kwargs"]["activation"] == "gelu"


def test_without_relative_position(op_calls):
    reference, patched, _ = pair(build(use_rel_pos=False))
    assert_outputs_and_grads_match(reference, patched, images())
    assert all(call["kwargs"]["rel_pos"] is None for call in op_calls["flash_attention"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attention_weights_run_hugging_face(family, op_calls):
    """Weights asked for: transformers' output capture records them from the attention modules'
    outputs (hooks it installs on the first such call); the fused attention then runs Hugging
    Face's forward, which computes them (eager) or returns None (SDPA: nothing is recorded), as
    unpatched."""
    for implementation in ("eager", "sdpa"):
        reference, patched, _ = pair(build(implementation, family=family))
        want = reference.model(pixel_values=images(), output_attentions=True)
        got = patched.model(pixel_values=images(), output_attentions=True)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
        assert len(got.attentions) == len(want.attentions) == (LAYERS if implementation == "eager" else 0)
        for a, b in zip(got.attentions, want.attentions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS  # the MLPs: fused
        op_calls["layernorm_mlp"].clear()
        # the capture hooks stay installed, inactive: the next plain call runs the op again
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
        assert len(op_calls["flash_attention"]) == LAYERS
        op_calls["flash_attention"].clear()
        op_calls["layernorm_mlp"].clear()


def test_eager_attention_dropout_runs_hugging_face_in_training(op_calls, fresh_warnings):
    reference, patched, report = pair(build("eager", attention_dropout=0.2))
    assert sum("attention dropout 0.2" in e.detail for e in report.replaced) == LAYERS
    with pytest.warns(fastvit.FastvitFallbackWarning, match="SamVisionAttention"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0)
    assert not op_calls["flash_attention"] and len(op_calls["layernorm_mlp"]) == LAYERS
    # the SDPA class never drops: the op runs in training too
    op_calls["layernorm_mlp"].clear()
    reference, patched, report = pair(build("sdpa", attention_dropout=0.2))
    assert not any("attention dropout" in e.detail for e in report.replaced)
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == LAYERS


def test_hooks(op_calls):
    # a hook on an MLP layer added after patching: that layer's half runs Hugging Face's modules
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        layers(model)[1].mlp.lin1.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.lin1"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1
    # a hook on the MLP at patch time: that layer is left alone, with why
    model = build()
    layers(model)[0].mlp.act.register_forward_hook(lambda *args: None)
    report = fastvit.patch(model)
    (skip,) = layer_skips(report)
    assert skip.path.endswith("layers.0") and "mlp.act has a forward hook" in skip.detail
    # hooks on the projections (called as modules) and on the attention itself run
    _, patched, _ = pair(build())
    seen = []
    attentions(patched)[0].qkv.register_forward_hook(lambda *args: seen.append("qkv"))
    attentions(patched)[0].register_forward_hook(lambda *args: seen.append("attn"))
    patched(images())
    assert seen == ["qkv", "attn"]


class TestSamChecks(ModelChecks):
    build = staticmethod(build)
    inputs = staticmethod(lambda batch: images(batch=batch))
    export_ops = frozenset({"fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"})
    counted_op, calls = "flash_attention", LAYERS


def _same_source(cls: type, reference: type, *methods: str) -> None:
    for method in methods:
        assert source_lines(getattr(cls, method), cls.__name__) == source_lines(
            getattr(reference, method), reference.__name__
        ), f"{cls.__name__}.{method}"


@pytest.mark.parametrize("layer", list(hf_layers.SAM_LAYOUT_FAMILIES), ids=lambda c: c.__name__)
def test_the_copies_are_sam_line_for_line(layer):
    _same_source(layer, SamVisionLayer, "forward", "window_partition", "window_unpartition")
    _same_source(hf_layers.SAM_LAYOUT_FAMILIES[layer], SamMLPBlock, "__init__", "forward")
    fused = hf_layers.SAM_LAYOUT_LAYERS[layer]
    assert fused.fastvit_original() is layer and getattr(hf_layers, fused.__name__) is fused


@pytest.mark.parametrize("attention", list(hf_sam.SAM_COPY_ATTENTIONS), ids=lambda c: c.__name__)
def test_the_copied_attentions_are_sam_line_for_line(attention):
    _same_source(attention, SamVisionAttention, "__init__", "forward", "get_rel_pos", "get_decomposed_rel_pos")
    sdpa = hf_sam.SAM_COPY_ATTENTIONS[attention]
    if sdpa is not None:
        _same_source(sdpa, SamVisionSdpaAttention, "__init__", "forward")
    for original in (attention, sdpa) if sdpa is not None else (attention,):
        fused = hf_sam.SAM_COPY_FUSED[original]
        assert fused.fastvit_original() is original and getattr(hf_sam, fused.__name__) is fused
        assert fused.drops_attention == (original is attention)


class MapStack(torch.nn.Module):
    """A window layer (windows of 3 over the padded 8 x 8 map) and a global layer of one of the
    copies, on (B, H, W, C) maps."""

    def __init__(self, module: str, prefix: str, config: str, implementation: str) -> None:
        super().__init__()
        modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        configs = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
        cfg = getattr(configs, config)(hidden_size=32, num_attention_heads=2, mlp_dim=64, image_size=32, patch_size=4,
                                       window_size=3, use_rel_pos=True)  # fmt: skip
        cfg._attn_implementation = implementation
        layer = getattr(modeling, f"{prefix}VisionLayer")
        self.layers = torch.nn.ModuleList([layer(cfg, window_size=3), layer(cfg, window_size=0)])
        with torch.no_grad():  # HF initialises the embeddings to zeros: make the bias matter
            for stacked in self.layers:
                stacked.attn.rel_pos_h.normal_(0, 0.5)
                stacked.attn.rel_pos_w.normal_(0, 0.5)
        perturb_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# family -> (module, class prefix, config class, attention implementations)
COPIES = {
    "deepseek_ocr2": ("deepseek_ocr2", "DeepseekOcr2Sam", "DeepseekOcr2SamVisionConfig", ("sdpa", "eager")),
    "got_ocr2": ("got_ocr2", "GotOcr2", "GotOcr2VisionConfig", ("eager",)),
    "pp_formulanet": ("pp_formulanet", "PPFormulaNet", "PPFormulaNetVisionConfig", ("eager",)),
    "slanext": ("slanext", "SLANeXt", "SLANeXtVisionConfig", ("eager",)),
    "unlimited_ocr": ("unlimited_ocr", "UnlimitedOcrSam", "UnlimitedOcrSamVisionConfig", ("sdpa", "eager")),
}


def test_every_copy_has_a_model_here():
    assert {c.__module__.split(".")[2] for c in hf_layers.SAM_LAYOUT_FAMILIES} == set(COPIES)


@pytest.mark.parametrize(
    "family,implementation", [(f, i) for f, (*_, kinds) in COPIES.items() for i in kinds], ids="-".join
)
def test_the_copies_match_unpatched_by_the_rule(family, implementation, op_calls):
    module, prefix, config, _ = COPIES[family]
    reference, patched, report = pair(MapStack(module, prefix, config, implementation).eval())
    assert report.counts() == {"attention": 2, "mlp": 2} and unfused_embeddings_only(report)
    x = torch.randn(2, 8, 8, 32, generator=torch.Generator().manual_seed(3))
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == 2
    assert all(call["kwargs"]["rel_pos"] is not None for call in op_calls["flash_attention"])
