r"""Fenwick-tree log-linear attention (Guo et al. 2025, "Log-Linear Attention") over the gated family.

Per value head, q already multiplied by `scale`, positions t, s absolute (counted from the first token
a `FenwickState` ever saw):

    o_t = sum_{s <= t} lambda_t^{l(t, s)} (q_t . k_s) M_{t,s} v_s,
    l(t, s) = 0 if s = t else bit_length(t XOR s)                 (the Fenwick level, `fenwick_level`)

M_{t,s} is the transition of `gated.py` from step s to step t: the decay of Mamba-2 / GLA (beta=None,
g `[B,T,HV]` or `[B,T,HV,K]`), or the gated delta rule (g `[B,T,HV]`) / KDA (g `[B,T,HV,K]`) with
beta. Level l >= 1 of query t is the aligned block of 2^(l-1) positions that is the left sibling of
t's own block; lambda_t `[B, T, HV, L]` mixes the O(log t) buckets (all ones: the plain recurrence).
Sequences of T tokens from position P need L >= bit_length(P + T - 1) + 1 = ceil(log2(P + T)) + 1.

Token recurrence (impl "reference" and `log_linear_attention_step`): one K x V state per level.
At token t: if t > 0, levels 0..z merge into z + 1 (z = trailing ones of t - 1, z + 1 = l(t, t - 1));
every level takes the transition of step t; the token is written at level 0;
o_t = sum_l lambda_t^l (S^(l))^T q_t. At most ceil(log2(t + 1)) + 1 levels are non-empty. A state
that has consumed P tokens holds, at level l, what query t >= P reads at level max(l, l(t, max(P-1, 0))).

impl "scan": per level l >= 1 a segmented linear recurrence s_t = M_t s_{t-1} + X_t over K x K
transitions M_t and writes X_t, restarted (M_t = 0) at every aligned block of 2^l positions and fed
only by the block's left half (jax.lax.associative_scan over (M, X) pairs, vmapped over levels,
O(T log T K^3) per level: an independent check, not a fast path); level 0 is the token's own write.

impl "chunk" (`log_linear_chunk.py`; C a power of two, chunks aligned to absolute positions;
docs/chunked_algorithms.md):
* in-chunk sources: the transfer matrix Tril(Aqk) Tm (delta) or Tril(Aqk), multiplied elementwise by
  lambda_i^{l(i, m)} of the offsets, applied to V;
* earlier chunks: a stack of inter-chunk levels l = log2(C) + 1 + i. One lax.scan over chunks carries
  it through each chunk without writes (S -> A_c S, A_c = Diag(Gam_C) - (K exp(G_C - G))^T W) and then
  merges slots 0..z plus the chunk's own writes into slot z (z = trailing ones of the chunk index);
  the state entering a chunk is read as (Q Gam - Tril(Aqk) W) S, weighted by lambda^{log2(C) + 1 + i}.
  Cost O(T C (K + V) + T log(T / C) K V): O(T log T).
* isolated tokens (`isolated` `[B, T]`): positions like any other (levels merge as usual) whose
  transition and write reach only their own read: identity steps of the chunk terms
  (`gated.chunk_terms`), of the segmented scans (`_segmented`) and of the token recurrence;
* an initial state at any position P: the sequence is placed at offset P mod C inside its first chunk
  (a dynamic offset when P is traced, costing one more chunk); the first chunk reads the incoming
  levels token by token at level max(l, l(t, P - 1)), and after it they join the stack.
* the chunk form runs block by block of chunks (`log_linear_chunk`), each block under
  `jax.checkpoint`: the backward keeps the inputs and the stack entering each block and recomputes
  the rest of the block there; `precision` sets its matmul precision and `safe_gate` (per-channel g)
  the matmul form of the in-chunk diagonal blocks, as in `gated.gated_op`.

Packed documents (`segment_ids` `[B, T]`, docs/conventions.md): the levels restart with each document
and a token's level pattern follows its position within its document (`fenwick.token_positions`; the
document holding token 0 continues the initial state and its position); padding tokens neither step
nor merge the levels. The reference zeroes the levels before each document's first token after token 0
and keeps them at padding; the scan restarts every level (and the incoming levels' transition) there.
The chunk form, whose chunks align with the Fenwick blocks of absolute positions, runs the reference
instead, with a warning.

Context parallelism (`context_axis`, any impl): the Fenwick state entering each shard is a fold over
the shards of (transition, own final levels) pairs, each step a transition, a merge of the levels
below the shard's merge level and the shard's own levels; each shard then runs the impl from that
state (`log_linear_context.py`, which derives it and counts the bytes sent).
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops import context, gated, log_linear_context, segments
from hybrid_jax.ops._common import (
    Impl,
    check_chunk_size,
    check_gate,
    check_isolated,
    check_rank,
    check_segment_ids,
    check_shape,
    prepare_qkv,
    resolve_impl,
    to_f32,
)
from hybrid_jax.ops.fenwick import carried_levels, fenwick_level, merge_down, num_levels, one_hot, token_positions
from hybrid_jax.ops.log_linear_chunk import concrete_int, log_linear_chunk
from pallas_kernels.chunk_math import resolve_precision

__all__ = ["SUPPORTED", "FenwickState", "empty_fenwick_state", "fenwick_level", "log_linear_attention",
           "log_linear_attention_masked", "log_linear_attention_step", "num_levels"]

SUPPORTED = (Impl.REFERENCE, Impl.SCAN, Impl.CHUNK)


class FenwickState(NamedTuple):
    """Decoding state: one K x V state per Fenwick level and the number of tokens consumed."""

    levels: jax.Array  # [B, HV, L, K, V] float32
    position: jax.Array  # int32 scalar


def empty_fenwick_state(batch, value_heads, levels, key_dim, value_dim) -> FenwickState:
    return FenwickState(jnp.zeros((batch, value_heads, levels, key_dim, value_dim), jnp.float32),
                        jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- token recurrence


# Every level takes the token's transition; only level 0 receives its value.
_levels_step = jax.vmap(gated.recurrence_step, in_axes=(None, None, 2, None, None, 2), out_axes=2)


def _step(q_t, k_t, v_t, g_t, beta_t, lam_t, levels, position, iso_t=None):
    """One token at `position` (a scalar, or one per row `[B]`); an isolated one (iso_t `[B, HV]`)
    reads the stepped levels and carries the merged levels on without its transition or write (the
    merge depends on the position only)."""
    target = jnp.where(position > 0, fenwick_level(position, position - 1), 0)
    levels = merge_down(levels, target)
    values = jnp.zeros(levels.shape[:3] + v_t.shape[-1:], v_t.dtype).at[:, :, 0].set(v_t)
    reads, stepped = _levels_step(q_t, k_t, values, g_t, beta_t, levels)
    if iso_t is not None:
        stepped = jnp.where(iso_t[:, :, None, None, None], levels, stepped)
    return jnp.einsum("bhl,bhlv->bhv", lam_t, reads), stepped


def _reference(q, k, v, g, beta, lam, levels, position, iso=None, segment_ids=None):
    """The token recurrence; with `segment_ids` the levels restart from zero at each document's first
    token after token 0, positions count within documents (`token_positions`) and padding tokens
    leave the levels as they are (no merge either)."""
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731
    times = token_positions(position, q.shape[0], q.shape[1], segment_ids)
    resets, padding = (None, None) if segment_ids is None else (segments.reset_mask(segment_ids), segment_ids == 0)

    def body(levels, inputs):
        time_t, q_t, k_t, v_t, g_t, beta_t, lam_t, iso_t, reset_t, padding_t = inputs
        per_row = lambda mask: mask[:, None, None, None, None]  # noqa: E731
        if reset_t is not None:
            levels = jnp.where(per_row(reset_t), 0.0, levels)
        o_t, stepped = _step(q_t, k_t, v_t, g_t, beta_t, lam_t, levels, time_t, iso_t)
        return (stepped if padding_t is None else jnp.where(per_row(padding_t), levels, stepped)), o_t

    inputs = tuple(map(time_major, (times, q, k, v, g, beta, lam, iso, resets, padding)))
    levels, o = jax.lax.scan(body, levels, inputs)
    return jnp.moveaxis(o, 0, 1), levels


# ----------------------------------------------------------------------------- associative scan


def _pair_scan(m, x):
    """(m_t ... m_0, s_t) for s_t = m_t s_{t-1} + x_t, s_{-1} = 0, along axis 1 (an m_t = 0 restarts)."""

    def combine(left, right):
        m1, x1 = left
        m2, x2 = right
        return m2 @ m1, m2 @ x1 + x2

    return jax.lax.associative_scan(combine, (m, x), axis=1)


def _segmented(m, x, write, restart, iso):
    """One level's segmented recurrence s_t = m_t s_{t-1} + x_t, restarted where `restart` [B, T] and
    fed only where `write` [B, T]: ((transition from the segment start, state) as read at each t,
    the same as carried past t). They differ at isolated t (`iso` `[B, T, H]`), which reads one step
    from the carried pair before it and carries that pair on (the identity, or 0 at a restart)."""
    as_time = lambda flags: flags[:, :, None, None, None]  # noqa: E731  [B, T] against [B, T, H, K, .]
    m_r, x_r = jnp.where(as_time(restart), 0.0, m), jnp.where(as_time(write), x, 0.0)
    if iso is None:
        pair = _pair_scan(m_r, x_r)
        return pair, pair
    mask = iso[..., None, None]
    eye = jnp.where(as_time(restart), 0.0, jnp.eye(m.shape[-1]))
    p_c, s_c = _pair_scan(jnp.where(mask, eye, m_r), jnp.where(mask, 0.0, x_r))
    p_before = jnp.concatenate([jnp.broadcast_to(jnp.eye(m.shape[-1]), p_c[:, :1].shape), p_c[:, :-1]], 1)
    s_before = jnp.concatenate([jnp.zeros_like(s_c[:, :1]), s_c[:, :-1]], 1)
    read = (jnp.where(mask, m_r @ p_before, p_c), jnp.where(mask, m_r @ s_before + x_r, s_c))
    return read, (p_c, s_c)


def _scan(q, k, v, g, beta, lam, levels, position, iso=None, segment_ids=None):
    """The associative-scan form (module docstring); with `segment_ids` each token's blocks follow its
    position within its document (`token_positions`), every level and the incoming levels restart at
    each document's first token after token 0, padding tokens restart nothing, and the final levels
    are those after the row's last real token."""
    b, t, h, kd = q.shape
    vd, n_levels = v.shape[-1], lam.shape[-1]
    times = token_positions(position, b, t, segment_ids)  # [B, T]
    # One step from the state [I | 0] with value [0 | v_t] gives [M_t | X_t] (transition | write).
    start = jnp.concatenate([jnp.eye(kd), jnp.zeros((kd, vd))], -1)
    values = jnp.concatenate([jnp.zeros(k.shape[:-1] + (kd,)), v], -1)
    over_time = jax.vmap(gated.recurrence_step, out_axes=1,
                         in_axes=(1, 1, 1, 1, None if beta is None else 1, None))
    _, mx = over_time(q, k, values, g, beta, jnp.broadcast_to(start, (b, h) + start.shape))
    m, x = mx[..., :kd], mx[..., kd:]
    # Level l >= 1 (rows 0 .. L-2): restart at each aligned block of 2^l positions, take the writes of
    # its left half, read in its right half. A last row without writes, restarted only where a document
    # starts, gives the transition from the incoming state to every token.
    half = jnp.left_shift(1, jnp.arange(n_levels - 1))[:, None, None]
    real = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
    resets = jnp.zeros((b, t), bool) if segment_ids is None else segments.reset_mask(segment_ids)
    in_left = jnp.concatenate([(times & half) == 0, jnp.zeros((1, b, t), bool)])
    restart = jnp.concatenate([((times & (2 * half - 1)) == 0) & real, resets[None]])
    reads, carries = jax.vmap(lambda write, restart: _segmented(m, x, write, restart, iso))(in_left, restart)

    def assemble(pair, own):
        """(every level's state `[B, T, H, L, K, V]`, the incoming levels carried to each token)."""
        from_start, states = pair
        # A query in the left half of its block finds its block-mates at lower levels.
        states = jnp.where(in_left[:-1, :, :, None, None, None], 0.0, states[:-1])
        per_level = jnp.moveaxis(jnp.concatenate([own[None], states]), 0, 3)
        return per_level, jnp.einsum("bthij,bhljv->bthliv", from_start[-1], levels)

    per_level, carried = assemble(reads, x)
    read_level = carried_levels(times, position, n_levels)  # [B, T, L]
    lam_carried = jnp.take_along_axis(lam, read_level[:, :, None], axis=-1)
    o = (jnp.einsum("bthk,bthl,bthlkv->bthv", q, lam, per_level)
         + jnp.einsum("bthk,bthl,bthlkv->bthv", q, lam_carried, carried))
    if iso is not None:  # the state passed on skips every isolated token's transition and write
        per_level, carried = assemble(carries, jnp.where(iso[..., None, None], 0.0, x))
    last = _last_real(segment_ids, t)
    at_last = lambda x: x[jnp.arange(b), jnp.maximum(last, 0)]  # noqa: E731
    final = at_last(per_level) + jnp.einsum("blm,bhlkv->bhmkv", one_hot(at_last(read_level), n_levels),
                                            at_last(carried))
    return o, jnp.where((last >= 0)[:, None, None, None, None], final, levels)


