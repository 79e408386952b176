"""fastvit's benchmark harness (installed as ``fastvit.benchmarks``; ``python -m benchmarks`` in a checkout)."""
