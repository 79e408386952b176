"""The vision towers of Hugging Face's vision-language models beyond CLIP's layout, and ViT-layout families
made from a table: BLIP, BLIP-2, InstructBLIP and InstructBLIP-Video (BLIP's layer line for line,
``hf_layers.BLIP_LAYOUT_FAMILIES``; BLIP's own-forward attention swapped), InternVL's InternViT
(``lambda_2`` layer scale; LayerNorm or RMSNorm by ``norm_type``), MLCD (rotary position embeddings),
Janus (MLP dropouts), X-CLIP's frame encoder (message tokens), VideoPrism (LayerNorms scaling by
``weight + 1``), the Audio Spectrogram Transformer (ViT's layer line for line,
``hf_layers.VIT_LAYOUT_FAMILIES``), Llama 3.2 Vision's tiled tower (Mllama: its gated global layers'
gate as the layer scale), Llama 4's (its layers return tuples), Step3p7's (``lambda_2``) and LFM3-VL's
(packed frames; gated-conv and attention layers, each with an RMSNorm + SwiGLU half); and, as
stacks of two layers on tokens, the packed towers of PaddleOCR-VL, VideoLLaMA 3 and Ovis2.5
(PaddleOCR-VL's layer line for line, ``hf_layers.PACKED_ROPE_FAMILIES``), LLaVA-OneVision-1.5 and
GLM-Image (``hf_layers.PACKED_BLOCK_FAMILIES``), Inkling2 (``lambda_2``), Cosmos 3 Edge and
MiniMax-M3-VL, and PP-OCR's recognisers' SVTR blocks (``hf_layers.PP_OCR_FAMILIES``).

Each layer's LayerNorm+MLP half is one fastvit.layernorm_mlp call; that the table families are their
reference layer line for line is checked against the installed transformers' source; each patched
model matches the unpatched one by the tolerance rule (outputs and every gradient, float64 oracle);
dropout in training runs Hugging Face's modules; transformers' hidden-state capture sees the fused
layers; a patched model pickles; InternViT-6B's RMSNorm layout through unpatch, torch.compile,
torch.export and the Triton kernels in the interpreter (``ModelChecks``), and Mllama's and Llama 4's the
same.
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
    unfused_embeddings_only,
)
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from transformers.models.blip.modeling_blip import BlipEncoderLayer  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPEncoderLayer  # noqa: E402
from transformers.models.llava_onevision1_5.modeling_llava_onevision1_5 import (  # noqa: E402
    LlavaOnevision15VisionBlock,
)
from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionEncoderLayer  # noqa: E402
from transformers.models.pp_ocrv5_mobile_rec.modeling_pp_ocrv5_mobile_rec import PPOCRV5MobileRecMLP  # noqa: E402
from transformers.models.videoprism import configuration_videoprism, modeling_videoprism  # noqa: E402
from transformers.models.vit.modeling_vit import ViTLayer, ViTMLP  # noqa: E402

from fastvit.nn import hf_layers  # noqa: E402

LAYERS = 2
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32,
            patch_size=8)  # fmt: skip


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


IMAGES = torch.randn(2, 3, 32, 32, generator=_gen(0))


def _vision(model: type, config: T.PretrainedConfig) -> torch.nn.Module:
    return HFLastHiddenState(perturb_(model(config))).eval()


def _internvl(norm_type: str = "layer_norm", **config_args) -> torch.nn.Module:
    args = dict(TINY, image_size=[32, 32], patch_size=[8, 8], norm_type=norm_type, **config_args)
    return _vision(T.InternVLVisionModel, T.InternVLVisionConfig(**args))


def _janus(**config_args) -> torch.nn.Module:
    args = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    return _vision(T.JanusVisionModel, T.JanusVisionConfig(**args, mlp_ratio=2.0, **config_args))


class VideoModel(torch.nn.Module):
    """VideoPrism's vision model on (B, frames, 3, H, W) videos: its last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        config = configuration_videoprism.VideoPrismVisionConfig(
            image_size=16, num_frames=2, tubelet_size=(1, 4, 4), hidden_size=32, num_attention_heads=2,
            intermediate_size=64, num_spatial_layers=LAYERS, num_temporal_layers=1,
        )  # fmt: skip
        self.model = perturb_(modeling_videoprism.VideoPrismVisionModel(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values_videos=x).last_hidden_state


class MllamaModel(torch.nn.Module):
    """Llama 3.2 Vision's tower on (B, 1, tiles, 3, H, W) tiled images: two local layers and one gated
    global layer (its attention and MLP branches scaled by the tanh of a (1,) gate)."""

    def __init__(self) -> None:
        super().__init__()
        config = T.MllamaVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_global_layers=1, attention_heads=2,
            image_size=16, patch_size=4, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2]],
            vision_output_dim=96, intermediate_layers_indices=[0],
        )  # fmt: skip
        self.model = perturb_(T.MllamaVisionModel(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = torch.full((x.shape[0], 1), 2), torch.ones(x.shape[0], 1, 2, dtype=torch.long)  # 1 x 2 tiles
        return self.model(pixel_values=x, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state


MLLAMA_TILES = torch.randn(2, 1, 2, 3, 16, 16, generator=_gen(6))


def _llama4() -> torch.nn.Module:
    """Llama 4's vision tower (complex rotary angles; layers returning tuples), its pixel-shuffle
    adapter sized to match: 4 x 4 patches shuffled to 2 x 2 of 4 * 32 channels."""
    config = T.Llama4VisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32,
        patch_size=8, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32, pixel_shuffle_ratio=0.5,
    )  # fmt: skip
    return _vision(T.Llama4VisionModel, config)


class AudioModel(torch.nn.Module):
    """The Audio Spectrogram Transformer on (B, frames, mel bins) spectrograms: its last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        config = T.ASTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, patch_size=4,
            frequency_stride=4, time_stride=4, max_length=16, num_mel_bins=16,
        )  # fmt: skip
        self.model = perturb_(T.ASTModel(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_values=x).last_hidden_state


class Lfm3VlModel(torch.nn.Module):
    """LFM3-VL's vision tower (packed frames: a 4 x 4 and a 2 x 6 grid of 4 x 4 patches, 28 tokens) on
    its (28, 48) flattened patches: two conv layers, an attention layer (grouped-query, routed as
    packed varlen attention) and a conv layer, each with its RMSNorm + SwiGLU half."""

    GRID = torch.tensor([[1, 4, 4], [1, 2, 6]])

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.lfm3_vl import configuration_lfm3_vl, modeling_lfm3_vl

        config = configuration_lfm3_vl.Lfm3VlVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            patch_size=4, temporal_patch_size=1,
        )  # fmt: skip
        config._attn_implementation = "sdpa"
        self.model = perturb_(modeling_lfm3_vl.Lfm3VlVisionModel(config))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.GRID).last_hidden_state


# family -> (builder, inputs, MLP halves fused)
FAMILIES = {
    "blip": (lambda: _vision(T.BlipVisionModel, T.BlipVisionConfig(**TINY)), IMAGES, LAYERS),
    "blip_2": (lambda: _vision(T.Blip2VisionModel, T.Blip2VisionConfig(**TINY)), IMAGES, LAYERS),
    "instructblip": (lambda: _vision(T.InstructBlipVisionModel, T.InstructBlipVisionConfig(**TINY)), IMAGES, LAYERS),
    "instructblipvideo": (lambda: _vision(T.InstructBlipVideoVisionModel, T.InstructBlipVideoVisionConfig(**TINY)),
                          IMAGES, LAYERS),
    "internvl": (_internvl, IMAGES, LAYERS),
    "internvl_rms": (lambda: _internvl("rms_norm"), IMAGES, LAYERS),  # InternViT-6B's layout
    "janus": (_janus, IMAGES, LAYERS),
    "mlcd": (lambda: _vision(T.MLCDVisionModel, T.MLCDVisionConfig(**TINY)), IMAGES, LAYERS),
    # one video of two frames: each frame's message token attends across the frames
    "x_clip_vision": (lambda: _vision(T.XCLIPVisionModel, T.XCLIPVisionConfig(**TINY, num_frames=2)), IMAGES, LAYERS),
    # two frames of 16 x 16, 4 x 4 tubelets: two spatial layers and one temporal
    "videoprism": (lambda: VideoModel().eval(), torch.randn(2, 2, 3, 16, 16, generator=_gen(1)), LAYERS + 1),
    "ast": (lambda: AudioModel().eval(), torch.randn(2, 16, 16, generator=_gen(2)), LAYERS),
    "mllama": (lambda: MllamaModel().eval(), MLLAMA_TILES, LAYERS + 1),
    "llama4": (lambda: _llama4(), IMAGES, LAYERS),
    # pre-norm with LayerScale lambda_1 / lambda_2, RoPE attention; its embedding a copy of SigLIP's
    "step3p7": (lambda: _vision(T.Step3p7VisionModel, T.Step3p7VisionConfig(**TINY)), IMAGES, LAYERS),
    # conv, conv, attention, conv layers: every layer's MLP half fused
    "lfm3_vl": (lambda: Lfm3VlModel().eval(), torch.randn(28, 48, generator=_gen(7)), 4),
}


class LayerStack(torch.nn.Module):
    """Two of a family's layers on tokens, each called as its encoder calls it (``kwargs``: the packed
    towers' ``cu_seqlens`` and rotary ``position_embeddings``)."""

    def __init__(self, module: str, layer: str, config: str, **kwargs) -> None:
        super().__init__()
        configs = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
        cfg = getattr(configs, config)(hidden_size=32, intermediate_size=64, num_attention_heads=2)
        cfg._attn_implementation = "sdpa"
        cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), layer)
        self.layers, self.kwargs = perturb_(torch.nn.ModuleList([cls(cfg) for _ in range(LAYERS)])), kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, **self.kwargs)
        return x


