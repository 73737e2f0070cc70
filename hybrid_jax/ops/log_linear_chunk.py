r"""The chunked form of Fenwick-tree log-linear attention (impl "chunk" of `log_linear.py`).

Per value head, q already scaled, positions absolute; chunks of C positions (a power of two) aligned
to absolute positions, so the level between positions in different chunks is
log2(C) + bit_length(c_t XOR c_s) (c the chunk index) and inside a chunk the level of the offsets.
With the per-chunk terms of the gated machinery (`gated.py`; G the in-chunk cumulative log decay,
Gam = exp(G), Tm the WY transform of the delta rule), `_chunk` runs these steps:

1. `_layout`: where the T tokens sit in whole chunks (the initial state's position P puts the
   sequence at offset P mod C inside its first chunk; a traced P costs one more chunk).
2. `_chunk_operators`: per chunk, the linear maps from in-chunk values to outputs
   (Tril(Aqk) Tm, or Tril(Aqk) without the delta rule), from the entering state to outputs
   (Q Gam - Tril(Aqk) W), through the chunk without writes (A_c = Diag(Gam_C) - (K exp(G_C - G))^T W),
   and the chunk's own writes at its end.
3. `_in_chunk_outputs`: in-chunk sources, the transfer weighted elementwise by lambda_i^{l(i, m)}.
4. `_read_incoming`: the incoming levels, read token by token in the first chunk at level
   max(l, l(t, P - 1)), then placed in the stack of inter-chunk levels log2(C) + 1 + i.
5. `_carry_stack`: one lax.scan over chunks carries the stack through each chunk (S -> A_c S) and
   merges slots 0..z plus the chunk's own writes into slot z (z = trailing ones of the chunk index).
6. `_stack_outputs`: each chunk reads the stack entering it, weighted by lambda^{log2(C) + 1 + i}.
7. `_final_levels`: the last real chunk's own writes by in-chunk level, the stack carried through
   it, and the incoming levels if that chunk is also the first.

Cost O(T C (K + V) + T log(T / C) K V): O(T log T). Derivations: docs/chunked_algorithms.md.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops import gated
from hybrid_jax.ops.fenwick import carried_levels, fenwick_level, merge_down, one_hot
from pallas_kernels.chunk_math import ChunkTerms, chunk_outputs, chunk_values, from_chunks, to_chunks
from pallas_kernels.recurrence import state_pass


def concrete_int(x):
    """`x` as a Python int, or None when it is traced (a position known only at run time)."""
    return None if isinstance(x, jax.core.Tracer) else int(x)


class _Layout(NamedTuple):
    chunk: int  # C, a power of two
    log_chunk: int  # log2(C): the highest level between two positions of one chunk
    offset: int | jax.Array  # where the first token sits in its chunk: P mod C
    n_chunks: int
    first_chunk: jax.Array  # absolute index of the first chunk, P // C


def _layout(t, chunk_size, position, alignment=None) -> _Layout:
    """`alignment`: a static int congruent to `position` modulo the chunk (known when `position` is
    traced, as under context parallelism), which keeps the offset static."""
    c = min(chunk_size, 1 << (t - 1).bit_length())  # a short sequence is one chunk
    known = concrete_int(position) if alignment is None else alignment
    offset = position % c if known is None else known % c
    n_chunks = -(-(t + c - 1) // c) if known is None else -(-(offset + t) // c)
    return _Layout(c, c.bit_length() - 1, offset, n_chunks, jnp.asarray(position, jnp.int32) // c)


def _place(x, offset, length):
    """Puts `x` `[B, T, ...]` at `offset` of a zero (identity-step) buffer of `length` positions."""
    if isinstance(offset, int):
        return jnp.pad(x, [(0, 0), (offset, length - offset - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    buffer = jnp.zeros_like(x, shape=(x.shape[0], length) + x.shape[2:])
    return jax.lax.dynamic_update_slice_in_dim(buffer, x, offset, axis=1)


def _window(x, offset, length):
    if isinstance(offset, int):
        return x[:, offset:offset + length]
    return jax.lax.dynamic_slice_in_dim(x, offset, length, axis=1)


def _advance(transition, states):
    """Carries states through a chunk: `transition` a K x K matrix or a `[.., K or 1, 1]` diagonal decay."""
    return transition * states if transition.shape[-1] == 1 else transition @ states


class _ChunkOperators(NamedTuple):
    terms: ChunkTerms  # [B, H, N, C, ...]
    tm: jax.Array | None  # Tm (delta only)                                  [.., C, C]
    transfer: jax.Array  # in-chunk value -> output: Tril(Aqk) Tm or Tril(Aqk) [.., C, C]
    read: jax.Array  # entering state -> outputs: Q Gam - Tril(Aqk) W         [.., C, K]
    transition: jax.Array  # state through the chunk, no writes: A_c or Diag(Gam_C) [.., K, K or 1]
    own: jax.Array  # the chunk's own writes at its end                       [.., K, V]


def _chunk_operators(q, k, v, g, beta, c, iso=None, **options) -> _ChunkOperators:
    """Per-chunk linear maps from gated.py's machinery: `[B, N * C, H, ...]` inputs, chunks of c.
    Isolated tokens (`iso`, `chunk_math.isolate`) are identity steps of every map but their own row of
    `transfer` and `read`. `options`: safe_gate and precision of `gated.chunk_terms`."""
    b, nc, h, kd = k.shape
    vd, n = v.shape[-1], nc // c
    if beta is None:
        terms, tm = gated.chunk_terms(q, k, v, g, None, c, iso, **options), None
    else:  # values [V | I_C] in every chunk make the terms carry Tm itself: u_bar = [Tm V | Tm]
        eye = jnp.broadcast_to(jnp.tile(jnp.eye(c), (n, 1))[None, :, None], (b, nc, h, c))
        terms = gated.chunk_terms(q, k, jnp.concatenate([v, eye], -1), g, beta, c, iso, **options)
        tm = terms.u_bar[..., vd:]
        terms = terms._replace(u_bar=terms.u_bar[..., :vd])
    transfer = terms.attn if tm is None else terms.attn @ tm
    identity = jnp.eye(kd)  # the output of S = I with no in-chunk values: Q Gam - Tril(Aqk) W
    read = chunk_outputs(terms, identity, chunk_values(terms, identity, u_bar=jnp.zeros((c, kd))))
    # Every chunk on its own (the chunk axis becomes a batch axis): through it from [I | 0] with [0 | Ubar].
    alone = jax.tree.map(lambda x: x[:, :, :, None], terms)
    if tm is None:
        # zeros_like: the carry is typed like the inputs (per shard under context parallelism)
        _, own = state_pass(alone, jnp.zeros_like(v, shape=(b, h, n, kd, vd)))
        return _ChunkOperators(terms, tm, transfer, read, terms.chunk_decay[..., None], own)
    start = jnp.concatenate([jnp.broadcast_to(jnp.eye(kd), (b, h, n, kd, kd)),
                             jnp.zeros((b, h, n, kd, vd))], -1) + jnp.zeros_like(v, shape=())
    u_bar = jnp.concatenate([jnp.zeros(terms.u_bar.shape[:-1] + (kd,)), terms.u_bar], -1)
    _, end = state_pass(alone, start, u_bar=u_bar[:, :, :, None])
    return _ChunkOperators(terms, tm, transfer, read, end[..., :kd], end[..., kd:])


def _in_chunk_outputs(ops: _ChunkOperators, lam, values):
    """`[B, H, N, C, V]`: what each query reads from the sources of its own chunk."""
    offsets = jnp.arange(values.shape[-2])
    in_chunk = fenwick_level(offsets[:, None], offsets[None, :])
    return (ops.transfer * jnp.take_along_axis(lam, in_chunk[None, None, None], axis=-1)) @ values


def _read_incoming(ops: _ChunkOperators, lam, levels_in, layout: _Layout, position):
    """(what the first chunk reads from the incoming levels `[B, H, C, V]`, the stack of inter-chunk
    levels they form after it `[B, H, n_inter, K, V]`)."""
    c, log_c, n_levels = layout.chunk, layout.log_chunk, lam.shape[-1]
    first_times = layout.first_chunk * c + jnp.arange(c)
    lam_in = jnp.take_along_axis(lam[:, :, 0], carried_levels(first_times, position, n_levels)[None, None],
                                 axis=-1)
    read = jnp.einsum("bhcl,bhck,bhlkv->bhcv", lam_in, ops.read[:, :, 0], levels_in)
    after_first = carried_levels(first_times[-1], position, n_levels) - log_c - 1
    stack = jnp.einsum("li,bhlkv->bhikv", one_hot(jnp.maximum(after_first, 0), n_levels - log_c - 1),
                       levels_in)
    return read, stack


def _carry_stack(ops: _ChunkOperators, stack, layout: _Layout):
    """The stack of inter-chunk levels entering each chunk, `[B, H, N, n_inter, K, V]` (zeros for the
    first chunk, which read the incoming levels token by token)."""
    chunk_ids = jnp.arange(layout.n_chunks)
    absolute = layout.first_chunk + chunk_ids
    merge_slot = fenwick_level(absolute + 1, absolute) - 1  # where chunk c's sources sit from chunk c + 1

    def body(stack, inputs):
        transition_c, own_c, slot = inputs
        return merge_down(_advance(transition_c, stack), slot, own_c), stack

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731
    _, entering = jax.lax.scan(body, stack, (chunk_major(ops.transition)[:, :, :, None],
                                             chunk_major(ops.own), merge_slot))
    entering = jnp.moveaxis(entering, 0, 2)
    return jnp.where(chunk_ids[:, None, None, None] == 0, 0.0, entering)


def _stack_outputs(ops: _ChunkOperators, lam, entering, log_c):
    """`[B, H, N, C, V]`: what each query reads from the stack entering its chunk."""
    # Weight the read-out rows per level first: one [C, n K] x [n K, V] matmul per chunk.
    weighted_read = jnp.einsum("bhncl,bhnck->bhnclk", lam[..., log_c + 1:], ops.read)
    return jnp.einsum("bhnclk,bhnlkv->bhncv", weighted_read, entering)


def _final_levels(ops: _ChunkOperators, values, entering, levels_in, layout: _Layout, position, t):
    """The levels after the last token, `[B, H, L, K, V]`."""
    c, log_c, n_levels = layout.chunk, layout.log_chunk, levels_in.shape[2]
    last, last_offset = (layout.offset + t - 1) // c, (layout.offset + t - 1) % c
    pick = lambda x: jax.lax.dynamic_index_in_dim(x, last, axis=2, keepdims=False)  # noqa: E731
    to_end = jnp.swapaxes(pick(ops.terms.k_to_end), -1, -2)
    to_end = to_end if ops.tm is None else to_end @ pick(ops.tm)  # [B, H, K, C]: v_m -> state at chunk end
    by_level = one_hot(fenwick_level(last_offset, jnp.arange(c)), log_c + 1)
    own_levels = jnp.einsum("bhkc,cl,bhcv->bhlkv", to_end, by_level, pick(values))
    final = jnp.concatenate([own_levels, _advance(pick(ops.transition)[:, :, None], pick(entering))], axis=2)
    move = one_hot(carried_levels(position + t - 1, position, n_levels), n_levels) * (last == 0)
    return final + jnp.einsum("lm,bhlkv->bhmkv", move,
                              _advance(ops.transition[:, :, 0][:, :, None], levels_in))


def log_linear_chunk(q, k, v, g, beta, lam, levels_in, position, iso=None, *, chunk_size, safe_gate=False,
                     precision="highest", alignment=None):
    """The chunked form on float32 inputs `[B, T, HV, .]` (q scaled, heads expanded), incoming levels
    `[B, HV, L, K, V]` at `position` (an int or a traced int32), isolated tokens `iso` `[B, T, HV]`
    bool or None. Returns (o `[B, T, HV, V]`, levels). The backward saves only the inputs and
    recomputes the rest (`jax.checkpoint`): the chunk operators and the carried stack are O(T C + T K V)
    and would otherwise stay alive from the forward to the backward. `alignment`: see `_layout`."""
    run = functools.partial(_log_linear_chunk, chunk_size=chunk_size, safe_gate=safe_gate, precision=precision,
                            alignment=alignment)
    # A static position fixes the layout (no dynamic offset): keep it static under the checkpoint.
    static = (7,) if isinstance(position, int) else ()
    return jax.checkpoint(run, static_argnums=static)(q, k, v, g, beta, lam, levels_in, position, iso)


def _log_linear_chunk(q, k, v, g, beta, lam, levels_in, position, iso, *, chunk_size, safe_gate, precision,
                      alignment):
    t = q.shape[1]
    layout = _layout(t, chunk_size, position, alignment)
    position = jnp.asarray(position, jnp.int32)
    length = layout.n_chunks * layout.chunk
    q, k, v, g, lam = (_place(x, layout.offset, length) for x in (q, k, v, g, lam))
    beta, iso = (None if x is None else _place(x, layout.offset, length) for x in (beta, iso))
    ops = _chunk_operators(q, k, v, g, beta, layout.chunk, iso, safe_gate=safe_gate, precision=precision)
    values, lam = to_chunks(v, layout.chunk), to_chunks(lam, layout.chunk)  # lam: [B, H, N, C, L]

    o = _in_chunk_outputs(ops, lam, values)
    first_read, stack = _read_incoming(ops, lam, levels_in, layout, position)
    o = o.at[:, :, 0].add(first_read)
    entering = _carry_stack(ops, stack, layout)
    o = o + _stack_outputs(ops, lam, entering, layout.log_chunk)
    o = _window(from_chunks(o, length), layout.offset, t)
    return o, _final_levels(ops, values, entering, levels_in, layout, position, t)
