"""What the fused attention replacements share: head split/merge views and the op call.

The replacements themselves subclass each family's attention module and live beside it:
``fastvit.nn.timm_vit.FusedAttention`` (timm), ``fastvit.nn.torchvision_vit.FusedMultiheadAttention``
(``nn.MultiheadAttention``) and ``fastvit.nn.hf_vit.FusedViTAttention`` (Hugging Face).
"""

from __future__ import annotations

import torch

import fastvit
from fastvit.nn.fused import warn_fallback

__all__ = ["merge_heads", "self_attention", "split_packed_qkv", "warn_attention_dropout"]


def split_packed_qkv(
    qkv: torch.Tensor, num_heads: int, head_dim: int, *, batch_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v (B, H, N, D) of a packed projection output, without copies.

    Args:
        qkv: (B, N, 3*H*D) if ``batch_first`` else (N, B, 3*H*D): the output of one Linear whose
            rows are [q; k; v], each head-major (timm's ``qkv``, ``nn.MultiheadAttention.in_proj``).
        num_heads: H.
        head_dim: D.

    Returns:
        q, k, v, each (B, H, N, D) with a unit stride in D (strided views into ``qkv``).
    """
    qkv = qkv.unflatten(-1, (3, num_heads, head_dim))
    # (B, N, 3, H, D) or (N, B, 3, H, D) -> (3, B, H, N, D)
    qkv = qkv.permute(2, 0, 3, 1, 4) if batch_first else qkv.permute(2, 1, 3, 0, 4)
    q, k, v = qkv.unbind(0)
    return q, k, v


def merge_heads(out: torch.Tensor, *, batch_first: bool = True) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D) if ``batch_first`` else (N, B, H*D).

    The Triton kernel writes ``out`` as (B, N, H, D) in memory, so the batch-first merge is a view.
    """
    if batch_first:
        return out.transpose(1, 2).flatten(2)
    return out.permute(2, 0, 1, 3).flatten(2)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fastvit.flash_attention`` on (B, H, N, D) q, k, v (looked up at call time, so the op a
    test or a user swaps in is the one that runs). ``attn_mask`` follows SDPA's convention (bool
    True = may attend, or an additive float mask), broadcastable to (B, H, N, N)."""
    if attn_mask is None:
        return fastvit.flash_attention(q, k, v, scale=scale, causal=causal)
    return fastvit.flash_attention(q, k, v, scale=scale, causal=causal, attn_mask=attn_mask)


def warn_attention_dropout(kind: str, p: float) -> None:
    """Warn once that a patched attention with dropout ``p`` in training runs its original forward."""
    warn_fallback(
        f"patched-attention-dropout:{kind}",
        f"fastvit: a patched {kind} has attention dropout p={p} and is in training mode; "
        "fastvit.flash_attention has no dropout, so these calls run the module's original PyTorch "
        "forward (model.eval() or p=0 runs the fused op)",
    )
