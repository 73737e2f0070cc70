r"""Decoding with softmax attention over a KV cache.

`kv_cache_update` writes one token per batch row into `[B, S, HKV, D]` caches at `index[b]`;
`softmax_attention_step` attends one query token per row to the first `length[b]` cache entries
(and to the last `window` of them with a sliding window),

    o_b = softmax_s(q_b . k_{b,s} * scale, s < length_b [and s >= length_b - window]) v_{b,s},

which is the last row of the causal `softmax_attention` over those `length[b]` tokens; grouped
key/value heads as there (`attention.py`).
"""
from __future__ import annotations

import jax.numpy as jnp

from hybrid_jax.ops._common import (
    check_floating,
    check_grouped_heads,
    check_rank,
    check_same_dtype,
    check_shape,
    default_scale,
)
from hybrid_jax.ops.attention import F32, allowed_positions, check_window, masked_softmax

def kv_cache_update(k_cache, v_cache, k_t, v_t, index):
    """Writes k_t `[B, HKV, K]`, v_t `[B, HKV, V]` at cache slot `index[b]` of row b; returns the caches.

    Caches are `[B, S, HKV, D]`; `index` is `[B]` integers in [0, S). Out-of-range writes are dropped.
    """
    op = "kv_cache_update"
    check_rank(f"{op}: k_cache", k_cache, 4, "[B, S, HKV, K]")
    check_rank(f"{op}: v_cache", v_cache, 4, "[B, S, HKV, V]")
    b, s, kv_heads, _ = k_cache.shape
    check_shape(f"{op}: v_cache", v_cache, (b, s, kv_heads, v_cache.shape[3]), "[B, S, HKV, V] (as k_cache)")
    check_shape(f"{op}: k_t", k_t, (b, kv_heads, k_cache.shape[3]), "[B, HKV, K]")
    check_shape(f"{op}: v_t", v_t, (b, kv_heads, v_cache.shape[3]), "[B, HKV, V]")
    index = jnp.asarray(index)
    check_shape(f"{op}: index", index, (b,), "[B]")
    if not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(f"{op}: index must be an integer array, got dtype {index.dtype}")
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, index].set(k_t.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, index].set(v_t.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def softmax_attention_step(q_t, k_cache, v_cache, *, length, scale=None, window=None):
    """One decoding step: q_t `[B, H, K]` against caches `[B, S, HKV, D]` -> o `[B, H, V]`.

    `length` `[B]` counts the valid cache entries per row, the new token's k, v already written at
    `length - 1`; the query attends to slots < length (and >= length - window). Equals the last row
    of the causal `softmax_attention` over the first `length` tokens. o comes back in the caches' dtype
    (which q_t shares).
    """
    op = "softmax_attention_step"
    check_rank(f"{op}: q_t", q_t, 3, "[B, H, K]")
    check_rank(f"{op}: k_cache", k_cache, 4, "[B, S, HKV, K]")
    check_rank(f"{op}: v_cache", v_cache, 4, "[B, S, HKV, V]")
    for name, x in (("q_t", q_t), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_floating(f"{op}: {name}", x)
    b, heads, dk = q_t.shape
    s, kv_heads, dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    check_shape(f"{op}: k_cache", k_cache, (b, s, kv_heads, dk), "[B, S, HKV, K] (B and K as in q_t)")
    check_shape(f"{op}: v_cache", v_cache, (b, s, kv_heads, dv), "[B, S, HKV, V] (as k_cache)")
    check_grouped_heads(heads, kv_heads, op)
    check_same_dtype(op, q_t=q_t, k_cache=k_cache, v_cache=v_cache)
    check_window(window, op)
    length = jnp.asarray(length)
    check_shape(f"{op}: length", length, (b,), "[B]")
    if not jnp.issubdtype(length.dtype, jnp.integer):
        raise ValueError(f"{op}: length must be an integer array, got dtype {length.dtype}")
    scale = default_scale(scale, dk)

    q_grouped = q_t.reshape(b, kv_heads, heads // kv_heads, dk)
    logits = jnp.einsum("bngd,bsnd->bngs", q_grouped, k_cache, preferred_element_type=F32) * scale
    allowed = allowed_positions((length - 1)[:, None], jnp.arange(s)[None, :], causal=True, window=window)
    weights = masked_softmax(logits, allowed[:, None, None, :])
    o = jnp.einsum("bngs,bsnv->bngv", weights.astype(v_cache.dtype), v_cache, preferred_element_type=F32)
    return o.reshape(b, heads, dv).astype(v_cache.dtype)
