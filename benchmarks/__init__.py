"""fastvit's benchmark harness: ``python -m benchmarks`` in a checkout, ``fastvit-bench`` installed.

Installed as ``fastvit.benchmarks`` (never as a top-level ``benchmarks``), so every import inside
the package is relative. How a suite is written: see ``attention.py``'s docstring.
"""
