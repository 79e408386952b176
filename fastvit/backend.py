"""Backend selection: which implementation of an op runs.

- ``"auto"`` (default): Triton kernels on CUDA tensors, the ``torch`` route on CPU tensors.
- ``"triton"``: the Triton kernels; on CPU tensors they run in Triton's interpreter, which needs
  ``TRITON_INTERPRET=1`` in the environment *before* fastvit's kernels are imported.
- ``"torch"``: PyTorch's own best route (SDPA for attention, else the composite of torch ops).
- ``"cuda"``: the C++/CUDA extension ``fastvit._C`` (``csrc/``, Apex/Megatron style: cuBLAS(Lt)
  GEMMs around hand-written LayerNorm, bias+GELU, residual and patchify kernels) for the ops it
  covers (``layernorm_mlp``, ``patch_embed``); the others run their Triton kernels. It is built
  where it runs (``fastvit.extension``); on CPU tensors it runs the extension's CPU loops (the same
  row math, for testing). ``auto`` picks it only where ``python -m benchmarks tune`` measured it
  faster (``fastvit.tuning``).

The choice comes from the innermost ``with fastvit.backend(name):`` block of the calling thread
(a context variable, so asyncio tasks and ``contextvars.copy_context`` see it too), else the most
recently entered block still open in any thread of the process (threads started inside a block,
such as ``nn.DataParallel``'s replicas, which do not inherit context variables), else the
environment variable ``FASTVIT_BACKEND``, else ``"auto"``.

Meta tensors (FSDP and ``torch.compile`` build models on the ``meta`` device) run no kernel: under
``auto``, ``triton`` and ``cuda`` the ops return meta outputs from the fake implementations of
their custom ops (the shapes, dtypes and strides the kernels produce), with no interpreter or
extension needed; under ``torch`` the composite runs on meta tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "BACKENDS",
    "CUDA_OPS",
    "FastvitFallbackWarning",
    "backend",
    "current_backend",
    "every_fallback_warns",
    "resolve_backend",
    "warn_once",
]

BACKENDS = ("auto", "triton", "torch", "cuda")
# the ops the extension implements; the others run their Triton kernels under "cuda"
CUDA_OPS = ("layernorm_mlp", "patch_embed")

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastvit_backend", default=None)
# (id, name) of the blocks open in any thread, by entry order: a thread (or context) without a block
# of its own follows the last one; a block leaves on exit, whatever the order of exits. Replaced as
# a whole under the lock, so readers take it without one (torch.compile traces the reads).
_open_blocks: tuple[tuple[int, str], ...] = ()
_block_ids = itertools.count()
_blocks_lock = threading.Lock()
_warned: set[str] = set()


class FastvitFallbackWarning(UserWarning):
    """A valid call the fused kernels do not cover ran on the ``torch`` route instead.

    Emitted once per process for each reason (``warn_once``).

    Example:
        >>> import warnings
        >>> q, k, v = torch.randn(3, 1, 2, 16, 512, device="cuda", dtype=torch.bfloat16).unbind(0)  # head dim 512
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", fastvit.FastvitFallbackWarning)  # make a fallback an error
        ...     fastvit.flash_attention(q, k, v)
        Traceback (most recent call last):
        FastvitFallbackWarning: fastvit.flash_attention: the Triton kernels do not cover head_dim 512 > 256; ...
    """


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the fastvit ops inside the block on backend ``name``.

    The block rules the calling thread; threads that have no block of their own (such as the
    replicas ``nn.DataParallel`` starts) follow the most recently entered block still open in the
    process.

    Args:
        name: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cuda"``.

    Example:
        >>> q, k, v = torch.randn(3, 2, 12, 197, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> with fastvit.backend("torch"):
        ...     out = fastvit.flash_attention(q, k, v)  # PyTorch's SDPA, whatever auto would pick
    """
    global _open_blocks
    name = _check_name(name, "backend name")
    token = _selected.set(name)
    with _blocks_lock:
        block = next(_block_ids)
        _open_blocks = (*_open_blocks, (block, name))
    try:
        yield
    finally:
        with _blocks_lock:
            _open_blocks = tuple(entry for entry in _open_blocks if entry[0] != block)
        _selected.reset(token)


