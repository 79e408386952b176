"""Patched models on a GPU (the compiled Triton kernels), bf16 autocast, against the unpatched
model: outputs and every gradient within bf16 error, relative to each tensor's magnitude.

Models: dim 128, 2 heads (head_dim 64), 2 blocks, 64x64 images with 8x8 patches (64 patches +
prefix tokens: 65 to 67, not a multiple of the kernels' blocks). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from tests.cuda_graphs import capture
from tests.patching.helpers import hf_classifier, pair, timm_vit, torchvision_vit

pytestmark = pytest.mark.gpu

FAMILIES = {
    "timm": lambda: (
        timm_vit(img_size=64, patch_size=8, embed_dim=128, reg_tokens=2, qk_norm=True, init_values=0.5),
        lambda m, x: m(x),
    ),
    "torchvision": lambda: (
        torchvision_vit(image_size=64, patch_size=8, hidden_dim=128, mlp_dim=512),
        lambda m, x: m(x),
    ),
    "transformers": lambda: (
        hf_classifier(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512),
        lambda m, x: m(x).logits,
    ),
    # EVA02-B's block: RoPE, SwiGLU with scale_mlp's LayerNorm before fc2 (the op's hidden norm)
    "timm-eva02": lambda: (
        _eva02(img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2, swiglu_mlp=True, scale_mlp=True,
               use_rot_pos_emb=True, num_classes=10),
        lambda m, x: m(x),
    ),
}


def _eva02(**kwargs) -> torch.nn.Module:
    from timm.models.eva import Eva

    return Eva(**kwargs)


def _assert_close_relative(got: torch.Tensor, want: torch.Tensor, name: str, rel: float = 3e-2) -> None:
    scale = want.float().abs().max().item() + 1e-6
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3e} > {rel} x max |reference| {scale:.3e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_matches_unpatched(family, op_calls):
    pytest.importorskip(family.split("-")[0])
    model, run = FAMILIES[family]()
    reference, patched, _ = pair(model.cuda().train())
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, got = run(reference, x), run(patched, x)
    assert got.dtype == want.dtype
    _assert_close_relative(got, want, "output")
    upstream = torch.randn_like(want, dtype=torch.float32)
    (got.float() * upstream).sum().backward()
    (want.float() * upstream).sum().backward()
    for (name, p), q in zip(patched.named_parameters(), reference.parameters(), strict=True):
        _assert_close_relative(p.grad, q.grad, f"grad of {name}", rel=5e-2)
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]
    assert fastvit.unpatch(patched).replaced


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_of_the_patched_model_replays_from_a_cuda_graph(family, op_calls):
    # eager calls at ViT sizes are host-bound; a captured graph (torch.cuda.graph,
    # torch.compile(mode="reduce-overhead")) removes the host time, so a patched model's whole
    # training step must capture, and its replays on new images match eager steps
    pytest.importorskip(family.split("-")[0])
    model, run = FAMILIES[family]()
    _, patched, _ = pair(model.cuda().train())
    params = [p for p in patched.parameters() if p.requires_grad]
    x = torch.randn(4, 3, 64, 64, device="cuda")

    def step() -> list[torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(patched, x)
        grads = torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
        return [out, *(g for g in grads if g is not None)]

    graph, captured = capture(step)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = step()
    for i, (got, want) in enumerate(zip(captured, expected, strict=True)):
        _assert_close_relative(got, want, f"replayed output {i}", rel=1e-2)
    assert op_calls["flash_attention"] and op_calls["layernorm_mlp"]


@pytest.mark.parametrize("family", ["timm", "transformers"])
def test_export_and_compile_keep_the_batch_and_image_size_dynamic_under_auto(family):
    """Under ``auto`` on a GPU every op builds its tuning bucket from the call's sizes; reading a
    traced size (int(rows)) specialized it: torch.export with a dynamic batch raised "Constraints
    violated" for every patched model, and dynamic torch.compile recompiled per batch size."""
    from torch.export import Dim

    pytest.importorskip(family)
    model, run = FAMILIES[family]()
    reference, patched, _ = pair(model.cuda().eval())

    class Run(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run(self.inner, x)

    x = torch.randn(4, 3, 64, 64, device="cuda")
    exported = torch.export.export(Run(patched), (x,), dynamic_shapes=({0: Dim("batch", min=2, max=64)},))
    assert any("fastvit" in str(node.target) for node in exported.graph.nodes)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(Run(patched), backend=counting_backend, dynamic=True)
    with torch.no_grad():
        for batch in (5, 6, 9):  # not 3: duck sizing would give the batch the channels' symbol
            y = torch.randn(batch, 3, 64, 64, device="cuda")
            want = run(reference, y)
            _assert_close_relative(exported.module()(y), want, f"exported, batch {batch}", rel=1e-3)
            _assert_close_relative(compiled(y), want, f"compiled, batch {batch}", rel=1e-3)
    assert len(graphs) == 1
