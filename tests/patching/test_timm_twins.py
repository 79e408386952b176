"""timm's Twins patched (fastvit.nn.timm_twins): SVT's locally grouped attention (all ws x ws
groups of all images in one fastvit.flash_attention call, the map zero-padded to multiples of ws as
timm pads it), the globally sub-sampled attention of SVT and PCPVT (N queries to the M tokens of
the sr-reduced map) and the blocks' MLP halves (one fastvit.layernorm_mlp call). Outputs and every
gradient by the tolerance rule against the unpatched model in float64. The named configs shrunk to
widths 16-128 and depths (1, 1, 2, 1); 72 x 88 images give 18 x 22 maps at the first stage, padded
to 21 x 28 for the 7 x 7 groups; no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_attention_dropout_runs_timm,
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")

SHRUNK = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), num_heads=(2, 2, 4, 4), num_classes=5)
BLOCKS = sum(SHRUNK["depths"])
# config -> (grouped, sub-sampled) attentions
CONFIGS = {"twins_svt_small": (4, 1), "twins_pcpvt_small": (0, 5)}


def build(name: str = "twins_svt_small", **overrides) -> torch.nn.Module:
    return perturb_(timm.create_model(name, pretrained=False, **(SHRUNK | overrides))).eval()


def images(height: int = 72, width: int = 88, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def fused_names(model: torch.nn.Module) -> dict[str, int]:
    names: dict[str, int] = {}
    for m in model.modules():
        if type(m).__module__ == "fastvit.nn.timm_twins":
            names[type(m).__name__] = names.get(type(m).__name__, 0) + 1
    return names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_unpatched_by_the_rule(name, op_calls):
    grouped, sub_sampled = CONFIGS[name]
    reference = build(name)
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": BLOCKS, "mlp": BLOCKS}
    want = {"FusedTwinsBlock": BLOCKS, "FusedLocallyGroupedAttn": grouped, "FusedGlobalSubSampleAttn": sub_sampled}
    assert fused_names(patched) == {k: v for k, v in want.items() if v}
    (skip,) = report.skipped
    assert skip.part == "patch_embed" and "one per stage" in skip.detail
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    first = op_calls["flash_attention"][0]["args"]
    if grouped:  # 3 images x (3 x 4) groups of 7 x 7 tokens as the batch
        assert first[0].shape == (3 * 3 * 4, 2, 49, 8)
    else:  # 18 x 22 queries attend to the 8 x 8-reduced map's 2 x 2 tokens
        assert first[0].shape == (3, 2, 18 * 22, 8) and first[1].shape == (3, 2, 2 * 2, 8)
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.3))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_in_training_runs_timm(fused_attn, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    assert op_calls["flash_attention"] == []


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_triton_route(name, op_calls):
    reference, patched, _ = pair(build(name))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(40, 56, batch=2), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_kernels_on_the_gpu(name, op_calls):
    assert_matches_on_the_gpu(build(name), images())
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
