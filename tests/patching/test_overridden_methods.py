"""A method the fused forward replaces or bypasses, overridden after patching, is honoured.

A fused forward does not call some methods the original forward calls (timm's
``VisionTransformer._pos_embed``, torchvision's ``_process_input``, the ``forward`` of the MLP and
encoder modules it reads the weights of), and its own ``forward`` hides the original class's. An
override of one (on the module, or a monkeypatch of the library's class, as libraries adding
logging or checkpointing do) sends the calls to the original forward, with one warning naming it;
undoing the override runs the fused ops again.

Each case compares against the unpatched model carrying the same override (fp32, torch route); the
override scales a tensor by 0.5 (a constant added to the embeddings would vanish in LayerNorm).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import ATOL, RTOL, hf_classifier, images, pair, timm_vit, torchvision_vit

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")
import timm.layers
import timm.models.vision_transformer as timm_vit_module
import torchvision.models.vision_transformer as tv_vit_module
from transformers.models.vit import modeling_vit

# fastvit's fused timm classes, declared (their methods' snapshot taken) before any test's monkeypatch
import fastvit.nn.timm_vit

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "timm": lambda: timm_vit(init_values=0.1).eval(),
    "torchvision": lambda: torchvision_vit().eval(),
    "transformers": lambda: hf_classifier().eval(),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def halved(function: Callable) -> Callable:
    """``function``'s output (or first output) times 0.5, as a method."""

    def method(self, *args, **kwargs):
        out = function(self, *args, **kwargs)
        return (out[0] * 0.5, *out[1:]) if isinstance(out, tuple) else out * 0.5

    return method


# Overrides on the library's class: (family, class, method name); the method's output is halved.
CLASS_OVERRIDES = {
    "timm VisionTransformer._pos_embed": ("timm", timm_vit_module.VisionTransformer, "_pos_embed"),
    "timm VisionTransformer.forward_features": ("timm", timm_vit_module.VisionTransformer, "forward_features"),
    "timm Attention.forward": ("timm", timm.layers.Attention, "forward"),
    "timm Block.forward": ("timm", timm_vit_module.Block, "forward"),
    "timm Mlp.forward": ("timm", timm.layers.Mlp, "forward"),
    "timm PatchEmbed.forward": ("timm", timm.layers.PatchEmbed, "forward"),
    "torchvision VisionTransformer._process_input": ("torchvision", tv_vit_module.VisionTransformer, "_process_input"),
    "torchvision Encoder.forward": ("torchvision", tv_vit_module.Encoder, "forward"),
    "torchvision EncoderBlock.forward": ("torchvision", tv_vit_module.EncoderBlock, "forward"),
    "torchvision MLPBlock.forward": ("torchvision", tv_vit_module.MLPBlock, "forward"),
    "torchvision MultiheadAttention.forward": ("torchvision", nn.MultiheadAttention, "forward"),
    "transformers ViTMLP.forward": ("transformers", modeling_vit.ViTMLP, "forward"),
    "transformers ViTLayer.forward": ("transformers", modeling_vit.ViTLayer, "forward"),
    "transformers ViTAttention.forward": ("transformers", modeling_vit.ViTAttention, "forward"),
    "transformers ViTEmbeddings.forward": ("transformers", modeling_vit.ViTEmbeddings, "forward"),
}


def _check_override_honoured(reference, patched, x, plain, op_calls, warning: str) -> None:
    expected = run(reference, x)
    assert not torch.allclose(expected, plain, rtol=RTOL, atol=ATOL)  # the override shows
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [run(patched, x) for _ in range(2)]
    for out in got:
        torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    assert sum(warning in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]


def _op_call_count(op_calls) -> int:
    return sum(len(calls) for calls in op_calls.values())


@pytest.mark.parametrize("case", sorted(CLASS_OVERRIDES))
def test_class_level_override_after_patching(case, op_calls, fresh_warnings):
    family, cls, name = CLASS_OVERRIDES[case]
    reference, patched, _ = pair(BUILDERS[family]())
    x = images()
    plain = run(reference, x)
    torch.testing.assert_close(run(patched, x), plain, rtol=RTOL, atol=ATOL)
    fused_calls = _op_call_count(op_calls)
    with pytest.MonkeyPatch.context() as library:  # its own undo (the fixtures' spies stay)
        library.setattr(cls, name, halved(getattr(cls, name)))
        _check_override_honoured(reference, patched, x, plain, op_calls, f"{cls.__name__}.{name}")
    before = _op_call_count(op_calls)
    torch.testing.assert_close(run(patched, x), plain, rtol=RTOL, atol=ATOL)
    assert _op_call_count(op_calls) - before == fused_calls  # undone: the fused ops run again


# Overrides on the model instance: (family, the bypassed method's name)
INSTANCE_OVERRIDES = {
    "timm _pos_embed": ("timm", "_pos_embed"),
    "torchvision _process_input": ("torchvision", "_process_input"),
}


