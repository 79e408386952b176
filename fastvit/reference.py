"""Plain-PyTorch math of every fastvit op: the test oracle.

Each function computes in the dtype of its inputs, with nothing fused and nothing clever, so tests
run it twice: on float64 copies (the oracle) and in the input dtype (the error budget of
design.md's tolerance rule). Autograd works through every function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "attention_varlen",
    "axial_attention",
    "layernorm_mlp",
    "patch_embed",
    "rotary_qk",
    "window_attention",
    "window_attention_mask",
]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialised softmax attention, with an optional mask and decomposed relative position.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H, M, D) keys.
        v: (B, H, M, D) values.
        scale: multiplies q.k; default 1/sqrt(D).
        causal: query i sees keys j <= i (top-left aligned, like SDPA's ``is_causal``).
        attn_mask: broadcastable to (B, H, N, M): bool (True = may attend) or floating (added to
            ``scale * q.k``; cast to q's dtype, as SDPA requires).
        rel_pos: (rel_h (B|1, H|1, N, kh), rel_w (B|1, H|1, N, kw)) with M = kh * kw: the bias
            ``rel_h[..., i, j // kw] + rel_w[..., i, j % kw]`` (SAM / ViTDet), cast to q's dtype.

    Returns:
        out (B, H, N, D) and lse (B, H, N), the natural-log logsumexp over keys of the biased
        scores. Fully masked query rows give out = 0 and lse = -inf (and zero gradients).
    """
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if rel_pos is not None:
        rel_h, rel_w = (t.to(q.dtype) for t in rel_pos)
        s = s + (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    if attn_mask is not None:
        is_bool = attn_mask.dtype == torch.bool
        s = s.masked_fill(~attn_mask, float("-inf")) if is_bool else s + attn_mask.to(q.dtype)
    if causal:
        keep = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    dead = torch.isneginf(s).all(-1, keepdim=True)  # fully masked rows: zeros, not NaN
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(p, v), lse


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    pos_embed: torch.Tensor | None = None,
    prefix_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv2d(stride = kernel = p) + flatten + transpose + prefix concat + pos_embed add.

    Args:
        x: (B, C, H, W) images, H and W multiples of p.
        weight: (D, C, p, p) Conv2d weight.
        bias: (D,) or None.
        pos_embed: (1, P+N, D) added to all tokens, or (1, N, D) added to the patch tokens only.
        prefix_tokens: (1, P, D) cls / distillation / register tokens, prepended in that order.

    Returns:
        (B, P+N, D) tokens, N = (H/p)*(W/p).
    """
    p = weight.shape[-1]
    tokens = F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)  # NCHW -> NLC
    n = tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == n:
        tokens = tokens + pos_embed  # timm's no_embed_class: patches only
        pos_embed = None
    if prefix_tokens is not None and prefix_tokens.shape[1] > 0:
        tokens = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def layernorm_mlp(
    x: torch.Tensor,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    approximate: str | None = None,
    activation: str | None = None,
    norm: str = "layernorm",
    gated: bool | None = None,
    fc1_gate_weight: torch.Tensor | None = None,
    fc1_gate_bias: torch.Tensor | None = None,
    residual: bool = True,
    layer_scale: torch.Tensor | None = None,
    sample_scale: torch.Tensor | None = None,
    hidden_norm: str = "none",
    hidden_norm_weight: torch.Tensor | None = None,
    hidden_norm_bias: torch.Tensor | None = None,
    hidden_eps: float | None = None,
) -> torch.Tensor:
    """``x + sample_scale * layer_scale * fc2(act(fc1(norm(x))))`` over the last dim, written out.

    Args:
        x: (..., D) tokens.
        norm_weight, norm_bias: (D,) norm affine parameters (None: no affine; no bias for RMSNorm).
        fc1_weight: (Hd, D), fc1_bias: (Hd,) or None -- nn.Linear layout; gated with no
            fc1_gate_weight: (2 Hd, D) packed [gate; value] (timm SwiGLUPacked, HF Dinov2SwiGLUFFN).
        fc2_weight: (D, Hd), fc2_bias: (D,) or None.
        eps: norm epsilon.
        approximate: "none" (erf GELU) or "tanh"; the older spelling of activation="gelu" / "gelu_tanh".
        activation: "gelu", "gelu_tanh", "quick_gelu" (a * sigmoid(1.702 a)) or "silu".
        norm: "layernorm", "rms" (x / sqrt(mean(x^2) + eps) * norm_weight) or "none" (the MLP alone).
        gated: act(gate) * value; None means gated iff fc1_gate_weight is given.
        fc1_gate_weight: (Hd, D) gate projection (fc1 is then the value projection); fc1_gate_bias: (Hd,).
        residual: add x to the branch.
        layer_scale: (D,) LayerScale gamma, or None.
        sample_scale: (x.shape[0],) per-sample factor on the branch (drop-path), or None.
        hidden_norm: "none" or "layernorm": fc2(LN(act(...))) with hidden_norm_weight / hidden_norm_bias
            (Hd,) or None and hidden_eps (None: eps) -- timm's scale_mlp.

    Returns:
        Tensor of x's shape.
    """
    if approximate is not None:
        activation = {"none": "gelu", "tanh": "gelu_tanh"}[approximate]
    activation = activation or "gelu"
    gated = fc1_gate_weight is not None if gated is None else gated
    if norm == "none":  # the MLP alone (a post-norm block's)
        h = x
    elif norm == "rms":
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = h * norm_weight if norm_weight is not None else h
    else:
        h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)

    def act(a: torch.Tensor) -> torch.Tensor:
        if activation == "quick_gelu":
            return a * torch.sigmoid(1.702 * a)
        if activation == "silu":
            return a * torch.sigmoid(a)
        return F.gelu(a, approximate="tanh" if activation == "gelu_tanh" else "none")

    a = F.linear(h, fc1_weight, fc1_bias)
    if not gated:
        h = act(a)
    elif fc1_gate_weight is not None:
        h = act(F.linear(h, fc1_gate_weight, fc1_gate_bias)) * a
    else:
        gate, value = a.chunk(2, dim=-1)
        h = act(gate) * value
    if hidden_norm == "layernorm":  # written out: mean and biased variance over the hidden columns
        centred = h - h.mean(-1, keepdim=True)
        h = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + (eps if hidden_eps is None else hidden_eps))
        h = h * hidden_norm_weight if hidden_norm_weight is not None else h
        h = h + hidden_norm_bias if hidden_norm_bias is not None else h
    h = F.linear(h, fc2_weight, fc2_bias)
    if layer_scale is not None:
        h = h * layer_scale
    if sample_scale is not None:
        h = h * sample_scale.reshape((-1,) + (1,) * (x.dim() - 1))
    return x + h if residual else h


def axial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Axial attention (summed form) as explicit masked attention over all N tokens: the definition.

    N = P + h*w tokens, P prefix tokens first, then the h x w grid row-major. A grid token's output
    is softmax attention over (its row + the prefix) plus softmax attention over (its column + the
    prefix); a prefix token's output is softmax attention over all N tokens.

    Args:
        q, k, v: (B, H, N, D).
        grid: (h, w).
        num_prefix_tokens: P.
        scale: multiplies q.k; default 1/sqrt(D).

    Returns:
        (B, H, N, D).
    """
    n, d = q.shape[-2], q.shape[-1]
    w = grid[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    idx = torch.arange(n, device=q.device)
    prefix = idx < num_prefix_tokens
    row = torch.div(idx - num_prefix_tokens, w, rounding_mode="floor")
    col = (idx - num_prefix_tokens) % w
    both_grid = ~prefix[:, None] & ~prefix[None, :]
    same_row = prefix[None, :] | (both_grid & (row[:, None] == row[None, :]))  # (N queries, N keys)
    same_col = prefix[None, :] | (both_grid & (col[:, None] == col[None, :]))
    s = torch.matmul(q, k.transpose(-2, -1)) * scale

    def masked(keep: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1), v)

    full = torch.matmul(torch.softmax(s, dim=-1), v)
    return torch.where(prefix[:, None], full, masked(same_row) + masked(same_col))


def window_attention_mask(
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    num_prefix_tokens: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The (N, N) bool mask of (shifted) window attention, True = query i may attend to key j.

    N = P + gh*gw, P prefix tokens first, then the grid row-major. The grid is rolled by -shift
    (``torch.roll``), padded at the bottom and right to a multiple of the window and cut into
    windows; grid tokens attend within their window and their region, the region of the token at
    (r, c) being whether the roll wrapped it around, (r < sh, c < sw) (Swin's SW-MSA mask).
    Prefix tokens attend to and are attended by every token.

    Args:
        grid: (gh, gw).
        window: (wh, ww).
        shift: (sh, sw), each taken modulo the grid side like ``torch.roll``.
        num_prefix_tokens: P.
        device: where the mask lives.

    Returns:
        (N, N) bool.
    """
    (gh, gw), (wh, ww), prefix = grid, window, num_prefix_tokens
    sh, sw = shift[0] % gh, shift[1] % gw
    ids = torch.arange(gh * gw, device=device).reshape(gh, gw)
    rolled = torch.roll(ids, shifts=(-sh, -sw), dims=(0, 1))
    pad_h, pad_w = -gh % wh, -gw % ww
    placed = F.pad(rolled, (0, pad_w, 0, pad_h), value=-1)  # token id at each padded position; -1: padding
    rows = torch.arange(gh + pad_h, device=device) // wh
    cols = torch.arange(gw + pad_w, device=device) // ww
    window_at = rows[:, None] * ((gw + pad_w) // ww) + cols[None, :]
    real = placed >= 0
    window_of = torch.empty(gh * gw, dtype=torch.long, device=device)
    window_of[placed[real]] = window_at[real]
    r, c = ids.flatten() // gw, ids.flatten() % gw
    region_of = (r < sh).long() * 2 + (c < sw).long()
    grid_keep = (window_of[:, None] == window_of[None, :]) & (region_of[:, None] == region_of[None, :])
    keep = torch.ones(prefix + gh * gw, prefix + gh * gw, dtype=torch.bool, device=device)
    keep[prefix:, prefix:] = grid_keep
    return keep


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    *,
    shift: tuple[int, int] = (0, 0),
    num_prefix_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """(Shifted) window attention as masked attention over all N tokens: the definition.

    Args:
        q, k, v: (B, H, N, D), N = P + gh*gw.
        grid, window, shift, num_prefix_tokens: as in ``window_attention_mask`` (pairs here).
        scale: multiplies q.k; default 1/sqrt(D).

    Returns:
        (B, H, N, D).
    """
    keep = window_attention_mask(grid, window, shift, num_prefix_tokens, q.device)
    return attention(q, k, v, scale=scale, attn_mask=keep)[0]


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention: ``attention`` on each sequence on its own.

    Args:
        q: (T, H, D) queries of S sequences packed end to end.
        k, v: (Tk, H, D) keys and values, packed the same way.
        cu_seqlens_q: (S+1,) integer offsets of the query sequences (0, ..., T).
        cu_seqlens_k: (S+1,) offsets of the key sequences; None: ``cu_seqlens_q``.
        scale: multiplies q.k; default 1/sqrt(D).
        causal: top-left aligned within each sequence.

    Returns:
        out (T, H, D) and lse (H, T). A sequence with queries but no keys gives zeros and -inf.
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for s in range(len(bounds_q) - 1):
        q_s = q[bounds_q[s] : bounds_q[s + 1]].transpose(0, 1)[None]  # (1, H, Lq, D)
        k_s = k[bounds_k[s] : bounds_k[s + 1]].transpose(0, 1)[None]
        v_s = v[bounds_k[s] : bounds_k[s + 1]].transpose(0, 1)[None]
        out, lse = attention(q_s, k_s, v_s, scale=scale, causal=causal)  # no keys: zeros, -inf
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    rope: torch.Tensor,
    *,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's rotary embedding of q and k, as ``EvaAttention`` applies it: ``apply_rot_embed_cat``
    on the rows past the prefix (``x * cos + rot(x) * sin`` in the promoted dtype of x and rope,
    cast back to x's dtype), then ``torch.cat`` of the unrotated prefix rows.

    Args:
        q, k: (B, H, N, D).
        rope: [sin, cos] along the last dim, broadcastable to (B, H, N - P, 2D).
        num_prefix_tokens: P.
        rotate_half: lanes i and i + D/2 pair up (``rope_rotate_half``), else 2i and 2i + 1 (``rot``).

    Returns:
        (q_rot, k_rot), (B, H, N, D) each in its input's dtype.
    """
    sin, cos = rope.chunk(2, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        if rotate_half:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat([-x2, x1], dim=-1)
        return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)

    def one(x: torch.Tensor) -> torch.Tensor:
        body = x[:, :, num_prefix_tokens:]
        return torch.cat([x[:, :, :num_prefix_tokens], (body * cos + rot(body) * sin).to(x.dtype)], dim=2)

    return one(q), one(k)
