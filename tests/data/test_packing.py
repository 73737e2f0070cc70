"""data.packing = "documents": the row layout, every document pair once, exact resume, efficiency and
bytes per token over real tokens only.

The layout tests pack a token array of ids 0, 1, ..., N-1 cut into documents of chosen lengths, so
every token names its place and every (input, target) pair can be traced back to its document.
"""
import numpy as np
import pytest

from hybrid_jax import data
from hybrid_jax.config import load_config, validate
from hybrid_jax.data import packing
from tests.train.helpers import TINY

SEQ_LEN = 8
# Lengths 1 and 2 (no pair / one pair), exactly T + 1 (one full piece), long ones split in several.
DOC_LENGTHS = [5, 1, 2, 9, 23, 3, 17, 4, 8, 2, 30, 6]


def document_starts(lengths):
    return np.cumsum([0] + lengths[:-1]).astype(np.int64)


def check_rows(rows, tokens, starts):
    """Each row: segments 1..k then padding; per segment a contiguous pair run of one document,
    positions from 0, mask on real tokens only. Returns the (input, target) pairs seen."""
    ends = np.append(starts[1:], len(tokens))
    doc_of = np.repeat(np.arange(len(starts)), ends - starts)
    pairs = []
    for row in rows:
        seg, pos = row["segment_ids"], row["positions"]
        real = seg > 0
        np.testing.assert_array_equal(row["loss_mask"], real.astype(np.float32))
        assert not np.any(real[np.argmin(real):]) or real.all()  # padding only at the end
        np.testing.assert_array_equal(row["inputs"][~real], 0)
        ids = seg[real]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
        for segment in np.unique(ids):
            where = np.flatnonzero(seg == segment)
            assert np.all(np.diff(where) == 1)
            np.testing.assert_array_equal(pos[where], np.arange(len(where)))
            inputs, targets = row["inputs"][where], row["targets"][where]
            np.testing.assert_array_equal(targets, inputs + 1)  # ids are positions: the next token
            np.testing.assert_array_equal(np.diff(inputs), 1)
            assert len(set(doc_of[np.append(inputs, targets)])) == 1  # one document, never crossed
            pairs += list(inputs)
    return pairs


def expected_pairs(tokens, starts):
    ends = np.append(starts[1:], len(tokens))
    return sorted(t for s, e in zip(starts, ends) for t in range(s, e - 1))  # every token but the last


def test_rows_hold_every_document_pair_once_train_and_val():
    tokens = np.arange(sum(DOC_LENGTHS), dtype=np.int32)
    starts = document_starts(DOC_LENGTHS)
    pieces = packing.DocumentPieces(tokens, starts, SEQ_LEN)
    assert pieces.num_documents == sum(length >= 2 for length in DOC_LENGTHS)
    assert pieces.num_pairs == sum(max(length - 1, 0) for length in DOC_LENGTHS)
    epoch = packing.document_train_dataset(pieces, seq_len=SEQ_LEN, local_batch_size=1, seed=3, shard_index=0,
                                           shard_count=1, num_epochs=1)
    train_rows = [{key: value[0] for key, value in batch.items()} for batch in epoch]
    val_rows = packing.PackedRows(pieces, SEQ_LEN)
    for rows in (train_rows, [val_rows[i] for i in range(len(val_rows))]):
        assert sorted(check_rows(rows, tokens, starts)) == expected_pairs(tokens, starts)
    real = pieces.num_pairs
    assert val_rows.efficiency == pytest.approx(real / (len(val_rows) * SEQ_LEN))
    assert len(val_rows) < len(pieces)  # short pieces share rows
    assert packing.train_packing_efficiency(pieces, seq_len=SEQ_LEN, seed=3) == pytest.approx(
        real / (len(train_rows) * SEQ_LEN))


def test_split_cuts_the_boundary_document_in_two():
    train, val = packing.split_document_starts(np.array([0, 10, 20]), 15)
    np.testing.assert_array_equal(train, [0, 10])
    np.testing.assert_array_equal(val, [0, 5])
    train, val = packing.split_document_starts(np.array([0, 10, 20]), 20)
    np.testing.assert_array_equal(val, [0])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Documents of very different lengths: short ones pack, long ones split."""
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "é"]  # é: two bytes in UTF-8
    for i, count in enumerate([3, 40, 7, 200, 12, 90, 5, 60, 25, 150, 9, 30] * 3):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, count)) + "\n")
    return {"source": str(root), "tokenizer": "gpt2", "val_fraction": 0.2}


def build(config, *, seed=0, batch_size=4, seq_len=16, **shard):
    shard = shard or dict(shard_index=0, shard_count=1)
    return data.make_datasets(config, seq_len=seq_len, batch_size=batch_size, seed=seed, **shard)


def test_documents_resume_exactly_across_epochs(folder):
    train_iter = build(folder, seed=5).train_iter
    epoch_rows = len(list(packing.document_train_dataset(
        packing.DocumentPieces(*_train_split(folder), 16), seq_len=16, local_batch_size=1, seed=5,
        shard_index=0, shard_count=1, num_epochs=1)))
    for _ in range(epoch_rows // 4 - 2):  # the batches read next cross into epoch 2
        next(train_iter)
    state = train_iter.get_state()
    expected = [next(train_iter) for _ in range(5)]
    resumed = build(folder, seed=5).train_iter
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert set(got) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def _train_split(config):
    source, tokenizer = data.resolve_source(config["source"]), data.get_tokenizer(config["tokenizer"])
    corpus = data.tokenize_corpus(source, tokenizer)
    train, _ = data.split_tokens(corpus.tokens, config["val_fraction"])
    return train, packing.split_document_starts(corpus.document_starts, len(train))[0]


def test_stats_count_real_tokens_only(folder):
    datasets = build(folder, batch_size=1)
    stats, tokenizer = datasets.stats, datasets.tokenizer
    rows = [batch for batch in datasets.val_batches()]  # batch 1: nothing dropped
    mask = np.concatenate([b["loss_mask"].ravel() for b in rows]) > 0
    targets = np.concatenate([b["targets"].ravel() for b in rows])[mask]
    # bits per byte divide by the bytes of exactly the scored targets: no padding, no document start
    assert stats.bytes_per_token == pytest.approx(tokenizer.token_byte_lengths()[targets].mean(), rel=1e-12)
    assert stats.val_packing_efficiency == pytest.approx(mask.mean())
    assert stats.val_sequences == len(rows) and stats.packing == "documents"
    assert 0 < stats.train_packing_efficiency < 1 and "packed documents" in stats.summary()


def test_stream_packing_keeps_the_unpacked_batches(folder):
    stream = build({**folder, "packing": "stream"}, batch_size=1)
    assert set(next(stream.train_iter)) == {"inputs", "targets"}
    assert stream.stats.packing == "stream" and "packed" not in stream.stats.summary()


def test_packing_choice_is_checked():
    config = load_config(TINY)
    config.data.packing = "rows"
    with pytest.raises(ValueError, match=r"data.packing: 'rows' is not valid; valid values are \['documents', "
                                         r"'stream'\]"):
        validate(config)
    with pytest.raises(ValueError, match="data.packing"):
        data.make_datasets({"packing": "rows"}, seq_len=8, batch_size=1, seed=0, shard_index=0, shard_count=1)