@pytest.mark.parametrize("case", sorted(INSTANCE_OVERRIDES))
def test_instance_override_after_patching(case, op_calls, fresh_warnings):
    family, name = INSTANCE_OVERRIDES[case]
    reference, patched, _ = pair(BUILDERS[family]())
    x = images()
    plain = run(reference, x)
    run(patched, x)
    fused_calls = _op_call_count(op_calls)
    for model in (reference, patched):
        setattr(model, name, halved(getattr(type(model), name)).__get__(model))
    _check_override_honoured(reference, patched, x, plain, op_calls, f"{name} replaced on the instance")
    del patched.__dict__[name]
    before = _op_call_count(op_calls)
    torch.testing.assert_close(run(patched, x), plain, rtol=RTOL, atol=ATOL)
    assert _op_call_count(op_calls) - before == fused_calls


@pytest.mark.parametrize("where", ["class", "instance"])
def test_override_made_before_patching_is_honoured(where, op_calls, fresh_warnings):
    # fastvit compares with the classes as they were when it declared its fused classes (imported
    # above), so a monkeypatch made between that and patch() is not taken for timm's own method
    reference = timm_vit(init_values=0.1).eval()
    x = images()
    plain = run(reference, x)
    with pytest.MonkeyPatch.context() as library:
        method = halved(timm_vit_module.VisionTransformer._pos_embed)
        if where == "class":
            library.setattr(timm_vit_module.VisionTransformer, "_pos_embed", method)
        else:
            reference._pos_embed = method.__get__(reference)
        patched = copy.deepcopy(reference)
        fastvit.patch(patched)
        expected = run(reference, x)
        assert not torch.allclose(expected, plain, rtol=RTOL, atol=ATOL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(run(patched, x), expected, rtol=RTOL, atol=ATOL)
    assert not op_calls["patch_embed"]


def test_compiled_patched_model_honours_a_class_override_made_later(monkeypatch):
    reference, patched, _ = pair(BUILDERS["timm"]())
    x = images()
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), reference(x), rtol=RTOL, atol=ATOL)
    monkeypatch.setattr(timm.layers.Mlp, "forward", halved(timm.layers.Mlp.forward))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(compiled(x), reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("where", ["_pos_embed", "blocks.1.mlp.forward"])
def test_compiled_patched_model_honours_an_instance_override_made_later(where):
    """An override set on a module instance after the model's first compiled call (a bypassed method
    of the model, a bypassed submodule's forward) is seen: the fused checks look the attribute up
    and compare the bound method's function, which torch.compile guards, so the graph recompiles as
    the unpatched model's does. (They tested ``name in self.__dict__``, which it does not guard:
    the compiled patched model kept its fused graph and ignored the override.)"""
    reference, patched, _ = pair(BUILDERS["timm"]())
    x = images()
    compiled = torch.compile(patched, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), reference(x), rtol=RTOL, atol=ATOL)
    path, _, name = where.rpartition(".")
    for model in (reference, patched):
        owner = model.get_submodule(path)
        setattr(owner, name, halved(getattr(type(owner), name)).__get__(owner))
    expected = reference(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(compiled(x), expected, rtol=RTOL, atol=ATOL)
    for model in (reference, patched):
        delattr(model.get_submodule(path), name)
    torch.testing.assert_close(compiled(x), reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.interpreter
def test_class_override_on_the_triton_route(op_calls, fresh_warnings, monkeypatch):
    reference, patched, _ = pair(timm_vit(img_size=8, init_values=0.1).eval())
    x = images(size=8)
    monkeypatch.setattr(timm.layers.Mlp, "forward", halved(timm.layers.Mlp.forward))
    with fastvit.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-4, atol=1e-5)
    assert not op_calls["layernorm_mlp"] and op_calls["flash_attention"]  # the MLP halves ran timm's


def test_a_monkeypatch_made_before_the_first_patch_is_honoured(tmp_path):
    # fastvit declares a family's fused classes (and snapshots the methods they replace) on the first
    # fastvit.patch that needs them: a timm forward monkeypatched before that was taken for timm's
    # own and silently skipped by the fused forward. A fresh process, so that no test declared them
    # first (run outside the checkout, as the README's layout note says).
    code = (
        "import copy, torch, timm, fastvit\n"
        "from timm.models import davit\n"
        "original = davit.SpatialBlock.forward\n"
        "davit.SpatialBlock.forward = lambda self, x: original(self, x) * 1.5\n"
        "model = timm.create_model('davit_tiny', pretrained=False, depths=(1, 1, 1, 1), "
        "embed_dims=(16, 32, 64, 128), num_heads=(2, 2, 4, 4), num_classes=5).eval()\n"
        "patched = copy.deepcopy(model)\n"
        "assert fastvit.patch(patched).counts()['mlp'] == 8\n"
        "x = torch.randn(2, 3, 64, 64)\n"
        "torch.testing.assert_close(patched(x), model(x), rtol=1e-5, atol=1e-5)\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-W", "ignore", "-c", code], check=True, timeout=180, cwd=tmp_path)
