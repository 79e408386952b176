"""Fused subclasses of timm's relative-position-bias attentions, swapped onto a model by ``fastvit.patch``.

- ``timm.models.beit.Attention`` (BEiT, BEiTv2): the ``relative_position_bias_table`` gathered
  through ``relative_position_index`` into a (1, H, N, N) bias (cls row and column included), plus
  the model's shared ``rel_pos_bias`` when it has one.
- ``timm.models.vision_transformer_relpos.RelPosAttention`` (``vit_relpos_*``, ``vit_srelpos_*``):
  its ``rel_pos`` module's ``get_bias()`` (``RelPosBias``'s table, ``RelPosMlp``'s log-coordinate
  MLP, ``RelPosBiasTf``'s einsum lookup), or the model's ``shared_rel_pos`` bias.
- ``timm.models.tiny_vit.Attention`` (TinyViT's window attention; the block partitions and pads)
  and LeViT's ``Attention`` / ``AttentionDownsample`` (linear and ``use_conv`` layouts; the
  downsampling one is cross-attention from a subsampled grid, M > N): ``get_attention_biases()``,
  the (H, N, M) gather of ``attention_biases`` by offset. LeViT's values are wider than its keys
  (``attn_ratio`` 2 or 4) while the op takes one head dim, so q and k are zero-padded to the value
  width (q.k unchanged, ``scale`` passed explicitly): a copy of q and k, and a QK^T 2-4x wider.

In each case the bias goes to ``fastvit.flash_attention`` as ``attn_mask``: the kernels read it
through its strides (stride 0 over the batch), and because it is computed from the model's own
Parameters at call time, the table (or MLP) learns through the op's mask gradient. q, k and v are
views into the qkv output (no copies), except LeViT's padded q and k (and its conv layout's
transposed views, copied to a unit stride). See ``fastvit.nn.fused`` for how the swap works.

TinyViT's ``TinyVitBlock`` gets its MLP half, ``x + drop_path2(mlp(x))`` with the LayerNorm inside
timm's ``NormMlp``, as one ``fastvit.layernorm_mlp`` call (its window partition, padding and
depthwise local conv run as timm's). BEiT's ``Block`` also gets its MLP half, ``x +
drop_path2(gamma_2 * mlp(norm2(x)))`` with timm's ``Mlp`` or ``SwiGLU``, as one
``fastvit.layernorm_mlp`` call (shared with Eva: ``fastvit.nn.timm_mlp``).
Importing this module imports timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Block as BeitBlock
from timm.models.levit import Attention as LevitAttention
from timm.models.levit import AttentionDownsample as LevitAttentionDownsample
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import TinyVitBlock
from timm.models.vision_transformer_relpos import RelPosAttention

from fastvit.nn.attention import (
    biased_attention,
    biased_qkv,
    merge_heads,
    per_head_biased_attention,
    self_attention,
    split_packed_qkv,
    timm_scale,
)
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import MLP_BYPASSED, SWIGLU_BYPASSED, FusedGammaMlpHalf

__all__ = [
    "FusedBeitAttention",
    "FusedBeitBlock",
    "FusedBeitSwiGLUBlock",
    "FusedLevitAttention",
    "FusedLevitAttentionDownsample",
    "FusedRelPosAttention",
    "FusedTinyVitAttention",
    "FusedTinyVitBlock",
]


class FusedBeitAttention(FusedModule, BeitAttention):
    """timm BEiT ``Attention`` running ``fastvit.flash_attention`` with its relative-position bias.

    Same signature, ``forward(x, shared_rel_pos_bias=None)``. The qkv projection is timm's (the
    ``q_bias`` / zero ``k_bias`` / ``v_bias`` concatenated, added after the matmul under
    ``qkv_bias_separate``); the bias is ``_get_rel_pos_bias()`` (1, H, N, N) plus
    ``shared_rel_pos_bias`` where given, as timm adds them. Calls in training with attention
    dropout > 0 run timm's forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        if self._fastvit_unfused("timm BEiT Attention"):
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        qkv = biased_qkv(x, self.qkv, self.q_bias, self.k_bias, self.v_bias, self.qkv_bias_separate)
        head_dim = self.qkv.out_features // (3 * self.num_heads)
        q, k, v = split_packed_qkv(qkv, self.num_heads, head_dim)  # (B, H, N, D) views
        bias = shared_rel_pos_bias
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias()  # (1, H, N, N), from the table
            if shared_rel_pos_bias is not None:
                bias = bias + shared_rel_pos_bias
        x = merge_heads(self_attention(q, k, v, scale=timm_scale(self), attn_mask=bias))
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        window = None if self.window_size is None else tuple(self.window_size)
        return f"heads={self.num_heads}, rel_pos_window={window}, fastvit={self.fastvit_op}"


