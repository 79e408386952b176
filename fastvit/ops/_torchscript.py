"""TorchScript forms of the public ops, for FX graphs that are scripted afterwards.

``torch.fx`` records each op as a leaf node (``fastvit/ops/_fx.py``); ``torch.jit.script`` of
that ``GraphModule`` (timm's ``test_model_forward_fx_torchscript``, torchvision's feature
extractors scripted for deployment) must then compile the op itself, which TorchScript cannot: it
dispatches to Triton and takes keyword-only arguments. ``torch.jit.script`` compiles a function's
``__original_fn`` when the function carries ``__script_if_tracing_wrapper`` (the hook
``torch.jit.script_if_tracing`` uses), so each leaf gets one of the functions below:

- under TorchScript (``torch.jit.is_scripting()``, a static branch: the rest is never compiled)
  the op's math in plain PyTorch, materialising the scores like the original modules do;
- anywhere else, the op itself. ``torch.compile`` traces ``__original_fn`` too, and so still
  reaches the fused kernels.

The annotations are ``typing.Optional`` / ``Tuple`` (TorchScript's), and the names and parameter
names are the ops' own, so a graph's keyword calls bind. ``return_lse=True`` cannot be scripted
(its return type differs).
"""

import math
from typing import Dict, List, Optional, Tuple  # noqa: UP035 (TorchScript reads typing's forms)

import torch
import torch.nn.functional as F

__all__ = ["SCRIPTABLE", "flash_attention", "layernorm_mlp", "patch_embed", "rotary_qk"]

# The public ops, filled in by fastvit.ops.<op> as they are defined (no import cycle).
EAGER: Dict[str, object] = {}  # noqa: UP006


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,  # noqa: UP045
    causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,  # noqa: UP045
    rel_pos: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,  # noqa: UP006, UP045
    return_lse: bool = False,
) -> torch.Tensor:
    if torch.jit.is_scripting():
        if return_lse:
            raise RuntimeError("fastvit.flash_attention(return_lse=True) cannot be compiled by TorchScript")
        step = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * step
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.float()
        if rel_pos is not None:
            rel_h, rel_w = rel_pos
            scores = scores + (rel_h.float().unsqueeze(-1) + rel_w.float().unsqueeze(-2)).flatten(-2)
        if causal:
            keep = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)  # fully masked rows give zeros
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
        return torch.matmul(probs, v.float()).to(q.dtype)
    return EAGER["flash_attention"](
        q, k, v, scale=scale, causal=causal, attn_mask=attn_mask, rel_pos=rel_pos, return_lse=return_lse
    )


