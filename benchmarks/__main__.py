"""``python -m benchmarks`` (from a checkout) and the ``fastvit-bench`` console script."""

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
