"""Fused subclass of timm's ConvNeXt block (``convnext_*``, the ConvNeXt CLIP towers), swapped onto
a model by ``fastvit.patch``.

``ConvNeXtBlock`` is a depthwise 7 x 7 conv followed by an inverted-bottleneck MLP half,
``drop_path(gamma * mlp(norm(conv_dw(x)))) + shortcut(x)``: the MLP normalises the conv's output,
and its branch is added to the block's input. The MLP half is one
``fastvit.layernorm_mlp(..., residual=False)`` call over the conv output's channels-last view
(B, H, W, C) (``gamma`` as ``layer_scale``, the drop path as ``sample_scale``), the block adding
its shortcut; in both of timm's layouts: ``conv_mlp=False`` (``LayerNorm`` and ``Mlp`` of
Linears over a permuted map) and ``conv_mlp=True`` (``LayerNorm2d`` and ``Mlp`` of 1 x 1 convs on
the (B, C, H, W) map, the convs' weights passed as their (out, in) views). The depthwise conv and
the shortcut run as timm's. ConvNeXt V2's ``GlobalResponseNormMlp`` (a norm over the hidden
activations' spatial extent) is no layernorm_mlp call and is reported. See ``fastvit.nn.fused``
for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXtBlock

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import conv_mlp_arguments, drop_path_scale, fused_mlp_branch, mlp_dropout_falls_back
from fastvit.ops._fx import method_leaf

__all__ = ["FusedConvNeXtBlock"]


def _fused_branch(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The fused branch of ``FusedConvNeXtBlock._fastvit_mlp_branch``. A function of its own:
    TorchScript parses every line of a method it compiles (an FX graph's call of the method compiles
    it), and it cannot parse ``**`` arguments."""
    mlp, norm = block.mlp, block.norm
    x_cl = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    if block.use_conv_mlp:  # LayerNorm2d's parameters; the 1 x 1 convs' (out, in, 1, 1) weights as views
        y = fastvit.layernorm_mlp(
            x_cl, **conv_mlp_arguments(norm, mlp), residual=False, layer_scale=block.gamma,
            sample_scale=drop_path_scale(block.drop_path, x),
        )
    else:
        y = fused_mlp_branch(x_cl, norm, mlp, block.drop_path, block.gamma)
    return y.permute(0, 3, 1, 2)


class FusedConvNeXtBlock(FusedModule, ConvNeXtBlock):
    """timm ``ConvNeXtBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same signature,
    ``forward(x)``: x (B, C, H, W) -> (B, C', H', W')); its depthwise conv and shortcut run as
    timm's. MLP dropout active in training, or a hook on (or a replacement of) a bypassed
    submodule, run timm's modules in timm's order.

    Example:
        >>> model = timm.create_model("convnext_tiny")
        >>> fastvit.patch(model)  # stages.*.blocks.* -> FusedConvNeXtBlock
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("norm", "mlp", "mlp.fc1", "mlp.act", "mlp.drop1", "mlp.norm", "mlp.fc2", "mlp.drop2",
                        "drop_path")  # fmt: skip

    def _fastvit_original_branch(self, x: torch.Tensor) -> torch.Tensor:
        """timm's branch, module by module: the conv output (B, C, H, W) -> (B, C, H, W)."""
        if self.use_conv_mlp:
            x = self.mlp(self.norm(x))
        else:
            x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x)

    def _fastvit_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The conv output (B, C, H, W) -> the branch (B, C, H, W), a channels-first view of the
        op's (B, H, W, C) output (as timm's ``permute`` returns it without ``conv_mlp``)."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_branch(x)
        traced = method_leaf(self, "_fastvit_mlp_branch", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_falls_back(self, self.mlp):
            return self._fastvit_original_branch(x)
        return _fused_branch(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        return self._fastvit_mlp_branch(self.conv_dw(x)) + self.shortcut(x)

    def extra_repr(self) -> str:
        layout = "1x1 convs (conv_mlp)" if self.use_conv_mlp else "Linear"
        dim = self.norm.normalized_shape[0]
        return f"dim={dim}, mlp={layout}, residual: the block's input, fastvit={self.fastvit_op}"
