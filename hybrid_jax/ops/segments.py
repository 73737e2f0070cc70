r"""Packed documents: what every op derives from `segment_ids` `[B, T]`.

A row holds several documents back to back: `segment_ids[b, t]` is 1, 2, ... for the document of
token t and 0 for padding. A document (segment) is a maximal run of consecutive tokens with one
non-zero id; token t starts one when

    start_t = [ids_t != 0]  &  [t == 0  or  ids_t != ids_{t-1}]

Runs, not id values, define the documents, so the recurrences (which can only see consecutive
tokens) and the attention masks (which compare tokens far apart) agree on every layout, including
padding inside a row: a padding token ends the run before it. The ops use:

* `reset_mask`      the starts after token 0, where a recurrence drops its state (token 0 continues
                    `initial_state`, which therefore belongs to the row's first document only);
* `document_index`  the runs numbered 1, 2, ... within the row, 0 at padding: a query attends a key
                    only where these are equal and non-zero;
* `document_start`  the position of the first token of each token's document, and
  `position_in_document` = t - document_start (meaningless at padding: mask those tokens);
* `query_documents` the document numbers of attention queries sitting at the last Tq key positions.

The meaning of segment_ids for every op is in docs/conventions.md, "Packed documents".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array, *, before: jax.Array | None = None) -> jax.Array:
    """`[B, T]` bool: the first token of each document (token 0 included when it is not padding).
    `before` `[B, 1]`: the id of the token before token 0 when the row continues one (context
    parallelism, `hybrid_jax.ops.context.shard_resets`); None: id 0, so token 0 starts a run."""
    if before is None:
        before = jnp.zeros_like(segment_ids[:, :1])
    previous = jnp.concatenate([before.astype(segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    return (segment_ids != 0) & (segment_ids != previous)


def reset_mask(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` bool: where a recurrence restarts from the zero state (document starts after token 0)."""
    return document_starts(segment_ids).at[:, 0].set(False)


def document_index(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` int32: the documents numbered 1, 2, ... in row order, 0 at padding."""
    number = jnp.cumsum(document_starts(segment_ids).astype(jnp.int32), axis=1)
    return jnp.where(segment_ids != 0, number, 0)


def document_start(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` int32: the position of the first token of each token's document."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(document_starts(segment_ids), t, 0), axis=1)


def position_in_document(segment_ids: jax.Array) -> jax.Array:
    """`[B, T]` int32: each token's position counted from its document's first token."""
    return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - document_start(segment_ids)


def query_documents(segment_ids: jax.Array, queries: int) -> tuple[jax.Array, jax.Array]:
    """(query documents `[B, Tq]`, key documents `[B, Tk]`) for the last `queries` = Tq positions of
    keys with ids `[B, Tk]` (`document_index`; queries before the first key: 0, like padding)."""
    keys = document_index(segment_ids)
    tk = keys.shape[1]
    return (keys[:, tk - queries:] if queries <= tk else jnp.pad(keys, ((0, 0), (queries - tk, 0)))), keys
