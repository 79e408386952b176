"""torch.export of the timm families fused beyond ViT's own blocks: the exported graph keeps
fastvit's custom ops (the Triton route; kernels in the interpreter here) where the patched model
calls them, and the exported module computes what the unpatched model does. The generic drop-in
checks (tests/patching/test_tracing.py) export timm's ViT, torchvision's and Hugging Face's; each
family here has its own fused classes and forwards (window masks, learnable biases, channels-first
maps, two MLP halves per block, cross-covariance attention, an MLP branch beside the block's input,
a post-norm block's MLP alone),
any of which could break a capture.

The models are each family test's own tiny builds (no downloads), one batch size, static shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

pytest.importorskip("timm")

from tests.patching import (
    test_timm_apple_fastvit,
    test_timm_convit,
    test_timm_convnext,
    test_timm_edgenext,
    test_timm_efficientformer,
    test_timm_maxxvit,
    test_timm_post_norm,
    test_timm_relpos,
    test_timm_swinv2_cr,
    test_timm_tnt,
    test_timm_volo,
)
from tests.patching.helpers import assert_exports_with_ops

# family -> (its tiny model, its input, the custom ops its graph must hold)
ATTENTION, MLP = "fastvit.flash_attention_fwd.default", "fastvit.layernorm_mlp_fwd.default"
EMBED = "fastvit.patch_embed_fwd.default"
FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], torch.Tensor], set[str]]] = {
    "swinv2_cr": (test_timm_swinv2_cr.build, lambda: test_timm_swinv2_cr.images(batch=1), {ATTENTION, MLP}),
    "efficientformer": (test_timm_efficientformer.build, lambda: test_timm_efficientformer.images(batch=1),
                        {ATTENTION, MLP}),
    "edgenext": (test_timm_edgenext.build, test_timm_edgenext.images, {ATTENTION, MLP}),
    "apple_fastvit": (test_timm_apple_fastvit.build, lambda: test_timm_apple_fastvit.images(batch=1), {ATTENTION}),
    "tnt": (test_timm_tnt.build, test_timm_tnt.images, {ATTENTION, MLP}),
    "volo": (test_timm_volo.build, lambda: test_timm_volo.images(batch=2), {ATTENTION, MLP}),
    "convit": (test_timm_convit.build, lambda: test_timm_convit.images(batch=2), {ATTENTION, MLP, EMBED}),
    "tiny_vit": (lambda: test_timm_relpos.tiny_vit().eval(), lambda: torch.randn(2, 3, 64, 64), {ATTENTION, MLP}),
    "coatnet": (lambda: test_timm_maxxvit.build("coatnet_nano_rw", img_size=32), lambda: torch.randn(2, 3, 32, 32),
                {ATTENTION, MLP}),
    "convnext": (lambda: test_timm_convnext.build("conv_mlp"), lambda: test_timm_convnext.images(batch=1), {MLP}),
    # a post-norm block's MLP alone (norm="none"), GluMlp packed
    "eva_post_norm": (lambda: test_timm_post_norm.build("eva_post_norm_swiglu"), test_timm_post_norm.images,
                      {EMBED, ATTENTION, MLP}),
}  # fmt: skip


@pytest.mark.interpreter
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_keeps_the_custom_ops(family):
    build, images, ops = FAMILIES[family]
    assert_exports_with_ops(build(), images(), ops)
