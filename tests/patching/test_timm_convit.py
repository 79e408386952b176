"""timm's ConViT patched (fastvit.nn.timm_convit): its last blocks' plain multi-head attention
(``MHSA``) runs one fastvit.flash_attention call, every block's MLP half
``x + drop_path(mlp(norm2(x)))`` (one ``drop_path`` for both halves, as in timm) one
fastvit.layernorm_mlp call; the gated positional attention (``GPSA``) of the first blocks is
reported and runs timm's. Outputs and every gradient by the tolerance rule against the unpatched
model in float64, seeded training steps with drop path (two draws per block), the fallbacks
(attention / MLP dropout, a hook on the shared drop path), torch.compile, timm's FX feature
extraction, TorchScript (the original math) and the Triton kernels in the interpreter. ConViT
shrunk to 3 blocks (2 GPSA, 1 MHSA), width 48, 3 heads, 32 x 32 images in 8 x 8 patches (16 tokens,
17 with the class token added before the MHSA block); no downloads.
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

from fastvit.nn.timm_convit import FusedConvitBlock, FusedConvitMHSA  # noqa: E402

BLOCKS, GPSA_BLOCKS = 3, 2


def build(**overrides) -> torch.nn.Module:
    # timm's ConViT takes embed_dim per head: width 48, head dim 16
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=BLOCKS, num_heads=3, local_up_to_layer=GPSA_BLOCKS,
                num_classes=5)  # fmt: skip
    return perturb_(timm.create_model("convit_tiny", pretrained=False, **(args | overrides))).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": BLOCKS - GPSA_BLOCKS, "mlp": BLOCKS, "patch_embed": 1}
    assert [type(b) for b in patched.blocks] == [FusedConvitBlock] * BLOCKS
    assert type(patched.blocks[-1].attn) is FusedConvitMHSA
    gpsa = [e for e in report.skipped if e.part == "attention"]
    assert [e.where for e in gpsa] == [f"blocks.{i}.attn" for i in range(GPSA_BLOCKS)]
    assert all("GPSA" in e.detail and "gate" in e.detail for e in gpsa)
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    q, k = op_calls["flash_attention"][0]["args"][:2]
    assert q.shape == k.shape == (3, 3, 17, 16)  # the class token joins before the MHSA blocks
    assert [tuple(c["args"][0].shape) for c in op_calls["layernorm_mlp"]] == [(3, 16, 48)] * 2 + [(3, 17, 48)]
    assert all(c["kwargs"]["layer_scale"] is None for c in op_calls["layernorm_mlp"])
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_in_training_runs_timm(fused_attn, op_calls, fresh_warnings):
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    assert op_calls["flash_attention"] == []


def test_hooks_and_mlp_dropout_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build(drop_path_rate=0.2))
    for model in (reference, patched):  # a hook on the last block's shared drop_path (eval: identity)
        model.blocks[-1].drop_path.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on drop_path"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS - 1
    reference, patched, _ = pair(build(proj_drop_rate=0.3))  # MLP dropout in training: timm's modules, alike
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == BLOCKS - GPSA_BLOCKS and len(op_calls["layernorm_mlp"]) == BLOCKS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
