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

impl "chunk" (C a power of two, chunks aligned to absolute positions; MATH.md):
* in-chunk sources: the transfer matrix Tril(Aqk) Tm (delta) or Tril(Aqk), multiplied elementwise by
  lambda_i^{l(i, m)} of the offsets, applied to V;
* earlier chunks: a stack of inter-chunk levels l = log2(C) + 1 + i. One lax.scan over chunks carries
  it through each chunk without writes (S -> A_c S, A_c = Diag(Gam_C) - (K exp(G_C - G))^T W) and then
  merges slots 0..z plus the chunk's own writes into slot z (z = trailing ones of the chunk index);
  the state entering a chunk is read as (Q Gam - Tril(Aqk) W) S, weighted by lambda^{log2(C) + 1 + i}.
  Cost O(T C (K + V) + T log(T / C) K V): O(T log T).
* an initial state at any position P: the sequence is placed at offset P mod C inside its first chunk
  (a dynamic offset when P is traced, costing one more chunk); the first chunk reads the incoming
  levels token by token at level max(l, l(t, P - 1)), and after it they join the stack.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops import gated
from hybrid_jax.ops._common import (
    Impl,
    check_chunk_size,
    check_qkv,
    check_rank,
    check_shape,
    default_scale,
    repeat_heads,
    resolve_impl,
)

SUPPORTED = (Impl.REFERENCE, Impl.SCAN, Impl.CHUNK)


def fenwick_level(t, s):
    """0 if s == t else bit_length(t XOR s); Python ints give an int, arrays an int32 array (broadcast)."""
    if isinstance(t, int) and isinstance(s, int):
        return (t ^ s).bit_length()
    x = jnp.bitwise_xor(jnp.asarray(t, jnp.int32), jnp.asarray(s, jnp.int32))
    return 32 - jax.lax.clz(x)


def num_levels(length: int) -> int:
    """Levels L that positions 0 .. length - 1 need: ceil(log2(length)) + 1."""
    return max(length - 1, 0).bit_length() + 1


class FenwickState(NamedTuple):
    """Decoding state: one K x V state per Fenwick level and the number of tokens consumed."""

    levels: jax.Array  # [B, HV, L, K, V] float32
    position: jax.Array  # int32 scalar


