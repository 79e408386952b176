"""bf16 on the ``triton`` route under Triton's interpreter: ``tl.dot`` multiplies bf16's raw bits
there (an upstream bug: errors of 1e8 and more), so every op runs its ``torch`` route instead, with
one ``FastvitFallbackWarning``, and never returns the interpreter's garbage. On a GPU the kernels
take bf16, and these tests do not run."""

from __future__ import annotations

import sys

import pytest
import torch

import fastvit
from fastvit import reference

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(sys.modules["fastvit.backend"], "_warned", set())  # each test sees its warning


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def _run(op, *args, **kwargs):
    with fastvit.backend("triton"), pytest.warns(fastvit.FastvitFallbackWarning, match="bfloat16 in Triton's interp"):
        return op(*args, **kwargs)


def test_flash_attention():
    q, k, v = (_randn(1, 2, 9, 16, seed=s) for s in range(3))
    out = _run(fastvit.flash_attention, q, k, v)
    expected, _ = reference.attention(q.double(), k.double(), v.double())
    assert (out.double() - expected).abs().max() < 0.05


def test_flash_attention_varlen():
    q, k, v = (_randn(12, 2, 16, seed=s) for s in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = _run(fastvit.flash_attention_varlen, q, k, v, cu)
    for a, b in ((0, 5), (5, 12)):
        expected, _ = reference.attention(*(t[a:b].transpose(0, 1)[None].double() for t in (q, k, v)))
        assert (out[a:b].double() - expected[0].transpose(0, 1)).abs().max() < 0.05


def test_layernorm_mlp():
    x, w1, w2 = _randn(1, 3, 8, seed=0), _randn(16, 8, seed=1), _randn(8, 16, seed=2)
    out = _run(fastvit.layernorm_mlp, x, None, None, w1, None, w2, None)
    expected = reference.layernorm_mlp(x.double(), None, None, w1.double(), None, w2.double(), None, eps=1e-6)
    assert (out.double() - expected).abs().max() < 0.5


def test_patch_embed():
    x, w = _randn(1, 3, 8, 8, seed=0), _randn(4, 3, 4, 4, seed=1)
    out = _run(fastvit.patch_embed, x, w)
    expected = reference.patch_embed(x.double(), w.double())
    assert (out.double() - expected).abs().max() < 0.1
