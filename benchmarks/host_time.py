"""Host time of fastvit's own Python layers per op call, measured on the CPU (no GPU needed).

At ViT sizes an eager fastvit call costs more host time than GPU time (README, Benchmarks: 143 us
of host time per ``flash_attention`` forward on the H200 host, SDPA 19 us). That host time has two
parts: fastvit's layers (checks, backend choice, autograd, the launchers' tile choice and argument
packing) and Triton's launch (binding and specialising the arguments, the cache lookup, the
driver call). This tool measures the first on any machine, and the binding part of the second:

- ``layers``: each op called on CPU tensors on the ``triton`` backend in Triton's interpreter, with
  every kernel launch replaced by a no-op that records it: what is left is fastvit's own host work
  (in the interpreter the launchers take its tile choices and the sm_90 paths, TMA off);
- ``bind``: each recorded launch bound again by Triton's own binder for an sm_90 target (argument
  specialisation and the cache key, as ``JITFunction.run`` does on a GPU before the driver call).

Figures are microseconds of wall time per call on this machine's CPU, the median of ``--repeats``
runs of ``--calls`` calls each: a GPU machine's host may be faster or slower (compare runs of one
machine). ``train`` is a forward and a backward with gradients into every input (set to None
before each step, as ``zero_grad`` does); ``infer`` a forward under ``torch.no_grad``.

    python -m benchmarks host [--json PATH] [--calls 1000] [--repeats 5] [--match TEXT]

Runs itself in a child process with ``TRITON_INTERPRET=1`` (the kernels read it when imported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CASES", "Case", "main", "measure_case"]


@dataclass(frozen=True)
class Case:
    """One op call: ``build(torch)`` returns ``(call, inputs)``, ``call(*inputs)`` runs the op once."""

    name: str
    shape: str
    build: Callable[[Any], tuple[Callable[..., Any], tuple]]


def _attention(mask: bool) -> Callable:
    def build(torch):
        import fastvit

        q, k, v = (torch.randn(1, 2, 197, 64, dtype=torch.float16) for _ in range(3))
        if not mask:
            return (lambda q, k, v: fastvit.flash_attention(q, k, v)), (q, k, v)
        keep = torch.ones(1, 1, 1, 197, dtype=torch.bool)  # key padding, read through stride 0
        return (lambda q, k, v: fastvit.flash_attention(q, k, v, attn_mask=keep)), (q, k, v)

    return build


def _layernorm_mlp(torch):
    import fastvit

    x = torch.randn(1, 197, 64)
    params = (torch.ones(64), torch.zeros(64), torch.randn(256, 64) / 8, torch.zeros(256),
              torch.randn(64, 256) / 16, torch.zeros(64))  # fmt: skip
    return fastvit.layernorm_mlp, (x, *map(torch.nn.Parameter, params))  # a module's weights


def _patch_embed(torch):
    import fastvit

    x = torch.randn(1, 3, 32, 32)
    weights = torch.nn.Parameter(torch.randn(64, 3, 16, 16) / 16), torch.nn.Parameter(torch.zeros(64))
    return fastvit.patch_embed, (x, *weights)


CASES = (
    Case("flash_attention", "q, k, v (1, 2, 197, 64) fp16", _attention(False)),
    Case("flash_attention key-padding mask", "q, k, v (1, 2, 197, 64) fp16, bool (1, 1, 1, 197)", _attention(True)),
    Case("layernorm_mlp", "x (1, 197, 64) fp32, hidden 256, nn.Parameter weights", _layernorm_mlp),
    Case("patch_embed", "x (1, 3, 32, 32) fp32, patch 16, dim 64, nn.Parameter weights", _patch_embed),
)


class _Recorder:
    """Stands in for Triton's interpreted launch while in use (``with _Recorder() as recorder``):
    does nothing, and while ``recording`` keeps each launch's kernel and arguments in ``launches``
    (not while timing: they hold the launch's output tensors); the real launch comes back on exit."""

    def __init__(self) -> None:
        self.recording = False
        self.launches: list[tuple[Any, tuple, dict]] = []

    def __enter__(self) -> _Recorder:
        from triton.runtime.interpreter import InterpretedFunction

        recorder, self._original = self, InterpretedFunction.run

        def run(kernel, *args, grid, warmup, **kwargs):  # InterpretedFunction.run's signature
            if recorder.recording:
                recorder.launches.append((kernel, args, kwargs))

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc: object) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._original


