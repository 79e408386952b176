"""Patched models keep what their users rely on: torch.fx tracing (and the feature extractors built
on it), TorchScript and torch.export (issue 16), for timm, torchvision and Hugging Face models.

- FX: each fastvit op is one ``call_function`` leaf (fastvit/ops/_fx.py); the GraphModule runs the
  fused ops and gives the patched model's outputs and gradients.
- TorchScript compiles the original modules' math (``FusedModule.__prepare_scriptable__``, said
  once in a warning) and leaves the Python model patched.
- torch.export keeps fastvit's custom ops in the graph (Triton route, in the interpreter here) with
  a dynamic batch dimension; torch.jit.trace records them as nodes too.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from torch.export import Dim

import fastvit
from fastvit.nn.fused import FusedModule
from tests.patching.helpers import (
    ATOL,
    DEPTH,
    RTOL,
    assert_outputs_and_grads_match,
    hf_classifier,
    images,
    module_types,
    timm_vit,
    torchvision_vit,
)

pytest.importorskip("timm")
pytest.importorskip("torchvision")


@pytest.fixture
def attention_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the torch route of fastvit.flash_attention actually running (not traced): a graph's
    nodes hold the op object itself, so the spies on ``fastvit.<op>`` do not see its calls."""
    import fastvit.ops.flash_attention as module

    runs: list[int] = []
    real = module._torch_route

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_torch_route", counted)
    return runs


def _leaf_ops(graph_module: torch.fx.GraphModule) -> list[str]:
    return [node.target.__name__ for node in graph_module.graph.nodes if node.op == "call_function"
            and getattr(node.target, "__module__", "").startswith("fastvit.ops")]  # fmt: skip


FX_MODELS = {
    "timm": lambda: timm_vit(reg_tokens=1, init_values=0.1, qk_norm=True).eval(),
    "torchvision": lambda: torchvision_vit().eval(),
}


@pytest.mark.parametrize("family", sorted(FX_MODELS))
def test_symbolic_trace_keeps_the_fused_ops_as_leaves(family, attention_runs, op_calls):
    reference = FX_MODELS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    traced = torch.fx.symbolic_trace(patched)
    leaves = _leaf_ops(traced)
    assert leaves.count("patch_embed") == 1 and "layernorm_mlp" not in leaves
    # each block's MLP half is one call of its method, which decides when the graph runs
    assert _mlp_halves(traced) == DEPTH
    if family == "torchvision":
        # nn.MultiheadAttention is a leaf module in the unpatched graph: the fused one is the same
        # call_module node, whose forward runs the fused op when the graph runs
        assert "flash_attention" not in leaves
        assert _attention_modules(traced) == _attention_modules(torch.fx.symbolic_trace(reference)) != []
    else:
        assert leaves.count("flash_attention") == DEPTH
    assert not attention_runs and not op_calls["layernorm_mlp"]  # tracing ran nothing
    assert_outputs_and_grads_match(reference, traced, images())
    assert len(attention_runs) == DEPTH  # the GraphModule ran the op
    assert len(op_calls["layernorm_mlp"]) == DEPTH


def _mlp_halves(graph_module: torch.fx.GraphModule) -> int:
    """How many call_method nodes run a fused block's MLP half."""
    return sum(node.op == "call_method" and node.target == "_fastvit_mlp_half" for node in graph_module.graph.nodes)


def _attention_modules(graph_module: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(node name, target) of the call_module nodes of nn.MultiheadAttention modules."""
    return [(node.name, node.target) for node in graph_module.graph.nodes if node.op == "call_module"
            and isinstance(graph_module.get_submodule(node.target), nn.MultiheadAttention)]  # fmt: skip


# torchvision feature-extractor outputs: node -> key
EXTRACTED = {"encoder.layers.encoder_layer_0": "block0", "encoder.ln": "final"}


def _feature_extractors(reference: nn.Module, patched: nn.Module) -> tuple[nn.Module, nn.Module]:
    """torchvision's create_feature_extractor of both models (it traces each in train and eval)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    return create_feature_extractor(reference, return_nodes=EXTRACTED), create_feature_extractor(
        patched, return_nodes=EXTRACTED
    )


