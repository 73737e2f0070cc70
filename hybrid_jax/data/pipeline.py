"""Language-modelling input pipeline: corpus -> token array -> packed, shuffled, sharded batches.

    tokens  = concat(encode(doc_0), [eos], encode(doc_1), [eos], ...)    eos only if the tokenizer
                                                                          has one; cached in memory
    train   = tokens[:n - v],  val = tokens[n - v:],  v = round(val_fraction * n)

`data.packing` chooses how rows are cut from a split. "documents" (the default) keeps documents
apart: each row holds whole documents (or pieces of long ones) with "segment_ids", "positions" and
"loss_mask" (`hybrid_jax.data.packing`). "stream" cuts windows across document boundaries:

    window i of a split = split[i*L : i*L + L + 1]                        (L = seq_len)
    batch   = {"inputs": windows[:, :-1], "targets": windows[:, 1:]}     int32 [b, L] each

Windows overlap by one token, so every token of a split except the first is a target exactly once
per epoch, and train and val windows never share a token. Train windows are shuffled over the
whole split with `seed`, reshuffled every epoch (grain folds the epoch into the seed), and dealt
round-robin to `shard_count` processes; the validation pass is in order and finite. Each shard gets
the same number of windows (the remainder is dropped) so that all processes step in lockstep.
`batch_size` is the global batch; each process yields `batch_size // shard_count` rows.

The training iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` save and restore
its position exactly (grain.checkpoint.CheckpointSave/Restore wrap it for orbax).

`data.source = "mqar"` or `"selective_copy"` builds a synthetic task instead (`hybrid_jax.data.tasks`):
same interface, no tokenizer (ids come from the model's vocabulary), batches with a "loss_mask".

Stats for reporting loss in bits per byte: bytes_per_token = UTF-8 bytes / tokens of a split's
targets (stream: every token of the split; documents: every token but each document's first, the
tokens the loss scores; padding is no token), and a unigram baseline, the cross-entropy of the
validation tokens under add-one-smoothed training-split token frequencies,
H = -1/|val| sum_t log2((c_train[x_t] + 1) / (|train| + V)), divided by the bytes per validation token.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import grain
import ml_collections
import numpy as np

from hybrid_jax.checks import check_choice, fail, require_int
from hybrid_jax.data import packing as packing_lib
from hybrid_jax.data.sources import Source, resolve_source
from hybrid_jax.data.tasks import DEFAULT_VAL_ROWS, TASKS, TaskStats, default_task_configs, task_datasets
from hybrid_jax.data.tokenizers import Tokenizer, get_tokenizer

Batch = dict[str, np.ndarray]

# Windows are slices of an in-memory array: reading them in threads costs more than it saves.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_MAX_SEED = 2**32 - 1


def default_data_config() -> ml_collections.ConfigDict:
    """The `data` section of a training config."""
    config = ml_collections.ConfigDict()
    config.source = "shakespeare"  # or a folder of .txt, a .txt, .npy or .array_record file
    config.tokenizer = "byte"  # "byte", "gpt2", or a SentencePiece ".model" path
    config.val_fraction = 0.05  # the last val_fraction of the tokens are held out
    config.packing = "documents"  # or "stream": windows across document boundaries
    # Synthetic sources (source = "mqar" / "selective_copy", hybrid_jax.data.tasks): their keys and
    # the size of their held-out set.
    for name, section in default_task_configs().items():
        config[name] = section
    config.val_rows = DEFAULT_VAL_ROWS
    return config


def _checked_config(data_config: Mapping | ml_collections.ConfigDict | None) -> dict:
    config = default_data_config().to_dict()
    given = {} if data_config is None else dict(data_config.items())
    unknown = sorted(set(given) - set(config))
    if unknown:
        raise ValueError(f"unknown data config key(s) {unknown}; valid keys: {sorted(config)}")
    for name in TASKS:  # a task section given in part keeps the defaults of its other keys
        section = dict(given.pop(name, None) or {})
        unknown = sorted(set(section) - set(config[name]))
        if unknown:
            raise ValueError(f"data.{name}: unknown key(s) {unknown}; valid keys: {sorted(config[name])}")
        config[name].update(section)
    config.update(given)
    fraction = config["val_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"data.val_fraction must be a number in (0, 1), got {fraction!r}")
    check_choice(config, "packing", packing_lib.PACKINGS, prefix="data")
    return config


# ---------------------------------------------------------------------------- tokenised corpus


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    tokens: np.ndarray  # int32 [n], read-only (shared by every pipeline built on it)
    num_documents: int | None  # None for pre-tokenised sources
    document_starts: np.ndarray  # int64 [num_documents]: first token of each; [0] if pre-tokenised


_CORPUS_CACHE: collections.OrderedDict[tuple, TokenizedCorpus] = collections.OrderedDict()
_CORPUS_CACHE_SIZE = 4


def tokenize_corpus(source: Source, tokenizer: Tokenizer) -> TokenizedCorpus:
    """All documents of `source` as one token array, memoised on the files and the tokenizer."""
    key = (source.fingerprint(), tokenizer.fingerprint())
    if key in _CORPUS_CACHE:
        _CORPUS_CACHE.move_to_end(key)
        return _CORPUS_CACHE[key]
    if source.is_pretokenized:
        tokens, num_documents = source.token_ids(tokenizer.vocab_size), None
        starts = np.zeros(1, np.int64)
    else:
        documents = source.documents()
        eos = [] if tokenizer.eos_id is None else [np.array([tokenizer.eos_id], np.int32)]
        encoded = [np.concatenate([tokenizer.encode_array(doc), *eos]) for doc in documents]
        tokens = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
        num_documents = len(documents)
        starts = np.cumsum([0] + [len(doc) for doc in encoded[:-1]], dtype=np.int64)
    tokens = tokens.astype(np.int32, copy=False)
    tokens.flags.writeable = False
    corpus = TokenizedCorpus(tokens, num_documents, starts)
    _CORPUS_CACHE[key] = corpus
    if len(_CORPUS_CACHE) > _CORPUS_CACHE_SIZE:
        _CORPUS_CACHE.popitem(last=False)
    return corpus


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): val is the last round(val_fraction * n) tokens."""
    num_val = round(val_fraction * len(tokens))
    return tokens[: len(tokens) - num_val], tokens[len(tokens) - num_val :]


