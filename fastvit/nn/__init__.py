"""nn.Modules over the fastvit ops."""

from fastvit.nn.axial_attention import AxialAttention
from fastvit.nn.layernorm_mlp import FusedLayerNormMLP
from fastvit.nn.patch_embed import FusedPatchEmbed
from fastvit.nn.window_attention import WindowAttention

__all__ = ["AxialAttention", "FusedLayerNormMLP", "FusedPatchEmbed", "WindowAttention"]