def _assert_same_features(want: nn.Module, got: nn.Module, mode: str) -> None:
    """Both extractors in ``mode`` give the same features for one seed (the same dropout draws)."""
    want, got = getattr(want, mode)(), getattr(got, mode)()
    torch.manual_seed(0)
    expected = want(images())
    torch.manual_seed(0)
    actual = got(images())
    for name in EXTRACTED.values():
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=ATOL)


def test_torchvision_attention_dropout_traces_and_decides_when_the_graph_runs(attention_runs):
    """torchvision's ViT with attention_dropout > 0: its MultiheadAttention modules trace as one
    call_module node each, as in the unpatched graph (tracing PyTorch's MHA forward, the fused
    module's fallback in training, raised on its control flow: create_feature_extractor, which
    traces in train and eval, failed). The graph calls the fused module, which picks per call: in
    eval the fused op, in training PyTorch's forward with its dropout, the same draws as unpatched."""
    reference = torchvision_vit(attention_dropout=0.25)
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    want, got = _feature_extractors(reference, patched)
    for mode in ("eval", "train"):
        runs = len(attention_runs)
        _assert_same_features(want, got, mode)
        assert len(attention_runs) - runs == (DEPTH if mode == "eval" else 0)
    eval_graph = torch.fx.symbolic_trace(patched.eval())
    assert _attention_modules(eval_graph) == _attention_modules(torch.fx.symbolic_trace(reference.eval()))
    eval_graph.train()  # traced in eval, run in training: the dropout is decided when the graph runs
    torch.manual_seed(1)
    expected = reference.train()(images())
    torch.manual_seed(1)
    torch.testing.assert_close(eval_graph(images()), expected, rtol=RTOL, atol=ATOL)


def test_torchvision_attention_hooks_run_once_in_an_fx_graph():
    """The fused nn.MultiheadAttention is a leaf of fx's tracers, as the unpatched one: its hooks
    run when the graph runs, once (they ran at trace time too, on proxies, and again in the
    graph's call of the module: a hook's edit applied twice), and a hook added after tracing
    runs as well. Unpatching takes the instance's module name away again."""
    reference = torchvision_vit().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for model in (reference, patched):
        model.encoder.layers[0].self_attention.register_forward_hook(lambda m, args, out: (out[0] * 2, out[1]))
    x = images()
    traced = torch.fx.symbolic_trace(patched)
    torch.testing.assert_close(traced(x), reference(x), rtol=RTOL, atol=ATOL)
    for model in (reference, patched):  # added after tracing: the graph calls the module, which runs it
        model.encoder.layers[1].self_attention.register_forward_pre_hook(lambda m, args: (args[0] + 1, *args[1:]))
    torch.testing.assert_close(traced(x), reference(x), rtol=RTOL, atol=ATOL)
    attention = patched.encoder.layers[0].self_attention
    assert attention.__module__ == nn.MultiheadAttention.__module__ != type(attention).__module__
    fastvit.unpatch(patched)
    assert type(attention) is nn.MultiheadAttention and "__module__" not in vars(attention)


def test_torchvision_encoder_dropout_traces_and_draws_as_unpatched():
    """torchvision's ViT with encoder dropout > 0: create_feature_extractor (it traces in training
    too) works on the patched model, and each of its graphs draws the unpatched model's dropout
    masks for a seed (the fused attention's output takes PyTorch's layout before the dropout in the
    graph too; tracing raised on that choice, made on the output's strides)."""
    reference = torchvision_vit(dropout=0.25)
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    want, got = _feature_extractors(reference, patched)
    for mode in ("train", "eval"):
        _assert_same_features(want, got, mode)


MLP_DROPOUT_MODELS = {
    "timm": lambda: timm_vit(proj_drop_rate=0.25),
    "torchvision": lambda: torchvision_vit(dropout=0.25),
}


