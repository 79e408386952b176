"""``fastvit.rotary_qk``: input checks, backend dispatch and autograd of the rotary embedding of q and k.

The Triton route is a forward custom op (``fastvit::rotary_qk_fwd``: one launch rotating q and k)
and a backward one (``fastvit::rotary_qk_bwd``: one launch, the transposed rotation of both
gradients), each with a fake implementation, so the op runs under ``torch.compile(fullgraph=True)``
without a graph break. The ``torch`` route is timm's composite (``apply_rot_embed_cat`` on the
patch rows of q and of k, ``torch.cat`` of the prefix rows) in at least fp32; it also runs when
the embedding requires grad (timm's learnable mixed RoPE in training: the kernels compute no
gradient for the embedding) and for float64.
"""

from __future__ import annotations

import torch

from fastvit.backend import resolve_backend, warn_once
from fastvit.ops._autograd import call, function_twin, no_double_backward
from fastvit.ops._checks import check_flags, check_same_device, check_tensor, usable_in_autograd
from fastvit.ops._fx import fx_leaf
from fastvit.ops._torchscript import rotary_composite

__all__ = ["rotary_qk"]

# dtypes the Triton kernel takes (q and k; the embedding may be any of them); float64 is valid
# input and runs on the torch route.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)


# ---------------------------------------------------------------------------------------------
# Triton route: custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::rotary_qk_fwd", mutates_args=())
def _rotary_qk_fwd(
    q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor, num_prefix: int, half: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvit.kernels.rotary import rotary_qk_forward

    return rotary_qk_forward(q, k, rope, num_prefix, half)


@_rotary_qk_fwd.register_fake
def _(q, k, rope, num_prefix, half):
    return q.new_empty(q.shape), q.new_empty(k.shape)


@torch.library.custom_op("fastvit::rotary_qk_bwd", mutates_args=())
def _rotary_qk_bwd(
    grad_q: torch.Tensor, grad_k: torch.Tensor, rope: torch.Tensor, num_prefix: int, half: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvit.kernels.rotary import rotary_qk_backward

    return rotary_qk_backward(grad_q, grad_k, rope, num_prefix, half)


@_rotary_qk_bwd.register_fake
def _(grad_q, grad_k, rope, num_prefix, half):
    return grad_q.new_empty(grad_q.shape), grad_q.new_empty(grad_k.shape)


def _setup_context(ctx, inputs, output):
    q, _, rope, num_prefix, half = inputs
    ctx.save_for_backward(rope)
    ctx.num_prefix, ctx.half = num_prefix, half
    ctx.like = (q.shape, q.dtype, q.device)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None (see _backward)


def _backward(ctx, grad_q, grad_k):
    (rope,) = ctx.saved_tensors
    shape, dtype, device = ctx.like
    # an output whose gradient autograd did not materialise (custom ops may pass None): its input
    # gets no gradient (None, as on the torch route, where q and k are separate graphs), not zeros
    needs_q = ctx.needs_input_grad[0] and grad_q is not None
    needs_k = ctx.needs_input_grad[1] and grad_k is not None
    grad_q = torch.zeros(shape, dtype=dtype, device=device) if grad_q is None else grad_q
    grad_k = torch.zeros(shape, dtype=dtype, device=device) if grad_k is None else grad_k
    dq, dk = call(_rotary_qk_bwd, _bwd_function, grad_q, grad_k, rope, ctx.num_prefix, ctx.half)
    return dq if needs_q else None, dk if needs_k else None, None, None, None


_rotary_qk_fwd.register_autograd(_backward, setup_context=_setup_context)
# first derivatives only: a double backward raises an error naming the torch route; the twins run
# under torch.func transforms (fastvit.ops._autograd)
_bwd_function = no_double_backward(_rotary_qk_bwd, "rotary_qk")
_rotary_qk_fwd_function = function_twin(_rotary_qk_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# torch route: timm's composite
# ---------------------------------------------------------------------------------------------
def _torch_route(q, k, rope, num_prefix, half):
    """timm's composite (``apply_rot_embed_cat`` on rows P: and ``torch.cat`` of rows :P), at least
    fp32, in q's dtype: the function the TorchScript form runs too."""
    return rotary_composite(q, k, rope, num_prefix, half)


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
def _validate(q, k, rope, num_prefix_tokens, rotate_half) -> None:
    for name, t in (("q", q), ("k", k)):
        check_tensor(name, t, ndim=4, dtypes=_ALL_DTYPES, shape_hint="(batch, heads, tokens, head_dim)")
    check_tensor("rope", rope, dtypes=_ALL_DTYPES)
    check_same_device(q=q, k=k, rope=rope)
    check_flags(rotate_half=rotate_half)
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool):
        raise TypeError(f"num_prefix_tokens must be an int, got {num_prefix_tokens!r}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have the same dtype, got q {str(q.dtype)[6:]}, k {str(k.dtype)[6:]}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, H, N, D): q is {tuple(q.shape)}, k is {tuple(k.shape)}")
    batch, heads, n_tokens, head_dim = q.shape
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even (lanes rotate in pairs), got q {tuple(q.shape)}")
    if not 0 <= num_prefix_tokens <= n_tokens:
        raise ValueError(
            f"num_prefix_tokens must be in [0, N] = [0, {n_tokens}] (q {tuple(q.shape)}), got {num_prefix_tokens}"
        )
    rotated = n_tokens - num_prefix_tokens
    target = (batch, heads, rotated, 2 * head_dim)
    padded = (1,) * (4 - rope.dim()) + tuple(rope.shape)
    if not 2 <= rope.dim() <= 4 or padded[2:] != target[2:] or any(
        r not in (1, t) for r, t in zip(padded[:2], target[:2], strict=True)
    ):
        raise ValueError(
            f"rope must be timm's [sin, cos] embedding of the {rotated} rotated tokens, shaped "
            f"(N - P, 2D) or broadcastable (B|1, H|1, N - P, 2D) = ({batch}|1, {heads}|1, {rotated}, {2 * head_dim}) "
            f"for q {tuple(q.shape)} with {num_prefix_tokens} prefix tokens, got {tuple(rope.shape)}"
        )


@fx_leaf  # one node in torch.fx graphs
def rotary_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    rope: torch.Tensor,
    *,
    num_prefix_tokens: int = 0,
    rotate_half: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's rotary position embedding of q and k in one pass: rows past the first
    ``num_prefix_tokens`` are rotated (``apply_rot_embed_cat``), the prefix rows are copied.

    Args:
        q, k: (B, H, N, D) queries and keys, one dtype, D even; any strides (views of timm's packed
            qkv are read in place).
        rope: timm's embedding as ``Eva`` passes it to its blocks: [sin, cos] concatenated along the
            last dim, (N - P, 2D), or broadcastable to (B, H, N - P, 2D) ((H, N - P, 2D) per block
            for mixed RoPE, (B, 1, N - P, 2D) after patch dropout); any float dtype.
        num_prefix_tokens: P, the leading tokens (class, register) that stay unrotated.
        rotate_half: timm's ``rotate_half`` layout (lanes i and i + D/2 pair up: DINOv3, MRoPE), else
            interleaved pairs (2i, 2i + 1: EVA02, the ``vit_*_rope_*`` models).

    Returns:
        (q_rot, k_rot), contiguous (B, H, N, D) in q's dtype. The rotation is computed in fp32 (in
        float64 for float64 inputs) and rounded once, as timm computes it with its fp32 embedding.

    Routes: the Triton kernel for fp16, bf16 and fp32 q and k; the ``torch`` composite for float64,
    on the CPU under ``auto``, and where the embedding requires grad (timm's learnable mixed RoPE in
    training: the kernel computes no gradient for it). Autocast: none (timm's multiplies and adds
    run in their inputs' dtypes under autocast too). Differentiable in q and k (and rope on the
    ``torch`` route).

    Example:
        >>> qkv = torch.randn(8, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
        >>> q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D) views
        >>> rope = torch.randn(196, 128, device="cuda")  # timm's fp32 [sin, cos] of 14 x 14 patches
        >>> q, k = fastvit.rotary_qk(q, k, rope, num_prefix_tokens=1)
    """
    _validate(q, k, rope, num_prefix_tokens, rotate_half)
    q, k, rope = usable_in_autograd(q, k, rope)
    device = q.device
    route = resolve_backend(device, "rotary_qk")
    if route != "torch":
        if q.dtype not in _KERNEL_DTYPES or rope.dtype not in _KERNEL_DTYPES:
            warn_once(
                "rotary_qk:float64",
                f"fastvit.rotary_qk: the {route} backend takes fp16, bf16 and fp32; running the torch composite "
                f"for q {str(q.dtype)[6:]}, rope {str(rope.dtype)[6:]}",
            )
            route = "torch"
        elif rope.requires_grad and torch.is_grad_enabled():
            # the kernels do not compute the embedding's gradient (timm's buffers need none)
            route = "torch"
    if route == "torch":
        return _torch_route(q, k, rope, num_prefix_tokens, rotate_half)
    return call(_rotary_qk_fwd, _rotary_qk_fwd_function, q, k, rope, num_prefix_tokens, rotate_half)
