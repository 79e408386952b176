"""fastvit.patch on timm's attentions whose keys are not their queries: PVTv2 (spatial-reduction
``Attention``: N queries, M < N keys from a strided conv, or the ``linear`` variant's 7x7 pool),
CaiT (``ClassAttn``: one class-token query against every token; ``TalkingHeadAttn`` is reported as
skipped; its blocks' MLP halves are fused too: test_timm_cait.py) and MViTv2
(``MultiScaleAttention``: q, k, v pooled to different grids, the decomposed relative position
through the op's ``rel_pos`` with grids of different sizes, residual pooling, and the class token
of the ``*_cls`` models laid out on the key grid with a mask; its blocks' MLP halves, one
layernorm_mlp call each where the residual is x).

Each model is compared with an unpatched deep copy on the CPU (torch route, fp32) by the tolerance
rule: the patched model's error against the unpatched model run in float64 is at most 2x the
unpatched fp32 model's, plus fp32's slack; every gradient (MViTv2's rel_pos_h / rel_pos_w
included) likewise.

Tiny models, batch 3. PVTv2: dims (16, 32, 32, 32), heads (1, 2, 2, 2) (head_dim 16), one block
per stage, sr_ratios (8, 4, 2, 1); 64x64 images give 16x16, 8x8, 4x4, 2x2 maps, all reduced to
2x2 keys (N 256 -> M 4 ... and M = N at sr 1); 48x80 images give 12x20 ... 2x3 maps (M = 2 at the
first three). CaiT: 16x16 images, 4x4 patches, dim 32, 2 heads, 2 talking-heads blocks and 2
class-attention blocks (one query against 17 tokens); its position embedding fixes the size.
MViTv2: dims 32 then 64, heads 2 then 4 (head_dim 16), stages of 1 and 2 blocks; 32x32 images give
an 8x8 map whose keys pool to 2x2 (64 queries, 4 keys), then 4x4 queries against 2x2 keys; 28x24
images give 7x6 queries against 2x2 keys (the distance ratio 3.5 is truncated as timm does) and,
in stage 2, 4x3 queries against 4x3 keys.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import (
    assert_matches_by_the_rule,
    assert_matches_on_the_gpu,
    module_types,
    pair,
    perturb_,
    storage_map,
)

timm = pytest.importorskip("timm")
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn  # noqa: E402
from timm.models.mvitv2 import MultiScaleAttention, MultiScaleBlock, MultiScaleVit, MultiScaleVitCfg  # noqa: E402
from timm.models.pvt_v2 import Attention as PvtAttention  # noqa: E402

from fastvit.nn.timm_cait import FusedClassAttn, FusedLayerScaleBlock, FusedLayerScaleBlockClassAttn  # noqa: E402
from fastvit.nn.timm_embeddings import FusedCait  # noqa: E402
from fastvit.nn.timm_mvit import FusedMultiScaleAttention, FusedMultiScaleBlock  # noqa: E402
from fastvit.nn.timm_pvt import FusedPvtAttention  # noqa: E402

BATCH, PVT_BLOCKS, CAIT_CLASS_BLOCKS, CAIT_TALKING_BLOCKS, MVIT_BLOCKS = 3, 4, 2, 2, 3
CAIT_MLP_HALVES = CAIT_CLASS_BLOCKS + CAIT_TALKING_BLOCKS  # both kinds of CaiT block (test_timm_cait.py)


def pvt(**overrides) -> nn.Module:
    args = dict(
        depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), mlp_ratios=2, num_classes=5,
    )  # fmt: skip
    return perturb_(timm.create_model("pvt_v2_b0", pretrained=False, **(args | overrides)))


def cait(**overrides) -> nn.Module:
    args = dict(
        img_size=16, patch_size=4, embed_dim=32, depth=CAIT_TALKING_BLOCKS, num_heads=2,
        depth_token_only=CAIT_CLASS_BLOCKS, num_classes=5, init_values=0.1,
    )  # fmt: skip
    return perturb_(timm.create_model("cait_xxs24_224", pretrained=False, **(args | overrides)))


def mvit(drop_path_rate: float = 0.0, **overrides) -> nn.Module:
    """MViTv2 as timm's ``mvitv2_tiny`` config, shrunk (``overrides`` go to ``MultiScaleVitCfg``)."""
    cfg = MultiScaleVitCfg(**(dict(depths=(1, 2), embed_dim=32, num_heads=2) | overrides))
    return perturb_(MultiScaleVit(cfg, img_size=32, num_classes=5, drop_path_rate=drop_path_rate))


