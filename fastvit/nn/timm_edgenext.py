"""Fused subclass of timm's EdgeNeXt cross-covariance attention (``edgenext_*``), swapped onto a
model by ``fastvit.patch``.

EdgeNeXt's ``SplitTransposeBlock`` (the last block of stages 2-4) attends with
``CrossCovarianceAttn``: XCiT's attention across channels (q and k L2-normalised over the tokens,
q times the per-head ``temperature``, each head's (C', C') softmax over its channels mixing the
value channels), as one ``fastvit.flash_attention`` call with ``scale=1`` where the sequence is a
head's C' channels and the head dim is the token count N
(``fastvit.nn.timm_xcit.cross_covariance_attention``). The kernels take head dims up to 256, so
maps of up to 256 tokens (EdgeNeXt-S at 256 px: its third and fourth stages, 16 x 16 and 8 x 8);
larger maps (its second stage, 32 x 32) run PyTorch's SDPA inside the op, with its one-time
fallback warning.

The MLP halves of both block kinds, the ``ConvBlock`` (depthwise conv, then the inverted
bottleneck) and the ``SplitTransposeBlock`` (after its attention), are one ``fastvit.layernorm_mlp``
call each: timm adds their branch ``drop_path(gamma * mlp(norm(x)))`` to the block's input, not to
the (B, H, W, C) tensor the MLP normalises, so the op runs with ``residual=False`` (``gamma`` as
``layer_scale``, the drop path as ``sample_scale``) and the block adds its shortcut. See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.edgenext import ConvBlock, CrossCovarianceAttn, SplitTransposeBlock

from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import fused_mlp_branch, mlp_dropout_falls_back
from fastvit.nn.timm_xcit import cross_covariance_attention
from fastvit.ops._fx import method_leaf

__all__ = ["FusedCrossCovarianceAttn", "FusedEdgeNextConvBlock", "FusedSplitTransposeBlock"]


class FusedCrossCovarianceAttn(FusedModule, CrossCovarianceAttn):
    """timm EdgeNeXt ``CrossCovarianceAttn`` running ``fastvit.flash_attention`` over each head's
    channels. Same signature, ``forward(x)``: x (B, N, C) -> (B, N, C). Calls in training with
    attention dropout > 0 run timm's forward.

    Example:
        >>> model = timm.create_model("edgenext_small")
        >>> fastvit.patch(model)  # stages.*.blocks.*.xca -> FusedCrossCovarianceAttn
    """

    fastvit_part = "attention"
    fastvit_op = "flash_attention"
    fastvit_bypassed = ("attn_drop",)  # the op replaces timm's softmax and attention dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_unfused("timm EdgeNeXt CrossCovarianceAttn"):
            return super().forward(x)
        x = cross_covariance_attention(self.qkv(x), self.num_heads, self.temperature)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, cross-covariance (channels attend), fastvit={self.fastvit_op}"


class EdgeNextMlpBranch(FusedModule):
    """The MLP branch both EdgeNeXt blocks end in, ``drop_path(gamma * mlp(norm(x)))`` over a
    (B, H, W, C) map, returned channels-first (B, C, H, W) for the block to add to its shortcut:
    one ``fastvit.layernorm_mlp(..., residual=False)`` call. MLP dropout active in training, or a
    hook on (or a replacement of) a bypassed submodule, run timm's modules in timm's order."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    # drop_path too: SplitTransposeBlock calls it in its attention half as well, where it stays timm's
    fastvit_bypassed = ("norm", "mlp", "mlp.fc1", "mlp.act", "mlp.drop1", "mlp.norm", "mlp.fc2", "mlp.drop2",
                        "drop_path")  # fmt: skip

    def _fastvit_original_branch(self, x: torch.Tensor) -> torch.Tensor:
        """timm's branch, module by module: (B, H, W, C) -> (B, C, H, W)."""
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = self.gamma * x
        return self.drop_path(x.permute(0, 3, 1, 2))

    def _fastvit_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, C, H, W), a channels-first view of the op's (B, H, W, C) output, as
        timm's ``permute`` returns it."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_branch(x)
        traced = method_leaf(self, "_fastvit_mlp_branch", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_falls_back(self, self.mlp):
            return self._fastvit_original_branch(x)
        return fused_mlp_branch(x, self.norm, self.mlp, self.drop_path, self.gamma).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"dim={self.norm.normalized_shape[0]}, mlp=Mlp, residual: the block's input, fastvit={self.fastvit_op}"


class FusedEdgeNextConvBlock(EdgeNextMlpBranch, ConvBlock):
    """timm EdgeNeXt ``ConvBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x)``: x (B, C, H, W) -> (B, C', H', W')); its depthwise conv runs as timm's.

    Example:
        >>> model = timm.create_model("edgenext_small")
        >>> fastvit.patch(model)  # stages.*.blocks.* (conv blocks) -> FusedEdgeNextConvBlock
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        shortcut = x
        x = self.conv_dw(x)
        if self.shortcut_after_dw:
            shortcut = x
        return shortcut + self._fastvit_mlp_branch(x.permute(0, 2, 3, 1))


class FusedSplitTransposeBlock(EdgeNextMlpBranch, SplitTransposeBlock):
    """timm EdgeNeXt ``SplitTransposeBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call
    (same signature, ``forward(x)``: x (B, C, H, W) -> (B, C, H, W)); its split depthwise convs,
    positional encoding and attention half (``CrossCovarianceAttn``, fused on its own) run as timm's.

    Example:
        >>> model = timm.create_model("edgenext_small")
        >>> fastvit.patch(model)  # the last block of stages 2-4 -> FusedSplitTransposeBlock
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        # timm's split convs and attention half, as in SplitTransposeBlock.forward
        shortcut = x
        spx = x.chunk(len(self.convs) + 1, dim=1)
        spo = []
        sp = spx[0]
        for i, conv in enumerate(self.convs):
            if i > 0:
                sp = sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(spx[-1])
        x = torch.cat(spo, 1)
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W).permute(0, 2, 1)
        if self.pos_embd is not None:
            pos_encoding = self.pos_embd((B, H, W)).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
            x = x + pos_encoding
        x = x + self.drop_path(self.gamma_xca * self.xca(self.norm_xca(x)))
        return shortcut + self._fastvit_mlp_branch(x.reshape(B, H, W, C))