# two images of 5 and 9 tokens, packed; rotary angles per token (head dim 16)
PACKED = dict(cu_seqlens=torch.tensor([0, 5, 14], dtype=torch.int32), max_seqlen=9)
_ANGLES = torch.randn(14, 8, generator=_gen(3))
ROPE = (torch.cat([_ANGLES.cos()] * 2, -1), torch.cat([_ANGLES.sin()] * 2, -1))
PACKED_TOKENS = torch.randn(14, 32, generator=_gen(4))
# family -> (builder, inputs)
STACKS = {
    "paddleocr_vl": (lambda: LayerStack("paddleocr_vl", "PaddleOCRVisionEncoderLayer", "PaddleOCRVisionConfig",
                                        position_embeddings=ROPE, **PACKED), PACKED_TOKENS),
    "video_llama_3": (lambda: LayerStack("video_llama_3", "VideoLlama3VisionEncoderLayer", "VideoLlama3VisionConfig",
                                         position_embeddings=ROPE, **PACKED), PACKED_TOKENS),
    "ovis2_5": (lambda: LayerStack("ovis2_5", "Ovis2_5VisionEncoderLayer", "Ovis2_5VisionConfig",
                                   position_embeddings=ROPE, **PACKED), PACKED_TOKENS),
    "cosmos3_edge": (lambda: LayerStack("cosmos3_edge", "Cosmos3EdgeVisionEncoderLayer", "Cosmos3EdgeVisionConfig",
                                        **PACKED), PACKED_TOKENS),
    "minimax_m3_vl": (lambda: LayerStack("minimax_m3_vl", "MiniMaxM3VLVisionEncoderLayer", "MiniMaxM3VLVisionConfig",
                                         position_embeddings=ROPE, **PACKED), PACKED_TOKENS[None]),
    "llava_onevision1_5": (lambda: LayerStack("llava_onevision1_5", "LlavaOnevision15VisionBlock",
                                              "LlavaOnevision15VisionConfig", position_embeddings=ROPE, **PACKED),
                           PACKED_TOKENS),  # its attention takes the angles through **kwargs
    "glm_image": (lambda: LayerStack("glm_image", "GlmImageVisionBlock", "GlmImageVisionConfig", **PACKED),
                  PACKED_TOKENS),
    "inkling2": (lambda: LayerStack("inkling2", "Inkling2VisionEncoderLayer", "Inkling2VisionConfig",
                                    position_embeddings=ROPE, **PACKED), PACKED_TOKENS),
    "pp_ocrv5_mobile_rec": (lambda: LayerStack("pp_ocrv5_mobile_rec", "PPOCRV5MobileRecBlock",
                                               "PPOCRV5MobileRecConfig"), torch.randn(2, 7, 32, generator=_gen(5))),
    "pp_ocrv5_server_rec": (lambda: LayerStack("pp_ocrv5_server_rec", "PPOCRV5ServerRecBlock",
                                               "PPOCRV5ServerRecConfig"), torch.randn(2, 7, 32, generator=_gen(5))),
    "pp_ocrv6_small_rec": (lambda: LayerStack("pp_ocrv6_small_rec", "PPOCRV6SmallRecBlock", "PPOCRV6SmallRecConfig"),
                           torch.randn(2, 7, 32, generator=_gen(5))),
}  # fmt: skip


