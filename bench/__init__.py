"""Neither runtime nor training: `harken bench` (inference_bench, daemon_bench, registered by
bench/commands.py), the soak test (`python -m bench.soak`) and the distributed benchmarks
(`python -m bench.<name>`)."""