MODELS = {
    "pvt": pvt,
    "pvt_linear": lambda **kw: pvt(linear=True, **kw),
    "cait": cait,
    "mvit": mvit,
    "mvit_cls": lambda **kw: mvit(use_cls_token=True, **kw),
}
FUSED = {"pvt": PVT_BLOCKS, "pvt_linear": PVT_BLOCKS, "cait": CAIT_CLASS_BLOCKS, "mvit": MVIT_BLOCKS,
         "mvit_cls": MVIT_BLOCKS}  # fmt: skip
# the blocks whose MLP halves are fused too (CaiT's: test_timm_cait.py)
MLP_HALVES = {"cait": CAIT_MLP_HALVES, "mvit": MVIT_BLOCKS, "mvit_cls": MVIT_BLOCKS}
SIZES = {"pvt": 64, "pvt_linear": 64, "cait": 16, "mvit": 32, "mvit_cls": 32}


def images(size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(BATCH, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "linear, size", [(False, 64), (False, (48, 80)), (True, 64)], ids=["sr", "sr-other-size", "linear"]
)
def test_pvt_matches_unpatched(linear, size, op_calls):
    reference, patched, report = pair(pvt(linear=linear).eval())
    assert report.counts() == {"attention": PVT_BLOCKS}
    assert {e.part for e in report.skipped} == {"mlp", "patch_embed"}  # each with its reason
    assert_matches_by_the_rule(reference, patched, images(size))
    shapes = [(c["args"][0].shape[2], c["args"][1].shape[2]) for c in op_calls["flash_attention"]]
    if linear:  # keys pooled to 7x7 at every stage
        assert shapes == [(256, 49), (64, 49), (16, 49), (4, 49)]
    elif size == 64:  # (N, M): sr 8, 4, 2 reduce to 2x2; sr 1 keeps every token
        assert shapes == [(256, 4), (64, 4), (16, 4), (4, 4)]
    else:  # 12x20, 6x10, 3x5 reduced to 1x2 (the conv floors); 2x3 kept
        assert shapes == [(240, 2), (60, 2), (15, 2), (6, 6)]


def test_cait_class_attention_matches_unpatched(op_calls):
    reference, patched, report = pair(cait().eval())
    assert report.counts() == {"attention": CAIT_CLASS_BLOCKS, "mlp": CAIT_MLP_HALVES, "patch_embed": 1}
    assert_matches_by_the_rule(reference, patched, images(16))
    calls = op_calls["flash_attention"]
    assert len(calls) == CAIT_CLASS_BLOCKS
    q, k = calls[0]["args"][:2]
    assert q.shape == (BATCH, 2, 1, 16) and k.shape == (BATCH, 2, 17, 16)  # the class token against all


def test_cait_talking_heads_are_reported_skipped():
    report = fastvit.patch(cait())
    attentions = [e for e in report.replaced if e.part == "attention"]
    assert {e.where for e in attentions} == {f"blocks_token_only.{i}.attn" for i in range(CAIT_CLASS_BLOCKS)}
    assert all("ClassAttn -> FusedClassAttn" in e.detail for e in attentions)
    talking = [e for e in report.skipped if e.part == "attention"]
    assert [e.where for e in talking] == [f"blocks.{i}.attn" for i in range(CAIT_TALKING_BLOCKS)]
    for entry in talking:
        assert "TalkingHeadAttn mixes the heads" in entry.detail and "before and after the softmax" in entry.detail
    skipped = {e.where: (e.part, e.detail) for e in report.skipped}
    assert "(model)" not in skipped  # its embedding is fused (test_timm_embeddings.py)
    assert "blocks.0" not in skipped and "blocks_token_only.0" not in skipped  # their MLP halves are fused
    model = cait()
    assert type(model.blocks[0].attn) is TalkingHeadAttn  # left as timm's class


MVIT_CASES = {
    # mvitv2_tiny's layout: no class token, rel_pos "spatial", residual pooling, conv pooling
    "rel_pos": dict(),
    # the *_cls models: a class token carried past the pooling, unbiased by the rel-pos
    "rel_pos_cls": dict(use_cls_token=True),
    # max pooling without norms, no relative position, no residual pooling
    "plain_max_pool": dict(rel_pos_type="none", residual_pooling=False, mode="max"),
}


@pytest.mark.parametrize("size", [32, (28, 24)], ids=["native", "other-size"])
@pytest.mark.parametrize("case", sorted(MVIT_CASES))
def test_mvit_matches_unpatched(case, size, op_calls):
    reference, patched, report = pair(mvit(**MVIT_CASES[case]).eval())
    assert report.counts() == {"attention": MVIT_BLOCKS, "mlp": MVIT_BLOCKS}
    assert {e.part for e in report.skipped} == {"patch_embed"}
    assert_matches_by_the_rule(reference, patched, images(size))
    calls = op_calls["flash_attention"]
    assert len(calls) == MVIT_BLOCKS and len(op_calls["layernorm_mlp"]) == MVIT_BLOCKS
    cls = int(case == "rel_pos_cls")
    q, k = calls[0]["args"][:2]
    grid, keys = ((8, 8), (2, 2)) if size == 32 else ((7, 6), (2, 2))
    assert q.shape[2] == cls + grid[0] * grid[1]
    if case == "plain_max_pool":
        assert "rel_pos" not in calls[0]["kwargs"] and k.shape[2] == keys[0] * keys[1]
        return
    rel_h, rel_w = calls[0]["kwargs"]["rel_pos"]
    assert rel_h.requires_grad and rel_w.requires_grad  # rel_pos_h / rel_pos_w learn through them
    if cls:  # keys on a (2 + 1) x 2 grid: the class token, one masked zero key, the 2x2 patches
        assert k.shape[2] == (keys[0] + 1) * keys[1]
        assert rel_h.shape[3] == keys[0] + 1 and rel_w.shape[3] == keys[1]
        assert calls[0]["kwargs"]["attn_mask"].tolist() == [True, False, True, True, True, True]
    else:
        assert k.shape[2] == keys[0] * keys[1] and "attn_mask" not in calls[0]["kwargs"]
        assert rel_h.shape == (BATCH, 2, q.shape[2], keys[0]) and rel_w.shape == (BATCH, 2, q.shape[2], keys[1])


def test_mvit_class_token_with_one_key_column(op_calls):
    # 32x12 images: an 8x3 map whose keys pool to 2x1, so the class token's key row has no padding
    reference, patched, _ = pair(MODELS["mvit_cls"]().eval())
    assert_matches_by_the_rule(reference, patched, images((32, 12)))
    first = op_calls["flash_attention"][0]
    assert first["args"][1].shape[2] == (2 + 1) * 1 and first["kwargs"]["attn_mask"] is None


@pytest.mark.parametrize("cls", [False, True], ids=["no-cls", "cls"])
def test_mvit_rel_pos_tables_learn(cls):
    # the tolerance-rule comparison above covers them; here: their gradients are not all zero
    # (all tokens' features: through the class token alone the last block's tables get none)
    _, patched, _ = pair(mvit(use_cls_token=cls).eval())
    patched.forward_features(images(32)).square().sum().backward()
    for name, p in patched.named_parameters():
        if "rel_pos" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mvit_pool_first_is_reported_skipped():
    # its attention is left alone (reported), its blocks' MLP halves are fused
    report = fastvit.patch(mvit(pool_first=True))
    assert report.counts() == {"mlp": MVIT_BLOCKS}
    skipped = [e for e in report.skipped if e.part == "attention"]
    assert len(skipped) == MVIT_BLOCKS
    assert all("MultiScaleAttentionPoolFirst" in e.detail and "untransposed k" in e.detail for e in skipped)


def test_mvit_block_whose_mlp_widens_runs_timms_half(op_calls):
    """With expand_attn=False the stage's first block widens the tokens in its MLP: its residual is
    shortcut_proj_mlp(norm2(x)), not x, so that half runs timm's modules (reported); the others are
    one layernorm_mlp call each."""
    reference, patched, report = pair(mvit(expand_attn=False).eval())
    assert report.counts() == {"attention": MVIT_BLOCKS, "mlp": MVIT_BLOCKS - 1}
    widened = [e for e in report.skipped if e.part == "mlp"]
    assert [e.where for e in widened] == ["stages.0.blocks.0"] and "shortcut_proj_mlp" in widened[0].detail
    assert_matches_by_the_rule(reference, patched, images(32))
    assert len(op_calls["layernorm_mlp"]) == MVIT_BLOCKS - 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_is_untouched_and_unpatch_restores_exactly(name):
    model = MODELS[name]().eval()
    x = images(SIZES[name])
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    report = fastvit.patch(model)
    assert storage_map(model) == before_storage
    fused = [m for m in model.modules() if type(m) in (FusedPvtAttention, FusedClassAttn, FusedMultiScaleAttention,
                                                         FusedLayerScaleBlock, FusedLayerScaleBlockClassAttn,
                                                         FusedMultiScaleBlock, FusedCait)]  # fmt: skip
    embeddings = 1 if name == "cait" else 0  # CaiT's embedding (test_timm_embeddings.py)
    assert len(fused) == len(report.replaced) == FUSED[name] + MLP_HALVES.get(name, 0) + embeddings
    assert all(isinstance(m, (PvtAttention, ClassAttn, MultiScaleAttention, LayerScaleBlock,
                              LayerScaleBlockClassAttn, MultiScaleBlock, Cait)) for m in fused)  # fmt: skip
    assert len(fastvit.unpatch(model).replaced) == len(report.replaced)
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)


