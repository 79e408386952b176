"""The vision towers of Hugging Face's OCR and document models with layers of their own: Pix2Struct's
(Pix2Struct, DePlot, MatCha) and its copy in Kosmos-2.5 (T5's RMSNorm and gated tanh-GELU
feed-forward, on flattened patches with a padding mask), Qianfan-OCR's (InternViT's layer with drop
path; LayerNorm or RMSNorm by ``norm_type``) and DeepSeek-OCR 2's vision encoder (a Qwen2 decoder
layer over image tokens and learned queries: RMSNorm + SwiGLU, grouped-query attention under a mask
bidirectional over the image and causal over the queries).

Each layer's norm+MLP half is one fastvit.layernorm_mlp call; each patched model matches the
unpatched one by the tolerance rule (outputs and every gradient, float64 oracle); what Hugging Face
does that the op has not (T5's casts to ``wo``'s dtype, drop path in training) runs Hugging Face's
modules; Kosmos-2.5's layer is checked line for line against Pix2Struct's in the installed source;
Pix2Struct's tower through unpatch, torch.compile, torch.export and the Triton kernels in the
interpreter (``ModelChecks``), and DeepSeek-OCR 2's the same.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_, source_lines
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from transformers.models.deepseek_ocr2 import configuration_deepseek_ocr2, modeling_deepseek_ocr2  # noqa: E402
from transformers.models.kosmos2_5 import configuration_kosmos2_5, modeling_kosmos2_5  # noqa: E402
from transformers.models.pix2struct import modeling_pix2struct  # noqa: E402

from fastvit.nn import hf_layers  # noqa: E402

LAYERS = 2
PATCHES = 16  # flattened patches per image (Pix2Struct, Kosmos-2.5): 4 x 4, the second image padded
PATCH_VALUES = 12  # 2 x 2 patches of 3 channels


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class FlattenedPatchesModel(torch.nn.Module):
    """Pix2Struct's or Kosmos-2.5's vision model on (B, 16, 12) patch values: their row and column
    ids (a 4 x 4 grid) prepended as Hugging Face's processor does, the second image's last 6 patches
    padding (attention_mask 0); the last hidden state."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = perturb_(model)
        rows, cols = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
        self.register_buffer("ids", torch.stack([rows.flatten(), cols.flatten()], -1).float(), persistent=False)

    def forward(self, x: torch.Tensor, output_attentions: bool = False) -> torch.Tensor:
        mask = torch.ones(x.shape[:2], dtype=x.dtype)
        mask[1:, 10:] = 0
        patches = torch.cat([self.ids.to(x.dtype).expand(x.shape[0], -1, -1), x], -1)
        out = self.model(flattened_patches=patches, attention_mask=mask, output_attentions=output_attentions)
        return out.attentions if output_attentions else out.last_hidden_state


def _pix2struct(**config_args) -> torch.nn.Module:
    config = T.Pix2StructVisionConfig(
        hidden_size=32, d_ff=64, num_hidden_layers=LAYERS, num_attention_heads=2, d_kv=16,
        patch_embed_hidden_size=PATCH_VALUES, seq_len=PATCHES, **config_args,
    )  # fmt: skip
    return FlattenedPatchesModel(T.Pix2StructVisionModel(config)).eval()


def _kosmos2_5() -> torch.nn.Module:
    config = configuration_kosmos2_5.Kosmos2_5VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, head_dim=16,
        patch_embed_hidden_size=PATCH_VALUES, max_num_patches=PATCHES,
    )  # fmt: skip
    return FlattenedPatchesModel(modeling_kosmos2_5.Kosmos2_5VisionModel(config)).eval()


class LastHiddenState(torch.nn.Module):
    """A model's last hidden state, ``kwargs`` added to each call."""

    def __init__(self, model: torch.nn.Module, **kwargs) -> None:
        super().__init__()
        self.model, self.kwargs = perturb_(model), kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.kwargs).last_hidden_state


def _qianfan_ocr(norm_type: str = "layer_norm", **config_args) -> torch.nn.Module:
    config = T.QianfanOCRVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2, image_size=32,
        patch_size=8, norm_type=norm_type, **config_args,
    )  # fmt: skip
    return LastHiddenState(T.QianfanOCRVisionModel(config)).eval()


