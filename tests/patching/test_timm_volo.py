"""timm's VOLO patched (fastvit.nn.timm_volo): the transformer blocks' self-attention over each
(B, H, W, C) map and the class blocks' class attention (the class token against every token,
heads of ``head_dim``) run one fastvit.flash_attention call each; the MLP halves of the outlooker,
transformer and class blocks, ``x + drop_path2(mlp(norm2(x)))``, one fastvit.layernorm_mlp call
each; the outlook attention and the conv stem are reported as left alone. Outputs and every
gradient by the tolerance rule against the unpatched model in float64, seeded training steps with
drop path, the fallbacks (attention and MLP dropout in training, a hook on a bypassed submodule),
torch.compile, timm's FX feature extraction, TorchScript (the original math) and the Triton
kernels in the interpreter. VOLO shrunk to one block per stage, widths 16 / 32, 64 x 64 images
(an 8 x 8 outlooker map, 4 x 4 after the downsample: 16 tokens, 17 with the class token); no
downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from fastvit.nn.fused import FusedModule
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

from timm.models import volo  # noqa: E402

from fastvit.nn import timm_volo  # noqa: E402

# one block per stage: an outlooker, three transformer blocks, then timm's two class blocks
ATTENTIONS, MLP_HALVES = 3 + 2, 1 + 3 + 2


def build(**overrides) -> torch.nn.Module:
    args = dict(layers=(1, 1, 1, 1), img_size=64, stem_hidden_dim=8, embed_dims=(16, 32, 32, 32),
                num_heads=(1, 2, 2, 2), num_classes=5)  # fmt: skip
    return perturb_(volo.VOLO(**(args | overrides))).eval()


def images(batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_matches_unpatched_by_the_rule(op_calls):
    reference = build()
    patched = copy.deepcopy(reference)
    types, storages = module_types(patched), storage_map(patched)
    report = fastvit.patch(patched)
    assert report.counts() == {"attention": ATTENTIONS, "mlp": MLP_HALVES}
    fused = {type(m) for m in patched.modules() if isinstance(m, FusedModule)}
    assert fused == {timm_volo.FusedVoloAttention, timm_volo.FusedVoloClassAttention, timm_volo.FusedVoloOutlooker,
                     timm_volo.FusedVoloTransformer, timm_volo.FusedVoloClassBlock}  # fmt: skip
    skipped = {e.where: (e.part, e.detail) for e in report.skipped}
    assert skipped["network.0.0.attn"][0] == "attention" and "OutlookAttention" in skipped["network.0.0.attn"][1]
    assert skipped["(model)"][0] == "patch_embed" and "stem" in skipped["(model)"][1]
    assert storage_map(patched) == storages
    assert_matches_by_the_rule(reference, patched, images())
    shapes = [(tuple(c["args"][0].shape), c["args"][1].shape[2]) for c in op_calls["flash_attention"]]
    # the transformer blocks: 16 queries against 16 keys; the class blocks: the class token against 17
    assert shapes == [((3, 2, 16, 16), 16)] * 3 + [((3, 2, 1, 16), 17)] * 2
    assert [tuple(c["args"][0].shape) for c in op_calls["layernorm_mlp"]] == (
        [(3, 8, 8, 16)] + [(3, 4, 4, 32)] * 3 + [(3, 1, 32)] * 2
    )
    fastvit.unpatch(patched)
    assert module_types(patched) == types


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.3))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_dropout_in_training_runs_timm(fused_attn, op_calls, fresh_warnings):
    model = build()
    for m in model.modules():  # the self- and class attentions (timm builds its class blocks without it)
        if isinstance(m, (volo.Attention, volo.ClassAttention)):
            m.attn_drop.p = 0.2
    reference, patched, _ = pair(model)
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn)
    assert op_calls["flash_attention"] == []


def test_mlp_dropout_and_hooks_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    x = images()
    for model in (reference, patched):  # the same hooks on the first transformer block's fc2 and attn_drop
        model.network[2][0].mlp.fc2.register_forward_hook(lambda m, args, out: out * 2)
        model.network[2][0].attn.attn_drop.register_forward_hook(lambda m, args, out: out)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on"):
        torch.testing.assert_close(patched(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == MLP_HALVES - 1
    assert len(op_calls["flash_attention"]) == ATTENTIONS - 1
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # MLP dropout in training: timm's modules, drawn alike
        for block in model.modules():
            if isinstance(getattr(block, "mlp", None), torch.nn.Module) and hasattr(block.mlp, "drop1"):
                block.mlp.drop1.p = block.mlp.drop2.p = 0.3
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0, rtol=1e-4, atol=1e-5)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == ATTENTIONS and len(op_calls["layernorm_mlp"]) == MLP_HALVES


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
