"""Fused subclasses of the attentions of timm's MaxxVit family (``maxvit_*``, ``maxxvit_*``,
``coatnet_*``), swapped onto a model by ``fastvit.patch``.

``AttentionCl`` (channels-last: MaxViT's block and grid attention, CoAtNet's transformer stages)
and ``Attention2d`` (channels-first, 1x1-conv projections) attend over the tokens of each window,
grid cell or stage their block hands them, with the relative-position bias of their ``rel_pos``
module (``get_bias()``: (1, heads, N, N), learnable) or the block's ``shared_rel_pos``. The bias
goes to ``fastvit.flash_attention`` as its float ``attn_mask``, which learns through the op's mask
gradient; the partitions, projections and the bias tables stay as in timm. ``AttentionCl``'s q, k
and v are views of the qkv projection; ``Attention2d``'s (B, heads, D, N) channel-first q, k, v are
laid out token-major first (one copy each, as timm's own SDPA path makes).

CoAtNet's channels-first ``TransformerBlock2d`` also gets its MLP half,
``x + drop_path2(ls2(mlp(norm2(x))))`` with ``LayerNorm2d`` and a 1x1-conv ``ConvMlp``, as one
``fastvit.layernorm_mlp`` call over the (B, H, W, C) channels-last view of its map
(``FusedTransformerBlock2d``). Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.layers import LayerScale2d, RelPosBias, RelPosBiasTf, RelPosMlp
from timm.models.maxxvit import Attention2d, AttentionCl, TransformerBlock2d

import fastvit
from fastvit.nn.attention import timm_scale
from fastvit.nn.fused import FusedModule, global_module_hooks, hook_kinds, warn_fallback
from fastvit.nn.timm_mlp import FusedGammaMlpHalf, conv_mlp_arguments, drop_path_scale, mlp_dropout_falls_back

__all__ = ["FusedAttention2d", "FusedAttentionCl", "FusedTransformerBlock2d"]


# the bias modules' own forward (attn + get_bias()), as timm defines them
_REL_POS_FORWARDS = {cls: cls.forward for cls in (RelPosBias, RelPosBiasTf, RelPosMlp)}


def _rel_pos_runs_as_bias(attn: AttentionCl | Attention2d) -> bool:
    """Whether adding ``rel_pos.get_bias()`` computes what timm's forward does with ``rel_pos``. timm's
    SDPA path (``fused_attn``) calls ``get_bias()`` too; its eager path calls the module,
    ``rel_pos(attn)``, so there a hook on it, or its ``forward`` replaced (on the instance or on its
    class), must run: such calls run timm's forward (said once)."""
    rel_pos = attn.rel_pos
    if attn.fused_attn or rel_pos is None:
        return True
    cls = type(rel_pos)
    as_built = _REL_POS_FORWARDS.get(cls) is cls.forward and not hook_kinds(rel_pos) and not global_module_hooks()
    if not as_built:
        name = type(attn).fastvit_original().__name__
        warn_fallback(
            f"patched-rel-pos-called:{name}",
            f"fastvit: a patched {name} with fused_attn=False calls its rel_pos module (timm's eager path), "
            "which has a hook or a replaced forward; such calls run timm's forward",
        )
    return as_built


def _bias(attn: AttentionCl | Attention2d, shared_rel_pos: torch.Tensor | None) -> torch.Tensor | None:
    """The additive bias timm's forward adds to the scores: the module's own relative-position
    bias, else the block's shared one, else none."""
    if attn.rel_pos is not None:
        return attn.rel_pos.get_bias()
    return shared_rel_pos


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """(B, H, N, D) q, k, v -> (B, H, N, D), the bias as the op's float mask when there is one."""
    if bias is None:
        return fastvit.flash_attention(q, k, v, scale=scale)
    return fastvit.flash_attention(q, k, v, scale=scale, attn_mask=bias)


