"""FusedPatchEmbed: weights load like timm's PatchEmbed, existing convs are reused (never copied),
the model's prefix tokens and pos_embed are passed in, and sizes are checked like timm does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastvit
from fastvit.nn import FusedPatchEmbed

ON_GPU = torch.cuda.is_available()
kernel_test = pytest.mark.interpreter if not ON_GPU else pytest.mark.gpu


def _timm_stem(embed, x, cls, pos):
    """What timm's VisionTransformer does around its PatchEmbed: cat the cls token, add pos_embed."""
    tokens = embed(x)
    return torch.cat([cls.expand(x.shape[0], -1, -1), tokens], dim=1) + pos


def test_standalone_loads_timm_weights_and_matches_timm():
    from timm.layers import PatchEmbed

    torch.manual_seed(0)
    timm_embed = PatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=24)
    fused = FusedPatchEmbed(img_size=(32, 48), patch_size=16, in_chans=3, embed_dim=24)
    assert fused.state_dict().keys() == timm_embed.state_dict().keys() == {"proj.weight", "proj.bias"}
    fused.load_state_dict(timm_embed.state_dict())
    assert (fused.grid_size, fused.num_patches) == (timm_embed.grid_size, timm_embed.num_patches)
    x, cls, pos = torch.randn(2, 3, 32, 48), torch.randn(1, 1, 24), torch.randn(1, 7, 24)
    torch.testing.assert_close(fused(x, pos_embed=pos, prefix_tokens=cls), _timm_stem(timm_embed, x, cls, pos))
    torch.testing.assert_close(fused(x), timm_embed(x))


@kernel_test
def test_kernel_route_matches_timm(kernel_device):
    from timm.layers import PatchEmbed

    torch.manual_seed(1)
    timm_embed = PatchEmbed(img_size=32, patch_size=16, in_chans=3, embed_dim=32).to(kernel_device)
    fused = FusedPatchEmbed.from_conv(timm_embed.proj, img_size=32)
    x = torch.randn(3, 3, 32, 32, device=kernel_device)
    cls, pos = torch.randn(1, 1, 32, device=kernel_device), torch.randn(1, 5, 32, device=kernel_device)
    with fastvit.backend("triton"):
        out = fused(x, pos_embed=pos, prefix_tokens=cls)
    torch.testing.assert_close(out, _timm_stem(timm_embed, x, cls, pos), rtol=1e-5, atol=1e-5)


def test_from_timm_proj_shares_the_conv():
    from timm.layers import PatchEmbed

    timm_embed = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    fused = FusedPatchEmbed.from_conv(timm_embed.proj, img_size=32)
    assert fused.proj is timm_embed.proj and fused.conv is timm_embed.proj
    assert [p.data_ptr() for p in fused.parameters()] == [p.data_ptr() for p in timm_embed.parameters()]
    assert fused.state_dict().keys() == timm_embed.state_dict().keys()
    # the module owns nothing besides the conv: no buffers, no parameters of its own
    assert list(fused.buffers()) == [] and len(list(fused.parameters())) == 2


def test_from_torchvision_conv_proj_keeps_the_name():
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    fused = FusedPatchEmbed.from_conv(model.conv_proj, name="conv_proj", img_size=32)
    assert fused.conv_proj is model.conv_proj
    assert set(fused.state_dict()) == {"conv_proj.weight", "conv_proj.bias"}
    x = torch.randn(2, 3, 32, 32)
    # torchvision: conv, reshape to (B, D, N), permute, then cat class_token and add pos_embedding
    tokens = model.conv_proj(x).reshape(2, 16, -1).permute(0, 2, 1)
    expected = torch.cat([model.class_token.expand(2, -1, -1), tokens], dim=1) + model.encoder.pos_embedding
    out = fused(x, pos_embed=model.encoder.pos_embedding, prefix_tokens=model.class_token)
    torch.testing.assert_close(out, expected)


def test_from_hugging_face_projection_keeps_the_name():
    from transformers import ViTConfig
    from transformers.models.vit.modeling_vit import ViTPatchEmbeddings

    config = ViTConfig(hidden_size=16, image_size=32, patch_size=8, num_channels=3)
    hf = ViTPatchEmbeddings(config)
    fused = FusedPatchEmbed.from_conv(hf.projection, name="projection", img_size=32)
    assert fused.projection is hf.projection
    assert fused.state_dict().keys() == hf.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused(x), hf(x))


def test_dynamic_img_pad_matches_timm():
    from timm.layers import PatchEmbed

    torch.manual_seed(2)
    timm_embed = PatchEmbed(img_size=None, patch_size=8, in_chans=3, embed_dim=16, strict_img_size=False,
                            dynamic_img_pad=True)
    fused = FusedPatchEmbed.from_conv(timm_embed.proj, dynamic_img_pad=True)
    x = torch.randn(2, 3, 21, 30)  # 3x4 patches, the last row and column padded
    torch.testing.assert_close(fused(x), timm_embed(x))


