"""fastvit: fused GPU kernels for Vision Transformers.

Public API::

    fastvit.flash_attention(q, k, v, *, scale=None, causal=False, attn_mask=None, rel_pos=None, return_lse=False)
    fastvit.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, max_seqlen_q=None, ...)
    fastvit.layernorm_mlp(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, ...)
    fastvit.patch_embed(x, weight, bias=None, *, pos_embed=None, prefix_tokens=None, dynamic_img_pad=False)
    fastvit.axial_attention(q, k, v, grid, num_prefix_tokens=0, *, scale=None)  # the axial baseline
    fastvit.window_attention(q, k, v, grid, window, *, shift=0, num_prefix_tokens=0, scale=None)  # (shifted) windows
    fastvit.rotary_qk(q, k, rope, *, num_prefix_tokens=0, rotate_half=False)  # timm's RoPE of q and k, one pass
    report = fastvit.patch(model, *, attention=True, patch_embed=True, mlp=True); fastvit.unpatch(model)
    fastvit.PatchReport, fastvit.PatchEntry  # the report and its rows (report.replaced, report.skipped)
    with fastvit.backend("auto" | "triton" | "torch" | "cuda"): ...
"""

from fastvit.backend import FastvitFallbackWarning, backend, current_backend
from fastvit.ops.axial_attention import axial_attention
from fastvit.ops.flash_attention import flash_attention
from fastvit.ops.flash_attention_varlen import flash_attention_varlen
from fastvit.ops.layernorm_mlp import layernorm_mlp
from fastvit.ops.patch_embed import patch_embed
from fastvit.ops.rotary import rotary_qk
from fastvit.ops.window_attention import window_attention
from fastvit.patching import PatchEntry, PatchReport, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "FastvitFallbackWarning",
    "PatchEntry",
    "PatchReport",
    "axial_attention",
    "backend",
    "current_backend",
    "flash_attention",
    "flash_attention_varlen",
    "layernorm_mlp",
    "patch",
    "patch_embed",
    "rotary_qk",
    "unpatch",
    "window_attention",
]
