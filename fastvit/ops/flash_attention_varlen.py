"""``fastvit.flash_attention_varlen``: packed variable-length attention (flash-attn's varlen layout).

Sequences of different lengths (a NaFlex batch of images at their own resolutions) are packed
end to end into one (T, H, D) tensor; ``cu_seqlens`` (int32, (S+1,)) holds where each one starts.
Sequence s attends only within itself, so the work is sum_s len_q(s) * len_k(s) up to tile
granularity, never S * max_len^2 as with padding.

Routes:

- ``triton``: the dense flash-attention kernels compiled with ``VARLEN=True``: a small int32 tile
  table built on the device from ``cu_seqlens`` maps each program to (sequence, block start), and
  the kernels offset their pointers to the sequence's first token. Registered as ``torch.library``
  custom ops (``fastvit::flash_attention_varlen_fwd`` / ``_bwd``) with fakes and autograd, so with
  ``max_seqlen_q`` / ``max_seqlen_k`` given the op traces under ``torch.compile(fullgraph=True)``.
- ``torch`` (the CPU default): one ``F.scaled_dot_product_attention`` call per sequence (reads
  ``cu_seqlens`` on the host); while ``torch.compile`` traces, with both maxima given, a padded
  form that reads nothing on the host (``_torch_route_padded``), so it traces with fullgraph too.

Host syncs: checking the values of ``cu_seqlens`` (starts at 0, non-decreasing, ends at T) needs
them on the host, so the Triton route does it only for a side whose ``max_seqlen_*`` is not given;
with both given it never reads ``cu_seqlens`` on the host: the same checks, and "no sequence longer
than ``max_seqlen_*``", run on the device (``_assert_on_device``). The torch route reads (and
checks) them always. Inside a CUDA graph capture a read would break the capture, so there the
op raises an error that says to pass both maxima.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from fastvit.backend import interpreter_dtype_problem, resolve_backend, warn_once
from fastvit.ops._autograd import call, function_twin, no_double_backward
from fastvit.ops._checks import (
    autocast_dtype,
    check_dense,
    check_flags,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
    check_unit_last_stride,
    may_overlap,
    stream_capturing,
    unit_last_stride,
    usable_in_autograd,
)
from fastvit.ops._fx import fx_leaf
from fastvit.ops.flash_attention import keep_nan_rows

__all__ = ["flash_attention_varlen"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALL_DTYPES = (*_KERNEL_DTYPES, torch.float64)
# The torch route computes lse over at most this many (H * rows * keys) fp32 scores at once.
_LSE_BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------
# torch route
# ---------------------------------------------------------------------------------------------
def _sequence_lse(q_s: torch.Tensor, k_s: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """(H, Lq) float32 logsumexp of ``scale * q.k`` over one sequence's keys (fp32 scores; fp64
    inputs in fp64), a block of query rows at a time. q_s (H, Lq, D), k_s (H, Lk, D), Lk >= 1."""
    heads, n_q, _ = q_s.shape
    n_k = k_s.shape[1]
    work = torch.float64 if q_s.dtype == torch.float64 else torch.float32
    k_t = k_s.to(work).transpose(-2, -1)
    rows = max(1, _LSE_BLOCK_ELEMENTS // max(1, heads * n_k))
    parts = []
    for start in range(0, n_q, rows):
        scores = torch.matmul(q_s[:, start : start + rows].to(work), k_t) * scale
        if causal:
            i = torch.arange(start, min(start + rows, n_q), device=q_s.device)[:, None]
            scores = scores.masked_fill(torch.arange(n_k, device=q_s.device)[None, :] > i, float("-inf"))
        parts.append(torch.logsumexp(scores, dim=-1).float())
    return torch.cat(parts, dim=1)


def _torch_route(q, k, v, bounds_q, bounds_k, scale, causal, return_lse):
    """One SDPA call per sequence; a sequence with queries but no keys gives zeros (lse -inf),
    still connected to q so that the output has a (zero) gradient."""
    # CPU SDPA misreads inputs whose elements share memory (see flash_attention's torch route)
    q, k, v = (t.contiguous() if may_overlap(t) else t for t in (q, k, v))
    total, heads, _ = q.shape
    outs = []
    lse = torch.full((heads, total), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    no = torch.zeros((), dtype=torch.bool, device=q.device)
    for (q0, q1), (k0, k1) in zip(bounds_q, bounds_k, strict=True):
        if q1 == q0:
            continue
        q_s = q[q0:q1].transpose(0, 1)  # (H, Lq, D)
        if k1 == k0:
            outs.append(torch.where(no, q[q0:q1], 0.0))  # zeros, zero gradient, never NaN
            continue
        k_s, v_s = k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1)
        out_s = keep_nan_rows(q_s, F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=causal, scale=scale))
        outs.append(out_s.transpose(0, 1))
        if return_lse:
            with torch.no_grad():
                lse[:, q0:q1] = _sequence_lse(q_s, k_s, scale, causal)
    out = torch.cat(outs, dim=0) if outs else torch.where(no, q, 0.0)  # T == 0: an empty (0, H, D)
    return (out, lse) if return_lse else out


def _packed_layout(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position in it) of each of the ``total`` packed tokens, from ``cu`` (S+1,), on the
    device (no host read): token t is in sequence s where cu[s] <= t < cu[s + 1]."""
    tokens = torch.arange(total, device=cu.device)
    sequence = torch.bucketize(tokens, cu[1:].long(), right=True)
    return sequence, tokens - cu[sequence].long()