def empty_fenwick_state(batch, value_heads, levels, key_dim, value_dim) -> FenwickState:
    return FenwickState(jnp.zeros((batch, value_heads, levels, key_dim, value_dim), jnp.float32),
                        jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- token recurrence


def _merge_down(stack, target, extra=None):
    """Sums slots 0..target of `stack` `[B, H, n, K, V]` (and `extra` `[B, H, K, V]`) into slot `target`."""
    slot = jnp.arange(stack.shape[2])[:, None, None]
    below = slot < target
    moved = jnp.sum(jnp.where(below, stack, 0.0), axis=2)
    if extra is not None:
        moved = moved + extra
    return jnp.where(below, 0.0, stack) + jnp.where(slot == target, moved[:, :, None], 0.0)


# Every level takes the token's transition; only level 0 receives its value.
_levels_step = jax.vmap(gated.recurrence_step, in_axes=(None, None, 2, None, None, 2), out_axes=2)


def _step(q_t, k_t, v_t, g_t, beta_t, lam_t, levels, position):
    target = jnp.where(position > 0, fenwick_level(position, position - 1), 0)
    levels = _merge_down(levels, target)
    values = jnp.zeros(levels.shape[:3] + v_t.shape[-1:], v_t.dtype).at[:, :, 0].set(v_t)
    reads, levels = _levels_step(q_t, k_t, values, g_t, beta_t, levels)
    return jnp.einsum("bhl,bhlv->bhv", lam_t, reads), levels


def _reference(q, k, v, g, beta, lam, levels, position):
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731

    def body(levels, inputs):
        j, q_t, k_t, v_t, g_t, beta_t, lam_t = inputs
        o_t, levels = _step(q_t, k_t, v_t, g_t, beta_t, lam_t, levels, position + j)
        return levels, o_t

    steps = jnp.arange(q.shape[1], dtype=jnp.int32)
    levels, o = jax.lax.scan(body, levels, (steps,) + tuple(map(time_major, (q, k, v, g, beta, lam))))
    return jnp.moveaxis(o, 0, 1), levels


def _carried_levels(times, position, n_levels):
    """`[.., L]`: the level at which query `times` reads level l of a state after `position` tokens."""
    since = fenwick_level(times, jnp.maximum(position - 1, 0))
    return jnp.maximum(jnp.arange(n_levels), since[..., None])


def _one_hot(index, n):
    return (index[..., None] == jnp.arange(n)).astype(jnp.float32)


# ----------------------------------------------------------------------------- associative scan


def _pair_scan(m, x):
    """(m_t ... m_0, s_t) for s_t = m_t s_{t-1} + x_t, s_{-1} = 0, along axis 1 (an m_t = 0 restarts)."""

    def combine(left, right):
        m1, x1 = left
        m2, x2 = right
        return m2 @ m1, m2 @ x1 + x2

    return jax.lax.associative_scan(combine, (m, x), axis=1)


def _scan(q, k, v, g, beta, lam, levels, position):
    b, t, h, kd = q.shape
    vd, n_levels = v.shape[-1], lam.shape[-1]
    times = position + jnp.arange(t, dtype=jnp.int32)
    # One step from the state [I | 0] with value [0 | v_t] gives [M_t | X_t] (transition | write).
    start = jnp.concatenate([jnp.eye(kd), jnp.zeros((kd, vd))], -1)
    values = jnp.concatenate([jnp.zeros(k.shape[:-1] + (kd,)), v], -1)
    over_time = jax.vmap(gated.recurrence_step, out_axes=1,
                         in_axes=(1, 1, 1, 1, None if beta is None else 1, None))
    _, mx = over_time(q, k, values, g, beta, jnp.broadcast_to(start, (b, h) + start.shape))
    m, x = mx[..., :kd], mx[..., kd:]
    # Level l >= 1 (rows 0 .. L-2): restart at each aligned block of 2^l positions, take the writes of
    # its left half, read in its right half. A last row without writes or restarts gives the
    # transition from the incoming state to every token.
    half = jnp.left_shift(1, jnp.arange(n_levels - 1))[:, None]
    in_left = jnp.concatenate([(times & half) == 0, jnp.zeros((1, t), bool)])
    restart = jnp.concatenate([(times & (2 * half - 1)) == 0, jnp.zeros((1, t), bool)])
    as_time = lambda flags: flags[None, :, None, None, None]  # noqa: E731  [T] against [B, T, H, K, .]
    segmented = lambda write, restart: _pair_scan(jnp.where(as_time(restart), 0.0, m),  # noqa: E731
                                                  jnp.where(as_time(write), x, 0.0))
    from_start, states = jax.vmap(segmented)(in_left, restart)
    # A query in the left half of its block finds its block-mates at lower levels.
    states = jnp.where(in_left[:-1, None, :, None, None, None], 0.0, states[:-1])
    per_level = jnp.moveaxis(jnp.concatenate([x[None], states]), 0, 3)  # [B, T, H, L, K, V]
    carried = jnp.einsum("bthij,bhljv->bthliv", from_start[-1], levels)  # incoming levels at each token
    read_level = _carried_levels(times, position, n_levels)  # [T, L]
    lam_carried = jnp.take_along_axis(lam, read_level[None, :, None], axis=-1)
    o = (jnp.einsum("bthk,bthl,bthlkv->bthv", q, lam, per_level)
         + jnp.einsum("bthk,bthl,bthlkv->bthv", q, lam_carried, carried))
    final = per_level[:, -1] + jnp.einsum("lm,bhlkv->bhmkv", _one_hot(read_level[-1], n_levels),
                                          carried[:, -1])
    return o, final


# ----------------------------------------------------------------------------- chunked form


def _concrete_int(x):
    return None if isinstance(x, jax.core.Tracer) else int(x)


def _place(x, offset, length):
    """Puts `x` `[B, T, ...]` at `offset` of a zero (identity-step) buffer of `length` positions."""
    if isinstance(offset, int):
        return jnp.pad(x, [(0, 0), (offset, length - offset - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    buffer = jnp.zeros((x.shape[0], length) + x.shape[2:], x.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buffer, x, offset, axis=1)


def _window(x, offset, length):
    if isinstance(offset, int):
        return x[:, offset:offset + length]
    return jax.lax.dynamic_slice_in_dim(x, offset, length, axis=1)


def _to_chunks(x, c):
    """`[B, N * C, H, ...]` -> `[B, H, N, C, ...]`, the layout of `gated.ChunkTerms`."""
    b, nc, h = x.shape[:3]
    return jnp.moveaxis(x.reshape((b, nc // c, c, h) + x.shape[3:]), 3, 1)


def _advance(transition, states):
    """Carries states through a chunk: `transition` a K x K matrix or a `[.., K or 1, 1]` diagonal decay."""
    return transition * states if transition.shape[-1] == 1 else transition @ states


class _ChunkOperators(NamedTuple):
    terms: gated.ChunkTerms  # [B, H, N, C, ...]
    tm: jax.Array | None  # Tm (delta only)                                  [.., C, C]
    transfer: jax.Array  # in-chunk value -> output: Tril(Aqk) Tm or Tril(Aqk) [.., C, C]
    read: jax.Array  # entering state -> outputs: Q Gam - Tril(Aqk) W         [.., C, K]
    transition: jax.Array  # state through the chunk, no writes: A_c or Diag(Gam_C) [.., K, K or 1]
    own: jax.Array  # the chunk's own writes at its end                       [.., K, V]


def _chunk_operators(q, k, v, g, beta, c) -> _ChunkOperators:
    """Per-chunk linear maps from gated.py's machinery: `[B, N * C, H, ...]` inputs, chunks of c."""
    b, nc, h, kd = k.shape
    vd, n = v.shape[-1], nc // c
    if beta is None:
        terms, tm = gated.chunk_terms(q, k, v, g, None, c), None
    else:  # values [V | I_C] in every chunk make the terms carry Tm itself: u_bar = [Tm V | Tm]
        eye = jnp.broadcast_to(jnp.tile(jnp.eye(c), (n, 1))[None, :, None], (b, nc, h, c))
        terms = gated.chunk_terms(q, k, jnp.concatenate([v, eye], -1), g, beta, c)
        tm = terms.u_bar[..., vd:]
        terms = terms._replace(u_bar=terms.u_bar[..., :vd])
    transfer = terms.attn if tm is None else terms.attn @ tm
    read = gated.chunk_outputs(terms, jnp.eye(kd), u_bar=jnp.zeros((c, kd)))  # the output of S = I
    # Every chunk on its own (the chunk axis becomes a batch axis): through it from [I | 0] with [0 | Ubar].
    alone = jax.tree.map(lambda x: x[:, :, None], terms)
    if tm is None:
        _, own = gated.propagate(alone, jnp.zeros((b, h, n, kd, vd)))
        return _ChunkOperators(terms, tm, transfer, read, terms.chunk_decay[..., None], own)
    start = jnp.concatenate([jnp.broadcast_to(jnp.eye(kd), (b, h, n, kd, kd)),
                             jnp.zeros((b, h, n, kd, vd))], -1)
    u_bar = jnp.concatenate([jnp.zeros(terms.u_bar.shape[:-1] + (kd,)), terms.u_bar], -1)
    _, end = gated.propagate(alone, start, u_bar=u_bar[:, :, None])
    return _ChunkOperators(terms, tm, transfer, read, end[..., :kd], end[..., kd:])


def _chunk(q, k, v, g, beta, lam, levels_in, position, *, chunk_size):
    b, t, h, kd = q.shape
    n_levels = lam.shape[-1]
    c = min(chunk_size, 1 << (t - 1).bit_length())  # a short sequence is one chunk
    log_c = c.bit_length() - 1  # the highest level between two positions of one chunk
    n_inter = n_levels - log_c - 1
    known = _concrete_int(position)
    offset = position % c if known is None else known % c
    n_chunks = -(-(t + c - 1) // c) if known is None else -(-(offset + t) // c)
    position = jnp.asarray(position, jnp.int32)
    first_chunk = position // c
    q, k, v, g, lam = (_place(x, offset, n_chunks * c) for x in (q, k, v, g, lam))
    ops = _chunk_operators(q, k, v, g, None if beta is None else _place(beta, offset, n_chunks * c), c)
    values, lam = _to_chunks(v, c), _to_chunks(lam, c)  # lam: [B, H, N, C, L]

    offsets = jnp.arange(c)
    in_chunk = fenwick_level(offsets[:, None], offsets[None, :])
    o = (ops.transfer * jnp.take_along_axis(lam, in_chunk[None, None, None], axis=-1)) @ values

    # Incoming levels: read token by token in the first chunk, then placed in the stack.
    first_times = first_chunk * c + offsets
    lam_in = jnp.take_along_axis(lam[:, :, 0], _carried_levels(first_times, position, n_levels)[None, None],
                                 axis=-1)
    o = o.at[:, :, 0].add(jnp.einsum("bhcl,bhck,bhlkv->bhcv", lam_in, ops.read[:, :, 0], levels_in))
    after_first = _carried_levels(first_times[-1], position, n_levels) - log_c - 1
    stack = jnp.einsum("li,bhlkv->bhikv", _one_hot(jnp.maximum(after_first, 0), n_inter), levels_in)

    # Earlier chunks: the stack of inter-chunk levels log_c + 1 + i, one scan over chunks.
    chunk_ids = jnp.arange(n_chunks)
    absolute = first_chunk + chunk_ids
    merge_slot = fenwick_level(absolute + 1, absolute) - 1  # where chunk c's sources sit from chunk c + 1

    def body(stack, inputs):
        transition_c, own_c, slot = inputs
        return _merge_down(_advance(transition_c, stack), slot, own_c), stack

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731
    _, entering = jax.lax.scan(body, stack, (chunk_major(ops.transition)[:, :, :, None],
                                             chunk_major(ops.own), merge_slot))
    entering = jnp.moveaxis(entering, 0, 2)  # [B, H, N, n_inter, K, V]
    entering = jnp.where(chunk_ids[:, None, None, None] == 0, 0.0, entering)  # chunk 0 read them above
    # Weight the read-out rows per level first: one [C, n K] x [n K, V] matmul per chunk.
    weighted_read = jnp.einsum("bhncl,bhnck->bhnclk", lam[..., log_c + 1:], ops.read)
    o = o + jnp.einsum("bhnclk,bhnlkv->bhncv", weighted_read, entering)
    o = _window(gated.unchunk(o, n_chunks * c), offset, t)

    # Final state: the last real chunk's own writes by in-chunk level, the stack carried through it,
    # and the incoming levels if that chunk is also the first.
    last, last_offset = (offset + t - 1) // c, (offset + t - 1) % c
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, last, axis=2, keepdims=False)  # noqa: E731
    to_end = jnp.swapaxes(pick(ops.terms.k_to_end), -1, -2)
    to_end = to_end if ops.tm is None else to_end @ pick(ops.tm)  # [B, H, K, C]: v_m -> state at chunk end
    by_level = _one_hot(fenwick_level(last_offset, offsets), log_c + 1)
    own_levels = jnp.einsum("bhkc,cl,bhcv->bhlkv", to_end, by_level, pick(values))
    final = jnp.concatenate([own_levels, _advance(pick(ops.transition)[:, :, None], pick(entering))], axis=2)
    move = _one_hot(_carried_levels(position + t - 1, position, n_levels), n_levels) * (last == 0)
    final = final + jnp.einsum("lm,bhlkv->bhmkv", move,
                               _advance(ops.transition[:, :, 0][:, :, None], levels_in))
    return o, final


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
                         output_final_state=False, impl="chunk", chunk_size=64):
    """Log-linear attention over the gated (beta=None) or gated-delta / KDA (beta `[B, T, HV]`) transition.

    q, k `[B, T, H, K]`, v `[B, T, HV, V]`, g `[B, T, HV]` or `[B, T, HV, K]`, level_scales
    `[B, T, HV, L]` (lambda of each query), initial_state a `FenwickState` (its position P may be
    traced). L >= ceil(log2(P + T)) + 1 is checked when P is concrete (under jit: L >= ceil(log2 T) + 1).
    impl "reference" | "scan" | "chunk" (chunk_size a power of two). Returns (o in v's dtype, the
    final `FenwickState` or None).
    """
    op = "log_linear_attention"
    b, t, h, kd, hv, vd = check_qkv(q, k, v, op)
    choice = resolve_impl(impl, op, SUPPORTED)
    _check_chunk(op, chunk_size)
    if t == 0:
        raise ValueError(f"{op}: the sequence must have at least one token (T >= 1)")
    g = gated.check_gate(op, g, b, t, hv, kd, per_channel=None)
    check_shape(f"{op}: beta", beta, (b, t, hv), "[B, T, HV]")
    n = _check_levels(op, "level_scales", level_scales, (b, t, hv), "[B, T, HV, L]")
    if initial_state is None:
        levels, position = jnp.zeros((b, hv, n, kd, vd), jnp.float32), 0
    else:
        levels, position = _check_state(op, "initial_state", initial_state, (b, hv, n, kd, vd))
    _check_enough_levels(op, "level_scales", n, _concrete_int(position), t)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    q = repeat_heads(f32(q) * default_scale(scale, kd), hv)
    args = (q, repeat_heads(f32(k), hv), f32(v), f32(g), f32(beta), f32(level_scales), levels, position)
    if choice is Impl.REFERENCE:
        o, final = _reference(*args)
    elif choice is Impl.SCAN:
        o, final = _scan(*args)
    else:
        o, final = _chunk(*args, chunk_size=chunk_size)
    state = FenwickState(final, jnp.asarray(position, jnp.int32) + t) if output_final_state else None
    return o.astype(v.dtype), state


def log_linear_attention_step(q_t, k_t, v_t, state, *, g_t, level_scales_t, beta_t=None, scale=None):
    """One decoding token: q_t, k_t `[B, H, K]`, v_t `[B, HV, V]`, g_t `[B, HV]` or `[B, HV, K]`,
    level_scales_t `[B, HV, L]`, beta_t `[B, HV]` or None. Returns (o_t in v's dtype, new FenwickState)."""
    op = "log_linear_attention_step"
    b, _, h, kd, hv, vd = check_qkv(q_t[:, None], k_t[:, None], v_t[:, None], op)
    g_t = gated.check_gate(op, g_t[:, None], b, 1, hv, kd, per_channel=None)[:, 0]
    check_shape(f"{op}: beta_t", beta_t, (b, hv), "[B, HV]")
    n = _check_levels(op, "level_scales_t", level_scales_t, (b, hv), "[B, HV, L]")
    levels, position = _check_state(op, "state", state, (b, hv, n, kd, vd))
    _check_enough_levels(op, "level_scales_t", n, _concrete_int(position), 1)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    q_t = repeat_heads(f32(q_t) * default_scale(scale, kd), hv, axis=1)
    o_t, levels = _step(q_t, repeat_heads(f32(k_t), hv, axis=1), f32(v_t), f32(g_t), f32(beta_t),
                        f32(level_scales_t), levels, jnp.asarray(position, jnp.int32))
    return o_t.astype(v_t.dtype), FenwickState(levels, jnp.asarray(position, jnp.int32) + 1)


def log_linear_attention_masked(q, k, v, *, g, level_scales, scale=None):
    """The Mamba-2 variant (beta=None, scalar g `[B, T, HV]`) materialised from position 0:
    o = ((Q K^T) * D * Lambda) V with D[t, s] = exp(G_t - G_s) (s <= t) and Lambda[t, s] = lambda_t^{l(t, s)}.
    O(T^2): an independent check of the recurrences."""
    op = "log_linear_attention_masked"
    b, t, h, kd, hv, vd = check_qkv(q, k, v, op)
    g = gated.check_gate(op, g, b, t, hv, kd, per_channel=False)[..., 0]
    _check_enough_levels(op, "level_scales", _check_levels(op, "level_scales", level_scales, (b, t, hv),
                                                            "[B, T, HV, L]"), 0, t)
    q = repeat_heads(q.astype(jnp.float32) * default_scale(scale, kd), hv)
    k = repeat_heads(k.astype(jnp.float32), hv)
    cum = jnp.moveaxis(jnp.cumsum(g.astype(jnp.float32), axis=1), 1, 2)  # [B, HV, T]
    causal = jnp.tril(jnp.ones((t, t), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    times = jnp.arange(t)
    lam = jnp.take_along_axis(jnp.moveaxis(level_scales.astype(jnp.float32), 1, 2),
                              fenwick_level(times[:, None], times[None, :])[None, None], axis=-1)
    scores = jnp.einsum("bthk,bshk->bhts", q, k) * decay * lam
    return jnp.einsum("bhts,bshv->bthv", scores, v.astype(jnp.float32)).astype(v.dtype)
