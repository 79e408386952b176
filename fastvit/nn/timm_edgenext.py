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

The block's other parts run timm's modules: its inverted-bottleneck MLP adds to the block's input
(before the split depthwise convs and the attention), not to the tensor it normalises, so it is
no ``fastvit.layernorm_mlp`` call (reported). See ``fastvit.nn.fused`` for how the swap works.
Importing this module imports timm.
"""

from __future__ import annotations

import torch
from timm.models.edgenext import CrossCovarianceAttn

from fastvit.nn.fused import FusedModule
from fastvit.nn.timm_xcit import cross_covariance_attention

__all__ = ["FusedCrossCovarianceAttn"]


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
