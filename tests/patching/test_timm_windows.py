"""fastvit.patch on timm's windowed models: Swin V1 / V2 (``WindowAttention``: the relative-position
bias, V2's continuous position bias and cosine attention, the block's shifted-window mask),
SAM / ViTDet (``vision_transformer_sam.Attention``: padded window blocks and a global block with the
decomposed relative position through the op's ``rel_pos``) and Hiera (``MaskUnitAttention``:
mask-unit and global attention, with and without q pooling).

Each model is compared with an unpatched deep copy on the CPU (torch route, fp32) by the tolerance
rule: the patched model's error against the unpatched model run in float64 is at most 2x the
unpatched fp32 model's, plus fp32's slack; every gradient (bias tables, CPB MLP, logit scale,
rel_pos_h / rel_pos_w included) likewise.

Tiny models. Swin: 2x2 patches, dim 32, stages of 2 blocks with 2 and 4 heads (head_dim 16),
4x4 windows (16 tokens), so every other block shifts by 2. Images 32 (maps 16 and 8: shifted
windows in both stages) and, with ``dynamic_img_size``, 20x28 (maps 10x14 and 5x7: padded to
12x16 and 8x8, the masks built per call). SAM: 4x4 patches, dim 32, 2 heads, window 3 in block 0
(a 32 image gives an 8x8 map padded to 9x9: padding tokens in the windows), block 1 global with
rel_pos; 40x24 images give a 10x6 map (the rel_pos tables resized by timm's get_rel_pos).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit.nn.fused import FusedModule
from tests.patching.helpers import assert_matches_by_the_rule, module_types, pair, perturb_, storage_map

timm = pytest.importorskip("timm")
from timm.models.hiera import MaskUnitAttention  # noqa: E402
from timm.models.swin_transformer import WindowAttention  # noqa: E402
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2  # noqa: E402
from timm.models.vision_transformer_sam import Attention as SamAttention  # noqa: E402

from fastvit.nn.timm_hiera import FusedMaskUnitAttention  # noqa: E402
from fastvit.nn.timm_sam import FusedSamAttention  # noqa: E402
from fastvit.nn.timm_swin import FusedSwinV2WindowAttention, FusedSwinWindowAttention  # noqa: E402

BATCH, SWIN_BLOCKS, SAM_BLOCKS, HIERA_BLOCKS = 3, 4, 2, 4


def swin(v2: bool = False, **overrides) -> nn.Module:
    name = "swinv2_tiny_window8_256" if v2 else "swin_tiny_patch4_window7_224"
    args = dict(
        img_size=32, patch_size=2, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5,
    )  # fmt: skip
    return perturb_(timm.create_model(name, pretrained=False, **(args | overrides)))


def samvit(**overrides) -> nn.Module:
    args = dict(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
        neck_chans=16, num_classes=5,
    )  # fmt: skip
    return perturb_(timm.create_model("samvit_base_patch16", pretrained=False, **(args | overrides)))


def hiera(**overrides) -> nn.Module:
    args = dict(img_size=32, embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), mask_unit_size=(4, 4), num_classes=5)
    return perturb_(timm.create_model("hiera_tiny_224", pretrained=False, **(args | overrides)))


MODELS = {"swin": swin, "swinv2": lambda **kw: swin(v2=True, **kw), "sam": samvit, "hiera": hiera}
BLOCKS = {"swin": SWIN_BLOCKS, "swinv2": SWIN_BLOCKS, "sam": SAM_BLOCKS, "hiera": HIERA_BLOCKS}


def images(size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(BATCH, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_matches_unpatched(v2, op_calls):
    reference, patched, report = pair(swin(v2).eval())
    # V1's blocks' MLP halves are fused (fastvit.nn.timm_blocks); V2's post-norm blocks' MLPs alone
    # (fastvit.nn.timm_post_norm)
    assert report.counts() == {"attention": SWIN_BLOCKS, "mlp": SWIN_BLOCKS}
    assert {e.part for e in report.skipped} == {"patch_embed"}
    assert_matches_by_the_rule(reference, patched, images())
    calls = op_calls["flash_attention"]
    assert len(calls) == SWIN_BLOCKS
    # block 0 (W-MSA): windows in the batch, the bias (1, H, N, N) broadcast over them
    q, mask = calls[0]["args"][0], calls[0]["kwargs"]["attn_mask"]
    assert q.shape == (BATCH * 16, 2, 16, 16) and mask.shape == (1, 2, 16, 16)
    # block 1 (SW-MSA): windows as heads, the bias plus the shift mask (1, nW*H, N, N) for every image
    q, mask = calls[1]["args"][0], calls[1]["kwargs"]["attn_mask"]
    assert q.shape == (BATCH, 16 * 2, 16, 16) and mask.shape == (1, 16 * 2, 16, 16)
    assert mask.requires_grad and mask.dtype == torch.float32  # the bias table / CPB MLP learns through it
    assert calls[1]["kwargs"]["scale"] == (1.0 if v2 else 16**-0.5)  # V2: q pre-scaled


def test_swin_shift_mask_reaches_the_op(op_calls):
    _, patched, _ = pair(swin().eval())
    patched(images())
    block = patched.layers[0].blocks[1]
    bias = block.attn._get_rel_pos_bias().detach()  # (1, H, N, N)
    mask = op_calls["flash_attention"][1]["kwargs"]["attn_mask"].detach().view(16, 2, 16, 16)
    shift = mask - bias  # per window: the block's -100 / 0 mask, the same for both heads
    torch.testing.assert_close(shift, block.attn_mask.unsqueeze(1).expand(-1, 2, -1, -1))
    assert not shift[0].any() and shift[-1].lt(0).any()  # first window whole, the last one split


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_padded_dynamic_size(v2, op_calls):
    # 20x28 images: 10x14 then 5x7 maps, padded to the 4x4 windows; masks built per call
    reference, patched, _ = pair(swin(v2, dynamic_img_size=True).eval())
    assert_matches_by_the_rule(reference, patched, images((20, 28)))
    assert len(op_calls["flash_attention"]) == SWIN_BLOCKS
    assert op_calls["flash_attention"][1]["args"][0].shape == (BATCH, 12 * 2, 16, 16)  # 3x4 windows as heads


@pytest.mark.parametrize("size", [32, (40, 24)], ids=["native", "other-size"])
def test_sam_matches_unpatched(size, op_calls):
    reference, patched, report = pair(samvit().eval())
    # the blocks' MLP halves and the embedding too (test_timm_embeddings.py)
    assert report.counts() == {"attention": SAM_BLOCKS, "mlp": SAM_BLOCKS, "patch_embed": 1} and not report.skipped
    assert_matches_by_the_rule(reference, patched, images(size))
    windowed, global_ = op_calls["flash_attention"]
    grid = (8, 8) if size == 32 else (10, 6)
    windows = (-(-grid[0] // 3)) * (-(-grid[1] // 3))  # padded to multiples of 3
    assert windowed["args"][0].shape == (BATCH * windows, 2, 9, 16)
    assert "attn_mask" not in windowed["kwargs"]  # SAM attends to its padding tokens, as timm does
    rel_h, rel_w = global_["kwargs"]["rel_pos"]  # the global block's decomposed rel-pos
    tokens = grid[0] * grid[1]
    assert rel_h.shape == (BATCH, 2, tokens, grid[0]) and rel_w.shape == (BATCH, 2, tokens, grid[1])
    assert rel_h.requires_grad and rel_w.requires_grad


@pytest.mark.parametrize("size", [32, (32, 64)], ids=["native", "other-size"])
def test_hiera_matches_unpatched(size, op_calls):
    reference, patched, report = pair(hiera(img_size=size).eval())
    assert report.counts() == {"attention": HIERA_BLOCKS, "mlp": HIERA_BLOCKS}  # the blocks' MLP halves too
    assert {e.part for e in report.skipped} == {"patch_embed"}
    assert_matches_by_the_rule(reference, patched, images(size))
    units = 4 if size == 32 else 8
    shapes = [(c["args"][0].shape, c["args"][1].shape[2]) for c in op_calls["flash_attention"]]
    assert shapes == [
        ((BATCH, 1 * units, 16, 16), 16),  # stage 1: units as heads, 16 tokens each
        ((BATCH, 2 * units, 4, 16), 16),  # stage 2: q pooled 2x2 (4 queries per unit), 16 keys
        ((BATCH, 4 * units, 1, 16), 4),  # stage 3: q pooled to 1 per unit, 4 keys
        ((BATCH, 8, units // 4, 16), units),  # stage 4: global over the 2x2 (2x4) map, q pooled
    ]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_is_untouched_and_unpatch_restores_exactly(name):
    model = MODELS[name]().eval()
    x = images()
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    report = fastvit.patch(model)
    assert storage_map(model) == before_storage
    fused_classes = (FusedSwinWindowAttention, FusedSwinV2WindowAttention, FusedSamAttention, FusedMaskUnitAttention)
    fused = [m for m in model.modules() if type(m) in fused_classes]
    blocks = [m for m in model.modules()
              if isinstance(m, FusedModule) and type(m) not in fused_classes and m is not model]  # fmt: skip
    assert len(fused) == BLOCKS[name] and len(blocks) == BLOCKS[name]  # Swin V2: its blocks' MLPs
    embeddings = 1 if name == "sam" else 0  # SAM's embedding (test_timm_embeddings.py)
    assert len(report.replaced) == len(fused) + len(blocks) + embeddings
    timm_classes = (WindowAttention, WindowAttentionV2, SamAttention, MaskUnitAttention)
    assert all(isinstance(m, timm_classes) for m in fused)  # isinstance checks against timm's classes pass
    assert all(isinstance(m, type(m).fastvit_original()) for m in blocks)
    assert len(fastvit.unpatch(model).replaced) == len(report.replaced)
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)


def test_report_names_each_class_and_hooks_on_softmax():
    report = fastvit.patch(swin(v2=True))
    expected = {"attention": "WindowAttention -> FusedSwinV2WindowAttention",
                "mlp": "Mlp -> FusedMlpAlone"}  # V2's post-norm blocks' MLPs, fused alone  # fmt: skip
    assert all(expected[e.part] in e.detail for e in report.replaced)
    assert {e.part for e in report.skipped} == {"patch_embed"}  # V2's post-norm blocks' MLPs are fused alone
    model = swin()
    model.layers[0].blocks[0].attn.softmax.register_forward_hook(lambda *args: None)  # attention-map hook
    report = fastvit.patch(model)
    assert report.counts() == {"attention": SWIN_BLOCKS - 1, "mlp": SWIN_BLOCKS}
    (skip,) = [e for e in report.skipped if e.part == "attention"]
    assert skip.where == "layers.0.blocks.0.attn" and "softmax has a forward hook" in skip.detail


@pytest.mark.parametrize("name", ["swin", "sam", "hiera"])
def test_training_step_with_drop_path(name, op_calls):
    reference, patched, _ = pair(MODELS[name](drop_path_rate=0.3).train())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, patched)]
    for model, optimizer in zip((reference, patched), optimizers, strict=True):
        torch.manual_seed(3)  # the same drop-path draws
        model(images()).square().mean().backward()
        optimizer.step()
    assert len(op_calls["flash_attention"]) == BLOCKS[name]
    for (n, want), got in zip(reference.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, _ = pair(swin(attn_drop_rate=0.2).train())
    outputs = []
    for model in (reference, patched):
        torch.manual_seed(5)
        if model is patched:
            with pytest.warns(UserWarning, match="attention dropout p=0.2"):
                outputs.append(model(images()))
        else:
            outputs.append(model(images()))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    assert not op_calls["flash_attention"]


@pytest.mark.parametrize("name", ["swin", "sam", "hiera"])
def test_forward_intermediates(name, op_calls):
    reference, patched, _ = pair(MODELS[name]().eval())
    want_final, want = reference.forward_intermediates(images())
    got_final, got = patched.forward_intermediates(images())
    assert op_calls["flash_attention"]
    torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-5)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["swin", "sam", "hiera"])
def test_torch_compile_fullgraph(name):
    torch._dynamo.reset()
    try:
        reference, patched, _ = pair(MODELS[name]().eval())
        compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
        assert_matches_by_the_rule(reference, compiled, images())
    finally:
        torch._dynamo.reset()


def test_fx_symbolic_trace(op_calls):
    # (timm's SAM does not trace: its Block branches on shapes, patched or not)
    reference, patched, _ = pair(swin(v2=True).eval())
    traced = torch.fx.symbolic_trace(patched)
    targets = [getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count("flash_attention") == SWIN_BLOCKS  # fastvit's op is an FX leaf
    assert_matches_by_the_rule(reference, traced, images())


@pytest.mark.parametrize("name", ["swin", "sam"])
def test_torchscript_compiles_the_original_math(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(MODELS[name]().eval())
    with pytest.warns(UserWarning, match="compiles the original"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(patched)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x = images()
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not op_calls["flash_attention"]  # TorchScript ran timm's math
    patched(x)
    assert op_calls["flash_attention"]  # the Python model is still patched


@pytest.mark.interpreter
def test_triton_route_in_the_interpreter(op_calls):
    # Swin V2 on 16x16 images: an 8x8 map (4 windows, shifted) then 4x4 (one window, no shift);
    # SAM on 16x16: a 4x4 map in 3x3 windows (padded to 6x6), then global with rel_pos
    # Hiera on 32x32 images (its unroll needs 8x8 tokens): 4 mask units, q pooled, then global
    for build, size in ((lambda: swin(v2=True, img_size=16), 16), (lambda: samvit(img_size=16), 16), (hiera, 32)):
        reference, patched, _ = pair(build().eval())
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, images(size))
    assert len(op_calls["flash_attention"]) == SWIN_BLOCKS + SAM_BLOCKS + HIERA_BLOCKS


def _compiled_kernels_check(name: str, device: torch.device) -> None:
    """fp32 through the Triton kernels (IEEE fp32 dots), by the tolerance rule; then bf16 autocast
    within bf16's error. Swin: the (1, nW*H, N, N) bias + shift mask; SAM: rel_pos; Hiera: q pooling, M > N."""
    reference, patched, _ = pair(MODELS[name]().to(device).eval())
    x = images().to(device)
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got, want = patched(x), reference(x)
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 3e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_kernels_on_the_gpu(name, op_calls):
    _compiled_kernels_check(name, torch.device("cuda"))
    assert len(op_calls["flash_attention"]) == 2 * BLOCKS[name]
