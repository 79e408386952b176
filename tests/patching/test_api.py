"""fastvit.patch / fastvit.unpatch themselves: arguments, bad input, the report, part selection,
ops that are not there, and leaving the model untouched when patching fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import DEPTH, HAS_PATCH_EMBED, images, module_types, pair, storage_map, timm_vit

pytest.importorskip("timm")
pytest.importorskip("torchvision")
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from fastvit.nn import timm_vit as fused


def test_public_api():
    assert fastvit.patch is fastvit.patching.patch and fastvit.unpatch is fastvit.patching.unpatch
    assert fastvit.PatchReport is fastvit.patching.PatchReport
    assert fastvit.PatchEntry is fastvit.patching.PatchEntry  # the report's rows, for annotations
    assert {"PatchReport", "PatchEntry", "patch", "unpatch"} <= set(fastvit.__all__)


def test_argument_checks():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got dict"):
        fastvit.patch({})
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        fastvit.unpatch("vit")
    model = timm_vit()
    with pytest.raises(TypeError, match="mlp must be a bool, got 1"):
        fastvit.patch(model, mlp=1)
    with pytest.raises(ValueError, match="all False; nothing was asked for"):
        fastvit.patch(model, attention=False, patch_embed=False, mlp=False)


def test_meta_device_is_rejected_untouched():
    with torch.device("meta"):
        model = TorchvisionViT(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=8)
    types = module_types(model)
    with pytest.raises(ValueError, match=r"(?s)on the meta device.*'class_token'.*to_empty.*unchanged"):
        fastvit.patch(model)
    assert module_types(model) == types


def test_nothing_to_patch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    types = module_types(model)
    message = r"nothing to patch in Sequential: no timm, torchvision, Hugging Face transformers ViT modules"
    with pytest.raises(ValueError, match=message):
        fastvit.patch(model)
    assert module_types(model) == types


def test_report_lists_replacements_and_prints_readably():
    model = timm_vit(attn_drop_rate=0.1)
    report = fastvit.patch(model)
    assert report.model == "VisionTransformer" and report.action == "patch"
    attention = [e for e in report.replaced if e.part == "attention"]
    assert [e.path for e in attention] == [f"blocks.{i}.attn" for i in range(DEPTH)]
    assert attention[0].detail.startswith("Attention -> FusedAttention (fastvit.flash_attention)")
    assert "attention dropout 0.1: in training it runs timm's forward" in attention[0].detail
    text = str(report)
    lines = text.splitlines()
    expected_total = 2 * DEPTH + (1 if HAS_PATCH_EMBED else 0)
    assert lines[0].startswith(f"fastvit.patch(VisionTransformer): {expected_total} replaced")
    assert "  replaced:" in lines
    assert any(line.split()[:3] == ["attention", "blocks.*.attn", f"(x{DEPTH})"] for line in lines)
    assert any(line.split()[:3] == ["mlp", "blocks.*", f"(x{DEPTH})"] for line in lines)
    undo = fastvit.unpatch(model)
    assert undo.action == "unpatch"
    assert str(undo).splitlines()[0].startswith("fastvit.unpatch(VisionTransformer): ")
    assert "  restored:" in str(undo)
    assert undo.counts() == report.counts()


def test_parts_can_be_chosen_and_added_later():
    model = timm_vit()
    first = fastvit.patch(model, mlp=False, patch_embed=False)
    assert first.counts() == {"attention": DEPTH} and first.skipped == []
    assert type(model.blocks[0]) is not fused.FusedBlock
    second = fastvit.patch(model)
    assert second.counts().get("mlp") == DEPTH and "attention" not in second.counts()
    assert {e.part for e in second.already_patched} == {"attention"}


def test_a_missing_op_is_reported_and_its_part_skipped(monkeypatch):
    monkeypatch.delattr(fastvit, "layernorm_mlp")
    reference, patched, report = pair(timm_vit().eval())
    reasons = [e.detail for e in report.skipped if e.part == "mlp"]
    assert len(reasons) == DEPTH
    assert reasons[0] == (
        "fastvit.layernorm_mlp is not available in this fastvit (fastvit/ops/layernorm_mlp.py is missing)"
    )
    assert report.counts()["attention"] == DEPTH
    torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"(?s)nothing to patch.*layernorm_mlp is not available"):
        fastvit.patch(timm_vit(), attention=False, patch_embed=False)


def test_a_failed_patch_leaves_the_model_untouched(monkeypatch):
    model = timm_vit()
    types, storage = module_types(model), storage_map(model)

    real_swap_in, calls = fused.FusedBlock.swap_in, []

    def fail_on_the_second_block(cls, module):
        calls.append(module)
        if len(calls) == 2:  # blocks.0 and blocks.0.attn have been swapped by then
            raise RuntimeError("swap failed")
        real_swap_in(module)

    monkeypatch.setattr(fused.FusedBlock, "swap_in", classmethod(fail_on_the_second_block))
    with pytest.raises(RuntimeError, match="swap failed"):
        fastvit.patch(model)
    assert module_types(model) == types and storage_map(model) == storage


def test_reports_name_a_patched_model_by_its_own_class():
    # a timm ViT is itself a fused module (its embedding): patching or unpatching it again printed
    # "fastvit.patch(FusedVisionTransformer)"
    if not HAS_PATCH_EMBED:
        pytest.skip("the embedding is not fused in this build")
    model = timm_vit()
    fastvit.patch(model)
    assert str(fastvit.patch(model)).startswith("fastvit.patch(VisionTransformer)")
    assert str(fastvit.unpatch(model)).startswith("fastvit.unpatch(VisionTransformer)")


def test_unpatching_an_unpatched_model_changes_nothing():
    model = timm_vit()
    types = module_types(model)
    report = fastvit.unpatch(model)
    assert report.replaced == [] and module_types(model) == types


def test_an_adapter_that_does_not_load_is_reported(monkeypatch):
    from fastvit.patching import registry

    broken = registry.Adapter("someviz", "torch", "fastvit.patching.no_such_adapter")
    monkeypatch.setattr(registry, "ADAPTERS", (broken, *registry.ADAPTERS))
    report = fastvit.patch(timm_vit())
    (entry,) = [e for e in report.skipped if e.part == "model"]
    assert entry.detail.startswith("fastvit's someviz adapter does not load with the installed torch: No module")
    assert report.counts()["attention"] == DEPTH
