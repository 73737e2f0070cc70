"""Command line: `python -m experiments.sweep SWEEP_FILE --out DIR [--parallel N] [--launch tpu|slurm|print]`.

    python -m experiments.sweep experiments/sweeps/mqar.py --out runs/sweeps/mqar
    python -m experiments.sweep experiments/sweeps/mqar_pod.py --out runs/sweeps/mqar_pod --launch tpu \\
        --tpu my-v5e-64 --zone us-west4-a --workdir_root /gcs/my-bucket/sweeps/mqar_pod
    python -m experiments.sweep experiments/sweeps/kimi_ratio_pod.py --out runs/sweeps/kimi_ratio_pod \\
        --launch slurm --nodes 2 --gpus_per_node 8

Without --launch it trains every point here (skipping finished ones, resuming interrupted ones; the
same command continues a sweep) and then writes OUT/results.csv, OUT/results.md and OUT/*.png.
`--report` only rewrites the tables and plots from the points' workdirs. Exit status: 0 when every
point finished, 1 when some did not, 2 for a bad sweep file or option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from experiments.sweep.launch import LAUNCHERS, LaunchOptions, write_launch
from experiments.sweep.results import write_results
from experiments.sweep.runner import REPO_ROOT, SweepRunner
from experiments.sweep.sizing import count_params, match_sizes
from experiments.sweep.spec import load_sweep


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_file", help="a sweep file, e.g. experiments/sweeps/mqar.py")
    parser.add_argument("--out", required=True, help="output folder: one workdir per point, results, launch/")
    parser.add_argument("--parallel", type=int, default=1, help="points trained at the same time (default 1)")
    parser.add_argument("--progress_every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--report", action="store_true", help="only write the results from the workdirs")
    parser.add_argument("--launch", choices=LAUNCHERS, help="write launch scripts (or print the commands) instead")
    pod = parser.add_argument_group("launch options")
    pod.add_argument("--workdir_root", help="point workdirs on the cluster: a folder every host mounts, e.g. /gcs/BUCKET/... (default: --out)")
    pod.add_argument("--repo_dir", default=REPO_ROOT, help="the repository checkout on the workers")
    pod.add_argument("--remote_python", default=None, help="python on the workers (tpu: python3; slurm: this one)")
    pod.add_argument("--tpu", help="Cloud TPU VM name")
    pod.add_argument("--zone", help="Cloud TPU zone")
    pod.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    pod.add_argument("--nodes", type=int, default=1, help="slurm: hosts per point")
    pod.add_argument("--gpus_per_node", type=int, help="slurm: GPUs per host")
    pod.add_argument("--time", help="slurm: time limit, e.g. 04:00:00")
    pod.add_argument("--partition", help="slurm: partition")
    return parser


def _launch_options(args) -> LaunchOptions:
    python = args.remote_python or ("python3" if args.launch == "tpu" else sys.executable)
    return LaunchOptions(workdir_root=args.workdir_root or os.path.abspath(args.out), repo_dir=args.repo_dir,
                         python=python, tpu=args.tpu, zone=args.zone, project=args.project, nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition)


def _prepare(args):
    """The sweep, its points (sizes matched) and their parameter counts; ValueError if anything is off."""
    if args.parallel < 1:
        raise ValueError(f"--parallel: must be >= 1, got {args.parallel}")
    sweep = load_sweep(os.path.abspath(args.sweep_file))
    print(f"sweep {sweep.name}: {len(sweep.points)} point(s) from {args.sweep_file}, output {args.out}")
    points = sweep.points
    if sweep.match:
        print(f"matching non-embedding parameters by solving {sweep.match.solve}:")
        points, _ = match_sizes(sweep)
    counts = {point.name: count_params(sweep.point_config(point)) for point in points}
    return sweep, points, counts


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        sweep, points, counts = _prepare(args)
        if args.launch:
            write_launch(args.launch, sweep, points, args.out, _launch_options(args))
            return 0
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"sweep": args.sweep_file, "points": [
            {"name": p.name, **p.describe(), "params": counts[p.name].non_embedding} for p in points]}, f, indent=2)
    failed = []
    if not args.report:
        failed = SweepRunner(sweep, points, args.out, parallel=args.parallel,
                             progress_every=args.progress_every).run()
    written = write_results(sweep, points, args.out, counts)
    with open(written[1]) as f:
        print(f.read())
    print("wrote " + ", ".join(written))
    if failed:
        print(f"{len(failed)} point(s) not finished: {', '.join(failed)}; rerun the same command to continue")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
