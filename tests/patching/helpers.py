"""Tiny models of each family, built locally (no downloads), and the comparisons the tests share.

Sizes: 16x16 images with 4x4 patches (16 patch tokens, plus prefix tokens: 17 to 19, never a
power of two), embedding dim 32, 2 heads (head_dim 16), 2 blocks, batch 3 (odd).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

import fastvit
from tests.tolerance import assert_close_to_reference

# The torch route of every op runs the same PyTorch math as the unpatched modules (fp32).
RTOL, ATOL = 1e-5, 1e-6
OPS = ("flash_attention", "flash_attention_varlen", "layernorm_mlp", "patch_embed")
HAS_PATCH_EMBED = hasattr(fastvit, "patch_embed")
IMG, PATCH, DIM, HEADS, DEPTH, BATCH = 16, 4, 32, 2, 2, 3


def images(batch: int = BATCH, size: int | tuple[int, int] = IMG, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def perturb_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Move every parameter off its init (LayerScale 1e-6, zero biases and heads, ~0 class
    tokens would hide a wrong operand), keeping LayerNorm weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def timm_vit(**overrides) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=5)
    return perturb_(VisionTransformer(**(args | overrides)))


def timm_model(name: str, **overrides) -> nn.Module:
    import timm

    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=5)
    return perturb_(timm.create_model(name, pretrained=False, **(args | overrides)))


def torchvision_vit(**overrides) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    args = dict(image_size=IMG, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS, hidden_dim=DIM)
    return perturb_(VisionTransformer(**(args | dict(mlp_dim=64, num_classes=5) | overrides)))


def hf_config(**overrides):
    from transformers import ViTConfig

    args = dict(
        image_size=IMG, patch_size=PATCH, hidden_size=DIM, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return ViTConfig(**(args | overrides))


def hf_classifier(**overrides) -> nn.Module:
    from transformers import ViTForImageClassification

    return perturb_(ViTForImageClassification(hf_config(**overrides)))


def pair(model: nn.Module, **patch_args) -> tuple[nn.Module, nn.Module, fastvit.PatchReport]:
    """(unpatched reference, patched deep copy, report)."""
    patched = copy.deepcopy(model)
    report = fastvit.patch(patched, **patch_args)
    return model, patched, report


def expected_parts(attention: int, mlp: int, patch_embed: int) -> dict[str, int]:
    """The report's counts() for a model with these many fusable modules, given which ops exist."""
    counts = {"attention": attention, "mlp": mlp, "patch_embed": patch_embed if HAS_PATCH_EMBED else 0}
    return {part: n for part, n in counts.items() if n}


