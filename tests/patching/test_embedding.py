"""The model side of the patch-embed fusion: which prefix tokens in which order, which position
embedding (resampled under timm's ``dynamic_img_size``), the model's own Parameters.

``fastvit.reference.patch_embed`` (the float64-capable oracle) stands in for the op here, so this
is checked whether or not ``fastvit.patch_embed`` exists; the family tests run the real op when it
does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import reference
from tests.patching.helpers import (
    assert_outputs_and_grads_match,
    hf_classifier,
    images,
    module_types,
    pair,
    timm_model,
    timm_vit,
    torchvision_vit,
)


@dataclass(frozen=True)
class Case:
    family: str
    build: Callable[[], nn.Module]
    size: int | tuple[int, int] = 16
    prefix: Callable[[nn.Module], list[torch.Tensor]] | None = None  # the model's tokens, in order
    pos_embed: Callable[[nn.Module], torch.Tensor | None] | None = None  # None: resampled


CASES = {
    "timm_vit": Case("timm", lambda: timm_vit(), 16, lambda m: [m.cls_token], lambda m: m.pos_embed),
    "timm_registers": Case(
        "timm",
        lambda: timm_vit(reg_tokens=2),
        16,
        lambda m: [m.cls_token, m.reg_token],
        lambda m: m.pos_embed,
    ),
    "timm_registers_only": Case(  # pos_embed (1, N, D) covers the patches only
        "timm",
        lambda: timm_vit(class_token=False, reg_tokens=1, no_embed_class=True, global_pool="avg"),
        16,
        lambda m: [m.reg_token],
        lambda m: m.pos_embed,
    ),
    "timm_no_pos_embed": Case(
        "timm", lambda: timm_vit(pos_embed="none"), 16, lambda m: [m.cls_token], lambda m: None
    ),
    "timm_dynamic_size": Case("timm", lambda: timm_vit(dynamic_img_size=True, reg_tokens=1), (20, 24)),
    "timm_dynamic_no_embed_class": Case(  # a 3x5 grid against 4x4: resampled down in one dim, up in the other
        "timm", lambda: timm_vit(dynamic_img_size=True, no_embed_class=True), (12, 20)
    ),
    "deit_distilled": Case(
        "timm",
        lambda: timm_model("deit_tiny_distilled_patch16_224"),
        16,
        lambda m: [m.cls_token, m.dist_token],
        lambda m: m.pos_embed,
    ),
    "deit3": Case(
        "timm",
        lambda: timm_model("deit3_small_patch16_224"),
        16,
        lambda m: [m.cls_token],
        lambda m: m.pos_embed,
    ),
    "torchvision": Case(
        "torchvision",
        lambda: torchvision_vit(),
        16,
        lambda m: [m.class_token],
        lambda m: m.encoder.pos_embedding,
    ),
    "transformers": Case(
        "transformers",
        lambda: hf_classifier(),
        16,
        lambda m: [m.vit.embeddings.cls_token],
        lambda m: m.vit.embeddings.position_embeddings,
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_embedding_with_the_reference_op(name, monkeypatch):
    case = CASES[name]
    pytest.importorskip(case.family)
    calls = []

    def stand_in(*args, **kwargs):
        calls.append((args, kwargs))
        return reference.patch_embed(*args, **kwargs)

    monkeypatch.setattr(fastvit, "patch_embed", stand_in, raising=False)
    model = case.build().eval()
    types = module_types(model)
    unpatched, patched, report = pair(model, attention=False, mlp=False)
    assert report.counts() == {"patch_embed": 1}
    run = (lambda m, x: m(x).logits) if case.family == "transformers" else (lambda m, x: m(x))
    assert_outputs_and_grads_match(unpatched, patched, images(size=case.size), run=run)

    assert len(calls) == 1
    (_, weight, bias), kwargs = calls[0]
    conv = next(m for m in patched.modules() if type(m) is nn.Conv2d)
    assert weight is conv.weight and bias is conv.bias  # the model's own Parameters, no copies
    if case.prefix is not None:
        tokens = case.prefix(patched)
        want = tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)
        assert torch.equal(kwargs["prefix_tokens"], want)
        assert len(tokens) > 1 or kwargs["prefix_tokens"] is tokens[0]
    if case.pos_embed is not None:
        assert kwargs["pos_embed"] is case.pos_embed(patched)
    fastvit.unpatch(patched)
    assert module_types(patched) == types
