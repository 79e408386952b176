"""``FusedLayerNormMLP``: the norm + MLP half of a pre-norm ViT block as one fused op.

    x + drop_path(layer_scale * fc2(act(fc1(norm(x)))))          (gated: fc2(act(gate) * value))

with timm's submodule names (``norm``, ``fc1``, ``fc2``; ``fc1_gate`` for a two-linear gated MLP),
built standalone or around existing modules (``from_modules``: the given modules themselves, not
copies). LayerNorm or RMSNorm; GELU (erf or tanh), quick_gelu, SiLU; plain or gated (SwiGLU).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from fastvit.backend import current_backend
from fastvit.nn.fused import submodules_called_problem
from fastvit.ops.layernorm_mlp import activate, layernorm_mlp, resolve_activation

__all__ = ["FusedLayerNormMLP"]


class FusedLayerNormMLP(nn.Module):
    """Norm -> fc1 -> activation (-> gate) -> fc2 -> LayerScale -> drop-path -> residual add, one op.

    Args:
        dim: token width D.
        hidden_dim: fc2's input width; default ``int(dim * mlp_ratio)``. Gated, fc1 produces twice
            that, packed [gate; value] (timm's SwiGLUPacked layout).
        mlp_ratio: hidden_dim / dim when hidden_dim is not given (timm allows any ratio).
        bias: fc1 and fc2 have biases.
        eps: norm epsilon (timm 1e-6, Hugging Face ViT 1e-12).
        approximate: F.gelu's keyword, kept working: ``"none"`` (erf) or ``"tanh"``.
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"quick_gelu"`` or ``"silu"``.
        norm: ``"layernorm"`` (nn.LayerNorm) or ``"rms"`` (nn.RMSNorm).
        gated: a gated MLP: fc2(act(gate) * value).
        residual: add x to the branch.
        init_values: LayerScale init (timm's name); None for no layer scale.
        drop_path: stochastic-depth rate: in training, each sample's branch is dropped with this
            probability and the kept ones scaled by 1 / (1 - drop_path), as timm's DropPath.
        device, dtype: of the new parameters (norm, fc1, fc2, layer scale), as for nn.Linear.

    Shapes: x (..., D) -> (..., D); ``forward(x, sample_scale=None)`` also takes an explicit
    (x.shape[0],) per-sample factor, multiplied with drop-path's.

    Example:
        >>> mlp = fastvit.nn.FusedLayerNormMLP(768, mlp_ratio=4.0, init_values=1e-5, drop_path=0.1).cuda()
        >>> y = mlp(torch.randn(8, 197, 768, device="cuda"))          # (8, 197, 768)
        >>> import timm
        >>> block = timm.create_model("deit3_small_patch16_224").blocks[0]  # a block with LayerScale
        >>> fused = fastvit.nn.FusedLayerNormMLP.from_modules(block.norm2, block.mlp.fc1, block.mlp.fc2, block.ls2)
        >>> swiglu = fastvit.nn.FusedLayerNormMLP(1024, 2816, norm="rms", activation="silu", gated=True)  # AIMv2-large
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        *,
        mlp_ratio: float = 4.0,
        bias: bool = True,
        eps: float = 1e-6,
        approximate: str | None = None,
        activation: str | None = None,
        norm: str = "layernorm",
        gated: bool = False,
        residual: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden_dim = int(dim * mlp_ratio) if hidden_dim is None else hidden_dim
        factory = {"device": device, "dtype": dtype}
        if norm not in ("layernorm", "rms"):
            raise ValueError(f"norm must be 'layernorm' or 'rms', got {norm!r}")
        self.norm = nn.LayerNorm(dim, eps=eps, **factory) if norm == "layernorm" else nn.RMSNorm(dim, eps, **factory)
        self.fc1 = nn.Linear(dim, 2 * hidden_dim if gated else hidden_dim, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, **factory)
        self.fc1_gate: nn.Linear | None = None
        self.gated = bool(gated)
        self._configure(approximate, activation, residual, drop_path)
        self.ls: nn.Module | None = None
        if init_values is None:
            self.register_parameter("layer_scale", None)
        else:
            self.layer_scale = nn.Parameter(torch.full((dim,), float(init_values), **factory))

    def _configure(self, approximate: str | None, activation: str | None, residual: bool, drop_path: float) -> None:
        self.activation = resolve_activation(approximate, activation)
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        self.residual = bool(residual)
        self.drop_path = float(drop_path)

    @property
    def approximate(self) -> str | None:
        """F.gelu's keyword for the GELU activations ("none" / "tanh"); None for the others.

        Example:
            >>> fastvit.nn.FusedLayerNormMLP(64, activation="gelu_tanh").approximate
            'tanh'
        """
        return {"gelu": "none", "gelu_tanh": "tanh"}.get(self.activation)

    @property
    def norm_kind(self) -> str:
        """``"rms"`` for an nn.RMSNorm, else ``"layernorm"``.

        Example:
            >>> fastvit.nn.FusedLayerNormMLP(64, norm="rms").norm_kind
            'rms'
        """
        return "rms" if isinstance(self.norm, nn.RMSNorm) else "layernorm"

    @classmethod
    def from_modules(
        cls,
        norm: nn.LayerNorm,
        fc1: nn.Linear,
        fc2: nn.Linear,
        layer_scale: nn.Module | torch.Tensor | None = None,
        *,
        approximate: str | None = None,
        activation: str | None = None,
        gated: bool = False,
        fc1_gate: nn.Linear | None = None,
        residual: bool = True,
        drop_path: float = 0.0,
    ) -> FusedLayerNormMLP:
        """Wrap existing modules (registered as they are: same objects, same Parameters).

        Args:
            norm: nn.LayerNorm (or timm's LayerNorm) or nn.RMSNorm over the last dim (D,).
            fc1: nn.Linear(D, hidden); fc2: nn.Linear(hidden, D). Gated with ``fc1_gate``: fc1 is
                the value (``up_proj``) and ``fc1_gate`` the gate (``gate_proj``), both (D -> hidden);
                gated without: fc1 is nn.Linear(D, 2 * hidden) packed [gate; value] (SwiGLUPacked).
            layer_scale: timm's LayerScale module (its ``gamma`` is read at call time; the module
                becomes the submodule ``ls``), a (D,) Parameter or tensor (registered as
                ``layer_scale``), nn.Identity or None.
            approximate, activation, residual, drop_path: as in the constructor.
            gated: a gated MLP (implied by ``fc1_gate``).
            fc1_gate: the gate projection of a two-linear gated MLP (registered as ``fc1_gate``).

        Returns:
            A ``FusedLayerNormMLP`` whose ``norm``, ``fc1``, ``fc2`` (``fc1_gate``, ``ls``) are the
            given modules themselves: it shares their Parameters, and its forward computes
            ``x + layer_scale * fc2(act(fc1(norm(x))))`` as one op.

        Example:
            >>> norm = torch.nn.LayerNorm(384, eps=1e-6)
            >>> fc1, fc2 = torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384)
            >>> mlp = fastvit.nn.FusedLayerNormMLP.from_modules(norm, fc1, fc2)
            >>> mlp.fc1 is fc1
            True
            >>> x = torch.randn(2, 197, 384)
            >>> torch.testing.assert_close(mlp(x), x + fc2(torch.nn.functional.gelu(fc1(norm(x)))))
        """
        # exact types: the fused op reads the weights, so a subclass's own forward would be ignored
        if type(norm) not in (*_layernorm_types(), nn.RMSNorm) or len(norm.normalized_shape) != 1:
            raise TypeError(
                f"norm must be an nn.LayerNorm (or timm's LayerNorm) or nn.RMSNorm over the last dim, not a "
                f"subclass whose forward the fused op would ignore; got {type(norm).__name__} {norm!r}"
            )
        gated = gated or fc1_gate is not None
        linears = (("fc1", fc1), ("fc2", fc2)) + ((("fc1_gate", fc1_gate),) if fc1_gate is not None else ())
        for name, mod in linears:
            if type(mod) is not nn.Linear:
                raise TypeError(
                    f"{name} must be exactly nn.Linear, not a subclass or wrapper whose forward the fused op "
                    f"would ignore; got {type(mod).__name__}"
                )
        dim = norm.normalized_shape[0]
        fc1_out = fc1.out_features // 2 if gated and fc1_gate is None else fc1.out_features
        if (fc1.in_features != dim or fc2.out_features != dim or fc2.in_features != fc1_out
                or (gated and fc1_gate is None and fc1.out_features % 2)):
            need = f"fc1 {dim} -> 2H (packed [gate; value])" if gated and fc1_gate is None else f"fc1 {dim} -> H"
            raise ValueError(
                f"modules do not chain: norm over {dim}, fc1 {fc1.in_features} -> {fc1.out_features}, "
                f"fc2 {fc2.in_features} -> {fc2.out_features}; need {need} and fc2 H -> {dim}"
            )
        if fc1_gate is not None and (fc1_gate.in_features, fc1_gate.out_features) != (dim, fc1.out_features):
            raise ValueError(
                f"fc1_gate must map {dim} -> {fc1.out_features} like fc1, got "
                f"{fc1_gate.in_features} -> {fc1_gate.out_features}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.norm, self.fc1, self.fc2 = norm, fc1, fc2
        self.fc1_gate = fc1_gate
        self.gated = gated
        self._configure(approximate, activation, residual, drop_path)
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
        """The layer-scale vector used at call time (the LayerScale module's, else ``layer_scale``),
        (dim,); None without layer scale.

        Example:
            >>> fastvit.nn.FusedLayerNormMLP(64, init_values=1e-5).gamma.shape
            torch.Size([64])
        """
        return self.ls.gamma if self.ls is not None else self.layer_scale

    def _drop_path_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        if not (self.training and self.drop_path > 0.0):
            return None
        keep = 1.0 - self.drop_path
        return x.new_empty((x.shape[0],)).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor, sample_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x + drop_path(sample_scale * layer_scale * fc2(act(fc1(norm(x)))))``, one op.

        Args:
            x: (..., D) tokens, e.g. (B, N, D) or (T, D). Outside autocast in the parameters' dtype
                (the norm's may be fp32 with fp16 / bf16 x, F.layer_norm's mix); fp16, bf16 and
                fp32 run the kernels, float64 the ``torch`` route.
            sample_scale: (x.shape[0],) per-sample factor on the branch, in x's dtype (needs a
                leading batch dim), multiplied with drop-path's own in training; or None.

        Returns:
            x's shape (the branch alone with ``residual=False``). dtype: x's outside autocast;
            under autocast that of ``fastvit.layernorm_mlp`` (fp32 for an fp32 residual stream,
            the autocast dtype for ``residual=False`` with no fp32 scale).

        Example:
            >>> mlp = fastvit.nn.FusedLayerNormMLP(384).train()  # drop_path=0: no dropped samples
            >>> x = torch.randn(2, 197, 384)
            >>> y = mlp(x, sample_scale=torch.tensor([1.0, 0.0]))  # sample 1's branch off
            >>> torch.equal(y[1], x[1]), y.shape, y.dtype
            (True, torch.Size([2, 197, 384]), torch.float32)
        """
        drop = self._drop_path_scale(x) if x.dim() >= 2 else None
        if drop is not None:
            sample_scale = drop if sample_scale is None else sample_scale * drop
        submodules = (("norm", self.norm), ("fc1", self.fc1), ("fc2", self.fc2), ("fc1_gate", self.fc1_gate),
                      ("ls", self.ls))  # fmt: skip
        if submodules_called_problem(self, submodules):
            return self._forward_by_submodules(x, sample_scale)
        gate = self.fc1_gate
        eps = self.norm.eps
        if eps is None:  # nn.RMSNorm's default: the input dtype's machine epsilon
            eps = torch.finfo(x.dtype).eps
        return layernorm_mlp(
            x, self.norm.weight, getattr(self.norm, "bias", None), self.fc1.weight, self.fc1.bias, self.fc2.weight,
            self.fc2.bias, eps=eps, activation=self.activation, norm=self.norm_kind, gated=self.gated,
            fc1_gate_weight=gate.weight if gate is not None else None,
            fc1_gate_bias=gate.bias if gate is not None else None,
            residual=self.residual, layer_scale=self.gamma, sample_scale=sample_scale,
        )

    def _forward_by_submodules(self, x: torch.Tensor, sample_scale: torch.Tensor | None) -> torch.Tensor:
        """The forward as calls of the submodules (their hooks run): the fused op's math, op by op."""
        normed = self.norm(x)
        a = self.fc1(normed)
        if not self.gated:
            h = activate(a, self.activation)
        elif self.fc1_gate is not None:  # two linears: fc1 is the value (up) projection
            h = activate(self.fc1_gate(normed), self.activation) * a
        else:  # packed [gate; value]
            gate, value = a.chunk(2, dim=-1)
            h = activate(gate, self.activation) * value
        branch = self.fc2(h)
        if self.ls is not None:
            branch = self.ls(branch)
        elif self.layer_scale is not None:
            branch = branch * self.layer_scale
        if sample_scale is not None:
            branch = branch * sample_scale.reshape((-1,) + (1,) * (x.dim() - 1))
        return x + branch if self.residual else branch

    def extra_repr(self) -> str:
        """The module's sizes and options in its ``repr`` (the backend is read at call time).

        Example:
            >>> fastvit.nn.FusedLayerNormMLP(64).extra_repr()[:30]
            'dim=64, hidden_dim=256, eps=1e'
        """
        return (
            f"dim={self.fc1.in_features}, hidden_dim={self.fc2.in_features}, eps={self.norm.eps}, "
            f"norm={self.norm_kind!r}, activation={self.activation!r}, gated={self.gated}, "
            f"residual={self.residual}, layer_scale={self.gamma is not None}, "
            f"drop_path={self.drop_path}, backend={current_backend()!r}"
        )


def _layernorm_types() -> tuple[type, ...]:
    """nn.LayerNorm, and timm's LayerNorm (the same math) when timm is loaded."""
    timm_layers = sys.modules.get("timm.layers")
    timm_norm = getattr(timm_layers, "LayerNorm", None) if timm_layers is not None else None
    return (nn.LayerNorm, timm_norm) if isinstance(timm_norm, type) else (nn.LayerNorm,)
