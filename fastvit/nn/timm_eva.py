"""Fused subclasses of timm's Eva modules (EVA02, the ``vit_*_rope_*`` ViTs, timm's DINOv3), swapped
onto a model by ``fastvit.patch``: ``EvaAttention``, the MLP half of ``EvaBlock`` and the ``Eva``
embedding.

The attention is one ``fastvit.rotary_qk`` call (the rotary position embedding of the patch rows
of q and k in one pass, prefix tokens copied unrotated, the rotation in fp32 as timm computes it
with its fp32 embedding) and one ``fastvit.flash_attention`` call. Everything around them is timm's,
line for line: the packed or separate q/k/v projections (with EVA's zero k bias), ``q_norm`` /
``k_norm``, the ``type_as(v)`` after the rotation, the output norm, the gate and the projection.
An embedding the op does not take (not broadcastable to (B, H, N - P, 2D), q and k of different
dtypes or shapes) runs timm's ``apply_rot_embed_cat`` + ``torch.cat``.

``EvaBlock``'s MLP half, ``x + drop_path2(gamma_2 * mlp(norm2(x)))`` with timm's ``Mlp``, packed
SwiGLU (``GluMlp``) or ``SwiGLU``, is one ``fastvit.layernorm_mlp`` call (``fastvit.nn.timm_mlp``).
``Eva.forward_features`` embeds with one ``fastvit.patch_embed`` call (patches, class and register
tokens, ``pos_embed``, resampled under ``dynamic_img_size`` as timm does); the rotary embedding,
``pos_drop``, ``patch_drop`` and the blocks run as in timm. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.layers import apply_keep_indices_nlc, apply_rot_embed_cat
from timm.models._manipulate import checkpoint
from timm.models.eva import Eva, EvaAttention, EvaBlock

import fastvit
from fastvit.nn.attention import biased_qkv, mask_refused, mask_with_causal, merge_heads, self_attention, timm_scale
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import MLP_BYPASSED, SWIGLU_BYPASSED, FusedGammaMlpHalf
from fastvit.nn.timm_vit import _FusedEmbedding

__all__ = [
    "FusedEva", "FusedEvaAttention", "FusedEvaBlock", "FusedEvaSwiGLUBlock", "RopeAttentionForward", "rotated_qk",
]  # fmt: skip


def _rotary_qk_takes(q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int) -> bool:
    """Whether ``fastvit.rotary_qk`` takes timm's arguments: q and k (B, H, N, D) of one shape and
    dtype with D even, and the embedding [sin, cos] broadcastable to (B, H, N - P, 2D).

    Example:
        >>> _rotary_qk_takes(q, k, rope, attn.num_prefix_tokens)  # else timm's apply_rot_embed_cat
    """
    if isinstance(q, torch.fx.Proxy) or isinstance(rope, torch.fx.Proxy):
        return True  # torch.fx tracing: the op is one leaf node (fastvit/ops/_fx.py), checked when it runs
    if q.dim() != 4 or q.shape != k.shape or q.dtype != k.dtype or not 2 <= rope.dim() <= 4:
        return False
    if not (rope.is_floating_point() and q.is_floating_point()) or q.shape[-1] % 2:
        return False
    batch, heads, n_tokens, head_dim = q.shape
    padded = (1,) * (4 - rope.dim()) + tuple(rope.shape)
    return (
        0 <= num_prefix_tokens <= n_tokens
        and padded[2:] == (n_tokens - num_prefix_tokens, 2 * head_dim)
        and padded[0] in (1, batch)
        and padded[1] in (1, heads)
    )


def rotated_qk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's rotary step of ``EvaAttention`` / ``AttentionRope``: q and k (B, H|Hkv, N, D) with
    their patch rows rotated by ``rope`` and the first ``num_prefix_tokens`` rows unrotated, cast to
    v's dtype. One ``fastvit.rotary_qk`` pass where the op takes the arguments (looked up on fastvit
    at call time), else timm's ``apply_rot_embed_cat`` + ``torch.cat``.

    Example:
        >>> q, k = rotated_qk(q, k, v, rope, attn.num_prefix_tokens, attn.rotate_half)
    """
    npt = num_prefix_tokens
    if _rotary_qk_takes(q, k, rope, npt):
        q, k = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=npt, rotate_half=half)
    else:
        q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2)
    return q.type_as(v), k.type_as(v)


