"""data.source = "mqar" / "selective_copy": rows on the fly, deterministic per row, exact resume,
a fixed held-out set from another seed stream, the same global batch for any process count."""
import numpy as np
import pytest

from hybrid_jax import data
from hybrid_jax.config import load_config, validate
from hybrid_jax.data.synthetic import mqar_batch
from tests.train.helpers import TINY

SEQ_LEN, VOCAB, BATCH = 32, 64, 8


def build(source="mqar", *, seed=0, shard_index=0, shard_count=1, **task):
    config = data.default_data_config()
    config.source, config.val_rows = source, 32
    config[source].update(task)
    return data.make_datasets(config, seq_len=SEQ_LEN, batch_size=BATCH, seed=seed, vocab_size=VOCAB,
                              shard_index=shard_index, shard_count=shard_count)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_rows_are_mqar_rows_of_their_own_seed():
    datasets = build(num_kv_pairs=4)
    assert datasets.tokenizer is None and datasets.stats.chance_accuracy == 1 / 32
    first, second = take(datasets.train_iter, 2)
    assert set(first) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    assert first["loss_mask"].dtype == np.float32
    # packing = "documents" (the default): one instance per row, a single segment
    np.testing.assert_array_equal(first["segment_ids"], 1)
    np.testing.assert_array_equal(first["positions"], np.broadcast_to(np.arange(SEQ_LEN), (BATCH, SEQ_LEN)))
    np.testing.assert_array_equal(first["loss_mask"].sum(axis=1), 4)
    # Global row r of the training stream is the MQAR row of rng([seed, 0, r]); batch 1 holds rows 8..15.
    row_9 = mqar_batch(np.random.default_rng([0, 0, 9]), 1, SEQ_LEN, VOCAB, 4)
    np.testing.assert_array_equal(second["inputs"][1], row_9["inputs"][0])
    np.testing.assert_array_equal(second["loss_mask"][1], row_9["mask"][0])
    assert not np.array_equal(build(num_kv_pairs=4, seed=1).train_iter.__next__()["inputs"], first["inputs"])


def test_resume_from_the_iterator_state_is_exact():
    train_iter = build().train_iter
    take(train_iter, 3)
    state = train_iter.get_state()
    expected = take(train_iter, 2)
    fresh = build().train_iter
    fresh.set_state(state)
    for got, want in zip(take(fresh, 2), expected):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_validation_is_fixed_and_held_out_and_shards_split_the_global_batch():
    datasets = build()
    val = list(datasets.val_batches())
    assert len(val) == 32 // BATCH and len(list(datasets.val_batches(max_batches=1))) == 1
    np.testing.assert_array_equal(next(datasets.val_batches())["inputs"], val[0]["inputs"])
    train_rows = {row.tobytes() for batch in take(datasets.train_iter, 4) for row in batch["inputs"]}
    assert not train_rows & {row.tobytes() for batch in val for row in batch["inputs"]}
    whole = next(build().train_iter)["inputs"]
    halves = [next(build(shard_index=i, shard_count=2).train_iter)["inputs"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), whole)


def test_selective_copy_source():
    batch = next(build("selective_copy", num_tokens=4).train_iter)
    np.testing.assert_array_equal(batch["loss_mask"][:, -4:], 1)
    assert batch["loss_mask"].sum() == 4 * BATCH


@pytest.mark.parametrize("key, value, message", [
    ("data.mqar.num_kv_pairs", 20, r"data.mqar.num_kv_pairs: 20 pairs need train.seq_len >= 60"),
    ("data.mqar.power_a", 0.0, r"data.mqar.power_a: must be a number > 0"),
    ("model.vocab_size", 16, r"data.mqar.num_kv_pairs: 8 distinct keys need model.vocab_size >= 18"),
    ("data.val_rows", 4, r"data.val_rows: 4 held-out rows make no batch of train.batch_size 8"),
    ("data.selective_copy.num_tokens", 100, r"data.selective_copy.num_tokens: 100 tokens need train.seq_len"),
])
def test_config_errors_name_the_key(key, value, message):
    config = load_config(TINY)
    config.data.source = "selective_copy" if "selective_copy" in key else "mqar"
    config.train.seq_len, config.train.batch_size = SEQ_LEN, BATCH
    section, leaf = key.rsplit(".", 1)
    target = config
    for part in section.split("."):
        target = target[part]
    target[leaf] = value
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_missing_vocab_size_and_unknown_task_key():
    config = data.default_data_config()
    config.source = "mqar"
    with pytest.raises(ValueError, match="vocab_size: the synthetic source 'mqar'"):
        data.make_datasets(config, seq_len=SEQ_LEN, batch_size=BATCH, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"data.mqar: unknown key\(s\) \['pairs'\]"):
        data.make_datasets({"source": "mqar", "mqar": {"pairs": 3}}, seq_len=SEQ_LEN, batch_size=BATCH, seed=0,
                           vocab_size=VOCAB, shard_index=0, shard_count=1)
