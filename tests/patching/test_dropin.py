"""A patched model changes nothing silently: hooks, pruning, weight_norm, parametrizations and
LoRA-style wrappers on the submodules a fused forward does not call, the meaning of the model's
submodules called on their own, and models that share modules (issue 17, items 1, 2 and 10).

Each test compares against the unpatched model carrying the same hook or change, in fp32 on the
torch route (the same PyTorch math: RTOL/ATOL of helpers.py).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from torch.nn.utils import prune

import fastvit
from fastvit.nn.fused import FusedModule
from tests.patching.helpers import (
    ATOL,
    RTOL,
    hf_classifier,
    images,
    module_types,
    perturb_,
    storage_map,
    timm_vit,
    torchvision_vit,
)
from tests.torch_compat import TORCH_VERSION

pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "timm": lambda: timm_vit(init_values=0.1, reg_tokens=1).eval(),
    "torchvision": lambda: torchvision_vit().eval(),
    "transformers": lambda: hf_classifier().eval(),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


# Submodules whose hooks the fused forwards used to skip (and a few they always honoured).
HOOKED_PATHS = {
    "timm": [
        "patch_embed", "patch_embed.proj", "patch_embed.norm", "blocks.0.attn.qkv", "blocks.0.attn.proj",
        "blocks.0.attn.attn_drop", "blocks.1.norm2", "blocks.1.mlp", "blocks.1.mlp.fc1", "blocks.1.mlp.act",
        "blocks.1.mlp.drop1", "blocks.1.mlp.norm", "blocks.1.mlp.fc2", "blocks.1.mlp.drop2", "blocks.1.ls2",
        "blocks.1.drop_path2",
    ],
    "torchvision": [
        "conv_proj", "encoder", "encoder.layers.encoder_layer_0.self_attention.out_proj",
        "encoder.layers.encoder_layer_0.ln_2", "encoder.layers.encoder_layer_0.mlp",
        *(f"encoder.layers.encoder_layer_1.mlp.{i}" for i in range(5)),
    ],
    "transformers": [
        "vit.embeddings.patch_embeddings", "vit.embeddings.patch_embeddings.projection",
        "vit.layers.0.attention.q_proj", "vit.layers.0.attention.o_proj", "vit.layers.0.layernorm_after",
        "vit.layers.1.mlp", "vit.layers.1.mlp.fc1", "vit.layers.1.mlp.activation_fn", "vit.layers.1.mlp.fc2",
        "vit.layers.1.dropout",
    ],
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hooked_paths_cover_every_bypassed_submodule(family):
    """Each submodule a fused forward reads without calling is in HOOKED_PATHS (in some block)."""
    model = BUILDERS[family]()
    fastvit.patch(model)
    canonical = {re.sub(r"\d+", "N", path) for path in HOOKED_PATHS[family]}
    for path, module in model.named_modules():
        for sub in getattr(type(module), "fastvit_bypassed", ()):
            full = f"{path}.{sub}" if path else sub
            assert re.sub(r"\d+", "N", full) in canonical, full


def scale_output(module: nn.Module, args: tuple, out: object) -> object:
    return out * 1.5 if isinstance(out, torch.Tensor) else out


def shift_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] + 0.25, *args[1:]) if args and isinstance(args[0], torch.Tensor) else args


HOOKS = {
    "forward hook": lambda m: m.register_forward_hook(scale_output),
    "forward pre-hook": lambda m: m.register_forward_pre_hook(shift_input),
}


@pytest.mark.parametrize("kind", sorted(HOOKS))
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hook_registered_before_patching_leaves_the_module_alone(family, kind):
    x = images()
    for path in HOOKED_PATHS[family]:
        model = BUILDERS[family]()
        HOOKS[kind](model.get_submodule(path))
        expected = run(model, x)
        report = fastvit.patch(model)
        for entry in report.skipped:  # a skip for the hook names the hooked submodule
            hooked = ".".join(filter(None, (entry.path, entry.detail.split()[0])))
            assert kind not in entry.detail or path == hooked, entry
        torch.testing.assert_close(run(model, x), expected, rtol=RTOL, atol=ATOL, msg=lambda m, p=path: f"{p}: {m}")


def test_report_names_the_hooked_submodule():
    model = timm_vit().eval()
    model.blocks[1].mlp.fc1.register_forward_pre_hook(shift_input)
    report = fastvit.patch(model)
    assert [(e.path, e.part) for e in report.skipped] == [("blocks.1", "mlp")]
    assert report.skipped[0].detail.startswith("mlp.fc1 has a forward pre-hook (a user hook, torch.nn.utils.prune")
    assert ("blocks.0", "mlp") in [(e.path, e.part) for e in report.replaced]


@pytest.mark.parametrize("kind", sorted(HOOKS))
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_hook_registered_after_patching_runs_the_original_forward(family, kind, op_calls, fresh_warnings):
    x = images()
    model = BUILDERS[family]()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    plain = run(model, x)
    run(patched, x)
    fused_calls = sum(len(calls) for calls in op_calls.values())  # op calls of one fused forward
    for path in HOOKED_PATHS[family]:
        handles = [HOOKS[kind](m.get_submodule(path)) for m in (model, patched)]
        expected = run(model, x)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = run(patched, x)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m, p=path: f"{p}: {m}")
        for handle in handles:
            handle.remove()
    op_calls_before = sum(len(calls) for calls in op_calls.values())
    torch.testing.assert_close(run(patched, x), plain, rtol=RTOL, atol=ATOL)  # hooks gone: fused again
    assert sum(len(calls) for calls in op_calls.values()) - op_calls_before == fused_calls


def test_fallback_after_patching_warns_once_naming_the_module(fresh_warnings):
    model = timm_vit().eval()
    fastvit.patch(model)
    model.blocks[0].mlp.fc1.register_forward_hook(scale_output)
    with pytest.warns(UserWarning, match=r"patched Block found a hook on mlp\.fc1"):
        model(images())


def _train_steps(model: nn.Module, steps: int = 2) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        loss = run(model, images(seed=step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# The MLP's first Linear of each block, per family.
FC1_PATHS = {
    "timm": ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"],
    "torchvision": ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"],
    "transformers": ["vit.layers.0.mlp.fc1", "vit.layers.1.mlp.fc1"],
}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_pruning_is_honoured_and_trains(family, when):
    def prune_fc1(model: nn.Module) -> None:
        for path in FC1_PATHS[family]:
            prune.l1_unstructured(model.get_submodule(path), "weight", amount=0.5)

    reference = BUILDERS[family]().train()
    patched = copy.deepcopy(reference)
    prune_fc1(reference)
    if when == "before":
        prune_fc1(patched)
        report = fastvit.patch(patched)
        assert sum("has a forward pre-hook" in e.detail for e in report.skipped) == len(FC1_PATHS[family])
    else:
        fastvit.patch(patched)
        prune_fc1(patched)
    # the second step used to crash ("Trying to backward through the graph a second time")
    losses = _train_steps(patched)
    assert losses == pytest.approx(_train_steps(reference), rel=1e-5)


def test_old_style_weight_norm_after_patching():
    reference = timm_vit().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        for model in (reference, patched):
            torch.nn.utils.weight_norm(model.blocks[1].mlp.fc2)
            with torch.no_grad():
                model.blocks[1].mlp.fc2.weight_g.mul_(2.0)
    torch.testing.assert_close(patched(images()), reference(images()), rtol=RTOL, atol=ATOL)


class LoRALinear(nn.Module):
    """A LoRA adapter around a Linear: base(x) + B(A(x)), as peft builds it."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        perturb_(self.lora_b, seed=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


