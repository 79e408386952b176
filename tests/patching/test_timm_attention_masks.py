"""A user's ``attn_mask`` on timm's attention blocks, patched vs unpatched (fastvit.nn.attention.mask_refused).

Masks SDPA takes (bool, or the tokens' float dtype, broadcastable to (B, H, N, N)) go to one
fastvit.flash_attention call and match timm; the others (a (B, N) key mask, a mask one key too wide,
an int64 mask, a float64 mask with float32 tokens) run timm's forward, which raises its own error,
message for message, where the op would raise another or (float64) promote and run. ViT's
``Attention``, EVA's ``EvaAttention`` and ViT-22B's ``ParallelScalingBlock``; tiny models, no downloads.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from tests.patching.helpers import perturb_

timm = pytest.importorskip("timm")

N = 5
MODELS = {  # family -> (timm name, image size)
    "vit": ("vit_tiny_patch16_224", 32),
    "eva": ("eva02_tiny_patch14_224", 28),
    "parallel": ("vit_pwee_patch16_reg1_gap_256", 32),
}
REFUSED = {
    "key_mask_2d": lambda: torch.ones(2, N, dtype=torch.bool),
    "one_key_too_wide": lambda: torch.zeros(2, 1, N, N + 1),
    "int64": lambda: torch.zeros(2, 1, N, N, dtype=torch.int64),
    "float64": lambda: torch.zeros(2, 1, N, N, dtype=torch.float64),
}
TAKEN = {
    "float": lambda: torch.randn(2, 1, N, N, generator=torch.Generator().manual_seed(1)),
    "bool": lambda: torch.rand(2, 1, N, N, generator=torch.Generator().manual_seed(2)) > 0.3,
}


def _blocks(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    name, size = MODELS[family]
    model = perturb_(timm.create_model(name, img_size=size, depth=1)).eval()
    patched = copy.deepcopy(model)
    fastvit.patch(patched)
    return model.blocks[0], patched.blocks[0]


def _tokens(block: torch.nn.Module) -> torch.Tensor:
    dim = next(p for p in block.parameters()).shape[-1]
    return torch.randn(2, N, dim, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mask", list(REFUSED))
@pytest.mark.parametrize("family", list(MODELS))
def test_a_mask_sdpa_refuses_raises_timms_error(family, mask, op_calls):
    reference, patched = _blocks(family)
    x, attn_mask = _tokens(reference), REFUSED[mask]()
    with pytest.raises(RuntimeError) as want:
        reference(x, attn_mask=attn_mask)
    with pytest.raises(RuntimeError) as got:
        patched(x, attn_mask=attn_mask)
    assert str(got.value) == str(want.value)
    assert op_calls["flash_attention"] == []


@pytest.mark.parametrize("mask", list(TAKEN))
@pytest.mark.parametrize("family", list(MODELS))
def test_a_mask_sdpa_takes_goes_to_the_op(family, mask, op_calls):
    reference, patched = _blocks(family)
    x, attn_mask = _tokens(reference), TAKEN[mask]()
    torch.testing.assert_close(patched(x, attn_mask=attn_mask), reference(x, attn_mask=attn_mask),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    assert len(op_calls["flash_attention"]) == 1