class FusedRelPosAttention(FusedModule, RelPosAttention):
    """timm ``RelPosAttention`` (``VisionTransformerRelPos``) running ``fastvit.flash_attention``
    with ``rel_pos.get_bias()`` (or ``shared_rel_pos``) as ``attn_mask``.

    Same signature, ``forward(x, shared_rel_pos=None)``, and timm's fused-path semantics: a block
    with its own ``rel_pos`` uses that bias (``VisionTransformerRelPos`` never gives it a shared
    one too), else ``shared_rel_pos``. ``rel_pos.get_bias()`` is called as timm calls it, so
    ``RelPosMlp``'s MLP (with its dropout in training) runs as a module. Calls in training with
    attention dropout > 0 run timm's forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, shared_rel_pos=shared_rel_pos)
        if self._fastvit_unfused("timm RelPosAttention"):
            return super().forward(x, shared_rel_pos=shared_rel_pos)
        q, k, v = split_packed_qkv(self.qkv(x), self.num_heads, self.head_dim)  # (B, H, N, D) views
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.rel_pos.get_bias() if self.rel_pos is not None else shared_rel_pos  # (1, H, N, N)
        x = merge_heads(self_attention(q, k, v, scale=timm_scale(self), attn_mask=bias))
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        rel_pos = type(self.rel_pos).__name__ if self.rel_pos is not None else "shared"
        return f"heads={self.num_heads}, head_dim={self.head_dim}, rel_pos={rel_pos}, fastvit={self.fastvit_op}"


class FusedTinyVitAttention(FusedModule, TinyVitAttention):
    """timm TinyViT ``Attention`` (one window of a ``TinyVitBlock``) running
    ``fastvit.flash_attention`` with ``get_attention_biases()`` (H, N, N) as ``attn_mask``.

    Same signature, ``forward(x)``, x (B*nW, N, C). The LayerNorm and the projections run as in
    timm; q, k, v are views into the per-head [q, k, v] layout of the qkv output. TinyViT's blocks
    build it with ``attn_ratio=1`` (v as wide as k); other widths are zero-padded
    (``biased_attention``).
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        bias = self.get_attention_biases(x.device)  # (H, N, N)
        out = per_head_biased_attention(self.qkv(self.norm(x)), self.num_heads, self.key_dim, self.val_dim, bias,
                                        timm_scale(self, self.key_dim))  # fmt: skip
        return self.proj(out)  # (B, N, H*Dv) -> (B, N, C)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, "
            f"resolution={tuple(self.resolution)}, fastvit={self.fastvit_op}"
        )


class FusedLevitAttention(FusedModule, LevitAttention):
    """timm LeViT ``Attention`` running ``fastvit.flash_attention`` with ``get_attention_biases()``
    (H, N, N) as ``attn_mask``; q and k zero-padded to the value width (``biased_attention``).

    Same signature, ``forward(x)``: (B, N, C) tokens, or (B, C, H, W) with ``use_conv``.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        bias = self.get_attention_biases(x.device)  # (H, N, N)
        if self.use_conv:  # (B, C, H, W): channels (heads, 2*Dk + Dv) by N = H*W
            qkv = self.qkv(x).flatten(2).unflatten(1, (self.num_heads, -1))  # (B, heads, 2*Dk + Dv, N)
            q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=2)
            q, k, v = q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)  # (B, heads, N, D)
            out = biased_attention(q, k, v, bias, self.scale, key_dim=self.key_dim, val_dim=self.val_dim,
                                   contiguous=True)  # fmt: skip
            x = out.transpose(-2, -1).reshape(x.shape[0], -1, x.shape[2], x.shape[3])  # (B, heads*Dv, H, W)
        else:  # (B, N, C) -> (B, N, heads*Dv)
            x = per_head_biased_attention(self.qkv(x), self.num_heads, self.key_dim, self.val_dim, bias, self.scale)
        return self.proj(x)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, conv={self.use_conv}, "
            f"fastvit={self.fastvit_op}"
        )


class FusedLevitAttentionDownsample(FusedModule, LevitAttentionDownsample):
    """timm LeViT ``AttentionDownsample``: cross-attention from the subsampled grid (N queries) to
    the full grid (M keys) running ``fastvit.flash_attention`` with ``get_attention_biases()``
    (H, N, M) as ``attn_mask``; q and k zero-padded to the value width (``biased_attention``).

    Same signature, ``forward(x)``: (B, M, C) tokens, or (B, C, H, W) with ``use_conv``.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if not self._fastvit_intact():
            return super().forward(x)
        bias = self.get_attention_biases(x.device)  # (H, N, M)
        dims = [self.key_dim, self.val_dim]
        if self.use_conv:  # (B, C, H, W)
            k, v = self.kv(x).flatten(2).unflatten(1, (self.num_heads, -1)).split(dims, dim=2)  # (B, heads, D, M)
            q = self.q(x).flatten(2).unflatten(1, (self.num_heads, self.key_dim))  # (B, heads, Dk, N)
            q, k, v = q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)  # (B, heads, N|M, D)
            out = biased_attention(q, k, v, bias, self.scale, key_dim=self.key_dim, val_dim=self.val_dim,
                                   contiguous=True)  # fmt: skip
            rows, cols = (x.shape[2] - 1) // self.stride + 1, (x.shape[3] - 1) // self.stride + 1
            x = out.transpose(-2, -1).reshape(x.shape[0], self.val_attn_dim, rows, cols)
        else:  # (B, M, C)
            k, v = self.kv(x).unflatten(-1, (self.num_heads, -1)).split(dims, dim=3)  # (B, M, heads, D)
            q = self.q(x).unflatten(-1, (self.num_heads, self.key_dim))  # (B, N, heads, Dk)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N|M, D) views
            out = biased_attention(q, k, v, bias, self.scale, key_dim=self.key_dim, val_dim=self.val_dim)
            x = merge_heads(out)  # (B, N, heads*Dv)
        return self.proj(x)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, key_dim={self.key_dim}, val_dim={self.val_dim}, stride={self.stride}, "
            f"conv={self.use_conv}, fastvit={self.fastvit_op}"
        )