class Scaled(nn.Module):
    """Any wrapper module: base(x) * 1.1."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) * 1.1


class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2.0 * weight


@pytest.mark.parametrize(
    "family, path",
    [("timm", "blocks.0.mlp.fc1"), ("torchvision", "encoder.layers.encoder_layer_1.mlp.3"),
     ("transformers", "vit.layers.0.mlp.fc2"), ("timm", "patch_embed.proj")],
)  # fmt: skip
@pytest.mark.parametrize("change", ["wrapper", "parametrization"])
def test_submodule_changed_after_patching(family, path, change, fresh_warnings):
    reference = BUILDERS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for model in (reference, patched):
        torch.manual_seed(0)
        module = model.get_submodule(path)
        if change == "parametrization":
            parametrize.register_parametrization(module, "weight", Doubled())
        else:
            parent_path, _, name = path.rpartition(".")
            wrapper = LoRALinear(module) if isinstance(module, nn.Linear) else Scaled(module)
            setattr(model.get_submodule(parent_path), name, wrapper)
    x = images()
    torch.testing.assert_close(run(patched, x), run(reference, x), rtol=RTOL, atol=ATOL)


PATCH_CONVS = {"timm": "patch_embed.proj", "torchvision": "conv_proj",
               "transformers": "vit.embeddings.patch_embeddings.projection"}  # fmt: skip


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("setting, value", [("padding", (1, 1)), ("stride", (2, 2)), ("dilation", (2, 2))])
def test_patch_conv_settings_changed_after_patching(family, setting, value, op_calls, fresh_warnings):
    # the fused embeddings compute the patchifying conv fastvit.patch checked from its weight and
    # bias: a stride, padding or dilation set later sends the calls to the original forward, with a
    # warning, and back to the op once it is undone (the change was ignored silently before)
    reference = BUILDERS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    conv = patched.get_submodule(PATCH_CONVS[family])
    before = getattr(conv, setting)
    for model in (reference, patched):
        setattr(model.get_submodule(PATCH_CONVS[family]), setting, value)
    x = images()
    if setting != "padding":  # fewer or more patches than positions: the unpatched model raises, so must this
        with pytest.raises(Exception) as error:
            run(reference, x)
        with pytest.raises(error.type), pytest.warns(fastvit.FastvitFallbackWarning, match="stride, padding"):
            run(patched, x)
    else:  # padding 1 keeps the number of patches: another output
        with pytest.warns(fastvit.FastvitFallbackWarning, match="stride, padding, dilation or groups changed"):
            torch.testing.assert_close(run(patched, x), run(reference, x), rtol=RTOL, atol=ATOL)
    assert op_calls["patch_embed"] == []
    setattr(conv, setting, before)
    run(patched, images())
    assert len(op_calls["patch_embed"]) == 1


@pytest.mark.parametrize(
    "family, path",
    [("timm", "blocks.0.mlp.fc1"), ("torchvision", "encoder.layers.encoder_layer_1.mlp.3"),
     ("transformers", "vit.layers.0.mlp.fc2"), ("timm", "patch_embed.proj")],
)  # fmt: skip
def test_patch_again_fuses_anew_over_a_replaced_submodule(family, path, op_calls, fresh_warnings):
    """A bypassed submodule replaced after patching by one of the same kind (a new Linear, timm's
    set_input_size giving patch_embed a new proj) sends the fused module's calls to its original
    forward; ``fastvit.patch`` called again fuses it anew over the new submodule (it did nothing,
    reporting the module as patched already), and the model computes the unpatched one's output. A
    replacement that does not qualify (a wrapper) is reported as skipped and keeps the fallback."""
    reference = BUILDERS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    parent_path, _, name = path.rpartition(".")
    for model in (reference, patched):
        old = model.get_submodule(path)
        new = copy.deepcopy(old)
        perturb_(new, seed=5)
        setattr(model.get_submodule(parent_path), name, new)
    x = images()
    op = "patch_embed" if name == "proj" else "layernorm_mlp"
    with pytest.warns(UserWarning, match="replaced or wrapped"):
        run(patched, x)
    op_calls[op].clear()
    report = fastvit.patch(patched)
    anew = [e for e in report.replaced if "fused anew" in e.detail]
    assert len(anew) == 1, report
    relative = path.removeprefix(f"{anew[0].path}.") if anew[0].path else path  # the fused module's own path
    assert f"fused anew: {relative} replaced" in anew[0].detail
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the fused forward runs
        torch.testing.assert_close(run(patched, x), run(reference, x), rtol=RTOL, atol=ATOL)
    assert op_calls[op]
    assert fastvit.patch(patched).replaced == []  # fused already
    # a wrapper does not qualify: skipped, named, and the calls keep running the original forward
    for model in (reference, patched):
        setattr(model.get_submodule(parent_path), name, Scaled(model.get_submodule(path)))
    skipped = [e for e in fastvit.patch(patched).skipped if "fused by an earlier fastvit.patch" in e.detail]
    assert len(skipped) == 1 and f"then {relative} replaced" in skipped[0].detail
    torch.testing.assert_close(run(patched, x), run(reference, x), rtol=RTOL, atol=ATOL)


def test_fusing_anew_is_rolled_back_when_a_later_swap_fails(monkeypatch):
    from fastvit.nn import timm_vit as fused_timm

    model = timm_vit()
    fastvit.patch(model, mlp=False)
    model.patch_embed.proj = copy.deepcopy(model.patch_embed.proj)  # the root fused module goes stale
    assert model.fastvit_replaced_submodules() == ["patch_embed.proj"]

    def fail(cls, module):
        raise RuntimeError("swap failed")

    monkeypatch.setattr(fused_timm.FusedBlock, "swap_in", classmethod(fail))
    with pytest.raises(RuntimeError, match="swap failed"):
        fastvit.patch(model)  # the root is fused anew first, then the first block's swap fails
    assert model.fastvit_replaced_submodules() == ["patch_embed.proj"]  # its earlier snapshot is back
    assert not any(isinstance(m, fused_timm.FusedBlock) for m in model.modules())


def test_global_module_hook_runs_the_original_forwards(fresh_warnings):
    reference = timm_vit().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    calls = {"reference": 0, "patched": 0}
    for name, model in (("reference", reference), ("patched", patched)):
        def count(module, args, out, _name=name):
            calls[_name] += 1

        handle = torch.nn.modules.module.register_module_forward_hook(count)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(images())
        finally:
            handle.remove()
    assert calls["patched"] == calls["reference"]


def test_compiled_patched_model_honours_a_hook_added_later():
    """The fused modules' hook checks are guarded, so torch >= 2.14 recompiles on the new hook. Older
    dynamo keeps the graph it has, for the unpatched model too (``skip_nnmodule_hook_guards``): there
    the patched model must at least do what the compiled unpatched one does."""
    model = timm_vit().eval()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    compiled = torch.compile(patched, backend="eager", fullgraph=True)  # no graph break in the checks
    compiled_reference = torch.compile(model, backend="eager", fullgraph=True)
    x = images()
    torch.testing.assert_close(compiled(x), model(x), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(compiled_reference(x), model(x), rtol=RTOL, atol=ATOL)
    for m in (model, patched):
        m.blocks[1].norm2.register_forward_hook(scale_output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(x) if TORCH_VERSION >= (2, 14) else compiled_reference(x)
        torch.testing.assert_close(compiled(x), expected, rtol=RTOL, atol=ATOL)


# --- item 2: a model's submodules called on their own mean what they meant ---------------------


def test_timm_patch_embed_called_alone_returns_patch_tokens(op_calls):
    model = timm_vit(reg_tokens=1).eval()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    x = images()
    tokens = patched.patch_embed(x)
    assert tokens.shape == (x.shape[0], 16, 32)  # (B, N, D): no prefix tokens, no pos_embed
    torch.testing.assert_close(tokens, model.patch_embed(x), rtol=RTOL, atol=ATOL)
    assert type(patched.patch_embed) is type(model.patch_embed)
    torch.testing.assert_close(patched(x), model(x), rtol=RTOL, atol=ATOL)
    assert len(op_calls["patch_embed"]) == 1  # the model still embeds through the fused op
    for got, want in zip(patched.forward_intermediates(x), model.forward_intermediates(x), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_torchvision_encoder_and_conv_called_alone_are_unchanged():
    model = torchvision_vit().eval()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    tokens = torch.randn(2, 17, 32)
    assert type(patched.encoder) is type(model.encoder)
    torch.testing.assert_close(patched.encoder(tokens), model.encoder(tokens), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(patched.conv_proj(images()), model.conv_proj(images()), rtol=RTOL, atol=ATOL)


# --- item 10: shared modules, and never half-patched --------------------------------------------


def _shared_timm_pair() -> nn.ModuleList:
    first, second = timm_vit().eval(), timm_vit().eval()
    perturb_(second, seed=5)
    second.patch_embed = first.patch_embed
    second.blocks[1] = first.blocks[1]
    return nn.ModuleList([first, second])


def _shared_hf_pair() -> nn.ModuleList:
    first, second = hf_classifier().eval(), hf_classifier().eval()
    perturb_(second, seed=5)
    second.vit.embeddings = first.vit.embeddings
    second.vit.layers[0] = first.vit.layers[0]
    return nn.ModuleList([first, second])


def _shared_torchvision_pair() -> nn.ModuleList:
    first, second = torchvision_vit().eval(), torchvision_vit().eval()
    perturb_(second, seed=5)
    second.encoder = first.encoder
    return nn.ModuleList([first, second])


@pytest.mark.parametrize("build", [_shared_timm_pair, _shared_torchvision_pair, _shared_hf_pair])
def test_models_sharing_modules_are_patched_once_and_both_work(build, op_calls):
    pair = build()
    reference = copy.deepcopy(pair)  # deepcopy keeps the sharing
    x = images()
    before_types, before_storage = module_types(pair), storage_map(pair)
    report = fastvit.patch(pair)
    paths = [entry.path for entry in report.replaced]
    assert len(paths) == len(set(paths))
    for model, ref in zip(pair, reference, strict=True):
        torch.testing.assert_close(run(model, x), run(ref, x), rtol=RTOL, atol=ATOL)
    assert op_calls["patch_embed"] and op_calls["layernorm_mlp"]
    fastvit.unpatch(pair)
    assert module_types(pair) == before_types and storage_map(pair) == before_storage


@pytest.mark.parametrize("build", [_shared_timm_pair, _shared_torchvision_pair, _shared_hf_pair])
def test_a_failing_swap_rolls_everything_back(build, monkeypatch):
    model = build()
    before_types = module_types(model)
    probe = copy.deepcopy(model)
    fastvit.patch(probe)
    fused_classes = [type(m) for m in probe.modules() if isinstance(m, FusedModule)]
    victim = fused_classes[-1]  # the last swap fails, after every other one succeeded

    def fail(self) -> None:
        raise RuntimeError("attach failed")

    monkeypatch.setattr(victim, "_fastvit_attach", fail)
    with pytest.raises(RuntimeError, match="attach failed"):
        fastvit.patch(model)
    assert module_types(model) == before_types
    assert not any("_fastvit_watched" in m.__dict__ for m in model.modules())


def _timm_attention_models() -> dict[str, nn.Module]:
    import timm

    from tests.patching.test_timm_relpos import tiny_vit
    from tests.patching.test_timm_windows import swin

    tiny = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return {
        "vit": timm_vit(img_size=32),
        "eva02": perturb_(timm.create_model("eva02_tiny_patch14_224", **tiny)),
        "beitv2": perturb_(timm.create_model("beitv2_base_patch16_224", **tiny)),
        "swin": swin(),
        "tiny_vit": tiny_vit(),
    }


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_scale_set_after_patching_acts_as_in_timm(fused_attn):
    # timm's fused path (fused_attn, the default) calls SDPA without a scale: an attn.scale set later
    # changes nothing there, and does on the unfused path. The patched model follows the path timm
    # would take (it used attn.scale on both: 6.7e-3 off on a ViT with scale = 1.0)
    x = images(batch=2, size=32)
    for name, reference in _timm_attention_models().items():
        reference.eval()
        patched = copy.deepcopy(reference)
        fastvit.patch(patched)
        for model in (reference, patched):
            for module in model.modules():
                if hasattr(module, "fused_attn") and isinstance(getattr(module, "scale", None), float):
                    module.fused_attn, module.scale = fused_attn, 0.5
        torch.testing.assert_close(patched(x), reference(x), rtol=RTOL, atol=ATOL, msg=name)