def _deepseek_ocr2() -> torch.nn.Module:
    """DeepSeek-OCR 2's vision encoder on 9 image tokens followed by 4 queries (4 heads sharing 2
    key/value heads)."""
    config = configuration_deepseek_ocr2.DeepseekOcr2VisionEncoderConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    encoder = modeling_deepseek_ocr2.DeepseekOcr2VisionEncoder(config)
    return LastHiddenState(encoder, num_patches=9).eval()


IMAGES = torch.randn(2, 3, 32, 32, generator=_gen(0))
PATCH_INPUTS = torch.randn(2, PATCHES, PATCH_VALUES, generator=_gen(1))
TOKENS = torch.randn(2, 13, 32, generator=_gen(2))
# family -> (builder, inputs)
FAMILIES = {
    "pix2struct": (_pix2struct, PATCH_INPUTS),
    "pix2struct_gelu": (lambda: _pix2struct(dense_act_fn="gelu"), PATCH_INPUTS),
    "kosmos2_5": (_kosmos2_5, PATCH_INPUTS),
    "qianfan_ocr": (_qianfan_ocr, IMAGES),
    "qianfan_ocr_rms": (lambda: _qianfan_ocr("rms_norm"), IMAGES),
    "deepseek_ocr2": (_deepseek_ocr2, TOKENS),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_unpatched_by_the_rule(family, op_calls):
    build, x = FAMILIES[family]
    reference, patched, report = pair(build())
    embedding = {"patch_embed": 1} if family.startswith("qianfan_ocr") else {}  # InternVL's, copied
    assert report.counts() == {"attention": LAYERS, "mlp": LAYERS, **embedding}
    assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["layernorm_mlp"]) == LAYERS and len(op_calls["patch_embed"]) == len(embedding)


@pytest.mark.parametrize("family, kwargs", [
    ("pix2struct", dict(norm="rms", activation="gelu_tanh", residual=True)),
    ("qianfan_ocr", dict(norm="layernorm", activation="gelu", residual=True)),
    ("qianfan_ocr_rms", dict(norm="rms", activation="gelu", residual=True)),
    ("deepseek_ocr2", dict(norm="rms", activation="silu", residual=True)),
])  # fmt: skip
def test_each_half_goes_to_the_op_as_its_kind(family, kwargs, op_calls):
    build, x = FAMILIES[family]
    _, patched, _ = pair(build())
    patched(x)
    layers = [m for m in patched.modules() if isinstance(m, hf_layers.FusedPreNormLayer)]
    assert len(layers) == LAYERS
    for layer, call in zip(layers, op_calls["layernorm_mlp"], strict=True):
        got = call["kwargs"]
        assert {key: got.get(key, "layernorm" if key == "norm" else None) for key in kwargs} == kwargs
        mlp = layer.mlp
        gate = getattr(mlp, "wi_0", None) or getattr(mlp, "gate_proj", None)
        assert (got.get("fc1_gate_weight") is None) == (gate is None)
        if gate is not None:  # fc2(act(gate(x)) * value(x)): the gate projection goes as the gate
            assert got["fc1_gate_weight"] is gate.weight
        scale = getattr(layer, "lambda_2", None)
        assert got.get("layer_scale") is scale


def test_kosmos2_5_layer_is_pix2struct_line_for_line():
    """Kosmos-2.5's vision layer is Pix2Struct's returning the tokens alone, its MLP and norm
    Pix2Struct's: a transformers release changing one fails here before a fused forward runs
    another model's math."""
    pix2struct, kosmos = modeling_pix2struct, modeling_kosmos2_5
    layer = source_lines(kosmos.Kosmos2_5VisionLayer.forward, "Kosmos2_5VisionLayer")
    reference = source_lines(pix2struct.Pix2StructVisionLayer.forward, "Pix2StructVisionLayer")
    differ = [(a, b) for a, b in zip(layer, reference, strict=True) if a != b]
    assert differ == [
        (") -> torch.Tensor:", ") -> tuple[torch.Tensor, torch.Tensor]:"),
        ("attention_output, _ = self.attention(", "attention_output, attn_weights = self.attention("),
        ("return layer_output", "return layer_output, attn_weights"),
    ], differ
    for kosmos_cls, pix2struct_cls in (
        (kosmos.Kosmos2_5VisionMlp, pix2struct.Pix2StructVisionMlp),
        (kosmos.Kosmos2_5LayerNorm, pix2struct.Pix2StructLayerNorm),
    ):
        assert source_lines(kosmos_cls.forward, kosmos_cls.__name__) == source_lines(
            pix2struct_cls.forward, pix2struct_cls.__name__
        )


