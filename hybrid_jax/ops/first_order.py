r"""First-order linear recurrences, elementwise: the scan every diagonal SSM reduces to.

    h_t = a_t * h_{t-1} + b_t,        t = 0 .. T-1,  h_{-1} = h0 (zeros by default)

`a` and `b` are `[B, T, ...]` (time on axis 1, any trailing shape); `h0` is `[B, ...]`.
With `log_a=True`, `a` holds natural-log decays (a_t = exp(log_a_t), log_a_t <= 0), which keeps
cumulative decays in log space where they cannot underflow before they are needed.

Three algorithms, one result:

* `REFERENCE`  lax.scan over t: the definition, float32.
* `SCAN`       jax.lax.associative_scan with combine((a1, b1), (a2, b2)) = (a1 a2, a2 b1 + b2):
               O(log T) depth; slower than lax.scan on CPU, an independent check and a
               sequence-parallel building block.
* `CHUNK`      two levels: a lax.scan over the C positions of every chunk at once (from h = 0),
               then a lax.scan over the T / C chunk carries, then h_t = local_t + P_t * carry,
               with P_t the decay from the chunk start to t. Depth C + T / C instead of T.
               Long sequences run block by block (a lax.scan over blocks of whole chunks,
               ~BLOCK_FLOATS per input, the state carried between them), so each block's
               passes and their backward stay in cache: unblocked, forward + backward time
               per token tripled between T = 2K and 8K at 256 channels on CPU. 256 KiB blocks
               (L2-sized) scale better than 1 MiB ones over T = 1K..16K (exponent 1.05 against
               1.09-1.11, one core); unrolling the in-chunk scan was slower (more thunks per trip).

All three compute in float32 and return `h` (every step) in float32 plus the final state.
`isolated` steps (read, do not write) run as identity steps a = 1, b = 0 in every impl; their reads
a_t h_{t-1} + b_t are formed from the carried states afterwards (`read_isolated`).

Packed documents (`segment_ids` `[B, T]`, `hybrid_jax.ops.segments`) change the steps, not the
algorithms: a_t = 0 (log a_t = -inf, exactly exp = 0) at the first token of every document after
token 0, so h restarts from b_t there, and padding tokens (id 0) are identity steps, so the final
state is the last document's. `initial_state` thus reaches the row's first document only. An
isolated document start still resets the state it passes on (its carried step is a = 0, b = 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_jax.ops import context, segments
from hybrid_jax.ops._common import (
    Impl,
    check_chunk_size,
    check_isolated,
    check_segment_ids,
    check_time,
    pad_time,
    resolve_impl,
    to_f32,
)

SUPPORTED = (Impl.REFERENCE, Impl.SCAN, Impl.CHUNK)
BLOCK_FLOATS = 1 << 16  # floats of one input per block of the chunked form (256 KiB in float32)


def _as_decay(a: jax.Array, log_a: bool) -> jax.Array:
    return jnp.exp(a) if log_a else a


def linear_recurrence_reference(a, b, h0, *, log_a=False):
    """The recurrence, one step at a time (time axis 1)."""

    def step(h, ab):
        a_t, b_t = ab
        h = _as_decay(a_t, log_a) * h + b_t
        return h, h

    final, hs = jax.lax.scan(step, h0, (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0)))
    return jnp.moveaxis(hs, 0, 1), final


def linear_recurrence_scan(a, b, h0, *, log_a=False):
    """jax.lax.associative_scan over (decay, offset) pairs; the initial state enters as step -1."""

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        if log_a:
            return a1 + a2, jnp.exp(a2) * b1 + b2
        return a1 * a2, a2 * b1 + b2

    # Fold h0 into the first offset: h_0 = a_0 h0 + b_0.
    b = b.at[:, 0].add(_as_decay(a[:, 0], log_a) * h0)
    _, hs = jax.lax.associative_scan(combine, (a, b), axis=1)
    return hs, hs[:, -1]


def linear_recurrence_chunk(a, b, h0, *, log_a=False, chunk_size=64):
    """Scan inside all chunks at once, then across chunk carries (see the module docstring), block
    by block when T is long."""
    batch, t = b.shape[:2]
    c = min(chunk_size, t)
    per_token = b[0, 0].size * batch
    per_block = max(1, BLOCK_FLOATS // (per_token * c)) * c
    if t <= per_block:
        return _chunk_block(a, b, h0, log_a, c)
    identity = 0.0 if log_a else 1.0  # padded steps keep the state: a = 1, b = 0
    blocks = [jnp.moveaxis(x.reshape(batch, -1, per_block, *x.shape[2:]), 1, 0)
              for x in (pad_time(a, per_block, value=identity), pad_time(b, per_block))]
    final, hs = jax.lax.scan(lambda h, ab: _chunk_block(*ab, h, log_a, c)[::-1], h0, blocks)
    return jnp.moveaxis(hs, 0, 1).reshape(batch, -1, *hs.shape[3:])[:, :t], final


def _chunk_block(a, b, h0, log_a, c):
    """The two-level chunked form over a's and b's whole time axis."""
    batch, t = b.shape[:2]
    identity = 0.0 if log_a else 1.0  # padded steps keep the state: a = 1, b = 0
    a = pad_time(a, c, value=identity)
    b = pad_time(b, c)
    n = a.shape[1] // c
    a = a.reshape(batch, n, c, *a.shape[2:])
    b = b.reshape(batch, n, c, *b.shape[2:])

    zeros = jnp.zeros_like(b[:, :, 0])  # typed like b (per shard under context parallelism)
    # Time-within-chunk becomes the scanned axis; the chunk axis rides along as a batch axis.
    local, _ = linear_recurrence_reference(
        jnp.moveaxis(a, 2, 1), jnp.moveaxis(b, 2, 1), zeros, log_a=log_a
    )
    local = jnp.moveaxis(local, 1, 2)  # [B, N, C, ...]
    if log_a:
        decay_from_start = jnp.exp(jnp.cumsum(a, axis=2))
    else:
        decay_from_start = jnp.cumprod(a, axis=2)

    def carry_step(h, inputs):
        total_decay, last = inputs
        return total_decay * h + last, h  # emit the state entering this chunk

    final, carry_in = jax.lax.scan(
        carry_step,
        h0,
        (jnp.moveaxis(decay_from_start[:, :, -1], 1, 0), jnp.moveaxis(local[:, :, -1], 1, 0)),
    )
    carry_in = jnp.moveaxis(carry_in, 0, 1)[:, :, None]  # [B, N, 1, ...]
    hs = local + decay_from_start * carry_in
    hs = hs.reshape(batch, n * c, *hs.shape[3:])[:, :t]
    return hs, final


def _trailing(mask, like):
    """A `[B, T]` (or longer leading) mask reshaped to broadcast against `like` `[B, T, ...]`."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def segment_steps(a, b, segment_ids, resets, *, log_a=False):
    """(a, b) for packed documents `segment_ids` `[B, T]`: a = 0 (log a = -inf) at `resets` `[B, T]`
    (the document starts after token 0, `segments.reset_mask`), the identity step a = 1 (log a = 0),
    b = 0 at padding (id 0)."""
    reset, padding = _trailing(resets, a), _trailing(segment_ids == 0, a)
    a = jnp.where(reset, -jnp.inf if log_a else 0.0, a)
    return jnp.where(padding, 0.0 if log_a else 1.0, a), jnp.where(padding, 0.0, b)