class _RelPosAttentionForward(FusedModule):
    """The forward both fused MaxxVit attentions share: ``forward(x, shared_rel_pos=None)``; the
    fallbacks (attention dropout, a called ``rel_pos`` that is not as built), then the class's
    ``_fastvit_fused(x, bias)`` with timm's additive bias (``_bias``)."""

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, shared_rel_pos=shared_rel_pos)
        if self._fastvit_unfused() or not _rel_pos_runs_as_bias(self):
            return super().forward(x, shared_rel_pos=shared_rel_pos)
        return self._fastvit_fused(x, _bias(self, shared_rel_pos))

    def _fastvit_fused(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The fused forward of one class: x and timm's bias in, timm's output layout out."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.dim_head}, fastvit={self.fastvit_op}"


class FusedAttentionCl(_RelPosAttentionForward, AttentionCl):
    """timm ``AttentionCl`` running ``fastvit.flash_attention``. Same signature,
    ``forward(x, shared_rel_pos=None)`` with x (B, ..., C) channels-last tokens (a window or grid
    partition, (B, N, C) in CoAtNet); returns (B, ..., dim_out). Calls in training with attention
    dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("maxvit_tiny_tf_224")
        >>> fastvit.patch(model)  # the block and grid attentions become FusedAttentionCl
    """

    def _fastvit_fused(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, restore_shape = x.shape[0], x.shape[:-1]
        if self.head_first:  # (B, N, H, 3D) -> three (B, H, N, D) views
            q, k, v = self.qkv(x).view(batch, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        else:  # (B, N, 3, H, D) -> three (B, H, N, D) views
            q, k, v = self.qkv(x).reshape(batch, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
        out = _attend(q, k, v, timm_scale(self), bias)
        # tuple concatenation, as timm: torch.fx traces it (a Proxy size cannot be unpacked with *)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(restore_shape + (-1,))))  # noqa: RUF005


class FusedAttention2d(_RelPosAttentionForward, Attention2d):
    """timm ``Attention2d`` (CoAtNet's channels-first transformer stages) running
    ``fastvit.flash_attention``. Same signature, ``forward(x, shared_rel_pos=None)`` with x
    (B, C, H, W); returns (B, dim_out, H, W). Calls in training with attention dropout > 0 run timm's
    forward.

    Example:
        >>> model = timm.create_model("coatnet_0_rw_224")
        >>> fastvit.patch(model)  # the stages' Attention2d become FusedAttention2d
    """

    def _fastvit_fused(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        batch, _, height, width = x.shape
        if self.head_first:  # (B, H, 3D, N) -> three (B, H, D, N) views
            q, k, v = self.qkv(x).view(batch, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        else:  # (B, 3, H, D, N) -> three (B, H, D, N) views
            q, k, v = self.qkv(x).reshape(batch, 3, self.num_heads, self.dim_head, -1).unbind(1)
        # the op reads D with a unit stride: token-major copies, as timm's SDPA path makes
        q, k, v = (t.transpose(-1, -2).contiguous() for t in (q, k, v))
        out = _attend(q, k, v, timm_scale(self), bias)  # (B, H, N, D)
        return self.proj_drop(self.proj(out.transpose(-1, -2).reshape(batch, -1, height, width)))


class FusedTransformerBlock2d(FusedGammaMlpHalf, TransformerBlock2d):
    """timm CoAtNet ``TransformerBlock2d`` (channels-first) whose MLP half is one
    ``fastvit.layernorm_mlp`` call (same signature, ``forward(x, shared_rel_pos=None)``: x
    (B, C, H, W) -> (B, C', H', W')); its attention half (``Attention2d``, fused on its own) and
    its shortcut downsampling run as timm's.

    The op takes the map's channels-last view (B, H, W, C), ``LayerNorm2d``'s parameters as its
    norm, the 1x1 convs' weights as (out, in) views, ``ls2``'s gamma as ``layer_scale``. Its
    output is laid out channels-first again (one copy) as timm's block returns it, so that the
    next block's ``view``s of it still hold.

    Example:
        >>> model = timm.create_model("coatnet_0_rw_224")
        >>> fastvit.patch(model)  # stages.2.blocks.*, stages.3.blocks.* -> FusedTransformerBlock2d
    """

    fastvit_bypassed = ("norm2", "mlp", "mlp.fc1", "mlp.norm", "mlp.act", "mlp.drop", "mlp.fc2", "ls2", "drop_path2")

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        return self.ls2.gamma if isinstance(self.ls2, LayerScale2d) else None

    def _fastvit_fused_half(self, x: torch.Tensor) -> torch.Tensor:
        mlp, norm = self.mlp, self.norm2
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_half(x)
        if mlp_dropout_falls_back(self, mlp):
            return self._fastvit_original_half(x)
        y = fastvit.layernorm_mlp(
            x.permute(0, 2, 3, 1), **conv_mlp_arguments(norm, mlp), layer_scale=self._fastvit_layer_scale(),
            sample_scale=drop_path_scale(self.drop_path2, x),
        )  # (B, H, W, C)
        return y.permute(0, 3, 1, 2).contiguous()  # channels-first memory, as timm's block returns

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, shared_rel_pos=shared_rel_pos)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x, shared_rel_pos=shared_rel_pos)
        x = self.shortcut(x) + self.drop_path1(self.ls1(self.attn(self.norm1(x), shared_rel_pos=shared_rel_pos)))
        return self._fastvit_mlp_half(x)

    def extra_repr(self) -> str:
        return f"dim={self.norm2.normalized_shape[0]}, channels-first, mlp=ConvMlp, fastvit={self.fastvit_op}"