def _last_real(segment_ids, t):
    """`[B]` int32: the index of each row's last real (non-padding) token, -1 for a row of padding."""
    if segment_ids is None:
        return jnp.full((1,), t - 1, jnp.int32)
    return jnp.max(jnp.where(segment_ids != 0, jnp.arange(t, dtype=jnp.int32), -1), axis=1)


# ----------------------------------------------------------------------------- public API


def _check_chunk(op, chunk_size):
    check_chunk_size(chunk_size, op, 1, 1024)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"{op}: chunk_size must be a power of two (chunks align with Fenwick blocks), "
                         f"got {chunk_size}")


def _check_levels(op, name, lam, lead, layout):
    check_rank(f"{op}: {name}", lam, len(lead) + 1, layout)
    if tuple(lam.shape[:-1]) != tuple(lead):
        raise ValueError(f"{op}: {name} must have shape {layout} with leading dims {tuple(lead)}, "
                         f"got {tuple(lam.shape)}")
    return lam.shape[-1]


def _check_enough_levels(op, name, n, first, count):
    """Levels for absolute positions first .. first + count - 1 (first unknown under jit: from 0)."""
    end = (0 if first is None else first) + count
    if n < num_levels(end):
        span = f"positions {0 if first is None else first}..{end - 1}"
        raise ValueError(f"{op}: {name} has L={n} levels but {span} need L >= {num_levels(end)} "
                         f"(ceil(log2({end})) + 1)")


