"""fastvit.patch on torchvision's windowed models: SwinTransformer V1 (``ShiftedWindowAttention``
and the blocks' LayerNorm+MLP half), V2 (``ShiftedWindowAttentionV2``, cosine attention with a
continuous position bias; its post-norm blocks' MLP alone, ``norm="none"``) and MaxVit
(``RelativePositionalMultiHeadAttention``, block and grid attention, and each
``PartitionAttentionLayer``'s LayerNorm+MLP half), against unpatched copies on
the CPU (torch route, fp32), by the tolerance rule: the patched model's error against the
unpatched model run in float64 is at most 2x the unpatched fp32 model's, plus fp32's slack.

Tiny models: Swin with 2x2 patches, dim 32, stages of 2 blocks with 2 and 4 heads (head_dim 16),
windows 4x4 (16 tokens), so every other block shifts by 2. Images 32 (feature maps 16 and 8:
shifted windows in both stages), 20 (10 and 5: padded to 12 and 8, the bottom/right windows half
padding), 16 (8 and 4: the window covers the last map, so torchvision drops its shift) and 20x32
(padding in one dim only). MaxVit: dim 32 and 64, head_dim 16, 2x2 partitions of a 32x32 image.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit.nn.fused import FusedModule
from tests.patching.helpers import (
    assert_matches_on_the_gpu,
    assert_outputs_and_grads_match,
    module_types,
    pair,
    perturb_,
    storage_map,
)
from tests.tolerance import assert_close_to_reference

pytest.importorskip("torchvision")
from torchvision.models.maxvit import MaxVit, PartitionAttentionLayer, RelativePositionalMultiHeadAttention
from torchvision.models.swin_transformer import (
    PatchMergingV2,
    ShiftedWindowAttention,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerBlockV2,
)
from torchvision.ops.misc import MLP

BATCH, BLOCKS = 3, 4  # 2 stages x 2 blocks; MaxVit: 2 layers x (block + grid attention)


def swin(v2: bool = False, **overrides) -> nn.Module:
    args = dict(
        patch_size=[2, 2], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        stochastic_depth_prob=0.0, num_classes=5,
    )  # fmt: skip
    if v2:
        args |= dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    return perturb_(SwinTransformer(**(args | overrides)))


def maxvit(**overrides) -> nn.Module:
    args = dict(
        input_size=(32, 32), stem_channels=16, partition_size=2, block_channels=[32, 64], block_layers=[1, 1],
        head_dim=16, stochastic_depth_prob=0.0, num_classes=5,
    )  # fmt: skip
    return perturb_(MaxVit(**(args | overrides)))


MODELS: dict[str, Callable[[], nn.Module]] = {"swin": swin, "swin_v2": lambda: swin(v2=True), "maxvit": maxvit}


def images(size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(BATCH, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _run(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The output and every gradient (the input's and each Parameter's, by name) for a fixed
    upstream gradient."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * upstream).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}  # torch.compile's wrapper
    return {"output": out.detach(), "input": x.grad} | grads


def assert_matches_by_the_rule(reference: nn.Module, patched: nn.Module, x: torch.Tensor) -> None:
    """Output and every gradient (the bias tables', V2's CPB MLP's and logit scale's included)
    within the tolerance rule, against the unpatched model in float64."""
    oracle = _run(copy.deepcopy(reference).double(), x.double())
    lowp, got = _run(reference, x), _run(patched, x)
    assert got.keys() == oracle.keys()  # a GraphModule lists its Parameters in another order
    for name, want in oracle.items():
        assert (want is None) == (got[name] is None), f"{name}: gradient present in one model only"
        if want is not None:
            assert_close_to_reference(got[name], want, lowp[name], name=name)


@pytest.mark.parametrize("size", [32, 20, 16, (20, 32)], ids=["shifted", "padded", "shift-dropped", "padded-h"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_matches_unpatched(v2, size, op_calls):
    reference, patched, report = pair(swin(v2).eval())
    # V1: each block's LayerNorm+MLP half; V2's post-norm blocks (x + stochastic_depth(norm2(mlp(x)))):
    # the MLP alone, norm="none", the block's norm2 and residual add torchvision's
    assert report.counts() == {"attention": BLOCKS, "mlp": BLOCKS} and not report.skipped
    assert_matches_by_the_rule(reference, patched, images(size))
    calls = op_calls["flash_attention"]
    assert len(calls) == BLOCKS and len(op_calls["layernorm_mlp"]) == BLOCKS
    mlp_call = op_calls["layernorm_mlp"][0]["kwargs"]
    assert (mlp_call.get("norm"), mlp_call.get("residual")) == (("none", False) if v2 else (None, None))
    mask = calls[0]["kwargs"]["attn_mask"]
    assert mask.requires_grad and mask.dtype == torch.float32  # the bias table learns through it
    assert calls[0]["kwargs"]["scale"] == (1.0 if v2 else None)  # V2: q pre-scaled


def test_swin_shift_mask_reaches_the_op(op_calls):
    # 16x16 map, 4x4 windows: 16 windows; the shifted block's windows see up to 4 regions (-100 apart)
    _, patched, _ = pair(swin().eval())
    patched(images(32))
    unshifted, shifted = (c["kwargs"]["attn_mask"].detach() for c in op_calls["flash_attention"][:2])
    assert unshifted.shape == shifted.shape == (1, 16 * 2, 16, 16)  # (1, windows * heads, N, N)
    for mask, block in ((unshifted, patched.features[1][0]), (shifted, patched.features[1][1])):
        bias = block.attn.get_relative_position_bias().detach()  # (1, heads, N, N)
        diff = mask.view(16, 2, 16, 16) - bias
        assert set(diff.unique().tolist()) <= {-100.0, 0.0}
    assert not (unshifted.view(16, 2, 16, 16) - patched.features[1][0].attn.get_relative_position_bias()).any()
    shift = shifted.view(16, 2, 16, 16) - patched.features[1][1].attn.get_relative_position_bias().detach()
    assert not shift[0].any() and shift[-1].lt(0).any()  # first window whole, the last one split


def test_maxvit_matches_unpatched(op_calls):
    reference, patched, report = pair(maxvit().eval())
    assert report.counts() == {"attention": BLOCKS, "mlp": BLOCKS} and not report.skipped
    assert_matches_by_the_rule(reference, patched, images(32))
    calls = op_calls["flash_attention"]
    assert len(calls) == BLOCKS
    # the MLP halves on the partitioned (B, G, P, C) tokens: 16 windows / grid cells of 4, then 4 of 4
    shapes = [tuple(c["args"][0].shape) for c in op_calls["layernorm_mlp"]]
    assert shapes == [(BATCH, 16, 4, 32), (BATCH, 16, 4, 32), (BATCH, 4, 4, 64), (BATCH, 4, 4, 64)]
    attn = patched.blocks[0].layers[0].layers.window_attention.attn_layer[1]
    assert calls[0]["kwargs"]["scale"] == attn.scale_factor == 32**-0.5  # feat_dim, not head_dim
    q, mask = calls[0]["args"][0], calls[0]["kwargs"]["attn_mask"]
    assert mask.shape == (1, 2, 4, 4) and mask.requires_grad  # one bias for all B*G windows
    assert q.shape[0] == BATCH * 16 and q.shape[2] == 4  # 8x8 map, 2x2 windows: 16 windows of 4 tokens


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_is_untouched_and_unpatch_restores_exactly(name):
    model = MODELS[name]().eval()
    x = images()
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    report = fastvit.patch(model)
    assert storage_map(model) == before_storage
    fused = [m for m in model.modules() if isinstance(m, FusedModule)]
    swaps = 2 * BLOCKS  # the attention and the MLP half (Swin V2: the MLP alone) of each block
    assert len(fused) == swaps
    originals = (ShiftedWindowAttention, SwinTransformerBlock, RelativePositionalMultiHeadAttention,
                 PartitionAttentionLayer, MLP)  # fmt: skip
    assert all(isinstance(m, originals) for m in fused)
    assert len(fastvit.unpatch(model).replaced) == len(report.replaced) == swaps
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)


def test_report_names_each_class_and_hooks_run():
    report = fastvit.patch(swin(v2=True))
    expected = {"attention": "ShiftedWindowAttentionV2 -> FusedShiftedWindowAttentionV2",
                "mlp": "MLP -> FusedMLPAlone"}  # fmt: skip
    assert all(expected[e.part] in e.detail for e in report.replaced)
    assert next(e.path for e in report.replaced if e.part == "mlp") == "features.1.0.mlp"
    # torchvision reads qkv and proj by weight without calling them, and so does the fused forward:
    # a hook there changes nothing either way; hooks on the attention module itself run
    model = swin().eval()
    qkv_calls = []
    model.features[1][0].attn.qkv.register_forward_hook(lambda *args: qkv_calls.append(1))
    reference, patched, report = pair(model)
    assert report.counts()["attention"] == BLOCKS  # the qkv hook does not stop patching
    seen = []
    patched.features[1][1].attn.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert_matches_by_the_rule(reference, patched, images())
    assert seen == [(BATCH, 16, 16, 32)] and not qkv_calls  # never called, patched or not


def test_global_module_hooks_leave_it_alone():
    model = swin()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with pytest.raises(ValueError, match="global module hooks are registered"):  # every module skipped
            fastvit.patch(model)
    finally:
        handle.remove()


def test_training_step_with_stochastic_depth(op_calls):
    reference, patched, _ = pair(swin(stochastic_depth_prob=0.5).train())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, patched)]
    for model, optimizer in zip((reference, patched), optimizers, strict=True):
        torch.manual_seed(3)  # the same drop-path draws
        model(images()).square().mean().backward()
        optimizer.step()
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == BLOCKS
    scales = [call["kwargs"]["sample_scale"] for call in op_calls["layernorm_mlp"]]
    assert scales[0] is None and any(s is not None and 0 in s for s in scales)  # rows dropped (p from 0)
    for (name, want), got in zip(reference.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    patched.eval()
    reference.eval()
    assert_matches_by_the_rule(reference, patched, images(20))


def test_swin_v2_mlp_alone_in_training_and_with_hooks(op_calls, fresh_warnings):
    """V2's post-norm blocks keep their stochastic depth, norm2 and residual add (torchvision's
    draws); the fused MLP alone gives the same training step. A hook on one of its layers added
    after patching runs torchvision's layers for that MLP."""
    reference, patched, _ = pair(swin(v2=True, stochastic_depth_prob=0.5).train())
    assert_outputs_and_grads_match(reference, patched, images(), seed=3, rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS
    op_calls["layernorm_mlp"].clear()
    reference, patched, _ = pair(swin(v2=True).eval())
    for model in (reference, patched):
        model.features[3][1].mlp[0].register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on 0"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS - 1
    # an MLP of other layers in a V2 block's slot is reported with why
    model = swin(v2=True)
    model.features[1][0].mlp = MLP(32, [64, 32], activation_layer=nn.ReLU)
    (skip,) = fastvit.patch(model).skipped
    assert skip.path == "features.1.0.mlp" and "mlp holds (Linear, ReLU, Dropout, Linear, Dropout)" in skip.detail


def test_swin_v2_compile_and_fx(op_calls):
    reference, patched, _ = pair(swin(v2=True).eval())
    torch._dynamo.reset()
    try:
        compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
        assert_matches_by_the_rule(reference, compiled, images(20))
    finally:
        torch._dynamo.reset()
    traced = torch.fx.symbolic_trace(patched)
    assert sum(n.op == "call_method" and n.target == "_fastvit_mlp" for n in traced.graph.nodes) == BLOCKS
    assert_matches_by_the_rule(reference, traced, images())


def test_maxvit_training_step_with_stochastic_depth(op_calls):
    """The layer's one StochasticDepth module draws anew in each half: the fused MLP half's
    sample_scale draws what torchvision's second call draws."""
    reference, patched, _ = pair(maxvit(stochastic_depth_prob=0.5).train())
    for model in (reference, patched):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # the MBConv's BatchNorm: batch statistics are not what this checks
    outputs = []
    for model in (reference, patched):
        torch.manual_seed(3)
        out = model(images())
        out.square().mean().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    scales = [call["kwargs"]["sample_scale"] for call in op_calls["layernorm_mlp"]]
    # the first MaxVitLayer's two partition layers at p = 0 (torchvision's Identity draw), the second's not
    assert len(scales) == BLOCKS and scales[:2] == [None, None] and all(s is not None for s in scales[2:])
    for (name, want), got in zip(reference.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_maxvit_mlp_dropout_and_hooks_run_torchvision(op_calls, fresh_warnings):
    reference, patched, report = pair(maxvit(mlp_dropout=0.2).train())
    assert sum("MLP dropout 0.2" in e.detail for e in report.replaced) == BLOCKS
    outputs = []
    for model in (reference, patched):
        model.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)
        torch.manual_seed(5)
        outputs.append(model(images()))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)  # the same dropout draws
    assert not op_calls["layernorm_mlp"]
    reference, patched, _ = pair(maxvit().eval())
    for model in (reference, patched):
        model.blocks[1].layers[0].layers.grid_attention.mlp_layer[1].register_forward_hook(lambda m, a, out: out * 2)
    with pytest.warns(fastvit.FastvitFallbackWarning, match="a hook on mlp_layer.1"):
        torch.testing.assert_close(patched(images()), reference(images()), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == BLOCKS - 1


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_dropout_in_training_runs_torchvision(v2, op_calls, fresh_warnings):
    reference, patched, report = pair(swin(v2, attention_dropout=0.2, dropout=0.1).train())
    notes = [e.detail for e in report.replaced]
    assert sum("dropout 0.2: in training it runs torchvision's forward" in n for n in notes) == BLOCKS
    mlp_note = "MLP dropout 0.1: in training it runs torchvision's layers" if v2 else (
        "MLP dropout 0.1: in training its MLP half runs torchvision's modules")  # fmt: skip
    assert sum(mlp_note in n for n in notes) == BLOCKS
    outputs = []
    for model in (reference, patched):
        torch.manual_seed(5)
        if model is patched:
            with pytest.warns(UserWarning) as warned:
                outputs.append(model(images()))
            messages = " ".join(str(w.message) for w in warned)
            assert "attention_dropout p=0.2 and dropout p=0.1" in messages
            assert "MLP dropout > 0" in messages
        else:
            outputs.append(model(images()))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)  # the same math and dropout draws
    assert not op_calls["flash_attention"] and not op_calls["layernorm_mlp"]
    assert_matches_by_the_rule(reference.eval(), patched.eval(), images())
    assert len(op_calls["flash_attention"]) == BLOCKS  # in eval: fused
    assert len(op_calls["layernorm_mlp"]) == BLOCKS


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    try:
        reference, patched, _ = pair(swin().eval())
        compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
        assert_matches_by_the_rule(reference, compiled, images(20))
    finally:
        torch._dynamo.reset()