# ---------------------------------------------------------------------------- packing + grain


class PackedSequences:
    """Random-access windows of `seq_len + 1` tokens with stride `seq_len` over a token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self._tokens = tokens
        self._seq_len = seq_len
        self._len = max(len(tokens) - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * self._seq_len
        return self._tokens[start : start + self._seq_len + 1]

    def __repr__(self) -> str:
        return f"PackedSequences(num_tokens={len(self._tokens)}, seq_len={self._seq_len})"


def windows_to_batch(windows: list[np.ndarray]) -> Batch:
    """Stacks `seq_len + 1` windows into next-token inputs and targets."""
    stacked = np.stack(windows).astype(np.int32, copy=False)
    return {
        "inputs": np.ascontiguousarray(stacked[:, :-1]),
        "targets": np.ascontiguousarray(stacked[:, 1:]),
    }


def train_dataset(tokens: np.ndarray, *, seq_len: int, local_batch_size: int, seed: int,
                  shard_index: int, shard_count: int) -> grain.IterDataset:
    """Endless shuffled batches of this shard's windows, reshuffled each epoch."""
    windows = grain.MapDataset.source(PackedSequences(tokens, seq_len)).shuffle(seed)
    windows = packing_lib.shard_dataset(windows, shard_index, shard_count).repeat(None)
    batches = windows.batch(local_batch_size, drop_remainder=True, batch_fn=windows_to_batch)
    return batches.to_iter_dataset(_READ_OPTIONS)


def eval_dataset(tokens: np.ndarray, *, seq_len: int, local_batch_size: int,
                 shard_index: int, shard_count: int) -> grain.MapDataset:
    """One in-order pass over this shard's windows in full batches."""
    windows = packing_lib.shard_dataset(grain.MapDataset.source(PackedSequences(tokens, seq_len)),
                     shard_index, shard_count)
    return windows.batch(local_batch_size, drop_remainder=True, batch_fn=windows_to_batch)