def _check_state(op, name, state, shape):
    if not isinstance(state, FenwickState):
        raise ValueError(f"{op}: {name} must be a FenwickState(levels, position), got {type(state).__name__}")
    check_shape(f"{op}: {name}.levels", state.levels, shape, "[B, HV, L, K, V]")
    if jnp.ndim(state.position) != 0:
        raise ValueError(f"{op}: {name}.position must be a scalar, got shape {jnp.shape(state.position)}")
    return state.levels.astype(jnp.float32), state.position


def log_linear_attention(q, k, v, *, g, level_scales, beta=None, scale=None, initial_state=None,
                         output_final_state=False, isolated=None, segment_ids=None, impl="chunk", chunk_size=64,
                         safe_gate=False, lower_bound=-5.0, precision=None, context_axis=None):
    """Log-linear attention over the gated (beta=None) or gated-delta / KDA (beta `[B, T, HV]`) transition.

    q, k `[B, T, H, K]`, v `[B, T, HV, V]`, g `[B, T, HV]` or `[B, T, HV, K]`, level_scales
    `[B, T, HV, L]` (lambda of each query), initial_state a `FenwickState` (its position P may be
    traced). L >= ceil(log2(P + T)) + 1 is checked when P is concrete (under jit: L >= ceil(log2 T) + 1).
    isolated `[B, T]` bool: those tokens read (their own transition and write at level 0 included) and
    do not write; they still count as positions, so the Fenwick levels of all others are unchanged.
    segment_ids `[B, T]` int: packed documents (docs/conventions.md): the levels restart from zero at
    each document's first token after token 0 and their pattern follows the position within the
    document (the document holding token 0 continues initial_state and its position); padding tokens
    (id 0) leave the levels alone; the final state is the last document's, at one position per row
    (`[B]`: its length, plus P for the document holding token 0). impl="chunk" with segment_ids runs
    impl="reference" with a warning: its chunks align with the absolute positions' Fenwick blocks.
    impl "reference" | "scan" | "chunk" (chunk_size a power of two). safe_gate / lower_bound /
    precision as in `gated.gated_op`. `context_axis`: context parallelism (inside `jax.shard_map`, T
    this shard's slice, any impl; `log_linear_context.py`): this shard's outputs and the whole row's
    final state, the same on every shard. Returns (o in v's dtype, the final `FenwickState` or None).
    """
    op = "log_linear_attention"
    q32, k32, v32, dims = prepare_qkv(op, q, k, v, scale=scale)
    b, t, _, kd, hv, vd = dims
    choice = resolve_impl(impl, op, SUPPORTED)
    _check_chunk(op, chunk_size)
    g = check_gate(op, g, dims, per_channel=None)
    g = gated.check_safe_gate(op, safe_gate, lower_bound, g, None)
    precision = resolve_precision(precision, op)
    check_shape(f"{op}: beta", beta, (b, t, hv), "[B, T, HV]")
    n = _check_levels(op, "level_scales", level_scales, (b, t, hv), "[B, T, HV, L]")
    if initial_state is None:
        levels, position = jnp.zeros((b, hv, n, kd, vd), jnp.float32), 0
    else:
        levels, position = _check_state(op, "initial_state", initial_state, (b, hv, n, kd, vd))
    shards = 1 if context_axis is None else context.shard_count(context_axis)
    _check_enough_levels(op, "level_scales", n, concrete_int(position), t * shards)
    iso = gated.per_head(check_isolated(op, isolated, (b, t)), hv)
    segment_ids = check_segment_ids(op, segment_ids, (b, t))
    k32, v32, g, beta = gated.segment_inputs(k32, v32, to_f32(g), to_f32(beta), segment_ids, context_axis)
    args = (q32, k32, v32, g, beta, to_f32(level_scales), levels, position, iso)
    choice = _packed_impl(op, choice, segment_ids)
    # Shards start at P + i T_local: P's offset in its chunk is every shard's (T_local % chunk == 0).
    alignment = concrete_int(position)
    run = functools.partial(_run, choice, chunk_size=chunk_size, safe_gate=safe_gate, precision=precision,
                            alignment=alignment)
    if context_axis is None:
        o, final = run(args, segment_ids)
        final_position = _final_position(position, t, segment_ids)
    else:
        log_linear_context.check_shard_length(op, t, chunk_size, choice is Impl.CHUNK)
        o, final, final_position = log_linear_context.context_parallel(
            run, args, segment_ids, axis=context_axis, chunk_size=chunk_size, precision=precision)
    state = FenwickState(final, final_position) if output_final_state else None
    return o.astype(v.dtype), state


