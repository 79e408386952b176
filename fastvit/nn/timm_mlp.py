"""The MLP half of timm's pre-norm blocks as one ``fastvit.layernorm_mlp`` call.

timm's ViT ``Block`` ends in ``x + drop_path2(ls2(mlp(norm2(x))))`` (``ls2`` a ``LayerScale`` or
Identity), Eva's and BEiT's blocks in ``x + drop_path2(gamma_2 * mlp(norm2(x)))`` (``gamma_2`` a
bare (D,) Parameter or None); ``norm2`` is a LayerNorm or timm's ``RmsNorm`` (AIMv2), ``mlp`` one of
timm's

- ``Mlp``: fc2(act(fc1(x))), act GELU (erf or tanh), QuickGELU or SiLU;
- ``GluMlp`` (Eva's packed SwiGLU, ``gate_last=False``): fc1 packed [gate; value], fc2(act(gate) * value),
  the op's packed layout; ``gate_last=True`` ([value; gate]) passes row views of fc1 (no copies);
- ``SwiGLU``: fc2(act(fc1_g(x)) * fc1_x(x)), fc1_x the value and fc1_g the gate projection.

The layer scale goes to the op as ``layer_scale``, ``drop_path2`` as ``sample_scale`` (the same
Bernoulli draws as timm's ``DropPath``, so a seeded training step matches timm exactly). What the
``scale_mlp``'s LayerNorm between the activation and fc2 (EVA02-B/L, EVA-CLIP) is the op's
``hidden_norm``; what the op cannot express (another norm there) is reported and left alone by
``fastvit/patching/timm.py``; post-norm blocks' MLPs are fused alone (``fastvit.nn.timm_post_norm``).
The fused block classes live beside their attention: ``fastvit.nn.timm_vit`` (``Block``),
``fastvit.nn.timm_eva`` (``EvaBlock``) and ``fastvit.nn.timm_relpos`` (BEiT's ``Block``). Importing
this module imports timm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import DropPath, GluMlp, LayerScale, Mlp, RmsNorm, RmsNormFp32, SwiGLU
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh as TimmGELUTanh
from timm.layers.activations import QuickGELU

import fastvit
from fastvit.nn.fused import FusedModule, dropout_active, mlp_dropout_fallback
from fastvit.ops._fx import method_leaf

__all__ = [
    "MLP_BYPASSED", "RMS_NORMS", "SHARED_DROP_PATH_BYPASSED", "SWIGLU_BYPASSED", "FusedGammaMlpHalf", "PreNormMlpHalf",
    "SharedDropPathBlock", "SharedDropPathMlpHalf", "drop_path_scale", "fused_mlp_branch", "fused_mlp_half",
    "gelu_approximate", "mlp_activation", "mlp_arguments", "mlp_dropout_falls_back", "mlp_dropout_p", "mlp_dropouts",
    "norm_arguments",
]  # fmt: skip

# the submodules the fused half reads without calling them (FusedModule.fastvit_bypassed)
_SHARED = ("norm2", "mlp", "mlp.act", "mlp.drop1", "mlp.norm", "mlp.fc2", "mlp.drop2", "drop_path2")
MLP_BYPASSED = (*_SHARED, "mlp.fc1")  # Mlp, GluMlp
SWIGLU_BYPASSED = (*_SHARED, "mlp.fc1_g", "mlp.fc1_x")  # SwiGLU


# RMS norms the op computes as timm's (over the last dim, an optional weight, no bias; the op's
# statistics are fp32 whatever x's dtype, as RmsNormFp32's)
RMS_NORMS = (RmsNorm, RmsNormFp32, nn.RMSNorm)


def gelu_approximate(act: nn.Module) -> str | None:
    """``"none"`` / ``"tanh"`` for the GELU modules timm builds, None for any other activation."""
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is TimmGELU:
        return "none"
    if type(act) is TimmGELUTanh:
        return "tanh"
    return None


def drop_path_scale(drop_path: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """timm's drop-path mask as the op's per-sample ``sample_scale`` (B,), or None when inactive.

    Draws exactly what ``timm.layers.drop_path`` draws (B Bernoulli samples in x's dtype, divided
    by keep_prob when ``scale_by_keep``), so a seeded run matches the unpatched block.
    """
    if not isinstance(drop_path, DropPath) or not dropout_active(drop_path.drop_prob, drop_path.training):
        return None
    keep_prob = 1.0 - drop_path.drop_prob
    scale = x.new_empty((x.shape[0],)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and drop_path.scale_by_keep:
        scale.div_(keep_prob)
    return scale


def norm_arguments(norm: nn.Module) -> dict[str, torch.Tensor | float | str | None]:
    """``fastvit.layernorm_mlp``'s norm arguments for a block's LayerNorm or RMS norm (``RMS_NORMS``;
    the patcher has checked which)."""
    if isinstance(norm, RMS_NORMS):
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps  # nn.RMSNorm's default
        return {"norm_weight": norm.weight, "norm_bias": None, "eps": eps, "norm": "rms"}
    return {"norm_weight": norm.weight, "norm_bias": norm.bias, "eps": norm.eps}


def mlp_activation(act: nn.Module) -> str | None:
    """The op's ``activation`` name for a timm MLP's ``act`` module, or None if it has none."""
    approximate = gelu_approximate(act)
    if approximate is not None:
        return "gelu" if approximate == "none" else "gelu_tanh"
    if type(act) is nn.SiLU:
        return "silu"
    if type(act) is QuickGELU:
        return "quick_gelu"
    return None


def mlp_arguments(mlp: nn.Module) -> dict[str, torch.Tensor | str | bool | None]:
    """``fastvit.layernorm_mlp``'s MLP arguments for a timm ``Mlp``, ``GluMlp`` or ``SwiGLU``
    (the patcher has checked which, that its activation has a name, and that its ``norm`` is
    Identity or a LayerNorm: ``scale_mlp``, the op's ``hidden_norm``)."""
    arguments = {"fc2_weight": mlp.fc2.weight, "fc2_bias": mlp.fc2.bias, "activation": mlp_activation(mlp.act)}
    # isinstance: the MLP may itself run a fused class (timm_post_norm's, a subclass of timm's)
    if isinstance(mlp, SwiGLU):  # act(fc1_g(x)) * fc1_x(x): fc1_x is the value, fc1_g the gate
        fc1, gate = mlp.fc1_x, mlp.fc1_g
        arguments.update(fc1_weight=fc1.weight, fc1_bias=fc1.bias, fc1_gate_weight=gate.weight,
                         fc1_gate_bias=gate.bias)  # fmt: skip
    elif isinstance(mlp, GluMlp) and mlp.gate_last:  # [value; gate]: row views, value then gate
        weight, bias = mlp.fc1.weight, mlp.fc1.bias
        hidden = weight.shape[0] // 2
        arguments.update(
            fc1_weight=weight[:hidden], fc1_bias=None if bias is None else bias[:hidden],
            fc1_gate_weight=weight[hidden:], fc1_gate_bias=None if bias is None else bias[hidden:],
        )  # fmt: skip
    else:  # Mlp; GluMlp with gate_last=False is packed [gate; value], the op's own layout
        arguments.update(fc1_weight=mlp.fc1.weight, fc1_bias=mlp.fc1.bias, gated=isinstance(mlp, GluMlp))
    # scale_mlp: a LayerNorm over the hidden features, before fc2 (TinyViT's NormMlp, no subclass of
    # these, has its norm before fc1: the block passes it as the input norm)
    if isinstance(mlp, (Mlp, GluMlp, SwiGLU)) and not isinstance(mlp.norm, nn.Identity):
        arguments.update(hidden_norm="layernorm", hidden_norm_weight=mlp.norm.weight, hidden_norm_bias=mlp.norm.bias,
                         hidden_eps=mlp.norm.eps)  # fmt: skip
    return arguments


def conv_mlp_arguments(norm: nn.Module, mlp: nn.Module) -> dict[str, torch.Tensor | float | str | None]:
    """``fastvit.layernorm_mlp``'s norm and MLP arguments for a ``LayerNorm2d`` and an MLP of 1 x 1
    convs (timm's ``ConvMlp``, ConvNeXt's ``Mlp`` with ``conv_mlp``), applied to the map's
    channels-last view: the convs' (out, in, 1, 1) weights passed as (out, in) views."""
    return dict(norm_weight=norm.weight, norm_bias=norm.bias, fc1_weight=mlp.fc1.weight.flatten(1),
                fc1_bias=mlp.fc1.bias, fc2_weight=mlp.fc2.weight.flatten(1), fc2_bias=mlp.fc2.bias, eps=norm.eps,
                activation=mlp_activation(mlp.act))  # fmt: skip


def mlp_dropouts(mlp: nn.Module) -> tuple[nn.Dropout, ...]:
    """The dropout modules of a timm MLP the patcher has checked: ``drop1`` and ``drop2`` (Mlp, GluMlp,
    SwiGLU), or the one ``drop`` of a ``ConvMlp`` (CoAtNet's TransformerBlock2d)."""
    return (mlp.drop1, mlp.drop2) if hasattr(mlp, "drop1") else (mlp.drop,)


def mlp_dropout_p(mlp: nn.Module) -> float:
    """The largest dropout probability in a timm MLP (what the patch report names)."""
    return max(drop.p for drop in mlp_dropouts(mlp))


def mlp_dropout_falls_back(block: FusedModule, mlp: nn.Module) -> bool:
    """True, with a warning once per block class, while ``mlp``'s dropout is active in training:
    ``fastvit.layernorm_mlp`` has no dropout, so the caller runs timm's modules for the MLP half."""
    return mlp_dropout_fallback("timm", type(block).fastvit_original().__name__, *mlp_dropouts(mlp))


def fused_mlp_half(
    block: FusedModule,
    x: torch.Tensor,
    norm: nn.Module,
    mlp: nn.Module,
    drop_path: nn.Module,
    layer_scale: torch.Tensor | None,
    original: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """A timm block's MLP half, ``x + drop_path(layer_scale * mlp(norm(x)))``, as one
    ``fastvit.layernorm_mlp`` call; ``original(x)`` (timm's modules, with a warning once) while the
    MLP's dropout is active in training, which the op does not have.

    Args:
        block: the fused block (its original class names the warning).
        x: (..., D) tokens.
        norm, mlp, drop_path: the half's modules (checked by the patcher: a LayerNorm or RMS norm,
            timm's Mlp / GluMlp / SwiGLU or a layout ``mlp_arguments`` reads, DropPath or Identity).
        layer_scale: (D,) or None.
        original: timm's half, module by module.

    Example:
        >>> x = fused_mlp_half(self, x, self.norm2, self.mlp, self.drop_path2, None, self._fastvit_original_half)
    """
    if mlp_dropout_falls_back(block, mlp):
        return original(x)
    return fastvit.layernorm_mlp(
        x, layer_scale=layer_scale, sample_scale=drop_path_scale(drop_path, x), **norm_arguments(norm),
        **mlp_arguments(mlp),
    )  # fmt: skip


def fused_mlp_branch(
    x: torch.Tensor, norm: nn.Module, mlp: nn.Module, drop_path: nn.Module, layer_scale: torch.Tensor | None
) -> torch.Tensor:
    """A block's MLP branch without its residual, ``drop_path(layer_scale * mlp(norm(x)))``, as one
    ``fastvit.layernorm_mlp(..., residual=False)`` call: for the blocks that add it to another
    tensor than the one the MLP normalises (ConvNeXt, EdgeNeXt: the block's input, before a conv).

    Args:
        x: (..., D) tokens, e.g. a (B, C, H, W) map's channels-last view (B, H, W, C).
        norm, mlp, drop_path: checked by the patcher as for ``fused_mlp_half``; the caller has
            handled MLP dropout (``mlp_dropout_falls_back``).
        layer_scale: (D,) or None.

    Returns:
        (..., D), x's shape.

    Example:
        >>> branch = fused_mlp_branch(x.permute(0, 2, 3, 1), self.norm, self.mlp, self.drop_path, self.gamma)
    """
    return fastvit.layernorm_mlp(
        x, residual=False, layer_scale=layer_scale, sample_scale=drop_path_scale(drop_path, x),
        **norm_arguments(norm), **mlp_arguments(mlp),
    )  # fmt: skip


class FusedGammaMlpHalf(FusedModule):
    """What the fused timm blocks share: ``_fastvit_mlp_half(x)`` computes
    ``x + drop_path2(layer_scale * mlp(norm2(x)))`` with one op call (Eva / BEiT: ``gamma_2``, the
    default here; timm's ``Block`` overrides ``_fastvit_original_half`` and ``_fastvit_layer_scale``
    for its ``ls2``).

    Calls the op does not cover (MLP dropout active in training, a hook on or a replacement of a
    bypassed submodule) run timm's modules in timm's order.
    """

    fastvit_part = "mlp"
    fastvit_op = "layernorm_mlp"

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module."""
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        """The (D,) layer scale of the MLP branch, or None."""
        return self.gamma_2

    def _fastvit_drop_path(self) -> nn.Module:
        """The MLP branch's drop path (CaiT's blocks share one between both branches)."""
        return self.drop_path2

    def _fastvit_norm(self) -> nn.Module:
        """The norm before the MLP (TinyViT's sits inside its ``NormMlp``)."""
        return self.norm2

    def _fastvit_mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N, D): the block's MLP half, fused."""
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_half(x)
        traced = method_leaf(self, "_fastvit_mlp_half", x)  # torch.fx: decided when the graph runs
        if traced is not None:
            return traced
        return self._fastvit_fused_half(x)

    def _fastvit_fused_half(self, x: torch.Tensor) -> torch.Tensor:
        """``_fastvit_mlp_half`` in eager mode (apart from its TorchScript branch: TorchScript parses
        a method whole, and cannot parse the ``**`` of ``fused_mlp_half``)."""
        if not self._fastvit_submodules_intact():
            return self._fastvit_original_half(x)
        return fused_mlp_half(self, x, self._fastvit_norm(), self.mlp, self._fastvit_drop_path(),
                              self._fastvit_layer_scale(), self._fastvit_original_half)  # fmt: skip

    def extra_repr(self) -> str:
        kind, norm = type(self.mlp).__name__, self._fastvit_norm()
        rms = ", norm=rms" if isinstance(norm, RMS_NORMS) else ""
        eps = norm_arguments(norm)["eps"]  # what the op uses (nn.RMSNorm's None: float32's eps)
        return f"dim={norm.normalized_shape[0]}, eps={eps}{rms}, mlp={kind}, fastvit={self.fastvit_op}"


class PreNormMlpHalf(FusedGammaMlpHalf):
    """The second half of timm's other pre-norm blocks, ``x + drop_path2([ls2](mlp(norm2(x))))``,
    ``ls2`` a ``LayerScale`` (its gamma goes to the op) or Identity where the block has one (Swin,
    SAM, Hiera, HieraDet, MaxViT, DaViT, Twins, NesT, GCViT, the DeepSeek tower ...). Each fused
    block's forward runs timm's attention half, then ``self._fastvit_mlp_half(x)``."""

    fastvit_bypassed = MLP_BYPASSED

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module."""
        x_mlp = self.mlp(self.norm2(x))
        ls2 = getattr(self, "ls2", None)
        if ls2 is not None:
            x_mlp = ls2(x_mlp)
        return x + self.drop_path2(x_mlp)

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        ls2 = getattr(self, "ls2", None)
        return ls2.gamma if isinstance(ls2, LayerScale) else None


# the bypassed submodules of a block with one drop_path for both branches (CaiT, ConViT)
SHARED_DROP_PATH_BYPASSED = (*(name for name in MLP_BYPASSED if name != "drop_path2"), "drop_path")


class SharedDropPathMlpHalf(FusedGammaMlpHalf):
    """The MLP half of timm's blocks with one ``drop_path`` module for both branches (timm calls it
    in each, each call its own draw): ``x + drop_path([gamma_2 *] mlp(norm2(x)))`` (CaiT, with its
    ``gamma_2``; ConViT, without: set ``fastvit_gamma = False``)."""

    fastvit_bypassed = SHARED_DROP_PATH_BYPASSED
    fastvit_gamma = True  # the block scales its MLP branch by gamma_2

    def _fastvit_original_half(self, x: torch.Tensor) -> torch.Tensor:
        """timm's second half, module by module, with ``gamma_2`` (ConViT's, without, overrides it:
        TorchScript compiles this method where an FX graph calls the fused half, and it cannot read
        the class attribute ``fastvit_gamma``)."""
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    def _fastvit_layer_scale(self) -> torch.Tensor | None:
        return self.gamma_2 if self.fastvit_gamma else None

    def _fastvit_drop_path(self) -> nn.Module:
        return self.drop_path


class SharedDropPathBlock(SharedDropPathMlpHalf):
    """A whole pre-norm block with one ``drop_path`` for both branches: timm's attention half
    ``x + drop_path([gamma_1 *] attn(norm1(x)))``, then the fused MLP half (CaiT's
    ``LayerScaleBlock``, with its gammas; ConViT's ``Block``, ``fastvit_gamma = False``). Same
    signature as timm's, ``forward(x)``: x (B, N, C) -> (B, N, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x)
        if self._fastvit_overridden():  # the whole forward: the override may be the block's own forward
            return super().forward(x)
        x_attn = self.attn(self.norm1(x))
        if self.fastvit_gamma:
            x_attn = self.gamma_1 * x_attn
        return self._fastvit_mlp_half(x + self.drop_path(x_attn))
