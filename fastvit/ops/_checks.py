"""Input checks shared by the ops. Each error names the argument, what it got and what it needs."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    shape_hint: str = "",
) -> torch.Tensor:
    """Check that ``t`` is a tensor of one of ``dtypes`` with ``ndim`` dims; return it.

    Raises:
        TypeError: not a tensor, not dense (sparse, nested), or a dtype outside ``dtypes``.
        ValueError: the wrong number of dimensions.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(t.shape)}")
    return t


def check_dense(name: str, t: torch.Tensor) -> None:
    """``t`` must be a dense (strided, not nested) tensor: the kernels address elements through
    strides. TypeError naming ``name`` and the layout otherwise.

    Example:
        >>> check_dense("q", torch.randn(4, 4).to_sparse())  # TypeError: ... call .to_dense() on it
    """
    if t.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got a nested tensor; pad it (torch.nested.to_padded_tensor) "
                        "or pack it for flash_attention_varlen")
    if t.layout != torch.strided:
        layout = str(t.layout).replace("torch.", "")
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {layout}; call .to_dense() on it")


def check_optional_tensor(name: str, t: object, **kwargs) -> torch.Tensor | None:
    """``check_tensor`` for an argument that may be None."""
    return None if t is None else check_tensor(name, t, **kwargs)


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All non-None tensors on one device; return it."""
    device = None
    for t in tensors.values():  # (on every op call: the message is built only on a mismatch)
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            got = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"all tensors must be on the same device, got {got}")
    return device


def check_same_dtype(**tensors: torch.Tensor | None) -> torch.dtype:
    """All non-None tensors of one dtype; return it. Outside autocast the inputs as given; under
    autocast (the ops call this after its casts) what is left mismatched is a float64 tensor, which
    autocast does not cast: the message says which case it is."""
    first = next(t for t in tensors.values() if t is not None)
    if any(t is not None and t.dtype != first.dtype for t in tensors.values()):  # (the message only then)
        got = ", ".join(f"{k} {str(v.dtype).replace('torch.', '')}" for k, v in tensors.items() if v is not None)
        device = first.device
        if autocast_dtype(device) is None:
            raise TypeError(f"all tensors must have the same dtype (outside autocast), got {got}")
        raise TypeError(
            f"all tensors must have the same dtype after autocast's casts (autocast to "
            f"{str(autocast_dtype(device)).replace('torch.', '')} on {device.type} leaves float64 as it is), "
            f"got {got}; cast the float64 tensors, or all of them, to one dtype"
        )
    return first.dtype


def check_unit_last_stride(name: str, t: torch.Tensor) -> None:
    """The last dim must be unit-stride (other strides are free: views need no copy)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a unit stride in its last dimension, got strides {tuple(t.stride())} "
            f"for shape {tuple(t.shape)}; call .contiguous() on it"
        )


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a copy with a unit stride in its last dim where it has another (a last dim of size
    0 or 1 needs none). The ops' real implementations call it on what their kernels read as
    vectors: an exported or compiled graph decides its layouts while tracing, from fake tensors,
    and a real tensor may come another way (PyTorch's CPU convolution of a batch of one returns
    NCHW where its fake said channels_last), so a unit stride checked at trace time is checked
    again here (a no-op on what the public op already laid out)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def usable_in_autograd(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors``, with a clone (a normal tensor) in place of each inference tensor when this call
    records autograd (grad mode on, outside inference mode, some tensor requires grad): an input
    made under ``torch.inference_mode()`` beside a weight that requires grad cannot be saved for
    the backward as it is. Copies only in that case.

    Example:
        >>> with torch.inference_mode():
        ...     x = torch.randn(2, 8)
        >>> x2, w2 = usable_in_autograd(x, torch.randn(8, requires_grad=True))  # x2 a normal clone
    """
    # grad mode is off inside inference mode; torch.compile traces no inference tensors
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return tensors
    if not any(t is not None and t.requires_grad for t in tensors):
        return tensors
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def stream_capturing(device: torch.device) -> bool:
    """Whether a CUDA graph capture is under way on ``device``'s current stream: a host read of a
    tensor on it (``.tolist()``, ``.item()``) would break the capture with an opaque CUDA error.

    Example:
        >>> stream_capturing(torch.device("cpu"))
        False
    """
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``device`` if autocast is enabled there, else None (also for device
    types autocast does not know, such as ``meta``: no autocast applies there)."""
    # torch.compile traces only real devices here, and torch < 2.12's dynamo cannot trace
    # is_autocast_available (torch 2.11 on an H200: "Attempted to call function marked as skipped")
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device.type):
        return None
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def check_grid_self_attention(q: object, k: object, v: object, scale: object, dtypes: tuple[torch.dtype, ...]) -> None:
    """The checks of a self-attention over one token grid (axial, window): q, k and v 4-D tensors
    (B, H, N, D) of one shape, dtype in ``dtypes``, one device, D >= 1; ``scale`` a finite float
    or None.

    Example:
        >>> check_grid_self_attention(q, k, v, None, (torch.float32,))  # raises, naming the argument
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=dtypes, shape_hint="(batch, heads, tokens, head_dim)")
    check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have q's shape (self-attention over one token grid): q is "
                f"{tuple(q.shape)}, {name} is {tuple(t.shape)}"
            )
    if q.shape[-1] == 0:
        raise ValueError(f"head_dim must be at least 1, got q {tuple(q.shape)}")
    check_scale(scale)


def is_finite(value: float) -> bool:
    """``math.isfinite`` in comparisons: also for the symbolic float that ``torch.compile`` with
    dynamic shapes makes of a module's float attribute (an attention's ``scale``, a norm's ``eps``),
    which ``math.isfinite`` cannot trace. False for NaN and the infinities.

    Example:
        >>> is_finite(0.125), is_finite(float("nan")), is_finite(float("inf"))  # True, False, False
    """
    return -math.inf < value < math.inf


def check_scale(scale: object) -> None:
    """An attention's ``scale``: a finite real number (float, int, a NumPy float such as
    ``np.float32``, as SDPA takes) or None. TypeError otherwise; the ops use ``float(scale)``.

    Example:
        >>> check_scale(0.125)  # check_scale(float("inf")) and check_scale("0.1") raise TypeError
    """
    if scale is None:
        return
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not is_finite(float(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")


def check_token_grid(grid: object, num_prefix_tokens: object, n_tokens: int) -> tuple[int, int, int]:
    """Check that ``n_tokens`` tokens are ``num_prefix_tokens`` prefix tokens then an h x w grid.

    Returns:
        (h, w, num_prefix_tokens).

    Example:
        >>> check_token_grid((14, 14), 1, 197)  # (14, 14, 1); (14, 14), 1, 196 raises ValueError
    """
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in grid)
    ):
        raise TypeError(f"grid must be a pair of ints (h, w), got {grid!r}")
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must have positive sides (h, w), got {tuple(grid)}")
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool):
        raise TypeError(f"num_prefix_tokens must be an int, got {num_prefix_tokens!r}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
    if num_prefix_tokens + h * w != n_tokens:
        raise ValueError(
            f"q, k and v must hold num_prefix_tokens + h * w tokens: got {n_tokens} tokens, "
            f"expected {num_prefix_tokens} + {h} * {w} = {num_prefix_tokens + h * w}"
        )
    return h, w, num_prefix_tokens


def check_flags(**flags: object) -> None:
    """Each keyword must be a real bool: a string such as "False" is truthy, and would silently
    turn a flag on. TypeError naming the flag.

    Example:
        >>> check_flags(causal=False, return_lse=True)  # check_flags(causal="False") raises TypeError
    """
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def may_overlap(t: torch.Tensor) -> bool:
    """True when two indices of ``t`` may share memory through non-zero strides (e.g.
    ``x.unfold(0, 8, 1)``), judged from sizes and strides: sorted by stride, each dim of size > 1
    must step past the whole extent of the dims below it. Broadcast (stride-0) dims do not count:
    PyTorch's kernels read those correctly. False for every view of a packed qkv.

    Example:
        >>> may_overlap(torch.randn(64).unfold(0, 8, 1)), may_overlap(torch.randn(4, 8).t())  # True, False
    """
    # (stride, size) of the dims that step through memory, smallest stride first: an insertion sort,
    # as torch.compile cannot trace sorted() over the symbolic sizes of dynamic shapes
    dims: list[tuple[int, int]] = []
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size > 1 and stride != 0:
            at = len(dims)
            while at > 0 and dims[at - 1][0] > stride:
                at -= 1
            dims.insert(at, (stride, size))
    extent = 1  # elements spanned by the dims visited so far (smallest strides first)
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False
