"""The grain pipeline: packing, splits, shuffling, resume, sharding, and the bits-per-byte stats.

Most tests read a .npy corpus of ids 0, 1, ..., N-1 (GPT-2 vocabulary), so every token names its
own position and every window is identified by its first id. They test `data.packing = "stream"`;
tests/data/test_packing.py tests the default, "documents".
"""
import math

import numpy as np
import pytest

from hybrid_jax import data

NUM_TOKENS = 2001
SEQ_LEN = 10
VAL_FRACTION = 0.1


@pytest.fixture(scope="module")
def arange_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("npy") / "arange.npy"
    np.save(path, np.arange(NUM_TOKENS, dtype=np.int32))
    return {"source": str(path), "tokenizer": "gpt2", "val_fraction": VAL_FRACTION, "packing": "stream"}


def build(config, *, batch_size=4, seed=0, shard_index=0, shard_count=1, seq_len=SEQ_LEN):
    return data.make_datasets(config, seq_len=seq_len, batch_size=batch_size, seed=seed,
                              shard_index=shard_index, shard_count=shard_count)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def window_starts(batches):
    return [int(row[0]) for batch in batches for row in batch["inputs"]]


NUM_VAL = round(VAL_FRACTION * NUM_TOKENS)  # 200
NUM_TRAIN = NUM_TOKENS - NUM_VAL  # 1801 tokens -> 180 windows of 11
TRAIN_WINDOWS = (NUM_TRAIN - 1) // SEQ_LEN


def test_batches_are_shifted_windows(arange_source):
    batch = next(build(arange_source).train_iter)
    assert set(batch) == {"inputs", "targets"}
    for key in batch:
        assert batch[key].shape == (4, SEQ_LEN) and batch[key].dtype == np.int32
    starts = batch["inputs"][:, :1]
    np.testing.assert_array_equal(batch["inputs"], starts + np.arange(SEQ_LEN))
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    assert np.all(starts % SEQ_LEN == 0)


def test_one_epoch_covers_every_window_once_and_next_epoch_reshuffles(arange_source):
    train_iter = build(arange_source).train_iter
    epoch_batches = TRAIN_WINDOWS // 4
    first, second = (window_starts(take(train_iter, epoch_batches)) for _ in range(2))
    assert sorted(first) == sorted(second) == list(range(0, TRAIN_WINDOWS * SEQ_LEN, SEQ_LEN))
    assert first != second


def test_train_and_val_are_disjoint(arange_source):
    datasets = build(arange_source)
    train_ids = {int(t) for b in take(datasets.train_iter, 50) for k in b for t in b[k].ravel()}
    val = list(datasets.val_batches())
    val_ids = {int(t) for b in val for k in b for t in b[k].ravel()}
    assert max(train_ids) < NUM_TRAIN <= min(val_ids)
    val_windows = range(NUM_TRAIN, NUM_TOKENS - SEQ_LEN, SEQ_LEN)
    assert window_starts(val) == list(val_windows)[: len(val) * 4]
    assert datasets.stats.val_sequences == (NUM_VAL - 1) // SEQ_LEN == 19
    assert len(val) == 19 // 4  # full batches only
    assert len(list(datasets.val_batches(max_batches=2))) == 2
    assert window_starts(datasets.val_batches()) == window_starts(val)  # a fresh pass each call


def test_seeds(arange_source):
    def first(seed):
        return window_starts(take(build(arange_source, seed=seed).train_iter, 3))

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_state_restore_resumes_exactly(arange_source):
    train_iter = build(arange_source, seed=5).train_iter
    take(train_iter, 40)  # the 10 batches read next cross into epoch 2 (45 batches/epoch)
    state = train_iter.get_state()
    expected = take(train_iter, 10)
    resumed = build(arange_source, seed=5).train_iter
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 10)):
        np.testing.assert_array_equal(want["inputs"], got["inputs"])
        np.testing.assert_array_equal(want["targets"], got["targets"])