class RopeAttentionForward(FusedModule):
    """The forward the fused timm RoPE attentions share (``EvaAttention``, ``AttentionRope``):
    ``forward(x, rope=None, attn_mask=None, is_causal=False)``, x (B, N, C) -> (B, N, dim_out).

    Each class projects q, k, v in ``_fastvit_qkv`` (timm's packed or separate projections); then
    ``q_norm`` / ``k_norm``, the rotary step of the patch rows (``rotated_qk``), the grouped-query
    expansion of k and v (``num_kv_groups`` > 1: ``repeat_interleave``, as timm), one
    ``fastvit.flash_attention`` call, the output ``norm``, the gate and the projection, as timm.
    Calls in training with attention dropout > 0, and a mask with ``is_causal``, run timm's forward.
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # timm calls it only with fused_attn=False

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        refused = mask_with_causal(attn_mask, is_causal) or mask_refused(attn_mask, x, self.num_heads)
        if refused or self._fastvit_unfused():
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._fastvit_qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # patch tokens only, as timm
            q, k = rotated_qk(q, k, v, rope, self.num_prefix_tokens, getattr(self, "rotate_half", False))
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:  # head h reads kv head h // groups, as timm
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = timm_scale(self)
        out = self.norm(merge_heads(self_attention(q, k, v, scale=scale, causal=is_causal, attn_mask=attn_mask)))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def _fastvit_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q (B, H, N, D), k and v (B, H or Hkv, N, D), as timm projects them."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        groups = getattr(self, "num_kv_groups", 1)
        heads = f"heads={self.num_heads}" + (f", kv_heads={self.num_heads // groups}" if groups > 1 else "")
        return f"{heads}, head_dim={self.head_dim}, fastvit={self.fastvit_op}"


class FusedEvaAttention(RopeAttentionForward, EvaAttention):
    """timm ``EvaAttention`` running ``fastvit.rotary_qk`` and ``fastvit.flash_attention`` (same
    signature, ``forward(x, rope=None, attn_mask=None, is_causal=False)``); ``attn_mask`` goes to the
    op's ``attn_mask``. Calls in training with attention dropout > 0 run timm's forward."""

    def _fastvit_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, -1)
        if self.qkv is not None:  # timm's packed projection, EVA's zero k bias included
            qkv = biased_qkv(x, self.qkv, self.q_bias, self.k_bias, self.v_bias, self.qkv_bias_separate)
            q, k, v = qkv.unflatten(-1, (3, *heads)).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views
            return q, k, v
        q, k, v = (proj(x).unflatten(-1, heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v


class _EvaBlockForward(FusedGammaMlpHalf):
    """``EvaBlock.forward``: the attention half as timm's, the MLP half fused."""

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self._fastvit_overridden():  # the whole forward: the override may be EvaBlock.forward itself
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        return self._fastvit_mlp_half(x)


class FusedEvaBlock(_EvaBlockForward, EvaBlock):
    """timm ``EvaBlock`` with a ``Mlp`` (GELU) or a packed SwiGLU (``GluMlp``): its MLP half, with
    ``gamma_2`` and drop path, is one ``fastvit.layernorm_mlp`` call."""

    fastvit_bypassed = MLP_BYPASSED


class FusedEvaSwiGLUBlock(_EvaBlockForward, EvaBlock):
    """timm ``EvaBlock`` with a ``SwiGLU`` MLP (``fc1_g`` gate, ``fc1_x`` value): its MLP half is one
    gated ``fastvit.layernorm_mlp`` call."""

    fastvit_bypassed = SWIGLU_BYPASSED


class FusedEva(_FusedEmbedding, Eva):
    """timm ``Eva`` embedding its input with ``fastvit.patch_embed`` in ``forward_features``.

    The rest of timm's ``_pos_embed`` runs as timm's, in its order: the rotary embedding
    (``rope.get_embed``, on the grid the input gives under ``dynamic_img_size``), ``pos_drop``,
    ``patch_drop`` (keeping the rotary rows of the kept patches), then ``norm_pre`` and the blocks.
    ``model.patch_embed`` and ``forward_intermediates`` are timm's (see ``_FusedEmbedding``).
    """

    def _fastvit_rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """timm's rotary embedding for a (H, W) patch grid, as ``Eva._pos_embed`` gets it."""
        if self.rope is None:
            return None
        if self.dynamic_img_size:
            return self.rope.get_embed(shape=grid)
        if hasattr(self.rope, "feat_shape"):
            return self.rope.get_embed()
        return self.rope.get_embed(shape=self.patch_embed.grid_size)  # e.g. MRoPE: no feat_shape

    def forward_features(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        if not self._fastvit_takes(x):
            return Eva.forward_features(self, x, attn_mask=attn_mask, is_causal=is_causal)
        grid = self.patch_embed.dynamic_feat_size(x.shape[-2:])  # the (H, W) of timm's NHWC patches
        x = self._fastvit_tokens(x)  # (B, C, H, W) -> (B, P+N, D): patches, prefix tokens, pos_embed
        rot_pos_embed = self._fastvit_rope(grid)
        x = self.pos_drop(x)
        if self.patch_drop is not None:  # timm's patch dropout, the rotary rows kept alike
            x, keep_indices = self.patch_drop(x)
            if rot_pos_embed is not None and keep_indices is not None:
                rot_pos_embed = apply_keep_indices_nlc(x, rot_pos_embed, keep_indices)
                if getattr(self, "rope_mixed", False):  # B, depth, H, N, dim -> depth, B, H, N, dim
                    rot_pos_embed = rot_pos_embed.transpose(0, 1)
                else:  # B, N, dim -> B, 1, N, dim
                    rot_pos_embed = rot_pos_embed.unsqueeze(1)
        x = self.norm_pre(x)
        mixed = getattr(self, "rope_mixed", False) and rot_pos_embed is not None  # one embedding per block
        for i, block in enumerate(self.blocks):
            rope = rot_pos_embed[i] if mixed else rot_pos_embed
            if self.grad_checkpointing:
                x = checkpoint(block, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
            else:
                x = block(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return self.norm(x)