def _torch_route_padded(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, return_lse):
    """The torch route with no host read of ``cu_seqlens`` (under ``torch.compile``, which cannot
    trace the per-sequence loop's reads): the sequences scattered into zero-padded (S, H, max, D)
    batches, the softmax over each sequence's keys (a (S, 1, max_q, max_k) key mask, causal top-left
    within the sequence) in fp32 (fp64 for fp64 inputs), gathered back to (T, H, D). Rows with no
    key give zeros and lse -inf. Memory grows as S * H * max_q * max_k."""
    sequences = cu_q.shape[0] - 1
    (total_q, heads, head_dim), total_k = q.shape, k.shape[0]
    seq_q, pos_q = _packed_layout(cu_q, total_q)
    seq_k, pos_k = _packed_layout(cu_k, total_k)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    max_k = max(max_k, 1)  # every key sequence empty: one padded key, masked (zeros, lse -inf)

    def padded(t: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, longest: int) -> torch.Tensor:
        batch = t.new_zeros((sequences, longest, heads, head_dim), dtype=work)
        return batch.index_put((seq, pos), t.to(work)).transpose(1, 2)  # (S, H, longest, D)

    qp, kp, vp = padded(q, seq_q, pos_q, max_q), padded(k, seq_k, pos_k, max_k), padded(v, seq_k, pos_k, max_k)
    keys = torch.arange(max_k, device=q.device)
    keep = (keys[None, :] < (cu_k[1:] - cu_k[:-1])[:, None])[:, None, None, :]  # (S, 1, 1, max_k)
    if causal:
        keep = keep & (torch.arange(max_q, device=q.device)[:, None] >= keys[None, :])
    scores = torch.matmul(qp, kp.transpose(-2, -1)).mul(scale).masked_fill(~keep, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max).detach()  # rows with no key: exp(-inf) = 0
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, vp) / torch.where(total == 0, 1.0, total)  # (S, H, max_q, D)
    out = out.transpose(1, 2)[seq_q, pos_q].to(q.dtype)  # (T, H, D)
    if not return_lse:
        return out
    with torch.no_grad():
        lse = (torch.log(total) + row_max).squeeze(-1)  # (S, H, max_q); -inf where no key
        lse = lse.permute(1, 0, 2)[:, seq_q, pos_q].float()  # (H, T)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Triton route: custom ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvit::flash_attention_varlen_fwd", mutates_args=())
