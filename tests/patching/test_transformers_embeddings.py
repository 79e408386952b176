"""Hugging Face's ViT-MSN, I-JEPA, ViTMAE, BEiT and data2vec-vision embeddings as one
fastvit.patch_embed call (fastvit.nn.hf_embeddings).

Each model's output and every gradient by the tolerance rule against the unpatched model in float64;
the op's arguments are the model's own Parameters (the class token, the position embedding, or
its patch rows for ViTMAE, whose random masking then draws as Hugging Face's from the same noise);
the calls the op does not cover run Hugging Face's forward (``bool_masked_pos``,
``interpolate_pos_encoding``, BEiT's position embedding at another grid, a hook on the projection);
BEiT without an absolute position embedding at any size (a partial patch dropped as its conv
drops it); data2vec-vision's (tokens, grid) output; the Triton kernels in the interpreter. Tiny
configs (16 px images, 4 x 4 patches, dim 32), no downloads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, images, perturb_

transformers = pytest.importorskip("transformers")
T = transformers

from fastvit.nn import hf_embeddings  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=4)  # fmt: skip


@dataclass(frozen=True)
class Case:
    model: Callable[..., nn.Module]  # (config) -> model
    config: type
    fused: type
    prefix: Callable[[nn.Module], torch.Tensor | None]  # the embeddings' tokens the op gets
    pos_embed: Callable[[nn.Module], torch.Tensor | None]
    inputs: Callable[[torch.Tensor], dict] = lambda x: {"pixel_values": x}


def _mae_noise(batch: int) -> torch.Tensor:
    return torch.rand(batch, 16, generator=torch.Generator().manual_seed(2))


CASES = {
    "vit_msn": Case(T.ViTMSNModel, T.ViTMSNConfig, hf_embeddings.FusedViTMSNEmbeddings, lambda e: e.cls_token,
                    lambda e: e.position_embeddings),
    "ijepa": Case(T.IJepaModel, T.IJepaConfig, hf_embeddings.FusedIJepaEmbeddings, lambda e: None,
                  lambda e: e.position_embeddings),
    "beit": Case(T.BeitModel, T.BeitConfig, hf_embeddings.FusedBeitEmbeddings, lambda e: e.cls_token, lambda e: None),
    "beit_abs_pos": Case(lambda c: T.BeitModel(c), lambda **kw: T.BeitConfig(use_absolute_position_embeddings=True,
                         **kw), hf_embeddings.FusedBeitEmbeddings, lambda e: e.cls_token,
                         lambda e: e.position_embeddings),
    "data2vec_vision": Case(T.Data2VecVisionModel, T.Data2VecVisionConfig,
                            hf_embeddings.FusedData2VecVisionEmbeddings, lambda e: e.cls_token, lambda e: None),
    # the op adds the patch rows of the position embedding; masking keeps 4 of 16 patches, drawn from the noise
    "vit_mae": Case(T.ViTMAEModel, T.ViTMAEConfig, hf_embeddings.FusedViTMAEEmbeddings, lambda e: None,
                    lambda e: e.position_embeddings, lambda x: {"pixel_values": x, "noise": _mae_noise(x.shape[0])}),
}


class _Hidden(nn.Module):
    """The model's last hidden state from (pixel_values -> the case's inputs)."""

    def __init__(self, model: nn.Module, inputs: Callable[[torch.Tensor], dict]) -> None:
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**self.inputs(x)).last_hidden_state


def build(name: str, **overrides) -> nn.Module:
    case = CASES[name]
    return _Hidden(perturb_(case.model(case.config(**(VISION | overrides)))), case.inputs).eval()


def pair(name: str, **overrides) -> tuple[nn.Module, nn.Module, fastvit.PatchReport]:
    reference = build(name, **overrides)
    patched = copy.deepcopy(reference)
    return reference, patched, fastvit.patch(patched)


@pytest.mark.parametrize("name", sorted(CASES))
def test_embeddings_match_unpatched_with_the_models_parameters(name, op_calls):
    case = CASES[name]
    reference, patched, report = pair(name)
    embeddings = patched.model.embeddings
    assert type(embeddings) is case.fused and isinstance(embeddings, type(reference.model.embeddings))
    assert report.counts()["patch_embed"] == 1 and not [e for e in report.skipped if e.part == "patch_embed"]
    assert_matches_by_the_rule(reference, patched, images())
    (call,) = op_calls["patch_embed"][:1]
    projection = embeddings.patch_embeddings.projection
    assert call["args"][1] is projection.weight and call["args"][2] is projection.bias
    assert call["kwargs"].get("prefix_tokens") is case.prefix(embeddings)
    pos_embed, want = call["kwargs"].get("pos_embed"), case.pos_embed(embeddings)
    if name == "vit_mae":  # the patch rows, a view of the (1, 1+N, D) Parameter
        assert pos_embed._base is want and pos_embed.shape == (1, 16, 32)
    else:
        assert pos_embed is want


def test_data2vec_vision_returns_the_grid_as_hugging_face():
    reference, patched, _ = pair("data2vec_vision")
    x = images(size=(16, 24))
    want, got = reference.model.embeddings(x), patched.model.embeddings(x)
    assert got[1] == want[1] == (4, 6)
    torch.testing.assert_close(got[0], want[0])


@pytest.mark.parametrize("name", ["beit", "data2vec_vision"])
def test_beit_without_absolute_positions_any_size(name, op_calls):
    reference, patched, _ = pair(name)
    assert_matches_by_the_rule(reference, patched, images(size=(24, 20)))
    assert len(op_calls["patch_embed"]) == 1  # the patched model's run
    assert_matches_by_the_rule(reference, patched, images(size=(18, 16)))  # 18 rows: the conv (and the op) drop 2
    assert len(op_calls["patch_embed"]) == 2


def test_beit_position_embedding_at_another_grid_runs_hugging_face(op_calls):
    reference, patched, _ = pair("beit_abs_pos")
    for size in ((24, 24), (16, 20)):  # resampled, and non-square: Hugging Face resamples both
        assert_matches_by_the_rule(reference, patched, images(size=size))
    assert op_calls["patch_embed"] == []


@pytest.mark.parametrize("name", ["vit_msn", "ijepa", "beit"])
def test_masked_image_modeling_runs_hugging_face(name, op_calls):
    # bool_masked_pos swaps masked patches for the mask token: Hugging Face's forward
    if name == "beit":
        reference = T.BeitModel(T.BeitConfig(**VISION, use_mask_token=True))
    else:
        reference = CASES[name].model(CASES[name].config(**VISION), use_mask_token=True)
    reference = perturb_(reference).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(1)) < 0.5
    got = patched(pixel_values=images(), bool_masked_pos=mask).last_hidden_state
    torch.testing.assert_close(got, reference(pixel_values=images(), bool_masked_pos=mask).last_hidden_state)
    assert op_calls["patch_embed"] == []


@pytest.mark.parametrize("name", ["vit_msn", "vit_mae"])
def test_interpolate_pos_encoding_runs_hugging_face(name, op_calls):
    reference, patched, _ = pair(name)
    x = images(size=24)
    inputs = CASES[name].inputs(x) | {"interpolate_pos_encoding": True}
    if name == "vit_mae":
        inputs["noise"] = torch.rand(3, 36, generator=torch.Generator().manual_seed(2))
    got, want = patched.model(**inputs).last_hidden_state, reference.model(**inputs).last_hidden_state
    torch.testing.assert_close(got, want)
    assert op_calls["patch_embed"] == []


def test_other_size_keeps_hugging_faces_error():
    _, patched, _ = pair("vit_msn")
    with pytest.raises(ValueError, match=r"Input image size \(24\*24\) doesn't match model \(16\*16\)"):
        patched(images(size=24))


def test_hook_on_the_projection_runs_hugging_face(op_calls, fresh_warnings):
    reference, patched, _ = pair("beit")
    for model in (reference, patched):
        model.model.embeddings.patch_embeddings.projection.register_forward_hook(lambda m, a, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()))
    assert op_calls["patch_embed"] == []


def test_unpatch_restores_the_embeddings():
    for name in CASES:
        model = build(name)
        before = type(model.model.embeddings)
        fastvit.patch(model)
        fastvit.unpatch(model)
        assert type(model.model.embeddings) is before


def test_embeddings_fastvit_does_not_fuse_are_named_in_the_report():
    # the patch embeddings of SAM's encoder, YOLOS (its detection tokens), VideoMAE (a Conv3d over
    # tubelets) and AIMv2 (an RMS norm after the conv): each named with its path, its modules left as
    # they are; the projection holder inside an embedding fastvit fuses (ViT-MSN's) is not
    models = {
        "vision_encoder.patch_embed": T.SamVisionModel(T.SamVisionConfig(**VISION, output_channels=8)),
        "embeddings.patch_embeddings": T.YolosModel(
            T.YolosConfig(**(VISION | dict(image_size=[16, 16])), num_detection_tokens=2)
        ),
        "embeddings": T.Aimv2VisionModel(T.Aimv2VisionConfig(**VISION)),
    }
    for path, model in models.items():
        report = fastvit.patch(model)
        (entry,) = [e for e in report.skipped if e.part == "patch_embed"]
        assert entry.where == path and "is not a patch embedding fastvit fuses" in entry.detail
        assert type(model.get_submodule(path)).__module__.startswith("transformers.")  # left as it is
    video = T.VideoMAEModel(T.VideoMAEConfig(**VISION, num_frames=2, tubelet_size=2))
    assert "VideoMAEPatchEmbeddings" in str(fastvit.patch(video))
    report = fastvit.patch(build("vit_msn").model)
    assert not report.skipped and report.counts()["patch_embed"] == 1


def test_patch_embeddings_of_other_shapes_are_named_in_the_report():
    # a patch Linear over pre-cut patches (SigLIP2's NaFlex embedding), a patch conv the vision
    # model holds itself (Pixtral's patch_conv) and an overlapping conv (Hiera's 7 x 7 at stride
    # 4; CvT's): each named, with its attention and MLP halves fused as before
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    models = {
        "embeddings": T.Siglip2VisionModel(T.Siglip2VisionConfig(**layers, patch_size=4, num_patches=16)),
        "patch_conv": T.PixtralVisionModel(T.PixtralVisionConfig(**layers, image_size=16, patch_size=4)),
        "embeddings.patch_embeddings": T.HieraModel(T.HieraConfig(embed_dim=8, depths=[1] * 4, num_heads=[1] * 4)),
    }
    for path, model in models.items():
        report = fastvit.patch(model)
        (entry,) = [e for e in report.skipped if e.part == "patch_embed"]
        assert entry.where == path and "is not a patch embedding fastvit fuses" in entry.detail
        assert report.counts()["attention"] >= 1 and report.counts()["mlp"] >= 1
    cvt = T.CvtModel(T.CvtConfig(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 3]))
    named = [e.where for e in fastvit.patch(cvt).skipped if e.part == "patch_embed"]
    assert named == [f"encoder.stages.{i}.embedding.convolution_embeddings" for i in range(3)]


@pytest.mark.interpreter
def test_triton_route(op_calls):
    for name in ("ijepa", "beit_abs_pos", "data2vec_vision", "vit_mae"):
        reference, patched, _ = pair(name)
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, images(batch=1))
    assert len(op_calls["patch_embed"]) == 4

