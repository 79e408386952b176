"""Every patch embedding fastvit fuses (timm, torchvision, Hugging Face), given images its projection
does not take as they are, does what the unpatched model does (``fastvit.nn.fused.conv_takes``).

- Pixels of another dtype than the model's (float32 images into a float64 model and back): where
  Hugging Face's projection holder casts the pixels to the conv's dtype (CLIP, SigLIP, DINOv2 / v3,
  data2vec-vision, InternVL) the fused call casts them too and the tokens match; where the conv (or
  NaFlex's Linear) takes them as given (timm, torchvision, Hugging Face's ViT, DeiT, ViT-MSN, I-JEPA,
  ViTMAE, BEiT, OWL-ViT) the call runs the original forward, which raises its own error.
- Images with other channels than the conv's, or without a batch dimension: the original forward's
  error, message for message, where the op would raise its own.

Tiny models, no downloads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import perturb_

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=4)  # fmt: skip
TIMM = dict(depth=1, embed_dim=32, num_heads=2)


def _hf(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.embeddings(x)
    return out[0] if isinstance(out, tuple) else out  # data2vec-vision's grid, ViTMAE's mask left out


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_features(x)


def _torchvision_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )


# {family: (a tiny model, (model, pixels) -> what runs the embedding, pixel size, whether it casts)}
FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable, int, bool]] = {
    "hf_clip": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)), _hf, 16, True),
    "hf_siglip": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)), _hf, 16, True),
    "hf_dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**VISION)), _hf, 16, True),
    "hf_dinov2_registers": (lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**VISION)), _hf, 16, True),
    "hf_dinov3": (lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**VISION)), _hf, 16, True),
    "hf_data2vec_vision": (
        lambda: T.Data2VecVisionModel(T.Data2VecVisionConfig(**VISION, use_absolute_position_embeddings=True)),
        _hf, 16, True,
    ),
    "hf_internvl": (lambda: T.InternVLVisionModel(T.InternVLVisionConfig(**VISION)), _hf, 16, True),
    "hf_vit": (lambda: T.ViTModel(T.ViTConfig(**VISION)), _hf, 16, False),
    "hf_deit": (lambda: T.DeiTModel(T.DeiTConfig(**VISION)), _hf, 16, False),
    "hf_vit_msn": (lambda: T.ViTMSNModel(T.ViTMSNConfig(**VISION)), _hf, 16, False),
    "hf_ijepa": (lambda: T.IJepaModel(T.IJepaConfig(**VISION)), _hf, 16, False),
    "hf_vit_mae": (lambda: T.ViTMAEModel(T.ViTMAEConfig(**VISION, mask_ratio=0.0)), _hf, 16, False),
    "hf_beit": (lambda: T.BeitModel(T.BeitConfig(**VISION)), _hf, 16, False),
    "hf_beit_abs_pos": (
        lambda: T.BeitModel(T.BeitConfig(**VISION, use_absolute_position_embeddings=True)), _hf, 16, False,
    ),
    "hf_owlvit": (lambda: T.OwlViTVisionModel(T.OwlViTVisionConfig(**VISION)).vision_model, _hf, 16, False),
    "timm_vit": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, **TIMM), _features, 32, False),
    "timm_deit_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, **TIMM), _features, 32, False,
    ),
    "timm_eva02": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, **TIMM), _features, 28, False),
    "timm_beitv2": (lambda: timm.create_model("beitv2_base_patch16_224", img_size=32, **TIMM), _features, 32, False),
    "timm_relpos": (
        lambda: timm.create_model("vit_relpos_small_patch16_224", img_size=32, **TIMM), _features, 32, False,
    ),
    "timm_samvit": (
        lambda: timm.create_model("samvit_base_patch16", img_size=32, global_attn_indexes=(), window_size=2, **TIMM),
        _features, 32, False,
    ),
    "timm_naflex": (lambda: timm.create_model("naflexvit_base_patch16_gap", **TIMM), _features, 32, False),
    "torchvision_vit": (_torchvision_vit, lambda model, x: model(x), 32, False),
}


@pytest.mark.parametrize("model_dtype, pixel_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)],
                         ids=["float32_pixels", "float64_pixels"])  # fmt: skip
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixels_of_another_dtype_as_unpatched(family, model_dtype, pixel_dtype, op_calls):
    build, call, size, casts = FAMILIES[family]
    reference = perturb_(build()).eval().to(model_dtype)
    patched = copy.deepcopy(reference)
    assert fastvit.patch(patched).counts()["patch_embed"] == 1
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=pixel_dtype)
    if casts:
        torch.manual_seed(0)
        got = call(patched, x)
        torch.manual_seed(0)
        want = call(reference, x)
        assert got.dtype == want.dtype == model_dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert len(op_calls["patch_embed"]) == 1 and op_calls["patch_embed"][0]["args"][0].dtype == model_dtype
        return
    with pytest.raises(RuntimeError) as want:
        call(reference, x)
    with pytest.raises(RuntimeError) as got:
        call(patched, x)
    assert str(got.value) == str(want.value)  # the projection's own error, from the original forward
    assert op_calls["patch_embed"] == []


@pytest.mark.parametrize("images", ["4_channels", "no_batch_dim"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_images_the_projection_refuses_raise_the_original_error(family, images, op_calls):
    build, call, size, _ = FAMILIES[family]
    reference = perturb_(build()).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    shape = (2, 4, size, size) if images == "4_channels" else (3, size, size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception) as want:
        call(reference, x)
    with pytest.raises(Exception) as got:
        call(patched, x)
    assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))
    assert op_calls["patch_embed"] == []