# ---------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class DataStats:
    source: str
    tokenizer: str
    vocab_size: int
    num_documents: int | None
    total_tokens: int
    train_tokens: int
    val_tokens: int
    # stream: windows of seq_len + 1 over all shards, before the per-shard remainder; documents:
    # training pieces (their rows vary by epoch) and packed validation rows
    train_sequences: int
    val_sequences: int
    train_bytes_per_token: float  # per target token (documents: padding and document starts excluded)
    bytes_per_token: float  # of the validation split, the one eval losses are measured on
    unigram_bits_per_byte: float  # baseline: a model that ignores context
    packing: str = "stream"
    # real tokens / row slots: validation exactly, training over its first rows (hybrid_jax.data.packing)
    train_packing_efficiency: float = 1.0
    val_packing_efficiency: float = 1.0

    def bits_per_byte(self, loss_nats_per_token: float, *, split: str = "val") -> float:
        """Converts a mean next-token loss in nats to bits per UTF-8 byte of `split`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        per_token = self.bytes_per_token if split == "val" else self.train_bytes_per_token
        return loss_nats_per_token / math.log(2) / per_token

    def eval_metrics(self, loss: float, accuracy: float) -> dict[str, float]:
        """The eval record's source-specific values: the validation loss in bits per byte."""
        return {"bits_per_byte": self.bits_per_byte(loss)}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line for logs."""
        return (
            f"data {self.source} ({self.tokenizer}, vocab {self.vocab_size}): "
            f"{self.train_tokens:,} train / {self.val_tokens:,} val tokens, "
            f"{self.bytes_per_token:.3f} bytes/token, "
            f"unigram baseline {self.unigram_bits_per_byte:.3f} bits/byte"
            + (f", packed documents: {self.train_packing_efficiency:.2%} train / "
               f"{self.val_packing_efficiency:.2%} val of row tokens are real" if self.packing == "documents" else "")
        )


def unigram_bits_per_token(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (bits) of `val` under add-one-smoothed unigram counts of `train`."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log2_probs = np.log2((counts + 1.0) / (len(train) + vocab_size))
    return float(-(np.bincount(val, minlength=vocab_size) @ log2_probs) / len(val))


def _bytes_per_token(tokens: np.ndarray, byte_lengths: np.ndarray) -> float:
    num_bytes = np.bincount(tokens, minlength=len(byte_lengths)) @ byte_lengths
    return float(num_bytes / len(tokens)) if num_bytes else float("nan")


def _target_bytes_per_token(tokens: np.ndarray, starts: np.ndarray, byte_lengths: np.ndarray) -> float:
    """Bytes per token over the targets of document packing: every token but each document's first."""
    return _bytes_per_token(tokens[packing_lib.target_mask(len(tokens), starts)], byte_lengths)


def compute_stats(source: Source, tokenizer: Tokenizer, corpus: TokenizedCorpus,
                  train: np.ndarray, val: np.ndarray, seq_len: int) -> DataStats:
    byte_lengths = tokenizer.token_byte_lengths()
    val_bytes_per_token = _bytes_per_token(val, byte_lengths)
    return DataStats(
        source=source.name,
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        num_documents=corpus.num_documents,
        total_tokens=len(corpus.tokens),
        train_tokens=len(train),
        val_tokens=len(val),
        train_sequences=len(PackedSequences(train, seq_len)),
        val_sequences=len(PackedSequences(val, seq_len)),
        train_bytes_per_token=_bytes_per_token(train, byte_lengths),
        bytes_per_token=val_bytes_per_token,
        unigram_bits_per_byte=unigram_bits_per_token(train, val, tokenizer.vocab_size)
        / val_bytes_per_token,
    )


# ---------------------------------------------------------------------------- entry point


class Datasets(NamedTuple):
    train_iter: grain.DatasetIterator  # endless; get_state()/set_state() for exact resume
    val_batches: Callable[..., Iterator[Batch]]  # val_batches(max_batches=None): a fresh pass
    tokenizer: Tokenizer | None  # None for the synthetic tasks
    stats: DataStats | TaskStats


