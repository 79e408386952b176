"""``FusedLayerNormMLP``: the LayerNorm + MLP half of a pre-norm ViT block as one fused op.

    x + drop_path(layer_scale * fc2(gelu(fc1(norm(x)))))

with timm's submodule names (``norm``, ``fc1``, ``fc2``), built standalone or around existing
modules (``from_modules``: the given modules themselves, not copies).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from fastvit.backend import current_backend
from fastvit.ops.layernorm_mlp import layernorm_mlp

__all__ = ["FusedLayerNormMLP"]


class FusedLayerNormMLP(nn.Module):
    """LayerNorm -> fc1 -> GELU -> fc2 -> LayerScale -> drop-path -> residual add, one op.

    Args:
        dim: token width D.
        hidden_dim: fc1's output width; default ``int(dim * mlp_ratio)``.
        mlp_ratio: hidden_dim / dim when hidden_dim is not given (timm allows any ratio).
        bias: fc1 and fc2 have biases.
        eps: LayerNorm epsilon (timm 1e-6, Hugging Face ViT 1e-12).
        approximate: GELU flavour, ``"none"`` (erf) or ``"tanh"``.
        residual: add x to the branch.
        init_values: LayerScale init (timm's name); None for no layer scale.
        drop_path: stochastic-depth rate: in training, each sample's branch is dropped with this
            probability and the kept ones scaled by 1 / (1 - drop_path), as timm's DropPath.

    Shapes: x (..., D) -> (..., D); ``forward(x, sample_scale=None)`` also takes an explicit
    (x.shape[0],) per-sample factor, multiplied with drop-path's.

    Example:
        >>> mlp = FusedLayerNormMLP(768, mlp_ratio=4.0, init_values=1e-5, drop_path=0.1).cuda()
        >>> y = mlp(torch.randn(8, 197, 768, device="cuda"))          # (8, 197, 768)
        >>> fused = FusedLayerNormMLP.from_modules(block.norm2, block.mlp.fc1, block.mlp.fc2, block.ls2)
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        *,
        mlp_ratio: float = 4.0,
        bias: bool = True,
        eps: float = 1e-6,
        approximate: str = "none",
        residual: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_dim = int(dim * mlp_ratio) if hidden_dim is None else hidden_dim
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(dim, eps=eps, **factory)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, **factory)
        self._configure(approximate, residual, drop_path)
        self.ls: nn.Module | None = None
        if init_values is None:
            self.register_parameter("layer_scale", None)
        else:
            self.layer_scale = nn.Parameter(torch.full((dim,), float(init_values), **factory))

    def _configure(self, approximate: str, residual: bool, drop_path: float) -> None:
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh' (GELU flavour), got {approximate!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        self.approximate = approximate
        self.residual = bool(residual)
        self.drop_path = float(drop_path)

    @classmethod
    def from_modules(
        cls,
        norm: nn.LayerNorm,
        fc1: nn.Linear,
        fc2: nn.Linear,
        layer_scale: nn.Module | torch.Tensor | None = None,
        *,
        approximate: str = "none",
        residual: bool = True,
        drop_path: float = 0.0,
    ) -> FusedLayerNormMLP:
        """Wrap existing modules (registered as they are: same objects, same Parameters).

        Args:
            norm: nn.LayerNorm over the last dim (D,).
            fc1: nn.Linear(D, hidden); fc2: nn.Linear(hidden, D).
            layer_scale: timm's LayerScale module (its ``gamma`` is read at call time; the module
                becomes the submodule ``ls``), a (D,) Parameter or tensor (registered as
                ``layer_scale``), nn.Identity or None.
            approximate, residual, drop_path: as in the constructor.
        """
        # exact types: the fused op reads the weights, so a subclass's own forward would be ignored
        if type(norm) not in _layernorm_types() or len(norm.normalized_shape) != 1:
            raise TypeError(
                f"norm must be an nn.LayerNorm (or timm's LayerNorm) over the last dim, not a subclass whose "
                f"forward the fused op would ignore; got {type(norm).__name__} {norm!r}"
            )
        for name, mod in (("fc1", fc1), ("fc2", fc2)):
            if type(mod) is not nn.Linear:
                raise TypeError(
                    f"{name} must be exactly nn.Linear, not a subclass or wrapper whose forward the fused op "
                    f"would ignore; got {type(mod).__name__}"
                )
        dim = norm.normalized_shape[0]
        if fc1.in_features != dim or fc2.out_features != dim or fc2.in_features != fc1.out_features:
            raise ValueError(
                f"modules do not chain: norm over {dim}, fc1 {fc1.in_features} -> {fc1.out_features}, "
                f"fc2 {fc2.in_features} -> {fc2.out_features}; need fc1 {dim} -> H and fc2 H -> {dim}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.norm, self.fc1, self.fc2 = norm, fc1, fc2
        self._configure(approximate, residual, drop_path)
        self.ls = None
        self.register_parameter("layer_scale", None)
        if isinstance(layer_scale, nn.Identity) or layer_scale is None:
            pass
        elif isinstance(layer_scale, nn.Module):
            gamma = getattr(layer_scale, "gamma", None)
            if not isinstance(gamma, torch.Tensor) or tuple(gamma.shape) != (dim,):
                raise ValueError(f"layer_scale module must hold a ({dim},) tensor `gamma` (timm's LayerScale)")
            if getattr(layer_scale, "inplace", False):
                raise ValueError("layer_scale: an inplace LayerScale cannot be fused (it modifies its input)")
            self.ls = layer_scale
        elif isinstance(layer_scale, nn.Parameter):
            self.layer_scale = layer_scale
        elif isinstance(layer_scale, torch.Tensor):
            del self.layer_scale
            self.register_buffer("layer_scale", layer_scale, persistent=False)
        else:
            raise TypeError(
                f"layer_scale must be a LayerScale module, a tensor or None, got {type(layer_scale).__name__}"
            )
        if self.layer_scale is not None and tuple(self.layer_scale.shape) != (dim,):
            raise ValueError(f"layer_scale must have shape ({dim},), got {tuple(self.layer_scale.shape)}")
        return self

    @property
    def gamma(self) -> torch.Tensor | None:
        """The layer-scale vector used at call time (the LayerScale module's, else ``layer_scale``)."""
        return self.ls.gamma if self.ls is not None else self.layer_scale

    def _drop_path_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        if not (self.training and self.drop_path > 0.0):
            return None
        keep = 1.0 - self.drop_path
        return x.new_empty((x.shape[0],)).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor, sample_scale: torch.Tensor | None = None) -> torch.Tensor:
        drop = self._drop_path_scale(x) if x.dim() >= 2 else None
        if drop is not None:
            sample_scale = drop if sample_scale is None else sample_scale * drop
        return layernorm_mlp(
            x, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            eps=self.norm.eps, approximate=self.approximate, residual=self.residual, layer_scale=self.gamma,
            sample_scale=sample_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.fc1.in_features}, hidden_dim={self.fc1.out_features}, eps={self.norm.eps}, "
            f"approximate={self.approximate!r}, residual={self.residual}, layer_scale={self.gamma is not None}, "
            f"drop_path={self.drop_path}, backend={current_backend()!r}"
        )


def _layernorm_types() -> tuple[type, ...]:
    """nn.LayerNorm, and timm's LayerNorm (the same math) when timm is loaded."""
    timm_layers = sys.modules.get("timm.layers")
    timm_norm = getattr(timm_layers, "LayerNorm", None) if timm_layers is not None else None
    return (nn.LayerNorm, timm_norm) if isinstance(timm_norm, type) else (nn.LayerNorm,)
