"""attn_implementation="fastvit": Hugging Face models whose attention goes through transformers'
``AttentionInterface``, routed by ``fastvit.patch`` or chosen with ``from_pretrained`` /
``set_attn_implementation``.

Every family is built from a tiny config (dim 32, 2 heads of 16, 2 layers, 16x16 images with 4x4
patches; no downloads) and compared with its unpatched self (transformers' sdpa) under the
tolerance rule: the patched fp32 model's error against the unpatched model in float64 is at most
twice the unpatched fp32 model's, plus fp32's slack (tests/tolerance.py), for the output and the
gradient of every parameter. On the CPU the op runs its torch route; the interpreter test runs
the Triton kernels on the masked families.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import pickle
import subprocess
import sys
import types
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit
from tests.patching.helpers import perturb_, storage_map, unfused_embeddings_only
from tests.tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface  # noqa: E402

from fastvit.nn import hf_attention  # noqa: E402
from fastvit.patching import hf_interface  # noqa: E402

T = transformers
BATCH, DEPTH = 3, 2
BLOCK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=2)
VISION = dict(BLOCK, image_size=16, patch_size=4)
TEXT = dict(BLOCK, vocab_size=50, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(dtype: torch.dtype, size: int = 16) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=_gen(0)).to(dtype)


def _text() -> dict:
    """Token ids with right padding (lengths 7, 5, 3): the text towers' padding masks."""
    ids = torch.randint(1, 50, (BATCH, 7), generator=_gen(1))
    mask = (torch.arange(7) < torch.tensor([[7], [5], [3]])).long()
    return {"input_ids": ids, "attention_mask": mask}


def _siglip2_inputs(dtype: torch.dtype) -> dict:
    """NaFlex: 16 patch slots per image, filled 16, 12 and 6 (grids 4x4, 3x4, 2x3), rest padding."""
    shapes = torch.tensor([[4, 4], [3, 4], [2, 3]])
    valid = shapes.prod(-1)
    return {
        "pixel_values": torch.randn(BATCH, 16, 3 * 4 * 4, generator=_gen(0)).to(dtype),
        "pixel_attention_mask": (torch.arange(16) < valid[:, None]).long(),
        "spatial_shapes": shapes,
    }


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: how to build it, its forward inputs, the output compared, and how many
    attention modules the patch routes (``masked``: how many of the op calls carry a mask;
    ``packed``: how many are ``flash_attention_varlen`` calls over packed images)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.dtype], dict]
    output: Callable[[object], torch.Tensor]
    routed: int
    masked: int = 0
    packed: int = 0
    mlp: int = 0  # LayerNorm+MLP halves swapped (fastvit.nn.hf_layers)
    embed: int = 0  # patch embeddings swapped (fastvit.nn.hf_embeddings)

    def counts(self) -> dict[str, int]:
        """The patch report's counts() for this family."""
        counts = {"attention": self.routed, "mlp": self.mlp, "patch_embed": self.embed}
        return {part: n for part, n in counts.items() if n}


def _hidden(out: object) -> torch.Tensor:
    return out.last_hidden_state


