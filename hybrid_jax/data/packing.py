r"""Packed documents (`data.packing = "documents"`): rows of whole documents kept apart by segment ids.

A split is a list of documents, spans of its token array (the cut between the training and the
validation split leaves the document it falls in as two, one on each side). A document d of n
tokens has n - 1 next-token pairs (d_j, d_{j+1}); they are cut into pieces of at most T = seq_len:

    piece p of d:  inputs d[pT : pT + L],  targets d[pT + 1 : pT + L + 1],   L = min(T, n - 1 - pT)

so, as with the windows of the stream pipeline, neighbouring pieces overlap by one token, every token
of a document but its first is a target exactly once per epoch, and the last token of a document is
never an input (it has no target). Documents of fewer than two tokens give no piece. The pieces are
packed into rows of T by grain's first-fit packer (`grain.experimental.FirstFitPackIterDataset`);
each row carries

    inputs, targets   int32 [T]     the pieces side by side, 0 on padding
    segment_ids       int32 [T]     1, 2, ... per piece within the row, 0 on padding
    positions         int32 [T]     position within the piece, 0 .. L - 1 (0 on padding)
    loss_mask         float32 [T]   1 on every real token (each has a target), 0 on padding

What a document is, per source (`hybrid_jax.data.sources`): a play for "shakespeare", a file for a
folder of .txt, a record for .array_record, the whole array for a pre-tokenised .npy (no boundaries
are known), each followed by the tokenizer's eos if it has one; a synthetic task row is one instance
(`hybrid_jax.data.tasks`). The plays stay the documents although they are long (85-171 KB, so at
make train's 128 bytes a row nearly every row is one piece of one play): their scenes (median 3.4 KB)
would still be split ~27 times each, and a scene continues its play's characters and plot, which a
model should be allowed to read on; packing is exercised by corpora of short documents instead.

A piece of a long document restarts at position 0. It is a segment of its own, and only a
document's last (short) piece ever shares a row, so the model never sees two pieces of one document
together and nothing ties their positions; RoPE scores depend only on relative positions within a
segment anyway, and counting from 0 agrees with the state reset every mixer makes at a segment start
and with decoding after a packed prompt (the last segment's cache counts positions from 0).
flash-linear-attention (`cu_seqlens`) and MaxText's packing restart positions the same way.

Training: this process's pieces are shuffled (reshuffled every epoch, grain folds the epoch into the
seed), repeated without end and streamed through the packer, which keeps `PACKING_BINS` rows open and,
when a piece fits none, emits them in a seeded random order. A piece of T pairs fills a row alone, so
padding comes only from the short last pieces that find no partner among the open rows. The
iterator's state is grain's (the packer's position and its parent's), restored exactly.
Validation: the pieces of the whole split, in order, are packed once without shuffling and the rows
dealt to the shards like stream windows, so every process runs the same number of eval batches.

Packing efficiency, real tokens / (rows * T): exact for validation; for training measured on the
first `EFFICIENCY_SAMPLE_ROWS` rows of a fresh copy of the training stream (the run's own iterator
is not touched).
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

Batch = dict[str, np.ndarray]

PACKINGS = ("documents", "stream")
PACKING_BINS = 64  # rows the packer keeps open: more bins, less padding from short pieces
EFFICIENCY_SAMPLE_ROWS = 1024
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def split_document_starts(starts: np.ndarray, boundary: int) -> tuple[np.ndarray, np.ndarray]:
    """The document starts of `tokens[:boundary]` and of `tokens[boundary:]` (offsets in each split),
    given the corpus's sorted starts (the first 0): the document the boundary falls in becomes two."""
    starts = np.asarray(starts, np.int64)
    train = starts[starts < boundary]
    val = np.concatenate([[0], starts[starts > boundary] - boundary]).astype(np.int64)
    return train, val


class DocumentPieces:
    """Random-access pieces (module docstring) of the documents starting at `starts` in `tokens`."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int):
        starts = np.asarray(starts, np.int64)
        pairs = np.append(starts[1:], len(tokens)) - starts - 1  # next-token pairs per document
        counts = np.maximum(-(-pairs // seq_len), 0)
        document = np.repeat(np.arange(len(starts)), counts)
        index = np.arange(len(document)) - np.repeat(np.cumsum(counts) - counts, counts)
        self._tokens = tokens
        self.starts = starts[document] + index * seq_len
        self.lengths = np.minimum(seq_len, pairs[document] - index * seq_len)
        self.num_documents = int(np.count_nonzero(counts))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Batch:
        start, length = int(self.starts[index]), int(self.lengths[index])
        return {"inputs": self._tokens[start : start + length],
                "targets": self._tokens[start + 1 : start + length + 1]}

    @property
    def num_pairs(self) -> int:
        """Real tokens (input-target pairs) over all pieces."""
        return int(self.lengths.sum())

    def __repr__(self) -> str:
        return f"DocumentPieces(documents={self.num_documents}, pieces={len(self)}, pairs={self.num_pairs})"


def _packed_row(row: Batch) -> Batch:
    """grain's packed features -> the row layout of the module docstring."""
    segment_ids = row["inputs_segment_ids"]
    return {"inputs": row["inputs"], "targets": row["targets"], "segment_ids": segment_ids,
            "positions": np.where(segment_ids > 0, row["inputs_positions"], 0).astype(np.int32),
            "loss_mask": (segment_ids > 0).astype(np.float32)}


