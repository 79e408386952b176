"""Attention dropout in a patched timm attention follows the path timm's own forward takes.

timm's attentions apply attention dropout in one of two ways: the SDPA path (``fused_attn=True``)
passes ``dropout_p=attn_drop.p if self.training else 0``, the eager path calls ``attn_drop``, a
``nn.Dropout`` that drops while *it* is in training. Monte Carlo dropout (``model.eval()``, then only
the Dropout modules back to ``train()``) therefore drops on the eager path only; a patched
attention must do the same (run timm's forward when timm would drop, the fused op otherwise).
Each module is compared with an unpatched deep copy under the same seed, in fp32 on the torch route.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit.nn.fused import FusedModule
from tests.patching.helpers import ATOL, RTOL

pytest.importorskip("timm")
from timm.layers import Attention
from timm.models.beit import Attention as BeitAttention
from timm.models.cait import ClassAttn
from timm.models.eva import EvaAttention
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.vision_transformer_relpos import RelPosAttention
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.xcit import XCA

DIM, HEADS, P = 32, 2, 0.3


def tokens(n: int = 17) -> torch.Tensor:
    return torch.randn(3, n, DIM, generator=torch.Generator().manual_seed(0))


# name: (the module with attention dropout P, its call on a fixed input)
ATTENTIONS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "vit": (lambda: Attention(DIM, HEADS, attn_drop=P), lambda m: m(tokens())),
    "eva": (lambda: EvaAttention(DIM, HEADS, attn_drop=P, scale_norm=False), lambda m: m(tokens())),
    "beit": (lambda: BeitAttention(DIM, HEADS, attn_drop=P), lambda m: m(tokens())),
    "relpos": (lambda: RelPosAttention(DIM, HEADS, attn_drop=P), lambda m: m(tokens())),
    "pvt": (lambda: PvtAttention(DIM, HEADS, sr_ratio=2, attn_drop=P), lambda m: m(tokens(16), [4, 4])),
    "swin": (lambda: SwinWindowAttention(DIM, HEADS, window_size=4, attn_drop=P), lambda m: m(tokens(16))),
    "swin_v2": (lambda: SwinV2WindowAttention(DIM, (4, 4), HEADS, attn_drop=P), lambda m: m(tokens(16))),
    "sam": (lambda: SamAttention(DIM, HEADS, attn_drop=P), lambda m: m(tokens(16).view(3, 4, 4, DIM))),
    "cait": (lambda: ClassAttn(DIM, HEADS, attn_drop=P), lambda m: m(tokens())),
    "xcit": (lambda: XCA(DIM, HEADS, attn_drop=P), lambda m: m(tokens())),
}
# (module in training, its attn_drop in training): Monte Carlo dropout, and its converse
MODES = {"mc_dropout": (False, True), "attn_drop_eval": (True, False)}


def _perturbed(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def _set_mode(module: nn.Module, fused_attn: bool, training: bool, dropout_training: bool) -> None:
    module.train(training)
    module.attn_drop.train(dropout_training)
    if hasattr(module, "fused_attn"):
        module.fused_attn = fused_attn


def _seeded(call, module: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropout fallback's warning
        return call(module)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_attention_dropout_follows_timms_path(name, fused_attn, mode, op_calls, fresh_warnings):
    build, call = ATTENTIONS[name]
    reference = _perturbed(build())
    if fused_attn and not hasattr(reference, "fused_attn"):
        pytest.skip(f"timm's {name} attention has no SDPA path")
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    assert isinstance(patched, FusedModule)
    for module in (reference, patched):
        _set_mode(module, fused_attn, *MODES[mode])
    expected = _seeded(call, reference)
    got = _seeded(call, patched)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    module_training, dropout_training = MODES[mode]
    # timm drops on the SDPA path when the module trains (XCiT's SDPA path has no dropout at all),
    # on the eager path when attn_drop trains; the fused op runs exactly when it does not
    timm_drops = (module_training and name != "xcit") if fused_attn else dropout_training
    assert len(op_calls["flash_attention"]) == (0 if timm_drops else 1)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", sorted(MODES))
def test_attention_dropout_follows_timms_path_on_the_triton_route(mode, op_calls, fresh_warnings):
    build, call = ATTENTIONS["vit"]
    reference = _perturbed(build())
    patched = copy.deepcopy(reference)
    fastvit.patch(patched)
    for module in (reference, patched):
        _set_mode(module, False, *MODES[mode])
    expected = _seeded(call, reference)
    with fastvit.backend("triton"):
        got = _seeded(call, patched)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert len(op_calls["flash_attention"]) == (0 if mode == "mc_dropout" else 1)
