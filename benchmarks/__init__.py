"""Benchmarks of modeconn_fast against its peers (workloads B1–B5 of BENCHMARKS.md): `python -m benchmarks`."""