def _first_fc1(model: nn.Module) -> nn.Module:
    blocks = getattr(model, "blocks", None)
    return blocks[0].mlp.fc1 if blocks is not None else model.encoder.layers[0].mlp[0]


@pytest.mark.parametrize("family", sorted(MLP_DROPOUT_MODELS))
def test_a_graph_decides_each_mlp_half_when_it_runs(family, op_calls):
    """The fused MLP half is one call_method node, so a GraphModule decides it as the unpatched
    graph decides its leaf modules (Linear, Dropout, LayerNorm): traced in eval and run in training,
    the MLP dropout draws as unpatched (the fused op had frozen eval's choice: no dropout); a hook
    added after tracing on fc1, which the fused op bypasses, runs."""
    reference = MLP_DROPOUT_MODELS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    expected_graph, graph = (torch.fx.symbolic_trace(m.eval()) for m in (reference, patched))
    assert _mlp_halves(graph) == DEPTH
    expected_graph.train(), graph.train()
    torch.manual_seed(0)
    expected = expected_graph(images())
    torch.manual_seed(0)
    torch.testing.assert_close(graph(images()), expected, rtol=RTOL, atol=ATOL)
    expected_graph.eval(), graph.eval()
    runs = len(op_calls["layernorm_mlp"])
    torch.testing.assert_close(graph(images()), expected_graph(images()), rtol=RTOL, atol=ATOL)
    assert len(op_calls["layernorm_mlp"]) - runs == DEPTH  # in eval, the fused op
    for model in (reference, patched):
        _first_fc1(model).register_forward_hook(lambda module, args, out: out * 3)
    torch.testing.assert_close(graph(images()), expected_graph(images()), rtol=RTOL, atol=ATOL)


def test_fx_leaf_op_standalone():
    def attend(q, k, v):
        return fastvit.flash_attention(q, k, v, causal=True) * 2

    traced = torch.fx.symbolic_trace(attend)
    assert _leaf_ops(traced) == ["flash_attention"]
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    torch.testing.assert_close(traced(q, k, v), attend(q, k, v))
    node = next(n for n in traced.graph.nodes if n.op == "call_function" and "flash" in str(n.target))
    assert node.kwargs == {"causal": True}