def _resolve_shards(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None and shard_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if shard_index is None or shard_count is None:
        raise ValueError("give both shard_index and shard_count, or neither (then jax decides)")
    shard_count = require_int(shard_count, "shard_count")
    return require_int(shard_index, "shard_index", minimum=0, below=shard_count), shard_count


def make_datasets(data_config: Mapping | ml_collections.ConfigDict | None = None, *,
                  seq_len: int, batch_size: int, seed: int,
                  shard_index: int | None = None, shard_count: int | None = None,
                  vocab_size: int | None = None) -> Datasets:
    """Builds the training iterator, the validation pass, the tokenizer and corpus stats.

    Args:
      data_config: keys of `default_data_config()` (missing keys take the defaults).
      seq_len: tokens per row of `inputs` / `targets`.
      batch_size: global batch; every process yields `batch_size // shard_count` rows.
      seed: shuffle seed in [0, 2**32).
      shard_index, shard_count: this process's data shard; default jax.process_index() / count().
      vocab_size: the model's vocabulary; required by (and only read for) the synthetic tasks.

    Returns:
      `Datasets(train_iter, val_batches, tokenizer, stats)`, unpackable as a 4-tuple. Batches are
      `{"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len]}`, plus "loss_mask" float32
      [b, seq_len] for the synthetic tasks (their tokenizer is None and their stats a `TaskStats`) and,
      with `packing = "documents"`, "segment_ids" and "positions" int32 [b, seq_len] and "loss_mask"
      (`hybrid_jax.data.packing`).
    """
    config = _checked_config(data_config)
    seq_len = require_int(seq_len, "seq_len")
    batch_size = require_int(batch_size, "batch_size")
    seed = require_int(seed, "seed", minimum=0, below=_MAX_SEED + 1)
    shard_index, shard_count = _resolve_shards(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(
            f"batch_size {batch_size} must be divisible by shard_count {shard_count} "
            "(batch_size is the global batch)"
        )
    local_batch_size = batch_size // shard_count
    if config["source"] in TASKS:
        if vocab_size is None:
            fail("vocab_size", f"the synthetic source {config['source']!r} draws its ids from the model's "
                 "vocabulary: pass the model's vocab_size")
        vocab_size = require_int(vocab_size, "vocab_size")
        train_iter, val_batches, stats = task_datasets(
            config, seq_len=seq_len, vocab_size=vocab_size, batch_size=batch_size, seed=seed,
            shard_index=shard_index, shard_count=shard_count)
        return Datasets(train_iter, val_batches, None, stats)
    source = resolve_source(config["source"])
    tokenizer = get_tokenizer(config["tokenizer"])
    corpus = tokenize_corpus(source, tokenizer)
    train, val = split_tokens(corpus.tokens, config["val_fraction"])

    def require_batch(split: str, tokens: np.ndarray, count: int, unit: str) -> None:
        if count // shard_count < local_batch_size:
            raise ValueError(
                f"the {split} split of {source.name!r} ({len(tokens)} tokens) gives {count // shard_count} "
                f"{unit} per shard, fewer than one batch of {local_batch_size}; use more data, a smaller "
                f"seq_len or batch_size, or change data.val_fraction ({config['val_fraction']})"
            )

    shard = dict(shard_index=shard_index, shard_count=shard_count, local_batch_size=local_batch_size)
    if config["packing"] == "stream":
        for split, tokens in (("training", train), ("validation", val)):
            windows = len(PackedSequences(tokens, seq_len))
            require_batch(split, tokens, windows, f"windows of seq_len + 1 = {seq_len + 1}")
        stats = compute_stats(source, tokenizer, corpus, train, val, seq_len)
        train_data = train_dataset(train, seq_len=seq_len, seed=seed, **shard)
        val_batches_all = eval_dataset(val, seq_len=seq_len, **shard)
    else:
        train_data, val_batches_all, stats = _document_datasets(
            source, tokenizer, corpus, train, val, require_batch, seq_len=seq_len, seed=seed, **shard)
    train_iter = iter(train_data)

    def val_batches(max_batches: int | None = None) -> Iterator[Batch]:
        """A fresh in-order pass over this shard's validation batches (the first `max_batches`)."""
        dataset = val_batches_all
        if max_batches is not None:
            dataset = dataset[: require_int(max_batches, "max_batches")]
        return iter(dataset.to_iter_dataset(_READ_OPTIONS))

    return Datasets(train_iter, val_batches, tokenizer, stats)


def _document_datasets(source: Source, tokenizer: Tokenizer, corpus: TokenizedCorpus, train: np.ndarray,
                       val: np.ndarray, require_batch: Callable, *, seq_len: int, seed: int, local_batch_size: int,
                       shard_index: int, shard_count: int) -> tuple[grain.IterDataset, grain.MapDataset, DataStats]:
    """(training batches, validation batches, stats) of `data.packing = "documents"`."""
    train_starts, val_starts = packing_lib.split_document_starts(corpus.document_starts, len(train))
    train_pieces = packing_lib.DocumentPieces(train, train_starts, seq_len)
    require_batch("training", train, len(train_pieces), f"document pieces of <= seq_len = {seq_len} tokens")
    val_rows = packing_lib.PackedRows(packing_lib.DocumentPieces(val, val_starts, seq_len), seq_len)
    require_batch("validation", val, len(val_rows), f"packed rows of seq_len = {seq_len}")
    byte_lengths = tokenizer.token_byte_lengths()
    stats = dataclasses.replace(
        compute_stats(source, tokenizer, corpus, train, val, seq_len), packing="documents",
        train_sequences=len(train_pieces), val_sequences=len(val_rows),
        train_bytes_per_token=_target_bytes_per_token(train, train_starts, byte_lengths),
        bytes_per_token=_target_bytes_per_token(val, val_starts, byte_lengths),
        train_packing_efficiency=packing_lib.train_packing_efficiency(train_pieces, seq_len=seq_len, seed=seed),
        val_packing_efficiency=val_rows.efficiency)
    shard = dict(shard_index=shard_index, shard_count=shard_count, local_batch_size=local_batch_size)
    train_data = packing_lib.document_train_dataset(train_pieces, seq_len=seq_len, seed=seed, **shard)
    return train_data, packing_lib.document_eval_dataset(val_rows, **shard), stats


__all__ = [
    "Batch", "DataStats", "Datasets", "PackedSequences", "TokenizedCorpus", "compute_stats",
    "default_data_config", "eval_dataset", "make_datasets", "split_tokens",
    "tokenize_corpus", "train_dataset", "unigram_bits_per_token", "windows_to_batch",
]
