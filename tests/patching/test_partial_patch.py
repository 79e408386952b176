"""Images that are not a whole number of patches, at the size a model accepts: a strict image size
such as SigLIP so400m's 384 with 14-pixel patches (27 patches and 6 pixels per side). The model's
patchifying Conv2d drops the partial patch at the bottom and right; every fused embedding
(timm, Hugging Face, ``fastvit.nn.FusedPatchEmbed``) must do the same, in its one
``fastvit.patch_embed`` call on a view of the images (no copy), and match the unpatched model by
the tolerance rule. Before, timm's ViT family and Hugging Face's ViT-layout embeddings raised the
op's "multiples of the patch size" error (vit_so400m_patch14_siglip_384 could not run patched),
and the other embeddings silently ran unfused.

Tiny configs: 18 x 18 images with 4 x 4 patches (a 4 x 4 grid, two pixels dropped per side),
dim 32, no downloads.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    ATOL,
    DIM,
    HEADS,
    PATCH,
    RTOL,
    HFLastHiddenState,
    assert_matches_by_the_rule,
    images,
    perturb_,
)

SIZE = 18  # 4 whole patches of 4 and 2 pixels left over, per side
TIMM_ARGS = dict(img_size=SIZE, patch_size=PATCH, embed_dim=DIM, depth=1, num_heads=HEADS, num_classes=5)
HF_ARGS = dict(hidden_size=DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=HEADS,
               image_size=SIZE, patch_size=PATCH)  # fmt: skip


def _timm(module: str, cls: str, **overrides) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm_module = pytest.importorskip(f"timm.models.{module}")
        return perturb_(getattr(timm_module, cls)(**(TIMM_ARGS | overrides)))

    return build


def _hf(model: str, config: str, **overrides) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        args = HF_ARGS | overrides
        return HFLastHiddenState(perturb_(getattr(transformers, model)(getattr(transformers, config)(**args))))

    return build


class _MAE(nn.Module):
    """ViTMAE's last hidden state with fixed masking noise (16 patches)."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        self.model = perturb_(transformers.ViTMAEModel(transformers.ViTMAEConfig(**HF_ARGS)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape[0], 16, generator=torch.Generator().manual_seed(2))
        return self.model(pixel_values=x, noise=noise).last_hidden_state


MODELS: dict[str, Callable[[], nn.Module]] = {
    # timm: SigLIP's layout (no class token, attention-pool head), the classic one, DeiT, EVA
    "timm_vit_siglip": _timm("vision_transformer", "VisionTransformer", class_token=False, global_pool="map"),
    "timm_vit": _timm("vision_transformer", "VisionTransformer", reg_tokens=1),
    "timm_deit_distilled": _timm("deit", "VisionTransformerDistilled"),
    "timm_eva": _timm("eva", "Eva"),
    # Hugging Face: the ViT layout, CLIP / SigLIP, DINOv2 / v3, BEiT's
    "hf_vit": _hf("ViTModel", "ViTConfig"),
    "hf_deit": _hf("DeiTModel", "DeiTConfig"),
    "hf_vit_msn": _hf("ViTMSNModel", "ViTMSNConfig"),
    "hf_ijepa": _hf("IJepaModel", "IJepaConfig"),
    "hf_vit_mae": _MAE,
    "hf_clip": _hf("CLIPVisionModel", "CLIPVisionConfig"),
    "hf_siglip": _hf("SiglipVisionModel", "SiglipVisionConfig"),
    "hf_dinov2": _hf("Dinov2Model", "Dinov2Config"),
    "hf_dinov2_registers": _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig"),
    "hf_dinov3": _hf("DINOv3ViTModel", "DINOv3ViTConfig"),
    "hf_beit_abs_pos": _hf("BeitModel", "BeitConfig", use_absolute_position_embeddings=True),
    "hf_data2vec_vision": _hf("Data2VecVisionModel", "Data2VecVisionConfig"),
}


def _assert_one_cropped_view(calls: list[dict], x: torch.Tensor) -> None:
    """One fused call, on the 16 x 16 pixels the conv reads, a view sharing the images' storage."""
    (call,) = calls
    pixels = call["args"][0]
    assert pixels.shape == (x.shape[0], 3, 16, 16)
    assert pixels.data_ptr() == x.data_ptr() and pixels.stride() == x.stride()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_partial_patch_is_dropped_as_the_conv_drops_it(name, op_calls):
    reference = MODELS[name]().eval()
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert report.counts().get("patch_embed") == 1
    x = images(size=SIZE)
    with torch.no_grad():
        patched(x)
    _assert_one_cropped_view(op_calls["patch_embed"], x)
    assert_matches_by_the_rule(reference, patched, x)


