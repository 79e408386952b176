"""timm's EdgeNeXt patched (fastvit.nn.timm_edgenext): the ``SplitTransposeBlock``'s
cross-covariance attention (XCiT's: each head's channels attend, the tokens are the head dim) runs
one fastvit.flash_attention call; the MLP half of both block kinds (``ConvBlock`` and
``SplitTransposeBlock``: shortcut + drop_path(gamma * mlp(norm(x))), the shortcut the block's input)
one fastvit.layernorm_mlp call with ``residual=False``; the stem is reported. Outputs and every
gradient (temperature and gammas included) by the tolerance rule against the unpatched model in
float64, a map longer than the kernels' 256-token head dim (the op's SDPA route, with its warning),
seeded training steps with drop path, attention and MLP dropout and hooks (timm's forward or
modules), torch.compile, timm's FX feature extraction, TorchScript (the original math) and the
Triton kernels in the interpreter.

A narrow EdgeNeXt: widths 16, 24, 32, 48, one block per stage (a ConvBlock, then three
SplitTransposeBlocks that attend, 2 heads of 12, 16 and 24 channels), 64 x 64 images (16 x 16,
8 x 8, 4 x 4 and 2 x 2 maps: 64, 16 and 4 tokens where they attend); no downloads.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_attention_dropout_runs_timm,
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    assert_patch_and_unpatch_keep_the_weights,
    output_strides,
    pair,
    perturb_,
)

timm = pytest.importorskip("timm")

from fastvit.nn.timm_edgenext import (  # noqa: E402
    FusedCrossCovarianceAttn,
    FusedEdgeNextConvBlock,
    FusedSplitTransposeBlock,
)

ATTENTIONS = 3
MLPS = 4  # one ConvBlock and three SplitTransposeBlocks


def build(**overrides) -> torch.nn.Module:
    args = dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), heads=(2, 2, 2, 2), num_classes=5)
    return perturb_(timm.create_model("edgenext_xx_small", pretrained=False, **(args | overrides))).eval()


def images(size: int = 64, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    kinds = (timm.models.edgenext.ConvBlock, timm.models.edgenext.SplitTransposeBlock)
    return [m for m in model.modules() if isinstance(m, kinds)]


def attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, timm.models.edgenext.CrossCovarianceAttn)]


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    assert report.counts() == {"attention": ATTENTIONS, "mlp": MLPS}
    assert [type(a) for a in attentions(patched)] == [FusedCrossCovarianceAttn] * ATTENTIONS
    assert [type(b) for b in blocks(patched)] == [FusedEdgeNextConvBlock] + [FusedSplitTransposeBlock] * 3
    assert not [e for e in report.skipped if e.part == "mlp"]
    assert_matches_by_the_rule(reference, patched, images())
    # the (B, H, W, C) maps, the branch alone (the block adds its input), gamma as the layer scale
    calls = op_calls["layernorm_mlp"]
    assert [tuple(c["args"][0].shape) for c in calls] == [(2, 16, 16, 16), (2, 8, 8, 24), (2, 4, 4, 32),
                                                         (2, 2, 2, 48)]  # fmt: skip
    assert all(c["kwargs"]["residual"] is False for c in calls)
    assert calls[1]["kwargs"]["layer_scale"] is blocks(patched)[1].gamma
    # (B, H, C', N): the channels are the sequence, the tokens the head dim
    shapes = [tuple(c["args"][0].shape) for c in op_calls["flash_attention"]]
    assert shapes == [(2, 2, 12, 64), (2, 2, 16, 16), (2, 2, 24, 4)]
    assert all(c["kwargs"]["scale"] == 1.0 for c in op_calls["flash_attention"])
    # each block's output laid out as timm's (a channels-last view of the MLP's output, plus the input)
    assert output_strides(blocks(patched), patched, images()) == output_strides(blocks(reference), reference, images())


def test_q_and_k_are_normalised_over_the_tokens(op_calls):
    _, patched, _ = pair(build())
    patched(images())
    q, k = op_calls["flash_attention"][0]["args"][:2]
    temperature = attentions(patched)[0].temperature.detach()  # (H, 1, 1)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(k.shape[:-1]))
    torch.testing.assert_close(q.norm(dim=-1), temperature.view(1, -1, 1).expand(q.shape[:-1]).abs())


def test_maps_longer_than_the_kernels_head_dim_run_sdpa_in_the_op(op_calls, fresh_warnings):
    # 160 x 160 images: the first attending stage has a 20 x 20 map, 400 tokens > 256
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"), pytest.warns(fastvit.FastvitFallbackWarning, match="head_dim 400"):
        patched(images(size=160, batch=1))
    assert_matches_by_the_rule(reference, patched, images(size=160, batch=1))


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build())


def test_training_step_with_drop_path(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == ATTENTIONS and len(op_calls["layernorm_mlp"]) == MLPS
    dropping = [isinstance(b.drop_path, timm.layers.DropPath) for b in blocks(patched)]
    assert any(dropping)  # the first block's rate is 0: timm's Identity, no scale
    assert [c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"]] == dropping


def test_blocks_without_a_mlp_layer_scale(op_calls):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        for block in blocks(model):
            block.gamma = None  # ls_init_value=0 would drop SplitTransposeBlock's gamma_xca too (timm fails)
    assert_matches_by_the_rule(reference, patched, images())
    assert [c["kwargs"]["layer_scale"] for c in op_calls["layernorm_mlp"]] == [None] * MLPS


def test_mlp_dropout_and_hooks_run_timm_modules(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        blocks(model)[0].mlp.drop1.p = 0.3
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a patched timm ConvBlock has MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0)
    assert len(op_calls["layernorm_mlp"]) == MLPS - 1
    op_calls["layernorm_mlp"].clear()
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        blocks(model)[2].mlp.fc1.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.fc1"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == MLPS - 1


def test_attention_dropout_and_hooks_run_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):  # timm's constructor takes no attention dropout: set it
        attentions(model)[0].attn_drop.p = 0.2
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn=False)
    assert len(op_calls["flash_attention"]) == ATTENTIONS - 1
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        attentions(model)[-1].attn_drop.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=1), rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == ATTENTIONS and len(op_calls["layernorm_mlp"]) == MLPS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert len(op_calls["flash_attention"]) >= ATTENTIONS and len(op_calls["layernorm_mlp"]) >= MLPS