def _call_targets(graph_module: torch.fx.GraphModule) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in graph_module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", ["swin", "maxvit"])
def test_fx_symbolic_trace_then_torchscript(name, op_calls):
    reference, patched, _ = pair(MODELS[name]().eval())
    traced = torch.fx.symbolic_trace(patched)
    if name == "swin":  # torchvision wraps shifted_window_attention as one node; so is the fused one
        assert _call_targets(traced).count("shifted_window_flash_attention") == BLOCKS
    else:  # fastvit's op is a leaf
        assert _call_targets(traced).count("flash_attention") == BLOCKS
    assert_matches_by_the_rule(reference, traced, images())
    if name == "swin":  # the wrapped function looks the op up at call time
        assert len(op_calls["flash_attention"]) == BLOCKS
    calls = len(op_calls["flash_attention"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(traced)  # a scripted graph runs torchvision's (or the op's TorchScript) math
    x = images()
    torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(op_calls["flash_attention"]) == calls


def test_create_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    reference, patched, _ = pair(swin().eval())
    nodes = {"features.1": "stage1", "features.3": "stage2", "norm": "final"}
    want = create_feature_extractor(reference, return_nodes=nodes)(images())
    got = create_feature_extractor(patched, return_nodes=nodes)(images())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["swin_v2", "maxvit"])
def test_torchscript_compiles_the_original_math(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(MODELS[name]().eval())
    with pytest.warns(UserWarning, match="compiles the original"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(patched)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)  # deployable
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x = images()
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not op_calls["flash_attention"] and not op_calls["layernorm_mlp"]  # TorchScript ran torchvision's math
    patched(x)
    assert len(op_calls["flash_attention"]) == BLOCKS  # the Python model is still patched


@pytest.mark.interpreter
def test_triton_route_in_the_interpreter(op_calls):
    # 16x16 images: 8x8 map (4 windows, shifted) then 4x4 (one window, shift dropped)
    reference, patched, _ = pair(swin(v2=True).eval())
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, images(16))
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == BLOCKS


@pytest.mark.interpreter
def test_maxvit_triton_route_in_the_interpreter(op_calls):
    reference, patched, _ = pair(maxvit().eval())
    with fastvit.backend("triton"):  # one image: the bias gradient walks every window in the interpreter
        assert_matches_by_the_rule(reference, patched, images(32)[:1])
    assert len(op_calls["flash_attention"]) == len(op_calls["layernorm_mlp"]) == BLOCKS


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_kernels_on_the_gpu(name, op_calls):
    assert_matches_on_the_gpu(MODELS[name]().eval(), images(32))
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
