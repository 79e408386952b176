"""What the fused attention replacements share: head split/merge views and the op call.

The replacements themselves subclass each family's attention module and live beside it:
``fastvit.nn.timm_vit.FusedAttention`` (timm), ``fastvit.nn.torchvision_vit.FusedMultiheadAttention``
(``nn.MultiheadAttention``) and ``fastvit.nn.hf_vit.FusedViTAttention`` (Hugging Face).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit
from fastvit.nn.fused import warn_attention_dropout  # re-exported: the fused classes import it from here

__all__ = [
    "biased_attention", "biased_qkv", "cosine_qk", "decomposed_rel_pos_tables", "mask_refused", "mask_with_causal",
    "merge_heads", "per_head_biased_attention", "self_attention", "split_packed_qkv", "timm_scale",
    "warn_attention_dropout", "windowed_attention",
]


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


def decomposed_rel_pos_tables(
    q: torch.Tensor, r_h: torch.Tensor, r_w: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """MViTv2 / SAM's decomposed relative position for self-attention, as the op's ``rel_pos``.

    Args:
        q: (B, H, N, D) queries (unscaled), N = h * w in row-major order.
        r_h, r_w: (h, h, D) and (w, w, D) embeddings of each [query row, key row] and [query
            column, key column] pair (the library's ``get_rel_pos``: timm's, Hugging Face's).
        size: (h, w), the query grid, which is also the key grid.

    Returns:
        rel_h (B, H, N, h) and rel_w (B, H, N, w): the bias of query i and key j is
        ``rel_h[..., i, j // w] + rel_w[..., i, j % w]``, as the libraries' (N, N) bias has it.

    Example:
        >>> rel_pos = decomposed_rel_pos_tables(q, r_h, r_w, (14, 14))
        >>> out = fastvit.flash_attention(q, k, v, rel_pos=rel_pos)
    """
    h, w = size
    grid_q = q.unflatten(2, (h, w))  # (B, H, h, w, D), a view
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, r_h).flatten(2, 3)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, r_w).flatten(2, 3)
    return rel_h, rel_w


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


def timm_scale(attn: nn.Module, head_dim: int | None = None) -> float | None:
    """The factor timm's attention module ``attn`` puts on q.k. On timm's fused path
    (``attn.fused_attn``, the default) timm calls SDPA without a scale, so SDPA's default applies
    whatever ``attn.scale`` holds (a scale set after construction, or ``num_heads`` changed, is not
    read): None, the op's same default 1/sqrt(D), or ``head_dim ** -0.5`` where the caller pads q
    past its ``head_dim`` channels. On the unfused path timm multiplies by ``attn.scale``.

    Example:
        >>> out = fastvit.flash_attention(q, k, v, scale=timm_scale(attn))
    """
    if getattr(attn, "fused_attn", False):
        return None if head_dim is None else head_dim**-0.5
    return attn.scale


def mask_with_causal(attn_mask: object, is_causal: object) -> bool:
    """Whether a call gives both a mask tensor and ``is_causal=True``: timm's SDPA path raises on
    that and its eager path drops the mask, so the fused timm attentions leave it to timm's forward.
    False under ``torch.fx`` tracing (a Proxy is neither): the graph passes both on to the op.

    Example:
        >>> if mask_with_causal(attn_mask, is_causal) or self._fastvit_unfused("timm Attention"):
        ...     return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
    """
    return is_causal is True and isinstance(attn_mask, torch.Tensor)


def mask_refused(attn_mask: object, x: torch.Tensor, num_heads: int) -> bool:
    """Whether a user's mask is one the fused timm attentions leave to timm's forward, which then
    raises (or computes) what it always did: a tensor neither bool nor floating, floating in another
    dtype than the tokens x outside autocast (SDPA refuses it; the op would promote it), or not
    broadcastable to (B, num_heads, N, N) (the op's error would be another). False for None, and
    under ``torch.fx`` tracing (a Proxy: the graph passes the mask on to the op).

    Example:
        >>> mask_refused(torch.zeros(2, 1, 5, 5, dtype=torch.float64), torch.zeros(2, 5, 8), 2)
        True
    """
    if not isinstance(attn_mask, torch.Tensor) or isinstance(x, torch.fx.Proxy):
        return False
    if attn_mask.dtype != torch.bool:
        if not attn_mask.is_floating_point():
            return True
        if attn_mask.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            return True
    scores = (x.shape[0], num_heads, x.shape[-2], x.shape[-2])
    try:
        return torch.broadcast_shapes(attn_mask.shape, scores) != scores
    except RuntimeError:  # not broadcastable
        return True


def biased_qkv(
    x: torch.Tensor,
    qkv: nn.Linear,
    q_bias: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    v_bias: torch.Tensor | None,
    bias_separate: bool,
) -> torch.Tensor:
    """timm's packed q/k/v projection with separate biases (BEiT, EVA, Swin V2: ``q_bias``, a zero
    ``k_bias`` buffer, ``v_bias``), as timm computes it: (..., C) -> (..., 3*H*D).

    Args:
        qkv: the bias-free packed Linear.
        q_bias, k_bias, v_bias: (H*D,) each, or all None (then ``qkv(x)``).
        bias_separate: add the biases after the matmul (timm's ``qkv_bias_separate``) rather than in
            ``F.linear``.
    """
    if q_bias is None:
        return qkv(x)
    bias = torch.cat((q_bias, k_bias, v_bias))
    return qkv(x) + bias if bias_separate else F.linear(x, weight=qkv.weight, bias=bias)


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Attention within windows with a per-head bias and an optional per-window mask (Swin V2 in timm
    and Hugging Face).

    Args:
        q, k, v: (B*nW, H, N, D), the windows of B images in the batch, image-major (timm's and
            Hugging Face's ``window_partition`` order); any strides with a unit stride in D.
        bias: (1, H, N, N) relative-position bias, added to every window.
        mask: (nW, N, N) additive mask of the window (0 or -100 in Swin) or None; window w of
            every image gets ``mask[w]``.
        scale: multiplies q.k; None: 1/sqrt(D).

    Returns:
        (B*nW, N, H*D), the heads merged, as timm's ``x.transpose(1, 2).reshape(B_, N, -1)``.

    Example:
        >>> out = windowed_attention(q, k, v, bias, mask, scale=None)  # Swin V1: the bias table's (1, H, N, N)
    """
    if mask is None:
        return merge_heads(self_attention(q, k, v, scale=scale, attn_mask=bias))
    windows, heads, tokens, head_dim = q.shape
    num_windows = mask.shape[0]
    # windows as heads: (B*nW, H, N, D) -> (B, nW*H, N, D), one copy each
    q, k, v = (t.reshape(-1, num_windows * heads, tokens, head_dim) for t in (q, k, v))
    # (1, H, N, N) + (nW, 1, N, N) -> (1, nW*H, N, N), shared by every image
    window_bias = (bias + mask.unsqueeze(1)).reshape(1, num_windows * heads, tokens, tokens)
    out = self_attention(q, k, v, scale=scale, attn_mask=window_bias)  # (B, nW*H, N, D), (B, N, nW*H, D) in memory
    out = out.transpose(1, 2).reshape(-1, tokens, num_windows, heads * head_dim)  # (B, N, nW, H*D), a view
    return out.transpose(1, 2).reshape(windows, tokens, heads * head_dim)  # (B*nW, N, H*D)


def cosine_qk(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Swin V2's cosine attention as exact attention with ``scale=1``: q and k (B*nW, H, N, D)
    L2-normalised over D, q times the per-head ``exp(clamp(logit_scale, max=log 100))``
    (``logit_scale`` H elements, any shape). Returns the new q and k (B*nW, H, N, D).

    Example:
        >>> q, k = cosine_qk(q, k, attn.logit_scale)
        >>> out = windowed_attention(q, k, v, bias, mask, 1.0)
    """
    scale = torch.clamp(logit_scale.reshape(-1, 1, 1), max=math.log(1.0 / 0.01)).exp()  # (H, 1, 1)
    return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1)


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    *,
    key_dim: int,
    val_dim: int,
    contiguous: bool = False,
) -> torch.Tensor:
    """``softmax(scale * q @ k^T + bias) @ v`` through ``fastvit.flash_attention``, for heads
    whose q / k width may differ from v's (LeViT's ``attn_ratio``): the narrower side is
    zero-padded (zero columns add nothing to q.k; zero value columns are sliced off the output).

    Args:
        q: (B, H, N, Dk); k: (B, H, M, Dk); v: (B, H, M, Dv).
        bias: broadcastable to (B, H, N, M), e.g. (H, N, M); or None.
        scale: multiplies q.k.
        key_dim, val_dim: Dk and Dv, the module's own ints (so torch.fx traces no shape test).
        contiguous: copy q, k, v to a unit last-dim stride (transposed views of a conv layout);
            a padded tensor is a fresh contiguous one already.

    Returns:
        (B, H, N, Dv).
    """
    if key_dim < val_dim:
        q, k = F.pad(q, (0, val_dim - key_dim)), F.pad(k, (0, val_dim - key_dim))
    elif val_dim < key_dim:
        v = F.pad(v, (0, key_dim - val_dim))
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # no-ops on the padded ones
    out = self_attention(q, k, v, scale=scale, attn_mask=bias)
    return out if val_dim >= key_dim else out[..., :val_dim]


def per_head_biased_attention(
    qkv: torch.Tensor, num_heads: int, key_dim: int, val_dim: int, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """``biased_attention`` on a projection laid out per head as [q; k; v] (TinyViT's, LeViT's and
    EfficientFormer's ``qkv``): (B, N, H * (2 Dk + Dv)) -> (B, N, H * Dv), the heads merged.

    q, k and v are views of ``qkv`` (B, H, N, D), except where ``biased_attention`` pads them.

    Example:
        >>> out = attn.proj(per_head_biased_attention(attn.qkv(x), attn.num_heads, attn.key_dim,
        ...                                           attn.val_dim, attn.get_attention_biases(x.device), attn.scale))
    """
    q, k, v = qkv.unflatten(-1, (num_heads, -1)).split([key_dim, key_dim, val_dim], dim=3)  # (B, N, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D) views
    return merge_heads(biased_attention(q, k, v, bias, scale, key_dim=key_dim, val_dim=val_dim))
