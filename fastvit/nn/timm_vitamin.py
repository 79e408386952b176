"""timm's ViTamin blocks (``vitamin_*``: a hybrid conv stem, then timm's pre-norm ViT ``Block`` with
ViTamin's ``GeGluMlp``), whose MLP half is one ``fastvit.layernorm_mlp`` call.

``GeGluMlp`` normalises its input itself (``norm``, a LayerNorm) and computes
``w2(act(w0(x)) * w1(x))``: a GELU-gated MLP whose gate is ``w0`` and value ``w1``. The block's half
is ``x + drop_path2(ls2(mlp(norm2(x))))``: two LayerNorms in a row, which no one norm can stand for
(the second normalises the first's affine output). So ``norm2`` runs as the block's module and
the rest, ``mlp.norm``, the gated MLP, the layer scale and the drop path, is one op call with
``residual=False``; the residual add is the block's. MLP dropout in training, or a hook on (or a
replacement of) one of the modules the op reads, runs timm's modules. Importing this module
imports timm.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from timm.models.vitamin import GeGluMlp

import fastvit
from fastvit.nn.timm_mlp import drop_path_scale, mlp_activation, mlp_dropout_falls_back, norm_arguments
from fastvit.nn.timm_vit import _BlockForward

__all__ = ["FusedGeGluBlock", "GeGluMlp", "geglu_mlp_arguments"]


def geglu_mlp_arguments(mlp: GeGluMlp) -> dict[str, torch.Tensor | float | str | None]:
    """``fastvit.layernorm_mlp``'s norm and MLP arguments for ViTamin's ``GeGluMlp``: its own ``norm``
    as the op's norm, ``w1`` the value (fc1), ``w0`` the gate, ``w2`` fc2 (checked by the patcher:
    Linears, an activation the op has, a LayerNorm or RMS norm over the last dim)."""
    return dict(
        **norm_arguments(mlp.norm), fc1_weight=mlp.w1.weight, fc1_bias=mlp.w1.bias, fc1_gate_weight=mlp.w0.weight,
        fc1_gate_bias=mlp.w0.bias, fc2_weight=mlp.w2.weight, fc2_bias=mlp.w2.bias, activation=mlp_activation(mlp.act),
    )  # fmt: skip


class FusedGeGluBlock(_BlockForward, Block):
    """timm ``Block`` with ViTamin's ``GeGluMlp``: ``norm2`` runs as a module, then ``mlp`` (its norm,
    the GELU-gated MLP), ``ls2`` and ``drop_path2`` are one ``fastvit.layernorm_mlp(...,
    residual=False)`` call added to x. Same signature as timm's, ``forward(x, attn_mask=None,
    is_causal=False)``: x (B, N, C) -> (B, N, C).

    Example:
        >>> model = timm.create_model("vitamin_small_224")
        >>> fastvit.patch(model)  # blocks.* -> FusedGeGluBlock
    """

    fastvit_bypassed = ("mlp", "mlp.norm", "mlp.w0", "mlp.act", "mlp.w1", "mlp.drop1", "mlp.w2", "mlp.drop2", "ls2",
                        "drop_path2")  # fmt: skip

    def _fastvit_fused_half(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fastvit_submodules_intact() or mlp_dropout_falls_back(self, self.mlp):
            return self._fastvit_original_half(x)
        h = self.norm2(x)  # the block's own norm: the op normalises again with mlp.norm
        sample_scale = drop_path_scale(self.drop_path2, h)
        return x + fastvit.layernorm_mlp(
            h, residual=False, layer_scale=self._fastvit_layer_scale(), sample_scale=sample_scale,
            **geglu_mlp_arguments(self.mlp),
        )  # fmt: skip

    def extra_repr(self) -> str:
        norm = self.mlp.norm
        eps = norm_arguments(norm)["eps"]
        return f"dim={norm.normalized_shape[0]}, eps={eps}, mlp=GeGluMlp, fastvit={self.fastvit_op}"
