"""Florence-2's DaViT vision tower (Hugging Face's ``Florence2VisionBackbone``) patched
(fastvit.nn.hf_florence2): the FFN half of every spatial and channel block one fastvit.layernorm_mlp
call on the block's channel-first map, the window attention through transformers' interface; the
channel attention, whose head dim is the image's tokens as a strided view, runs SDPA (before, the
op's stride check raised on it: a patched Florence-2 could not run). The export check caught the
custom ops trusting trace-time layouts (tests/ops/test_op_contract.py has the op-level test). The
tower against the unpatched one by the tolerance rule (output and every gradient, float64 oracle),
the map's layout kept (every block's output strides Hugging Face's, which its residual add
decides: (B, C, H, W) at channels-last strides here), drop path in training on Hugging Face's
modules, and ``ModelChecks`` (unpatch, torch.compile, torch.export, the Triton kernels in the
interpreter). A tiny config: 64 px images, stages of 16 / 32 channels, windows of 2.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_
from tests.patching.model_checks import ModelChecks

T = pytest.importorskip("transformers")

from fastvit.nn import hf_florence2  # noqa: E402

DEPTHS = [1, 1, 2, 1]  # 5 blocks, each a spatial and a channel block
BLOCKS = sum(DEPTHS)
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


class Tower(torch.nn.Module):
    """The backbone (its forward takes the images as ``hidden_states``): its (B, C, H, W) last map."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).last_hidden_state


def tower(drop_path_rate: float = 0.0) -> torch.nn.Module:
    config = T.Florence2VisionConfig(
        depths=DEPTHS, embed_dim=[16, 32, 32, 32], num_heads=[1, 2, 2, 2], num_groups=[1, 2, 2, 2], window_size=2,
        drop_path_rate=drop_path_rate,
    )  # fmt: skip
    return Tower(perturb_(T.Florence2VisionBackbone(config))).eval()


def test_ffn_halves_are_fused_and_match_unpatched(op_calls, fresh_warnings):
    reference, patched, report = pair(tower())
    # the window attentions are routed; the channel attentions, every call of which runs SDPA (their head
    # dim is the map's tokens, strided), are reported as left alone, not as routed
    assert report.counts() == {"attention": BLOCKS, "mlp": 2 * BLOCKS}
    channel = [e for e in report.skipped if e.part == "attention"]
    assert len(channel) == BLOCKS and all(e.path.endswith("channel_block.channel_attn") for e in channel)
    assert all("sends each of its calls to SDPA" in e.detail for e in channel)
    kinds = {type(m) for m in patched.modules()}
    assert {hf_florence2.FusedFlorence2VisionSpatialBlock, hf_florence2.FusedFlorence2VisionChannelBlock} <= kinds
    with pytest.warns(fastvit.FastvitFallbackWarning, match="strided"):  # the channel attention: SDPA
        assert_matches_by_the_rule(reference, patched, IMAGES)
    assert len(op_calls["layernorm_mlp"]) == 2 * BLOCKS  # the patched model's forward
    assert len(op_calls["flash_attention"]) == BLOCKS  # the window attentions
    call = op_calls["layernorm_mlp"][0]
    assert call["kwargs"]["residual"] is False  # the block adds the residual, keeping its layout


def test_every_block_keeps_hugging_faces_layout():
    reference, patched, _ = pair(tower())
    outputs = {}
    for name, model in (("reference", reference), ("patched", patched)):
        outputs[name] = []
        for stage in model.model.blocks:
            for block in stage:
                for part in (block.spatial_block, block.channel_block):
                    part.register_forward_hook(lambda m, a, out, seen=outputs[name]: seen.append(out))
        model(IMAGES)
    for got, want in zip(outputs["patched"], outputs["reference"], strict=True):
        assert got.shape == want.shape and got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_drop_path_in_training_runs_hugging_face(op_calls, fresh_warnings):
    model = tower(drop_path_rate=0.2)
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    # the rate grows over the blocks from 0: the first block's drop paths are nn.Identity
    dropping = [m for m in patched.modules() if isinstance(m, hf_florence2._Florence2MapBlock)
                and not isinstance(m.drop_path2, torch.nn.Identity)]  # fmt: skip
    assert 0 < len(dropping) < 2 * BLOCKS
    patched.train()
    with pytest.warns(fastvit.FastvitFallbackWarning, match="drop"):
        patched(IMAGES).sum().backward()
    assert len(op_calls["layernorm_mlp"]) == 2 * BLOCKS - len(dropping)
    model.train()
    torch.manual_seed(1)
    want = model(IMAGES)
    torch.manual_seed(1)
    got = patched(IMAGES)  # the same draws, in Hugging Face's order; its layout too
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.stride() == want.stride()
    model.eval()
    op_calls["layernorm_mlp"].clear()
    patched.eval()
    torch.testing.assert_close(patched(IMAGES), model(IMAGES), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 2 * BLOCKS


class TestFlorence2Checks(ModelChecks):
    build = staticmethod(tower)
    inputs = staticmethod(lambda batch: IMAGES[:batch])
    export_ops = frozenset({"fastvit.layernorm_mlp_fwd.default", "fastvit.flash_attention_fwd.default"})
    counted_op = "layernorm_mlp"
    calls = 2 * BLOCKS
