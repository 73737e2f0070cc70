"""Sweeps: a sweep file in, every point trained (here, or by launch scripts on a pod), tables and plots out.

    python -m experiments.sweep experiments/sweeps/mqar.py --out runs/sweeps/mqar [--parallel 2]
    python -m experiments.sweep experiments/sweeps/kimi_ratio_pod.py --out runs/sweeps/kimi_pod \\
        --launch slurm --nodes 4 --gpus_per_node 8

`spec` reads sweep files, `sizing` counts parameters and matches sizes, `runner` trains the points
as trainer subprocesses (skipping finished ones, resuming interrupted ones), `results` writes
results.csv / results.md / plots, `launch` writes TPU-slice and SLURM scripts.
"""
from experiments.sweep.spec import MatchParams, Point, Sweep, grid, load_sweep

__all__ = ["MatchParams", "Point", "Sweep", "grid", "load_sweep"]
