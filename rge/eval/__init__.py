"""Benchmarks the paper reports, reproducible with one command (``rge eval mmeb``)."""
