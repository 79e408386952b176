"""fastvit.patch on timm's relative-position-bias ViTs: BEiT / BEiTv2 (``beit.Attention``, the
per-block table or the model's shared ``rel_pos_bias``), ``VisionTransformerRelPos``
(``RelPosAttention`` with ``RelPosMlp``, ``RelPosBias`` or the shared bias of ``vit_srelpos_*``),
TinyViT (window attention with ``attention_biases``) and LeViT (``Attention`` and the downsampling
cross-attention ``AttentionDownsample``, values wider than keys, linear and conv layouts).

Each model is compared with an unpatched deep copy on the CPU (the torch route, fp32): the same
output and the same gradient on every parameter, the bias tables and the relative-position MLP
included. Tiny models (tests/patching/helpers.py): 16x16 images, 4x4 patches (a 4x4 grid, +1 class
token where the model has one), dim 32, 2 heads, 2 blocks, batch 3. TinyViT and LeViT on 64x64
images: TinyViT's attention stages see 8x8 (3x3 windows, padded to 9x9), 4x4 and 2x2 maps (one
window: no partition); LeViT's a 4x4 grid (key_dim 16, values 32), the 4x4 -> 2x2 downsampling
attention (values 64), then 2x2.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import fastvit
from tests.patching.helpers import (
    DEPTH,
    HEADS,
    assert_outputs_and_grads_match,
    images,
    module_types,
    pair,
    perturb_,
    storage_map,
    timm_model,
)

pytest.importorskip("timm")
from timm.models.beit import Attention as BeitAttention
from timm.models.vision_transformer_relpos import RelPosAttention

from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_relpos import FusedBeitAttention, FusedRelPosAttention

# name -> (builder, tokens N)
MODELS = {
    # per-block table, cls row/column (+3 entries), q/v biases, gamma LayerScale
    "beitv2": (lambda **kw: timm_model("beitv2_base_patch16_224", init_values=0.1, **kw), 17),
    # one RelativePositionBias module shared by the blocks (shared_rel_pos_bias)
    "beit_shared": (
        lambda **kw: timm_model("beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True, **kw),
        17,
    ),
    # RelPosMlp (log-coordinate MLP, 'cr' mode), no class token
    "relpos_mlp": (lambda **kw: timm_model("vit_relpos_base_patch16_224", **kw), 16),
    # RelPosBias table with a class token (prefix row / column)
    "relpos_bias_cls": (lambda **kw: timm_model("vit_relpos_medium_patch16_cls_224", rel_pos_type="bias", **kw), 17),
    # RelPosMlp in Swin V2 mode (16 * sigmoid), one module shared by the blocks (shared_rel_pos)
    "srelpos": (lambda **kw: timm_model("vit_srelpos_small_patch16_224", rel_pos_type="mlp_swin", **kw), 16),
}


def _model(name: str, **overrides) -> torch.nn.Module:
    return MODELS[name][0](**overrides)


def levit(conv: bool = False, **overrides) -> torch.nn.Module:
    import timm

    args = dict(img_size=64, embed_dim=(32, 48), key_dim=16, num_heads=(2, 3), depth=(1, 1), num_classes=5)
    return perturb_(
        timm.create_model("levit_conv_128s" if conv else "levit_128s", pretrained=False, **(args | overrides))
    )


def tiny_vit(**overrides) -> torch.nn.Module:
    import timm

    args = dict(
        embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_sizes=(2, 3, 2, 2),
        drop_path_rate=0.0, num_classes=5,
    )  # fmt: skip
    return perturb_(timm.create_model("tiny_vit_5m_224", pretrained=False, **(args | overrides)))


BIAS_MODELS = {"levit": levit, "levit_conv": lambda **kw: levit(conv=True, **kw), "tiny_vit": tiny_vit}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_matches_unpatched(name, op_calls):
    reference, patched, report = pair(_model(name).eval())
    # BEiT's Block (test_beit_mlp_half_*) and RelPosBlock (fastvit.nn.timm_blocks): their MLP halves are fused
    # too, and the model's embedding (test_timm_embeddings.py)
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH, "patch_embed": 1} and not report.skipped
    assert_outputs_and_grads_match(reference, patched, images())
    assert len(op_calls["patch_embed"]) == 1
    calls = op_calls["flash_attention"]
    assert len(calls) == DEPTH
    tokens = MODELS[name][1]
    mask = calls[0]["kwargs"]["attn_mask"]
    # one bias for the batch: (1, H, N, N), or (H, N, N) from BEiT's shared RelativePositionBias
    assert mask.shape[-3:] == (HEADS, tokens, tokens) and mask.numel() == HEADS * tokens * tokens
    assert mask.requires_grad and mask.dtype == torch.float32  # the table / MLP learns through it


def test_bias_tables_get_gradients():
    # the per-block tables and the shared RelativePositionBias get non-zero gradients, equal to timm's
    for name, table in (("beitv2", "blocks.0.attn.relative_position_bias_table"),
                        ("beit_shared", "rel_pos_bias.relative_position_bias_table")):  # fmt: skip
        reference, patched, _ = pair(_model(name).eval())
        grads = []
        for model in (reference, patched):
            model(images()).square().sum().backward()
            grads.append(model.get_parameter(table).grad)
        assert grads[1].abs().max() > 0
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BIAS_MODELS))
def test_attention_bias_models_match_unpatched(name, op_calls):
    reference, patched, report = pair(BIAS_MODELS[name]().eval())
    # TinyViT's blocks' MLP halves are fused too; LeViT's BatchNorm MLPs are reported
    assert report.counts() == ({"attention": 3, "mlp": 3} if name == "tiny_vit" else {"attention": 3})
    assert {e.part for e in report.skipped} == ({"patch_embed"} if name == "tiny_vit" else {"mlp", "patch_embed"})
    assert_outputs_and_grads_match(reference, patched, images(size=64))
    calls = op_calls["flash_attention"]
    assert len(calls) == 3
    assert all(c["kwargs"]["attn_mask"].requires_grad for c in calls)  # attention_biases learn through it
    shapes = [(c["args"][0].shape[1:], c["args"][1].shape[2], c["kwargs"]["attn_mask"].shape) for c in calls]
    if name == "tiny_vit":  # windows of 3x3 (8x8 map padded to 9x9: 9 windows), 2x2, then the whole 2x2 map
        assert calls[0]["args"][0].shape[0] == 3 * 9
        assert shapes == [((2, 9, 16), 9, (2, 9, 9)), ((2, 4, 16), 4, (2, 4, 4)), ((4, 4, 16), 4, (4, 4, 4))]
    else:  # q, k zero-padded to the value width; the downsampling attention: 4 queries, 16 keys
        assert shapes == [((2, 16, 32), 16, (2, 16, 16)), ((2, 4, 64), 16, (2, 4, 16)), ((3, 4, 32), 4, (3, 4, 4))]


def test_tinyvit_mlp_half_is_one_call_with_the_norm_inside_the_mlp(op_calls):
    reference, patched, _ = pair(tiny_vit().eval())
    assert [type(b).__name__ for s in patched.stages[1:] for b in s.blocks] == ["FusedTinyVitBlock"] * 3
    x = images(size=64)
    assert_outputs_and_grads_match(reference, patched, x)
    calls = op_calls["layernorm_mlp"]
    block = patched.stages[1].blocks[0]
    batch = x.shape[0]  # (B, L, C) tokens of the 8x8, 4x4 and 2x2 maps
    assert [tuple(c["args"][0].shape) for c in calls] == [(batch, 64, 32), (batch, 16, 32), (batch, 4, 64)]
    assert calls[0]["kwargs"]["norm_weight"] is block.mlp.norm.weight and calls[0]["kwargs"]["layer_scale"] is None


def test_tinyvit_training_step_and_fallbacks(op_calls, fresh_warnings):
    reference, patched, _ = pair(tiny_vit(drop_path_rate=0.5))
    assert_outputs_and_grads_match(reference.train(), patched.train(), images(size=64), seed=0, rtol=1e-4, atol=1e-5)
    assert any(c["kwargs"]["sample_scale"] is not None for c in op_calls["layernorm_mlp"])
    reference, patched, _ = pair(tiny_vit().eval())
    for model in (reference, patched):  # a hook on the norm inside the last block's NormMlp
        model.stages[-1].blocks[0].mlp.norm.register_forward_hook(lambda m, args, out: out * 2)
    calls = len(op_calls["layernorm_mlp"])
    with pytest.warns(fastvit.FastvitFallbackWarning, match="hook"):
        torch.testing.assert_close(patched(images(size=64)), reference(images(size=64)), rtol=1e-5, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == calls + 2
    reference, patched, _ = pair(tiny_vit(proj_drop_rate=0.3))  # MLP dropout in training: timm's modules
    with pytest.warns(fastvit.FastvitFallbackWarning, match="MLP dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), images(size=64), seed=0, rtol=1e-4,
                                       atol=1e-5)  # fmt: skip


def test_levit_training_step(op_calls):
    # BatchNorm in training (batch statistics, running stats updated) and drop path
    reference, patched, _ = pair(levit(drop_path_rate=0.3).train())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, patched)]
    for model, optimizer in zip((reference, patched), optimizers, strict=True):
        torch.manual_seed(3)
        model(images(size=64)).square().mean().backward()
        optimizer.step()
    assert len(op_calls["flash_attention"]) == 3
    for (name, want), got in zip(reference.state_dict().items(), patched.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", ["beitv2", "relpos_mlp"])
def test_non_default_resolution(name, op_calls):
    # 12x20 images: a 3x5 grid, so the bias tables and index are built for a non-square window
    reference, patched, _ = pair(_model(name, img_size=(12, 20)).eval())
    assert_outputs_and_grads_match(reference, patched, images(size=(12, 20)))
    tokens = 15 + (name == "beitv2")
    assert op_calls["flash_attention"][0]["kwargs"]["attn_mask"].shape == (1, HEADS, tokens, tokens)


@pytest.mark.parametrize("name", ["beitv2", "srelpos", "levit_conv", "tiny_vit"])
def test_state_dict_is_untouched_and_unpatch_restores_exactly(name):
    model = (BIAS_MODELS[name]() if name in BIAS_MODELS else _model(name)).eval()
    x = images(size=64 if name in BIAS_MODELS else 16)
    before_out, before_storage, before_types = model(x), storage_map(model), module_types(model)
    report = fastvit.patch(model)
    assert storage_map(model) == before_storage
    fused = [m for m in model.modules() if isinstance(m, FusedModule)]
    # attention and MLP halves (LeViT's attention only), and BEiT's / VisionTransformerRelPos's embedding
    replaced = {"levit_conv": 3, "tiny_vit": 6}.get(name, 2 * DEPTH + 1)
    assert len(fused) == len(report.replaced) == replaced
    assert all(isinstance(m, type(m).fastvit_original()) for m in fused)  # isinstance checks still pass
    if name not in BIAS_MODELS:
        assert type(model.blocks[0].attn) in (FusedBeitAttention, FusedRelPosAttention)
        assert isinstance(model.blocks[0].attn, (BeitAttention, RelPosAttention))
    assert len(fastvit.unpatch(model).replaced) == len(report.replaced)
    assert module_types(model) == before_types and storage_map(model) == before_storage
    assert torch.equal(model(x), before_out)


# BEiT's Block: the MLP half shared with Eva (fastvit.nn.timm_mlp); name -> (overrides, fused block class)
BEIT_BLOCKS = {
    "mlp": (dict(), "FusedBeitBlock"),  # GELU Mlp, no gamma
    "mlp_gamma": (dict(init_values=0.1), "FusedBeitBlock"),
    "swiglu_gamma": (dict(swiglu_mlp=True, mlp_ratio=4 * 2 / 3, init_values=0.1), "FusedBeitSwiGLUBlock"),
}


@pytest.mark.parametrize("name", sorted(BEIT_BLOCKS))
def test_beit_mlp_half_matches_unpatched(name, op_calls):
    overrides, fused_name = BEIT_BLOCKS[name]
    reference, patched, report = pair(timm_model("beitv2_base_patch16_224", **overrides).eval())
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH, "patch_embed": 1}
    assert all(f"Block -> {fused_name}" in e.detail for e in report.replaced if e.part == "mlp")
    assert_outputs_and_grads_match(reference, patched, images())
    calls = op_calls["layernorm_mlp"]
    assert len(calls) == DEPTH and calls[0]["kwargs"]["layer_scale"] is patched.blocks[0].gamma_2
    if name.startswith("swiglu"):  # act(fc1_g(x)) * fc1_x(x)
        assert calls[0]["kwargs"]["fc1_gate_weight"] is patched.blocks[0].mlp.fc1_g.weight


def test_beit_scale_mlp_passes_its_norm_as_the_hidden_norm(op_calls):
    # scale_mlp: the MLP's LayerNorm between the activation and fc2 is the op's hidden norm
    reference, patched, report = pair(timm_model("beitv2_base_patch16_224", scale_mlp=True, init_values=0.1).eval())
    assert report.counts() == {"attention": DEPTH, "mlp": DEPTH, "patch_embed": 1}
    assert not [e for e in report.skipped if e.part == "mlp"]
    assert_outputs_and_grads_match(reference, patched, images())
    kwargs = op_calls["layernorm_mlp"][0]["kwargs"]
    assert kwargs["hidden_norm"] == "layernorm" and kwargs["hidden_norm_weight"] is patched.blocks[0].mlp.norm.weight
    assert kwargs["hidden_eps"] == patched.blocks[0].mlp.norm.eps


def test_beit_drop_path_training_step_matches_timm(op_calls):
    # the same seed draws timm's DropPath masks; the MLP branch's reaches the op as sample_scale
    reference, patched, _ = pair(timm_model("beitv2_base_patch16_224", drop_path_rate=0.5, init_values=0.1).train())
    assert_outputs_and_grads_match(reference, patched, images(), seed=3)
    assert op_calls["layernorm_mlp"][1]["kwargs"]["sample_scale"].shape == (images().shape[0],)


def test_training_step_with_drop_path_and_mlp_dropout(op_calls):
    # RelPosMlp's MLP has dropout 0.125 in training and runs as a module: the same draws as timm's
    reference, patched, _ = pair(_model("relpos_mlp", drop_path_rate=0.3).train())
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, patched)]
    for model, optimizer in zip((reference, patched), optimizers, strict=True):
        torch.manual_seed(3)
        model(images()).square().mean().backward()
        optimizer.step()
    assert len(op_calls["flash_attention"]) == DEPTH
    for (name, want), got in zip(reference.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_dropout_in_training_runs_timm(op_calls, fresh_warnings):
    reference, patched, report = pair(_model("beitv2", attn_drop_rate=0.2).train())
    assert all("attention dropout 0.2" in e.detail for e in report.replaced if e.part == "attention")
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
    patched.eval()(images())
    assert len(op_calls["flash_attention"]) == DEPTH  # in eval: fused


@pytest.mark.parametrize("name", ["beitv2", "tiny_vit"])
def test_forward_intermediates(name, op_calls):
    reference, patched, _ = pair((tiny_vit() if name == "tiny_vit" else _model(name)).eval())
    x = images(size=64 if name == "tiny_vit" else 16)
    want_final, want = reference.forward_intermediates(x)
    got_final, got = patched.forward_intermediates(x)
    assert len(op_calls["flash_attention"]) == 3 if name == "tiny_vit" else DEPTH
    torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["beitv2", "levit", "tiny_vit"])
def test_torch_compile_fullgraph(name, op_calls):
    torch._dynamo.reset()
    try:
        reference, patched, _ = pair((BIAS_MODELS[name]() if name in BIAS_MODELS else _model(name)).eval())
        compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
        assert_outputs_and_grads_match(reference, compiled, images(size=64 if name in BIAS_MODELS else 16))
        assert op_calls["flash_attention"]  # traced through the op
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["relpos_bias_cls", "levit", "levit_conv"])
def test_fx_symbolic_trace(name):
    # (timm's TinyViT does not trace: its block branches on shapes, patched or not)
    model = BIAS_MODELS[name]() if name in BIAS_MODELS else _model(name)
    reference, patched, _ = pair(model.eval())
    traced = torch.fx.symbolic_trace(patched)
    targets = [getattr(n.target, "__name__", "") for n in traced.graph.nodes if n.op == "call_function"]
    assert targets.count("flash_attention") == (3 if name in BIAS_MODELS else DEPTH)  # fastvit's op is an FX leaf
    assert_outputs_and_grads_match(reference, traced, images(size=64 if name in BIAS_MODELS else 16))


@pytest.mark.parametrize("name", ["beitv2", "levit", "levit_conv", "tiny_vit"])
def test_torchscript_compiles_the_original_math(name, op_calls, fresh_warnings):
    # TinyViT's and LeViT's attentions keep timm's typed attention_bias_cache (an empty dict scripts
    # only through the class annotation the fused class takes from timm's)
    model = BIAS_MODELS[name]() if name in BIAS_MODELS else _model(name)
    reference, patched, _ = pair(model.eval())
    with pytest.warns(UserWarning, match="compiles the original"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(patched)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x = images(size=64) if name in BIAS_MODELS else images()
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)
    assert not op_calls["flash_attention"]  # TorchScript ran timm's math
    patched(x)
    assert len(op_calls["flash_attention"]) == (3 if name in BIAS_MODELS else DEPTH)  # the model is still patched


@pytest.mark.interpreter
def test_triton_route_in_the_interpreter(op_calls):
    # BEiTv2 on 8x8 images: a 2x2 grid + cls (5 tokens); the bias gradient through the Triton dBias
    # kernel. LeViT: q, k zero-padded to 32 and 64, the 4 -> 16 cross-attention
    reference, patched, _ = pair(_model("beitv2", img_size=8).eval())
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with fastvit.backend("triton"):
        assert_outputs_and_grads_match(reference, patched, x, rtol=1e-4, atol=1e-5)
        reference, patched, _ = pair(levit().eval())
        assert_outputs_and_grads_match(reference, patched, images(size=64), rtol=1e-4, atol=1e-5)
        # TinyViT's blocks' MLP halves through the fused MLP kernels. Two images: with one, the
        # op's token-major dx reaches the local conv's BatchNorm as a (1, C, H, W) channels-last
        # gradient whose batch stride is C, beside an NCHW input, a mix PyTorch 2.14's CPU
        # BatchNorm backward (eval) misreads (test_tinyvit_batch_one_on_the_gpu)
        reference, patched, _ = pair(tiny_vit().eval())
        assert_outputs_and_grads_match(reference, patched, images(batch=2, size=64), rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == DEPTH + 3 + 3 and len(op_calls["layernorm_mlp"]) == DEPTH + 3


def _compiled_kernels_check(name: str, device: torch.device) -> None:
    """fp32 through the Triton kernels (IEEE fp32 dots, another summation order than PyTorch's),
    the bias gradient through the dBias kernel; then bf16 autocast within bf16's error."""
    model = BIAS_MODELS[name]() if name in BIAS_MODELS else _model(name)
    reference, patched, _ = pair(model.to(device).eval())
    x = images(size=64 if name in BIAS_MODELS else 16).to(device)
    with fastvit.backend("triton"):  # the output compared on the CPU, where the helper's upstream gradient is
        assert_outputs_and_grads_match(reference, patched, x, run=lambda m, t: m(t).cpu(), rtol=1e-4, atol=1e-5)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got, want = patched(x), reference(x)
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 3e-2 * scale


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["beitv2", "relpos_mlp", "levit", "tiny_vit"])
def test_compiled_kernels_on_the_gpu(name, op_calls):
    _compiled_kernels_check(name, torch.device("cuda"))
    assert len(op_calls["flash_attention"]) == 2 * (3 if name in BIAS_MODELS else DEPTH)


@pytest.mark.gpu
def test_tinyvit_batch_one_on_the_gpu(op_calls):
    # one image: the fused MLP half's dx, (1, L, C) token-major, reaches the local conv's BatchNorm
    # as a (1, C, H, W) channels-last gradient with batch stride C beside an NCHW input; PyTorch's
    # CPU BatchNorm backward misreads that mix (the interpreter test runs two images); CUDA's here
    device = torch.device("cuda")
    reference, patched, _ = pair(tiny_vit().to(device).eval())
    with fastvit.backend("triton"):
        x = images(batch=1, size=64).to(device)
        assert_outputs_and_grads_match(reference, patched, x, run=lambda m, t: m(t).cpu(), rtol=1e-4, atol=1e-5)
    assert len(op_calls["layernorm_mlp"]) == 2 * 3