@pytest.mark.parametrize("name", ["pvt", "cait", "mvit_cls"])
def test_training_step_with_drop_path(name, op_calls):
    reference, patched, _ = pair(MODELS[name](drop_path_rate=0.3).train())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, patched)]
    for model, optimizer in zip((reference, patched), optimizers, strict=True):
        torch.manual_seed(3)  # the same drop-path draws
        model(images(SIZES[name])).square().mean().backward()
        optimizer.step()
    assert len(op_calls["flash_attention"]) == FUSED[name]
    for (n, want), got in zip(reference.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["pvt", "cait"])
def test_attention_dropout_in_training_runs_timm(name, op_calls, fresh_warnings):
    model = MODELS[name](attn_drop_rate=0.2).train()
    for attn in model.modules():  # timm's Cait does not pass attn_drop_rate to its class attention
        if type(attn) is ClassAttn:
            attn.attn_drop.p = 0.2
    reference, patched, report = pair(model)
    assert all("attention dropout 0.2" in e.detail for e in report.replaced if e.part == "attention")
    outputs = []
    for model in (reference, patched):
        torch.manual_seed(5)
        if model is patched:
            with pytest.warns(UserWarning, match="attention dropout p=0.2"):
                outputs.append(model(images(SIZES[name])))
        else:
            outputs.append(model(images(SIZES[name])))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    assert not op_calls["flash_attention"]


