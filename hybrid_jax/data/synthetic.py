"""Synthetic recall tasks as numpy batches: MQAR (below) and selective copying (`selective_copy_batch`).

Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): each row shows N key-value
pairs, then asks for every key again somewhere later:

    position  0    1    2    3   ...  2N-2  2N-1 | 2N ...                               T-1
    inputs    k_1  v_1  k_2  v_2 ...  k_N   v_N  | 0  0  k_3  0  k_1  0 ... k_2  0  ...
    targets   -    -    -    -   ...  -     -    | -  -  v_3  -  v_1  - ... v_2  -  ...
    mask      0    0    0    0   ...  0     0    | 0  0  1    0  1    0 ... 1    0  ...

A model solves it only by recalling, at each query, the value stored next to the same key in
the context. Keys are distinct draws from [1, V/2), values distinct draws from [V/2, V), token 0
fills the query region. As in Zoology, the query offsets within the query region follow a power
law, p(offset) ~ (offset + 1)^(a - 1) with a = `power_a` (0.01: mostly near the context, with a
long tail), sampled without replacement by the Gumbel-top-k trick; which key is asked where is a
uniform random permutation. Everything is numpy and determined by `rng`.
"""

from __future__ import annotations

import numpy as np

from hybrid_jax.checks import require_int


def mqar_batch(
    rng: np.random.Generator | int | None,
    batch: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    *,
    power_a: float = 0.01,
) -> dict[str, np.ndarray]:
    """One MQAR batch.

    Args:
      rng: a numpy Generator, or a seed for one.
      batch, seq_len: output shape [batch, seq_len]; needs seq_len >= 3 * num_kv_pairs.
      vocab_size: ids lie in [0, vocab_size); needs vocab_size >= 2 * (num_kv_pairs + 1).
      num_kv_pairs: N, the pairs shown and queried in each row.
      power_a: power-law exponent of the query placement (a > 0; 1 is uniform).

    Returns:
      {"inputs": int32 [B, T], "targets": int32 [B, T] (0 where unmasked),
       "mask": float32 [B, T], 1 exactly at the N query positions of each row}.
    """
    batch, seq_len, vocab_size, num_pairs = _checked_sizes(batch, seq_len, vocab_size, num_kv_pairs)
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a!r}")
    rng = np.random.default_rng(rng)

    def distinct(count: int, low: int, high: int) -> np.ndarray:
        """[batch, count] distinct draws from [low, high) per row."""
        return np.argsort(rng.random((batch, high - low)), axis=1)[:, :count] + low

    keys = distinct(num_pairs, 1, vocab_size // 2)  # key ids 1 .. V/2 - 1; 0 is the filler
    values = distinct(num_pairs, vocab_size // 2, vocab_size)

    context_len = 2 * num_pairs
    query_len = seq_len - context_len
    log_weight = (power_a - 1.0) * np.log1p(np.arange(query_len))
    gumbel = rng.gumbel(size=(batch, query_len))
    offsets = np.argsort(-(log_weight + gumbel), axis=1)[:, :num_pairs]
    asked = np.argsort(rng.random((batch, num_pairs)), axis=1)  # which pair each query asks for

    rows = np.arange(batch)[:, None]
    inputs = np.zeros((batch, seq_len), np.int32)
    inputs[:, 0:context_len:2] = keys
    inputs[:, 1:context_len:2] = values
    query_positions = context_len + offsets
    inputs[rows, query_positions] = keys[rows, asked]
    targets = np.zeros((batch, seq_len), np.int32)
    targets[rows, query_positions] = values[rows, asked]
    mask = np.zeros((batch, seq_len), np.float32)
    mask[rows, query_positions] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


def _checked_sizes(batch, seq_len, vocab_size, num_kv_pairs) -> tuple[int, int, int, int]:
    sizes = [require_int(value, name) for value, name in
             ((batch, "batch"), (seq_len, "seq_len"), (vocab_size, "vocab_size"), (num_kv_pairs, "num_kv_pairs"))]
    _, seq_len, vocab_size, num_pairs = sizes
    if seq_len < 3 * num_pairs:
        raise ValueError(
            f"seq_len ({seq_len}) must be at least 3 * num_kv_pairs ({3 * num_pairs}): "
            "2 tokens per pair of context plus one per query"
        )
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"vocab_size ({vocab_size}) too small for {num_pairs} distinct keys: needs "
            f"vocab_size >= {2 * (num_pairs + 1)}"
        )
    return tuple(sizes)


def selective_copy_batch(
    rng: np.random.Generator | int | None,
    batch: int,
    seq_len: int,
    vocab_size: int,
    num_tokens: int,
) -> dict[str, np.ndarray]:
    """One selective-copying batch (Gu & Dao 2023, "Mamba", Sec. 3.1; a Zoology-style recall probe).

    The first T - N positions hold N data tokens at random (sorted) positions among noise tokens 0;
    the last N positions hold the cue token 1, and the target at cue j is data token j: the model
    must copy the data tokens in order, skipping the noise, which needs content-aware selection.

        inputs    0  d_1  0  0  d_2 ...  0  d_N  0 | 1    1   ...  1
        targets   -  -    -  -  -   ...  -  -    - | d_1  d_2 ...  d_N
        mask      0  0    0  0  0   ...  0  0    0 | 1    1   ...  1

    Data tokens are uniform draws from [2, V) (repeats allowed). Returns the same keys as
    `mqar_batch`; needs seq_len >= 2 * num_tokens and vocab_size >= 3.
    """
    sizes = [require_int(value, name) for value, name in
             ((batch, "batch"), (seq_len, "seq_len"), (vocab_size, "vocab_size"), (num_tokens, "num_tokens"))]
    batch, seq_len, vocab_size, num_tokens = sizes
    if seq_len < 2 * num_tokens:
        raise ValueError(f"seq_len ({seq_len}) must be at least 2 * num_tokens ({2 * num_tokens}): "
                         "a context with the data tokens, then one cue per token to copy")
    if vocab_size < 3:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= 3: noise 0, cue 1 and data tokens")
    rng = np.random.default_rng(rng)
    context_len = seq_len - num_tokens
    positions = np.sort(np.argsort(rng.random((batch, context_len)), axis=1)[:, :num_tokens], axis=1)
    tokens = rng.integers(2, vocab_size, size=(batch, num_tokens), dtype=np.int32)

    rows = np.arange(batch)[:, None]
    inputs = np.zeros((batch, seq_len), np.int32)
    inputs[rows, positions] = tokens
    inputs[:, context_len:] = 1
    targets = np.zeros((batch, seq_len), np.int32)
    targets[:, context_len:] = tokens
    mask = np.zeros((batch, seq_len), np.float32)
    mask[:, context_len:] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}
