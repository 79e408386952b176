"""Patched models under ``torch.compile(fullgraph=True)``: a graph break at a fastvit op (or
anywhere in a fused module) fails the test.

On the CPU the graphs are built with the ``aot_eager`` backend (no C++ compiler needed): the torch
route of each family, and the Triton route (the ops as ``torch.library`` custom ops with fake
implementations, kernels in the interpreter) on a tiny timm ViT. On a GPU: a patched timm
ViT-B/16 through inductor in bf16.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    HAS_PATCH_EMBED,
    assert_outputs_and_grads_match,
    hf_classifier,
    images,
    pair,
    timm_vit,
    torchvision_vit,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(model, fullgraph=True, backend="aot_eager")


# family -> (model, how to get a tensor out of it). The timm model has every training fallback
# on: attention dropout, MLP dropout and drop path (the fallbacks must not break the graph either).
FAMILIES = {
    "timm": lambda: (
        timm_vit(reg_tokens=1, init_values=0.5, attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.3),
        lambda m, x: m(x),
    ),
    "torchvision": lambda: (torchvision_vit(), lambda m, x: m(x)),
    "transformers": lambda: (hf_classifier(), lambda m, x: m(x).logits),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fullgraph_torch_route(family):
    pytest.importorskip(family)
    model, run = FAMILIES[family]()
    reference, patched, _ = pair(model.train())
    compiled = _compiled(patched)
    with fastvit.backend("torch"):
        assert_outputs_and_grads_match(reference, compiled, images(), run=run, rtol=1e-5, atol=1e-5, seed=4)


@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fullgraph_with_dynamic_shapes(route):
    """Dynamic shapes: ``dynamic=True`` traces the attention's float ``scale`` and the norms' ``eps``
    as symbolic floats (math.isfinite of them failed the graph), and a second call at another image
    size makes the token count symbolic (the torch route's overlap check sorted symbolic strides:
    "sort with non-constant keys"). The unpatched model compiles both ways."""
    pytest.importorskip("timm")
    reference, patched, _ = pair(timm_vit(img_size=8, dynamic_img_size=True).eval())
    first, second = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 12, 8)
    with fastvit.backend(route), torch.no_grad():
        for dynamic in (True, None):
            torch._dynamo.reset()
            compiled = torch.compile(patched, fullgraph=True, backend="eager", dynamic=dynamic)
            for x in (first, second):
                torch.testing.assert_close(compiled(x), reference(x), rtol=1e-4, atol=1e-5)


def test_dynamic_image_size_training_at_two_sizes():
    """A second image size with autograd on: the pos_embed resample's size read off the images'
    own symbolic shape made PyTorch's fake bicubic-antialias backward fail ("isIntList() INTERNAL
    ASSERT FAILED"); read off patch_embed's output as timm does, it compiles. The unpatched model
    compiles too."""
    pytest.importorskip("timm")
    reference, patched, _ = pair(timm_vit(img_size=8, dynamic_img_size=True).train())
    compiled = torch.compile(patched, backend="aot_eager")
    with fastvit.backend("torch"):
        for x in (torch.randn(2, 3, 8, 8), torch.randn(2, 3, 12, 8)):
            assert_outputs_and_grads_match(reference, compiled, x, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_fullgraph_triton_route_in_the_interpreter(op_calls):
    # 8x8 images, patch 4, dim 32, 2 heads, 2 blocks: 4 patches + cls + 1 register = 6 tokens
    pytest.importorskip("timm")
    reference, patched, _ = pair(timm_vit(img_size=8, reg_tokens=1, init_values=0.5).train())
    compiled = _compiled(patched)
    with fastvit.backend("triton"):
        # the kernels accumulate in another order than PyTorch's fp32 matmuls
        assert_outputs_and_grads_match(reference, compiled, torch.randn(3, 3, 8, 8), rtol=1e-4, atol=1e-5)
    # traced through each op (its custom ops, on this route)
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
    assert op_calls["patch_embed"] or not HAS_PATCH_EMBED


@pytest.mark.gpu
def test_fullgraph_vit_base_patch16_on_gpu():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().train()
    _, patched, report = pair(reference)
    assert report.counts()["attention"] == 12 and report.counts()["mlp"] == 12
    compiled = torch.compile(patched, fullgraph=True)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = reference(x), compiled(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    got.float().square().mean().backward()
    want.float().square().mean().backward()
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        scale = q.grad.abs().max().item() + 1e-6
        assert (p.grad - q.grad).abs().max().item() <= 5e-2 * scale, name
