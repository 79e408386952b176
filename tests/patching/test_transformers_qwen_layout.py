"""The vision blocks Hugging Face wrote as the Qwen-VL blocks (``hf_layers.QWEN2_VL_LAYOUT_FAMILIES``,
``QWEN2_5_VL_LAYOUT_FAMILIES``, ``QWEN3_VL_LAYOUT_FAMILIES``: ERNIE 4.5 VL, Kimi K2.5, EXAONE 4.5,
GLM-4.1V / 4.5V / OCR, Qwen2.5-Omni, the Qwen3-VL MoE, Qwen3.5 and Qwen3-Omni towers ...) and as AIMv2's layer
(``AIMV2_LAYOUT_FAMILIES``: Ovis2): each block's forward, its MLP's forward and its RMSNorm's are
checked line for line against the Qwen-VL (or AIMv2) classes of the installed transformers; two of
each family's blocks on packed tokens (two images, rotary angles) against the unpatched ones by the
tolerance rule (outputs and every gradient, float64 oracle), the MLP half one fastvit.layernorm_mlp
call per block; the Triton kernels in the interpreter on one family per layout. Tiny configs.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_, source_lines

T = pytest.importorskip("transformers")

from transformers.models.aimv2.modeling_aimv2 import Aimv2EncoderLayer, Aimv2MLP, Aimv2RMSNorm  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLMLP,
    Qwen2_5_VLRMSNorm,
    Qwen2_5_VLVisionBlock,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionMlp as Qwen2VLMlp  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionMLP  # noqa: E402

import fastvit  # noqa: E402
from fastvit.nn import hf_layers  # noqa: E402

# {family table: (the reference layer, the reference MLP, the reference RMSNorm or None)}
LAYOUTS = {
    "qwen2_vl": (hf_layers.QWEN2_VL_LAYOUT_FAMILIES, Qwen2_5_VLVisionBlock, Qwen2VLMlp, None),
    "qwen2_5_vl": (hf_layers.QWEN2_5_VL_LAYOUT_FAMILIES, Qwen2_5_VLVisionBlock, Qwen2_5_VLMLP, Qwen2_5_VLRMSNorm),
    "qwen3_vl": (hf_layers.QWEN3_VL_LAYOUT_FAMILIES, Qwen2_5_VLVisionBlock, Qwen3VLVisionMLP, None),
    "aimv2": (hf_layers.AIMV2_LAYOUT_FAMILIES, Aimv2EncoderLayer, Aimv2MLP, Aimv2RMSNorm),
}
CASES = [(layout, layer) for layout, (families, *_) in LAYOUTS.items() for layer in families]
LAYERS = 2


def _body(cls: type, *names: str) -> list[str]:
    """``cls.forward``'s statements, after its signature (Qwen2.5-Omni's annotates the angles otherwise)."""
    lines = source_lines(cls.forward, *names)
    lines = [line for line in lines if not line.startswith(("r\"\"\"", "cu_seqlens (", "Cumulative"))]
    return lines[next(i for i, line in enumerate(lines) if line.startswith(")") and line.endswith(":")) + 1:]


def _norm_class(layer: type) -> type:
    """The RMSNorm class ``layer.__init__`` builds its norms of."""
    module, source = importlib.import_module(layer.__module__), inspect.getsource(layer.__init__)
    (name,) = {n for n in vars(module) if n.endswith("RMSNorm") and f"{n}(" in source}
    return getattr(module, name)


@pytest.mark.parametrize("layout, layer", CASES, ids=[layer.__name__ for _, layer in CASES])
def test_the_families_are_their_layout_line_for_line(layout, layer):
    families, reference, reference_mlp, reference_norm = LAYOUTS[layout]
    mlp = families[layer]
    assert _body(layer, layer.__name__) == _body(reference, reference.__name__)
    assert source_lines(mlp.forward, mlp.__name__) == source_lines(reference_mlp.forward, reference_mlp.__name__)
    if reference_norm is not None:
        norm = _norm_class(layer)
        for method in ("forward", "__init__"):
            assert source_lines(getattr(norm, method), norm.__name__) == source_lines(
                getattr(reference_norm, method), reference_norm.__name__
            )
    fused = (hf_layers.AIMV2_LAYOUT_LAYERS if layout == "aimv2" else hf_layers.QWEN_LAYOUT_LAYERS)[layer]
    assert getattr(hf_layers, fused.__name__) is fused  # importable by name: a patched model pickles


# two images of 5 and 9 tokens, packed; rotary angles per token (head dim 16)
CU_SEQLENS = torch.tensor([0, 5, 14], dtype=torch.int32)
_ANGLES = torch.randn(14, 8, generator=torch.Generator().manual_seed(3))
ROPE = (torch.cat([_ANGLES.cos()] * 2, -1), torch.cat([_ANGLES.sin()] * 2, -1))
TOKENS = torch.randn(14, 32, generator=torch.Generator().manual_seed(4))


class Stack(torch.nn.Module):
    """Two of a family's layers, each called as its tower calls it."""

    def __init__(self, layer: type, aimv2: bool) -> None:
        super().__init__()
        configs = importlib.import_module(layer.__module__.replace(".modeling_", ".configuration_"))
        names = [n for n in vars(configs) if n.endswith(("VisionConfig", "VisionEncoderConfig"))]
        config = getattr(configs, min(names, key=len))()  # ERNIE's has an alias with one more "_"
        for name, value in dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                                num_attention_heads=2, num_key_value_heads=2,
                                hidden_act="silu" if aimv2 else config.hidden_act).items():
            setattr(config, name, value)  # fmt: skip
        config._attn_implementation = "sdpa"
        self.aimv2 = aimv2
        self.layers = perturb_(torch.nn.ModuleList([layer(config) for _ in range(LAYERS)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.aimv2:  # (B, N, D) tokens, no mask
                x = layer(x[None])[0] if x.dim() == 2 else layer(x)
            else:
                x = layer(x, cu_seqlens=CU_SEQLENS, position_embeddings=ROPE)
        return x


@pytest.mark.parametrize("layout, layer", CASES, ids=[layer.__name__ for _, layer in CASES])
def test_matches_unpatched_by_the_rule(layout, layer, op_calls):
    reference, patched, report = pair(Stack(layer, layout == "aimv2").eval())
    assert report.counts()["mlp"] == LAYERS
    assert_matches_by_the_rule(reference, patched, TOKENS)
    assert len(op_calls["layernorm_mlp"]) == LAYERS
    if LAYOUTS[layout][3] is not None:
        assert op_calls["layernorm_mlp"][0]["kwargs"]["norm"] == "rms"


@pytest.mark.interpreter
def test_triton_route(op_calls):
    for layout in LAYOUTS:
        layer = next(iter(LAYOUTS[layout][0]))
        reference, patched, _ = pair(Stack(layer, layout == "aimv2").eval())
        with fastvit.backend("triton"):
            assert_matches_by_the_rule(reference, patched, TOKENS)
    assert len(op_calls["layernorm_mlp"]) == LAYERS * len(LAYOUTS)