def isolate_steps(a, b, isolated, *, log_a=False):
    """(a, b) with the steps where `isolated` (a bool mask over a leading part of a's shape, from
    `[B, T]`) is True replaced by the identity step a = 1 (log a = 0), b = 0."""
    mask = _trailing(isolated, a)
    return jnp.where(mask, 0.0 if log_a else 1.0, a), jnp.where(mask, 0.0, b)


def read_isolated(hs, a, b, h0, isolated, *, log_a=False):
    """The carried states `hs` `[B, T, ...]` of the identity-stepped recurrence, with each isolated
    step t replaced by what it reads: a_t * h_{t-1} + b_t, h_{t-1} the carried state before it."""
    mask = _trailing(isolated, a)
    before = jnp.concatenate([h0[:, None], hs[:, :-1]], axis=1)
    return jnp.where(mask, _as_decay(a, log_a) * before + b, hs)


def linear_recurrence(a, b, *, initial_state=None, log_a=False, isolated=None, segment_ids=None, impl="chunk",
                      chunk_size=64, context_axis=None):
    """h_t = a_t * h_{t-1} + b_t over axis 1; returns (h `[B, T, ...]` float32, h_{T-1} `[B, ...]`).

    `isolated` (bool, `[B, T]` or any leading part of a's shape from `[B, T]`): those steps read and
    do not write: h_t = a_t * h_{t-1} + b_t is returned at t, but h_{t-1} is passed on to t + 1
    (and to the final state). Every impl runs the recurrence with identity steps there (a = 1, b = 0)
    and then forms the isolated reads from the carried states (`read_isolated`).
    `segment_ids` (int, `[B, T]`): packed documents; h restarts at each document's first token after
    token 0 and padding steps pass h on unchanged (`segment_steps`; h at padding is that carried h).
    `context_axis`: context parallelism (inside `jax.shard_map`, T this shard's slice, any impl): the
    shard runs from zero, `context.entering_states` folds the shards' (prod a, final) pairs into the
    state h_in entering it, and h_t += (a_1 ... a_t) h_in; the final state is the whole row's."""
    op = "linear_recurrence"
    choice = resolve_impl(impl, op, SUPPORTED)
    if a.shape != b.shape:
        raise ValueError(f"{op}: a and b must have the same shape [B, T, ...], got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"{op}: a, b must be [B, T, ...], got rank {a.ndim}")
    check_time(op, a.shape[1], a=a, b=b)
    check_chunk_size(chunk_size, op)
    a, b = to_f32(a), to_f32(b)
    h0 = _initial_state(initial_state, (b.shape[0],) + b.shape[2:])
    if isolated is not None:
        isolated = jnp.asarray(isolated)
        lead = a.shape[:max(isolated.ndim, 2)]
        check_isolated(op, isolated, lead, layout="[B, T] (or a leading part of a's shape)")
    segment_ids = check_segment_ids(op, segment_ids, a.shape[:2])
    carried = (a, b) if isolated is None else isolate_steps(a, b, isolated, log_a=log_a)
    if segment_ids is not None:
        # Isolate first: an isolated document start must still pass the reset state (a = 0, b = 0) on.
        resets = segments.reset_mask(segment_ids) if context_axis is None else context.shard_resets(
            segment_ids, context_axis)
        a, b = segment_steps(a, b, segment_ids, resets, log_a=log_a)
        carried = segment_steps(*carried, segment_ids, resets, log_a=log_a)
    if context_axis is None:
        hs, final = _run(choice, *carried, h0, log_a, chunk_size)
    else:
        hs, final, h0 = _run_context_parallel(choice, *carried, h0, log_a, chunk_size, context_axis)
    if isolated is None:
        return hs, final
    return read_isolated(hs, a, b, h0, isolated, log_a=log_a), final


def _initial_state(initial_state, state_shape):
    if initial_state is None:
        return jnp.zeros(state_shape, jnp.float32)
    if tuple(initial_state.shape) != state_shape:
        raise ValueError(f"linear_recurrence: initial_state must have shape [B, ...] = {state_shape}, "
                         f"got {tuple(initial_state.shape)}")
    return to_f32(initial_state)


def _run_context_parallel(choice, a, b, h0, log_a, chunk_size, axis):
    """(h, the row's final state, the state entering this shard) for this shard's steps."""
    hs, local_final = _run(choice, a, b, context.varying(jnp.zeros_like(h0), axis), log_a, chunk_size)
    decay_from_start = jnp.exp(jnp.cumsum(a, axis=1)) if log_a else jnp.cumprod(a, axis=1)
    # A trailing axis of 1 makes the elementwise states the [.., K, V] of `entering_states` with a
    # diagonal transition.
    entering, final = context.entering_states(decay_from_start[:, -1], local_final[..., None], h0[..., None], axis)
    entering = entering[..., 0]
    return hs + decay_from_start * entering[:, None], final[..., 0], entering


def _run(choice, a, b, h0, log_a, chunk_size):
    if choice is Impl.REFERENCE:
        return linear_recurrence_reference(a, b, h0, log_a=log_a)
    if choice is Impl.SCAN:
        return linear_recurrence_scan(a, b, h0, log_a=log_a)
    return linear_recurrence_chunk(a, b, h0, log_a=log_a, chunk_size=chunk_size)
