"""Benchmarks run by hand (`python -m dsvl_cli.bench.<name>`); they print tok/s, MFU and memory."""
