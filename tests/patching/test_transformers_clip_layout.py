"""The Hugging Face encoder layers that are CLIP's line for line (fastvit.nn.hf_layers.CLIP_LAYOUT_FAMILIES:
Chinese-CLIP, AltCLIP, OWL-ViT, OWLv2, X-CLIP, GIT, Idefics2, Idefics3, SmolVLM, Granite-Docling,
Kosmos-2, CLIPSeg, MetaCLIP 2, Phi-4-multimodal, GroupViT, MiniCPM-V, Molmo 2, Unlimited-OCR, HunYuan-VL,
HY-V4-VL): each
layer's LayerNorm+MLP half is one fastvit.layernorm_mlp call, by ``FusedCLIPEncoderLayer``'s forward
on a fused class of the family's own. That the layers are CLIP's is checked against the installed
transformers' source (a family whose forward or MLP drifts from CLIP's fails here, not silently in a
model); each family patched matches the unpatched one by the tolerance rule (outputs and every
gradient, float64 oracle: the model where images are all it takes, else a stack of two of its
layers on tokens, MiniCPM's and HunYuan-VL's packed); a patched model pickles and unpatches; the Triton kernels in
the interpreter on one family.
"""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HFLastHiddenState,
    assert_matches_by_the_rule,
    module_types,
    pair,
    perturb_,
    source_lines,
)

T = pytest.importorskip("transformers")

from transformers.models.clip.modeling_clip import CLIPMLP, CLIPEncoderLayer  # noqa: E402

from fastvit.nn import hf_layers  # noqa: E402

LAYERS = 2
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32,
            patch_size=8)  # fmt: skip


