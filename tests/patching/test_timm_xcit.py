"""fastvit.patch on timm's XCiT: the cross-covariance attention (``XCA``) runs one
``fastvit.flash_attention`` call over each head's channels (the "sequence" is the C' = 32 channels
of a head, the "head dim" the N tokens), with q and k L2-normalised over the tokens and q scaled by
the per-head ``temperature`` (timm's ops); the class-attention blocks' ``ClassAttn`` is CaiT's
(fused by ``timm_cait``); the XCA blocks' MLP halves (after the attention and the local patch
interaction) are one ``fastvit.layernorm_mlp`` call each.

Model: ``xcit_nano_12_p16_224`` (dim 128, 4 heads, 16 px patches) shrunk to 2 XCA blocks and 1
class-attention block, 5 classes, batch 3 (odd), parameters moved off their init. 64 px images
give N = 16 tokens (a head dim padded to 16), 224 px the model's own N = 196 (not a power of two,
padded to 256: the widest the kernels take). Compared with an unpatched deep copy by the tolerance
rule (output and every gradient, ``temperature`` included) on the torch route (CPU) and through
the Triton kernels (interpreter).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    assert_compiles_and_traces,
    assert_matches_by_the_rule,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
from timm.models.cait import ClassAttn  # noqa: E402
from timm.models.xcit import XCA  # noqa: E402

from fastvit.nn.timm_cait import FusedClassAttn  # noqa: E402
from fastvit.nn.timm_xcit import FusedXCA, FusedXCABlock  # noqa: E402

BATCH, XCA_BLOCKS, CLASS_BLOCKS, HEADS, HEAD_CHANNELS = 3, 2, 1, 4, 32


def xcit(**overrides) -> torch.nn.Module:
    args = dict(depth=XCA_BLOCKS, cls_attn_layers=CLASS_BLOCKS, num_classes=5)
    return perturb_(timm.create_model("xcit_nano_12_p16_224", pretrained=False, **(args | overrides)))


def images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _xca_calls(op_calls) -> list[dict]:
    """The XCA blocks' flash_attention calls (scale 1; the class attention's query is 1 token)."""
    return [c for c in op_calls["flash_attention"] if c["args"][0].shape[2] != 1]


@pytest.mark.parametrize("size", [64, 224])
def test_xcit_matches_unpatched(size, op_calls):
    reference, patched, report = pair(xcit(img_size=size).eval())
    assert report.counts() == {"attention": XCA_BLOCKS + CLASS_BLOCKS, "mlp": XCA_BLOCKS}
    assert [type(b) for b in patched.blocks] == [FusedXCABlock] * XCA_BLOCKS
    assert [type(b.attn) for b in patched.blocks] == [FusedXCA] * XCA_BLOCKS
    assert [type(b.attn) for b in patched.cls_attn_blocks] == [FusedClassAttn] * CLASS_BLOCKS
    assert not [e for e in report.skipped if e.part == "attention"]
    # what is not fused is listed with its reason, block by block (the report said nothing of it)
    skipped = {e.where: (e.part, e.detail) for e in report.skipped}
    assert skipped["(model)"][0] == "patch_embed" and "strided convolutions" in skipped["(model)"][1]
    for i in range(CLASS_BLOCKS):
        part, detail = skipped[f"cls_attn_blocks.{i}"]
        assert part == "mlp" and "class token only" in detail
    assert len(skipped) == 1 + CLASS_BLOCKS
    assert_matches_by_the_rule(reference, patched, images(size))
    # the XCA blocks' MLP halves after the attention and the LPI, gamma2 as the layer scale
    mlp_calls = op_calls["layernorm_mlp"]
    assert len(mlp_calls) == XCA_BLOCKS and all(c["kwargs"]["layer_scale"] is not None for c in mlp_calls)
    calls = _xca_calls(op_calls)
    tokens = (size // 16) ** 2
    assert len(calls) == XCA_BLOCKS
    for call in calls:
        q, k, v = call["args"][:3]
        assert q.shape == k.shape == v.shape == (BATCH, HEADS, HEAD_CHANNELS, tokens)  # channels attend
        assert call["kwargs"]["scale"] == 1.0  # the temperature is in q, as in timm's fused path


@pytest.mark.interpreter
@pytest.mark.parametrize("size", [64, 224])
def test_xcit_through_the_kernels(size, op_calls, fresh_warnings):
    """N = 16 and N = 196 tokens as the kernels' head dim (196 pads to 256), fp32, interpreter."""
    reference, patched, _ = pair(xcit(img_size=size).eval())
    with fastvit.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", fastvit.FastvitFallbackWarning)  # no fallback to SDPA
        assert_matches_by_the_rule(reference, patched, images(size, seed=1))
    assert len(_xca_calls(op_calls)) == XCA_BLOCKS


def test_state_dict_unpatch_training_and_compile():
    model = xcit(img_size=64)
    before, types = storage_map(model), module_types(model)
    fastvit.patch(model)
    assert storage_map(model) == before  # the same parameters, not copies
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images(64)).square().mean().backward()
    for block in model.blocks:
        assert block.attn.temperature.grad is not None and block.attn.temperature.grad.abs().sum() > 0
    opt.step()
    compiled = torch.compile(model.eval(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(images(64)), model(images(64)))
    fastvit.unpatch(model)
    assert module_types(model) == types and storage_map(model) == before
    assert type(model.blocks[0].attn) is XCA and type(model.cls_attn_blocks[0].attn) is ClassAttn


def test_attention_dropout_in_training_runs_timm(op_calls):
    """XCA's attention dropout (timm applies it only on its unfused path) runs timm's forward in
    training, with the fallback warning; in eval the op runs."""
    model = xcit(img_size=64, attn_drop_rate=0.1)
    _, patched, _ = pair(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patched.train()(images(64))
    assert not _xca_calls(op_calls)
    assert any("XCiT XCA" in str(w.message) for w in caught)
    patched.eval()(images(64))
    assert len(_xca_calls(op_calls)) == XCA_BLOCKS


def test_training_step_with_drop_path_and_hooks(op_calls, fresh_warnings):
    """A seeded training step with drop path matches the unpatched model (drop_path2's draw made in
    timm's place); a hook on a block's mlp.fc1 runs timm's MLP half for that block."""
    reference, patched, _ = pair(xcit(img_size=64, drop_path_rate=0.3))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(64), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])
    op_calls["layernorm_mlp"].clear()
    reference, patched, _ = pair(xcit(img_size=64).eval())
    for model in (reference, patched):
        model.blocks[0].mlp.fc1.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp.fc1"):
        torch.testing.assert_close(patched(images(64)), reference(images(64)), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == XCA_BLOCKS - 1


def test_fx_and_torchscript(op_calls, fresh_warnings):
    reference, patched, _ = pair(xcit(img_size=64).eval())
    assert_compiles_and_traces(reference, patched, images(64))
