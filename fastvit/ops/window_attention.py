"""``fastvit.window_attention``: attention within non-overlapping windows of the token grid (Swin).

Window attention (Liu et al. 2021, "Swin Transformer"; ViTDet's window blocks) limits each patch
token to the keys of its window x window block of the grid, so a query sees window^2 keys instead
of N: cost O(N * window^2), not O(N^2). Shifted windows (Swin's SW-MSA) roll the grid by -shift
first and keep the regions that the roll wrapped around apart, so information crosses window
borders from one block to the next. Like axial attention it is a different model from full
attention, not an approximation of it.

Built on the fused op ``fastvit.flash_attention``: the windows are gathered into the batch
dimension, (nW, B * H, window^2, D), one ``flash_attention`` call attends within all of them,
and the result is gathered back into (B, H, N, D). Each window's keys are its window^2 tokens plus
the P prefix tokens (M = window^2 + P; the prefix keys are copied per window, a small copy), so
memory is O(N) for the gathered q, k, v. The only mask is per window and broadcast over batch and
heads (the kernels read it through stride 0, never expanded): none when nothing needs masking, a
(nW, 1, 1, M) key-validity mask when the grid is padded, a (nW, 1, window^2, M) region mask when a
shift puts a seam inside a window (O(N * window^2) bools, as Swin stores). Nothing N x N exists.
Gradients flow through autograd of the gathers and of ``flash_attention``; every backend of
``flash_attention`` (triton, torch) serves this op.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastvit.ops._checks import (
    autocast_dtype,
    check_grid_self_attention,
    check_same_dtype,
    check_token_grid,
    check_unit_last_stride,
    stream_capturing,
)
from fastvit.ops._fx import fx_leaf
from fastvit.ops.flash_attention import flash_attention

__all__ = ["window_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def int_pair(name: str, value: object) -> tuple[int, int]:
    """``value`` as a (rows, cols) pair of ints: an int n means (n, n). TypeError naming ``name``.

    Example:
        >>> int_pair("window", 7), int_pair("window", (7, 5))  # ((7, 7), (7, 5))
    """
    pair = (value, value) if isinstance(value, int) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints (rows, cols), got {value!r}")
    return int(pair[0]), int(pair[1])


def check_window_and_shift(window: object, shift: object) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate ``window`` (>= 1) and ``shift`` (0 <= shift < window) per axis; return both as pairs.

    Example:
        >>> check_window_and_shift(7, 3)  # ((7, 7), (3, 3)); shift=7 raises ValueError
    """
    wh, ww = int_pair("window", window)
    if wh < 1 or ww < 1:
        raise ValueError(f"window must be >= 1 along both axes, got {window!r}")
    sh, sw = int_pair("shift", shift)
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift must lie in [0, window) along each axis: got shift {shift!r} for window ({wh}, {ww})")
    return (wh, ww), (sh, sw)


class WindowLayout(NamedTuple):
    """Where each token goes: the index tensors and the mask of one (grid, window, shift, P)."""

    num_windows: int  # nW: windows of the padded grid, row-major
    window_tokens: torch.Tensor  # (nW, wh * ww) int64: token index (in 0..N-1) of each window slot
    key_tokens: torch.Tensor  # (nW, wh * ww + P) int64: window_tokens, then the P prefix tokens
    slot_of_token: torch.Tensor  # (gh * gw,) int64: the slot (window * wh * ww + place) of each grid token
    mask: torch.Tensor | None  # None, (nW, 1, 1, M) or (nW, 1, wh * ww, M) bool: True = may attend