def assert_outputs_and_grads_match(
    reference: nn.Module,
    patched: nn.Module,
    inputs: torch.Tensor,
    *,
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, x: m(x),
    rtol: float = RTOL,
    atol: float = ATOL,
    seed: int | None = None,
    backward_passes: int = 1,
) -> None:
    """Same output and the same gradient on every parameter (and the input), for a random
    upstream gradient. ``seed`` reseeds the RNG before each run (drop-path, dropout).
    ``backward_passes`` > 1 runs the backward that often over one graph, so the gradients compared
    are accumulated (micro-batches): one that shares memory with another accumulates wrongly."""
    outputs, grads = [], []
    for model in (reference, patched):
        x = inputs.clone().requires_grad_(True)
        if seed is not None:
            torch.manual_seed(seed)
        out = run(model, x)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(out.device)
        loss = (out * upstream).sum()
        for left in range(backward_passes, 0, -1):
            loss.backward(retain_graph=left > 1)
        outputs.append(out.detach())
        grads.append([("input", x.grad)] + [(n, p.grad) for n, p in model.named_parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=rtol, atol=atol)
    assert len(grads[1]) == len(grads[0])
    for (name, ref_grad), (_, got) in zip(grads[0], grads[1], strict=True):  # same order of Parameters
        if ref_grad is None:
            assert got is None, f"{name}: patched model has a gradient the reference lacks"
            continue
        assert got is not None, f"{name}: no gradient in the patched model"
        message = lambda m, n=name: f"grad of {n}: {m}"
        torch.testing.assert_close(got, ref_grad, rtol=rtol, atol=atol, msg=message)


def storage_map(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """state_dict keys in order, with each tensor's shape and data pointer."""
    return [(k, tuple(v.shape), v.data_ptr()) for k, v in model.state_dict().items()]


def output_strides(modules: list[nn.Module], model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The strides of each module's output in one forward of ``model`` (a fused block must hand the
    next block the layout the unpatched one did)."""
    strides: list[tuple[int, ...]] = []
    handles = [m.register_forward_hook(lambda m, args, out: strides.append(out.stride())) for m in modules]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return strides


class HFLogits(nn.Module):
    """A Hugging Face image classifier returning its logits tensor (the helpers compare tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def source_lines(function: Callable, *names: str) -> list[str]:
    """``function``'s source lines, stripped, without comments, docstrings or decorators, each of
    ``names`` replaced by X: two libraries' copies of one forward compare equal."""
    import inspect
    import re

    text = re.sub(r"#.*", "", inspect.getsource(function))
    for name in names:
        text = text.replace(name, "X")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(('"""', "@"))]


class HFLastHiddenState(nn.Module):
    """A Hugging Face encoder returning its ``last_hidden_state`` tensor (SAM's image embeddings)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state


def assert_exports_with_ops(reference: nn.Module, x: torch.Tensor, ops: set[str]) -> None:
    """``torch.export`` of a patched copy of ``reference`` on the Triton route: the graph holds
    exactly the fastvit custom ops ``ops`` (``"fastvit.layernorm_mlp_fwd.default"`` ...) and the
    exported module computes what the unpatched model does."""
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    with fastvit.backend("triton"):
        exported = torch.export.export(patched, (x,))
        found = {str(node.target) for node in exported.graph.nodes if str(node.target).startswith("fastvit.")}
        assert found == ops
        got = exported.module()(x)
    torch.testing.assert_close(got, reference(x), rtol=1e-4, atol=1e-5)


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def _outputs_and_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The output and every gradient (the input's and each Parameter's) for a fixed upstream gradient."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * upstream.to(out.device)).sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}  # torch.compile's wrapper
    return {"output": out.detach(), "input": x.grad} | grads


def assert_matches_by_the_rule(reference: nn.Module, patched: nn.Module, x: torch.Tensor) -> None:
    """Output and every gradient within the tolerance rule, against the unpatched model in float64."""
    oracle = _outputs_and_grads(copy.deepcopy(reference).double(), x.double())
    lowp, got = _outputs_and_grads(reference, x), _outputs_and_grads(patched, x)
    assert got.keys() == oracle.keys()
    for name, want in oracle.items():
        assert (want is None) == (got[name] is None), f"{name}: gradient present in one model only"
        if want is not None:
            assert_close_to_reference(got[name], want, lowp[name], name=name)


def assert_matches_on_the_gpu(model: nn.Module, x: torch.Tensor) -> None:
    """A patched copy of ``model`` through the compiled Triton kernels on CUDA: fp32 output and
    every gradient by the tolerance rule against the unpatched model in float64, then the bf16
    autocast output within 3e-2 of the largest reference value (bf16's error)."""
    device = torch.device("cuda")
    reference, patched, _ = pair(model.to(device).eval())
    x = x.to(device)
    with fastvit.backend("triton"):
        assert_matches_by_the_rule(reference, patched, x)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = patched(x), reference(x)
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 3e-2 * scale


def assert_scripts_the_original(reference: nn.Module, patched: nn.Module, x: torch.Tensor) -> None:
    """``torch.jit.script`` of a patched model compiles the original modules' math (with its one
    warning): the scripted model computes what the unpatched one does, calling no fastvit op."""
    import warnings

    import pytest

    with pytest.warns(UserWarning, match="compiles the original"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(patched)
    torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)


def assert_patch_and_unpatch_keep_the_weights(model: nn.Module) -> None:
    """``fastvit.patch`` swaps classes only (every Parameter and buffer keeps its storage) and
    ``fastvit.unpatch`` restores every module's class."""
    types, storages = module_types(model), storage_map(model)
    fastvit.patch(model)
    assert storage_map(model) == storages
    fastvit.unpatch(model)
    assert module_types(model) == types


def assert_compiles_and_traces(
    reference: nn.Module, patched: nn.Module, x: torch.Tensor, *, script: bool = True, fx: bool = True
) -> None:
    """A patched timm model under ``torch.compile`` (fullgraph, eager backend) and, with ``fx``, timm's
    FX feature extraction (the last node), with ``script``, ``torch.jit.script`` (the original math):
    each computes what the unpatched model does (a model timm itself cannot trace or script is
    checked without)."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    if fx:
        nodes = {get_graph_node_names(reference)[1][-1]: "out"}  # the unpatched graph's last node (the head's)
        want = create_feature_extractor(reference, return_nodes=nodes)(x)["out"]
        got = create_feature_extractor(patched, return_nodes=nodes)(x)["out"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if script:
        assert_scripts_the_original(reference, patched, x)


def assert_attention_dropout_runs_timm(
    reference: nn.Module, patched: nn.Module, x: torch.Tensor, fused_attn: bool
) -> None:
    """In training with attention dropout the fused attentions run timm's forward (with their
    warning), on timm's SDPA path (``fused_attn``) and its eager path alike: the same draws, the
    same outputs and gradients."""
    import pytest

    for model in (reference, patched):
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused_attn
    with pytest.warns(fastvit.FastvitFallbackWarning, match="attention dropout"):
        assert_outputs_and_grads_match(reference.train(), patched.train(), x, seed=0, rtol=1e-4, atol=1e-5)


def unfused_embeddings_only(report: fastvit.PatchReport) -> bool:
    """Whether the report's skipped entries are only Hugging Face patch embeddings fastvit has no
    entry for (named in the report, their modules left as they are): what a test asserting "every
    attention and MLP half fused" allows besides."""
    return all(e.part == "patch_embed" and "is not a patch embedding fastvit fuses" in e.detail for e in report.skipped)


def layer_skips(report: fastvit.PatchReport) -> list:
    """The report's skipped entries other than patch embeddings (attention, MLP halves, models)."""
    return [e for e in report.skipped if e.part != "patch_embed"]