def _op_calls() -> dict[str, tuple[Callable, tuple]]:
    """Each public op with real inputs, as a traced function would call it."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 8, generator=g).unbind(0)
    packed = torch.randn(3, 7, 2, 8, generator=g).unbind(0)  # (T, H, D) with T = 3 + 4
    grid_q = torch.randn(3, 1, 2, 1 + 16, 8, generator=g).unbind(0)
    x = torch.randn(2, 5, 8, generator=g)
    mlp = (torch.ones(8), torch.zeros(8), torch.randn(16, 8, generator=g), None, torch.randn(8, 16, generator=g), None)
    image = torch.randn(2, 3, 8, 8, generator=g)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    return {
        "flash_attention": (lambda a, b, c: fastvit.flash_attention(a, b, c, attn_mask=keep), (q, k, v)),
        "flash_attention_varlen": (lambda a, b, c: fastvit.flash_attention_varlen(a, b, c, cu), packed),
        "window_attention": (lambda a, b, c: fastvit.window_attention(a, b, c, (4, 4), 2, num_prefix_tokens=1), grid_q),
        "axial_attention": (lambda a, b, c: fastvit.axial_attention(a, b, c, (4, 4), num_prefix_tokens=1), grid_q),
        "layernorm_mlp": (lambda t: fastvit.layernorm_mlp(t, *mlp), (x,)),
        "patch_embed": (lambda i: fastvit.patch_embed(i, torch.ones(8, 3, 4, 4)), (image,)),
    }  # fmt: skip


@pytest.mark.parametrize("op", sorted(_op_calls()))
def test_every_public_op_is_one_fx_node(op):
    function, inputs = _op_calls()[op]
    traced = torch.fx.symbolic_trace(function)
    assert _leaf_ops(traced) == [op]
    torch.testing.assert_close(traced(*inputs), function(*inputs))


def test_torchvision_create_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    reference = torchvision_vit().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    nodes = {"encoder.layers.encoder_layer_0": "block0", "encoder.ln": "final"}
    want = create_feature_extractor(reference, return_nodes=nodes)(images())
    got = create_feature_extractor(patched, return_nodes=nodes)(images())
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL)


def test_timm_fx_feature_extraction():
    from timm.models._features_fx import create_feature_extractor

    reference = timm_vit(reg_tokens=1).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    nodes = {"blocks.0": "block0", "norm": "final"}
    extractor = create_feature_extractor(patched, return_nodes=nodes)
    want = create_feature_extractor(reference, return_nodes=nodes)(images())
    got = extractor(images())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL)
    assert "patch_embed" in _leaf_ops(extractor)


def test_timm_features_only_and_forward_intermediates():
    import timm

    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, out_indices=(0, 1))
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, **args).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for got, want in zip(patched(images()), reference(images()), strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("family", sorted(FX_MODELS))
def test_torchscript_compiles_the_original_math_and_leaves_the_model_patched(family, fresh_warnings, op_calls):
    reference = FX_MODELS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    types_before = module_types(patched)
    expected = pytest.warns(UserWarning, match="torch.jit.script of a patched model compiles the original")
    with expected, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(patched)
    assert module_types(patched) == types_before  # still patched in Python
    x = images()
    torch.testing.assert_close(scripted(x), reference(x), rtol=RTOL, atol=ATOL)
    assert not any(op_calls.values())  # TorchScript ran the original math
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)  # deployable
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), reference(x), rtol=RTOL, atol=ATOL)
    patched(x)
    assert op_calls["flash_attention"]  # and the Python model still runs the fused ops


@pytest.mark.parametrize("family", sorted(FX_MODELS))
def test_scripting_an_fx_graph_of_a_patched_model(family, attention_runs):
    """timm's test_model_forward_fx_torchscript: trace, then script the GraphModule."""
    reference = FX_MODELS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    traced = torch.fx.symbolic_trace(patched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(traced)
    x = images()
    torch.testing.assert_close(scripted(x), reference(x), rtol=RTOL, atol=ATOL)
    assert not attention_runs  # the scripted graph runs the ops' TorchScript math
    torch.testing.assert_close(traced(x), reference(x), rtol=RTOL, atol=ATOL)
    assert len(attention_runs) == DEPTH  # the GraphModule itself still runs the ops


@pytest.mark.parametrize("op", ["flash_attention", "layernorm_mlp", "patch_embed"])
def test_torchscript_forms_match_the_ops(op):
    """The TorchScript form of each op computes what the op computes (masks, rel_pos, causal,
    prefix tokens, dynamic padding, LayerScale)."""
    from fastvit.ops import _torchscript

    g = torch.Generator().manual_seed(0)
    if op == "flash_attention":
        q, k, v = torch.randn(3, 2, 2, 6, 8, generator=g).unbind(0)
        keep = torch.rand(2, 1, 6, 6, generator=g) > 0.4
        keep[0, 0, 2] = False  # a fully masked row: zeros
        rel = (torch.randn(2, 2, 6, 2, generator=g), torch.randn(1, 2, 6, 3, generator=g))

        def call(fn):
            return fn(q, k, v, scale=0.3, causal=True, attn_mask=keep, rel_pos=rel)
    elif op == "layernorm_mlp":
        x = torch.randn(2, 5, 8, generator=g)
        params = [torch.randn(shape, generator=g) for shape in ((8,), (8,), (16, 8), (16,), (8, 16), (8,), (8,))]

        def call(fn):
            return fn(x, *params[:6], eps=1e-5, approximate="tanh", layer_scale=params[6], sample_scale=None)
    else:
        x = torch.randn(2, 3, 10, 9, generator=g)
        weight, bias = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, generator=g)
        pos, prefix = torch.randn(1, 2 + 9, 8, generator=g), torch.randn(1, 2, 8, generator=g)

        def call(fn):
            return fn(x, weight, bias, pos_embed=pos, prefix_tokens=prefix, dynamic_img_pad=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(_torchscript.SCRIPTABLE[op])
    torch.testing.assert_close(call(scripted), call(getattr(fastvit, op)), rtol=1e-5, atol=1e-6)


def test_compile_of_an_fx_graph_still_runs_the_fused_ops(attention_runs):
    """torch.compile reads a leaf's TorchScript form too: its non-TorchScript branch is the op."""
    patched = FX_MODELS["timm"]()
    fastvit.patch(patched)
    traced = torch.fx.symbolic_trace(patched)
    compiled = torch.compile(traced, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(images()), patched(images()), rtol=RTOL, atol=ATOL)
    assert len(attention_runs) == 2 * DEPTH  # traced by compile once, and the eager call


EXPORT_MODELS = {
    "timm": lambda: timm_vit(img_size=8, reg_tokens=1).eval(),
    "torchvision": lambda: torchvision_vit(image_size=8).eval(),
    "transformers": lambda: hf_classifier(image_size=8).eval(),
}


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, dict):  # a traced HF model returns its output as a dict
        return out["logits"]
    return out.logits if hasattr(out, "logits") else out