def window_layout(
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    num_prefix_tokens: int,
    device: torch.device,
) -> WindowLayout:
    """Gather indices and mask for window attention (O(N) int64 indices; the mask as described above).

    The grid is rolled by -shift, padded at the bottom and right to a multiple of the window and
    split into windows. A slot at rolled-and-padded position (pr, pc) holds grid token
    ((pr + sh) % gh, (pc + sw) % gw) when pr < gh and pc < gw; padding slots read the first grid
    token and are masked out as keys (their query outputs are never gathered back). The roll
    wraps the first sh rows to the bottom (rolled rows >= gh - sh) and the first sw columns to
    the right; a region is one combination of wrapped / not wrapped per axis (Swin's labels),
    and a query attends only to keys of its own region.

    Example:
        >>> layout = window_layout((5, 7), (3, 3), (1, 1), 1, torch.device("cpu"))
        >>> layout.num_windows, layout.key_tokens.shape, layout.mask.shape  # 6, (6, 10), (6, 1, 9, 10)
    """
    (gh, gw), (wh, ww) = grid, window
    sh, sw = shift[0] % gh, shift[1] % gw  # rolling by the grid size is no roll
    nh, nw = -(-gh // wh), -(-gw // ww)  # rows and columns of windows in the padded grid
    num_windows, per_window = nh * nw, wh * ww

    def positions(count: int, size: int) -> torch.Tensor:  # (count, size): window i, place j -> i * size + j
        return torch.arange(count, device=device)[:, None] * size + torch.arange(size, device=device)[None, :]

    # slot order (window row, window col, row in window, col in window), rolled-and-padded coordinates
    pr = positions(nh, wh)[:, None, :, None]  # (nh, 1, wh, 1)
    pc = positions(nw, ww)[None, :, None, :]  # (1, nw, 1, ww)
    valid = ((pr < gh) & (pc < gw)).reshape(num_windows, per_window)
    token = num_prefix_tokens + ((pr + sh) % gh) * gw + (pc + sw) % gw  # (nh, nw, wh, ww)
    window_tokens = torch.where(valid, token.reshape(num_windows, per_window), num_prefix_tokens)
    prefix = torch.arange(num_prefix_tokens, device=device).expand(num_windows, num_prefix_tokens)
    key_tokens = torch.cat([window_tokens, prefix], dim=1)

    rr = (torch.arange(gh, device=device) - sh) % gh  # rolled row of each grid row
    rc = (torch.arange(gw, device=device) - sw) % gw
    slot_of_token = (
        ((rr // wh)[:, None] * nw + (rc // ww)[None, :]) * per_window + (rr % wh)[:, None] * ww + (rc % ww)[None, :]
    ).flatten()

    # a seam (the border between wrapped and unwrapped rows, at rolled row gh - sh) needs the
    # region mask only where it cuts through a window rather than running along a window border
    seam_in_window = (sh > 0 and (gh - sh) % wh != 0) or (sw > 0 and (gw - sw) % ww != 0)
    padded = nh * wh != gh or nw * ww != gw
    prefix_keys = torch.ones(num_windows, num_prefix_tokens, dtype=torch.bool, device=device)
    if seam_in_window:
        region = ((pr >= gh - sh) & (sh > 0)).long() * 2 + ((pc >= gw - sw) & (sw > 0)).long()  # (nh, nw, wh, ww)
        region = region.reshape(num_windows, per_window)
        same_region = region[:, :, None] == region[:, None, :]  # (nW, queries, keys)
        # padding query rows attend to every valid key: never fully masked, and dropped anyway
        keep = valid[:, None, :] & (same_region | ~valid[:, :, None])
        keep = torch.cat([keep, prefix_keys[:, None, :].expand(-1, per_window, -1)], dim=2)
        mask = keep[:, None]  # (nW, 1, wh * ww, M)
    elif padded:
        mask = torch.cat([valid, prefix_keys], dim=1)[:, None, None, :]  # (nW, 1, 1, M)
    else:
        mask = None
    return WindowLayout(num_windows, window_tokens, key_tokens, slot_of_token, mask)


# Layouts of recent (grid, window, shift, P, device) keys: a model calls the op with a handful of
# them, and building one takes a dozen small kernels on a GPU. Oldest first; bounded.
_LAYOUT_CACHE: dict[tuple, WindowLayout] = {}
_LAYOUT_CACHE_SIZE = 32


def cached_window_layout(
    grid: tuple[int, int],
    window: tuple[int, int],
    shift: tuple[int, int],
    num_prefix_tokens: int,
    device: torch.device,
) -> WindowLayout:
    """``window_layout``, kept for reuse across calls (built afresh while torch.compile traces, so
    the graph holds the construction rather than a Python-side cache, and inside a CUDA graph
    capture, whose tensors hold their values only once the graph replays).

    Example:
        >>> cached_window_layout((5, 7), (3, 3), (1, 1), 1, torch.device("cpu")).num_windows  # 6
    """
    if torch.compiler.is_compiling() or stream_capturing(device):
        return window_layout(grid, window, shift, num_prefix_tokens, device)
    key = (grid, window, shift, num_prefix_tokens, device)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        # normal tensors even under inference_mode: index_select saves its index for backward
        with torch.inference_mode(False):
            layout = window_layout(grid, window, shift, num_prefix_tokens, device)
        if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.pop(next(iter(_LAYOUT_CACHE)))
        _LAYOUT_CACHE[key] = layout
    return layout


def _validate(q, k, v, grid, window, shift, num_prefix_tokens, scale):
    check_grid_self_attention(q, k, v, scale, _DTYPES)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_unit_last_stride(name, t)
    gh, gw, prefix = check_token_grid(grid, num_prefix_tokens, q.shape[2])
    window, shift = check_window_and_shift(window, shift)
    return (gh, gw), window, shift, prefix


@fx_leaf  # one node in torch.fx graphs
def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window: int | tuple[int, int],
    *,
    shift: int | tuple[int, int] = 0,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """(Shifted) window self-attention over a gh x gw token grid with optional prefix tokens.

    With N = P + gh * gw tokens (the P prefix tokens first, then the grid in row-major order):

    - the grid is rolled by -shift (Swin's ``torch.roll(x, (-sh, -sw))``), padded at the bottom
      and right to a multiple of the window, and split into non-overlapping wh x ww windows;
    - a grid token attends to the grid tokens of its window (never to padding), plus the P
      prefix tokens; with a shift, only to the window's tokens of its own region, the regions
      being the parts of the rolled grid that were / were not wrapped around along each axis
      (Swin's SW-MSA mask), so tokens from opposite edges of the image stay apart;
    - a prefix token (cls, distillation, register) attends to all N tokens (global);
    - outputs go back to each token's own place (the roll is undone).

    Cost O(N * (wh * ww + P)) time. Extra memory: the gathered windows, O(N * (1 + P / (wh * ww)))
    (the P prefix keys are copied into every window); with a shift whose seam cuts through windows,
    also a bool mask of about N * (wh * ww + P) elements (O(N * window^2), as Swin stores one).
    Never an N x N matrix.

    Args:
        q, k, v: (B, H, N, D) queries, keys, values; any strides with a unit stride in D (views
            of a packed qkv work). fp16, bf16, fp32, or float64 (the ``torch`` route).
        grid: (gh, gw), the token grid.
        window: the window size, an int or (wh, ww), >= 1; need not divide the grid (padded).
        shift: Swin's shift, an int or (sh, sw) with 0 <= shift < window; 0: plain windows.
        num_prefix_tokens: P, the tokens before the grid.
        scale: multiplies q.k before each softmax; default ``1 / sqrt(D)``.

    Returns:
        (B, H, N, D) in q's dtype (the autocast dtype under autocast, like SDPA), laid out as
        (B, N, H, D) in memory like ``flash_attention``'s output.

    Raises:
        TypeError / ValueError naming the argument: N != P + gh * gw, window < 1, shift outside
        [0, window), a non-4-D or mismatched q/k/v, a dtype or device mismatch.

    Example:
        >>> q, k, v = torch.randn(3, 2, 3, 56 * 56, 32).unbind(0)  # Swin-T stage 1, 224 x 224
        >>> out = fastvit.window_attention(q, k, v, (56, 56), 7)              # W-MSA
        >>> out = fastvit.window_attention(q, k, v, (56, 56), 7, shift=3)     # SW-MSA
        >>> q, k, v = torch.randn(3, 2, 12, 1 + 14 * 14, 64).unbind(0)       # ViT-B/16 + cls
        >>> out = fastvit.window_attention(q, k, v, (14, 14), 4, num_prefix_tokens=1)  # padded to 16 x 16
    """
    grid, window, shift, prefix = _validate(q, k, v, grid, window, shift, num_prefix_tokens, scale)
    cast_to = autocast_dtype(q.device)
    if cast_to is not None:
        q, k, v = (t.to(cast_to) if t.dtype != torch.float64 else t for t in (q, k, v))
    check_same_dtype(q=q, k=k, v=v)
    batch, heads, _, dim = q.shape
    layout = cached_window_layout(grid, window, shift, prefix, q.device)
    num_windows, per_window = layout.window_tokens.shape

    def gather_windows(t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (nW, B * H, slots, D): windows in the batch dim, batch * heads as heads."""
        slots = tokens.shape[1]
        picked = t.index_select(2, tokens.flatten())  # (B, H, nW * slots, D), a fresh tensor
        return picked.reshape(batch, heads, num_windows, slots, dim).permute(2, 0, 1, 3, 4).flatten(1, 2)

    out = flash_attention(
        gather_windows(q, layout.window_tokens),
        gather_windows(k, layout.key_tokens),
        gather_windows(v, layout.key_tokens),
        scale=scale,
        attn_mask=layout.mask,
    )  # (nW, B * H, wh * ww, D)
    out_slots = out.transpose(1, 2).reshape(num_windows * per_window, batch, heads, dim)
    out_grid = out_slots.index_select(0, layout.slot_of_token).transpose(0, 1)  # (B, gh * gw, H, D)
    parts = [out_grid]
    if prefix:
        out_prefix = flash_attention(q[:, :, :prefix], k, v, scale=scale)  # (B, H, P, D): global
        parts.insert(0, out_prefix.transpose(1, 2))
    return torch.cat(parts, dim=1).transpose(1, 2)  # (B, H, N, D), (B, N, H, D) in memory