def _body(function, name: str) -> list[str]:
    """A layer forward's lines from its first statement (the signatures may differ in defaults)."""
    lines = source_lines(function, name)
    return lines[lines.index("residual = hidden_states"):]


@pytest.mark.parametrize("layer", [*hf_layers.PP_OCR_FAMILIES, *hf_layers.PACKED_ROPE_FAMILIES,
                                   *hf_layers.PACKED_BLOCK_FAMILIES], ids=lambda c: c.__name__)  # fmt: skip
def test_the_token_families_are_their_layout_line_for_line(layer):
    if layer in hf_layers.PP_OCR_FAMILIES:  # CLIP's forward, called without a mask; PP-OCR's MLP
        assert _body(layer.forward, layer.__name__) == _body(CLIPEncoderLayer.forward, CLIPEncoderLayer.__name__)
        mlp, fused = hf_layers.PP_OCR_FAMILIES[layer], hf_layers.PP_OCR_LAYERS[layer]
        reference_mlp = PPOCRV5MobileRecMLP
    elif layer in hf_layers.PACKED_BLOCK_FAMILIES:  # LLaVA-OneVision-1.5's forward; CLIP's MLP
        reference = LlavaOnevision15VisionBlock
        assert source_lines(layer.forward, layer.__name__) == source_lines(reference.forward, reference.__name__)
        mlp, reference_mlp = hf_layers.PACKED_BLOCK_FAMILIES[layer], CLIPMLP
        fused = hf_layers.PACKED_BLOCK_LAYERS[layer]
    else:
        reference = PaddleOCRVisionEncoderLayer
        assert source_lines(layer.forward, layer.__name__) == source_lines(reference.forward, reference.__name__)
        mlp, reference_mlp, fused = hf_layers.PACKED_ROPE_FAMILIES[layer], CLIPMLP, hf_layers.PACKED_ROPE_LAYERS[layer]
    assert source_lines(mlp.forward, mlp.__name__) == source_lines(reference_mlp.forward, reference_mlp.__name__)
    assert fused.fastvit_original() is layer and getattr(hf_layers, fused.__name__) is fused