FAMILIES = {
    # text tower: causal + padding masks; vision tower: none
    "clip": Family(
        lambda: T.CLIPModel(T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
        lambda dtype: {"pixel_values": _pixels(dtype), **_text()},
        lambda out: out.logits_per_image,
        routed=2 * DEPTH,
        masked=DEPTH,
        mlp=2 * DEPTH,
        embed=1,
    ),
    "siglip": Family(
        lambda: T.SiglipModel(T.SiglipConfig(text_config=TEXT, vision_config=VISION)),
        lambda dtype: {"pixel_values": _pixels(dtype), **_text()},
        lambda out: out.logits_per_image,
        routed=2 * DEPTH,
        masked=DEPTH,
        mlp=2 * DEPTH,
        embed=1,
    ),
    "siglip2": Family(
        lambda: T.Siglip2VisionModel(T.Siglip2VisionConfig(**BLOCK, patch_size=4, num_patches=16)),
        _siglip2_inputs,
        _hidden,
        routed=DEPTH,
        masked=DEPTH,
        mlp=DEPTH,
    ),
    "dinov2": Family(
        lambda: T.Dinov2Model(T.Dinov2Config(**VISION)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    "dinov2_registers": Family(
        lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**VISION, num_register_tokens=2)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    "dinov3": Family(
        lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**VISION, num_register_tokens=2)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    "deit": Family(
        lambda: T.DeiTModel(T.DeiTConfig(**VISION)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    # ViT's 5.x layer layout in other families (hf_layers.FusedIJepaLayer, FusedViTMSNLayer, FusedVivitLayer)
    "ijepa": Family(
        lambda: T.IJepaModel(T.IJepaConfig(**VISION)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    "vit_msn": Family(
        lambda: T.ViTMSNModel(T.ViTMSNConfig(**VISION)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    # two frames of 16 x 16, tubelets 2 x 4 x 4: 16 tokens; ViViT's default gelu_fast (the op's gelu_tanh)
    "vivit": Family(
        lambda: T.VivitModel(T.VivitConfig(**BLOCK, image_size=16, num_frames=2, tubelet_size=[2, 4, 4])),
        lambda d: {"pixel_values": torch.randn(BATCH, 2, 3, 16, 16, generator=_gen(0)).to(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
    ),
    # random masking keeps 4 of the 16 patches: the noise fixes which
    "vit_mae": Family(
        lambda: T.ViTMAEModel(T.ViTMAEConfig(**VISION)),
        lambda d: {"pixel_values": _pixels(d), "noise": torch.rand(BATCH, 16, generator=_gen(2)).to(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    "aimv2": Family(
        lambda: T.Aimv2VisionModel(T.Aimv2VisionConfig(**VISION)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        mlp=DEPTH,
    ),
    # three images of their own sizes packed in one sequence (16 + 6 + 6 tokens): unpatched, a
    # block-diagonal (28, 28) mask; patched, flash-attn's cu_seq_lens_q (fastvit_flash_varlen)
    "pixtral": Family(
        lambda: T.PixtralVisionModel(T.PixtralVisionConfig(**BLOCK, image_size=16, patch_size=4, head_dim=16)),
        lambda d: {"pixel_values": _pixels(d), "image_sizes": [(16, 16), (8, 12), (12, 8)]},
        _hidden,
        DEPTH,
        packed=DEPTH,
        mlp=DEPTH,
    ),
    # the relative position bias is a float mask that requires grad (its table learns through it)
    "beit": Family(  # each BeitLayer's LayerNorm+MLP half swapped too (hf_layers.FusedBeitLayer)
        lambda: T.BeitModel(T.BeitConfig(**VISION, use_relative_position_bias=True)),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        DEPTH,
        masked=DEPTH,
        mlp=DEPTH,
        embed=1,
    ),
    # 2x2 windows, shifted in every second block: bias + shift mask, (B * windows, H, 4, 4); each
    # SwinLayer's LayerNorm+MLP half swapped (hf_layers.FusedSwinLayer)
    "swin": Family(
        lambda: T.SwinModel(
            T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2)
        ),
        lambda d: {"pixel_values": _pixels(d)},
        _hidden,
        routed=4,
        masked=4,
        mlp=4,
    ),
    # beyond vision: a decoder with grouped-query attention (2 query heads on 1 kv head), causal
    # attention and padding
    "llama": Family(
        lambda: T.LlamaModel(T.LlamaConfig(**TEXT, num_key_value_heads=1)),
        lambda dtype: _text(),
        _hidden,
        DEPTH,
        masked=DEPTH,
    ),
}


def build(name: str) -> nn.Module:
    return perturb_(FAMILIES[name].build()).eval()


@pytest.fixture
def attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Each call of fastvit.flash_attention / flash_attention_varlen: {"op", "mask", "causal"}."""
    calls: list[dict] = []
    for op in ("flash_attention", "flash_attention_varlen"):
        real = getattr(fastvit, op)

        def spy(*args, _real=real, _op=op, **kwargs):
            calls.append({"op": _op, "mask": kwargs.get("attn_mask"), "causal": kwargs.get("causal")})
            return _real(*args, **kwargs)

        monkeypatch.setattr(fastvit, op, spy)
    return calls


def run_with_grads(model: nn.Module, inputs: dict, output: Callable) -> tuple[torch.Tensor, dict]:
    """The output, and the gradients of every parameter for a fixed random upstream gradient."""
    model.zero_grad(set_to_none=True)
    out = output(model(**inputs))
    upstream = torch.randn(out.shape, generator=_gen(3), dtype=torch.float64).to(out.dtype)
    (out * upstream).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_follows_tolerance_rule(reference: nn.Module, patched: nn.Module, family: Family) -> None:
    """Patched fp32 vs the unpatched model in float64, budget from the unpatched model in fp32."""
    oracle = copy.deepcopy(reference).double()
    want, want_grads = run_with_grads(oracle, family.inputs(torch.float64), family.output)
    lowp, lowp_grads = run_with_grads(reference, family.inputs(torch.float32), family.output)
    got, got_grads = run_with_grads(patched, family.inputs(torch.float32), family.output)
    assert_close_to_reference(got, want, lowp, name="output")
    assert got_grads.keys() == lowp_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        assert_close_to_reference(grad, want_grads[name], lowp_grads[name], name=f"grad of {name}")


@pytest.mark.parametrize("name", FAMILIES)
def test_patched_matches_unpatched(name, attention_calls):
    family = FAMILIES[name]
    reference = build(name)
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    routed = [e for e in report.replaced if "AttentionInterface" in e.detail]
    assert report.counts() == family.counts()
    assert len(routed) == family.routed
    assert_follows_tolerance_rule(reference, patched, family)
    assert len(attention_calls) == family.routed  # once per attention module
    assert sum(c["op"] == "flash_attention_varlen" for c in attention_calls) == family.packed
    assert sum(c["mask"] is not None for c in attention_calls) == family.masked


def test_autocast_bf16(attention_calls):
    # q, k, v cast to bf16 (the bool NaFlex mask as it is), as SDPA under autocast: bf16's budget
    family = FAMILIES["siglip2"]
    reference = build("siglip2")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with torch.no_grad():
        want = family.output(copy.deepcopy(reference).double()(**family.inputs(torch.float64)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lowp = family.output(reference(**family.inputs(torch.float32)))
            got = family.output(patched(**family.inputs(torch.float32)))
    assert got.dtype == lowp.dtype and len(attention_calls) == DEPTH
    assert_close_to_reference(got, want, lowp, name="output", dtype=torch.bfloat16)


def test_masks_reach_the_op(attention_calls):
    # CLIP text: SDPA's bool mask, padding and causality folded in (so causal=False); BEiT: the
    # float bias, requiring grad; Siglip2: the NaFlex padding of the keys
    for name in ("clip", "beit", "siglip2"):
        model = build(name)
        fastvit.patch(model)
        model(**FAMILIES[name].inputs(torch.float32))
    text = [c for c in attention_calls[: 2 * DEPTH] if c["mask"] is not None]
    assert len(text) == DEPTH and text[0]["mask"].dtype == torch.bool and text[0]["causal"] is False
    mask = text[0]["mask"][:, 0]  # (B, N, M)
    assert mask[2, 6, :3].all() and not mask[2, 6, 3:].any()  # the third text: 3 tokens, then padding
    assert not mask[0, 2, 3:].any() and mask[0, 2, :3].all()  # causal
    beit = attention_calls[2 * DEPTH : 3 * DEPTH]
    assert all(c["mask"].dtype == torch.float32 and c["mask"].requires_grad for c in beit)
    siglip2 = attention_calls[3 * DEPTH :][0]["mask"]
    assert siglip2.shape == (BATCH, 1, 16, 16) and siglip2[2, 0, :, :6].all() and not siglip2[2, 0, :, 6:].any()


def test_unpatched_vit_through_set_attn_implementation(attention_calls):
    # ViTModel's attention is swapped by fastvit.patch; the interface route works on it too
    config = T.ViTConfig(**VISION)
    reference = perturb_(T.ViTModel(config)).eval()
    routed = copy.deepcopy(reference)
    routed.set_attn_implementation("fastvit")
    x = _pixels(torch.float32)
    torch.testing.assert_close(routed(x).last_hidden_state, reference(x).last_hidden_state, rtol=1e-5, atol=1e-6)
    assert len(attention_calls) == DEPTH


def test_a_tower_patched_alone_gets_its_own_config_until_unpatched():
    """``fastvit.patch(model.vision_model)`` gives the tower its own config copy, as any patched model
    (another model built from the same config object keeps its attention); the composite's
    ``model.config.vision_config``, which the tower cannot see, stays the object it was and names the
    implementation it had (the README says so: patch the model you run). Outputs are the unpatched
    model's; unpatching the tower gives it back the composite's object."""
    model = build("clip")
    held = model.config.vision_config
    inputs = FAMILIES["clip"].inputs(torch.float32)
    want = model(**inputs).logits_per_image
    fastvit.patch(model.vision_model)
    assert model.vision_model.config is not held and model.config.vision_config is held
    assert (held._attn_implementation, model.vision_model.config._attn_implementation) == ("sdpa", "fastvit")
    torch.testing.assert_close(model(**inputs).logits_per_image, want, rtol=1e-5, atol=1e-6)
    fastvit.unpatch(model.vision_model)
    assert model.vision_model.config is held is model.config.vision_config


def test_state_dict_unchanged_and_unpatch_restores_each_sub_config():
    model = build("clip")
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    inputs = FAMILIES["clip"].inputs(torch.float32)
    before, storages = model(**inputs).logits_per_image, storage_map(model)
    top = model.config._attn_implementation
    fastvit.patch(model)
    assert model.config.text_config._attn_implementation == model.config.vision_config._attn_implementation == "fastvit"
    assert model.config._attn_implementation == top  # no attention module reads the top config
    assert storage_map(model) == storages
    assert "fastvit" not in str(model.config.to_dict())  # nothing fastvit's in a saved config
    report = fastvit.unpatch(model)
    assert report.counts() == {"attention": 2 * DEPTH, "mlp": 2 * DEPTH, "patch_embed": 1}
    assert model.config.text_config._attn_implementation == "eager"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == top
    assert storage_map(model) == storages
    assert not any(hasattr(m, "_fastvit_previous_attn_implementation") for m in model.modules())
    assert torch.equal(model(**inputs).logits_per_image, before)
    assert fastvit.unpatch(model).replaced == []  # twice: nothing left to restore


@pytest.mark.parametrize("name", ["dinov2", "clip"])
def test_models_built_from_one_config_stay_apart(name, attention_calls):
    # teacher and student (or a model and its EMA copy) built from one config object: patching one
    # switched the shared config, so the other silently ran fastvit too (and unpatching it did nothing)
    model = build(name)
    sibling = type(model)(model.config).eval()
    before = {n: c._attn_implementation for n, c in _configs(sibling)}
    fastvit.patch(model)
    assert {n: c._attn_implementation for n, c in _configs(sibling)} == before
    routed = [m for m in model.modules() if hasattr(m, "_fastvit_previous_attn_implementation")]
    assert routed
    # the configs the routed modules read are the model's own (model.config or its sub-configs)
    own = dict(_configs(model))
    assert all(m.config._attn_implementation == "fastvit" and any(m.config is c for c in own.values())
               for m in routed)  # fmt: skip
    inputs = FAMILIES[name].inputs(torch.float32)
    sibling(**inputs)
    assert attention_calls == []
    model(**inputs)
    assert attention_calls
    fastvit.unpatch(model)
    assert {n: c._attn_implementation for n, c in _configs(model)} == before
    # every module of the patched model reads its own configs
    assert all(m.config is model.config or m.config in dict(_configs(model)).values()
               for m in model.modules() if hasattr(m, "config"))  # fmt: skip


def _configs(model: nn.Module) -> list[tuple[str, object]]:
    """``model.config`` and its sub-configs, by attribute path."""
    found = [("config", model.config)]
    found += [(f"config.{k}", v) for k, v in vars(model.config).items() if hasattr(v, "_attn_implementation")]
    return found


def test_patch_twice_and_implementation_changed_in_between():
    model = build("dinov2")
    fastvit.patch(model)
    again = fastvit.patch(model)
    assert again.replaced == [] and len(again.already_patched) == 2 * DEPTH + 1  # attention, MLPs, embedding
    assert all("an earlier fastvit.patch" in entry.detail for entry in again.already_patched)
    model.set_attn_implementation("eager")  # the user's later choice wins over unpatch's memory
    report = fastvit.unpatch(model)
    assert model.config._attn_implementation == "eager"
    attention = [e for e in report.replaced if e.part == "attention"]
    assert len(attention) == DEPTH and all("'eager' left as set since fastvit.patch" in e.detail for e in attention)


def test_unpatch_report_says_what_each_layer_ran():
    # the layers share one config: the second and later said "'sdpa' -> 'sdpa'", the first having
    # restored it already; and a patched model's reports name its own class, not the fused one
    model = build("dinov2")
    fastvit.patch(model)
    assert str(fastvit.patch(model)).startswith("fastvit.patch(Dinov2Model)")
    report = fastvit.unpatch(model)
    attention = [e for e in report.replaced if e.part == "attention"]
    assert len(attention) == DEPTH and all("'fastvit' -> 'sdpa'" in e.detail for e in attention)


def test_output_attentions_and_hidden_states(attention_calls, fresh_warnings):
    # weights requested from a model patched over eager attention: that call runs the model's eager
    # attention (which returns them), warned
    reference = build("siglip2")
    eager = copy.deepcopy(reference)
    eager.set_attn_implementation("eager")
    patched = copy.deepcopy(eager)
    fastvit.patch(patched)
    inputs = FAMILIES["siglip2"].inputs(torch.float32)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="output_attentions=True"):
        got = patched(**inputs, output_attentions=True)
    assert attention_calls == []
    want = eager(**inputs, output_attentions=True)
    assert len(got.attentions) == DEPTH
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    got, want = patched(**inputs, output_hidden_states=True), reference(**inputs, output_hidden_states=True)
    assert len(attention_calls) == DEPTH and len(got.hidden_states) == DEPTH + 1
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["siglip2", "clip", "dinov2"])
def test_config_output_attentions_as_unpatched(name, attention_calls, fresh_warnings):
    # transformers' own test_attention_outputs sets config.output_attentions on the model: its setter
    # raises for every implementation but eager, so a model patched over eager refused what it took
    # unpatched. Over eager: accepted, the weights returned (eager runs), validated and saved as
    # unpatched; over SDPA: transformers' error, as unpatched.
    reference = build(name)
    reference.set_attn_implementation("eager")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    inputs = FAMILIES[name].inputs(torch.float32)
    towers = [c for _, c in _configs(patched) if c._attn_implementation == "fastvit"]
    assert towers and all(c._attn_implementation.previous == "eager" for c in towers)
    for model in (reference, patched):
        for config in [c for _, c in _configs(model)]:
            config.output_attentions = True
            config.validate()  # huggingface_hub's class validators (save_pretrained runs them)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="output_attentions=True"):
        got = patched(**inputs)
    want = reference(**inputs)
    # every attentions field, the towers' of a two-tower model included
    got_maps = [v.attentions for v in (got, *got.values()) if getattr(v, "attentions", None)]
    want_maps = [v.attentions for v in (want, *want.values()) if getattr(v, "attentions", None)]
    assert len(got_maps) == len(want_maps) >= 1
    for a, b in zip(got_maps, want_maps, strict=True):
        assert len(a) == len(b) == DEPTH
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert attention_calls == []
    # the name remembers eager through a deepcopy and a pickle of the config
    routed = towers[0]
    assert pickle.loads(pickle.dumps(routed))._attn_implementation.previous == "eager"
    assert copy.deepcopy(routed)._attn_implementation == "fastvit"
    over_sdpa = copy.deepcopy(build(name))
    fastvit.patch(over_sdpa)
    config = next(c for _, c in _configs(over_sdpa) if c._attn_implementation == "fastvit")
    with pytest.raises(ValueError, match="not supported when using the `attn_implementation` set to fastvit"):
        config.output_attentions = True
    with pytest.raises(ValueError, match="set to sdpa"):
        next(c for _, c in _configs(build(name)) if c._attn_implementation == "sdpa").output_attentions = True


@pytest.mark.parametrize("name", ["clip", "dinov2"])
def test_unpatch_gives_back_the_config_objects(name):
    # fastvit.patch gives the model copies of its configs (models built from one config stay apart):
    # a config the user held was no longer the model's, even after unpatch. Unpatch puts the objects
    # back where the copies were not changed; a change made on model.config while patched stays.
    model = build(name)
    held = dict(_configs(model))
    holders = {n: m.config for n, m in model.named_modules() if "config" in vars(m)}
    fastvit.patch(model)
    assert model.config is not held["config"]
    fastvit.unpatch(model)
    assert dict(_configs(model)) == held and all(a is held[n] for n, a in _configs(model))
    assert all(m.config is holders[n] for n, m in model.named_modules() if "config" in vars(m))
    fastvit.patch(model)
    model.config.output_hidden_states = True  # set on the model's config while patched
    fastvit.unpatch(model)
    assert model.config is not held["config"] and model.config.output_hidden_states is True
    assert held["config"].output_hidden_states is False
    sub = [c for n, c in _configs(model) if n != "config"]
    assert all(any(m.config is c for m in model.modules() if "config" in vars(m)) for c in sub)  # one set of copies
    assert not any(hasattr(m, "_fastvit_original_config") for m in model.modules())
    if name == "clip":  # unpatching the vision tower alone split model.config.vision_config from its config
        model = build(name)
        held = dict(_configs(model))
        fastvit.patch(model)
        fastvit.unpatch(model.vision_model)
        assert model.config.vision_config is model.vision_model.config
        model.config.vision_config.output_hidden_states = True
        assert model(**FAMILIES[name].inputs(torch.float32)).vision_model_output.hidden_states is not None
        model.config.vision_config.output_hidden_states = False
        fastvit.unpatch(model)  # the whole: every object back
        assert all(a is held[n] for n, a in _configs(model))
        assert model.vision_model.config is held["config"].vision_config


@pytest.mark.parametrize("name", ["siglip2", "clip", "dinov2"])
def test_output_attentions_over_sdpa_returns_none_as_sdpa(name, attention_calls, fresh_warnings):
    # a model patched over SDPA (transformers' default) gives no attention weights, as SDPA gives
    # none: fastvit's op runs (it ran eager, returning weights the unpatched model does not)
    reference = build(name)
    assert reference.config._attn_implementation == "sdpa"
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    inputs = FAMILIES[name].inputs(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastvit.FastvitFallbackWarning)
        got = patched(**inputs, output_attentions=True)
    want = reference(**inputs, output_attentions=True)
    def maps(out) -> dict:  # every attentions field, the towers' of a two-tower model included
        return {k: v for k, v in out.items() if k == "attentions"} | {
            k: v.attentions for k, v in out.items() if hasattr(v, "attentions")
        }

    assert attention_calls and maps(want) and maps(got) == maps(want)  # none: ()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def _beit_padded(dtype: torch.dtype) -> dict:
    """BEiT with a padding mask over its 17 tokens (the third image keeps 9)."""
    mask = torch.ones(BATCH, 17, dtype=torch.long)
    mask[2, 9:] = 0
    return {"pixel_values": _pixels(dtype), "attention_mask": mask}


def _left_padded_text(dtype: torch.dtype) -> dict:
    """Token ids with left padding (lengths 7, 5, 3): a causal tower's first rows see no key."""
    inputs = _text()
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)
    return inputs


EAGER_MASKS = {
    # BEiT adds its relative position bias to the mask: bias + bool gave padded keys weight (+1 / 0)
    "beit": (FAMILIES["beit"], _beit_padded),
    # a causal decoder with left padding: eager averages v over the fully masked rows, SDPA's did not
    "llama": (FAMILIES["llama"], _left_padded_text),
}


@pytest.mark.parametrize("name", sorted(EAGER_MASKS))
def test_a_model_built_eager_gets_eager_masks(name, attention_calls):
    # the mask function of "fastvit" gave every model SDPA's bool mask: a model patched over eager
    # then computed what the unpatched model computes over SDPA (BEiT: padded keys weighted; a
    # left-padded causal tower: its padded rows), not what it computed. Patched over eager it gets
    # eager's float mask (0 / finfo.min); over SDPA, SDPA's bool mask as before.
    family, inputs = EAGER_MASKS[name]
    family = dataclasses.replace(family, inputs=inputs)
    reference = build(name)
    reference.set_attn_implementation("eager")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    if name != "llama":  # (Llama's float64 eager gives NaN rows: finfo(float64).min is -inf in its fp32 softmax)
        assert_follows_tolerance_rule(reference, patched, family)
    else:
        patched(**family.inputs(torch.float32))
    masks = [c["mask"] for c in attention_calls[-DEPTH:]]
    assert all(m is not None and m.is_floating_point() for m in masks)
    assert any((m <= torch.finfo(torch.float32).min / 8).any() for m in masks)  # eager's masked value / 4
    got = patched(**family.inputs(torch.float32)).last_hidden_state
    want = reference(**family.inputs(torch.float32)).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the padded rows too
    with fastvit.backend("triton"):  # the kernels (interpreter): eager's finfo.min overflowed there (rows of 0)
        got = patched(**family.inputs(torch.float32)).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    over_sdpa = build(name)
    fastvit.patch(over_sdpa)
    attention_calls.clear()
    over_sdpa(**family.inputs(torch.float32))
    assert all(c["mask"] is None or c["mask"].dtype == torch.bool or c["mask"].requires_grad for c in attention_calls)
    assert any(c["mask"] is not None for c in attention_calls)


@pytest.mark.parametrize("padded", [True, False], ids=["padding", "no padding"])
def test_output_attentions_of_a_causal_text_tower(padded, fresh_warnings):
    # without padding SDPA's mask function returns None (causality left to is_causal): the eager
    # fallback must still be causal
    reference = build("clip")
    eager = copy.deepcopy(reference)
    eager.set_attn_implementation("eager")
    patched = copy.deepcopy(eager)
    fastvit.patch(patched)
    inputs = FAMILIES["clip"].inputs(torch.float32)
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with pytest.warns(fastvit.FastvitFallbackWarning):
        got = patched(**inputs, output_attentions=True)
    want = eager(**inputs, output_attentions=True)
    for tower in ("text_model_output", "vision_model_output"):
        pairs = zip(got[tower].attentions, want[tower].attentions, strict=True)
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got.text_model_output.attentions[0][0, 0].triu(1).abs().max() == 0  # causal


def test_training_step(attention_calls):
    reference = build("dinov2").train()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x = _pixels(torch.float32)
    for model in (reference, patched):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(x).pooler_output.square().mean().backward()
        optimizer.step()
    assert len(attention_calls) == DEPTH
    for (name, a), (_, b) in zip(reference.named_parameters(), patched.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_dropout_in_training_falls_back(attention_calls, fresh_warnings):
    reference = perturb_(T.Dinov2Model(T.Dinov2Config(**VISION, attention_probs_dropout_prob=0.2))).train()
    patched = copy.deepcopy(reference)
    report = fastvit.patch(patched)
    assert all("attention dropout 0.2" in e.detail for e in report.replaced if e.part == "attention")
    x = _pixels(torch.float32)
    outs = []
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout p=0.2 in training"):
        for model in (reference, patched):
            torch.manual_seed(5)
            outs.append(model(x).last_hidden_state)
    assert attention_calls == []  # transformers' sdpa ran, with the same dropout draws
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    patched.eval()
    patched(x)
    assert len(attention_calls) == DEPTH


def test_torch_compile_fullgraph(attention_calls):
    torch._dynamo.reset()
    family = FAMILIES["clip"]  # padding + causal masks built inside the graph
    reference = build("clip")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    try:
        got, got_grads = run_with_grads(compiled, family.inputs(torch.float32), family.output)
    finally:
        torch._dynamo.reset()
    assert len(attention_calls) == family.routed  # traced through fastvit's function, not a fallback
    want, want_grads = run_with_grads(reference, family.inputs(torch.float32), family.output)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5)


def test_from_pretrained_and_set_attn_implementation(tmp_path, attention_calls):
    model = build("dinov2")
    model.save_pretrained(tmp_path)
    x = _pixels(torch.float32)
    loaded = T.Dinov2Model.from_pretrained(tmp_path, attn_implementation="fastvit").eval()
    assert loaded.config._attn_implementation == "fastvit"
    torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-6)
    assert len(attention_calls) == DEPTH
    report = fastvit.patch(loaded)  # attention already fastvit: reported, and unpatch keeps it
    assert report.counts() == {"mlp": DEPTH, "patch_embed": 1} and len(report.already_patched) == DEPTH
    fastvit.unpatch(loaded)
    assert loaded.config._attn_implementation == "fastvit"
    model.set_attn_implementation("fastvit")
    model(x)
    assert len(attention_calls) == 2 * DEPTH


def test_models_outside_the_interface_say_why():
    # Swin V2's attention computes its scores itself: swapped, not routed (test_transformers_swinv2)
    swinv2 = T.Swinv2Model(
        T.Swinv2Config(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2)
    )
    report = fastvit.patch(swinv2)
    assert report.counts() == {"attention": 4, "mlp": 4} and unfused_embeddings_only(report)
    # so does SAM's image encoder attention (decomposed relative position; test_transformers_sam)
    sam = T.SamVisionModel(T.SamVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                             patch_size=8, output_channels=8, mlp_dim=32, window_size=2,
                                             global_attn_indexes=[1]))  # fmt: skip
    report = fastvit.patch(sam)
    assert report.counts() == {"attention": 2, "mlp": 2} and unfused_embeddings_only(report)
    report = fastvit.patch(build("siglip2"))
    embedding, head, attention = report.skipped  # its Linear patch embedding (named); the pooling
    # head's MLP half, then its nn.MultiheadAttention
    assert embedding.path == "embeddings" and embedding.part == "patch_embed"
    assert head.path == "head" and "Siglip2MultiheadAttentionPoolingHead" in head.detail and head.part == "mlp"
    assert (
        attention.path == "head.attention"
        and "nn.MultiheadAttention (in Siglip2MultiheadAttentionPoolingHead)" in attention.detail
    )
    report = fastvit.patch(build("aimv2"))
    assert [e.path for e in report.skipped] == ["embeddings", "head"]  # its embedding (named); the head's SDPA
    # through the interface, but transformers keeps it off SDPA (softcapping in its eager attention)
    gemma2 = T.Gemma2Model(T.Gemma2Config(**TEXT, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match=r"(?s)nothing to patch.*Gemma2Attention: .* not supporting SDPA"):
        fastvit.patch(gemma2)


def test_parts_named_attention_are_not_reported_as_attentions():
    """NeoMME's attention goes through the interface (routed) and holds an ``ExclusiveSelfAttention``:
    a projection of the interface's output, no attention of its own; Phi-4-multimodal's audio encoder
    holds a ``RelativeAttentionBias`` (an embedding table). The report named each as an attention left
    alone ("computes its attention in its own forward"); neither projects anything."""
    from transformers.models.neomme import configuration_neomme, modeling_neomme
    from transformers.models.phi4_multimodal import configuration_phi4_multimodal, modeling_phi4_multimodal

    config = configuration_neomme.NeoMMEConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64,
    )  # fmt: skip
    report = fastvit.patch(modeling_neomme.NeoMMEModel(config))
    assert report.counts() == {"attention": 2}
    assert not [e for e in report.skipped if e.part == "attention"]
    assert [e.part for e in report.skipped] == ["mlp", "mlp"]  # its relu2 MLP halves, said
    config = configuration_phi4_multimodal.Phi4MultimodalAudioConfig(
        hidden_size=32, intermediate_size=64, num_blocks=2, num_attention_heads=2, depthwise_separable_out_channel=32,
        nemo_conv_channels=32, ext_pw_out_channel=32, input_size=16,
    )  # fmt: skip
    report = fastvit.patch(modeling_phi4_multimodal.Phi4MultimodalAudioModel(config))
    assert report.counts() == {"attention": 2} and not report.skipped


def test_registration_hook_when_transformers_comes_later(tmp_path):
    # fastvit first, transformers after: the import hook registers "fastvit" in both interfaces and
    # leaves no finder and no loader of its own behind (run outside the checkout: see README, Layout)
    code = (
        "import sys, fastvit\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "from transformers import AttentionInterface\n"
        "from transformers.masking_utils import AttentionMaskInterface\n"
        "for name in ('fastvit', 'fastvit_flash_varlen'):\n"
        "    assert name in AttentionInterface._global_mapping and name in AttentionMaskInterface._global_mapping\n"
        "assert not any(type(f).__name__ == '_Finder' for f in sys.meta_path)\n"
        "assert type(sys.modules['transformers.modeling_utils'].__loader__).__name__ == 'SourceFileLoader'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


def test_registration_when_transformers_came_first(monkeypatch):
    monkeypatch.setattr(AttentionInterface, "_global_mapping", {**AttentionInterface._global_mapping})
    monkeypatch.setattr(AttentionMaskInterface, "_global_mapping", {**AttentionMaskInterface._global_mapping})
    for name in ("fastvit", "fastvit_flash_varlen"):
        del AttentionInterface._global_mapping[name], AttentionMaskInterface._global_mapping[name]
        assert name not in ALL_ATTENTION_FUNCTIONS
    hf_interface.install()
    for name in ("fastvit", "fastvit_flash_varlen"):
        assert ALL_ATTENTION_FUNCTIONS[name] is hf_attention.fastvit_attention_forward
    assert AttentionMaskInterface._global_mapping["fastvit"] is hf_attention.fastvit_mask
    assert AttentionMaskInterface._global_mapping["fastvit_flash_varlen"] is hf_attention.sdpa_mask


# --- the attention function itself, against transformers' sdpa_attention_forward -------------
def _module(groups: int = 1, causal: bool = False) -> nn.Module:
    module = nn.Module()
    module.is_causal, module.num_key_value_groups = causal, groups
    module.config = types.SimpleNamespace(output_attentions=False)
    return module


# (what, key/value heads, mask kind, module causal): bool and float masks broadcast over heads
# (B, 1, N, M) and over batch and heads (1, 1, N, M); GQA with 4 query heads on 2 kv heads
CASES = [
    ("no mask", 4, None, False),
    ("causal", 4, None, True),
    ("bool (B,1,N,M)", 4, "bool", False),
    ("float (1,1,N,M)", 4, "float", False),
    ("causal module with a mask (the mask wins)", 4, "bool", True),
    ("GQA", 2, None, False),
]


@pytest.mark.parametrize(("what", "kv_heads", "mask", "causal"), CASES, ids=[c[0] for c in CASES])
def test_function_matches_sdpa(what, kv_heads, mask, causal):
    gen = _gen(4)
    q = torch.randn(2, 4, 13, 16, generator=gen, requires_grad=True)  # N = 13, M = 11: prime, unequal
    k = torch.randn(2, kv_heads, 11 if not causal else 13, 16, generator=gen, requires_grad=True)
    v = torch.randn(k.shape, generator=gen, requires_grad=True)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 13, k.shape[2], generator=gen) > 0.3
        m[..., 0] = True  # no fully masked row
    elif mask == "float":
        m = torch.randn(1, 1, 13, k.shape[2], generator=gen)
    module = _module(groups=4 // kv_heads, causal=causal)
    outs = []
    for fn in (hf_attention.fastvit_attention_forward, sdpa_attention_forward):
        out, weights = fn(module, q, k, v, m, dropout=0.0, scaling=0.3)
        assert weights is None and out.shape == (2, 13, 4, 16) and out.is_contiguous()
        outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for got, want in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_function_varlen_route_with_cu_seqlens(attention_calls):
    # flash-attn's packed layout, as models pass it for flash implementations: batch 1, 3 sequences
    gen = _gen(5)
    lens = [7, 1, 12]
    q, k, v = torch.randn(3, 1, 2, sum(lens), 16, generator=gen).unbind(0)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    out, _ = hf_attention.fastvit_attention_forward(
        _module(), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12
    )
    assert [c["op"] for c in attention_calls] == ["flash_attention_varlen"]
    want = torch.cat(
        [
            F.scaled_dot_product_attention(*(t[:, :, a:b] for t in (q, k, v)), scale=0.25)
            for a, b in itertools.pairwise(cu.tolist())
        ],
        dim=2,
    ).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_fallback_warning_names_the_module_s_implementation(fresh_warnings):
    # a packing tower's config reads "fastvit_flash_varlen": its fallback says so (it said "fastvit")
    config = T.CLIPVisionConfig(**VISION)
    config._attn_implementation = hf_attention.PACKED_NAME
    module = T.models.clip.modeling_clip.CLIPAttention(config)
    q = torch.randn(1, 2, 5, 16, generator=_gen(7))
    said = r"attn_implementation='fastvit_flash_varlen'\) runs its eager"
    with pytest.warns(fastvit.FastvitFallbackWarning, match=said):
        hf_attention.fastvit_attention_forward(module, q, q, q, None, scaling=0.25, output_attentions=True)


@pytest.mark.parametrize("case", ["weights", "mask", "causal"])
def test_function_packed_calls_it_does_not_cover_stay_per_sequence(case, attention_calls, fresh_warnings):
    # packed sequences (cu_seq_lens_q) with weights requested (the eager fallback) or a mask beside
    # them: one dense call whose mask keeps each sequence to itself, never attention across the
    # packed images; causal: within each sequence
    gen = _gen(6)
    lens = [7, 1, 12]
    q, k, v = torch.randn(3, 1, 2, sum(lens), 16, generator=gen).unbind(0)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    module, kwargs, mask = _module(causal=case == "causal"), {}, None
    if case == "weights":  # a module of a modeling file: the fallback is its eager_attention_forward
        module = T.models.clip.modeling_clip.CLIPAttention(T.CLIPVisionConfig(**VISION))
        kwargs["output_attentions"] = True
    if case == "mask":  # SDPA's bool mask over the packed keys: the last 2 keys of the third sequence
        mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
        mask[..., 18:] = False
    out, weights = hf_attention.fastvit_attention_forward(
        module, q, k, v, mask, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12,
        **kwargs,
    )  # fmt: skip
    pieces, blocks = [], torch.zeros(1, 2, 20, 20)
    for a, b in itertools.pairwise(cu.tolist()):
        qs, ks, vs = (t[:, :, a:b] for t in (q, k, v))
        keep = torch.ones(b - a, b - a, dtype=torch.bool)
        if case == "mask":
            keep = mask[0, 0, a:b, a:b]
        if case == "causal":
            keep = keep.tril()
        p = (qs @ ks.transpose(-1, -2) * 0.25).masked_fill(~keep, float("-inf")).softmax(-1)
        pieces.append(p @ vs)
        blocks[:, :, a:b, a:b] = p
    torch.testing.assert_close(out, torch.cat(pieces, dim=2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    if case == "weights":  # the eager function's weights: zero off each sequence's block
        torch.testing.assert_close(weights, blocks, rtol=1e-5, atol=1e-6)
        assert attention_calls == []
    else:  # causal alone is the varlen op's own
        assert weights is None
        op = "flash_attention_varlen" if case == "causal" else "flash_attention"
        assert [c["op"] for c in attention_calls] == [op]


def test_function_packed_fallback_of_a_packing_attention_runs_per_sequence(attention_calls, fresh_warnings):
    # an attention that packs for flash itself (Qwen2-VL's) splits its images in its other branch:
    # the fallback does the same (one eager call per image, weights as a list of per-image maps, as
    # PaddleOCR-VL's branch collects them), never (T, T) weights over a whole video
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

    config = T.Qwen2VLConfig().vision_config.__class__(embed_dim=32, num_heads=2)
    config._attn_implementation_internal = "fastvit_flash_varlen"
    module = VisionAttention(config)
    gen = _gen(7)
    q, k, v = torch.randn(3, 1, 2, 20, 16, generator=gen).unbind(0)
    cu = torch.tensor([0, 7, 8, 20], dtype=torch.int32)
    out, weights = hf_attention.fastvit_attention_forward(
        module, q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12,
        output_attentions=True,
    )  # fmt: skip
    assert attention_calls == [] and [tuple(w.shape) for w in weights] == [(1, 2, 7, 7), (1, 2, 1, 1), (1, 2, 12, 12)]
    bounds = list(itertools.pairwise(cu.tolist()))
    pieces = [(q[:, :, a:b] @ k[:, :, a:b].transpose(-1, -2) * 0.25).softmax(-1) for a, b in bounds]
    for got, p in zip(weights, pieces, strict=True):
        torch.testing.assert_close(got, p, rtol=1e-5, atol=1e-6)
    want = torch.cat([p @ v[:, :, a:b] for p, (a, b) in zip(pieces, bounds, strict=True)], dim=2)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
# Pixtral's mask holds finfo(fp32).min, which NumPy's interpreter overflows to -inf when scaling it
# by log2(e): documented in fastvit.flash_attention (it counts as -inf), and harmless here
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("name", ["siglip2", "beit", "pixtral", "pixtral-mask"])
def test_triton_kernels_on_masked_families(name, attention_calls):
    # the kernels (interpreter) on NaFlex padding (bool), a learnt bias (float, with its gradient),
    # packed images (fastvit.patch: the varlen kernels) and, with attn_implementation="fastvit" set
    # by the user, the block-diagonal mask Pixtral builds for them (float, -finfo.min off the blocks)
    name, _, route = name.partition("-")
    family = FAMILIES[name]
    reference = build(name)
    patched = copy.deepcopy(reference)
    if route == "mask":
        patched.set_attn_implementation("fastvit")
        family = dataclasses.replace(family, masked=family.packed, packed=0)
    else:
        fastvit.patch(patched)
    with fastvit.backend("triton"):
        assert_follows_tolerance_rule(reference, patched, family)
    assert len(attention_calls) == family.routed
    assert sum(c["mask"] is not None for c in attention_calls) == family.masked
    assert sum(c["op"] == "flash_attention_varlen" for c in attention_calls) == family.packed


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool", [9, 1], ids=["one-pooled-query", "all-queries"])
def test_the_attention_function_compiles_with_dynamic_shapes(causal, pool):
    """Under torch.compile with dynamic shapes (what a recompile at a second image size turns on) the
    lengths are symbolic: the causal flag handed to the op must still be a bool. SDPA's
    ``q_length > 1 and ... and is_causal`` returns its first falsy operand, a SymBool for one query
    (SAM 2's Hiera pools a 2 x 2 window's queries to one: it failed to compile after another model
    had compiled the same wrapper), which SDPA rejects."""
    from fastvit.nn.hf_attention import fastvit_attention_forward

    module = nn.Module()
    module.is_causal = causal
    gen = _gen(3)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen) for _ in range(3))

    def attend(q, k, v):
        q = q[:, :, : q.shape[2] // pool]  # Hiera's query pooling: a length derived from a symbolic one
        return fastvit_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.25)[0]

    compiled = torch.compile(attend, backend="eager", fullgraph=True, dynamic=True)
    queries = 9 // pool
    causal_here = causal and queries > 1  # SDPA's rule: one query attends to every key
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, :queries], k, v, is_causal=causal_here,
                                                            scale=0.25).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(compiled(q, k, v), want, rtol=1e-5, atol=1e-6)
