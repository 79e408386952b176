"""Fused subclasses of torchvision's Swin attention (``swin_t/s/b`` and ``swin_v2_t/s/b``) and of
the Swin V1 block's LayerNorm+MLP half, swapped onto a model by ``fastvit.patch``.

``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2`` keep torchvision's window math: the
padding to a multiple of the window, the cyclic shift (none where the window covers the padded
map), the window partition and its reverse, the relative-position bias (V1's table, V2's
continuous-position-bias MLP, ``16 * sigmoid``) and the shifted-window mask (-100 between
regions). Only the softmax attention changes: one ``fastvit.flash_attention`` call with the bias
(plus the mask) as ``attn_mask``, so the bias table (or the CPB MLP) learns through the op's mask
gradient. V2's cosine attention is exact attention on normalised q pre-scaled by the per-head
``exp(clamp(logit_scale, max=log 100))`` and normalised k, with ``scale=1``.

Layout: windows are heads. The windows of one image are laid out as (B, N, nW, C) (N = tokens per
window, nW = windows per image) and q, k, v are projected there, so (B, N, nW, H, D) views as
(B, nW*H, N, D) without copies and the bias, which depends on the window (the shift mask) and the
head but not on the image, is one (1, nW*H, N, N) tensor read through its strides for every image
(torchvision materialises the (B*nW, H, N, N) scores); its gradient is summed over B only.

``SwinTransformerBlock`` (V1, pre-norm) runs ``x + stochastic_depth(mlp(norm2(x)))`` as one
``fastvit.layernorm_mlp`` call, the row-wise stochastic depth drawn as torchvision draws it and
passed as ``sample_scale``. V2's block is post-norm (``x + stochastic_depth(norm2(mlp(x)))``) and
stays torchvision's; its ``mlp`` alone (torchvision's ``MLP``: Linear, GELU, Dropout, Linear,
Dropout) is one ``fastvit.layernorm_mlp(..., norm="none", residual=False)`` call (``FusedMLPAlone``).
See ``fastvit.nn.fused`` for how the swap
works and ``fastvit/patching/torchvision.py`` for what is checked first. Importing this module
imports torchvision.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformerBlock,
    shifted_window_attention,
)
from torchvision.ops.misc import MLP
from torchvision.ops.stochastic_depth import StochasticDepth

import fastvit
from fastvit.nn.attention import self_attention
from fastvit.nn.fused import FusedModule, dropout_active, mlp_dropout_fallback, warn_fallback
from fastvit.ops._fx import method_leaf

__all__ = [
    "FusedMLPAlone",
    "FusedShiftedWindowAttention",
    "FusedShiftedWindowAttentionV2",
    "FusedSwinTransformerBlock",
    "row_keep",
    "shifted_window_flash_attention",
]


def _shift_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """torchvision's shifted-window mask: (nW, N, N), 0 within a region and -100 across regions."""
    mask = like.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    num_windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def shifted_window_flash_attention(
    input: torch.Tensor,
    qkv_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    relative_position_bias: torch.Tensor,
    window_size: list[int],
    num_heads: int,
    shift_size: list[int],
    qkv_bias: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` without dropout, its attention one
    ``fastvit.flash_attention`` call. One ``torch.fx`` node (``torch.fx.wrap``, like torchvision's);
    TorchScript (a scripted FX graph) compiles torchvision's function instead.

    Args:
        input: (B, H, W, C), channels last.
        qkv_weight: (3C, C), rows [q; k; v], each head-major; ``qkv_bias`` (3C,) or None.
        proj_weight: (C, C); ``proj_bias`` (C,) or None.
        relative_position_bias: (1, heads, N, N), N = window_size[0] * window_size[1].
        window_size: (wh, ww).
        num_heads: heads.
        shift_size: (sh, sw); a dim whose window covers the padded map is not shifted.
        logit_scale: V2's (heads, 1, 1) cosine-attention log scale (the k bias is then unused, as
            torchvision zeroes it); None: V1's scaled dot product.

    Returns:
        (B, H, W, C).
    """
    if torch.jit.is_scripting():  # a scripted FX graph of a patched model: torchvision's math
        return shifted_window_attention(
            input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads, shift_size,
            qkv_bias=qkv_bias, proj_bias=proj_bias, logit_scale=logit_scale, training=False,
        )  # fmt: skip
    B, H, W, C = input.shape
    head_dim = C // num_heads
    # pad feature maps to multiples of window size
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape

    shift_size = shift_size.copy()
    # If window size is larger than feature size, there is no need to shift window
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    shifted = sum(shift_size) > 0
    if shifted:  # cyclic shift
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))

    # partition windows, windows as heads: (B, nH, wh, nW_w, ww, C) -> (B, wh, ww, nH, nW_w, C) = (B, N, nW, C)
    rows, cols = pad_H // window_size[0], pad_W // window_size[1]
    num_windows, tokens = rows * cols, window_size[0] * window_size[1]
    x = x.view(B, rows, window_size[0], cols, window_size[1], C)
    x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, tokens, num_windows, C)

    w_q, w_k, w_v = qkv_weight.chunk(3)
    b_q, b_k, b_v = (None, None, None) if qkv_bias is None else qkv_bias.chunk(3)
    if logit_scale is not None:
        b_k = None  # torchvision zeroes the k bias of cosine attention
    # (B, N, nW, C) = (B, N, nW, H, D) -> (B, nW*H, N, D), a view
    q, k, v = (
        F.linear(x, weight, bias).view(B, tokens, num_windows * num_heads, head_dim).transpose(1, 2)
        for weight, bias in ((w_q, b_q), (w_k, b_k), (w_v, b_v))
    )
    scale = None  # 1/sqrt(D), as torchvision's q * D**-0.5
    if logit_scale is not None:  # cosine attention: exact attention on normalised q (pre-scaled) and k
        per_head = torch.clamp(logit_scale, max=math.log(100.0)).exp()  # (H, 1, 1)
        q = (F.normalize(q.unflatten(1, (num_windows, num_heads)), dim=-1) * per_head).flatten(1, 2)
        k = F.normalize(k, dim=-1)
        scale = 1.0

    bias = relative_position_bias.reshape(num_heads, tokens, tokens)  # (1, H, N, N) -> (H, N, N)
    if shifted:
        bias = bias + _shift_mask(pad_H, pad_W, window_size, shift_size, x).unsqueeze(1)  # (nW, H, N, N)
    else:
        bias = bias.expand(num_windows, num_heads, tokens, tokens)
    bias = bias.reshape(1, num_windows * num_heads, tokens, tokens)
    out = self_attention(q, k, v, scale=scale, attn_mask=bias)  # (B, nW*H, N, D)

    x = out.transpose(1, 2).reshape(B, tokens, num_windows, C)
    x = F.linear(x, proj_weight, proj_bias)
    # reverse windows: (B, wh, ww, nH, nW_w, C) -> (B, nH, wh, nW_w, ww, C)
    x = x.view(B, window_size[0], window_size[1], rows, cols, C)
    x = x.permute(0, 3, 1, 4, 2, 5).reshape(B, pad_H, pad_W, C)
    if shifted:  # reverse cyclic shift
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()  # unpad features


torch.fx.wrap("shifted_window_flash_attention")  # one node, as torchvision's shifted_window_attention


def _covered(module: ShiftedWindowAttention, kind: str) -> bool:
    """False (warned once) where dropout is active: the fused call has none."""
    active = [
        f"{name} p={p}"
        for name, p in (("attention_dropout", module.attention_dropout), ("dropout", module.dropout))
        if dropout_active(p, module.training)
    ]
    if active:
        warn_fallback(
            f"patched-attention-dropout:{kind}:{', '.join(active)}",
            f"fastvit: a patched torchvision {kind} has {' and '.join(active)} and is in training mode; "
            "fastvit.flash_attention has no dropout, so these calls run torchvision's forward "
            "(model.eval() or p=0 runs the fused op)",
        )
    return not active


class FusedShiftedWindowAttention(FusedModule, ShiftedWindowAttention):
    """torchvision ``ShiftedWindowAttention`` (Swin V1, W-MSA and SW-MSA) whose window attention is
    one ``fastvit.flash_attention`` call with the relative-position bias and the shift mask as
    ``attn_mask``. Same input and output, (B, H, W, C); dropout in training runs torchvision's
    forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    # fastvit_bypassed: none. qkv and proj are read by weight, never called, as in torchvision's forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact() or not _covered(self, "ShiftedWindowAttention"):
            return super().forward(x)
        return shifted_window_flash_attention(
            x,
            self.qkv.weight,
            self.proj.weight,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            self.shift_size,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.proj.in_features}, heads={self.num_heads}, window={list(self.window_size)}, "
            f"shift={list(self.shift_size)}, fastvit={self.fastvit_op}"
        )


class FusedShiftedWindowAttentionV2(FusedModule, ShiftedWindowAttentionV2):
    """torchvision ``ShiftedWindowAttentionV2`` (Swin V2): cosine attention as one
    ``fastvit.flash_attention`` call on normalised q times the per-head logit scale and normalised
    k (``scale=1``), with the continuous position bias (``16 * sigmoid(cpb_mlp(...))``) and the
    shift mask as ``attn_mask``. Dropout in training runs torchvision's forward."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    # fastvit_bypassed: none (qkv and proj read by weight, as torchvision does; cpb_mlp is called)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact() or not _covered(self, "ShiftedWindowAttentionV2"):
            return super().forward(x)
        return shifted_window_flash_attention(
            x,
            self.qkv.weight,
            self.proj.weight,
            self.get_relative_position_bias(),
            self.window_size,
            self.num_heads,
            self.shift_size,
            qkv_bias=self.qkv.bias,
            proj_bias=self.proj.bias,
            logit_scale=self.logit_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.proj.in_features}, heads={self.num_heads}, window={list(self.window_size)}, "
            f"shift={list(self.shift_size)}, cosine, fastvit={self.fastvit_op}"
        )


def row_keep(drop: StochasticDepth, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """torchvision's ``stochastic_depth(branch, p, "row")`` factor for a branch on ``x``, drawn as
    torchvision draws it (the same RNG calls, in the branch's dtype: the autocast dtype under
    autocast, promoted with ``scale``'s where the branch is ``scale * mlp(...)``), flattened to the
    per-sample (B,) ``sample_scale``; None where it is the identity."""
    if not drop.training or drop.p == 0.0:
        return None
    survival = 1.0 - drop.p
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if scale is not None:
        dtype = torch.promote_types(dtype, scale.dtype)
    noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return noise.flatten()


class FusedSwinTransformerBlock(FusedModule, SwinTransformerBlock):
    """torchvision ``SwinTransformerBlock`` (Swin V1, pre-norm) whose second half,
    ``x + stochastic_depth(mlp(norm2(x)))``, is one ``fastvit.layernorm_mlp`` call on the
    (B, H, W, C) map, the row-wise stochastic depth as its ``sample_scale``. The attention half
    runs as in torchvision (its ``attn`` is patched on its own); MLP dropout in training runs
    torchvision's modules."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("norm2", "mlp", "mlp.0", "mlp.1", "mlp.2", "mlp.3", "mlp.4", "stochastic_depth")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be SwinTransformerBlock.forward
            return super().forward(x)
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return self._fastvit_mlp_half(x)

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's second half, module by module."""
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))

    def _fastvit_mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """``x + stochastic_depth(mlp(norm2(x)))``: one ``fastvit.layernorm_mlp`` call, or torchvision's
        modules."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_half(x)
        traced = method_leaf(self, "_fastvit_mlp_half", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_half(x)
        fc1, act, drop1, fc2, drop2 = self.mlp  # torchvision's MLP: Linear, GELU, Dropout, Linear, Dropout
        if mlp_dropout_fallback("torchvision", "SwinTransformerBlock", drop1, drop2):
            return self._fastvit_original_half(x)
        norm = self.norm2
        return fastvit.layernorm_mlp(
            x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
            eps=norm.eps, approximate=act.approximate, sample_scale=row_keep(self.stochastic_depth, x),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dim={self.norm2.normalized_shape[0]}, eps={self.norm2.eps}, fastvit={self.fastvit_op}"


class FusedMLPAlone(FusedModule, MLP):
    """torchvision ``MLP`` (Linear, GELU, Dropout, Linear, Dropout) whose forward is one
    ``fastvit.layernorm_mlp`` call with ``norm="none"`` and ``residual=False``: the MLP of Swin V2's
    post-norm block, ``x + stochastic_depth(norm2(mlp(x)))``, whose norm, stochastic depth and
    residual add stay torchvision's. Same signature, ``forward(input)``: (..., C) -> (..., C). MLP
    dropout in training, or a hook on (or a replacement of) a layer, run torchvision's layers.

    Example:
        >>> model = torchvision.models.swin_v2_t()
        >>> fastvit.patch(model)  # features.*.*.mlp -> FusedMLPAlone
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("0", "1", "2", "3", "4")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(input)
        if self._fastvit_overridden():  # the override may be MLP's (Sequential's) forward itself
            return super().forward(input)
        return self._fastvit_mlp(input)

    def _fastvit_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C): the MLP, fused (torchvision's layers where the op does not cover the call)."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        traced = method_leaf(self, "_fastvit_mlp", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_forward(x)
        fc1, act, drop1, fc2, drop2 = self
        if mlp_dropout_fallback("torchvision", "MLP", drop1, drop2):
            return self._fastvit_original_forward(x)
        return fastvit.layernorm_mlp(x, None, None, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm="none",
                                     residual=False, approximate=act.approximate)  # fmt: skip

    def extra_repr(self) -> str:
        return f"fastvit={self.fastvit_op}, no norm (the block's post-norm runs after it)"
