"""Patched models through the Triton kernels (``fastvit.backend("triton")``), in the interpreter.

Tiny models, as the interpreter is slow: 8x8 images with 4x4 patches (4 patch tokens + prefix),
dim 32, 2 heads (head_dim 16), 2 blocks, batch 3. fp32 kernels use IEEE fp32 dots but accumulate
in another order than PyTorch's matmuls, hence rtol 1e-4 / atol 1e-5 instead of the torch route's
1e-5 / 1e-6.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    DEPTH,
    HAS_PATCH_EMBED,
    assert_outputs_and_grads_match,
    hf_classifier,
    pair,
    timm_vit,
    torchvision_vit,
)

pytestmark = pytest.mark.interpreter


def _check(reference, patched, op_calls, run=None) -> None:
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with fastvit.backend("triton"):
        kwargs = {"run": run} if run else {}
        # two backward passes: gradients accumulated as over micro-batches
        assert_outputs_and_grads_match(reference, patched, x, rtol=1e-4, atol=1e-5, backward_passes=2, **kwargs)
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == DEPTH
    assert len(op_calls["patch_embed"]) == (1 if HAS_PATCH_EMBED else 0)


def test_timm(op_calls):
    pytest.importorskip("timm")
    # cls + 2 registers (prefix 3), LayerScale, qk_norm: the most operands on every op
    reference, patched, _ = pair(timm_vit(img_size=8, reg_tokens=2, qk_norm=True, init_values=0.5).eval())
    _check(reference, patched, op_calls)


def test_torchvision(op_calls):
    pytest.importorskip("torchvision")
    reference, patched, _ = pair(torchvision_vit(image_size=8).eval())
    _check(reference, patched, op_calls)


def test_transformers(op_calls):
    pytest.importorskip("transformers")
    reference, patched, _ = pair(hf_classifier(image_size=8).eval())
    _check(reference, patched, op_calls, run=lambda m, x: m(x).logits)


def test_per_sample_gradients_under_vmap(op_calls, fresh_warnings):
    # torch.func.vmap(grad(...)) over a patched model: the kernels have no batching rule, so under
    # vmap the ops run PyTorch's route (said once per op), where vmap raised before
    pytest.importorskip("timm")
    reference, patched, _ = pair(timm_vit(img_size=8).eval())
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, image):
            return torch.func.functional_call(model, p, (image[None],)).pow(2).sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)

    with fastvit.backend("triton"), pytest.warns(fastvit.FastvitFallbackWarning, match="vmap"):
        got = per_sample(patched)
    want = per_sample(reference)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(op_calls["flash_attention"]) == DEPTH  # the public ops ran (on their torch route)