def _packed_impl(op, choice, segment_ids):
    """The impl that runs: the reference instead of the chunked form with segment ids (a warning)."""
    if choice is Impl.CHUNK and segment_ids is not None:
        warnings.warn(f"{op}: impl='chunk' with segment_ids falls back to impl='reference' (exact, one token "
                      "at a time): the chunked form aligns its chunks with the Fenwick blocks of absolute "
                      "positions, and packed documents restart the levels at each document's first token",
                      stacklevel=3)
        return Impl.REFERENCE
    return choice


def _run(choice, args, segment_ids, *, chunk_size, safe_gate, precision, alignment):
    """(o, final levels) of one impl on one device."""
    if choice is Impl.REFERENCE:
        return _reference(*args, segment_ids)
    if choice is Impl.SCAN:
        return _scan(*args, segment_ids)
    return log_linear_chunk(*args, chunk_size=chunk_size, safe_gate=safe_gate, precision=precision,
                            alignment=alignment)


def _final_position(position, t, segment_ids):
    """The position of the final state: P + T, or with segment ids one per row `[B]`: after the row's
    last real token within its document (P for a row of padding)."""
    position = jnp.asarray(position, jnp.int32)
    if segment_ids is None:
        return position + t
    last = _last_real(segment_ids, t)
    times = token_positions(position, segment_ids.shape[0], t, segment_ids)
    after_last = jnp.take_along_axis(times, jnp.maximum(last, 0)[:, None], axis=1)[:, 0] + 1
    return jnp.where(last >= 0, after_last, position)