@pytest.mark.parametrize("family", sorted(STACKS))
def test_the_stacks_match_unpatched_by_the_rule(family, op_calls):
    build, x = STACKS[family]
    reference, patched, report = pair(build().eval())
    assert report.counts()["mlp"] == LAYERS
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == LAYERS


@pytest.mark.parametrize("layer", [*hf_layers.BLIP_LAYOUT_FAMILIES, *hf_layers.VIT_LAYOUT_FAMILIES],
                         ids=lambda c: c.__name__)  # fmt: skip
def test_the_table_families_are_their_layout_line_for_line(layer):
    blip = layer in hf_layers.BLIP_LAYOUT_FAMILIES
    families, layers = (
        (hf_layers.BLIP_LAYOUT_FAMILIES, hf_layers.BLIP_LAYOUT_LAYERS) if blip
        else (hf_layers.VIT_LAYOUT_FAMILIES, hf_layers.VIT_LAYOUT_LAYERS)
    )  # fmt: skip
    reference, reference_mlp = (BlipEncoderLayer, CLIPMLP) if blip else (ViTLayer, ViTMLP)
    mlp = families[layer]
    assert source_lines(layer.forward, layer.__name__) == source_lines(reference.forward, reference.__name__)
    assert source_lines(mlp.forward, mlp.__name__) == source_lines(reference_mlp.forward, reference_mlp.__name__)
    fused = layers[layer]
    assert fused.__name__ == f"Fused{layer.__name__}" and fused.fastvit_original() is layer
    assert getattr(hf_layers, fused.__name__) is fused  # importable by name: a patched model pickles


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(family, op_calls):
    build, x, halves = FAMILIES[family]
    reference, patched, report = pair(build())
    assert report.counts()["mlp"] == halves
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == halves


