"""Experiments: configs (experiments/configs), benchmarks and sweeps. Library code never imports this."""
