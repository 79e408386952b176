"""timm's Swin V2-CR patched (fastvit.nn.timm_swin): its ``WindowMultiHeadAttention`` (cosine
attention with a per-head logit scale, the meta-network position bias, the block's shifted-window
mask) runs one fastvit.flash_attention call; its post-norm blocks' MLP halves are reported and run
timm's. Outputs and every gradient (qkv, logit scale, the meta MLP) by the tolerance rule against
the unpatched model in float64; seeded training steps with drop path and the meta MLP's own
dropout (timm builds it with ``drop=(0.125, 0)``); the fallbacks (attention dropout, a hook);
any input size with ``dynamic_img_size`` (padded windows, masks built per call); torch.compile,
timm's FX feature extraction, TorchScript (the original math) and the Triton kernels in the
interpreter.

A tiny model: 2 x 2 patches of 32 x 32 images (16 x 16 then 8 x 8 maps), width 32, two stages of
two blocks with 2 and 4 heads (head dim 16), 4 x 4 windows (16 tokens), so every other block
shifts; no downloads.
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
    pair,
    perturb_,
)

timm = pytest.importorskip("timm")

from fastvit.nn.timm_swin import FusedSwinV2CrWindowAttention  # noqa: E402

BATCH, BLOCKS, TOKENS = 3, 4, 16


def build(**overrides) -> torch.nn.Module:
    args = dict(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                num_classes=5)  # fmt: skip
    return perturb_(timm.create_model("swinv2_cr_tiny_224", pretrained=False, **(args | overrides))).eval()


def images(size: int | tuple[int, int] = 32, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def attentions(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn for stage in model.stages for block in stage.blocks]


def test_matches_unpatched_by_the_rule(op_calls):
    reference, patched, report = pair(build())
    # the post-norm blocks' MLPs too (test_timm_post_norm)
    assert report.counts() == {"attention": BLOCKS, "mlp": BLOCKS}
    assert all(type(a) is FusedSwinV2CrWindowAttention for a in attentions(patched))
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["flash_attention"]
    assert len(calls) == BLOCKS and all(c["kwargs"]["scale"] == 1.0 for c in calls)  # q pre-scaled
    # block 0 (W-MSA): windows in the batch, the meta-MLP bias (1, H, N, N) broadcast over them
    q, mask = calls[0]["args"][0], calls[0]["kwargs"]["attn_mask"]
    assert q.shape == (BATCH * 16, 2, TOKENS, 16) and mask.shape == (1, 2, TOKENS, TOKENS)
    # block 1 (SW-MSA): windows as heads, the bias plus the shift mask for every image
    q, mask = calls[1]["args"][0], calls[1]["kwargs"]["attn_mask"]
    assert q.shape == (BATCH, 16 * 2, TOKENS, 16) and mask.shape == (1, 16 * 2, TOKENS, TOKENS)
    assert mask.requires_grad  # the meta MLP learns through the op's mask gradient
    attn = attentions(patched)[1]
    shift = mask.detach().view(16, 2, TOKENS, TOKENS) - attn._relative_positional_encodings().detach()
    torch.testing.assert_close(shift, patched.stages[0].blocks[1].attn_mask.unsqueeze(1).expand(-1, 2, -1, -1))


def test_q_is_normalised_and_scaled_per_head(op_calls):
    _, patched, _ = pair(build())
    patched(images())
    q, k = op_calls["flash_attention"][0]["args"][:2]
    logit_scale = attentions(patched)[0].logit_scale.detach().clamp(max=torch.log(torch.tensor(100.0))).exp()
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(k.shape[:-1]))
    torch.testing.assert_close(q.norm(dim=-1), logit_scale.view(1, -1, 1).expand(q.shape[:-1]))


def test_patch_and_unpatch_keep_the_weights():
    assert_patch_and_unpatch_keep_the_weights(build())


def test_training_step_with_drop_path_and_the_meta_mlp_dropout(op_calls):
    reference, patched, _ = pair(build(drop_path_rate=0.5))
    assert attentions(patched)[0].meta_mlp.drop1.p > 0  # timm's meta MLP drops in training
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(), seed=0, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == BLOCKS


def test_other_sizes_with_dynamic_img_size(op_calls):
    # 20 x 28 images: 10 x 14 then 5 x 7 maps, padded to the 4 x 4 windows, the masks built per call
    reference, patched, _ = pair(build(dynamic_img_size=True, strict_img_size=False))
    assert_matches_by_the_rule(reference, patched, images((20, 28)))
    assert op_calls["flash_attention"][1]["args"][0].shape == (BATCH, 12 * 2, TOKENS, 16)  # 3 x 4 windows as heads


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build(attn_drop_rate=0.2))
    assert_attention_dropout_runs_timm(reference, patched, images(), fused_attn=False)
    assert op_calls["flash_attention"] == []


def test_a_hook_on_the_attention_dropout_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    for model in (reference, patched):
        attentions(model)[0].attn_drop.register_forward_hook(lambda m, args, out: out * 0.5)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == BLOCKS - 1


def test_compile_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(build())
    assert_compiles_and_traces(reference, patched, images())


@pytest.mark.interpreter
def test_triton_route(op_calls):
    reference, patched, _ = pair(build())
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, images(batch=2), rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == BLOCKS


@pytest.mark.gpu
def test_compiled_kernels_on_the_gpu(op_calls):
    assert_matches_on_the_gpu(build(), images())
    assert len(op_calls["flash_attention"]) >= BLOCKS