# each fused op's custom op: how torch.export and torch.jit.trace name it in their graphs
CUSTOM_OPS = ("flash_attention_fwd", "layernorm_mlp_fwd", "patch_embed_fwd")


def _patched_pair(family: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(unpatched, patched) copies of ``EXPORT_MODELS[family]`` and the input they are captured on."""
    pytest.importorskip("transformers")
    reference = EXPORT_MODELS[family]()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    return reference, patched, torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.interpreter
@pytest.mark.parametrize("family", sorted(EXPORT_MODELS))
def test_export_keeps_the_custom_ops_with_a_dynamic_batch(family):
    reference, patched, x = _patched_pair(family)
    with fastvit.backend("triton"):
        exported = torch.export.export(patched, (x,), dynamic_shapes=({0: Dim("batch", min=2)},))
        ops = {str(node.target) for node in exported.graph.nodes if str(node.target).startswith("fastvit.")}
        assert ops == {f"fastvit.{op}.default" for op in CUSTOM_OPS}
        x5 = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        got = _logits(exported.module()(x5))
    torch.testing.assert_close(got, _logits(reference(x5)), rtol=1e-4, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("family", sorted(EXPORT_MODELS))
def test_jit_trace_records_the_custom_ops(family):
    # torch.jit.trace hands Python code sizes as tensors: the launchers failed on them, and a launch
    # would not have been recorded. Traced, each fastvit op is one node of the registered op
    reference, patched, x = _patched_pair(family)
    with fastvit.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation and constant-size warnings
        traced = torch.jit.trace(patched, x, check_trace=False, strict=False)
        kinds = {node.kind() for node in traced.inlined_graph.nodes() if node.kind().startswith("fastvit::")}
        assert kinds == {f"fastvit::{op}" for op in CUSTOM_OPS}
        x2 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        got = _logits(traced(x2))
    torch.testing.assert_close(got, _logits(reference(x2)), rtol=1e-4, atol=1e-5)


def test_hugging_face_attention_mask_runs_the_fused_op(op_calls):
    pytest.importorskip("transformers")
    reference = hf_classifier().eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    tokens = 17
    keep = torch.rand(3, 1, tokens, tokens, generator=torch.Generator().manual_seed(0)) > 0.3
    keep |= torch.eye(tokens, dtype=torch.bool)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    hidden = torch.randn(3, tokens, 32, generator=torch.Generator().manual_seed(2))
    for mask in (keep, additive):
        want, _ = reference.vit.layers[0].attention(hidden, mask)
        got, _ = patched.vit.layers[0].attention(hidden, mask)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    calls = op_calls["flash_attention"]
    assert len(calls) == 2 and calls[0]["kwargs"]["attn_mask"] is keep and calls[1]["kwargs"]["attn_mask"] is additive


def test_every_fused_forward_has_a_torchscript_branch():
    """A fused class overriding forward / forward_features gets the renamed original for its
    TorchScript branch (``FusedModule.__init_subclass__``)."""
    from fastvit.nn import timm_vit as timm_fused
    from fastvit.nn import torchvision_vit as tv_fused

    classes = [
        timm_fused.FusedAttention, timm_fused.FusedBlock, timm_fused.FusedVisionTransformer,
        tv_fused.FusedMultiheadAttention, tv_fused.FusedEncoderBlock, tv_fused.FusedVisionTransformer,
    ]  # fmt: skip
    for cls in classes:
        assert issubclass(cls, FusedModule) and issubclass(cls, nn.Module)
        original = cls.fastvit_original()
        alias = cls._fastvit_original_forward
        assert alias.__code__ is original.forward.__code__ and alias.__name__ == "_fastvit_original_forward"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("cait_xxs24_224", {"depth": 2, "img_size": 64}), ("convit_tiny", {"depth": 2, "img_size": 64}),
     ("test_convnext", {}), ("swinv2_cr_tiny_224", {"depths": (1, 1, 1, 1)}),
     ("swinv2_tiny_window8_256", {"depths": (1, 1, 1, 1), "img_size": 64, "window_size": 4}),
     ("mvitv2_tiny", {})],
)  # fmt: skip
def test_timm_fx_feature_graph_scripts_as_the_unpatched_one(name, kwargs):
    """timm's own test_model_forward_fx_torchscript: its FX feature extractor, then torch.jit.script of
    the graph. Scripting compiles the fused methods the graph calls (FX leaves): CaiT / ConViT read a
    class attribute there, ConvNeXt and the post-norm MLPs had ** arguments (which TorchScript cannot
    parse), MViTv2's rel-pos leaf typed its sizes as tuples where timm gives lists."""
    import timm
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions(),
              "param_shapes_constant": True}  # fmt: skip
    with timm.set_scriptable(True):
        torch.manual_seed(0)
        reference = timm.create_model(name, **kwargs).eval()
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    size = kwargs.get("img_size", reference.pretrained_cfg["input_size"][-1])
    x = torch.randn(1, 3, size, size)

    def scripted(model: nn.Module) -> torch.jit.ScriptModule:
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
        graph = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                         eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation; fastvit's "scripts the original"
            return torch.jit.script(graph)

    with torch.no_grad():
        want = next(iter(scripted(reference)(x).values()))
        torch.testing.assert_close(next(iter(scripted(patched)(x).values())), want)


