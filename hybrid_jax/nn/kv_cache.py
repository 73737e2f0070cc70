r"""Decode caches of the softmax-attention layers (Attention, MLA): ring buffers, in-place writes, cost.

A cache of S slots holds position p in slot p mod S (`prompt_ring_buffer` fills it from a prompt;
decoding writes one slot a token). With S = min(max_len, W), a sliding-window layer keeps exactly its
last W tokens and a global layer its whole context; softmax does not care about slot order.

The mean number of keys a causal query attends to over positions t = 1 .. N, with a window W
(W = N without one), which the FLOP counts use:

    mean_t min(t, W) = (W (W + 1) / 2 + (N - W) W) / N
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.checks import check_choice
from hybrid_jax.nn.layer_config import impl_names
from hybrid_jax.nn.segments import PromptTail
from hybrid_jax.ops.attention import SUPPORTED as ATTENTION_IMPLS


def check_attention_impl(cfg) -> None:
    """`cfg.impl` is one of the softmax_attention implementations."""
    check_choice(cfg, "impl", impl_names(ATTENTION_IMPLS))


class KVCache(NamedTuple):
    """Decode cache of an attention layer: ring buffers of keys (after RoPE) and values."""

    k: jax.Array  # [B, S, HKV, Dh]
    v: jax.Array  # [B, S, HKV, Dh]


def prompt_ring_buffer(values: jax.Array, capacity: int, lengths: jax.Array | None,
                       tail: PromptTail | None = None) -> jax.Array:
    """`[B, capacity, ...]` holding row b's positions max(0, L_b - capacity) .. L_b - 1 of `values`
    `[B, T, ...]` (L_b = lengths[b], default T), position p in slot p mod capacity; other slots 0.

    A packed prompt's `tail` (`hybrid_jax.nn.segments.prompt_tail`) keeps only each row's last
    document instead: its tokens at positions max(0, E_b - capacity) .. E_b - 1, E_b = tail.end[b]."""
    b, t = values.shape[:2]
    if tail is None:
        positions = jnp.arange(t)[None, :]
        lengths = jnp.full((b, 1), t) if lengths is None else jnp.asarray(lengths)[:, None]
        keep = (positions < lengths) & (positions >= lengths - capacity)
    else:
        positions = tail.positions
        keep = tail.keep & (positions >= tail.end[:, None] - capacity)
    slots = jnp.where(keep, positions % capacity, capacity)  # slot `capacity` is out of range: dropped
    buffer = jnp.zeros((b, capacity) + values.shape[2:], values.dtype)
    return buffer.at[jnp.arange(b)[:, None], slots].set(values, mode="drop")


def written_in_place(caches):
    """`caches`, fenced off from the reads that follow. Left free, XLA (seen on CPU) fuses a one-token
    cache write into the attention's operand layout change and copies the whole cache every token;
    behind the barrier the write stays an in-place update of the donated buffer."""
    return jax.lax.optimization_barrier(caches)


def mean_attended_keys(context: int, window: int | None) -> float:
    """Mean over positions t = 1..N of the keys a causal query attends to: mean_t min(t, W)."""
    n = int(context)
    w = n if window is None else min(int(window), n)
    return (w * (w + 1) / 2 + (n - w) * w) / n
