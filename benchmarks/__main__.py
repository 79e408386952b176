"""``python -m benchmarks`` (from a checkout), ``python -m fastvit.benchmarks`` and ``fastvit-bench``.

This folder is installed as ``fastvit.benchmarks``. In a checkout it has no ``__init__.py``, so it
never shadows an installed top-level ``benchmarks`` package (a PyPI project of that name): from
the checkout root, ``python -m benchmarks`` finds this file through the folder as a namespace
portion, and runs the installed ``fastvit.benchmarks`` — one copy of the harness per process.
"""

from fastvit.benchmarks.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
