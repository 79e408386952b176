"""Fused subclass of Hugging Face's ``ConvNextLayer`` (``facebook/convnext-*``, the ConvNeXt backbones of
UperNet and other heads), swapped onto a model by ``fastvit.patch``.

``ConvNextLayer`` is a depthwise 7 x 7 conv followed by an inverted-bottleneck MLP,
``residual + drop_path(layer_scale * pwconv2(act(pwconv1(layernorm(dwconv(x).permute(0, 2, 3, 1)))))
.permute(0, 3, 1, 2))``: the MLP normalises the conv's output and its branch is added to the layer's
input. The branch is one ``fastvit.layernorm_mlp(..., residual=False)`` call over the conv output's
channels-last view (``layer_scale_parameter`` as ``layer_scale``, the drop path as ``sample_scale``,
drawn as ``ConvNextDropPath`` draws it); the depthwise conv and the residual add run as Hugging
Face's. ConvNeXt V2's layer (a global response norm between the activation and pwconv2) is reported
by ``fastvit/patching/transformers_families.py``. Importing this module imports transformers.
"""

from __future__ import annotations

import torch
from transformers.models.convnext.modeling_convnext import ConvNextDropPath, ConvNextLayer

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.hf_vit import activation_of
from fastvit.ops._fx import method_leaf

__all__ = ["FusedConvNextLayer", "drop_path_scale"]


def drop_path_scale(drop_path: torch.nn.Module, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | None:
    """``ConvNextDropPath``'s factor for a branch on ``x`` as the op's per-sample ``sample_scale`` (B,),
    or None where it is the identity: the same RNG call as Hugging Face's (``torch.rand`` of (B, 1, 1, 1)
    in the branch's dtype: the autocast dtype under autocast, promoted with ``scale``'s, the layer
    scale that multiplies the branch), so a seeded training step matches the unpatched layer."""
    if not isinstance(drop_path, ConvNextDropPath) or drop_path.drop_prob == 0.0 or not drop_path.training:
        return None
    keep_prob = 1 - drop_path.drop_prob
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    if scale is not None:
        dtype = torch.promote_types(dtype, scale.dtype)
    keep = torch.floor(torch.rand((x.shape[0], 1, 1, 1), dtype=dtype, device=x.device) + keep_prob)
    return keep.flatten() / keep_prob


class FusedConvNextLayer(FusedModule, ConvNextLayer):
    """Hugging Face ``ConvNextLayer`` whose LayerNorm + MLP branch is one ``fastvit.layernorm_mlp``
    call (same signature, ``forward(features)``: (B, C, H, W) -> (B, C, H, W)); its depthwise conv
    and residual add run as Hugging Face's. A hook on (or a replacement of) a bypassed submodule runs
    Hugging Face's modules in Hugging Face's order.

    Example:
        >>> model = transformers.ConvNextModel(transformers.ConvNextConfig())
        >>> fastvit.patch(model)  # encoder.stages.*.layers.* -> FusedConvNextLayer
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"
    fastvit_bypassed = ("layernorm", "pwconv1", "act", "pwconv2", "drop_path")

    def _fastvit_original_branch(self, x: torch.Tensor) -> torch.Tensor:
        """Hugging Face's branch, module by module: the conv output (B, C, H, W) -> (B, C, H, W)."""
        x = self.pwconv2(self.act(self.pwconv1(self.layernorm(x.permute(0, 2, 3, 1)))))
        if self.layer_scale_parameter is not None:
            x = self.layer_scale_parameter * x
        return self.drop_path(x.permute(0, 3, 1, 2))

    def _fastvit_mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The conv output (B, C, H, W) -> the branch (B, C, H, W), a channels-first view of the
        op's (B, H, W, C) output (as Hugging Face's ``permute`` returns it)."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_branch(x)
        traced = method_leaf(self, "_fastvit_mlp_branch", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_branch(x)
        norm, scale = self.layernorm, self.layer_scale_parameter
        y = fastvit.layernorm_mlp(
            x.permute(0, 2, 3, 1), norm.weight, norm.bias, self.pwconv1.weight, self.pwconv1.bias,
            self.pwconv2.weight, self.pwconv2.bias, eps=norm.eps, activation=activation_of(self.act),
            residual=False, layer_scale=scale, sample_scale=drop_path_scale(self.drop_path, x, scale),
        )  # fmt: skip
        return y.permute(0, 3, 1, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(features)
        if self._fastvit_overridden():  # the whole forward: the override may be the layer's own forward
            return super().forward(features)
        return features + self._fastvit_mlp_branch(self.dwconv(features))

    def extra_repr(self) -> str:
        return f"dim={self.layernorm.normalized_shape[0]}, residual: the layer's input, fastvit={self.fastvit_op}"
