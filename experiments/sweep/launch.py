"""Launch scripts: the same trainer command per point, for a Cloud TPU VM slice or a SLURM cluster.

    --launch tpu    OUT/launch/<point>.sh: `gcloud compute tpus tpu-vm ssh NAME --zone Z --worker=all
                    --command '...'` runs the trainer on every worker of the slice, the workdir on a
                    folder every worker mounts (a gcsfuse mount of a bucket such as /gcs/BUCKET, or a
                    Filestore share: the trainer writes its workdir with file-system calls, so a gs://
                    URL itself is refused); `--coordinator_address=auto` lets jax.distributed find the
                    slice's workers itself. OUT/launch/run_all.sh runs the points one after another.
    --launch slurm  OUT/launch/<point>.sbatch: one task per host (`--ntasks-per-node=1`); the script
                    exports JAX_COORDINATOR_ADDRESS (the first host of $SLURM_JOB_NODELIST, port
                    $COORDINATOR_PORT or 20000 + job id mod 20000) and `srun` starts every task with
                    JAX_NUM_PROCESSES=$SLURM_NTASKS and JAX_PROCESS_ID=$SLURM_PROCID, which the
                    trainer reads (`hybrid_jax.train.loop.initialize_distributed`).
                    OUT/launch/submit_all.sh submits every point.
    --launch print  prints each point's command.

Rerunning a point's script (or resubmitting it) resumes from the newest checkpoint in its workdir.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import stat

from experiments.sweep.runner import trainer_args
from experiments.sweep.spec import Point, Sweep

LAUNCHERS = ("tpu", "slurm", "print")


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    workdir_root: str  # where the point workdirs go on the cluster: a folder every host mounts
    repo_dir: str  # the repository checkout on the workers / nodes
    python: str = "python3"
    tpu: str | None = None  # TPU VM name
    zone: str | None = None
    project: str | None = None
    nodes: int = 1  # slurm
    gpus_per_node: int | None = None
    time: str | None = None
    partition: str | None = None


def _command(sweep: Sweep, point: Point, options: LaunchOptions, extra: tuple[str, ...] = ()) -> list[str]:
    workdir = f"{options.workdir_root.rstrip('/')}/{point.name}"
    return [options.python, "-m", "hybrid_jax.train", *trainer_args(sweep, point, workdir), *extra]


def _write_script(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def tpu_script(sweep: Sweep, point: Point, options: LaunchOptions) -> str:
    if not (options.tpu and options.zone):
        raise ValueError("--launch tpu needs --tpu NAME and --zone ZONE")
    if "://" in options.workdir_root or not options.workdir_root.startswith("/"):
        raise ValueError(f"--launch tpu: --workdir_root must be an absolute folder that every worker mounts "
                         f"(e.g. the bucket mounted with gcsfuse at /gcs/BUCKET on each worker, or a "
                         f"Filestore share), got {options.workdir_root!r}")
    remote = f"cd {shlex.quote(options.repo_dir)} && " + shlex.join(
        _command(sweep, point, options, ("--coordinator_address=auto",)))
    project = f" --project {shlex.quote(options.project)}" if options.project else ""
    return (
        "#!/usr/bin/env bash\n"
        f"# Sweep {sweep.name}, point {point.name}: trains on every worker of the Cloud TPU VM slice "
        f"{options.tpu} ({options.zone}).\n"
        f"# Start: bash {point.name}.sh   Rerunning resumes from the newest checkpoint in its workdir.\n"
        "set -euo pipefail\n"
        f"gcloud compute tpus tpu-vm ssh {shlex.quote(options.tpu)} --zone {shlex.quote(options.zone)}{project} "
        f"--worker=all --command {shlex.quote(remote)}\n"
    )


def slurm_script(sweep: Sweep, point: Point, options: LaunchOptions, log_dir: str) -> str:
    directives = [f"--job-name={sweep.name}-{point.name}", f"--nodes={options.nodes}", "--ntasks-per-node=1",
                  f"--output={log_dir}/%x-%j.out"]
    if options.gpus_per_node:
        directives.append(f"--gpus-per-node={options.gpus_per_node}")
    directives += [f"--{key}={value}" for key, value in (("time", options.time), ("partition", options.partition))
                   if value]
    # Per-task values ($SLURM_PROCID) must expand inside each task: a single-quoted body, the
    # command as its arguments.
    task = "'export JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID; exec \"$@\"' task"
    return (
        "#!/usr/bin/env bash\n"
        + "".join(f"#SBATCH {d}\n" for d in directives)
        + f"# Sweep {sweep.name}, point {point.name}: one task per host, jax.distributed from the SLURM "
        "environment.\n"
        f"# Submit: sbatch {point.name}.sbatch   Resubmitting resumes from the newest checkpoint in its workdir.\n"
        "set -euo pipefail\n"
        f"cd {shlex.quote(options.repo_dir)}\n"
        'head_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        'export JAX_COORDINATOR_ADDRESS="$head_host:${COORDINATOR_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"\n'
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {task} "
        + shlex.join(_command(sweep, point, options)) + "\n"
    )


def write_launch(kind: str, sweep: Sweep, points: tuple[Point, ...], out: str, options: LaunchOptions,
                 say=print) -> list[str]:
    """Writes (tpu, slurm) or prints (print) the launch commands; returns the files written."""
    if kind not in LAUNCHERS:
        raise ValueError(f"--launch: {kind!r} is not valid; valid values are {list(LAUNCHERS)}")
    if kind == "print":
        for point in points:
            say(f"cd {shlex.quote(options.repo_dir)} && {shlex.join(_command(sweep, point, options))}")
        return []
    folder = os.path.join(os.path.abspath(out), "launch")
    os.makedirs(folder, exist_ok=True)
    written = []
    for point in points:
        if kind == "tpu":
            written.append(_write_script(os.path.join(folder, f"{point.name}.sh"), tpu_script(sweep, point, options)))
        else:
            os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
            text = slurm_script(sweep, point, options, os.path.join(folder, "logs"))
            written.append(_write_script(os.path.join(folder, f"{point.name}.sbatch"), text))
    runner, verb = ("run_all.sh", "bash") if kind == "tpu" else ("submit_all.sh", "sbatch")
    body = "".join(f"{verb} {shlex.quote(path)}\n" for path in written)
    written.append(_write_script(os.path.join(folder, runner), f"#!/usr/bin/env bash\nset -euo pipefail\n{body}"))
    say(f"wrote {len(points)} {kind} launch script(s) to {folder}; start them all with: bash {written[-1]}")
    return written


__all__ = ["LAUNCHERS", "LaunchOptions", "slurm_script", "tpu_script", "write_launch"]
