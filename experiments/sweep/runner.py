"""Runs a sweep's points on this machine: one trainer process per point, N at a time.

    OUT/<point>/                   the point's trainer workdir (checkpoints/, metrics.jsonl, ...)
    OUT/<point>/train.log          the trainer's output, every attempt appended
    OUT/<point>/sweep_attempts.json  [{"start", "last_seen", "exit"}] per attempt (wall time)
    OUT/jax_cache/                 the trainers' persistent compilation cache (unless
                                   JAX_COMPILATION_CACHE_DIR is set)
    OUT/<point>/sweep_point.json   written by the runner once the trainer exited 0 after its
                                   final evaluation: the point is finished and is skipped next time

Each point runs `python -m hybrid_jax.train ...` (`Sweep.point` flags) as a subprocess, so a point
interrupted in any way (the runner killed, SIGTERM, a crash) resumes from its newest checkpoint when
the sweep is rerun. SIGINT / SIGTERM to the runner forwards SIGTERM to the trainers, which save a
checkpoint and exit; the runner then stops. A trainer that exits 0 without its final evaluation
(preempted) is not finished.

Progress, one line per running point every `progress_every` seconds (and at each start and end):

    [2/12] kda-d64: step 300/800 (37%) | 41.2 steps/s | point ETA 0:12 | sweep ETA 4:31

The point's step and steps/s come from the train records of its metrics.jsonl (their elapsed_sec,
so compilation is not counted); the sweep ETA is the mean wall time of the points finished so far
(else the running points' projected times) times the points still queued, plus the running
points' remaining time, over the parallelism.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

from experiments.sweep.spec import Point, Sweep
from hybrid_jax.train.metrics import read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER = "sweep_point.json"
ATTEMPTS = "sweep_attempts.json"
_HEARTBEAT_SECONDS = 2.0  # how stale the wall time of a killed attempt can be


def repo_relative(path: str) -> str:
    """`path` relative to the repository root when it lies inside it (as the trainer's cwd sees it)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT + os.sep) else path


def trainer_args(sweep: Sweep, point: Point, workdir: str) -> list[str]:
    """The arguments after `python -m hybrid_jax.train` for one point."""
    return [f"--config={sweep.config_spec(point, repo_relative(sweep.config_path))}", f"--workdir={workdir}",
            *point.flags()]


def is_finished(workdir: str) -> bool:
    return os.path.exists(os.path.join(workdir, MARKER))


def _read_json(path: str, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _write_json(path: str, value) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)  # a kill leaves the old file or the new one, never half of one


def latest_checkpoint(workdir: str) -> int | None:
    folder = os.path.join(workdir, "checkpoints")
    steps = [int(name) for name in os.listdir(folder) if name.isdigit()] if os.path.isdir(folder) else []
    return max(steps) if steps else None


def wall_seconds(workdir: str) -> float:
    """Wall time of every attempt at a point (up to its last heartbeat for attempts that were killed)."""
    return sum(a["last_seen"] - a["start"] for a in _read_json(os.path.join(workdir, ATTEMPTS), []))


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclasses.dataclass
class _Attempt:
    """One trainer process of one point."""

    index: int
    point: Point
    workdir: str
    steps: int  # train.steps of the point
    process: subprocess.Popen
    log: object
    started: float
    start_step: int  # the checkpoint it resumed from (0: fresh)
    left: float | None = None  # seconds to go, as of the last progress report

    def progress(self) -> tuple[int | None, float | None, float | None]:
        """(step, steps/s, seconds left) from this attempt's train records (their elapsed_sec:
        compilation before the first record is not counted)."""
        records = [r for r in read_metrics(os.path.join(self.workdir, "metrics.jsonl"))
                   if "loss" in r and r["step"] > self.start_step]
        if not records:
            return None, None, None
        first, last = records[0], records[-1]
        seconds = last.get("elapsed_sec", 0.0) - first.get("elapsed_sec", 0.0)
        rate = (last["step"] - first["step"]) / seconds if seconds > 0 else None
        return last["step"], rate, (self.steps - last["step"]) / rate if rate else None

    def heartbeat(self, now: float, exit_code: int | None = None) -> None:
        path = os.path.join(self.workdir, ATTEMPTS)
        attempts = _read_json(path, [])
        if not attempts or attempts[-1]["start"] != self.started:
            attempts.append({"start": self.started, "last_seen": now, "exit": None})
        attempts[-1].update(last_seen=now, exit=exit_code)
        _write_json(path, attempts)


class SweepRunner:
    """Runs the unfinished points of a sweep; see the module docstring."""

    def __init__(self, sweep: Sweep, points: tuple[Point, ...], out: str, *, parallel: int = 1,
                 progress_every: float = 30.0, python: str = sys.executable, stream=None):
        self.sweep, self.points, self.out = sweep, points, os.path.abspath(out)
        self.parallel, self.progress_every, self.python = parallel, progress_every, python
        self.stream = stream or sys.stdout
        self.durations: list[float] = []  # wall seconds of the points finished by this runner
        self.failed: list[str] = []
        self._stop = False

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _start(self, index: int, point: Point) -> _Attempt:
        workdir = os.path.join(self.out, point.name)
        os.makedirs(workdir, exist_ok=True)
        steps = self.sweep.point_config(point).train.steps
        resume = latest_checkpoint(workdir)
        how = f"resuming from its checkpoint at step {resume}" if resume else "starting"
        self.say(f"[{index + 1}/{len(self.points)}] {point.name}: {how} ({steps} steps, log {workdir}/train.log)")
        log = open(os.path.join(workdir, "train.log"), "a")
        args = [self.python, "-m", "hybrid_jax.train", *trainer_args(self.sweep, point, workdir)]
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(args)}\n")
        log.flush()
        env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        # Points that differ only in data or optimiser settings run the same programs: compile once.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(self.out, "jax_cache"))
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        attempt = _Attempt(index, point, workdir, steps, process, log, time.time(), resume or 0)
        attempt.heartbeat(attempt.started)
        return attempt

    def _finish(self, attempt: _Attempt, code: int) -> None:
        now = time.time()
        attempt.heartbeat(now, code)
        attempt.log.close()
        label = f"[{attempt.index + 1}/{len(self.points)}] {attempt.point.name}"
        final = [r for r in read_metrics(os.path.join(attempt.workdir, "metrics.jsonl")) if r.get("final")]
        if code == 0 and final:
            wall = wall_seconds(attempt.workdir)
            _write_json(os.path.join(attempt.workdir, MARKER), {
                "name": attempt.point.name, "preset": attempt.point.preset, "overrides": attempt.point.overrides,
                "wall_sec": wall, "finished_at": now})
            self.durations.append(now - attempt.started)
            self.say(f"{label}: finished in {_duration(now - attempt.started)}")
            return
        self.failed.append(attempt.point.name)
        why = "stopped before its final evaluation (rerun to resume)" if code == 0 else f"exited with status {code}"
        with open(os.path.join(attempt.workdir, "train.log")) as f:
            tail = "".join(f.readlines()[-15:])
        self.say(f"{label}: {why}; last lines of its train.log:\n{tail}")

    def _report(self, running: list[_Attempt], queued: int) -> None:
        now = time.time()
        lines = []
        for attempt in running:
            step, rate, attempt.left = attempt.progress()
            where = f"step {step}/{attempt.steps} ({100 * step / attempt.steps:.0f}%)" if step else "compiling"
            lines.append(f"[{attempt.index + 1}/{len(self.points)}] {attempt.point.name}: {where} | "
                         f"{f'{rate:.1f}' if rate else '?'} steps/s | point ETA {_duration(attempt.left)}")
        sweep_eta = _duration(self._sweep_eta(running, queued, now))
        for line in lines:
            self.say(f"{line} | sweep ETA {sweep_eta}")

    def _sweep_eta(self, running: list[_Attempt], queued: int, now: float) -> float | None:
        """Seconds until the last point ends (module docstring); None before anything is known."""
        projected = [now - a.started + a.left for a in running if a.left is not None]
        known = self.durations or projected
        if not known:
            return None
        mean = sum(known) / len(known)
        # A point still compiling is expected to take the mean point time.
        lefts = [a.left if a.left is not None else max(mean - (now - a.started), 0.0) for a in running]
        return (queued * mean + sum(lefts)) / self.parallel

    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    def run(self) -> list[str]:
        """Runs every unfinished point; returns the names of the points that did not finish."""
        todo = []
        for index, point in enumerate(self.points):
            if is_finished(os.path.join(self.out, point.name)):
                self.say(f"[{index + 1}/{len(self.points)}] {point.name}: finished earlier, skipped")
            else:
                todo.append((index, point))
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        running: list[_Attempt] = []
        last_report = last_beat = time.time()
        try:
            while (todo or running) and not self._stop:
                while todo and len(running) < self.parallel:
                    running.append(self._start(*todo.pop(0)))
                time.sleep(0.2)
                for attempt in [a for a in running if a.process.poll() is not None]:
                    running.remove(attempt)
                    self._finish(attempt, attempt.process.returncode)
                now = time.time()
                if now - last_beat >= _HEARTBEAT_SECONDS:
                    for attempt in running:
                        attempt.heartbeat(now)
                    last_beat = now
                if running and now - last_report >= self.progress_every:
                    self._report(running, len(todo))
                    last_report = now
            if self._stop:
                self.say("sweep interrupted: stopping the running points (each saves a checkpoint); "
                         "rerun the same command to resume")
                for attempt in running:
                    attempt.process.send_signal(signal.SIGTERM)
                for attempt in running:
                    self._finish(attempt, attempt.process.wait())
                self.failed += [point.name for _, point in todo]
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.failed


__all__ = ["ATTEMPTS", "MARKER", "REPO_ROOT", "SweepRunner", "is_finished", "latest_checkpoint", "repo_relative",
           "trainer_args", "wall_seconds"]