def pack(pieces: grain.IterDataset, seq_len: int, *, seed: int, shuffle: bool) -> grain.IterDataset:
    """Rows of `seq_len` packed first-fit from a stream of pieces (module docstring)."""
    packed = FirstFitPackIterDataset(pieces, length_struct={"inputs": seq_len, "targets": seq_len},
                                     num_packing_bins=PACKING_BINS, seed=seed, shuffle_bins=shuffle)
    return packed.map(_packed_row)


def shard_dataset(dataset: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """Every shard_count-th element from shard_index, after dropping the remainder so all shards are alike."""
    usable = len(dataset) - len(dataset) % shard_count
    return dataset[:usable][shard_index::shard_count]


def document_train_dataset(pieces: DocumentPieces, *, seq_len: int, local_batch_size: int, seed: int,
                           shard_index: int, shard_count: int, num_epochs: int | None = None) -> grain.IterDataset:
    """Batches of rows packed from this shard's shuffled pieces; endless unless `num_epochs` is given."""
    shuffled = shard_dataset(grain.MapDataset.source(pieces).shuffle(seed), shard_index, shard_count)
    stream = shuffled.repeat(num_epochs).to_iter_dataset(_READ_OPTIONS)
    return pack(stream, seq_len, seed=seed, shuffle=True).batch(local_batch_size, drop_remainder=True)


class PackedRows:
    """Rows packed once from in-order pieces, held as arrays `[rows, T]` per key."""

    def __init__(self, pieces: DocumentPieces, seq_len: int):
        stream = grain.MapDataset.source(pieces).to_iter_dataset(_READ_OPTIONS)
        rows = list(pack(stream, seq_len, seed=0, shuffle=False))
        keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
        self.arrays = {key: np.stack([row[key] for row in rows]) if rows else np.zeros((0, seq_len))
                       for key in keys}

    def __len__(self) -> int:
        return len(self.arrays["inputs"])

    def __getitem__(self, index: int) -> Batch:
        return {key: value[index] for key, value in self.arrays.items()}

    @property
    def efficiency(self) -> float:
        mask = self.arrays["loss_mask"]
        return float(mask.mean()) if mask.size else float("nan")


def document_eval_dataset(rows: PackedRows, *, local_batch_size: int, shard_index: int,
                          shard_count: int) -> grain.MapDataset:
    """One in-order pass over this shard's packed rows in full batches."""
    return shard_dataset(grain.MapDataset.source(rows), shard_index, shard_count).batch(local_batch_size,
                                                                                 drop_remainder=True)


def train_packing_efficiency(pieces: DocumentPieces, *, seq_len: int, seed: int) -> float:
    """Real-token fraction of the first `EFFICIENCY_SAMPLE_ROWS` training rows (a fresh stream)."""
    rows = document_train_dataset(pieces, seq_len=seq_len, local_batch_size=1, seed=seed, shard_index=0,
                                  shard_count=1, num_epochs=1)
    real = total = 0
    for count, batch in enumerate(rows):
        if count == EFFICIENCY_SAMPLE_ROWS:
            break
        real, total = real + batch["loss_mask"].sum(), total + batch["loss_mask"].size
    return float(real / total) if total else float("nan")


def target_mask(num_tokens: int, starts: np.ndarray) -> np.ndarray:
    """bool [n]: the tokens that are targets under document packing (all but each document's first)."""
    mask = np.ones(num_tokens, bool)
    mask[np.asarray(starts, np.int64)[np.asarray(starts) < num_tokens]] = False
    return mask


__all__ = ["DocumentPieces", "EFFICIENCY_SAMPLE_ROWS", "PACKINGS", "PACKING_BINS", "PackedRows",
           "document_eval_dataset", "document_train_dataset", "pack", "shard_dataset", "split_document_starts",
           "target_mask", "train_packing_efficiency"]