def layernorm_mlp(
    x: torch.Tensor,
    norm_weight: Optional[torch.Tensor],  # noqa: UP045
    norm_bias: Optional[torch.Tensor],  # noqa: UP045
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],  # noqa: UP045
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],  # noqa: UP045
    eps: float = 1e-6,
    approximate: Optional[str] = None,  # noqa: UP045
    activation: Optional[str] = None,  # noqa: UP045
    norm: str = "layernorm",
    gated: Optional[bool] = None,  # noqa: UP045
    fc1_gate_weight: Optional[torch.Tensor] = None,  # noqa: UP045
    fc1_gate_bias: Optional[torch.Tensor] = None,  # noqa: UP045
    residual: bool = True,
    layer_scale: Optional[torch.Tensor] = None,  # noqa: UP045
    sample_scale: Optional[torch.Tensor] = None,  # noqa: UP045
    hidden_norm: str = "none",
    hidden_norm_weight: Optional[torch.Tensor] = None,  # noqa: UP045
    hidden_norm_bias: Optional[torch.Tensor] = None,  # noqa: UP045
    hidden_eps: Optional[float] = None,  # noqa: UP045
) -> torch.Tensor:
    if torch.jit.is_scripting():
        act = "gelu" if activation is None else activation
        if approximate is not None:
            act = "gelu_tanh" if approximate == "tanh" else "gelu"
        if act == "gelu_pytorch_tanh" or act == "gelu_new":
            act = "gelu_tanh"
        if act == "swish":
            act = "silu"
        if norm == "none":  # the MLP alone (a post-norm block's)
            hidden = x
        elif norm == "rms":
            hidden = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            if norm_weight is not None:
                hidden = hidden * norm_weight
        else:
            hidden = F.layer_norm(x, [x.shape[-1]], norm_weight, norm_bias, eps)
        pre = F.linear(hidden, fc1_weight, fc1_bias)
        is_gated = fc1_gate_weight is not None if gated is None else gated
        value: Optional[torch.Tensor] = None  # noqa: UP045
        if is_gated:
            if fc1_gate_weight is not None:
                value = pre
                pre = F.linear(hidden, fc1_gate_weight, fc1_gate_bias)
            else:
                half = pre.shape[-1] // 2
                value = pre[..., half:]
                pre = pre[..., :half]
        if act == "quick_gelu":
            hidden = pre * torch.sigmoid(1.702 * pre)
        elif act == "silu":
            hidden = F.silu(pre)
        else:
            hidden = F.gelu(pre, approximate="tanh" if act == "gelu_tanh" else "none")
        if value is not None:
            hidden = hidden * value
        if hidden_norm == "layernorm":
            h_eps = eps if hidden_eps is None else hidden_eps
            hidden = F.layer_norm(hidden, [hidden.shape[-1]], hidden_norm_weight, hidden_norm_bias, h_eps)
        out = F.linear(hidden, fc2_weight, fc2_bias)
        if layer_scale is not None:
            out = out * layer_scale
        if sample_scale is not None:
            shape: List[int] = [-1] + [1] * (x.dim() - 1)  # noqa: UP006
            out = out * sample_scale.reshape(shape)
        return x + out if residual else out
    return EAGER["layernorm_mlp"](
        x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=eps, approximate=approximate,
        activation=activation, norm=norm, gated=gated, fc1_gate_weight=fc1_gate_weight,
        fc1_gate_bias=fc1_gate_bias, residual=residual, layer_scale=layer_scale, sample_scale=sample_scale,
        hidden_norm=hidden_norm, hidden_norm_weight=hidden_norm_weight, hidden_norm_bias=hidden_norm_bias,
        hidden_eps=hidden_eps,
    )  # fmt: skip


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,  # noqa: UP045
    pos_embed: Optional[torch.Tensor] = None,  # noqa: UP045
    prefix_tokens: Optional[torch.Tensor] = None,  # noqa: UP045
    dynamic_img_pad: bool = False,
) -> torch.Tensor:
    if torch.jit.is_scripting():
        patch = weight.shape[-1]
        if dynamic_img_pad:  # zero-pad bottom/right up to whole patches
            x = F.pad(x, [0, (patch - x.shape[-1] % patch) % patch, 0, (patch - x.shape[-2] % patch) % patch])
        tokens = F.conv2d(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)
        if pos_embed is not None and pos_embed.shape[1] == tokens.shape[1]:  # patches only
            tokens = tokens + pos_embed
            pos_embed = None
        if prefix_tokens is not None:
            tokens = torch.cat([prefix_tokens.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens if pos_embed is None else tokens + pos_embed
    return EAGER["patch_embed"](
        x, weight, bias, pos_embed=pos_embed, prefix_tokens=prefix_tokens, dynamic_img_pad=dynamic_img_pad
    )


def _rotate_lanes(x: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's ``rope_rotate_half`` (half) or ``rot`` (interleaved pairs)."""
    if half:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def rotary_composite(
    q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, rotate_half: bool
) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
    """timm's ``apply_rot_embed_cat`` on rows P: of q and k and ``torch.cat`` of rows :P, computed
    in float64 when q or the embedding is float64, else float32, and returned in q's dtype: the
    torch route of ``fastvit.rotary_qk`` and its TorchScript form."""
    compute = torch.float64 if torch.float64 in (q.dtype, rope.dtype) else torch.float32
    sin, cos = rope.to(compute).chunk(2, dim=-1)
    outs: List[torch.Tensor] = []  # noqa: UP006
    for x in (q, k):
        body = x[:, :, num_prefix_tokens:].to(compute)
        rotated = (body * cos + _rotate_lanes(body, rotate_half) * sin).to(q.dtype)
        outs.append(torch.cat([x[:, :, :num_prefix_tokens], rotated], dim=2))
    return outs[0], outs[1]


def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    rope: torch.Tensor,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:  # noqa: UP006
    if torch.jit.is_scripting():
        return rotary_composite(q, k, rope, num_prefix_tokens, rotate_half)
    return EAGER["rotary_qk"](q, k, rope, num_prefix_tokens=num_prefix_tokens, rotate_half=rotate_half)


SCRIPTABLE = {
    "flash_attention": flash_attention,
    "layernorm_mlp": layernorm_mlp,
    "patch_embed": patch_embed,
    "rotary_qk": rotary_qk,
}