# torch < 2.14's dynamo cannot trace ContextVar.get (torch 2.11: "Dynamo does not know how to trace
# method `get` of class `ContextVar`", a graph break, and fullgraph fails): while it traces there,
# the selection is read from the open blocks alone, the innermost being the one entered last
_DYNAMO_READS_CONTEXT_VARS = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def current_backend() -> str:
    """The selected backend name: the innermost ``backend()`` block of this thread, else the latest block
    open in another thread, else ``FASTVIT_BACKEND``, else auto.

    Example:
        >>> fastvit.current_backend()  # no block open, FASTVIT_BACKEND unset
        'auto'
        >>> with fastvit.backend("torch"):
        ...     fastvit.current_backend()
        'torch'
    """
    if _DYNAMO_READS_CONTEXT_VARS or not torch.compiler.is_compiling():
        name = _selected.get()
        if name is not None:
            return name
    blocks = _open_blocks
    if blocks:
        return blocks[-1][1]
    env = os.environ.get("FASTVIT_BACKEND", "").strip()  # set to blanks reads as unset, as set empty
    if env:
        return _check_name(env.lower(), "environment variable FASTVIT_BACKEND")
    return "auto"


def interpreter_dtype_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the ``triton`` route cannot run ``dtype`` on ``device``, or None: in Triton's interpreter
    (the ``triton`` route on CPU tensors) ``tl.dot`` multiplies bf16's raw bits (an upstream bug),
    so bf16 results would be garbage; the caller runs the ``torch`` route with one warning.

    Example:
        >>> interpreter_dtype_problem(torch.device("cpu"), torch.bfloat16)  # under TRITON_INTERPRET=1: a reason
    """
    if device.type in ("cuda", "meta") or dtype != torch.bfloat16:
        return None  # meta tensors run no kernel, only the fake implementations
    from fastvit.kernels.runtime import INTERPRETER

    return "bfloat16 in Triton's interpreter (its tl.dot is wrong for bf16)" if INTERPRETER else None


def _interpreter_check(device: torch.device, selected: str = "triton", op: str | None = None) -> None:
    from fastvit.kernels.runtime import INTERPRETER

    if not INTERPRETER:
        # under 'cuda' an op the extension does not cover runs its Triton kernels: say so
        runs = f"fastvit backend 'triton' on {device.type} tensors runs the Triton kernels in Triton's interpreter"
        if selected != "triton":
            runs = (f"fastvit backend {selected!r} runs {op or 'this op'}'s Triton kernels (the extension does not "
                    f"cover it), on {device.type} tensors in Triton's interpreter")  # fmt: skip
        raise RuntimeError(
            f"{runs}, which needs TRITON_INTERPRET=1 set in the environment before "
            "fastvit's kernels are imported; it was not set then. Set it before starting Python "
            "(TRITON_INTERPRET=1 python ...), or use fastvit.backend('torch') on the CPU."
        )


def _extension_check(device: torch.device) -> None:
    from fastvit import extension

    if not extension.load():
        raise RuntimeError(
            "fastvit backend 'cuda' needs the C++/CUDA extension fastvit._C, which is not available: "
            f"{extension.unavailable_reason()}"
        )
    if device.type == "cuda" and not extension.has_cuda_kernels():
        raise RuntimeError(
            "fastvit backend 'cuda': the extension fastvit._C was built without its CUDA kernels (no CUDA "
            "toolkit was found when it was compiled), so it runs on CPU tensors only. Install a CUDA "
            "toolkit (nvcc) matching torch.version.cuda and rebuild it (fastvit.extension.load(build=True))."
        )


def resolve_backend(device: torch.device, op: str | None = None, bucket: Callable[[], str] | None = None) -> str:
    """The concrete route, ``"triton"``, ``"torch"`` or ``"cuda"``, for ``op`` on ``device``.

    Args:
        device: the tensors' device.
        op: the op's name (``"layernorm_mlp"``, ``"patch_embed"``, ``"flash_attention"``); ops not in
            ``CUDA_OPS`` run their Triton kernels under the ``cuda`` backend.
        bucket: builds the op's tuning-table key (``fastvit.tuning``); ``auto`` on a GPU follows the
            measured winner for it (``triton``, ``cuda`` or PyTorch's ``torch`` route) and runs
            Triton where the table has no entry.

    Under ``torch.func.vmap`` (no batching rule for the kernels): ``"torch"``, with one warning.
    On ``meta`` tensors: ``"torch"`` under the ``torch`` backend, else the custom ops (``"cuda"``
    for an op the extension covers under ``cuda``, else ``"triton"``), whose fake implementations
    return meta outputs; neither the interpreter nor the extension is checked, as nothing runs.

    Raises:
        RuntimeError: ``"triton"`` was asked for on CPU tensors but the kernels were imported
            without ``TRITON_INTERPRET=1``, so they cannot run in the interpreter; or ``"cuda"`` was
            asked for and the extension cannot be built or loaded here (the message says why).
    """
    name = current_backend()
    covered = op in CUDA_OPS
    if device.type != "meta" and name != "torch" and _vmapping():
        warn_once(
            f"vmap:{op}",
            f"fastvit.{op}: the fused kernels have no torch.func.vmap batching rule; under vmap (per-sample "
            "gradients, ensembles) the op runs PyTorch's route, which has one",
        )
        return "torch"
    if device.type == "meta":
        # no kernel runs: the custom ops' fake implementations give the outputs' metadata
        if name == "torch":
            return "torch"
        return "cuda" if name == "cuda" and covered else "triton"
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        if bucket is not None:
            from fastvit import tuning

            choice = tuning.lookup(device, op, bucket())
            if choice == "torch":  # PyTorch's own route measured fastest for this bucket
                return "torch"
            if choice == "cuda" and covered:
                from fastvit import extension

                if extension.load() and extension.has_cuda_kernels():
                    return "cuda"
                warn_once(
                    "auto:cuda-unavailable",
                    "fastvit: the tuning table prefers the 'cuda' backend here, but the extension is "
                    f"not available ({extension.unavailable_reason()}); running the Triton kernels",
                )
        return "triton"
    selected = name
    if name == "cuda":
        if covered:
            _extension_check(device)
            return "cuda"
        name = "triton"
    if name == "triton" and device.type != "cuda":
        _interpreter_check(device, selected, op)
    return name


def _vmapping() -> bool:
    """Whether a ``torch.func.vmap`` transform is active around this call (outside torch.compile,
    which traces functorch transforms itself)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(level.key() == TransformType.Vmap for level in retrieve_all_functorch_interpreters())


def warn_once(key: str, message: str) -> None:
    """Emit ``FastvitFallbackWarning(message)`` the first time ``key`` is seen in this process.

    Silent while ``torch.compile`` traces (a warning there would break the graph); the eager
    call that precedes or follows compilation warns as usual. A call whose warning the filters
    ignore (a library's ``catch_warnings`` with "ignore") or turn into an error does not count as
    the first: the next call of that key warns (or raises) again.
    """
    if key in _warned or torch.compiler.is_compiling():
        return
    frame, stacklevel = _caller_outside_fastvit()
    if _ignored(message, frame):
        return
    warnings.warn(message, FastvitFallbackWarning, stacklevel=stacklevel)  # raises under an "error" filter
    _warned.add(key)


@contextlib.contextmanager
def every_fallback_warns() -> Iterator[None]:
    """Inside the block every fallback warns, said before or not (for a harness that tells a
    fallback by its warning: ``python -m benchmarks tune`` times many shapes in one process, and
    a reason said once is silent after); the reasons said inside count as said after it.

    Example:
        >>> from fastvit.backend import every_fallback_warns
        >>> with every_fallback_warns(), warnings.catch_warnings(record=True) as caught:
        ...     fastvit.flash_attention(q, k, v)  # a head dim the kernels do not cover warns again
    """
    global _warned
    outside = _warned
    _warned = set()
    try:
        yield
    finally:
        _warned = outside | _warned


# the packages whose frames a warning skips: fastvit's own, and torch's (Module.__call__,
# autograd.Function.apply, checkpoint) between fastvit and the code that called it
_SKIPPED_DIRS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def _caller_outside_fastvit() -> tuple[types.FrameType, int]:
    """The first frame above ``warn_once`` outside fastvit's and torch's packages (the user's
    line, or the model library's forward that called a fused module) and the ``stacklevel`` that
    makes ``warnings.warn``, called from ``warn_once``, attribute the warning to it (as Python
    3.12's ``skip_file_prefixes``); the outermost frame where every frame is inside them."""
    frame = sys._getframe(2)  # warn_once's caller, stacklevel 2
    stacklevel = 2
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED_DIRS):
        frame = frame.f_back
        stacklevel += 1
    return frame, stacklevel


def _ignored(message: str, frame: types.FrameType | None) -> bool:
    """Whether the warning filters, matched as ``warnings.warn`` matches them for a
    ``FastvitFallbackWarning(message)`` attributed to ``frame``, ignore it."""
    module = "sys" if frame is None else frame.f_globals.get("__name__", "<string>")
    lineno = 0 if frame is None else frame.f_lineno
    for action, text, category, module_pattern, line in warnings.filters:
        if (
            (text is None or text.match(message))
            and issubclass(FastvitFallbackWarning, category)
            and (module_pattern is None or module_pattern.match(module))
            and (line == 0 or line == lineno)
        ):
            return action == "ignore"
    return False
