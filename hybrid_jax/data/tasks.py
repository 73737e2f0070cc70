"""Synthetic recall tasks as training sources: `data.source = "mqar"` or `"selective_copy"`.

    mqar             multi-query associative recall: recall the value stored with each queried key
                     (data.mqar.num_kv_pairs pairs, query placement power law data.mqar.power_a)
    selective_copy   copy the data.selective_copy.num_tokens tokens scattered among noise, in order

Rows are generated on the fly (`hybrid_jax.data.synthetic`) with the model's vocabulary
(`model.vocab_size`), each from its own seed, so no row is stored and any row can be regenerated:

    training row r    = generator(numpy default_rng([seed, 0, r]))          r = 0, 1, 2, ...
    validation row r  = generator(numpy default_rng([seed, 1, r]))          r < data.val_rows

The validation set is a fixed held-out set drawn from a different seed stream. Batch i of the
training stream holds the global rows i*B .. i*B + B - 1 and process p of n takes its B/n
consecutive rows of them (the order `train.mesh.global_batch` assembles), so the global batch of a
step does not depend on the process count, and the iterator's whole state is its batch counter
(a grain iterator: checkpointed and restored exactly like the text pipeline's).

Every batch carries "loss_mask" [B, T] float32, 1 at the answer positions: the trainer's loss,
`val_accuracy` (argmax == target) and the chance baseline (one over the number of possible answers)
are over those positions only. With `data.packing = "documents"` (the default) a row is one
document, one task instance: "segment_ids" are all 1 and "positions" 0 .. T - 1 (int32 [B, T]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import grain
import numpy as np

from hybrid_jax.checks import check_int, check_positive_number, fail
from hybrid_jax.data.synthetic import mqar_batch, selective_copy_batch

Batch = dict[str, np.ndarray]
TRAIN_STREAM, VAL_STREAM = 0, 1
# Rows are indexed by a grain MapDataset; the training stream is endless in practice.
_TRAIN_BATCHES = 2**62
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic task: its config keys (`data.<name>.*`), a row generator and its checks."""

    name: str
    defaults: dict
    # (rng, rows, seq_len, vocab_size, task config) -> {"inputs", "targets", "mask"}
    generate: Callable[[np.random.Generator, int, int, int, Mapping], Batch]
    # (task config, seq_len, vocab_size) -> None; raises "data.<name>.<key>: ..." or names the other key
    check: Callable[[Mapping, int, int], None]
    chance_accuracy: Callable[[Mapping, int], float]  # (task config, vocab_size)
    describe: Callable[[Mapping], str]


def _check_mqar(config: Mapping, seq_len: int, vocab_size: int) -> None:
    pairs = check_int(config, "num_kv_pairs", prefix="data.mqar")
    check_positive_number(config, "power_a", prefix="data.mqar")
    if seq_len < 3 * pairs:
        fail("data.mqar.num_kv_pairs", f"{pairs} pairs need train.seq_len >= {3 * pairs} (2 tokens per pair "
             f"of context plus one per query), got {seq_len}")
    if vocab_size < 2 * (pairs + 1):
        fail("data.mqar.num_kv_pairs", f"{pairs} distinct keys need model.vocab_size >= {2 * (pairs + 1)}, "
             f"got {vocab_size}")


def _check_selective_copy(config: Mapping, seq_len: int, vocab_size: int) -> None:
    tokens = check_int(config, "num_tokens", prefix="data.selective_copy")
    if seq_len < 2 * tokens:
        fail("data.selective_copy.num_tokens", f"{tokens} tokens need train.seq_len >= {2 * tokens}, got {seq_len}")
    if vocab_size < 3:
        fail("model.vocab_size", f"selective copying needs >= 3 (noise, cue, data), got {vocab_size}")


