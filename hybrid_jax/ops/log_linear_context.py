r"""Context parallelism for log-linear attention (`log_linear.log_linear_attention(context_axis=...)`).

Shard i of n holds tokens iT .. (i+1)T - 1 of the row (`hybrid_jax.ops.context`). The reference's
Fenwick state after the first Q tokens of a document holds, at level l, the sources s < Q with
l(Q - 1, s) = l, and a later query t reads it at level max(l, l(t, Q - 1)) (`fenwick.carried_levels`).
So the state entering shard j + 1 follows from the one entering shard j (at position Q_j, r_j real
tokens of its document in shard j) by

    S_{j+1} = merge_{c_j}(P_j S_j) + F_j,        c_j = l(Q_j + r_j - 1, max(Q_j - 1, 0)),

where P_j is the shard's transition (the product of its tokens' M_t: a decay `[.., K or 1]` without
the delta rule, a K x K matrix with it; isolated tokens are identity steps), merge_c sums levels
0..c into level c and keeps the higher ones (`fenwick.merge_down`), and F_j is the shard's own final
levels run from zero at position Q_j (levels <= log2 T when Q_j is a multiple of T). A document
starting inside shard j drops what came before: S_{j+1} = F_j. In the unpacked row Q_j = P + jT
(P the initial state's position) and r_j = T; with P = 0 and T a power of two the merge levels
c_j = log2 T + bit_length(j XOR (j - 1)) (log2 T for j = 0) depend only on the shard index, as the
whole-row levels between shards do. Nothing here needs T to be a power of two: the fold holds for
any T, and the chunked form only needs T to be a multiple of its chunk (`check_shard_length`).

One call: (1) with `segment_ids`, each shard's (document start?, real tokens of its last document)
are all-gathered and folded into every shard's Q_j and c_j (integers only); (2) each shard runs
the op from zero at Q_i for F_i, and computes P_i; (3) one all-gather of the n pairs (P_j, F_j),
folded locally into the state entering this shard and the whole row's final state (the same on
every shard); (4) the shard runs the op again from (S_i, Q_i) for its outputs. Steps (2) and (4)
run the impl asked for (the chunked form reads S_i as its incoming levels, exactly as it reads an
initial state), so the local work is two single-device calls on T tokens; only states travel.

Sent per device and call (a ring all-gather of n pieces sends n - 1 of them): per row and value head,
4 (n - 1) (L K V + K^2) bytes with the delta rule, 4 (n - 1) (L K V + K) (or + 1) without it, L the
number of levels; plus 5 (n - 1) B bytes (a bool and an int32 per row) with segment ids, and the
one-id halo of `context.shard_resets`. The backward sends the same again (the all-gathers transpose
to reduce-scatters).

Packed documents: a document may span shards; positions within documents come from the integer fold,
so every shard's local call sees the position (per row) its first token has in its document. A shard
whose first token starts a document runs from zero at position 0. The local calls then take one
position per row, so they are vmapped over rows; the chunked form with segment ids runs the reference
(a warning, as without context parallelism): T_local sequential steps per shard, twice.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops import context, gated
from hybrid_jax.ops.fenwick import fenwick_level, merge_down


def check_shard_length(op: str, local_length: int, chunk_size: int, chunked: bool):
    """The chunked form needs every shard to start on a chunk boundary (T_local a multiple of the
    chunk, or a power of two below it), so that no shard pays for a misaligned extra chunk."""
    chunk = min(chunk_size, 1 << (local_length - 1).bit_length())
    if chunked and local_length % chunk:
        raise ValueError(f"{op}: with context_axis and impl='chunk' the shard length T_local={local_length} "
                         f"must be a multiple of chunk_size={chunk_size} (or a power of two below it), so that "
                         f"the shards' chunks stay aligned with the Fenwick blocks; choose another shard "
                         f"count or chunk_size")


def shard_transition(q, k, g, beta, iso, *, chunk_size, precision, axis):
    """P_i of this shard (identity at isolated and padding tokens; a document start inside the shard
    is `fold_levels`' business): `[B, HV, K or 1]` decay without the delta rule, `[B, HV, K, K]` with
    it (the chunked gated recurrence run on the identity state with zero values)."""
    if beta is None:
        return jnp.exp(jnp.sum(g if iso is None else jnp.where(iso[..., None], 0.0, g), axis=1))
    b, _, hv, kd = k.shape
    identity = context.varying(jnp.broadcast_to(jnp.eye(kd, dtype=jnp.float32), (b, hv, kd, kd)), axis)
    _, transition = gated.recurrence_chunk(q, k, jnp.zeros_like(k), g, beta, identity, iso,
                                           chunk_size=chunk_size, precision=precision)
    return transition


def _apply(transition, levels):
    """P S for every level `[B, HV, L, K, V]`."""
    if transition.ndim == 4:
        return jnp.einsum("bhij,bhljv->bhliv", transition, levels, precision=jax.lax.Precision.HIGHEST)
    return transition[:, :, None, :, None] * levels


def _document_summary(segment_ids, axis):
    """`[B]` each: (a document starts in this shard, the first token starts one, the real tokens of
    the shard's last document part: those from its last start on, or all of them without a start)."""
    starts = context.shard_resets(segment_ids, axis)
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    last_start = jnp.max(jnp.where(starts, index, -1), axis=1)
    tail = jnp.sum((segment_ids != 0) & (index >= last_start[:, None]), axis=1, dtype=jnp.int32)
    return starts.any(axis=1), starts[:, 0], tail


def shard_positions(segment_ids, position, local_length: int, axis: str):
    """(entering position of every shard `[n, B]` (or `[n]`), merge level of every shard `[n, B]`
    (or `[n]`), document starts in every shard `[n, B]` or None, first token of this shard starts a
    document `[B]` or None, the row's final position `[B]` or scalar), all but the fourth the same on
    every shard."""
    n = context.shard_count(axis)
    position = jnp.asarray(position, jnp.int32)
    if segment_ids is None:
        entering = position + local_length * jnp.arange(n + 1, dtype=jnp.int32)
        at = entering[:-1]
        return at, fenwick_level(at + local_length - 1, jnp.maximum(at - 1, 0)), None, None, entering[-1]
    any_start, first_start, tail = _document_summary(segment_ids, axis)
    gathered = [jax.lax.all_gather(x, axis, to="invarying") for x in (any_start, tail)]
    at = jnp.broadcast_to(position, segment_ids.shape[:1])
    entering, targets = [], []
    for starts_j, tail_j in zip(*gathered):
        entering.append(at)
        merges = (tail_j > 0) & ~starts_j
        targets.append(jnp.where(merges, fenwick_level(at + tail_j - 1, jnp.maximum(at - 1, 0)), 0))
        at = jnp.where(starts_j, tail_j, at + tail_j)
    return jnp.stack(entering), jnp.stack(targets), gathered[0], first_start, at


def fold_levels(transition, local_final, initial_levels, targets, starts, axis):
    """(the levels entering this shard, the whole row's final levels) from every shard's (P_j, F_j):
    S_0 = initial_levels, S_{j+1} = merge_{c_j}(P_j S_j) + F_j, or F_j where a document starts in shard
    j (`starts` `[n, B]` or None). One all-gather of the pairs, then n steps on every shard."""
    transitions = jax.lax.all_gather(transition, axis, to="invarying")
    finals = jax.lax.all_gather(local_final, axis, to="invarying")
    index = context.shard_index(axis)
    state = entering = initial_levels
    for j in range(context.shard_count(axis)):
        entering = jnp.where(index == j, state, entering)
        carried = merge_down(_apply(transitions[j], state), targets[j])
        if starts is not None:
            carried = jnp.where(starts[j][:, None, None, None, None], 0.0, carried)
        state = carried + finals[j]
    return entering, state


def context_parallel(run_local, args, segment_ids, *, axis: str, chunk_size: int, precision):
    """(this shard's outputs, the whole row's final levels, its final position) of log-linear
    attention with the time axis split over `axis` (see the module docstring). `args`: the op's
    prepared (q, k, v, g, beta, lam, levels, position, iso), levels and position the row's initial
    state; `run_local(args, segment_ids)` the single-device impl, taking one position for all rows."""
    q, k, v, g, beta, lam, levels, position, iso = args
    at, targets, starts, first_start, final_position = shard_positions(segment_ids, position, q.shape[1], axis)
    index = context.shard_index(axis)
    here = jnp.take(at, index, axis=0)
    zero = context.varying(jnp.zeros_like(levels), axis)
    if segment_ids is None:
        local = lambda levels, where: run_local((q, k, v, g, beta, lam, levels, where, iso), None)  # noqa: E731
    else:
        here = jnp.where(first_start, 0, here)
        local = _per_row(run_local, (q, k, v, g, beta, lam), iso, segment_ids)
    _, local_final = local(zero, here)
    transition = shard_transition(q, k, g, beta, iso, chunk_size=chunk_size, precision=precision, axis=axis)
    entering, final = fold_levels(transition, local_final, levels, targets, starts, axis)
    if first_start is not None:
        entering = jnp.where(first_start[:, None, None, None, None], 0.0, entering)
    o, _ = local(entering, here)
    return o, final, final_position


def _per_row(run_local, tensors, iso, segment_ids):
    """`local(levels, positions [B])`: `run_local` vmapped over the rows, each at its own position."""
    def row(tensors, iso, segment_ids, levels, position):
        one = lambda x: None if x is None else x[None]  # noqa: E731
        o, final = run_local((*map(one, tensors), levels[None], position, one(iso)), segment_ids[None])
        return o[0], final[0]

    batched = jax.vmap(row, in_axes=(0, None if iso is None else 0, 0, 0, 0))
    return lambda levels, positions: batched(tensors, iso, segment_ids, levels, positions)
