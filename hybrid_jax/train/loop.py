"""The training loop: config -> mesh -> data -> sharded state -> steps, evals, checkpoints, metrics.

    train(load_config("experiments/configs/kimi_linear.py:tiny"), "runs/x")

Order of work, so that every mistake surfaces before anything compiles: the config is validated
(`check_config`), the mesh is built and the batch checked against it, the datasets are opened (a
missing path fails here), and the model is traced abstractly. Then the run resumes from the newest
checkpoint in `<workdir>/checkpoints` if there is one (onto the current mesh), else initialises.

Per step: the next batch of each process is assembled into one global array, the jitted step runs
(asynchronously), and its loss stays on the device until the next sync point, a log record,
an eval, or a checkpoint, where all pending losses are fetched and checked. A non-finite loss stops
the run with `NonFiniteLossError` before the bad state can be saved, so the newest checkpoint is the
last good one. SIGTERM (preemption) finishes the current step, saves a checkpoint and returns with
status "preempted"; the same command resumes. With several processes the stop step is agreed through
JAX's preemption sync service so every process saves the same step.

Evaluation runs every `train.eval_every` steps on the first `train.eval_steps` validation batches and,
at the end, on the whole validation split: mean loss (nats/token), perplexity and bits per byte
(`DataStats.bits_per_byte`), next to the unigram baseline of the corpus.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from hybrid_jax.config import validate
from hybrid_jax.data import make_datasets
from hybrid_jax.train import mesh as mesh_lib
from hybrid_jax.train.checkpoint import Checkpointer
from hybrid_jax.train.metrics import MetricsLogger, plot_loss_curve
from hybrid_jax.train.state import build_train_setup
from hybrid_jax.train.step import make_eval_step, make_train_step

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
    unigram_bits_per_byte: float
    checkpoint_dir: str
    checkpoint_steps: tuple[int, ...]
    plot_path: str | None
    tokens_per_sec: float | None  # training throughput, compilation and evals excluded

    def summary(self) -> str:
        lines = []
        if self.final_eval is not None:
            ev = self.final_eval
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


def _fail(key: str, message: str):
    raise ValueError(f"{key}: {message}")


def check_config(config) -> None:
    """`hybrid_jax.config.validate` plus the checks only the trainer needs; one ValueError per problem."""
    validate(config)
    tc = config.train
    for key in ("grad_accum_steps", "keep_checkpoints"):
        value = tc[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"train.{key}", f"must be an int >= 1, got {value!r}")
    if tc.batch_size % tc.grad_accum_steps:
        _fail("train.grad_accum_steps", f"{tc.grad_accum_steps} must divide train.batch_size ({tc.batch_size})")
    if tc.warmup_steps >= tc.steps:
        _fail("train.warmup_steps", f"{tc.warmup_steps} must be smaller than train.steps ({tc.steps})")
    if not 0 <= tc.min_learning_rate_ratio <= 1:
        _fail("train.min_learning_rate_ratio", f"must be in [0, 1], got {tc.min_learning_rate_ratio!r}")
    for key in ("b1", "b2"):
        if not 0 <= tc[key] < 1:
            _fail(f"train.{key}", f"must be in [0, 1), got {tc[key]!r}")
    for key, low in (("weight_decay", 0), ("grad_clip", 0)):
        if not tc[key] >= low:
            _fail(f"train.{key}", f"must be >= {low} (grad_clip 0 turns clipping off), got {tc[key]!r}")
    if not tc.adam_eps > 0:
        _fail("train.adam_eps", f"must be > 0, got {tc.adam_eps!r}")
    if config.data.worker_count != 0:
        _fail("data.worker_count", "the LM pipeline slices an in-memory token array in the training "
              f"process; only 0 is supported, got {config.data.worker_count!r}")


def _check_batch(config, mesh, rules) -> None:
    tc = config.train
    shards = mesh_lib.batch_shards(mesh, rules)
    rows = tc.batch_size // tc.grad_accum_steps
    if rows % shards:
        _fail("train.batch_size", f"{tc.batch_size} / grad_accum_steps {tc.grad_accum_steps} = {rows} rows "
              f"per micro-batch must divide over the {shards} batch shards of mesh {dict(mesh.shape)}")
    if tc.batch_size % jax.process_count():
        _fail("train.batch_size", f"{tc.batch_size} must divide over {jax.process_count()} processes")


def _data_config(config) -> dict:
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
    CPU processes exchange data through gloo collectives. Returns whether it initialised.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator_address:
        return False
    num_processes = num_processes if num_processes is not None else int(env.get("JAX_NUM_PROCESSES", "0")) or None
    process_id = process_id if process_id is not None else (int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


def train(config, workdir: str | None = None, *, devices=None, stop_at_step: int | None = None) -> TrainResult:
    """Trains `config` in `workdir` (default `config.train.workdir`), resuming if it holds a checkpoint.

    `devices` restricts the mesh to some devices (default: all). `stop_at_step` ends the run after
    that step with a checkpoint, as a preemption would (status "stopped").
    """
    try:
        check_config(config)
        tc = config.train
        workdir = os.path.abspath(workdir or tc.workdir)
        mesh = mesh_lib.make_mesh(config.mesh, devices)
        rules = mesh_lib.axis_rules(config.mesh)
        _check_batch(config, mesh, rules)
        data = make_datasets(_data_config(config), seq_len=tc.seq_len, batch_size=tc.batch_size,
                             seed=tc.seed, shard_index=jax.process_index(), shard_count=jax.process_count())
        if data.tokenizer.vocab_size > config.model.vocab_size:
            _fail("model.vocab_size", f"{config.model.vocab_size} is smaller than the {data.tokenizer.name!r} "
                  f"tokenizer's vocabulary ({data.tokenizer.vocab_size})")
        setup = build_train_setup(config, mesh, rules)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    batch_sharding = NamedSharding(mesh, mesh_lib.batch_spec(rules))
    train_step = make_train_step(setup.graphdef, setup.optimizer, state_shardings=setup.state_shardings,
                                 batch_sharding=batch_sharding, grad_accum_steps=tc.grad_accum_steps,
                                 schedule=setup.schedule)
    eval_step = make_eval_step(setup.graphdef, param_shardings=setup.state_shardings.params,
                               batch_sharding=batch_sharding)

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    start = checkpointer.latest_step()
    if start is None:
        start, state = 0, setup.init_state(tc.seed)
    else:
        try:
            if start > tc.steps:
                _fail("train.steps", f"{tc.steps} is below the newest checkpoint's step {start} in "
                      f"{checkpointer.directory}")
            checkpointer.check_process_count(start)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        state = checkpointer.restore(start, setup.abstract_state, data.train_iter)
    is_chief = jax.process_index() == 0
    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    logger = MetricsLogger(workdir, total_steps=tc.steps, start_step=start, enabled=is_chief)
    logger.message(
        f"{setup.num_params:,} parameters | mesh {dict(mesh.shape)} over {mesh.devices.size} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es) | {data.stats.summary()}"
    )
    if start:
        logger.message(f"resumed from the checkpoint at step {start}")

    def evaluate(params, step: int, max_batches: int | None, final: bool) -> dict:
        losses = [eval_step(params, mesh_lib.global_batch(batch, batch_sharding))
                  for batch in data.val_batches(max_batches)]
        loss = float(np.mean(jax.device_get(losses)))
        return logger.eval(step, loss=loss, bits_per_byte=data.stats.bits_per_byte(loss),
                           batches=len(losses), final=final)

    tokens_per_step = tc.batch_size * tc.seq_len
    pending: list[tuple[int, dict]] = []  # (step, on-device metrics) not yet fetched
    window_losses: list[float] = []
    last = {"grad_norm": float("nan"), "learning_rate": float("nan")}  # of the newest fetched step
    clock = _Clock()
    run_start = time.perf_counter()

    def sync() -> None:
        """Fetches pending losses; raises NonFiniteLossError at the first bad one."""
        values = jax.device_get([metrics for _, metrics in pending])
        for (step, _), metrics in zip(pending, values):
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                checkpointer.wait_until_finished()
                good = checkpointer.latest_step()
                where = f"step {good} in {checkpointer.directory}" if good is not None else "none was saved"
                message = (f"training loss became {loss} at step {step}; stopped without saving. "
                           f"Last good checkpoint: {where}. Lower train.learning_rate, raise "
                           "train.warmup_steps or check the data, then rerun to resume from it.")
                logger.message(message)
                raise NonFiniteLossError(message)
            window_losses.append(loss)
            last.update(grad_norm=float(metrics["grad_norm"]), learning_rate=float(metrics["learning_rate"]))
        pending.clear()

    def record(step: int) -> None:
        sync()  # waits for the device: the steps are asynchronous until their losses are fetched
        clock.stop(step)
        seconds, steps = clock.take_window()
        rate = steps * tokens_per_step / seconds if steps and seconds > 0 else None
        eta = (tc.steps - step) * tokens_per_step / rate if rate else float("nan")
        logger.train(step, loss=float(np.mean(window_losses)), grad_norm=last["grad_norm"],
                     learning_rate=last["learning_rate"], tokens_per_sec=rate, eta_sec=eta,
                     elapsed_sec=time.perf_counter() - run_start)
        window_losses.clear()
        clock.start(step)

    status, step = "completed", start
    try:
        with _Preemption() as preempted:
            for step in range(start + 1, tc.steps + 1):
                batch = mesh_lib.global_batch(next(data.train_iter), batch_sharding)
                state, metrics = train_step(state, batch)
                pending.append((step, metrics))
                if step == start + 1:  # the first step compiled: time from here on
                    sync()
                    clock.start(step)
                if step % tc.log_every == 0 or step == tc.steps:
                    record(step)
                if step % tc.eval_every == 0 and step != tc.steps:
                    sync()
                    clock.stop(step)
                    evaluate(state.params, step, tc.eval_steps, final=False)
                    clock.start(step)
                # Called exactly once per step: with several processes it is a collective protocol.
                status = "preempted" if preempted(step) else "stopped" if step == stop_at_step else status
                stop = status != "completed"
                if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
                    sync()  # never save a state whose loss is not finite
                    checkpointer.save(step, state, data.train_iter)
                if stop:
                    logger.message(f"{status} after step {step}: checkpoint saved")
                    break
            sync()
        final_eval = evaluate(state.params, step, None, final=True) if status == "completed" else None
    finally:  # also on errors: started saves must land, and the metrics file must be closed
        checkpointer.wait_until_finished()
        logger.close()
    plot_path = None
    if is_chief and status == "completed":
        plot_path = plot_loss_curve(
            os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"),
            train_bytes_per_token=data.stats.train_bytes_per_token,
            val_bytes_per_token=data.stats.bytes_per_token,
            unigram_bits_per_byte=data.stats.unigram_bits_per_byte,
            title=f"{os.path.basename(workdir)}: {setup.num_params:,} parameters, pattern "
                  f"{config.model.pattern!r} x {config.model.num_layers // len(config.model.pattern)}",
        )
    steps = tuple(checkpointer.all_steps())
    checkpointer.close()
    throughput = clock.total_steps * tokens_per_step / clock.total_seconds if clock.total_seconds else None
    return TrainResult(
        workdir=workdir, step=step, status=status, final_eval=final_eval,
        unigram_bits_per_byte=data.stats.unigram_bits_per_byte,
        checkpoint_dir=checkpointer.directory, checkpoint_steps=steps, plot_path=plot_path,
        tokens_per_sec=throughput,
    )


__all__ = ["ConfigError", "NonFiniteLossError", "TrainResult", "check_config", "initialize_distributed", "train"]
