"""Sampling: greedy is argmax; top-k / top-p keep exactly their sets and renormalise; seeds; errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.inference import sample_logits, top_k_mask, top_p_mask

ROWS = 4000  # one row per draw: the empirical frequencies below have std <= 0.008
FREQ_ATOL = 0.035  # > 4 std


def _draws(logits, **options):
    """ROWS samples of the distribution `logits` `[V]`, one per row of a batch."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (ROWS, len(logits)))
    return np.asarray(sample_logits(batch, jax.random.key(0), **options))


def _frequencies(tokens, vocab):
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (8, 50))
    np.testing.assert_array_equal(sample_logits(logits, None, temperature=0.0), np.argmax(logits, axis=-1))
    # Greedy ignores the filters and the key.
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(5), temperature=0, top_k=3, top_p=0.5),
                                  np.argmax(logits, axis=-1))


def test_temperature_scales_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    for temperature in (1.0, 0.5):
        expected = np.exp(logits / temperature) / np.sum(np.exp(logits / temperature))
        freq = _frequencies(_draws(logits, temperature=temperature), 4)
        np.testing.assert_allclose(freq, expected, atol=FREQ_ATOL)


def test_top_k_never_samples_outside_the_top_k():
    logits = np.asarray(jax.random.normal(jax.random.key(2), (12,)))
    top3 = np.argsort(-logits)[:3]
    freq = _frequencies(_draws(logits, top_k=3), 12)
    assert set(np.flatnonzero(freq)) == set(top3)
    expected = np.exp(logits[top3]) / np.sum(np.exp(logits[top3]))
    np.testing.assert_allclose(freq[top3], expected, atol=FREQ_ATOL)
    # Ties at the k-th value still keep exactly k tokens.
    assert int(top_k_mask(jnp.zeros((1, 6)), 2).sum()) == 2


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs)
    for p, nucleus in ((0.4, [1]), (0.75, [1, 3]), (0.9, [1, 3, 2]), (1.0, [1, 3, 2, 0])):
        mask = np.asarray(top_p_mask(jnp.asarray(logits, jnp.float32)[None], p))[0]
        assert set(np.flatnonzero(mask)) == set(nucleus), p
    freq = _frequencies(_draws(logits, top_p=0.75), 4)
    np.testing.assert_allclose(freq, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=FREQ_ATOL)
    assert freq[0] == freq[2] == 0
    # Combined with top-k: top-k first, then the nucleus of what is left.
    freq = _frequencies(_draws(logits, top_k=3, top_p=0.9), 4)
    assert freq[0] == 0 and np.all(freq[[1, 2, 3]] > 0)


def test_same_seed_same_tokens():
    logits = jax.random.normal(jax.random.key(3), (16, 30))
    a = sample_logits(logits, jax.random.key(7), temperature=0.9, top_k=10)
    b = sample_logits(logits, jax.random.key(7), temperature=0.9, top_k=10)
    c = sample_logits(logits, jax.random.key(8), temperature=0.9, top_k=10)
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))


def test_vocab_limit_bars_padding_ids():
    logits = jnp.zeros((ROWS, 8)).at[:, 6:].set(10.0)  # the padding ids would win without the limit
    tokens = np.asarray(sample_logits(logits, jax.random.key(0), vocab_limit=6))
    assert tokens.max() < 6 and len(set(tokens)) == 6


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1.0), "temperature must be a number >= 0"),
    (dict(top_k=0), "top_k must be None or an int >= 1"),
    (dict(top_p=1.5), r"top_p must be None or a number in \(0, 1\]"),
    (dict(vocab_limit=0), "vocab_limit must be None or an int >= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sample_logits(jnp.zeros((1, 4)), jax.random.key(0), **options)
