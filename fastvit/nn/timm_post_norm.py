"""Fused subclasses of timm's MLPs for its post-norm blocks, swapped onto a model by ``fastvit.patch``.

Four of timm's blocks normalise after their MLP: ``x + drop_path2(norm2(mlp(x)))`` (Swin V2's
``SwinTransformerV2Block``, Swin V2-CR's ``SwinTransformerV2CrBlock``, ``EvaBlockPostNorm``,
``ResPostRelPosBlock``). There the MLP reads the residual stream itself, so the MLP module alone is
fused: its forward is one ``fastvit.layernorm_mlp(..., norm="none", residual=False)`` call (fc1,
the activation and any gating in one GEMM epilogue, fc2 in another), and the block's own norm2,
drop_path2 and residual add run as timm's, untouched. One fused class per MLP kind: ``Mlp``
(GELU, QuickGELU or SiLU), ``GluMlp`` (packed, either gate order) and ``SwiGLU`` (two projections).
An MLP with a LayerNorm inside (``scale_mlp``) passes it as the op's ``hidden_norm``; another norm
there, or 1 x 1 convs, is reported and left alone by ``fastvit/patching/timm.py``. See
``fastvit.nn.fused`` for how the swap works. Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.layers import GluMlp, Mlp, SwiGLU

import fastvit
from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_mlp import mlp_arguments, mlp_dropout_falls_back
from fastvit.ops._fx import method_leaf

__all__ = ["FusedGluMlpAlone", "FusedMlpAlone", "FusedSwiGLUAlone"]

# the submodules the fused forward reads without calling them (FusedModule.fastvit_bypassed)
_COMMON = ("act", "drop1", "norm", "fc2", "drop2")


class _MlpAloneForward(FusedModule):
    """What the fused MLPs share: ``forward(x)`` (..., D) -> (..., D) is one op call with no norm
    and no residual. MLP dropout active in training, a hook on (or a replacement of) a bypassed
    submodule, or an overridden ``forward`` run timm's modules in timm's order."""

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the override may be timm's forward itself
            return super().forward(x)
        return self._fastvit_mlp(x)

    def _fastvit_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D): the MLP, fused (timm's modules where the op does not cover the call)."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        traced = method_leaf(self, "_fastvit_mlp", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        if not self._fastvit_submodules_intact() or mlp_dropout_falls_back(self, self):
            return self._fastvit_original_forward(x)
        return _fused_mlp_alone(self, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, no input norm (the block's post-norm runs after it)"


def _fused_mlp_alone(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fastvit.layernorm_mlp`` with no norm and no residual over ``mlp``'s Linears. A function of its
    own: TorchScript parses every line of a method it compiles (an FX graph's call of ``_fastvit_mlp``
    compiles it), and it cannot parse ``**`` arguments."""
    return fastvit.layernorm_mlp(x, norm_weight=None, norm_bias=None, norm="none", residual=False,
                                 **mlp_arguments(mlp))  # fmt: skip


class FusedMlpAlone(_MlpAloneForward, Mlp):
    """timm ``Mlp`` of Linears (GELU, QuickGELU or SiLU) whose forward is one ``fastvit.layernorm_mlp``
    call with ``norm="none"`` (same signature, ``forward(x)``: (..., D) -> (..., D)).

    Example:
        >>> model = timm.create_model("swinv2_tiny_window8_256")
        >>> fastvit.patch(model)  # layers.*.blocks.*.mlp -> FusedMlpAlone
    """

    fastvit_bypassed = ("fc1", *_COMMON)


class FusedGluMlpAlone(_MlpAloneForward, GluMlp):
    """timm ``GluMlp`` (packed [gate; value], or [value; gate] with ``gate_last``) whose forward is one
    gated ``fastvit.layernorm_mlp`` call with ``norm="none"`` (``EvaBlockPostNorm`` with SwiGLU)."""

    fastvit_bypassed = ("fc1", *_COMMON)


class FusedSwiGLUAlone(_MlpAloneForward, SwiGLU):
    """timm ``SwiGLU`` (``fc1_g`` gate, ``fc1_x`` value) whose forward is one gated
    ``fastvit.layernorm_mlp`` call with ``norm="none"``."""

    fastvit_bypassed = ("fc1_g", "fc1_x", *_COMMON)
