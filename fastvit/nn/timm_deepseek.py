"""Fused subclass of the block of timm's DeepSeek vision tower (``deepseek_vit_*``), swapped onto a
model by ``fastvit.patch``.

``timm.models.deepseek_vit.DeepseekVitBlock`` is a pre-norm block: its attention half is timm's
``AttentionRope`` (fused on its own: ``fastvit.nn.timm_rope``), its MLP half
``x + drop_path2(mlp(norm2(x)))`` with an fp32 RMS norm (``RmsNormFp32``) and a bias-free packed
SwiGLU (``GluMlp``, [gate; value]) is one ``fastvit.layernorm_mlp`` call (the op's norm statistics
are fp32 whatever x's dtype, as that norm's; ``fastvit.nn.timm_mlp.FusedGammaMlpHalf``). Importing
this module imports timm (a release with the DeepSeek tower).
"""

from __future__ import annotations

import torch
from timm.models.deepseek_vit import DeepseekVitBlock

from fastvit.nn.timm_mlp import PreNormMlpHalf

__all__ = ["FusedDeepseekVitBlock"]


class FusedDeepseekVitBlock(PreNormMlpHalf, DeepseekVitBlock):
    """timm ``DeepseekVitBlock`` whose MLP half is one ``fastvit.layernorm_mlp`` call (same
    signature, ``forward(x, rope=None)``: x (B, N, D) -> (B, N, D)). In training with MLP dropout > 0
    the MLP half runs timm's modules.

    Example:
        >>> model = timm.create_model("deepseek_vit_412m")
        >>> fastvit.patch(model)  # blocks -> FusedDeepseekVitBlock, attentions -> FusedAttentionRope
    """

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the original math (FusedModule)
            return self._fastvit_original_forward(x, rope=rope)
        if self._fastvit_overridden():  # the whole forward: the override may be DeepseekVitBlock.forward
            return super().forward(x, rope=rope)
        x = x + self.drop_path1(self.attn(self.norm1(x), rope=rope))
        return self._fastvit_mlp_half(x)
