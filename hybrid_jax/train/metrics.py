"""Run metrics: a progress line, `metrics.jsonl`, TensorBoard events and the loss-curve plot.

    <workdir>/metrics.jsonl     one JSON object per line, in step order:
                                  train: {"step", "loss", "grad_norm", "learning_rate",
                                          "tokens_per_sec", "elapsed_sec"}   (every train.log_every;
                                          a metric the step does not report is left out; MoE models
                                          add "moe/layer<l>/max_mean_load", ".../aux_loss",
                                          ".../z_loss", ".../dropped" and "moe/penalty")
                                  eval:  {"step", "val_loss", "val_perplexity", "val_bits_per_byte",
                                          "val_batches", "final"}   (text sources; the synthetic
                                          tasks give "val_accuracy" instead of "val_bits_per_byte")
    <workdir>/tensorboard/      the same scalars as TensorBoard events (tensorboardX)
    <workdir>/loss_curve.png    train and validation bits per byte against step, with the unigram
                                baseline; for the synthetic tasks, the loss and the validation
                                accuracy against chance (drawn from metrics.jsonl, so it covers
                                resumed runs)

`loss` of a train record is the mean of the per-step losses since the previous record. A resumed
run first drops the records of steps after its checkpoint (they were computed by the run that
died) and any final evaluation, so the file reads as one uninterrupted run; TensorBoard gets the
same via `purge_step`.
Only process 0 writes; the other processes' loggers do nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys

import jax
import numpy as np

from hybrid_jax import plotting


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file (empty if it does not exist).

    A last line without its newline is the write a killed run did not finish; it is skipped.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressLine:
    """`step 120/300 [####----] loss 2.345 | 12.3k tok/s | ETA 1:23`, redrawn in place on a terminal."""

    def __init__(self, total_steps: int, stream=None, width: int = 20):
        self.total_steps, self.width = total_steps, width
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._open = False

    def update(self, step: int, loss: float, tokens_per_sec: float | None, eta_sec: float) -> None:
        done = int(self.width * step / self.total_steps)
        bar = "#" * done + "-" * (self.width - done)
        if tokens_per_sec is None:
            rate = "?"
        else:
            rate = f"{tokens_per_sec / 1e3:.1f}k" if tokens_per_sec >= 1e3 else f"{tokens_per_sec:.0f}"
        text = f"step {step}/{self.total_steps} [{bar}] loss {loss:.4f} | {rate} tok/s | ETA {_duration(eta_sec)}"
        if self.interactive:
            self.stream.write("\r" + text + "\033[K")
            self._open = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (eval results, checkpoints) that does not disturb the bar."""
        self.end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


class MetricsBuffer:
    """The train-step metrics between two log records.

    `add(step, metrics)` keeps a step's metrics as the step returned them (device arrays: nothing
    waits for the device). `fetch()` brings every pending step to the host, in step order, and
    stops at the first whose "loss" is not finite, returning that (step, loss) (None when all are
    finite). `take()` gives the window's record and starts the next window:

        loss = mean of the fetched losses since the previous take
        k    = the newest fetched value of every other key k

    A key that the steps do not report (the step reports "learning_rate" only when it knows the
    schedule) is simply absent from the record.
    """

    def __init__(self):
        self._pending: list[tuple[int, dict]] = []
        self._losses: list[float] = []
        self._latest: dict[str, float] = {}

    def add(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))

    def fetch(self) -> tuple[int, float] | None:
        pending, self._pending = self._pending, []
        for (step, _), values in zip(pending, jax.device_get([metrics for _, metrics in pending])):
            loss = float(values["loss"])
            if not math.isfinite(loss):
                return step, loss
            self._losses.append(loss)
            self._latest.update({key: float(value) for key, value in values.items() if key != "loss"})
        return None

    def take(self) -> dict[str, float]:
        loss = float(np.mean(self._losses)) if self._losses else float("nan")
        self._losses = []
        return {"loss": loss, **self._latest}


