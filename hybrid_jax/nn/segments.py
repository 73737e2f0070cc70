r"""Packed documents in the layers and the model: positions within documents, the last document of a
prompt, and the checked keywords `HybridLM` hands its mixers.

A packed row carries `segment_ids` `[B, T]` int32: 1, 2, ... per document within the row, 0 on
padding (the ops' convention, docs/conventions.md). A document is a run of one non-zero id
(`hybrid_jax.ops.segments`, which the layers share with the ops); for token t of the document whose
first token is s_t:

    position[t]  = t - s_t                                        (0 on padding)

`positions` default to these when a model is given segment ids and no positions: RoPE then counts
from 0 in every document, as `hybrid_jax.data.packing` writes them.

Decoding after a packed prompt continues its last document, the segment of the last real (non-zero)
token: `prompt_tail` gives, per row, which tokens belong to it, their positions and the position of
the next token (its last position + 1). Caches keep only those tokens, at the slots of their
positions, so a prompt whose last document starts at position 0 (the default positions) leaves
exactly the cache that prompting with that document alone leaves.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops.segments import document_start, position_in_document


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its document `[B, T]` int32; 0 on padding."""
    return jnp.where(segment_ids != 0, position_in_document(segment_ids), 0)


def resolve_positions(t: int, segment_ids: jax.Array | None, positions: jax.Array | None) -> jax.Array:
    """The positions a layer rotates by: `positions` if given, else the positions within the
    documents, else 0 .. T - 1 (`[T]`, the unpacked default)."""
    if positions is not None:
        return positions
    if segment_ids is not None:
        return segment_positions(segment_ids)
    return jnp.arange(t)


class PromptTail(NamedTuple):
    """The last document of each row of a packed prompt (module docstring)."""

    keep: jax.Array  # [B, T] bool: tokens of the row's last document
    positions: jax.Array  # [B, T] int32: positions of the prompt's tokens
    end: jax.Array  # [B] int32: the next position, last position of that document + 1 (0 if none)
    lengths: jax.Array  # [B] int32: index of the row's last real token + 1 (0 if none)


def prompt_tail(segment_ids: jax.Array, positions: jax.Array | None = None) -> PromptTail:
    """The `PromptTail` of a packed prompt; `positions` default to the positions within documents."""
    b, t = segment_ids.shape
    positions = resolve_positions(t, segment_ids, positions)
    index = jnp.arange(t, dtype=jnp.int32)
    real = segment_ids != 0
    last = jnp.max(jnp.where(real, index, -1), axis=1)  # [B]; -1: no real token
    at_last = jnp.maximum(last, 0)[:, None]
    start = jnp.take_along_axis(document_start(segment_ids), at_last, axis=1)
    keep = real & (index >= start) & (index <= last[:, None])
    end = jnp.where(last >= 0, jnp.take_along_axis(positions, at_last, axis=1)[:, 0] + 1, 0)
    return PromptTail(keep, positions, end.astype(jnp.int32), (last + 1).astype(jnp.int32))


def packed_documents(shape: tuple, segment_ids: jax.Array | None, positions: jax.Array | None,
                     caller: str) -> dict | None:
    """A model's packed-document keywords for its mixers: those given (int32), `positions` defaulting
    to the positions within the documents; None without either (the mixers then run unpacked).
    Raises ValueError naming `caller` unless each is an integer array of the tokens' `shape`."""
    for name, value in (("segment_ids", segment_ids), ("positions", positions)):
        if value is not None and (tuple(value.shape) != tuple(shape) or not jnp.issubdtype(value.dtype, jnp.integer)):
            raise ValueError(f"{caller}: {name} must be an integer array [B, T] = {list(shape)} like the tokens, "
                             f"got {value.dtype}{list(value.shape)}")
    if segment_ids is None and positions is None:
        return None
    documents = {} if positions is None else {"positions": positions.astype(jnp.int32)}
    if segment_ids is not None:
        documents["segment_ids"] = segment_ids.astype(jnp.int32)
        documents.setdefault("positions", segment_positions(documents["segment_ids"]))
    return documents


def packed_prompt(shape: tuple, lengths: jax.Array | None, segment_ids: jax.Array | None,
                  positions: jax.Array | None) -> tuple[dict, jax.Array, jax.Array]:
    """(the mixers' keywords, lengths `[B]` = last real token + 1, the next position `[B]`) of a packed
    prompt; `positions` alone make each row one document. Padding is id 0, so `lengths` must be None."""
    if lengths is not None:
        raise ValueError("HybridLM.prefill: give lengths or segment_ids / positions, not both: with packed "
                         "documents padding is segment id 0")
    if segment_ids is None:
        segment_ids = jnp.ones(shape, jnp.int32)
    documents = packed_documents(shape, segment_ids, positions, "HybridLM.prefill")
    tail = prompt_tail(documents["segment_ids"], documents["positions"])
    return documents, tail.lengths, tail.end


def segment_option(segment_ids: jax.Array | None) -> dict:
    """`{"segment_ids": segment_ids}` for an op call, or `{}` without segments (the op then runs exactly
    as it did before it knew about segments)."""
    return {} if segment_ids is None else {"segment_ids": segment_ids}


__all__ = ["PromptTail", "packed_documents", "packed_prompt", "prompt_tail", "resolve_positions", "segment_option",
           "segment_positions"]
