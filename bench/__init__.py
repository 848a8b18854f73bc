"""Benchmarks and broker measurements for harken (run with `python -m bench.<name>`)."""