def _varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvit.kernels.flash_attention import flash_attention_varlen_forward

    q, k, v = (unit_last_stride(t) for t in (q, k, v))  # checked when traced; a graph's real layout may differ
    return flash_attention_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          scale, causal)


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    from fastvit.kernels.flash_attention import lse_dtype

    total, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((heads, total), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("fastvit::flash_attention_varlen_bwd", mutates_args=())
def _varlen_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastvit.kernels.flash_attention import flash_attention_varlen_backward

    if grad_out.stride(-1) != 1 and grad_out.stride(-1) != 0:
        grad_out = grad_out.contiguous()  # the head dim is read as a vector (stride 0 is fine)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))  # as saved: a traced graph's real layout may differ
    return flash_attention_varlen_backward(grad_out, q, k, v, out, lse.contiguous(), cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, scale, causal)


@_varlen_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.scale = scale
    ctx.causal = causal
    ctx.set_materialize_grads(False)  # lse never gets a gradient: no zeros for it per backward


def _backward(ctx, grad_out, grad_lse):
    # lse is returned without gradient (the public function detaches it): grad_lse is ignored
    if grad_out is None:  # not materialised (see _setup_context): no gradient reached out
        return (None,) * 9
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = call(_varlen_bwd, _varlen_bwd_function, grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                      *ctx.max_seqlens, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None, None, None, None


_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
# first derivatives only: a double backward raises an error naming the torch route; the twins run
# under torch.func transforms (fastvit.ops._autograd)
_varlen_bwd_function = no_double_backward(_varlen_bwd, "flash_attention_varlen")
_varlen_fwd_function = function_twin(_varlen_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _check_cu_seqlens(name: str, cu: object, device: torch.device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu).__name__}")
    check_dense(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32 (cumulative sequence lengths), got "
                        f"{str(cu.dtype).replace('torch.', '')}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with S + 1 >= 2 entries (S sequences), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    return cu


def _check_max_seqlen(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _bounds(name: str, cu: torch.Tensor, total: int, tensor_name: str, why: str) -> list[tuple[int, int]]:
    """[(start, end)] of each sequence, read on the host (a sync), after checking the values; ``why``
    the read is needed, for the error raised inside a CUDA graph capture (which a sync would break)."""
    if stream_capturing(cu.device):
        raise RuntimeError(
            f"fastvit.flash_attention_varlen reads {name} on the host here ({why}), which a CUDA graph "
            "capture cannot do: pass max_seqlen_q and max_seqlen_k (at least the longest query / key "
            "sequence) and let the Triton route run"
        )
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {values[0]}")
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i}] = {values[i]} < {name}[{i - 1}] = {values[i - 1]}"
            )
    if values[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal the total tokens of {tensor_name} ({total}), got {values[-1]}"
        )
    return list(itertools.pairwise(values))


def _assert_on_device(name: str, cu: torch.Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """What ``_bounds`` checks on the host, checked on the device where a given ``max_seqlen``
    spares the host read: ``cu`` starts at 0, never decreases and ends at ``total``, and no sequence
    is longer than ``max_seqlen`` (the launch grid and the short backward are sized by it). A few
    small ops and no sync; a failure raises where the device reports it (at once on the CPU with
    this message; on a GPU at the next synchronisation, as PyTorch's generic device-side assertion,
    which ends the CUDA context), never a wrong answer or a read past the tensors."""
    lengths = cu[1:] - cu[:-1]
    ok = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (lengths.max() <= max_seqlen)
    torch._assert_async(
        ok,
        f"fastvit.flash_attention_varlen: {name} must start at 0, never decrease and end at {total}, and "
        f"{max_name} ({max_seqlen}) must be at least its longest sequence",
    )


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale) -> None:
    """Everything that can be checked from shapes, dtypes and devices (no host sync)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=_ALL_DTYPES, shape_hint="(total_tokens, heads, head_dim)")
    check_same_device(q=q, k=k, v=v)
    _, heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape[1] != heads or t.shape[2] != head_dim:
            raise ValueError(
                f"{name} must match q in heads and head_dim: q is {tuple(q.shape)} (T, H, D), "
                f"{name} is {tuple(t.shape)}; expected (Tk, {heads}, {head_dim})"
            )
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if head_dim == 0:
        raise ValueError(f"head_dim must be at least 1, got q {tuple(q.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_unit_last_stride(name, t)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"cu_seqlens_k=None means k shares q's sequences, so k must have q's total tokens "
                f"({q.shape[0]}), got k {tuple(k.shape)}; pass cu_seqlens_k for cross attention"
            )
    else:
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
            raise ValueError(
                f"cu_seqlens_k must describe as many sequences as cu_seqlens_q: got {cu_seqlens_k.shape[0]} "
                f"and {cu_seqlens_q.shape[0]} entries"
            )
    sequences = cu_seqlens_q.shape[0] - 1
    for name, value, t in (("max_seqlen_q", max_seqlen_q, q), ("max_seqlen_k", max_seqlen_k, k)):
        if _check_max_seqlen(name, value) is not None and value * sequences < t.shape[0]:
            raise ValueError(
                f"{name} ({value}) must be at least the longest sequence: {sequences} sequences of at most "
                f"{value} tokens cannot hold {'q' if t is q else 'k'}'s {t.shape[0]}"
            )
    check_scale(scale)


def _fallback_reason(q: torch.Tensor, scale: float) -> str | None:
    from fastvit.kernels.flash_attention import MAX_HEAD_DIM

    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.dtype not in _KERNEL_DTYPES:
        return f"dtype {q.dtype}"
    if interpreter_dtype_problem(q.device, q.dtype):
        return interpreter_dtype_problem(q.device, q.dtype)
    if scale <= 0:
        return f"non-positive scale {scale}"
    return None


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------
@fx_leaf  # one node in torch.fx graphs
def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention within each of S packed sequences (flash-attn's varlen layout).

    Sequence s holds queries ``q[cu_seqlens_q[s]:cu_seqlens_q[s+1]]`` and keys / values
    ``k[cu_seqlens_k[s]:cu_seqlens_k[s+1]]``; its queries attend to its keys only.

    Args:
        q: (T, H, D) queries of all sequences, packed.
        k: (Tk, H, D) keys, packed the same way (Tk == T when ``cu_seqlens_k`` is None).
        v: (Tk, H, D) values.
        cu_seqlens_q: int32 (S+1,) on q's device: 0, then the running total of the query
            lengths, ending at T. Lengths may be 0.
        cu_seqlens_k: int32 (S+1,) for the keys, ending at Tk; None: the same as ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: the longest query / key sequence (at least that: they size the
            launch grid). Given, they spare a host sync on the Triton route: the values of that
            side's ``cu_seqlens`` are then not read on the host but checked on the device (on a
            GPU a failure is PyTorch's generic device-side assertion, raised at the next
            synchronisation, which ends the CUDA context), and with both
            given the op runs under ``torch.compile(fullgraph=True)``. ``max_seqlen_k`` defaults to
            ``max_seqlen_q`` when ``cu_seqlens_k`` is None.
        scale: multiplies q.k before the softmax; default ``1 / sqrt(D)``.
        causal: query i of a sequence sees its keys j <= i (top-left aligned per sequence, like
            the dense op and SDPA's ``is_causal``).
        return_lse: also return the natural-log logsumexp of ``scale * q.k`` over each query's keys.

    Returns:
        ``out`` (T, H, D) in q's dtype, or ``(out, lse)`` with ``lse`` (H, T) float32 (no
        gradient). Queries of a sequence with no keys get zeros, zero gradients and lse = -inf.

    dtypes, strides, head dims, autocast and fallbacks as in ``fastvit.flash_attention``: any
    strides with a unit stride in D (views of a packed (T, 3, H, D) qkv are not copied); fp16,
    bf16, fp32 in the kernels, float64 and head dims > 256 on the ``torch`` route (one SDPA call
    per sequence, which reads ``cu_seqlens`` on the host).

    Raises:
        TypeError / ValueError naming the argument: q, k, v not (T, H, D) or mismatched;
        ``cu_seqlens_*`` not int32, not 1-D, on another device, of different lengths, or (when
        read: the matching ``max_seqlen_*`` not given) not starting at 0, decreasing, or not
        ending at the total tokens; ``max_seqlen_*`` not a non-negative int, or too small for
        S sequences to hold the tokens. RuntimeError (the device's assertion) where a given
        ``max_seqlen_*`` is shorter than a sequence or its ``cu_seqlens`` is malformed.

    Example:
        >>> import torch.nn.functional as F
        >>> lens = torch.tensor([197, 50, 65])                       # three images, own sizes
        >>> cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32).cuda()  # [0, 197, 247, 312]
        >>> qkv = torch.randn(312, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
        >>> q, k, v = qkv.unbind(1)                                   # (312, 12, 64) views
        >>> out = fastvit.flash_attention_varlen(q, k, v, cu, max_seqlen_q=197)  # (312, 12, 64)
        >>> out, lse = fastvit.flash_attention_varlen(q, k, v, cu, return_lse=True)  # lse (12, 312)
    """
    check_flags(causal=causal, return_lse=return_lse)
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    # the kernels index cu_seqlens with a unit stride: a strided view (S+1 int32s) is copied
    cu_seqlens_q = cu_seqlens_q.contiguous()
    cu_seqlens_k = None if cu_seqlens_k is None else cu_seqlens_k.contiguous()
    # the Triton route saves cu_seqlens for the backward too
    q, k, v, cu_seqlens_q, cu_seqlens_k = usable_in_autograd(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
        if max_seqlen_k is None:
            max_seqlen_k = max_seqlen_q
    cast_to = autocast_dtype(q.device)
    if cast_to is not None:
        q, k, v = (t.to(cast_to) if t.dtype in _KERNEL_DTYPES else t for t in (q, k, v))
    check_same_dtype(q=q, k=k, v=v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    if q.device.type == "meta":
        # meta tensors hold no cu_seqlens values to read; every route gives out (T, H, D) in q's
        # dtype and a float32 lse (H, T): the custom op's fake implementation gives those (its saved
        # lse in lse_dtype, float64 for fp32 inputs)
        out, lse = call(_varlen_fwd, _varlen_fwd_function, q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q or 0),
                        int(max_seqlen_k or 0), scale, bool(causal))
        return (out, lse.detach().to(torch.float32)) if return_lse else out

    if torch.compiler.is_compiling() and max_seqlen_q is not None and max_seqlen_k is not None:
        route = resolve_backend(q.device)
        if route == "triton" and _fallback_reason(q, scale) is not None:
            route = "torch"
        if route == "torch":  # no host read of cu_seqlens while compiling: the padded form
            _assert_on_device("cu_seqlens_q", cu_seqlens_q, q.shape[0], int(max_seqlen_q), "max_seqlen_q")
            _assert_on_device("cu_seqlens_k", cu_seqlens_k, k.shape[0], int(max_seqlen_k), "max_seqlen_k")
            return _torch_route_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                       scale, bool(causal), return_lse)  # fmt: skip

    # values of cu_seqlens: checked (and the longest length found) only where no max was given
    bounds_q = bounds_k = None
    if max_seqlen_q is None:
        bounds_q = _bounds("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", "max_seqlen_q not given")
        max_seqlen_q = max((b - a for a, b in bounds_q), default=0)
    if max_seqlen_k is None:
        bounds_k = bounds_q if cu_seqlens_k is cu_seqlens_q else _bounds(
            "cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", "max_seqlen_k not given")
        max_seqlen_k = max((b - a for a, b in bounds_k), default=0)

    route = resolve_backend(q.device)
    if route == "triton":
        if bounds_q is None:
            _assert_on_device("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        if bounds_k is None and not (cu_seqlens_k is cu_seqlens_q and max_seqlen_k == max_seqlen_q):
            _assert_on_device("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
        reason = _fallback_reason(q, scale)
        if reason is not None:
            warn_once(
                f"flash_attention_varlen:{reason}",
                f"fastvit.flash_attention_varlen: the Triton kernels do not cover {reason}; "
                "running one scaled_dot_product_attention per sequence instead",
            )
            route = "torch"
    if route == "torch":
        per_sequence = "the torch route runs one SDPA call per sequence"
        if bounds_q is None:
            bounds_q = _bounds("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", per_sequence)
        if bounds_k is None:
            bounds_k = _bounds("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", per_sequence)
        # a given max_seqlen shorter than a sequence: an error here too, as the kernels' device check
        for name, bounds, longest in (("max_seqlen_q", bounds_q, max_seqlen_q),
                                      ("max_seqlen_k", bounds_k, max_seqlen_k)):  # fmt: skip
            if (actual := max((b - a for a, b in bounds), default=0)) > longest:
                raise ValueError(
                    f"fastvit.flash_attention_varlen: {name} ({longest}) must be at least its longest sequence "
                    f"({actual})"
                )
        return _torch_route(q, k, v, bounds_q, bounds_k, scale, bool(causal), return_lse)
    out, lse = call(_varlen_fwd, _varlen_fwd_function, q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                    int(max_seqlen_k), scale, bool(causal))
    return (out, lse.detach().to(torch.float32)) if return_lse else out