def test_fused_patch_embed_at_a_strict_size_of_partial_patches(monkeypatch):
    # timm's PatchEmbed at img_size 18 / patch 4: a 4 x 4 grid (its conv drops 2 rows and columns)
    timm_layers = pytest.importorskip("timm.layers")
    module = importlib.import_module("fastvit.nn.patch_embed")  # the module calls its own import of the op
    calls, op = [], module.patch_embed
    monkeypatch.setattr(module, "patch_embed", lambda *a, **k: calls.append({"args": a}) or op(*a, **k))
    timm_embed = perturb_(timm_layers.PatchEmbed(SIZE, PATCH, 3, DIM))
    fused = fastvit.nn.FusedPatchEmbed.from_conv(copy.deepcopy(timm_embed.proj), img_size=SIZE)
    assert fused.grid_size == timm_embed.grid_size == (4, 4)
    x = images(size=SIZE)
    torch.testing.assert_close(fused(x), timm_embed(x))
    _assert_one_cropped_view(calls, x)
    loose = fastvit.nn.FusedPatchEmbed(None, PATCH, 3, DIM)  # no strict size: as timm's assert, an error
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        loose(x)


def test_crop_keeps_whole_images_and_channels_last_as_they_are():
    from fastvit.ops.patch_embed import crop_to_patches

    whole = images(size=16)
    assert crop_to_patches(whole, PATCH) is whole
    channels_last = images(size=(18, 21)).to(memory_format=torch.channels_last)
    cropped = crop_to_patches(channels_last, PATCH)
    assert cropped.shape[-2:] == (16, 20) and cropped.stride() == channels_last.stride()
    torch.testing.assert_close(cropped, channels_last[:, :, :16, :20], rtol=0, atol=0)
    # smaller than one patch: nothing to crop to; the op's error names the patch size (not "no rows")
    tiny = images(size=3)
    assert crop_to_patches(tiny, PATCH) is tiny
    embed = fastvit.nn.FusedPatchEmbed(3, PATCH, 3, DIM)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        embed(tiny)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["timm_vit_siglip", "hf_siglip"])
def test_triton_route_reads_the_cropped_view(name, op_calls):
    # the kernel reads the view through its strides: the rows and columns past the crop are never read
    reference = MODELS[name]().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x = images(batch=1, size=SIZE)
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, x)
    assert len(op_calls["patch_embed"]) == 1


EXPORTED = {
    # its conv drops the partial patch: the fused embedding crops
    "hf_dinov3": MODELS["hf_dinov3"],
    # timm's dynamic_img_pad: the torch route pads to whole patches as timm's PatchEmbed does
    "timm_vit_dynamic_pad": _timm("vision_transformer", "VisionTransformer", dynamic_img_size=True,
                                  dynamic_img_pad=True),
}  # fmt: skip


@pytest.mark.parametrize("strict", [False, True], ids=["export", "export-strict"])
@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_export_with_free_image_sizes_as_the_unpatched_model(name, route, strict):
    """torch.export with a dynamic height and width that need not be whole patches: the unpatched
    model exports; patched, the crop's strided view (its contiguity depends on H % p), the crop's
    "is it whole" and the padding's "are the pads zero" made the tracer record H % p as a guard,
    which the Dim range rejected ("Constraints violated")."""
    from torch.export import Dim

    reference = EXPORTED[name]().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    sizes = ({2: Dim("height", min=8, max=64), 3: Dim("width", min=8, max=64)},)
    with fastvit.backend(route):
        exported = torch.export.export(patched, (images(size=SIZE),), dynamic_shapes=sizes, strict=strict)
        custom_ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
        assert ("fastvit.patch_embed_fwd.default" in custom_ops) == (route == "triton")
        for size in ((SIZE, SIZE), (22, 27), (16, 20)):
            x = images(size=size)
            with torch.no_grad():
                torch.testing.assert_close(exported.module()(x), patched(x), rtol=RTOL, atol=ATOL)
                torch.testing.assert_close(exported.module()(x), reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_dynamic_compile_recompiles_no_more_than_the_unpatched_model(name):
    """torch.compile(dynamic=True) over sizes whole and partial: the crop's "is it whole" (and the
    padding's "are the pads zero") was a guard, one more graph each time it flipped."""

    def graphs_over_sizes(model: nn.Module) -> int:
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=counting_backend, dynamic=True)
        with torch.no_grad():
            for size in ((SIZE, SIZE), (16, 20), (22, 27), (24, 24), (21, 30)):
                torch.testing.assert_close(compiled(images(size=size)), model(images(size=size)), rtol=RTOL, atol=ATOL)
        return len(graphs)

    reference = EXPORTED[name]().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    assert graphs_over_sizes(patched) == graphs_over_sizes(reference)
