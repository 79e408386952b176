"""Ahead-of-time compile code run from a test: in a child process, since Triton compiles need
``TRITON_INTERPRET`` unset and the test process interprets (it is set at import, tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_without_interpreter(script: str, out: Path, what: str, timeout: float = 900) -> None:
    """Run ``python -c script out`` from the repository root (``tests`` importable), the interpreter
    off; fail the calling test with the child's stderr, naming ``what`` it did, when it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"{what} failed:\n{proc.stderr[-3000:]}")
