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
5. `_carry_stack`: a lax.scan over chunks carries the stack through each chunk (S -> A_c S) and
   merges slots 0..z plus the chunk's own writes into slot z (z = trailing ones of the chunk index).
6. `_stack_outputs`: each chunk reads the stack entering it, weighted by lambda^{log2(C) + 1 + i}.
7. `_final_levels`: the last real chunk's own writes by in-chunk level, the stack carried through
   it, and the incoming levels if that chunk is also the first.

Steps 2, 3, 5 and 6 run block by block (`log_linear_chunk`): whole-sequence arrays of the stacks
entering every chunk and of the weighted read-outs (`[.., n_inter, K, V]` and `[.., C, n_inter, K]` per
chunk, 961 MiB of temporaries at T = 16K, H = 4, K = V = 64) made the form memory-bound.

Cost O(T C (K + V) + T log(T / C) K V): O(T log T). Derivations: docs/chunked_algorithms.md.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops import gated
from hybrid_jax.ops.fenwick import carried_levels, fenwick_level, merge_down, one_hot
from pallas_kernels.chunk_math import ChunkTerms, chunk_outputs, chunk_values, from_chunks, matmul, to_chunks
from pallas_kernels import recurrence
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


def _carry_stack(ops: _ChunkOperators, stack, picked, chunk_ids, layout: _Layout, last):
    """Carries the stack of inter-chunk levels `[B, H, n_inter, K, V]` through chunks `chunk_ids` (their
    operators `ops`); returns ((the stack after them, `picked`: the stack entering chunk `last` once
    passed, else as given), the stack entering each chunk `[B, H, n, n_inter, K, V]`); the stack
    entering chunk 0 reads as zeros, since that chunk reads the incoming levels token by token."""
    merge_slot = fenwick_level(layout.first_chunk + chunk_ids + 1, layout.first_chunk + chunk_ids) - 1

    def body(carry, inputs):
        stack, picked = carry
        transition_c, own_c, slot, chunk_id = inputs
        entering = jnp.where(chunk_id == 0, 0.0, stack)
        picked = jnp.where(chunk_id == last, entering, picked)
        return (merge_down(_advance(transition_c, stack), slot, own_c), picked), entering

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731
    carry, entering = jax.lax.scan(body, (stack, picked), (chunk_major(ops.transition)[:, :, :, None],
                                                           chunk_major(ops.own), merge_slot, chunk_ids))
    return carry, jnp.moveaxis(entering, 0, 2)


def _stack_outputs(ops: _ChunkOperators, lam, entering, log_c, precision):
    """`[B, H, N, C, V]`: what each query reads from the stack entering its chunk."""
    return _weighted_read(lam[..., log_c + 1:], ops.read, entering, precision)


def _flat_stack(entering):
    return entering.reshape(entering.shape[:-3] + (-1, entering.shape[-1]))  # [.., n K, V]


def _weighted_rows(lam, read):
    return (lam[..., :, None] * read[..., None, :]).reshape(lam.shape[:-1] + (-1,))  # [.., C, n K]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_read(lam, read, entering, precision):
    """sum_l lam[.., i, l] read_i^T S_l for lam `[.., C, n]`, read `[.., C, K]`, the stack `[.., n, K, V]`:
    the read-out rows weighted per level first, then one `[C, n K] x [n K, V]` matmul."""
    return matmul(_weighted_rows(lam, read), _flat_stack(entering), precision)


def _weighted_read_fwd(lam, read, entering, precision):
    return _weighted_read(lam, read, entering, precision), (lam, read, entering)


def _weighted_read_bwd(precision, residuals, d_o):
    # Both matmuls with the operand that is contracted on its rows stored transposed first (a small
    # copy): autodiff's einsum gave the stack's cotangent as [V, n K] and transposed it elementwise,
    # and a matmul contracting the rows of [C, n K] in place ran at half the speed (XLA:CPU).
    lam, read, entering = residuals
    d_rows = matmul(d_o, jnp.swapaxes(_flat_stack(entering), -1, -2), precision).reshape(lam.shape + read.shape[-1:])
    rows_t = jax.lax.optimization_barrier(jnp.swapaxes(_weighted_rows(lam, read), -1, -2))
    d_entering = matmul(rows_t, d_o, precision).reshape(entering.shape)
    return jnp.sum(d_rows * read[..., None, :], axis=-1), jnp.sum(d_rows * lam[..., None], axis=-2), d_entering


_weighted_read.defvjp(_weighted_read_fwd, _weighted_read_bwd)


def _final_levels(first: _ChunkOperators, last_ops: _ChunkOperators, last_values, entering_last, levels_in,
                  layout: _Layout, position, t):
    """The levels after the last token, `[B, H, L, K, V]`, from the operators of the first and the last
    real chunk (`[B, H, 1, ...]`), the last chunk's values `[B, H, 1, C, V]` and the stack entering it."""
    c, log_c, n_levels = layout.chunk, layout.log_chunk, levels_in.shape[2]
    last, last_offset = (layout.offset + t - 1) // c, (layout.offset + t - 1) % c
    to_end = jnp.swapaxes(last_ops.terms.k_to_end[:, :, 0], -1, -2)
    to_end = to_end if last_ops.tm is None else to_end @ last_ops.tm[:, :, 0]  # [B, H, K, C]: v_m -> chunk end
    by_level = one_hot(fenwick_level(last_offset, jnp.arange(c)), log_c + 1)
    own_levels = jnp.einsum("bhkc,cl,bhcv->bhlkv", to_end, by_level, last_values[:, :, 0])
    final = jnp.concatenate([own_levels, _advance(last_ops.transition[:, :, 0][:, :, None], entering_last)], axis=2)
    move = one_hot(carried_levels(position + t - 1, position, n_levels), n_levels) * (last == 0)
    return final + jnp.einsum("lm,bhlkv->bhmkv", move,
                              _advance(first.transition[:, :, 0][:, :, None], levels_in))