def _per_call_us(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    for _ in range(max(10, calls // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def _bind_us(launches: list[tuple[Any, tuple, dict]], calls: int, repeats: int) -> float:
    """Triton's binder (sm_90 target) over one call's launches, as ``JITFunction.run`` runs it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders: dict[Any, Callable] = {}  # one per kernel, as JITFunction keeps
    bound = []
    for kernel, args, kwargs in launches:
        if kernel not in binders:
            jit = JITFunction(kernel.fn, **kernel.kwargs)
            binders[kernel] = create_function_from_signature(jit.signature, jit.params, backend)
        bound.append((binders[kernel], args, {**kwargs, "debug": False, "instrumentation_mode": ""}))
    cache: dict = {}

    def bind_all():
        for binder, args, kwargs in bound:
            _, specialization, options = binder(*args, **kwargs)
            compute_cache_key(cache, specialization, options)

    return _per_call_us(bind_all, calls, repeats)


def measure_case(case: Case, mode: str, calls: int, repeats: int, recorder: _Recorder) -> dict[str, Any]:
    """One row: fastvit's host time per call of ``case`` in ``mode`` (``infer`` / ``train``), the
    launches per call and Triton's binding time for them."""
    import torch

    import fastvit

    call, inputs = case.build(torch)
    if mode == "train":
        # activations as leaves that require grad; a module's Parameters as they are
        inputs = tuple(t.detach().requires_grad_() if t.is_floating_point() and not isinstance(t, torch.nn.Parameter)
                       else t for t in inputs)  # fmt: skip
        grad = torch.randn_like(call(*inputs))

        def step():
            for t in inputs:  # optimizer.zero_grad(set_to_none=True): the backward's gradients are kept as they are
                t.grad = None
            call(*inputs).backward(grad)
    else:

        def step():
            with torch.no_grad():
                call(*inputs)

    with fastvit.backend("triton"):
        recorder.launches.clear()
        recorder.recording = True
        step()
        recorder.recording = False
        recorded = list(recorder.launches)
        layers = _per_call_us(step, calls, repeats)
    return {"op": case.name, "shape": case.shape, "mode": mode, "layers_us": round(layers, 1),
            "launches": len(recorded), "bind_us": round(_bind_us(recorded, calls, repeats), 1)}  # fmt: skip


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    import platform

    return names[0] if names else platform.processor() or platform.machine()


def _run(args: argparse.Namespace) -> int:
    import torch
    import triton

    rows = []
    if args.match and not any(args.match in case.name for case in CASES):
        print(f"--match {args.match!r}: no op's name contains it; ops: {', '.join(c.name for c in CASES)}",
              file=sys.stderr)  # fmt: skip
        return 2
    print(f"{'op':36s} {'mode':6s} {'layers us':>10s} {'launches':>9s} {'bind us':>8s}")
    with _Recorder() as recorder:
        for case in CASES:
            if args.match and args.match not in case.name:
                continue
            for mode in ("infer", "train"):
                row = measure_case(case, mode, args.calls, args.repeats, recorder)
                rows.append(row)
                print(f"{row['op']:36s} {mode:6s} {row['layers_us']:10.1f} {row['launches']:9d} "
                      f"{row['bind_us']:8.1f}", flush=True)  # fmt: skip
    if args.json:
        import platform

        meta = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "torch": torch.__version__, "triton": triton.__version__, "calls": args.calls,
                "repeats": args.repeats, "command": "python -m benchmarks host " + " ".join(sys.argv[1:])}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks host", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the rows and the run's meta to this file")
    p.add_argument("--calls", type=int, default=1000, help="calls per timed run (default 1000)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    p.add_argument("--match", help="only the ops whose name contains this text")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks host``: the table, and the JSON with ``--json``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        build_parser().error("--calls and --repeats must be positive")
    if os.environ.get("TRITON_INTERPRET") != "1":
        # the kernels read TRITON_INTERPRET when imported: measure in a child process that has it
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "fastvit.benchmarks.host_time", *argv], env=env).returncode
    return _run(args)


if __name__ == "__main__":
    raise SystemExit(main())
