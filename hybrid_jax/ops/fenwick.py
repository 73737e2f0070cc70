r"""Fenwick-tree level arithmetic shared by the three forms of log-linear attention (`log_linear.py`).

The level of source s for query t is l(t, s) = 0 if s = t, else bit_length(t XOR s): level l >= 1 of
t is the aligned block of 2^(l-1) positions left of t's own block. Positions 0 .. T-1 need
ceil(log2 T) + 1 levels. A state that has consumed P tokens holds, at level l, what a later query t
reads at level max(l, l(t, P - 1)). The derivations are in docs/chunked_algorithms.md.

Packed documents (`segment_ids`): the levels restart with each document, so a token's position is
counted from its document's first token (`token_positions`); the document holding token 0 continues
the incoming state and its positions from P.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops import segments


def fenwick_level(t, s):
    """0 if s == t else bit_length(t XOR s); Python ints give an int, arrays an int32 array (broadcast)."""
    if isinstance(t, int) and isinstance(s, int):
        return (t ^ s).bit_length()
    x = jnp.bitwise_xor(jnp.asarray(t, jnp.int32), jnp.asarray(s, jnp.int32))
    return 32 - jax.lax.clz(x)


def token_positions(position, batch: int, length: int, segment_ids=None):
    """`[B, T]` int32: the position of each token that sets its Fenwick levels: position + t, or with
    `segment_ids` `[B, T]` the position within its document, counted on from `position` for the
    document that holds token 0 (it continues the incoming state). Meaningless at padding (id 0)."""
    if segment_ids is None:
        return jnp.broadcast_to(position + jnp.arange(length, dtype=jnp.int32), (batch, length))
    continues = jnp.cumsum(segments.reset_mask(segment_ids) | (segment_ids == 0), axis=1) == 0
    return segments.position_in_document(segment_ids) + jnp.where(continues, position, 0)


def num_levels(length: int) -> int:
    """Levels L that positions 0 .. length - 1 need: ceil(log2(length)) + 1."""
    return max(length - 1, 0).bit_length() + 1


def merge_down(stack, target, extra=None):
    """Sums slots 0..target of `stack` `[B, H, n, K, V]` (and `extra` `[B, H, K, V]`) into slot `target`
    (a scalar, or one per row `[B]`)."""
    slot = jnp.arange(stack.shape[2])[:, None, None]
    if jnp.ndim(target) == 1:
        target = jnp.reshape(target, (-1, 1, 1, 1, 1))
    below = slot < target
    moved = jnp.sum(jnp.where(below, stack, 0.0), axis=2)
    if extra is not None:
        moved = moved + extra
    return jnp.where(below, 0.0, stack) + jnp.where(slot == target, moved[:, :, None], 0.0)


def carried_levels(times, position, n_levels):
    """`[.., L]`: the level at which query `times` reads level l of a state after `position` tokens."""
    since = fenwick_level(times, jnp.maximum(position - 1, 0))
    return jnp.maximum(jnp.arange(n_levels), since[..., None])


def one_hot(index, n):
    return (index[..., None] == jnp.arange(n)).astype(jnp.float32)