def log_linear_attention_step(q_t, k_t, v_t, state, *, g_t, level_scales_t, beta_t=None, scale=None,
                              isolated_t=None):
    """One decoding token: q_t, k_t `[B, H, K]`, v_t `[B, HV, V]`, g_t `[B, HV]` or `[B, HV, K]`,
    level_scales_t `[B, HV, L]`, beta_t `[B, HV]` or None, isolated_t `[B]` bool or None (the position
    advances, the levels are only merged). Returns (o_t in v_t's dtype, new FenwickState)."""
    op = "log_linear_attention_step"
    q32, k32, v32, dims = prepare_qkv(op, q_t, k_t, v_t, scale=scale, step=True)
    b, _, _, kd, hv, vd = dims
    g_t = check_gate(op, g_t[:, None], dims, per_channel=None)[:, 0]
    check_shape(f"{op}: beta_t", beta_t, (b, hv), "[B, HV]")
    n = _check_levels(op, "level_scales_t", level_scales_t, (b, hv), "[B, HV, L]")
    levels, position = _check_state(op, "state", state, (b, hv, n, kd, vd))
    _check_enough_levels(op, "level_scales_t", n, concrete_int(position), 1)
    position = jnp.asarray(position, jnp.int32)
    iso_t = gated.per_head(check_isolated(op, isolated_t, (b,), name="isolated_t", layout="[B]"), hv)
    o_t, levels = _step(q32, k32, v32, to_f32(g_t), to_f32(beta_t), to_f32(level_scales_t), levels, position,
                        iso_t)
    return o_t.astype(v_t.dtype), FenwickState(levels, position + 1)