class EncoderOfEmbeddings(torch.nn.Module):
    """A Hugging Face CLIP-style encoder run on (B, N, D) embeddings (X-CLIP's layers live in its text
    encoder, whose own model takes token ids: no gradient reaches them)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(inputs_embeds=x).last_hidden_state


def _vision(module: str, name: str) -> torch.nn.Module:
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    return HFLastHiddenState(perturb_(cls(cls.config_class(**TINY)))).eval()


def _x_clip_text_encoder() -> torch.nn.Module:
    config = T.XCLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2)
    return EncoderOfEmbeddings(perturb_(T.XCLIPTextModel(config).encoder)).eval()


class LayerStack(torch.nn.Module):
    """Two of a family's encoder layers on (B, N, D) tokens, for the families whose models need more
    than images (MiniCPM's packed sequences, Granite-Docling's and Unlimited-OCR's crops); ``kwargs``
    reach the attention (``cu_seqlens`` ...)."""

    def __init__(self, layers: torch.nn.ModuleList, **kwargs) -> None:
        super().__init__()
        self.layers, self.kwargs = layers, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, None, **self.kwargs)
        return x


def _layers(module: str, layer: str, config: str, config_args: dict | None = None, **kwargs) -> torch.nn.Module:
    configs = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
    args = {k: v for k, v in TINY.items() if k not in ("image_size", "patch_size")}
    cfg = getattr(configs, config)(**args, **(config_args or {}))
    cfg._attn_implementation = "sdpa"
    cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), layer)
    return LayerStack(perturb_(torch.nn.ModuleList([cls(cfg) for _ in range(LAYERS)])), **kwargs).eval()


TOKENS = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
# MiniCPM's towers attend within each image of a packed batch: two images of 5 and 9 tokens
PACKED = dict(cu_seqlens=torch.tensor([0, 5, 14], dtype=torch.int32), max_seqlen=9)
PACKED_TOKENS = torch.randn(1, 14, 32, generator=torch.Generator().manual_seed(2))

# family -> (builder, inputs)
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FAMILIES = {
    "chinese_clip": (lambda: _vision("chinese_clip", "ChineseCLIPVisionModel"), IMAGES),
    "altclip": (lambda: _vision("altclip", "AltCLIPVisionModel"), IMAGES),
    "owlvit": (lambda: _vision("owlvit", "OwlViTVisionModel"), IMAGES),
    "owlv2": (lambda: _vision("owlv2", "Owlv2VisionModel"), IMAGES),
    "x_clip": (_x_clip_text_encoder, torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))),
    "git": (lambda: _vision("git", "GitVisionModel"), IMAGES),
    "idefics3": (lambda: _vision("idefics3", "Idefics3VisionTransformer"), IMAGES),
    "smolvlm": (lambda: _vision("smolvlm", "SmolVLMVisionTransformer"), IMAGES),
    "kosmos2": (lambda: _vision("kosmos2", "Kosmos2VisionModel"), IMAGES),
    "clipseg": (lambda: _vision("clipseg", "CLIPSegVisionModel"), IMAGES),
    "metaclip_2": (lambda: _vision("metaclip_2", "MetaClip2VisionModel"), IMAGES),
    "phi4_multimodal": (lambda: _vision("phi4_multimodal", "Phi4MultimodalVisionModel"), IMAGES),
    "idefics2": (lambda: _vision("idefics2", "Idefics2VisionTransformer"), IMAGES),
    "granite_docling": (lambda: _layers("granite_docling", "GraniteDoclingEncoderLayer",
                                        "GraniteDoclingVisionConfig"), TOKENS),
    "groupvit": (lambda: _layers("groupvit", "GroupViTEncoderLayer", "GroupViTVisionConfig"), TOKENS),
    "minicpm_ocr": (lambda: _layers("minicpm_ocr", "MiniCPMOcrVisionEncoderLayer", "MiniCPMOcrVisionConfig",
                                    **PACKED), PACKED_TOKENS),
    "minicpmv4_6": (lambda: _layers("minicpmv4_6", "MiniCPMV4_6VisionEncoderLayer", "MiniCPMV4_6VisionConfig",
                                    **PACKED), PACKED_TOKENS),
    "minicpmv4_7": (lambda: _layers("minicpmv4_7", "MiniCPMV4_7VisionEncoderLayer", "MiniCPMV4_7VisionConfig",
                                    **PACKED), PACKED_TOKENS),
    "molmo2": (lambda: _layers("molmo2", "Molmo2VisionEncoderLayer", "Molmo2VisionConfig",
                               dict(num_key_value_heads=2, head_dim=16)), TOKENS),
    "unlimited_ocr": (lambda: _layers("unlimited_ocr", "UnlimitedOcrEncoderLayer", "UnlimitedOcrVisionEncoderConfig"),
                      TOKENS),
    "hunyuan_vl": (lambda: _layers("hunyuan_vl", "HunYuanVLVisionBlock", "HunYuanVLVisionConfig", **PACKED),
                   PACKED_TOKENS),
    "hy_v4_vl": (lambda: _layers("hy_v4_vl", "HYV4VLVisionBlock", "HYV4VLVisionConfig", **PACKED), PACKED_TOKENS),
}


@pytest.mark.parametrize("layer", list(hf_layers.CLIP_LAYOUT_FAMILIES), ids=lambda c: c.__name__)
def test_the_families_are_clip_line_for_line(layer):
    mlp = hf_layers.CLIP_LAYOUT_FAMILIES[layer]
    clip_forward = source_lines(CLIPEncoderLayer.forward, CLIPEncoderLayer.__name__)
    assert source_lines(layer.forward, layer.__name__) == clip_forward
    assert source_lines(mlp.forward, mlp.__name__) == source_lines(CLIPMLP.forward, CLIPMLP.__name__)
    fused = hf_layers.CLIP_LAYOUT_LAYERS[layer]
    assert fused.__name__ == f"Fused{layer.__name__}" and fused.fastvit_original() is layer
    assert getattr(hf_layers, fused.__name__) is fused  # importable by name: a patched model pickles


def test_every_family_has_a_model_here():
    families = {c.__module__.split(".")[2] for c in hf_layers.CLIP_LAYOUT_FAMILIES}
    assert families == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(family, op_calls):
    build, x = FAMILIES[family]
    reference, patched, report = pair(build())
    assert report.counts()["mlp"] == LAYERS
    fused = [type(m) for m in patched.modules() if type(m) in hf_layers.CLIP_LAYOUT_LAYERS.values()]
    assert len(fused) == LAYERS
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == LAYERS


def test_a_patched_model_pickles_and_unpatches():
    build, x = FAMILIES["owlv2"]
    model = build()
    types = module_types(model)
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    fastvit.unpatch(patched)
    assert module_types(patched) == types


@pytest.mark.interpreter
def test_triton_route(op_calls):
    build, x = FAMILIES["idefics3"]
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, x[:1])
    assert len(op_calls["layernorm_mlp"]) == LAYERS