class _BeitBlockForward(FusedGammaMlpHalf):
    """BEiT ``Block.forward``: the attention half as timm's, the MLP half fused."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        if self._fastvit_overridden():  # the whole forward: the override may be Block.forward itself
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        x_attn = self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        return self._fastvit_mlp_half(x)


class FusedBeitBlock(_BeitBlockForward, BeitBlock):
    """timm BEiT ``Block`` with a ``Mlp`` (GELU): its MLP half, with ``gamma_2`` and drop path, is
    one ``fastvit.layernorm_mlp`` call."""

    fastvit_bypassed = MLP_BYPASSED


class FusedBeitSwiGLUBlock(_BeitBlockForward, BeitBlock):
    """timm BEiT ``Block`` with a ``SwiGLU`` MLP (``swiglu_mlp=True``): one gated op call."""

    fastvit_bypassed = SWIGLU_BYPASSED


class FusedTinyVitBlock(FusedGammaMlpHalf, TinyVitBlock):
    """timm TinyViT ``TinyVitBlock`` whose MLP half, ``x + drop_path2(mlp(x))`` with timm's
    ``NormMlp`` (``fc2(act(fc1(norm(x))))``), is one ``fastvit.layernorm_mlp`` call (same signature,
    ``forward(x)``: x (B, H, W, C) -> (B, H, W, C)); its window attention (fused on its own) and the
    depthwise local conv run as timm's.

    Example:
        >>> model = timm.create_model("tiny_vit_5m_224")
        >>> fastvit.patch(model)  # stages.*.blocks.* -> FusedTinyVitBlock, their .attn -> FusedTinyVitAttention
    """

    fastvit_bypassed = ("mlp", "mlp.norm", "mlp.fc1", "mlp.act", "mlp.drop1", "mlp.fc2", "mlp.drop2", "drop_path2")

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module (the norm inside the MLP)."""
        return x + self.drop_path2(self.mlp(x))

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        return None

    def _fastvit_norm(self) -> torch.nn.Module:
        return self.mlp.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        # timm's attention half and local conv, as in TinyVitBlock.forward
        B, H, W, C = x.shape
        L = H * W
        shortcut = x
        window = self.window_size
        if window == H and window == W:
            x = self.attn(x.reshape(B, L, C)).view(B, H, W, C)
        else:
            pad_b = (self.window_size - H % self.window_size) % self.window_size
            pad_r = (self.window_size - W % self.window_size) % self.window_size
            padding = pad_b > 0 or pad_r > 0
            if padding:
                x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
            pH, pW = H + pad_b, W + pad_r
            nH, nW = pH // self.window_size, pW // self.window_size
            x = x.view(B, nH, self.window_size, nW, self.window_size, C).transpose(2, 3)
            x = self.attn(x.reshape(B * nH * nW, self.window_size * self.window_size, C))
            x = x.view(B, nH, nW, self.window_size, self.window_size, C).transpose(2, 3).reshape(B, pH, pW, C)
            if padding:
                x = x[:, :H, :W].contiguous()
        x = shortcut + self.drop_path1(x)
        x = self.local_conv(x.permute(0, 3, 1, 2))
        x = x.reshape(B, C, L).transpose(1, 2)  # (B, L, C), a view of the conv's output
        return self._fastvit_mlp_half(x).reshape(B, H, W, C)  # the op's output is (B, L, C)
