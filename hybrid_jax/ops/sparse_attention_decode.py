r"""Decoding with block-sparse attention (`hybrid_jax.ops.sparse_attention`): the cache holds the keys,
the values and the pooled keys of the complete blocks (`pool_block_keys` from a prompt,
`block_keys_update` after each token), so a step scores S / Bs pooled keys and attends over
(top_k + 1) Bs cached keys (`block_sparse_attention_step`), equal to that position's row of
`block_sparse_attention`. q, k and v share one dtype; o comes back in it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops._common import check_rank, check_shape, default_scale
from hybrid_jax.ops.sparse_attention import (
    attend_blocks,
    check_block_options,
    check_heads_and_dtype,
    group_sum,
    key_index,
    top_blocks,
    with_own_block,
)


def _check_cache(op: str, k_cache, block_keys, block_size: int) -> None:
    b, s, kv_heads, dk = k_cache.shape
    if s % block_size:
        raise ValueError(f"{op}: the cache's {s} slots must be a multiple of block_size={block_size}")
    check_shape(f"{op}: block_keys", block_keys, (b, s // block_size, kv_heads, dk),
                "[B, S / block_size, HKV, K] (from k_cache)")


def _check_length(op: str, length, batch: int) -> jax.Array:
    length = jnp.asarray(length)
    check_shape(f"{op}: length", length, (batch,), "[B]")
    if not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(f"{op}: length must be an integer array, got dtype {length.dtype}")
    return length


def block_keys_update(block_keys, k_cache, length, *, block_size: int):
    """Pools the block that the token at position `length - 1` completes (row b: when
    `length[b] % block_size == 0`) into block_keys `[B, S / Bs, HKV, K]`; returns block_keys.

    k_cache `[B, S, HKV, K]` already holds that token's key; other rows are left unchanged."""
    op = "block_keys_update"
    check_rank(f"{op}: k_cache", k_cache, 4, "[B, S, HKV, K]")
    check_block_options(op, block_size, 1)
    _check_cache(op, k_cache, block_keys, block_size)
    length = _check_length(op, length, k_cache.shape[0])
    rows, block = jnp.arange(k_cache.shape[0]), (length - 1) // block_size
    index = key_index(block * block_size, block_size, k_cache.shape[1])  # [B, Bs]
    pooled = jnp.mean(k_cache[rows[:, None], index].astype(jnp.float32), axis=1)
    done = jnp.where(length % block_size == 0, block, block_keys.shape[1])  # out of range: dropped
    return block_keys.at[rows, done].set(pooled.astype(block_keys.dtype), mode="drop")


def block_sparse_attention_step(q_t, k_cache, v_cache, block_keys, *, length, block_size, top_k, scale=None):
    """One decoding step: q_t `[B, H, K]` at position `length - 1` against caches `[B, S, HKV, D]`
    (S a multiple of block_size, the new token already written) and the pooled keys block_keys
    `[B, S / block_size, HKV, K]` of the complete blocks -> o `[B, H, V]`, equal to that position's
    row of `block_sparse_attention`. o comes back in the caches' dtype (which q_t shares)."""
    op = "block_sparse_attention_step"
    check_rank(f"{op}: q_t", q_t, 3, "[B, H, K]")
    check_rank(f"{op}: k_cache", k_cache, 4, "[B, S, HKV, K]")
    check_rank(f"{op}: v_cache", v_cache, 4, "[B, S, HKV, V]")
    b, heads, dk = q_t.shape
    s, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    check_shape(f"{op}: k_cache", k_cache, (b, s, kv_heads, dk), "[B, S, HKV, K] (B and K as in q_t)")
    check_shape(f"{op}: v_cache", v_cache, (b, s, kv_heads, dv), "[B, S, HKV, V] (as k_cache)")
    check_heads_and_dtype(op, heads, kv_heads, q_t=q_t, k_cache=k_cache, v_cache=v_cache)
    check_block_options(op, block_size, top_k)
    _check_cache(op, k_cache, block_keys, block_size)
    q_pos = (_check_length(op, length, b) - 1)[:, None]
    q_sum = group_sum(q_t[:, None], kv_heads)
    index, valid = top_blocks(q_sum, block_keys.astype(jnp.float32), jnp.zeros_like(q_pos), q_pos // block_size,
                               top_k=top_k)
    in_block = q_pos % block_size
    starts, key_ok = with_own_block(index * block_size, valid, q_pos - in_block, in_block + 1, block_size)
    q_grouped = q_t.reshape(b, 1, kv_heads, heads // kv_heads, dk)
    o = attend_blocks(q_grouped, k_cache, v_cache, starts, key_ok, default_scale(scale, dk))
    return o.reshape(b, heads, dv).astype(v_cache.dtype)
