"""Throughput benchmarks (pytest-benchmark): ``pytest bench/``. Figures are recorded in ``bench/RESULTS.md``."""
