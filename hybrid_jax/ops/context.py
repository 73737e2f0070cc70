r"""Context parallelism: the time axis of a row split over a mesh axis, in order.

An op called with `context_axis="context"` runs inside `jax.shard_map` with that axis manual: its
`[B, T, ...]` inputs are this device's slice of T (shard i of n holds positions iT .. (i+1)T - 1;
every shard has the same T) and it returns this shard's outputs. What crosses shards goes through
the collectives here, never a gather of the whole sequence unless the op is attention:

* **Linear recurrences** S_t = A_t S_{t-1} + X_t. Shard i computes, from its own tokens only, its
  final state from zero F_i and its transition P_i = A_last ... A_first (a diagonal `[.., K]` or
  `[.., 1]` decay for linear attention / GLA / SSD / RG-LRU; the K x K product for the delta family;
  zero once a document starts inside the shard). The state entering shard i is then

      E_0 = S_init,        E_{i+1} = P_i E_i + F_i,

  a scan over shards of (P_i, F_i) pairs (`entering_states`): one all-gather of n pairs, each shard
  folding the ones before it (n is small: the scan costs n K x K x V products, nothing per token).
  The shard then runs its op again from E_i (or finishes its outputs from it) locally.
* **Halos** (`previous_tokens`): the last w tokens of the previous shard (zeros on shard 0), for
  short convolutions (w = conv_size - 1) and for where documents start (w = 1 of the segment ids).
* **Attention** (`gather_time`, `shard_offset`): K, V and the segment ids all-gathered over the
  axis; queries stay local, at positions `shard_offset + arange(T)`.

Packed documents hold across shards: `shard_resets` marks a document start at a shard's first
token by comparing with the previous shard's last id (`segments.reset_mask` alone would treat every
shard's first token as token 0, which continues the state).

Gradients flow through the collectives (an all-gather transposes to a reduce-scatter), so
`jax.grad` of a context-parallel forward equals the 1-device gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops import segments

CONTEXT_AXIS = "context"  # the mesh axis name the models and the trainer use for the time axis


def shard_index(axis: str) -> jax.Array:
    """This shard's position along `axis` (0 holds the first tokens)."""
    return jax.lax.axis_index(axis)


def shard_count(axis: str) -> int:
    """The number of shards along `axis` (static)."""
    return jax.lax.axis_size(axis)


def shard_offset(local_length: int, axis: str) -> jax.Array:
    """The position of this shard's first token in the whole row."""
    return shard_index(axis) * local_length


def previous_tokens(x: jax.Array, count: int, axis: str, *, time_axis: int = 1) -> jax.Array:
    """The last `count` tokens of the previous shard along `time_axis` (zeros on shard 0).

    One `ppermute` from shard i to i + 1 of `count` tokens; `count` must not exceed a shard's length
    (a longer halo would need several hops)."""
    n = shard_count(axis)
    if count > x.shape[time_axis]:
        raise ValueError(f"previous_tokens: a halo of {count} tokens is longer than one shard "
                         f"({x.shape[time_axis]} tokens); use fewer shards along {axis!r}")
    tail = jax.lax.slice_in_dim(x, x.shape[time_axis] - count, x.shape[time_axis], axis=time_axis)
    received = jax.lax.ppermute(tail, axis, [(i, i + 1) for i in range(n - 1)])
    return received  # ppermute leaves zeros where no shard sends: shard 0


def gather_time(x: jax.Array, axis: str, *, time_axis: int = 1) -> jax.Array:
    """The whole row from every shard's slice: an all-gather along `time_axis`, in shard order."""
    return jax.lax.all_gather(x, axis, axis=time_axis, tiled=True)


def shard_resets(segment_ids: jax.Array, axis: str) -> jax.Array:
    """`[B, T]` bool: where a recurrence restarts (`segments.reset_mask` of the whole row), for this
    shard's slice of `segment_ids`: a shard's first token starts a document when its id is non-zero
    and differs from the previous shard's last id (shard 0's first token never resets: it continues
    the initial state, as token 0 of an unsplit row does)."""
    before = previous_tokens(segment_ids, 1, axis)
    before = jnp.where(shard_index(axis) == 0, segment_ids[:, :1], before)
    return segments.document_starts(segment_ids, before=before)


def varying(tree, axis: str):
    """`tree` typed as differing between the shards of `axis` (`jax.lax.pcast`): the starting carry of a
    scan whose body mixes in this shard's own values (a constant would be typed the same everywhere)."""
    return jax.tree.map(lambda x: jax.lax.pcast(x, (axis,), to="varying"), tree)


def apply_transition(transition: jax.Array, state: jax.Array) -> jax.Array:
    """P S for a state `[.., K, V]` and a transition that is a matrix `[.., K, K]` (same rank as the
    state) or the diagonal of one, `[.., K]` or `[.., 1]`."""
    if transition.ndim == state.ndim:
        return jnp.einsum("...ij,...jv->...iv", transition, state, precision=jax.lax.Precision.HIGHEST)
    return transition[..., None] * state


def entering_states(transition: jax.Array, local_final: jax.Array, initial_state: jax.Array | None,
                    axis: str) -> tuple[jax.Array, jax.Array]:
    """(the state entering this shard, the final state of the whole row) from every shard's
    (transition P_i, final state from zero F_i): E_0 = initial_state (zero if None),
    E_{i+1} = P_i E_i + F_i. `local_final` `[.., K, V]` float32; `transition` as in
    `apply_transition`. Both results carry `local_final`'s shape; the final state is invariant over
    `axis` (the same value on every shard)."""
    # "invarying": the gathered pairs are the same on every shard, so the row's final state is too
    # (shard_map can then return it replicated, out_specs P()).
    transitions = jax.lax.all_gather(transition, axis, to="invarying")
    finals = jax.lax.all_gather(local_final, axis, to="invarying")
    index = shard_index(axis)
    state = jnp.zeros_like(local_final) if initial_state is None else initial_state.astype(local_final.dtype)
    entering = state
    for i in range(shard_count(axis)):
        entering = jnp.where(index == i, state, entering)
        state = apply_transition(transitions[i], state) + finals[i]
    return entering, state


__all__ = ["CONTEXT_AXIS", "apply_transition", "entering_states", "gather_time", "previous_tokens",
           "shard_count", "shard_index", "shard_offset", "shard_resets", "varying"]
