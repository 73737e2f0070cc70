"""The training loop: config -> mesh -> data -> sharded state -> steps, evals, checkpoints, metrics.

    train(load_config("experiments/configs/kimi_linear.py:tiny"), "runs/x")

Three phases. Setup (`_build`, then `_open`), so that every mistake surfaces before anything
compiles: the config is validated (`hybrid_jax.config.validate` with this run's device and process
counts, so the mesh shape and the batch layout are checked too), the mesh is built, the datasets
are opened (a missing path fails here), and the model is traced abstractly; then the run resumes
from the newest checkpoint in `<workdir>/checkpoints` if there is one (onto the current mesh), else
initialises. The loop (`_Loop`) runs the steps; the finish (`_finish`) plots and reports.

Per step: the next batch of each process is assembled into one global array, the jitted step runs
(asynchronously), and its metrics stay on the device (in a `MetricsBuffer`) until the next sync
point, a log record, an eval, or a checkpoint, where all pending losses are fetched and checked. A non-finite loss stops
the run with `NonFiniteLossError` before the bad state can be saved, so the newest checkpoint is the
last good one. SIGTERM (preemption) finishes the current step, saves a checkpoint and returns with
status "preempted"; the same command resumes. With several processes the stop step is agreed through
JAX's preemption sync service so every process saves the same step.

Evaluation runs every `train.eval_every` steps on the first `train.eval_steps` validation batches and,
at the end, on the whole validation split: the masked mean loss (nats per scored token, summed over
the batches and divided by their mask total; `hybrid_jax.train.step`), perplexity, and what the source
reports (`stats.eval_metrics`): bits per byte next to the corpus's unigram baseline for text, accuracy
over the answer positions next to chance for the synthetic tasks (`hybrid_jax.data.tasks`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from hybrid_jax.checks import fail
from hybrid_jax.config import validate
from hybrid_jax.data import Datasets, TaskStats, make_datasets
from hybrid_jax.train import mesh as mesh_lib
from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.metrics import MetricsBuffer, MetricsLogger, plot_accuracy_curve, plot_loss_curve
from hybrid_jax.train.state import TrainSetup, build_train_setup
from hybrid_jax.train.step import TrainState, make_eval_step, make_train_step

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The config, the data path or the mesh cannot make a run (raised before anything compiles)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the newest checkpoint predates it."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    workdir: str
    step: int  # steps completed
    status: str  # "completed", "preempted" (SIGTERM) or "stopped" (stop_at_step)
    final_eval: dict | None  # the full-validation record (completed runs only)
    unigram_bits_per_byte: float | None  # text sources' baseline (None for the synthetic tasks)
    checkpoint_dir: str
    checkpoint_steps: tuple[int, ...]
    plot_path: str | None
    tokens_per_sec: float | None  # training throughput, compilation and evals excluded
    chance_accuracy: float | None = None  # synthetic tasks' baseline (None for text)

    def summary(self) -> str:
        lines = []
        ev = self.final_eval
        if ev is not None and "val_accuracy" in ev:
            lines.append(f"validation: accuracy {ev['val_accuracy']:.4f} (loss {ev['val_loss']:.4f} nats per "
                         f"answer) vs chance {self.chance_accuracy:.4f}")
        elif ev is not None:
            lines.append(
                f"validation: {ev['val_bits_per_byte']:.4f} bits/byte (loss {ev['val_loss']:.4f} "
                f"nats/token, perplexity {ev['val_perplexity']:.3f}) vs unigram baseline "
                f"{self.unigram_bits_per_byte:.4f} bits/byte"
            )
        else:
            lines.append(f"{self.status} at step {self.step}; rerun the same command to resume")
        if self.tokens_per_sec:
            lines.append(f"throughput: {self.tokens_per_sec:,.0f} tokens/s")
        lines.append(f"checkpoints: {self.checkpoint_dir} (steps {list(self.checkpoint_steps)})")
        lines.append(f"metrics: {os.path.join(self.workdir, 'metrics.jsonl')}, "
                     f"TensorBoard: {os.path.join(self.workdir, 'tensorboard')}")
        if self.plot_path:
            lines.append(f"loss curve: {self.plot_path}")
        return "\n".join(lines)


def _data_config(config) -> dict:
    """The keys `make_datasets` reads (worker_count is the loader's, checked by `validate`)."""
    return {key: value for key, value in config.data.items() if key != "worker_count"}


class _Preemption:
    """Whether to stop at a step: SIGTERM here, or (multi-process) a step agreed by all processes."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        # With several processes JAX's preemption notifier owns SIGTERM and syncs the stop step.
        if not self._multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signalled = True

    def __call__(self, step: int) -> bool:
        if self._multiprocess:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _Clock:
    """Seconds spent in train steps (evals and compilation excluded) between log records."""

    def __init__(self):
        self.mark, self.seconds, self.steps = None, 0.0, 0
        self.total_seconds, self.total_steps = 0.0, 0

    def start(self, step: int):
        self.mark = (time.perf_counter(), step)

    def stop(self, step: int):
        if self.mark is not None:
            seconds, steps = time.perf_counter() - self.mark[0], step - self.mark[1]
            self.seconds, self.steps = self.seconds + seconds, self.steps + steps
            self.total_seconds, self.total_steps = self.total_seconds + seconds, self.total_steps + steps
            self.mark = None

    def take_window(self) -> tuple[float, int]:
        window, self.seconds, self.steps = (self.seconds, self.steps), 0.0, 0
        return window


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """`jax.distributed.initialize` when a coordinator is given (argument or JAX_COORDINATOR_ADDRESS).

    Arguments left None come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    The address "auto" calls `jax.distributed.initialize()` without arguments, so JAX detects the
    cluster itself (every worker of a Cloud TPU VM slice; SLURM; Open MPI). CPU processes exchange
    data through gloo collectives. Returns whether it initialised.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return False
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return True
    num_processes = num_processes if num_processes is not None else int(env.get("JAX_NUM_PROCESSES", "0")) or None
    process_id = process_id if process_id is not None else (int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


@dataclasses.dataclass
class _Run:
    """What `train` sets up before the first step: the checked config, mesh, data, compiled-on-call
    steps, and the checkpoint and metrics writers of the workdir."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Mesh
    data: Datasets
    setup: TrainSetup
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    checkpointer: Checkpointer | None = None
    logger: MetricsLogger | None = None
    start: int = 0  # the step the run resumes from (0: fresh)

    @property
    def is_chief(self) -> bool:
        return jax.process_index() == 0


def _build(config, workdir: str | None, devices) -> _Run:
    """Everything that can fail for a config reason, before anything compiles (ConfigError)."""
    try:
        devices = list(jax.devices() if devices is None else devices)
        validate(config, device_count=len(devices), process_count=jax.process_count())
        tc = config.train
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        rules = mesh_lib.axis_rules(config.mesh)
        data = make_datasets(_data_config(config), seq_len=tc.seq_len, batch_size=tc.batch_size,
                             seed=tc.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
                             vocab_size=config.model.vocab_size)
        if data.tokenizer is not None and data.tokenizer.vocab_size > config.model.vocab_size:
            fail("model.vocab_size", f"{config.model.vocab_size} is smaller than the {data.tokenizer.name!r} "
                 f"tokenizer's vocabulary ({data.tokenizer.vocab_size})")
        setup = build_train_setup(config, mesh, rules)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec(rules))
    train_step = make_train_step(setup.graphdef, setup.optimizer, state_shardings=setup.state_shardings,
                                 batch_sharding=batch_sharding, grad_accum_steps=tc.grad_accum_steps,
                                 schedule=setup.schedule)
    eval_step = make_eval_step(setup.graphdef, param_shardings=setup.state_shardings.params,
                               batch_sharding=batch_sharding, buffer_shardings=setup.state_shardings.buffers)
    return _Run(config, _local_workdir(workdir or tc.workdir), mesh, data, setup, batch_sharding,
                train_step, eval_step)


def _local_workdir(workdir: str) -> str:
    """The absolute workdir; a URL is refused, since os.path would quietly turn "gs://b/x" into a
    local folder "gs:/b/x" on each host and the run's checkpoints would be lost with the machine."""
    if "://" in workdir:
        raise ConfigError(f"train.workdir: {workdir!r} is a URL; the trainer writes its workdir with "
                          "file-system calls, so give a folder every host mounts (e.g. a bucket mounted "
                          "with gcsfuse, /gcs/BUCKET/...)")
    return os.path.abspath(workdir)


def _open(run: _Run) -> TrainState:
    """Opens the workdir: the newest checkpoint's state (or a fresh one), config.json, the metrics."""
    tc = run.config.train
    run.checkpointer = checkpointer = Checkpointer(os.path.join(run.workdir, "checkpoints"),
                                                   keep=tc.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is None:
        start, state = 0, run.setup.init_state(tc.seed)
    else:
        try:
            if start > tc.steps:
                fail("train.steps", f"{tc.steps} is below the newest checkpoint's step {start} in "
                     f"{checkpointer.directory}")
            checkpointer.check_process_count(start)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        state = checkpointer.restore(start, run.setup.abstract_state, run.data.train_iter)
    if run.is_chief:
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(run.config.to_json_best_effort(indent=2))
    run.start = start
    run.logger = MetricsLogger(run.workdir, total_steps=tc.steps, start_step=start, enabled=run.is_chief)
    run.logger.message(
        f"{run.setup.num_params:,} parameters | mesh {dict(run.mesh.shape)} over {run.mesh.devices.size} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | {run.data.stats.summary()}"
    )
    if start:
        run.logger.message(f"resumed from the checkpoint at step {start}")
    return state


class _Loop:
    """The steps of one run: asynchronous train steps, log records, evals, checkpoints and stops."""

    def __init__(self, run: _Run):
        self.run, self.tc = run, run.config.train
        self.metrics = MetricsBuffer()
        self.clock = _Clock()
        self.tokens_per_step = self.tc.batch_size * self.tc.seq_len
        self.started = time.perf_counter()

    def sync(self) -> None:
        """Waits for the pending steps; NonFiniteLossError at the first non-finite loss."""
        bad = self.metrics.fetch()
        if bad is None:
            return
        step, loss = bad
        checkpointer = self.run.checkpointer
        checkpointer.wait_until_finished()
        good = checkpointer.latest_step()
        where = f"step {good} in {checkpointer.directory}" if good is not None else "none was saved"
        message = (f"training loss became {loss} at step {step}; stopped without saving. "
                   f"Last good checkpoint: {where}. Lower train.learning_rate, raise "
                   "train.warmup_steps or check the data, then rerun to resume from it.")
        self.run.logger.message(message)
        raise NonFiniteLossError(message)

    def record(self, step: int) -> None:
        """A train record: the window's metrics, throughput (train steps only) and ETA."""
        self.sync()  # waits for the device: the steps are asynchronous until their losses are fetched
        self.clock.stop(step)
        seconds, steps = self.clock.take_window()
        rate = steps * self.tokens_per_step / seconds if steps and seconds > 0 else None
        eta = (self.tc.steps - step) * self.tokens_per_step / rate if rate else float("nan")
        self.run.logger.train(step, **self.metrics.take(), tokens_per_sec=rate, eta_sec=eta,
                              elapsed_sec=time.perf_counter() - self.started)
        self.clock.start(step)

    def evaluate(self, state: TrainState, step: int, max_batches: int | None, final: bool) -> dict:
        """Masked loss and accuracy summed over the validation batches (the eval record)."""
        run = self.run
        sums = [run.eval_step(state.params, mesh_lib.global_batch(batch, run.batch_sharding), state.buffers)
                for batch in run.data.val_batches(max_batches)]
        totals = {key: float(np.sum([s[key] for s in jax.device_get(sums)])) for key in ("nll", "weight", "correct")}
        weight = max(totals["weight"], 1.0)
        loss, accuracy = totals["nll"] / weight, totals["correct"] / weight
        return run.logger.eval(step, loss=loss, batches=len(sums), final=final,
                               **run.data.stats.eval_metrics(loss, accuracy))

    def run_steps(self, state: TrainState, stop_at_step: int | None) -> tuple[TrainState, int, str]:
        """Steps start + 1 .. train.steps, or up to a stop; returns (state, last step, status)."""
        run, tc = self.run, self.tc
        status, step = "completed", run.start
        with _Preemption() as preempted:
            for step in range(run.start + 1, tc.steps + 1):
                batch = mesh_lib.global_batch(next(run.data.train_iter), run.batch_sharding)
                state, metrics = run.train_step(state, batch)
                self.metrics.add(step, metrics)
                if step == run.start + 1:  # the first step compiled: time from here on
                    self.sync()
                    self.clock.start(step)
                if step % tc.log_every == 0 or step == tc.steps:
                    self.record(step)
                if step % tc.eval_every == 0 and step != tc.steps:
                    self.sync()
                    self.clock.stop(step)
                    self.evaluate(state, step, tc.eval_steps, final=False)
                    self.clock.start(step)
                # Called exactly once per step: with several processes it is a collective protocol.
                status = "preempted" if preempted(step) else "stopped" if step == stop_at_step else status
                stop = status != "completed"
                if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
                    self.sync()  # never save a state whose loss is not finite
                    run.checkpointer.save(step, state, run.data.train_iter)
                if stop:
                    run.logger.message(f"{status} after step {step}: checkpoint saved")
                    break
            self.sync()
        return state, step, status


def _finish(run: _Run, loop: _Loop, step: int, status: str, final_eval: dict | None) -> TrainResult:
    """The loss-curve plot (completed runs), the checkpoint list, throughput: the run's result."""
    config, stats = run.config, run.data.stats
    synthetic = isinstance(stats, TaskStats)
    plot_path = None
    if run.is_chief and status == "completed":
        metrics_path, out_path = os.path.join(run.workdir, "metrics.jsonl"), os.path.join(run.workdir, "loss_curve.png")
        title = (f"{os.path.basename(run.workdir)}: {run.setup.num_params:,} parameters, pattern "
                 f"{config.model.pattern!r} x {config.model.num_layers // len(config.model.pattern)}")
        if synthetic:
            plot_path = plot_accuracy_curve(metrics_path, out_path, chance_accuracy=stats.chance_accuracy,
                                            title=title)
        else:
            plot_path = plot_loss_curve(
                metrics_path, out_path, train_bytes_per_token=stats.train_bytes_per_token,
                val_bytes_per_token=stats.bytes_per_token, unigram_bits_per_byte=stats.unigram_bits_per_byte,
                title=title)
    steps = tuple(run.checkpointer.all_steps())
    run.checkpointer.close()
    clock = loop.clock
    throughput = clock.total_steps * loop.tokens_per_step / clock.total_seconds if clock.total_seconds else None
    return TrainResult(
        workdir=run.workdir, step=step, status=status, final_eval=final_eval,
        unigram_bits_per_byte=None if synthetic else stats.unigram_bits_per_byte,
        checkpoint_dir=run.checkpointer.directory, checkpoint_steps=steps, plot_path=plot_path,
        tokens_per_sec=throughput, chance_accuracy=stats.chance_accuracy if synthetic else None,
    )


def train(config, workdir: str | None = None, *, devices=None, stop_at_step: int | None = None) -> TrainResult:
    """Trains `config` in `workdir` (default `config.train.workdir`), resuming if it holds a checkpoint.

    `devices` restricts the mesh to some devices (default: all). `stop_at_step` ends the run after
    that step with a checkpoint, as a preemption would (status "stopped").
    """
    run = _build(config, workdir, devices)
    state = _open(run)
    loop = _Loop(run)
    try:
        state, step, status = loop.run_steps(state, stop_at_step)
        final_eval = loop.evaluate(state, step, None, final=True) if status == "completed" else None
    finally:  # also on errors: started saves must land, and the metrics file must be closed
        run.checkpointer.wait_until_finished()
        run.logger.close()
    return _finish(run, loop, step, status, final_eval)


__all__ = ["ConfigError", "NonFiniteLossError", "TrainResult", "initialize_distributed", "train"]
