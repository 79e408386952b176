"""Fixtures of the patching tests: op-call spies and fresh fallback warnings."""

from __future__ import annotations

import importlib

import pytest

import fastvit
from tests.patching.helpers import OPS


@pytest.fixture
def op_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict]]:
    """Record every call of each fastvit op (the fused modules look the ops up on ``fastvit`` at
    call time): ``op_calls["flash_attention"]`` is a list of ``{"args": ..., "kwargs": ...}``."""
    calls: dict[str, list[dict]] = {op: [] for op in OPS}
    for op in OPS:
        real = getattr(fastvit, op, None)
        if real is None:
            continue

        def spy(*args, _real=real, _op=op, **kwargs):
            calls[_op].append({"args": args, "kwargs": kwargs})
            return _real(*args, **kwargs)

        monkeypatch.setattr(fastvit, op, spy)
    return calls


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which fallback warnings were given (each is given once per process)."""
    backend_module = importlib.import_module("fastvit.backend")  # fastvit.backend is the function
    monkeypatch.setattr(backend_module, "_warned", set())