def test_pix2struct_attention_weights_are_hugging_faces(op_calls):
    # Pix2Struct's layer returns its attention weights beside the tokens: asked for, they are
    # computed by Hugging Face's eager attention, as unpatched
    build, x = FAMILIES["pix2struct"]
    reference, patched, _ = pair(build())
    expected, found = reference(x, output_attentions=True), patched(x, output_attentions=True)
    assert len(found) == len(expected) == LAYERS
    for a, b in zip(found, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_t5_wo_kept_in_fp32_runs_hugging_faces_casts(op_calls):
    """T5 keeps ``wo`` in fp32 in 16-bit models; Hugging Face casts the gated product to it and the
    layer's output becomes fp32 (the tower's last T5 norm casts it back to its bf16 weight's dtype).
    Patched, such calls run Hugging Face's modules: the same values and dtypes, no op call;
    all-bf16 layers run the op."""
    build, x = FAMILIES["pix2struct"]
    model = build().to(torch.bfloat16)
    for layer in model.model.encoder.layer:
        layer.mlp.wo.float()
    reference, patched, report = pair(model)
    assert report.counts()["mlp"] == LAYERS
    layer_outputs = []
    patched.model.encoder.layer[0].register_forward_hook(lambda m, args, out: layer_outputs.append(out[0]))
    want, got = reference(x.bfloat16()), patched(x.bfloat16())
    assert layer_outputs[0].dtype == torch.float32 and got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not op_calls["layernorm_mlp"]
    for layer in patched.model.encoder.layer:
        layer.mlp.wo.bfloat16()
    patched(x.bfloat16())
    assert len(op_calls["layernorm_mlp"]) == LAYERS


def test_qianfan_ocr_drop_path_in_training_runs_hugging_face(op_calls, fresh_warnings):
    # the drop path rates rise from 0 over the layers: the first layer has none and runs the op
    model = _qianfan_ocr(drop_path_rate=0.3)
    assert [type(layer.drop_path2).__name__ for layer in model.model.layers] == [
        "Identity", "QianfanOCRDropPath"]
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched)
    assert report.counts()["mlp"] == LAYERS
    model.train(), patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="drop path"):
        torch.manual_seed(3)
        got = patched(IMAGES)
    torch.manual_seed(3)
    want = model(IMAGES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # draw for draw
    assert len(op_calls["layernorm_mlp"]) == 1
    patched.eval(), model.eval()
    torch.testing.assert_close(patched(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 1 + LAYERS


def test_a_replaced_t5_norm_is_reported():
    model = _pix2struct()
    model.model.encoder.layer[0].pre_mlp_layer_norm = torch.nn.LayerNorm(32)
    report = fastvit.patch(model)
    (entry,) = [e for e in report.skipped if e.part == "mlp"]
    assert entry.where == "model.encoder.layer.0" and "Pix2StructLayerNorm" in entry.detail
    assert report.counts()["mlp"] == LAYERS - 1


class TestPix2StructChecks(ModelChecks):
    build = staticmethod(_pix2struct)
    inputs = staticmethod(lambda batch: PATCH_INPUTS[:batch])
    export_ops = frozenset({"fastvit.layernorm_mlp_fwd.default", "fastvit.flash_attention_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS


class TestDeepseekOcr2Checks(ModelChecks):
    build = staticmethod(_deepseek_ocr2)
    inputs = staticmethod(lambda batch: TOKENS[:batch])
    export_ops = frozenset({"fastvit.layernorm_mlp_fwd.default", "fastvit.flash_attention_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = LAYERS


def test_a_replaced_wo_runs_hugging_faces_modules(op_calls, fresh_warnings):
    # a wo replaced after patching (a quantized layer, a wrapper): Hugging Face's modules run, with it
    class Halved(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 0.5

    reference, patched, _ = pair(_pix2struct())
    for model in (reference, patched):
        mlp = model.model.encoder.layer[0].mlp
        halved = Halved(mlp.wo.in_features, mlp.wo.out_features, bias=False)
        halved.weight = mlp.wo.weight
        mlp.wo = halved
    with pytest.warns(fastvit.FastvitFallbackWarning, match="replaced"):
        torch.testing.assert_close(patched(PATCH_INPUTS), reference(PATCH_INPUTS), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == LAYERS - 1
