"""MQAR: every masked target is the value stored next to the queried key in the context."""
import numpy as np
import pytest

from hybrid_jax.data import mqar_batch, selective_copy_batch

B, T, V, N = 16, 64, 128, 8


def mask_of(batch):
    return batch["mask"].ravel()


def test_targets_are_recoverable_from_context():
    batch = mqar_batch(0, B, T, V, N)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
    assert inputs.shape == targets.shape == mask.shape == (B, T)
    assert inputs.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    np.testing.assert_array_equal(mask.sum(axis=1), N)
    assert np.all(mask[:, : 2 * N] == 0) and np.all(targets[mask == 0] == 0)
    for row in range(B):
        keys, values = inputs[row, 0 : 2 * N : 2], inputs[row, 1 : 2 * N : 2]
        assert len(set(keys)) == N and np.all((keys >= 1) & (keys < V // 2))
        assert np.all((values >= V // 2) & (values < V))
        lookup = dict(zip(keys.tolist(), values.tolist()))
        queries = np.flatnonzero(mask[row])
        assert sorted(inputs[row, queries].tolist()) == sorted(keys.tolist())  # each key once
        for t in queries:
            assert targets[row, t] == lookup[int(inputs[row, t])]
        # Outside the context and the queries there is only filler.
        filler = np.ones(T, bool)
        filler[: 2 * N] = False
        filler[queries] = False
        assert np.all(inputs[row, filler] == 0)


def test_seeded_and_power_law_placement():
    first = mqar_batch(np.random.default_rng(3), B, T, V, N)
    again = mqar_batch(3, B, T, V, N)
    other = mqar_batch(4, B, T, V, N)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["inputs"], other["inputs"])
    # a = 0.01 puts queries near the context far more often than uniform placement would.
    offsets = np.flatnonzero(mask_of(mqar_batch(0, 256, T, V, N))) % T - 2 * N
    uniform = np.flatnonzero(mask_of(mqar_batch(0, 256, T, V, N, power_a=1.0))) % T - 2 * N
    assert np.median(offsets) < 0.6 * np.median(uniform)


def test_errors():
    with pytest.raises(ValueError, match="seq_len .* at least 3 \\* num_kv_pairs"):
        mqar_batch(0, 2, 3 * N - 1, V, N)
    with pytest.raises(ValueError, match="vocab_size .* too small"):
        mqar_batch(0, 2, T, 2 * N, N)
    with pytest.raises(ValueError, match="num_kv_pairs: must be an int >= 1"):
        mqar_batch(0, 2, T, V, 0)


def test_selective_copy_targets_are_the_data_tokens_in_order():
    batch = selective_copy_batch(0, B, T, V, N)
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
    assert inputs.shape == targets.shape == mask.shape == (B, T)
    np.testing.assert_array_equal(mask[:, T - N:], 1)
    assert np.all(mask[:, : T - N] == 0) and np.all(inputs[:, T - N:] == 1)
    for row in range(B):
        data_tokens = inputs[row, : T - N][inputs[row, : T - N] != 0]
        assert len(data_tokens) == N and np.all(data_tokens >= 2)  # noise 0 and cue 1 never copied
        np.testing.assert_array_equal(targets[row, T - N:], data_tokens)
    assert not np.array_equal(batch["inputs"], selective_copy_batch(1, B, T, V, N)["inputs"])


def test_selective_copy_errors():
    with pytest.raises(ValueError, match="seq_len .* at least 2 \\* num_tokens"):
        selective_copy_batch(0, 2, 2 * N - 1, V, N)
    with pytest.raises(ValueError, match="vocab_size .* >= 3"):
        selective_copy_batch(0, 2, T, 2, N)