@pytest.mark.parametrize("name", ["pvt", "cait", "mvit_cls"])
def test_forward_intermediates(name, op_calls):
    reference, patched, _ = pair(MODELS[name]().eval())
    want_final, want = reference.forward_intermediates(images(SIZES[name]))
    got_final, got = patched.forward_intermediates(images(SIZES[name]))
    assert len(op_calls["flash_attention"]) == FUSED[name]
    torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-5)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hook_on_a_pooling_conv_runs_timm(op_calls, fresh_warnings):
    # MViTv2's pooling convs are called, not bypassed: a hook on one runs, and the op still does
    _, patched, _ = pair(mvit().eval())
    seen = []
    patched.stages[0].blocks[0].attn.pool_k.register_forward_hook(lambda *args: seen.append(1))
    patched(images(32))
    assert seen and len(op_calls["flash_attention"]) == MVIT_BLOCKS


@pytest.mark.parametrize("name", ["pvt", "cait", "mvit", "mvit_cls"])
def test_timm_fx_feature_extraction(name):
    # timm's FX tracer: the op is one leaf per attention; MViTv2's rel-pos helpers are timm notrace
    # functions like timm's own cal_rel_pos_type (the model does not trace without them)
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    reference, patched, _ = pair(MODELS[name]().eval())
    nodes = {get_graph_node_names(reference)[1][-1]: "out"}
    extractor = create_feature_extractor(patched, return_nodes=nodes)
    leaves = [n.target.__name__ for n in extractor.graph.nodes if n.op == "call_function"
              and getattr(n.target, "__module__", "").startswith("fastvit.ops")]  # fmt: skip
    assert leaves == ["patch_embed"] * (name == "cait") + ["flash_attention"] * FUSED[name]  # CaiT's embedding too
    x = images(SIZES[name])
    want = create_feature_extractor(reference, return_nodes=nodes)(x)["out"]
    torch.testing.assert_close(extractor(x)["out"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["pvt", "cait", "mvit_cls"])
def test_torchscript_compiles_the_original_math(name, op_calls, fresh_warnings):
    reference, patched, _ = pair(MODELS[name]().eval())
    with pytest.warns(UserWarning, match="compiles the original"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(patched)
    x = images(SIZES[name])
    torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not op_calls["flash_attention"]  # TorchScript ran timm's math
    patched(x)
    assert len(op_calls["flash_attention"]) == FUSED[name]  # the Python model is still patched


def test_torch_compile_fullgraph():
    # MViTv2 with a class token: pooling, the rel-pos tables, the key grid and its mask all traced
    torch._dynamo.reset()
    try:
        reference, patched, _ = pair(MODELS["mvit_cls"]().eval())
        compiled = torch.compile(patched, fullgraph=True, backend="eager")
        assert_matches_by_the_rule(reference, compiled, images(32))
    finally:
        torch._dynamo.reset()


@pytest.mark.interpreter
def test_triton_route_in_the_interpreter(op_calls):
    # PVTv2 on 32x32 images: 8x8 queries against 1x1 keys (sr 8) ... 1x1 against 1x1;
    # CaiT: one query against 17 keys; MViTv2 with a class token: 1 + 64 queries against the 3x2
    # key grid (rel_pos with the mask), then 1 + 16 against it
    for build, size in ((pvt, 32), (cait, 16), (MODELS["mvit_cls"], 32)):
        reference, patched, _ = pair(build().eval())
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, images(size))
    assert len(op_calls["flash_attention"]) == PVT_BLOCKS + CAIT_CLASS_BLOCKS + MVIT_BLOCKS


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_kernels_on_the_gpu(name, op_calls):
    # fp32 through the Triton kernels by the tolerance rule, then bf16 autocast within bf16's error
    assert_matches_on_the_gpu(MODELS[name](), images(SIZES[name]))
    assert len(op_calls["flash_attention"]) == 2 * FUSED[name]