def chunks_per_block(n_chunks: int, chunk: int, k_dim: int, v_dim: int, n_inter: int, lead: int) -> int:
    """Chunks per block of the blocked pass, so that one block's operators, stack and read-out take about
    `recurrence.BLOCK_BYTES` (per chunk and head: ~4 C x C maps, n_inter stacked K x V states and
    C x n_inter x K weighted reads, and ~8 `[C, K or V]` slabs; `lead` = batch x heads). Measured on
    CPU only: on an accelerator a loop over small blocks would launch each block's kernels one after
    another, so there the whole sequence is one block, the form before blocking."""
    if jax.default_backend() != "cpu":
        return n_chunks
    floats = 4 * chunk * chunk + n_inter * (chunk * k_dim + k_dim * v_dim) + 8 * chunk * max(k_dim, v_dim)
    return max(1, min(n_chunks, recurrence.BLOCK_BYTES // (4 * floats * max(lead, 1))))


def log_linear_chunk(q, k, v, g, beta, lam, levels_in, position, iso=None, *, chunk_size, safe_gate=False,
                     precision="highest", alignment=None):
    """The chunked form on float32 inputs `[B, T, HV, .]` (q scaled, heads expanded), incoming levels
    `[B, HV, L, K, V]` at `position` (an int or a traced int32), isolated tokens `iso` `[B, T, HV]`
    bool or None. Returns (o `[B, T, HV, V]`, levels). `alignment`: see `_layout`.

    Blocked: a lax.scan over blocks of chunks (`chunks_per_block`) forms each block's operators, its
    in-chunk outputs, carries the stack through it and reads the stack, all under `jax.checkpoint`, so
    the operators, the stacks entering every chunk (`[.., n_inter, K, V]` per chunk) and the weighted
    read-outs exist one block at a time, in cache, and the backward keeps only the inputs and the stack
    entering each block. The first chunk's read of the incoming levels and the final levels use the
    first and last chunks' operators, formed once more on their own."""
    t = q.shape[1]
    layout = _layout(t, chunk_size, position, alignment)
    position = jnp.asarray(position, jnp.int32)
    c, log_c, n_levels = layout.chunk, layout.log_chunk, lam.shape[-1]
    b, _, h, kd = k.shape
    per_block = chunks_per_block(layout.n_chunks, c, kd, v.shape[-1], n_levels - log_c - 1, b * h)
    n_blocks = -(-layout.n_chunks // per_block)
    length = n_blocks * per_block * c
    inputs = tuple(None if x is None else _place(x, layout.offset, length) for x in (q, k, v, g, beta, lam, iso))
    operators = functools.partial(_chunk_operators, safe_gate=safe_gate, precision=precision)

    def chunk_at(index):  # the inputs of one chunk and its operators
        one = tuple(None if x is None else jax.lax.dynamic_slice_in_dim(x, index * c, c, axis=1) for x in inputs)
        qc, kc, vc, gc, betac, lamc, isoc = one
        return operators(qc, kc, vc, gc, betac, c, isoc), to_chunks(vc, c), to_chunks(lamc, c)

    first, first_values, first_lam = chunk_at(0)
    first_read, stack = _read_incoming(first, first_lam, levels_in, layout, position)
    last = (layout.offset + t - 1) // c

    @jax.checkpoint
    def block(carry, xs):
        index, (qb, kb, vb, gb, betab, lamb, isob) = xs
        ops = operators(qb, kb, vb, gb, betab, c, isob)
        values, lamb = to_chunks(vb, c), to_chunks(lamb, c)  # lam: [B, H, n, C, L]
        o = _in_chunk_outputs(ops, lamb, values)
        carry, entering = _carry_stack(ops, *carry, index * per_block + jnp.arange(per_block), layout, last)
        o = o + _stack_outputs(ops, lamb, entering, log_c, precision)
        return carry, from_chunks(o, per_block * c, heads_first=True)

    blocks = jax.tree.map(lambda x: recurrence.to_blocks(x, 1, per_block * c), inputs)
    (_, entering_last), o = jax.lax.scan(block, (stack, jnp.zeros_like(stack)), (jnp.arange(n_blocks), blocks))
    o = jnp.moveaxis(o, 0, 1).reshape((b, length) + o.shape[3:])
    o = o.at[:, :c].add(jnp.swapaxes(first_read, 1, 2))
    # One chunk (a short sequence, a prompt's tail): the last chunk is the first, already formed.
    last_ops, last_values = (first, first_values) if layout.n_chunks == 1 else chunk_at(last)[:2]
    return _window(o, layout.offset, t), _final_levels(first, last_ops, last_values, entering_last, levels_in,
                                                       layout, position, t)
