"""``fastvit.unpatch`` of modules whose class was derived from their fused class after patching.

Some libraries subclass a module's class on the fly: ``torch.nn.utils.parametrize`` turns a module
of class ``C`` into a ``ParametrizedC`` (bases ``(C,)``, the parametrized tensors as properties),
FSDP2's ``fully_shard`` into an ``FSDPC`` (bases ``(FSDPModule, C)``). On a patched module ``C`` is
the fused class; unpatching gives such a module the same derivation of the original class
(``ParametrizedVisionTransformer``, ``FSDPBlock``), so the parametrization or the sharding keeps
working, and removing the parametrization afterwards leaves exactly the original class. A class
that cannot be derived again makes ``unpatch`` raise before it changes anything.

Each model is compared with an unpatched deep copy carrying the same change (fp32, torch route).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

import fastvit
from fastvit.nn.fused import FusedModule
from tests.patching.helpers import ATOL, RTOL, hf_classifier, images, module_types, timm_vit, torchvision_vit

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")


class Double(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


# A fused module's own Parameter: (model, the module's path, the Parameter's name)
OWN_PARAMETERS = {
    "timm pos_embed": (lambda: timm_vit(init_values=0.1).eval(), "", "pos_embed"),
    "timm cls_token": (lambda: timm_vit(init_values=0.1).eval(), "", "cls_token"),
    "torchvision in_proj_weight": (
        lambda: torchvision_vit().eval(),
        "encoder.layers.encoder_layer_0.self_attention",
        "in_proj_weight",
    ),
    "torchvision class_token": (lambda: torchvision_vit().eval(), "", "class_token"),
    "transformers position_embeddings": (lambda: hf_classifier().eval(), "vit.embeddings", "position_embeddings"),
}


def fused_modules(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, FusedModule)]


@pytest.mark.parametrize("case", sorted(OWN_PARAMETERS))
def test_parametrization_on_a_fused_module_survives_unpatch(case):
    build, path, name = OWN_PARAMETERS[case]
    reference, x = build(), images()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    original = type(reference.get_submodule(path))
    for model in (reference, patched):
        parametrize.register_parametrization(model.get_submodule(path), name, Double())
    expected = run(reference, x)
    torch.testing.assert_close(run(patched, x), expected, rtol=RTOL, atol=ATOL)

    fastvit.unpatch(patched)
    module = patched.get_submodule(path)
    assert not fused_modules(patched)
    assert type(module).__name__ == f"Parametrized{original.__name__}"
    assert type(module).__bases__ == (original,)
    assert parametrize.is_parametrized(module, name)
    torch.testing.assert_close(run(patched, x), expected, rtol=RTOL, atol=ATOL)

    for model in (reference, patched):  # parametrize's own undo now restores the original class
        parametrize.remove_parametrizations(model.get_submodule(path), name, leave_parametrized=False)
    assert type(module) is original
    assert module_types(patched) == module_types(reference)
    torch.testing.assert_close(run(patched, x), run(reference, x), rtol=RTOL, atol=ATOL)


def test_derived_classes_are_built_once_per_class():
    models = [timm_vit().eval() for _ in range(2)]
    for model in models:
        fastvit.patch(model)
        parametrize.register_parametrization(model, "pos_embed", Double())
    derived = type(models[0])
    models[1].__class__ = derived  # two modules of one derived class (as FSDP2 shares its classes)
    for model in models:
        fastvit.unpatch(model)
    assert type(models[0]) is type(models[1])
    assert type(models[0]).__name__ == "ParametrizedVisionTransformer"


HAS_GLOO = dist.is_available() and dist.is_gloo_available()


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone (no port: a HashStore), and its 1-device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not HAS_GLOO, reason="needs torch.distributed with gloo")
def test_fsdp2_sharded_patched_model_unpatches_and_trains(one_process_group):
    from timm.models.vision_transformer import Block, VisionTransformer
    from torch.distributed.fsdp import FSDPModule, fully_shard

    reference, x = timm_vit(init_values=0.1).eval(), images()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for block in patched.blocks:
        fully_shard(block, mesh=one_process_group)
    fully_shard(patched, mesh=one_process_group)
    assert type(patched.blocks[0]).__bases__[0] is FSDPModule  # FSDP2 subclassed the fused class
    expected = reference(x)
    torch.testing.assert_close(patched(x), expected, rtol=RTOL, atol=ATOL)

    fastvit.unpatch(patched)
    assert not fused_modules(patched)
    assert type(patched).__bases__ == (FSDPModule, VisionTransformer)
    assert type(patched.blocks[0]).__bases__ == (FSDPModule, Block)
    assert type(patched.blocks[0]).__name__ == "FSDPBlock"
    out = patched(x)
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    out.square().mean().backward()  # FSDP2's hooks still run the sharded parameters' gradients
    assert all(p.grad is not None for p in patched.parameters() if p.requires_grad)


def test_a_class_that_cannot_be_derived_again_leaves_the_model_untouched():
    reference, x = timm_vit(init_values=0.1).eval(), images()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    fused_attention = type(patched.blocks[1].attn)

    class Logged(fused_attention):  # super() binds its methods to this very class
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    patched.blocks[1].attn.__class__ = Logged
    types, watched = module_types(patched), [m.__dict__.get("_fastvit_watched") for m in patched.modules()]
    with pytest.raises(TypeError, match=r"blocks\.1\.attn.*Logged.*super\(\)"):
        fastvit.unpatch(patched)
    assert module_types(patched) == types  # nothing was restored, nothing was dropped
    assert [m.__dict__.get("_fastvit_watched") for m in patched.modules()] == watched
    torch.testing.assert_close(patched(x), reference(x), rtol=RTOL, atol=ATOL)
    patched.blocks[1].attn.__class__ = fused_attention  # undone: unpatch goes through
    fastvit.unpatch(patched)
    assert module_types(patched) == module_types(reference)


def test_derived_class_changed_between_unpatches_is_rebuilt():
    # the rebuilt-class cache compares namespaces by identity (a tensor's == gives no bool), and a
    # derived class changed since it was rebuilt (parametrize adds properties) is rebuilt again
    models = [timm_vit().eval() for _ in range(2)]
    for model in models:
        fastvit.patch(model)
    fused_attention = type(models[0].blocks[0].attn)
    tagged = type(f"Tagged{fused_attention.__name__}", (fused_attention,), {"tag": torch.ones(3)})
    for model in models:
        model.blocks[0].attn.__class__ = tagged
    fastvit.unpatch(models[0])
    tagged.tag = torch.zeros(3)
    fastvit.unpatch(models[1])
    first, second = (type(model.blocks[0].attn) for model in models)
    assert first is not second and first.__name__ == second.__name__ == "TaggedAttention"
    assert first.__bases__ == second.__bases__ == (fused_attention.fastvit_original(),)
    assert torch.equal(first.tag, torch.ones(3)) and torch.equal(second.tag, torch.zeros(3))