def test_internvl_norms_go_to_the_op_as_their_kind(monkeypatch):
    seen, op = [], fastvit.layernorm_mlp

    def recording(*args, **kwargs):
        seen.append(kwargs.get("norm", "layernorm"))
        return op(*args, **kwargs)

    monkeypatch.setattr(fastvit, "layernorm_mlp", recording)
    for norm_type, kind in (("layer_norm", "layernorm"), ("rms_norm", "rms")):
        model = _internvl(norm_type)
        fastvit.patch(model)
        model(IMAGES)
        assert seen == [kind] * LAYERS, norm_type
        seen.clear()


@pytest.mark.parametrize("family, config_args, rate", [
    ("janus", dict(hidden_dropout_rate=0.2), "MLP dropout 0.2"),
    ("internvl", dict(hidden_dropout_prob=0.2), "hidden dropout 0.2"),
])  # fmt: skip
def test_dropout_in_training_runs_hugging_face_and_is_reported(family, config_args, rate, op_calls, fresh_warnings):
    model = (_janus if family == "janus" else _internvl)(**config_args)
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert report.counts()["mlp"] == LAYERS
    assert any(rate in entry.detail for entry in report.replaced if entry.part == "mlp")
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="dropout"):
        patched(IMAGES).sum().backward()
    assert not op_calls["layernorm_mlp"]
    patched.eval()
    torch.testing.assert_close(patched(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS


def test_blip_attention_is_swapped_and_weights_run_hugging_face(op_calls):
    """BLIP's ``BlipAttention`` computes its scores in its own forward: swapped
    (``hf_self_attention.FusedBlipAttention``); the weights transformers' output capture collects run
    Hugging Face's forward, as unpatched."""
    from fastvit.nn import hf_self_attention

    build, x, _ = FAMILIES["blip"]
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS} and unfused_embeddings_only(report)
    assert [type(m) for m in patched.modules()].count(hf_self_attention.FusedBlipAttention) == LAYERS
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["flash_attention"]) == LAYERS
    op_calls["flash_attention"].clear()
    expected = reference.model(x, output_attentions=True).attentions
    found = patched.model(x, output_attentions=True).attentions
    assert len(found) == len(expected) == LAYERS
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not op_calls["flash_attention"]


def test_hidden_states_capture_sees_the_fused_layers():
    model = perturb_(T.Blip2VisionModel(T.Blip2VisionConfig(**TINY))).eval()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    expected = model(IMAGES, output_hidden_states=True).hidden_states
    found = patched(IMAGES, output_hidden_states=True).hidden_states
    assert len(found) == len(expected) == LAYERS + 1
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_patched_model_pickles_and_unpatches():
    build, x, _ = FAMILIES["blip_2"]
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


def test_mllama_gate_is_the_layer_scale(op_calls):
    # the global layer's gate_ffn (a (1,) Parameter): its tanh expanded to (D,), a view, learns
    # through the op's layer-scale gradient; the local layers have none
    reference, patched, _ = pair(MllamaModel().eval())
    scales = [layer._fastvit_layer_scale() for layer in patched.model.transformer.layers]
    (gated,) = patched.model.global_transformer.layers
    scale = gated._fastvit_layer_scale()
    assert scales == [None] * LAYERS and scale.shape == (32,) and scale.stride() == (0,)
    assert_matches_by_the_rule(reference, patched, MLLAMA_TILES)
    assert op_calls["layernorm_mlp"][-1]["kwargs"]["layer_scale"].shape == (32,)


def test_mllama_gate_of_another_shape_is_reported():
    model = MllamaModel().eval()
    (gated,) = model.model.global_transformer.layers
    gated.gate_ffn = torch.nn.Parameter(torch.ones(32))
    report = fastvit.patch(model)
    (entry,) = [e for e in report.skipped if e.part == "mlp"]
    assert entry.where == "model.global_transformer.layers.0" and "gate_ffn is not a (1,) gate" in entry.detail
    assert report.counts()["mlp"] == LAYERS