def test_size_errors():
    fused = FusedPatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16)
    with pytest.raises(ValueError, match=r"input image size \(32, 40\) does not match .*\(32, 32\)"):
        fused(torch.randn(1, 3, 32, 40))
    loose = FusedPatchEmbed(img_size=None, patch_size=8, in_chans=3, embed_dim=16)
    assert loose(torch.randn(1, 3, 16, 40)).shape == (1, 10, 16)  # any multiple of p
    with pytest.raises(ValueError, match=r"\(20, 40\) must be multiples of the patch size 8.*dynamic_img_pad=True"):
        loose(torch.randn(1, 3, 20, 40))
    with pytest.raises(ValueError, match="x has 4 channels but weight expects 3"):
        loose(torch.randn(1, 4, 16, 16))


@pytest.mark.parametrize(
    "conv,pattern",
    [
        (nn.Conv2d(3, 8, 16, stride=8), r"stride \(8, 8\) != kernel_size \(16, 16\)"),
        (nn.Conv2d(3, 8, 16, stride=16, padding=1), r"padding \(1, 1\) is not 0"),
        (nn.Conv2d(3, 8, (16, 8), stride=(16, 8)), r"kernel_size \(16, 8\) is not square"),
        (nn.Conv2d(4, 8, 16, stride=16, groups=2), r"groups 2 is not 1"),
        (nn.Conv2d(3, 8, 4, stride=4, dilation=2), r"dilation \(2, 2\) is not 1"),
    ],
)
def test_from_conv_rejects_convs_that_are_not_patchifiers(conv, pattern):
    with pytest.raises(ValueError, match=pattern):
        FusedPatchEmbed.from_conv(conv)


def test_from_conv_rejects_other_modules_and_clashing_names():
    with pytest.raises(TypeError, match=r"exactly nn\.Conv2d.*got Linear"):
        FusedPatchEmbed.from_conv(nn.Linear(3, 8))
    with pytest.raises(ValueError, match=r"name must be an identifier.*'forward'"):
        FusedPatchEmbed.from_conv(nn.Conv2d(3, 8, 4, stride=4), name="forward")
    with pytest.raises(ValueError, match="square patches"):
        FusedPatchEmbed(patch_size=(16, 8))


def test_extra_repr_describes_the_module():
    text = repr(FusedPatchEmbed(img_size=224, patch_size=14, in_chans=3, embed_dim=384, dynamic_img_pad=True))
    for part in ("img_size=(224, 224)", "patch_size=14", "in_chans=3", "embed_dim=384", "dynamic_img_pad=True",
                 "backend=auto", "(proj): Conv2d(3, 384"):
        assert part in text, part


def test_from_conv_rejects_conv_subclasses():
    """timm's StdConv2d standardizes its weight in forward; the fused op would read the raw weight
    (an error of ~15 before this check): only nn.Conv2d itself is taken."""
    from timm.layers import StdConv2d

    with pytest.raises(TypeError, match=r"exactly nn\.Conv2d.*StdConv2d"):
        FusedPatchEmbed.from_conv(StdConv2d(3, 8, 4, stride=4))

    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match=r"exactly nn\.Conv2d"):
        FusedPatchEmbed.from_conv(Scaled(3, 8, 4, stride=4))
    FusedPatchEmbed.from_conv(nn.Conv2d(3, 8, 4, stride=4))  # the class itself is fine


def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module("fastvit.backend"), "_warned", set())


def test_a_hook_on_the_conv_runs_the_conv(monkeypatch):
    """FusedPatchEmbed read the conv's weight without calling it: a forward hook on the conv (here one
    scaling its output) was ignored, 0.68 off. Such calls run the conv as a module, with one warning."""
    _fresh_warnings(monkeypatch)
    torch.manual_seed(13)
    conv = nn.Conv2d(3, 16, 4, stride=4)
    embed = FusedPatchEmbed.from_conv(conv, img_size=(8, 12))
    x, cls, pos = torch.randn(2, 3, 8, 12), torch.randn(1, 1, 16), torch.randn(1, 7, 16)
    handle = conv.register_forward_hook(lambda m, args, out: out * 2)
    expected = torch.cat([cls.expand(2, -1, -1), (conv(x)).flatten(2).transpose(1, 2)], dim=1) + pos
    with fastvit.backend("torch"), pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on proj"):
        torch.testing.assert_close(embed(x, pos_embed=pos, prefix_tokens=cls), expected)
    handle.remove()
    expected = torch.cat([cls.expand(2, -1, -1), (conv(x)).flatten(2).transpose(1, 2)], dim=1) + pos
    with fastvit.backend("torch"):
        torch.testing.assert_close(embed(x, pos_embed=pos, prefix_tokens=cls), expected)


def test_a_conv_whose_settings_change_runs_the_conv(monkeypatch):
    # the fused op computes the patchifier from_conv checked: a stride changed later was ignored
    _fresh_warnings(monkeypatch)
    torch.manual_seed(14)
    conv = nn.Conv2d(3, 16, 4, stride=4)
    embed = FusedPatchEmbed.from_conv(conv, strict_img_size=False)
    x = torch.randn(1, 3, 8, 8)
    conv.stride = (2, 2)
    with fastvit.backend("torch"), pytest.warns(fastvit.FastvitFallbackWarning, match="stride, padding"):
        out = embed(x)
    torch.testing.assert_close(out, conv(x).flatten(2).transpose(1, 2))
    assert out.shape == (1, 9, 16)
    # a whole module pickled before the settings were kept (no attribute): the fused op, no error
    conv.stride = (4, 4)
    del embed.conv_settings
    with fastvit.backend("torch"):
        torch.testing.assert_close(embed(x), conv(x).flatten(2).transpose(1, 2))
