"""fastvit.patch on timm's attention-pooling head (``AttentionPoolLatent``, the 'map' global pool
of SigLIP and NaFlex ViTs): one ``fastvit.flash_attention`` call from the latent queries to the
tokens; everything around it stays timm's. Compared with an unpatched deep copy by the tolerance
rule (output and every gradient, the latent and the pool's MLP included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastvit
from tests.patching.helpers import assert_matches_by_the_rule, pair, perturb_, storage_map

timm = pytest.importorskip("timm")
from timm.layers.attention_pool import AttentionPoolLatent  # noqa: E402

from fastvit.nn.timm_pool import FusedAttentionPoolLatent  # noqa: E402


def map_vit(**overrides) -> nn.Module:
    """A tiny ViT with the 'map' pool (SigLIP's head): 32x32 images, 8x8 patches, dim 32, 2 heads."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5, global_pool="map",
                class_token=False)  # fmt: skip
    return perturb_(timm.models.VisionTransformer(**(args | overrides)))


def images(batch: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(5))


def test_map_pool_matches_unpatched(op_calls):
    reference, patched, report = pair(map_vit().eval())
    assert isinstance(patched.attn_pool, FusedAttentionPoolLatent)
    assert report.counts()["attention"] == 2  # the block's and the pool's
    assert_matches_by_the_rule(reference, patched, images())
    pool_calls = [c for c in op_calls["flash_attention"] if c["args"][0].shape[2] == 1]
    assert len(pool_calls) == 1 and pool_calls[0]["args"][1].shape[2] == 16  # 1 latent query, 16 tokens


@pytest.mark.parametrize("variant", ["latent_len=3 avg", "qk_norm", "no mlp"])
def test_pool_variants_and_a_key_mask(variant):
    kwargs = {"latent_len=3 avg": dict(latent_len=3, pool_type="avg"), "qk_norm": dict(qk_norm=True),
              "no mlp": dict(out_features=0)}[variant]  # fmt: skip
    reference = perturb_(AttentionPoolLatent(32, num_heads=2, **kwargs)).eval()
    reference, patched, _ = pair(nn.Sequential(reference))
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(6))
    assert_matches_by_the_rule(reference, patched, x)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]).view(2, 1, 1, 7)  # padded tokens of image 1
    torch.testing.assert_close(patched[0](x, attn_mask=keep), reference[0](x, attn_mask=keep), rtol=1e-5, atol=1e-5)


def test_state_dict_unpatch_training_and_compile():
    model = map_vit()
    before = storage_map(model)
    fastvit.patch(model)
    assert storage_map(model) == before  # the same parameters, not copies
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images()).square().mean().backward()
    assert model.attn_pool.latent.grad is not None and model.attn_pool.latent.grad.abs().sum() > 0
    opt.step()
    compiled = torch.compile(model.eval(), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(images()), model(images()))
    fastvit.unpatch(model)
    assert type(model.attn_pool) is AttentionPoolLatent