def log_linear_attention_masked(q, k, v, *, g, level_scales, scale=None):
    """The Mamba-2 variant (beta=None, scalar g `[B, T, HV]`) materialised from position 0:
    o = ((Q K^T) * D * Lambda) V with D[t, s] = exp(G_t - G_s) (s <= t) and Lambda[t, s] = lambda_t^{l(t, s)}.
    O(T^2): an independent check of the recurrences. Returns o in v's dtype."""
    op = "log_linear_attention_masked"
    q, k, v32, dims = prepare_qkv(op, q, k, v, scale=scale)
    b, t, _, _, hv, _ = dims
    g = check_gate(op, g, dims, per_channel=False)[..., 0]
    _check_enough_levels(op, "level_scales", _check_levels(op, "level_scales", level_scales, (b, t, hv),
                                                            "[B, T, HV, L]"), 0, t)
    cum = jnp.moveaxis(jnp.cumsum(to_f32(g), axis=1), 1, 2)  # [B, HV, T]
    causal = jnp.tril(jnp.ones((t, t), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    times = jnp.arange(t)
    lam = jnp.take_along_axis(jnp.moveaxis(to_f32(level_scales), 1, 2),
                              fenwick_level(times[:, None], times[None, :])[None, None], axis=-1)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * decay * lam
    return jnp.einsum("bhts,bshv->bthv", scores, v32).astype(v.dtype)