TASKS = {
    "mqar": Task(
        name="mqar",
        defaults={"num_kv_pairs": 8, "power_a": 0.01},
        generate=lambda rng, rows, seq_len, vocab, c: mqar_batch(
            rng, rows, seq_len, vocab, c["num_kv_pairs"], power_a=c["power_a"]),
        check=_check_mqar,
        chance_accuracy=lambda c, vocab: 1.0 / (vocab - vocab // 2),  # values are drawn from [V/2, V)
        describe=lambda c: f"{c['num_kv_pairs']} key-value pairs, power_a {c['power_a']}",
    ),
    "selective_copy": Task(
        name="selective_copy",
        defaults={"num_tokens": 16},
        generate=lambda rng, rows, seq_len, vocab, c: selective_copy_batch(rng, rows, seq_len, vocab, c["num_tokens"]),
        check=_check_selective_copy,
        chance_accuracy=lambda c, vocab: 1.0 / (vocab - 2),  # data tokens are drawn from [2, V)
        describe=lambda c: f"{c['num_tokens']} tokens to copy",
    ),
}
DEFAULT_VAL_ROWS = 512


def default_task_configs() -> dict[str, dict]:
    """The `data.<task>` sections with their defaults."""
    return {name: dict(task.defaults) for name, task in TASKS.items()}


def check_task(data_config: Mapping, *, seq_len: int, vocab_size: int, batch_size: int) -> Task:
    """The task `data.source` names, after checking its section against the run's shapes."""
    task = TASKS[data_config["source"]]
    task.check(data_config[task.name], seq_len, vocab_size)
    val_rows = check_int(data_config, "val_rows", prefix="data")
    if val_rows < batch_size:
        fail("data.val_rows", f"{val_rows} held-out rows make no batch of train.batch_size {batch_size}")
    return task


@dataclasses.dataclass(frozen=True)
class TaskStats:
    """What a synthetic source reports next to its losses (the counterpart of `DataStats`)."""

    source: str
    vocab_size: int
    description: str
    answers_per_row: int
    val_rows: int
    chance_accuracy: float

    def eval_metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        """The eval record's source-specific values: accuracy over the answer positions."""
        return {"accuracy": accuracy}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        return (f"data {self.source} ({self.description}, vocab {self.vocab_size}): rows generated on the fly, "
                f"{self.val_rows} held-out rows, {self.answers_per_row} answers per row, chance accuracy "
                f"{self.chance_accuracy:.4f}")


class _Rows:
    """Random-access batches of one process: batch i = its share of global rows i*B .. i*B + B - 1."""

    def __init__(self, generate_row: Callable[[int], Batch], num_batches: int, global_batch: int,
                 local_batch: int, shard_index: int, documents: bool):
        self._generate_row = generate_row
        self._len, self._global, self._local, self._shard = num_batches, global_batch, local_batch, shard_index
        self._documents = documents

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < self._len:
            raise IndexError(f"batch {index} out of range [0, {self._len})")
        first = index * self._global + self._shard * self._local
        rows = [self._generate_row(first + j) for j in range(self._local)]
        batch = {key: np.concatenate([row[key] for row in rows]) for key in ("inputs", "targets")}
        batch["loss_mask"] = np.concatenate([row["mask"] for row in rows])
        if self._documents:  # one instance per row: a single segment
            shape = batch["inputs"].shape
            batch["segment_ids"] = np.ones(shape, np.int32)
            batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
        return batch


def task_datasets(data_config: Mapping, *, seq_len: int, vocab_size: int, batch_size: int, seed: int,
                  shard_index: int, shard_count: int):
    """(train iterator, val_batches(max_batches=None), TaskStats) of the task `data.source` names."""
    task = check_task(data_config, seq_len=seq_len, vocab_size=vocab_size, batch_size=batch_size)
    task_config = data_config[task.name]
    local = batch_size // shard_count

    def row_maker(stream: int) -> Callable[[int], Batch]:
        return lambda row: task.generate(np.random.default_rng([seed, stream, row]), 1, seq_len, vocab_size,
                                         task_config)

    documents = data_config.get("packing", "documents") == "documents"
    train_rows = _Rows(row_maker(TRAIN_STREAM), _TRAIN_BATCHES, batch_size, local, shard_index, documents)
    train_iter = iter(grain.MapDataset.source(train_rows).to_iter_dataset(_READ_OPTIONS))
    val_rows = _Rows(row_maker(VAL_STREAM), data_config["val_rows"] // batch_size, batch_size, local, shard_index,
                     documents)
    val_all = grain.MapDataset.source(val_rows)

    def val_batches(max_batches: int | None = None):
        """A fresh in-order pass over this shard's held-out batches (the first `max_batches`)."""
        dataset = val_all if max_batches is None else val_all[:max_batches]
        return iter(dataset.to_iter_dataset(_READ_OPTIONS))

    sample = task.generate(np.random.default_rng(0), 1, seq_len, vocab_size, task_config)
    stats = TaskStats(source=task.name, vocab_size=vocab_size, description=task.describe(task_config),
                      answers_per_row=int(sample["mask"].sum()), val_rows=len(val_rows) * batch_size,
                      chance_accuracy=task.chance_accuracy(task_config, vocab_size))
    return train_iter, val_batches, stats


__all__ = ["DEFAULT_VAL_ROWS", "TASKS", "Task", "TaskStats", "check_task", "default_task_configs", "task_datasets"]
