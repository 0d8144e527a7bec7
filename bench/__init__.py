"""Benchmarks: one module per topic (`bench_<topic>.py`) exposing `run(full=False)`."""