class MetricsLogger:
    """Writes train/eval records to metrics.jsonl, TensorBoard and the progress line."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.progress = ProgressLine(total_steps)
        self._tb = None
        if not enabled:
            return
        # Keep the history up to the step we resume from: later records belong to a run that died,
        # and a final evaluation is redone when this run ends.
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step and not r.get("final")]
        os.makedirs(workdir, exist_ok=True)
        with open(self.path + ".tmp", "w") as f:  # replaced in one step: a kill keeps either file
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

    def _write(self, record: dict, prefix: str) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def train(self, step: int, *, loss: float, tokens_per_sec: float | None, eta_sec: float,
              elapsed_sec: float, **scalars: float) -> None:
        """A train record; `tokens_per_sec` is None while nothing has been timed (compilation).
        `scalars` are the step's other metrics ("grad_norm", "learning_rate", ...), written as given."""
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, **scalars, "tokens_per_sec": tokens_per_sec,
                  "elapsed_sec": elapsed_sec}
        self._write(record, "train")
        self.progress.update(step, loss, tokens_per_sec, eta_sec)

    def eval(self, step: int, *, loss: float, batches: int, final: bool, **source_metrics: float) -> dict:
        """An eval record; `source_metrics` (the data's `eval_metrics`: "bits_per_byte" or "accuracy")
        are written as "val_<name>"."""
        record = {"step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0)),
                  **{f"val_{name}": value for name, value in source_metrics.items()},
                  "val_batches": batches, "final": final}
        if self.enabled:
            self._write(record, "eval")
            units = {"bits_per_byte": "{:.4f} bits/byte", "accuracy": "accuracy {:.4f}"}
            extra = "".join(f" | {units.get(name, name + ' {:.4f}').format(value)}"
                            for name, value in source_metrics.items())
            self.progress.message(f"eval @ step {step}: val loss {loss:.4f} | perplexity "
                                  f"{record['val_perplexity']:.3f}{extra} ({batches} batches)")
        return record

    def message(self, text: str) -> None:
        if self.enabled:
            self.progress.message(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.end_line()
        self._file.close()
        self._tb.close()
        self.enabled = False


def plot_loss_curve(metrics_path: str, out_path: str, *, train_bytes_per_token: float,
                    val_bytes_per_token: float, unigram_bits_per_byte: float, title: str | None = None) -> str:
    """Train and validation bits per byte against step, from metrics.jsonl; returns `out_path`."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    to_bpb = lambda nats, per_token: nats / math.log(2) / per_token  # noqa: E731
    fig, ax = plotting.figure(figsize=(7, 4.2))
    if train:
        ax.plot([s for s, _ in train], [to_bpb(x, train_bytes_per_token) for _, x in train],
                label="train", linewidth=1.2)
    if val:
        ax.plot([s for s, _ in val], [to_bpb(x, val_bytes_per_token) for _, x in val],
                "o-", label="validation", markersize=4)
    ax.axhline(unigram_bits_per_byte, color="gray", linestyle="--",
               label=f"unigram baseline ({unigram_bits_per_byte:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return plotting.save(fig, out_path)


def plot_accuracy_curve(metrics_path: str, out_path: str, *, chance_accuracy: float, title: str | None = None) -> str:
    """Synthetic tasks: train / validation loss (left) and validation accuracy (right) against step."""
    records = read_metrics(metrics_path)
    fig, (loss_ax, acc_ax) = plotting.figure(1, 2, figsize=(10, 4))
    for key, label, style in (("loss", "train", "-"), ("val_loss", "validation", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            loss_ax.plot(*zip(*points), style, label=label, markersize=4, linewidth=1.2)
    loss_ax.set(xlabel="step", ylabel="loss (nats per answer)")
    accuracy = [(r["step"], r["val_accuracy"]) for r in records if "val_accuracy" in r]
    if accuracy:
        acc_ax.plot(*zip(*accuracy), "o-", label="validation", markersize=4)
    acc_ax.axhline(chance_accuracy, color="gray", linestyle="--", label=f"chance ({chance_accuracy:.3f})")
    acc_ax.set(xlabel="step", ylabel="accuracy over the answers", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return plotting.save(fig, out_path)


__all__ = ["MetricsBuffer", "MetricsLogger", "ProgressLine", "plot_accuracy_curve", "plot_loss_curve", "read_metrics"]
