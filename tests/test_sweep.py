"""`python -m experiments.sweep`: a 2-point sweep end to end, killed midway and rerun (finished point
skipped, interrupted one resumed), matched sizes, sweep-file errors, and the launch scripts (the
SLURM one run end to end with 2 local processes through stand-ins for srun and scontrol)."""
import csv
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from experiments.sweep.__main__ import main
from experiments.sweep.sizing import count_params, match_sizes
from experiments.sweep.spec import load_sweep
from hybrid_jax.train import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "configs", "transformer.py")


def sweep_file(folder, *, steps: int, sweep: str) -> str:
    """A sweep file: the tiny transformer on MQAR (no corpus to read), `steps` steps, SWEEP = `sweep`."""
    path = os.path.join(folder, "tiny_sweep.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""
            from hybrid_jax.config import load_config

            def get_config(preset="tiny"):
                config = load_config({TINY + ':tiny'!r})
                config.data.source, config.data.val_rows = "mqar", 16
                config.data.mqar.num_kv_pairs = 4
                for key, value in dict(seq_len=32, batch_size=8, steps={steps}, warmup_steps=1, log_every=10,
                                       eval_every=1000, eval_steps=1, checkpoint_every=20).items():
                    setattr(config.train, key, value)
                return config

        """) + f"SWEEP = {sweep}\n")
    return path


TWO_POINTS = '{"grid": {"train.learning_rate": [0.001, 0.002]}, "name": "lr{train.learning_rate}"}'


def sweep_command(path, out, *extra):
    return [sys.executable, "-m", "experiments.sweep", path, "--out", str(out), "--progress_every", "1", *extra]


def child_env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def test_sweep_end_to_end_killed_midway_and_rerun(tmp_path):
    path, out = sweep_file(tmp_path, steps=200, sweep=TWO_POINTS), tmp_path / "out"
    first, second = out / "lr0.001", out / "lr0.002"
    runner = subprocess.Popen(sweep_command(path, out), cwd=ROOT, env=child_env(), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ((first / "sweep_point.json").exists() and (second / "checkpoints").is_dir()
               and any(name.isdigit() for name in os.listdir(second / "checkpoints"))):
        assert runner.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before the kill"
        time.sleep(0.02)
    os.killpg(runner.pid, signal.SIGKILL)  # the runner and its trainer die at once, as on a lost machine
    runner.wait()
    assert not (second / "sweep_point.json").exists()
    saved = max(int(name) for name in os.listdir(second / "checkpoints") if name.isdigit())

    rerun = subprocess.run(sweep_command(path, out), cwd=ROOT, env=child_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[1/2] lr0.001: finished earlier, skipped" in rerun.stdout
    resumed = int(rerun.stdout.split("[2/2] lr0.002: resuming from its checkpoint at step ")[1].split(" ")[0])
    assert resumed >= saved
    assert f"resumed from the checkpoint at step {resumed}" in (second / "train.log").read_text()
    steps = [r["step"] for r in read_metrics(str(second / "metrics.jsonl")) if "loss" in r]
    assert steps == list(range(10, 201, 10))  # one uninterrupted history

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["status"], r["train.learning_rate"]) for r in rows] == [
        ("lr0.001", "finished", "0.001"), ("lr0.002", "finished", "0.002")]
    assert all(0 <= float(r["val_accuracy"]) <= 1 and int(r["params"]) > 0 and r["steps"] == "200" for r in rows)
    table = (out / "results.md").read_text()
    assert "| name | status | train.learning_rate | params |" in table and "| lr0.002 | finished | 0.002 |" in table
    assert list(out.glob("*.png"))


def test_matched_sizes_hold_the_count_within_tolerance(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, steps=6, sweep=(
        '{"grid": {"model.num_layers": [2, 4, 6]}, "name": "L{model.num_layers}", '
        '"match_params": {"solve": "model.mlp_dim", "target": "L4", "multiple_of": 8}}')))
    points, target = match_sizes(sweep, log=lambda text: None)
    assert target == count_params(sweep.point_config(sweep.points[1])).non_embedding
    mlp = [point.overrides["model.mlp_dim"] for point in points]
    assert mlp[0] > mlp[1] > mlp[2] and all(m % 8 == 0 for m in mlp)  # fewer layers, wider FFNs
    for point in points:
        assert abs(count_params(sweep.point_config(point)).non_embedding - target) / target <= 0.02
    coarse = load_sweep(sweep_file(tmp_path, steps=6, sweep=(
        '{"grid": {"model.num_layers": [2, 6]}, "name": "L{model.num_layers}", '
        '"match_params": {"solve": "model.d_model", "multiple_of": 32, "tolerance": 0.001}}')))
    with pytest.raises(ValueError, match=r"point L6: the closest model.d_model .* from the target"):
        match_sizes(coarse, log=lambda text: None)


@pytest.mark.parametrize("sweep, message", [
    ('{"grid": {"train.learning_rate": [1, 2]}, "name": "same"}', "two points are both named 'same'"),
    ('{"grid": {"train.learning_rate": [1]}, "colour": 1}', r"unknown key\(s\) \['colour'\]"),
    ('{"grid": {"train.no_such_key": [1]}}', "train.no_such_key: no such config key"),
])
def test_sweep_file_errors_exit_2_with_one_line(tmp_path, capsys, sweep, message):
    assert main([sweep_file(tmp_path, steps=6, sweep=sweep), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err)


def test_tpu_and_print_launch(tmp_path, capsys):
    path, out = sweep_file(tmp_path, steps=6, sweep=TWO_POINTS), tmp_path / "out"
    assert main([path, "--out", str(out), "--launch", "tpu", "--tpu", "v5e-64", "--zone", "us-west4-a",
                 "--workdir_root", "/gcs/bucket/sweeps", "--repo_dir", "/home/me/hybrid_jax"]) == 0
    script = (out / "launch" / "lr0.002.sh").read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    gcloud = shlex.split(script.strip().splitlines()[-1])
    assert gcloud[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "v5e-64", "--zone", "us-west4-a",
                          "--worker=all"]
    assert gcloud[9] == "--command" and shlex.split(gcloud[10]) == [
        "cd", "/home/me/hybrid_jax", "&&", "python3", "-m", "hybrid_jax.train", f"--config={path}",
        "--workdir=/gcs/bucket/sweeps/lr0.002", "--config.train.learning_rate=0.002", "--coordinator_address=auto"]
    assert (out / "launch" / "run_all.sh").read_text().count("bash ") == 2
    assert "start them all with: bash" in capsys.readouterr().out

    assert main([path, "--out", str(out), "--launch", "tpu", "--tpu", "v5e-64", "--zone", "z",
                 "--workdir_root", "gs://bucket/sweeps"]) == 2
    assert "--workdir_root must be an absolute folder that every worker mounts" in capsys.readouterr().err
    assert main([path, "--out", str(out), "--launch", "print", "--repo_dir", "/r", "--remote_python", "py"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cd /r && ")]
    assert lines == [f"cd /r && py -m hybrid_jax.train --config={path} --workdir={out}/lr{lr} "
                     f"--config.train.learning_rate={lr}" for lr in ("0.001", "0.002")]


def test_slurm_script_runs_two_local_processes_end_to_end(tmp_path):
    path, out = sweep_file(tmp_path, steps=6, sweep='{"points": [{"train.steps": 6}], "name": "p"}'), tmp_path / "out"
    assert main([path, "--out", str(out), "--launch", "slurm", "--nodes", "2", "--gpus_per_node", "8",
                 "--time", "01:00:00"]) == 0
    script = (out / "launch" / "p.sbatch").read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=01:00:00"):
        assert f"#SBATCH {directive}\n" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID" in script

    # Stand-ins: scontrol names this host; srun starts $SLURM_NTASKS copies of its command.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        while [[ "$1" == --* ]]; do shift; done
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
        status=0
        for pid in "${pids[@]}"; do wait "$pid" || status=1; done
        exit $status
    """))
    for tool in ("scontrol", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(child_env(), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_NTASKS="2", COORDINATOR_PORT=str(port), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(["bash", str(out / "launch" / "p.sbatch")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "over 4 cpu device(s), 2 process(es)" in result.stdout
    iterators = sorted(os.listdir(out / "p" / "checkpoints" / "6" / "data_iter"))
    assert [n for n in iterators if n.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]
