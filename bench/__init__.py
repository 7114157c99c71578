"""Benchmarks for lite-srpo (see bench/README.md)."""
