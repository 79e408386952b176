"""Fused subclass of torchvision's ConvNeXt block (``convnext_tiny/small/base/large``), swapped onto
a model by ``fastvit.patch``.

``CNBlock`` computes ``stochastic_depth(layer_scale * block(x)) + x`` where ``block`` is a depthwise
7 x 7 conv, a permute to (B, H, W, C), LayerNorm, Linear, GELU, Linear and the permute back: the
MLP normalises the conv's output and its branch is added to the block's input. The conv runs as
torchvision's; the rest of the branch is one ``fastvit.layernorm_mlp(..., residual=False)`` call
over the conv output's channels-last view (``layer_scale`` (C, 1, 1) as the op's (C,) layer scale,
a view; the row-wise stochastic depth as its ``sample_scale``, drawn as torchvision draws it), the
block adding its input. See ``fastvit.nn.fused`` for how the swap works. Importing this module
imports torchvision.
"""

from __future__ import annotations

import torch
from torchvision.models.convnext import CNBlock

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.torchvision_maxvit import torchvision_activation
from fastvit.nn.torchvision_swin import row_keep
from fastvit.ops._fx import method_leaf

__all__ = ["FusedCNBlock"]


class FusedCNBlock(FusedModule, CNBlock):
    """torchvision ConvNeXt ``CNBlock`` whose LayerNorm+MLP is one ``fastvit.layernorm_mlp`` call
    (same signature, ``forward(input)``: (B, C, H, W) -> (B, C, H, W)); its depthwise conv
    (``block[0]``) is called as torchvision's module. A hook on (or a replacement of) a bypassed
    submodule runs torchvision's modules.

    Example:
        >>> model = torchvision.models.convnext_tiny()
        >>> fastvit.patch(model)  # features.*.* (CNBlock) -> FusedCNBlock
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("block", "block.1", "block.2", "block.3", "block.4", "block.5", "block.6", "stochastic_depth")

    def _fastvit_original_branch(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's branch after the conv, module by module: (B, C, H, W) -> (B, C, H, W)."""
        for index, layer in enumerate(self.block):  # (TorchScript cannot iterate a slice of a Sequential)
            if index > 0:
                x = layer(x)
        return self.stochastic_depth(self.layer_scale * x)

    def _fastvit_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The conv output (B, C, H, W) -> the branch (B, C, H, W), a channels-first view of the op's
        (B, H, W, C) output, as torchvision's ``Permute`` returns it."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_branch(x)
        traced = method_leaf(self, "_fastvit_mlp_branch", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_branch(x)
        _, _, norm, fc1, act, fc2, _ = self.block  # conv, Permute, LayerNorm, Linear, GELU, Linear, Permute
        layer_scale = self.layer_scale.view(-1)  # (C, 1, 1) -> (C,)
        y = fastvit.layernorm_mlp(
            x.permute(0, 2, 3, 1), norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=norm.eps,
            activation=torchvision_activation(act), residual=False, layer_scale=layer_scale,
            sample_scale=row_keep(self.stochastic_depth, x, self.layer_scale),
        )  # fmt: skip
        return y.permute(0, 3, 1, 2)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # torchvision names its argument input
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(input)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(input)
        return self._fastvit_mlp_branch(self.block[0](input)) + input

    def extra_repr(self) -> str:
        return f"dim={self.block[2].normalized_shape[0]}, residual: the block's input, fastvit={self.fastvit_op}"
