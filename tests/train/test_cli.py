"""`python -m hybrid_jax.train` as a process: SIGKILL / SIGTERM and resume, two processes, bad input."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hybrid_jax.train import read_metrics, train
from tests.train.helpers import ROOT, config_overrides, tiny_config

# Restoring a checkpoint reproduces the uninterrupted run; only the process differs, so the same
# compiled programs run on the same data (measured: identical to the last bit).
RESUME_RTOL = 1e-6
LONG_RUN = dict(steps=120, checkpoint_every=40, eval_every=100)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Child environment: 8 fake devices and the test precision; a compilation cache the children
    share (the parent's, when `make test` gave one), so only the first child compiles."""
    env = dict(os.environ)
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Child:
    """`python -m hybrid_jax.train ARGS` with its output collected line by line as it runs."""

    def __init__(self, args, env):
        self.process = subprocess.Popen([sys.executable, "-m", "hybrid_jax.train", *args], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        self._readers = [threading.Thread(target=lambda s=s, d=d: d.extend(s), daemon=True)
                         for s, d in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def wait_for(self, condition, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"exited early ({self.process.returncode}):\n{''.join(self.err)[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError("timed out")
            time.sleep(0.02)

    def finish(self, timeout: float = 600.0) -> tuple[int, str, str]:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        for reader in self._readers:
            reader.join()
        return code, "".join(self.out), "".join(self.err)

    def trained_past(self, step: int) -> bool:
        """Whether this process printed its progress line for a step after `step`."""
        return any(line.startswith("step ") and int(line.split()[1].split("/")[0]) > step for line in self.out)


def saved_steps(workdir) -> list[int]:
    """Finalised checkpoints (orbax renames the temporary directory when a save completes)."""
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def test_sigkill_then_sigterm_then_resume_matches_an_uninterrupted_run(corpus, env, tmp_path):
    reference = train(tiny_config(corpus, **LONG_RUN), str(tmp_path / "reference"))
    workdir = str(tmp_path / "run")
    args = [*config_overrides(corpus, **LONG_RUN), f"--workdir={workdir}"]

    # 1. SIGKILL as soon as the first checkpoint is on disk (training goes on meanwhile).
    first = Child(args, env)
    first.wait_for(lambda: saved_steps(workdir))
    first.process.send_signal(signal.SIGKILL)
    assert first.finish()[0] == -signal.SIGKILL
    killed_at = saved_steps(workdir)[-1]
    assert killed_at < LONG_RUN["steps"]

    # 2. Resume, then SIGTERM once it has trained past the checkpoint: it saves and exits 0.
    second = Child(args, env)
    second.wait_for(lambda: second.trained_past(killed_at))
    second.process.send_signal(signal.SIGTERM)
    code, out, err = second.finish()
    assert code == 0, err[-3000:]
    assert f"resumed from the checkpoint at step {killed_at}" in out
    preempted_at = int(out.split("preempted after step ")[1].split(":")[0])
    assert preempted_at > killed_at and preempted_at in saved_steps(workdir)
    assert "rerun the same command to resume" in out

    # 3. Resume to the end.
    code, out, err = Child(args, env).finish()
    assert code == 0, err[-3000:]
    assert f"resumed from the checkpoint at step {preempted_at}" in out and "validation:" in out
    losses, expected = train_losses(workdir), train_losses(reference.workdir)
    assert sorted(losses) == list(range(1, LONG_RUN["steps"] + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(losses)],
                               rtol=RESUME_RTOL)
    final = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r.get("final")]
    np.testing.assert_allclose(final[0]["val_loss"], reference.final_eval["val_loss"], rtol=RESUME_RTOL)


def test_two_processes_train_and_checkpoint(corpus, env, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = str(tmp_path / "run")
    child_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")  # 4 devices in all
    args = [*config_overrides(corpus), f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2"]
    children = [Child([*args, f"--process_id={i}"], child_env) for i in range(2)]
    (code0, out0, err0), (code1, out1, err1) = [child.finish() for child in children]
    assert code0 == 0 and code1 == 0, err0[-3000:] + err1[-3000:]
    assert "over 4 cpu device(s), 2 process(es)" in out0 and "validation:" in out0
    assert "validation:" not in out1 and "step 1/6" not in out1  # only process 0 reports
    assert saved_steps(workdir) == [3, 6]
    for step in (3, 6):
        iterators = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(step), "data_iter")))
        assert [n for n in iterators if n.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]
    losses = train_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(losses.values())))


def test_bad_data_path_exits_2_with_one_line(corpus, env, tmp_path):
    args = [*config_overrides(corpus), "--config.data.source=/no/such/dir", f"--workdir={tmp_path}/run"]
    code, _, err = Child(args, env).finish()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["error: data.source: no such file or directory: '/no/such/dir' (expected 'shakespeare', "
                     "a folder of .txt files, or a .txt, .npy or .array_record file)"]
    assert not os.path.exists(tmp_path / "run")
