"""The fused ops inside CUDA graphs (skipped without CUDA): forward and backward of each op captured
with ``torch.cuda.graph`` on the Triton route, then replayed on new values written into the same
input buffers, must give exactly what eager calls give (the kernels are deterministic). At ViT sizes
an eager call's host time exceeds its GPU time; a captured graph is how such calls run without it
(``torch.cuda.graph``, ``make_graphed_callables``, ``torch.compile(mode="reduce-overhead")``), so
no op may read a device tensor on the host or launch on another stream."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fastvit
from tests.cuda_graphs import capture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")]

DTYPE = torch.bfloat16


def _leaf(*shape: int, dtype: torch.dtype = DTYPE, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def _attention():
    q, k, v = (_leaf(2, 3, 197, 64) for _ in range(3))
    return (q, k, v), lambda: fastvit.flash_attention(q, k, v)


def _attention_learnable_bias():
    q, k, v = (_leaf(2, 3, 50, 32) for _ in range(3))
    bias = _leaf(1, 3, 50, 50, dtype=torch.float32)  # BEiT's gathered table: its gradient is a reduction
    return (q, k, v, bias), lambda: fastvit.flash_attention(q, k, v, attn_mask=bias)


def _attention_rel_pos():
    q, k, v = (_leaf(2, 2, 64, 64) for _ in range(3))
    rel_h, rel_w = _leaf(2, 2, 64, 8), _leaf(2, 2, 64, 8)  # SAM's 8 x 8 window grid
    return (q, k, v, rel_h, rel_w), lambda: fastvit.flash_attention(q, k, v, rel_pos=(rel_h, rel_w))


def _shifted_windows():
    q, k, v = (_leaf(2, 3, 14 * 14, 32) for _ in range(3))
    return (q, k, v), lambda: fastvit.window_attention(q, k, v, (14, 14), 7, shift=3)


def _layernorm_mlp():
    x = _leaf(2, 197, 128)
    params = (_leaf(128), _leaf(128), _leaf(512, 128), _leaf(512), _leaf(128, 512), _leaf(128))
    return (x, *params), lambda: fastvit.layernorm_mlp(x, *params)


def _patch_embed():
    x = _leaf(2, 3, 64, 64, grad=False)  # images: no gradient, as in training
    weight, bias, pos = _leaf(128, 3, 8, 8), _leaf(128), _leaf(1, 65, 128)
    cls = _leaf(1, 1, 128)
    return (x, weight, bias, pos, cls), lambda: fastvit.patch_embed(x, weight, bias, pos_embed=pos, prefix_tokens=cls)


def _rotary():
    q, k = _leaf(2, 3, 197, 64), _leaf(2, 3, 197, 64)
    rope = torch.randn(196, 128, device="cuda")  # timm's fp32 [sin, cos] table
    return (q, k, rope), lambda: fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)


CASES: dict[str, Callable] = {
    "flash_attention": _attention,
    "flash_attention+bias_grad": _attention_learnable_bias,
    "flash_attention+rel_pos": _attention_rel_pos,
    "window_attention": _shifted_windows,
    "layernorm_mlp": _layernorm_mlp,
    "patch_embed": _patch_embed,
    "rotary_qk": _rotary,
}


def _outputs(fn: Callable) -> tuple[torch.Tensor, ...]:
    out = fn()
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_captured_graph_replays_match_eager_calls(case, mode):
    torch.manual_seed(0)
    with fastvit.backend("triton"):
        inputs, fn = CASES[case]()
        wrt = [t for t in inputs if t.requires_grad]
        grad_outs = [torch.randn_like(o) for o in _outputs(fn)]

        def step() -> list[torch.Tensor]:
            if mode == "inference":
                with torch.no_grad():
                    return list(_outputs(fn))
            outs = _outputs(fn)
            return [*outs, *torch.autograd.grad(outs, wrt, grad_outs)]

        graph, captured = capture(step)

        with torch.no_grad():  # new values in the captured buffers
            for t in (*inputs, *grad_outs):
                t.copy_(torch.randn_like(t))
        graph.replay()
        expected = step()
    torch.cuda.synchronize()
    assert len(captured) == len(expected)
    for i, (got, want) in enumerate(zip(captured, expected, strict=True)):
        assert torch.equal(got, want), f"{case} {mode}: output {i} of the replay differs from an eager call"