def test_two_shards_split_each_epoch(arange_source):
    shards = [build(arange_source, batch_size=4, shard_index=i, shard_count=2) for i in range(2)]
    per_shard_batches = TRAIN_WINDOWS // 2 // 2
    starts = []
    for shard in shards:
        batches = take(shard.train_iter, per_shard_batches)
        assert batches[0]["inputs"].shape == (2, SEQ_LEN)  # batch_size is global
        starts.append(window_starts(batches))
    assert not set(starts[0]) & set(starts[1])
    assert sorted(starts[0] + starts[1]) == list(range(0, TRAIN_WINDOWS * SEQ_LEN, SEQ_LEN))
    # 19 validation windows: 9 per shard (one dropped so both shards step alike), 4 batches of 2.
    val_starts = [set(window_starts(s.val_batches())) for s in shards]
    assert len(val_starts[0]) == len(val_starts[1]) == 8
    assert not val_starts[0] & val_starts[1]


def test_batch_and_split_size_errors(arange_source):
    with pytest.raises(ValueError, match="divisible by shard_count 3"):
        build(arange_source, batch_size=4, shard_count=3)
    with pytest.raises(ValueError, match="validation split.*fewer than one batch of 32"):
        build(arange_source, batch_size=32)
    with pytest.raises(ValueError, match="seq_len: must be an int >= 1"):
        build(arange_source, seq_len=0)


def test_unigram_baseline_and_bits_per_byte(tmp_path):
    text = "abcabcaab\n" * 30  # 300 bytes: the last round(0.05 * 300) = 15 are validation
    (tmp_path / "t.txt").write_text(text)
    datasets = build({"source": str(tmp_path / "t.txt")}, batch_size=1)
    stats = datasets.stats
    assert (stats.train_tokens, stats.val_tokens, stats.bytes_per_token) == (285, 15, 1.0)
    train, val = text[:285].encode(), text[285:].encode()
    expected = -np.mean([math.log2((train.count(b) + 1) / (len(train) + 256)) for b in val])
    assert stats.unigram_bits_per_byte == pytest.approx(expected, rel=1e-12)
    assert stats.bits_per_byte(math.log(2)) == pytest.approx(1.0)


def test_gpt2_shakespeare_bits_per_byte_is_per_byte():
    datasets = build({"tokenizer": "gpt2"}, batch_size=8, seq_len=64)
    stats, tok = datasets.stats, datasets.tokenizer
    batch = next(datasets.val_batches())
    assert 3.0 < stats.bytes_per_token < 3.5  # English GPT-2 BPE: ~3.2 bytes per token
    text = "".join(tok.decode(row) for row in batch["inputs"])
    assert tok.token_byte_lengths()[batch["inputs"]].sum() == len(text.encode("utf-8"))
    assert stats.bits_per_byte(1.0) == pytest.approx(1 / math.log(2) / stats.bytes_per_token)


def test_default_config_is_byte_shakespeare_and_jax_picks_the_shard():
    config = data.default_data_config()
    assert {key: config[key] for key in ("source", "tokenizer", "val_fraction", "packing")} == {
        "source": "shakespeare", "tokenizer": "byte", "val_fraction": 0.05, "packing": "documents"}
    assert set(config) == {"source", "tokenizer", "val_fraction", "packing", "val_rows", *data.TASKS}  # + tasks
    datasets = data.make_datasets(config, seq_len=32, batch_size=4, seed=0)
    text = datasets.tokenizer.decode(next(datasets.train_iter)["inputs"][0])
    assert len(text) == 32 and "#" not in text
    stats = datasets.stats
    assert stats.num_documents == 38 and stats.total_tokens > 4_000_000
    assert stats.val_tokens == round(0.05 * stats.total_tokens)
    assert 4.0 < stats.unigram_bits_per_byte < 5.0  # character unigram entropy of English