def test_lfm3_vl_mlp_applies_silu_as_the_fused_half_assumes():
    """LFM3-VL's MLP holds no activation module: its forward applies F.silu, which the fused half
    passes as the op's activation (``MlpHalf.activation``). A transformers release changing that
    forward fails here."""
    from transformers.models.lfm3_vl.modeling_lfm3_vl import Lfm3VlVisionMLP

    forward = ["def forward(self, x):", "return self.w2(F.silu(self.w1(x)) * self.w3(x))"]
    assert source_lines(Lfm3VlVisionMLP.forward) == forward
    assert hf_layers.FusedLfm3VlVisionLayer.fastvit_mlp.activation == "silu"


def test_lfm3_vl_halves_go_to_the_op_as_gated_rms_silu(op_calls):
    _, patched, report = pair(Lfm3VlModel().eval())
    assert report.counts() == {"attention": 1, "mlp": 4}
    patched(FAMILIES["lfm3_vl"][1])
    layers = patched.model.layers
    for layer, call in zip(layers, op_calls["layernorm_mlp"], strict=True):
        kwargs = call["kwargs"]
        assert (kwargs["norm"], kwargs["activation"]) == ("rms", "silu")
        assert kwargs["fc1_gate_weight"] is layer.feed_forward.w1.weight
    assert len(op_calls["flash_attention_varlen"]) == 1


@pytest.mark.interpreter
def test_lfm3_vl_triton_route(op_calls):
    reference, patched, _ = pair(Lfm3VlModel().eval())
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, FAMILIES["lfm3_vl"][1])
    assert len(op_calls["layernorm_mlp"]) == 4 and len(op_calls["flash_attention_varlen"]) == 1


def test_step3p7_lambda_2_is_the_layer_scale(op_calls):
    _, patched, _ = pair(FAMILIES["step3p7"][0]())
    patched(IMAGES)
    assert op_calls["layernorm_mlp"][0]["kwargs"]["layer_scale"] is patched.model.layers[0].lambda_2


@pytest.mark.parametrize("family", ["internvl", "step3p7", "inkling2"])
def test_a_lambda_2_of_another_shape_is_reported(family, op_calls):
    """The bare (D,) ``lambda_2`` these layers scale their MLP branch by (``MlpHalf.scale_param``):
    one that only broadcasts (1,) is no layer scale the op takes; that layer is reported and runs
    Hugging Face's, the others go to the op with theirs."""
    build, x, calls = FAMILIES[family] if family in FAMILIES else (*STACKS[family], LAYERS)
    reference = build()
    path, layer = next((p, m) for p, m in reference.named_modules() if isinstance(getattr(m, "lambda_2", None),
                                                                                  torch.nn.Parameter))  # fmt: skip
    layer.lambda_2 = torch.nn.Parameter(torch.full((1,), 0.5))
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    (skip,) = [e for e in report.skipped if e.part == "mlp"]
    assert skip.path == path and "lambda_2 is neither 1.0 nor a (32,) layer scale" in skip.detail
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == calls - 1


class TestMllamaChecks(ModelChecks):
    build = staticmethod(lambda: MllamaModel().eval())
    inputs = staticmethod(lambda batch: MLLAMA_TILES[:batch])
    export_ops = frozenset({"fastvit.layernorm_mlp_fwd.default", "fastvit.flash_attention_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS + 1


class TestLlama4Checks(ModelChecks):
    build = staticmethod(_llama4)
    inputs = staticmethod(lambda batch: IMAGES[:batch])
    export_ops = frozenset({"fastvit.layernorm_mlp_fwd.default", "fastvit.flash_attention_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS


class TestInternViTRmsChecks(ModelChecks):
    build = staticmethod(lambda: _internvl("rms_norm"))
    inputs = staticmethod(lambda batch: IMAGES[:batch])
    export_ops = frozenset({"fastvit.layernorm_mlp_fwd.default", "fastvit.flash_attention_fwd.default",
                            "fastvit.patch_embed_fwd.default"})  # fmt: skip
    counted_op = "layernorm_mlp"
    calls = LAYERS