def _torchvision_family(name: str) -> nn.Module:
    from tests.patching import test_torchvision_convnext, test_torchvision_swin

    builds = {"vit": torchvision_vit, "convnext": test_torchvision_convnext.build, **test_torchvision_swin.MODELS}
    return builds[name]().eval()


@pytest.mark.parametrize("name", ["vit", "convnext", "swin", "swin_v2", "maxvit"])
def test_torchvision_fx_graph_scripts_as_the_unpatched_one(name):
    """torchvision's own TestFxFeatureExtraction.test_jit_forward_backward: its feature extractor,
    then torch.jit.script of the graph, which compiles the fused methods the graph calls. ConvNeXt's
    iterated a slice of its Sequential, which TorchScript cannot ("'Permute' object has no attribute
    or method '__call__'"); found by running torchvision's tests against patched models."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    reference = _torchvision_family(name)
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) if name != "vit" else images()

    def scripted(model: nn.Module) -> torch.jit.ScriptModule:
        train_nodes, eval_nodes = get_graph_node_names(model)
        graph = create_feature_extractor(
            model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation; fastvit's "scripts the original"
            return torch.jit.script(graph.eval())

    with torch.no_grad():
        want = next(iter(scripted(reference)(x).values()))
        torch.testing.assert_close(next(iter(scripted(patched)(x).values())), want, rtol=RTOL, atol=ATOL)
