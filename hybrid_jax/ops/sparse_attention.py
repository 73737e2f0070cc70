r"""Block-sparse causal attention: each query attends to its top-k key blocks plus its own block.

The selected-block attention of MoBA (Lu et al. 2025, "Mixture of Block Attention") and of the
selected branch of NSA (Yuan et al. 2025, "Native Sparse Attention"). Keys are cut into blocks of
`block_size` = Bs positions, block c holding keys c Bs .. c Bs + Bs - 1. With q `[B, T, H, K]`,
k `[B, T, HKV, K]`, v `[B, T, HKV, V]` and query head h reading key/value head n = h // (H / HKV):

    kbar_{c,n}   = mean_{j in block c} k_{j,n}                                   (pooled block keys)
    score_{t,n,c} = (sum_{h in group n} q_{t,h}) . kbar_{c,n}      for the complete blocks c < c(t)
    I_{t,n}      = the top_k blocks by score_{t,n,.}  (all of them when c(t) <= top_k)
    allowed(t, j) = [j // Bs in I_{t,n}]  |  [j // Bs == c(t) and j <= t]
    o_{t,h}      = sum_j softmax_j(scale q_{t,h} . k_{j,n} | allowed(t, j)) v_{j,n}

where c(t) = t // Bs is the query's own block. Every query therefore reads at most
(top_k + 1) Bs keys. Three choices, and why:

* **Per-query selection** (as MoBA and NSA). Selecting once per query block from its pooled queries
  would let a query's block choice depend on later queries of its block: not causal.
* **Shared by a group** (NSA): the H / HKV query heads reading one key/value head sum their scores,
  so they select the same blocks and a kernel loads each selected block once per group.
* **Candidates are complete blocks before the query's own**, so a pooled key never summarises a
  key the query may not see, and the own block is always attended causally.

The selection is discrete: no gradient flows through it (as in MoBA and NSA's selected branch); q
and k learn through the attention over the selected keys.

Implementations (`impl`), both with the same selection (`select_blocks`), equal up to float32
rounding forward and backward:

* `REFERENCE`  the dense T x T float32 logits under the materialised mask `allowed`.
* `CHUNK`      the gathered-block form: a lax.scan over query blocks; each query gathers its
               top_k + 1 key blocks and attends over those (top_k + 1) Bs keys only, so compute is
               O(T (top_k + 1) Bs) and, with the step rematerialised in the backward pass, memory is
               O(T) plus one query block's gathered keys, never T x T.

Selecting costs T x T / Bs score products (the pooled keys), as in MoBA's gate.

Packed documents (`segment_ids` `[B, T]`, 0 = padding; docs/conventions.md): every document gets
the blocks it would have alone. `block_grid` counts blocks from each document's first token: block
(d, c) holds the keys s_d + c Bs .. s_d + c Bs + Bs - 1 of document d starting at s_d, and only
complete blocks enter the table of pooled keys (numbered in row order, still at most ceil(T / Bs)),
because a document's last partial block is only ever its own queries' own block. A query at
position p within its document has own block c(p) = p // Bs (keys from its block's start up to the
query) and candidates the blocks c < c(p) of its own document, so it never scores, selects or reads
another document's keys, and selection, tie-breaking by block order included, and output are those
of the document run alone. Without segment_ids the grid is the absolute one above.

Context parallelism (`context_axis`, `hybrid_jax.ops.context`): inside `jax.shard_map` with the time
axis split over n shards of T tokens (T a multiple of Bs, so the absolute blocks never straddle
shards), k, v and segment_ids are all-gathered (`gather_time`) and the grid is built over the whole
row; the local queries keep their global positions iT + t (own block, candidates, document), so the
selection and the outputs are the unsplit op's rows. Each shard sends (n - 1) T HKV (K + V) elements,
as softmax attention's gather path (the selected blocks may lie anywhere before the query).
`block_token_attention` gathers each shard's T / Bs block tokens the same way.

`block_token_attention` is NSA's compressed branch: attention over one (compressed) key/value
token per complete block before the query's own, T x T / Bs logits.

Decoding (`sparse_attention_decode.py`): the cache holds the keys, the values and the pooled keys of
the complete blocks (`pool_block_keys` from a prompt, `block_keys_update` after each token), so a step
scores S / Bs pooled keys and attends over (top_k + 1) Bs cached keys (`block_sparse_attention_step`).
q, k and v share one dtype; o comes back in it (docs/conventions.md); scores and softmax
statistics are float32.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops import segments
from hybrid_jax.ops._common import Impl, check_floating, check_grouped_heads, check_rank, check_same_dtype
from hybrid_jax.ops._common import check_segment_ids, check_shape, check_time, default_scale, pad_time
from hybrid_jax.ops._common import repeat_heads, resolve_impl
from hybrid_jax.ops.attention import masked_softmax
from hybrid_jax.ops.context import gather_time, shard_offset

SUPPORTED = (Impl.REFERENCE, Impl.CHUNK)
_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# the block grid, pooled keys and the selection (shared by every impl and the step)


class BlockGrid(NamedTuple):
    """Where the key blocks of a row lie (module docstring, "Packed documents")."""

    block_start: jax.Array  # [B, NB] int32, NB = ceil(T / Bs): each block's first key (unused slots: 0)
    first_block: jax.Array  # [B, T] int32: the first block of each token's document
    position: jax.Array  # [B, T] int32: each token's position within its document
    real: jax.Array  # [B, T] bool: not padding


def block_grid(segment_ids, *, batch: int, time: int, block_size: int) -> BlockGrid:
    """The blocks of rows of `time` tokens: absolute (block g = keys g Bs .. g Bs + Bs - 1) when
    segment_ids is None, else the complete blocks of each document of segment_ids `[B, T]`, counted
    from its first token, numbered in row order."""
    nb = -(-time // block_size)
    if segment_ids is None:
        position = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
        block_start = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32) * block_size, (batch, nb))
        return BlockGrid(block_start, jnp.zeros((batch, time), jnp.int32), position, jnp.ones((batch, time), bool))
    position, real = segments.position_in_document(segment_ids), segment_ids != 0
    ends = (real & (position % block_size == block_size - 1)).astype(jnp.int32)  # a block's last key
    ended_before = jnp.cumsum(ends, axis=1) - ends  # complete blocks ending before each token
    slot = jnp.where(ends == 1, ended_before, nb)  # out of range where no block ends: dropped
    first_key = jnp.arange(time, dtype=jnp.int32) - (block_size - 1)
    block_start = jnp.zeros((batch, nb), jnp.int32).at[jnp.arange(batch)[:, None], slot].set(
        jnp.broadcast_to(first_key, (batch, time)), mode="drop")
    first_block = jnp.take_along_axis(ended_before, segments.document_start(segment_ids), axis=1)
    return BlockGrid(block_start, first_block, position, real)


def pool_block_keys(k: jax.Array, *, block_size: int) -> jax.Array:
    """kbar `[B, ceil(T / Bs), HKV, K]` float32: the mean key of each block of k `[B, T, HKV, K]`.

    A last partial block is averaged with zeros; no query scores it before it is complete."""
    k = pad_time(k.astype(_F32), block_size, axis=1)
    b, t, n, d = k.shape
    return jnp.mean(k.reshape(b, t // block_size, block_size, n, d), axis=2)


def key_index(starts, block_size: int, length: int):
    """The positions of the block_size keys from each of `starts`: `starts.shape + (Bs,)`. Positions
    outside the `length` keys are clamped into range: callers mask them."""
    return jnp.clip(starts[..., None] + jnp.arange(block_size), 0, length - 1)


def _pool_grid_keys(k, grid: BlockGrid, block_size: int):
    """kbar `[B, NB, HKV, K]` float32: the mean key of each block of the grid (garbage in unused slots,
    which no query scores)."""
    index = key_index(grid.block_start, block_size, k.shape[1])  # [B, NB, Bs]
    keys = jnp.take_along_axis(k.astype(_F32), index.reshape(k.shape[0], -1, 1, 1), axis=1)
    return jnp.mean(keys.reshape(index.shape + k.shape[2:]), axis=2)


def top_blocks(q_sum, block_keys, first, count, *, top_k: int):
    """Blocks selected for queries `q_sum` `[B, Tq, N, K]` (summed over each group's heads) among their
    candidates first .. first + count - 1 (`[B, Tq]`): (index, valid), each `[B, Tq, N, min(top_k, NB)]`."""
    scores = jnp.einsum("btnd,bcnd->btnc", q_sum, block_keys, precision="highest")
    block = jnp.arange(block_keys.shape[1])
    candidate = (block >= first[:, :, None, None]) & (block < (first + count)[:, :, None, None])
    scores = jnp.where(candidate, scores, -jnp.inf)
    # Fewer candidates than slots: the extra slots come back -inf and are marked invalid.
    best, index = jax.lax.top_k(scores, min(top_k, block_keys.shape[1]))
    return index.astype(jnp.int32), jnp.isfinite(best)


def group_sum(q: jax.Array, kv_heads: int) -> jax.Array:
    """q `[..., H, K]` summed over the H / HKV heads of each group -> `[..., HKV, K]` float32."""
    *lead, heads, d = q.shape
    return jnp.sum(q.astype(_F32).reshape(*lead, kv_heads, heads // kv_heads, d), axis=-2)


def _to_steps(x, block_size: int):
    """`[B, T, ...]` -> `[ceil(T / Bs), B, Bs, ...]`, zero padded: the query blocks the scans visit."""
    x = pad_time(x, block_size, axis=1)
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block_size, *x.shape[2:]), 1, 0)


def _from_steps(x, time: int):
    """The inverse of `_to_steps`, padded queries dropped."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :time]


def select_blocks(q, k, grid: BlockGrid, *, block_size: int, top_k: int):
    """The blocks each query reads besides its own: their first keys and valid flags,
    `[B, T, HKV, min(top_k, NB)]`. A query's candidates are its document's complete blocks before its
    own (none for padding). Computed one query block at a time (lax.map), so the T x NB scores are
    never held at once."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    block_keys = _pool_grid_keys(k, grid, block_size)
    count = jnp.where(grid.real, grid.position // block_size, 0)
    xs = tuple(_to_steps(x, block_size) for x in (group_sum(q, k.shape[2]), grid.first_block, count))
    index, valid = jax.lax.map(lambda x: top_blocks(*x[:1], block_keys, *x[1:], top_k=top_k), xs)
    index, valid = _from_steps(index, q.shape[1]), _from_steps(valid, q.shape[1])
    starts = jnp.take_along_axis(grid.block_start, index.reshape(index.shape[0], -1), axis=1)
    return starts.reshape(index.shape), valid


def _own_block(grid: BlockGrid, block_size: int, query_start=None):
    """Each query's own block: its first key and the number of keys up to the query (0 for padding),
    for queries at key positions query_start, query_start + 1, ... (0, 1, ... when None)."""
    in_block = grid.position % block_size
    first_key = jnp.arange(grid.position.shape[1]) - in_block
    return (first_key if query_start is None else query_start + first_key), jnp.where(grid.real, in_block + 1, 0)


def _query_grid(segment_ids, *, batch: int, queries: int, keys: int, block_size: int, query_start=None):
    """`block_grid` of the `keys` positions, its per-token fields cut to the queries at query_start ..
    query_start + queries - 1 (context parallelism: this shard's), or the whole grid when None."""
    grid = block_grid(segment_ids, batch=batch, time=keys, block_size=block_size)
    if query_start is None:
        return grid
    def cut(x):
        return jax.lax.dynamic_slice_in_dim(x, query_start, queries, axis=1)
    return BlockGrid(grid.block_start, cut(grid.first_block), cut(grid.position), cut(grid.real))


def _gather_context(k, v, segment_ids, axis: str | None, *, op: str, block_size: int, queries: int):
    """(k, v, segment_ids of the whole row, the position of this shard's first of `queries` tokens)
    under context parallelism; the inputs and None without it."""
    if axis is None:
        return k, v, segment_ids, None
    t = queries
    if t % block_size:
        raise ValueError(f"{op}: with context_axis={axis!r} the shard's length {t} must be a multiple of "
                         f"block_size={block_size}, so that no block straddles two shards; use a block size "
                         f"dividing {t} or a length per shard that is a multiple of {block_size}")
    ids = None if segment_ids is None else gather_time(segment_ids, axis)
    return gather_time(k, axis), gather_time(v, axis), ids, shard_offset(t, axis)


# ---------------------------------------------------------------------------------------------
# reference


def block_sparse_attention_reference(q, k, v, *, scale: float, block_size: int, top_k: int, segment_ids=None,
                                     query_start=None):
    """Dense float32 logits under the materialised block-sparse mask: the ground truth. With a traced
    `query_start`, the queries sit at key positions query_start, ... of the keys (and segment_ids)."""
    b, t, heads = q.shape[:3]
    grid = _query_grid(segment_ids, batch=b, queries=t, keys=k.shape[1], block_size=block_size,
                       query_start=query_start)
    starts, valid = select_blocks(q, k, grid, block_size=block_size, top_k=top_k)
    own_start, own_count = (x[:, :, None] for x in _own_block(grid, block_size, query_start))
    keys = jnp.arange(k.shape[1])
    own = (keys >= own_start) & (keys < own_start + own_count)  # [B, T, T]
    # hit[b, t, n, s, j]: key j lies in the s-th selected block of query t, a valid one.
    hit = valid[..., None] & (keys >= starts[..., None]) & (keys < starts[..., None] + block_size)
    allowed = jnp.any(hit, axis=3) | own[:, :, None, :]  # [B, T, N, T]
    allowed = repeat_heads(jnp.swapaxes(allowed, 1, 2), heads, axis=1)  # [B, H, T, T]
    k32, v32 = (repeat_heads(x.astype(_F32), heads) for x in (k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(_F32), k32) * scale
    return jnp.einsum("bhqk,bkhv->bqhv", masked_softmax(logits, allowed), v32).astype(v.dtype)


# ---------------------------------------------------------------------------------------------
# gathered blocks (impl="chunk") and the decoding step share `attend_blocks`


def attend_blocks(q, k, v, starts, key_ok, scale):
    """Queries q `[B, Tq, N, G, K]` over the key blocks from `starts` `[B, Tq, N, S]` of k / v
    `[B, S_keys, N, D]`, keys allowed where key_ok `[B, Tq, N, S, Bs]`: o `[B, Tq, N, G, V]` float32.
    Gathers only the S Bs keys each query reads."""
    b, _, n, _, block_size = key_ok.shape
    index = key_index(starts, block_size, k.shape[1])  # [B, Tq, N, S, Bs]
    rows, heads = jnp.arange(b)[:, None, None, None, None], jnp.arange(n)[None, None, :, None, None]
    k_sel, v_sel = k[rows, index, heads], v[rows, index, heads]  # [B, Tq, N, S, Bs, D]
    logits = jnp.einsum("btngd,btnsjd->btngsj", q, k_sel, preferred_element_type=_F32) * scale
    flat = logits.shape[:4] + (-1,)
    allowed = jnp.broadcast_to(key_ok[:, :, :, None], logits.shape).reshape(flat)
    weights = masked_softmax(logits.reshape(flat), allowed).reshape(logits.shape)
    return jnp.einsum("btngsj,btnsjv->btngv", weights.astype(v_sel.dtype), v_sel, preferred_element_type=_F32)


def with_own_block(starts, valid, own_start, own_count, block_size):
    """Block starts `[B, Tq, N, S + 1]` = the selected blocks and the query's own block, with the
    allowed keys `[B, Tq, N, S + 1, Bs]`: every key of a valid selected block, and the first
    own_count `[B, Tq]` keys of the own block."""
    own = jnp.broadcast_to(own_start[:, :, None, None], starts.shape[:3] + (1,))
    selected = jnp.broadcast_to(valid[..., None], valid.shape + (block_size,))
    own_ok = jnp.arange(block_size) < own_count[:, :, None, None, None]
    own_ok = jnp.broadcast_to(own_ok, valid.shape[:3] + (1, block_size))
    return jnp.concatenate([starts, own], axis=-1), jnp.concatenate([selected, own_ok], axis=-2)


def block_sparse_attention_chunk(q, k, v, *, scale: float, block_size: int, top_k: int, segment_ids=None,
                                 query_start=None):
    """The gathered-block form (module docstring): a scan over query blocks, rematerialised;
    `query_start` as in `block_sparse_attention_reference`."""
    b, t, heads, dk = q.shape
    kv_heads = k.shape[2]
    grid = _query_grid(segment_ids, batch=b, queries=t, keys=k.shape[1], block_size=block_size,
                       query_start=query_start)
    starts, valid = select_blocks(q, k, grid, block_size=block_size, top_k=top_k)

    @jax.checkpoint  # the backward pass re-gathers one query block at a time instead of storing all
    def step(_, inputs):
        q_blk, *blocks = inputs
        return None, attend_blocks(q_blk, k, v, *with_own_block(*blocks, block_size), scale)

    q_grouped = q.reshape(b, t, kv_heads, heads // kv_heads, dk)
    xs = (q_grouped, starts, valid, *_own_block(grid, block_size, query_start))
    _, o = jax.lax.scan(step, None, tuple(_to_steps(x, block_size) for x in xs))
    return _from_steps(o, t).reshape(b, t, heads, v.shape[-1]).astype(v.dtype)


# ---------------------------------------------------------------------------------------------
# dispatch and validation


def check_block_options(op: str, block_size, top_k) -> None:
    for name, value in (("block_size", block_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")


def check_heads_and_dtype(op: str, heads: int, kv_heads: int, **arrays) -> None:
    for name, x in arrays.items():
        check_floating(f"{op}: {name}", x)
    check_grouped_heads(heads, kv_heads, op)
    check_same_dtype(op, **arrays)


def block_sparse_attention(q, k, v, *, block_size=64, top_k=8, scale=None, segment_ids=None, impl="chunk",
                           context_axis=None):
    """Causal block-sparse attention: q `[B, T, H, K]`, k `[B, T, HKV, K]`, v `[B, T, HKV, V]` ->
    o `[B, T, H, V]`. Each query attends to its own block (causally) and to the `top_k` earlier
    blocks of `block_size` keys whose mean key scores highest against its group's summed query.
    `segment_ids` `[B, T]` int (packed documents, 0 = padding): blocks are counted from each
    document's first token and a query reads its own document only, as if it ran alone (padding
    queries return 0). `impl` is "reference" (dense masked) or "chunk" (gathered blocks, default);
    `scale` defaults to K ** -0.5. q, k, v share one dtype; o comes back in it. `context_axis`: the
    mesh axis the time axis is split over inside `jax.shard_map` (module docstring), or None.
    """
    op = "block_sparse_attention"
    choice = resolve_impl(impl, op, SUPPORTED)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(f"{op}: {name}", x, 4, "[B, T, H, D]")
    b, t, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    check_shape(f"{op}: k", k, (b, t, kv_heads, dk), "[B, T, HKV, K] (B, T and K as in q)")
    check_shape(f"{op}: v", v, (b, t, kv_heads, dv), "[B, T, HKV, V] (B, T, HKV as in k)")
    check_time(op, t, q=q, k=k, v=v)
    check_heads_and_dtype(op, heads, kv_heads, q=q, k=k, v=v)
    check_block_options(op, block_size, top_k)
    k, v, segment_ids, query_start = _gather_context(k, v, check_segment_ids(op, segment_ids, (b, t)),
                                                     context_axis, op=op, block_size=block_size, queries=t)
    options = dict(scale=default_scale(scale, dk), block_size=block_size, top_k=top_k,
                   segment_ids=segment_ids, query_start=query_start)
    if choice is Impl.REFERENCE:
        return block_sparse_attention_reference(q, k, v, **options)
    return block_sparse_attention_chunk(q, k, v, **options)


# ---------------------------------------------------------------------------------------------
# one token per complete block (NSA's compressed branch)


def block_token_attention(q, k_tokens, v_tokens, *, positions, block_size, segment_ids=None, scale=None,
                          context_axis=None):
    """Attention over one key/value token per block (NSA's compressed branch): q `[B, Tq, H, K]` at
    `positions` `[B, Tq]`, tokens k `[B, NB, HKV, K]`, v `[B, NB, HKV, V]` -> o `[B, Tq, H, V]`:

        o_{t,h} = sum_{c < p_t // Bs} softmax_c(scale q_{t,h} . k_{c,n}) v_{c,n}

    so a query reads the tokens of the complete blocks before its own (none: o = 0). T x NB logits,
    as NSA's compressed attention. o comes back in v's dtype (q, k, v share one dtype).

    Packed documents: with `segment_ids` `[B, Tq]` (the queries are a whole packed row), token c is
    the `block_grid` block c (the complete blocks of each document from its first token, in row
    order), `positions` are positions within each document, and a query reads its document's tokens
    c - first_block < p_t // Bs only (padding queries none).

    `context_axis` (module docstring): q, positions, segment_ids are this shard's, and k_tokens,
    v_tokens its slots of the row's token table (its own T / Bs blocks without segment_ids)."""
    op = "block_token_attention"
    for name, x in (("q", q), ("k_tokens", k_tokens), ("v_tokens", v_tokens)):
        check_rank(f"{op}: {name}", x, 4, "[B, T, H, D]")
    b, tq, heads, dk = q.shape
    nb, kv_heads, dv = k_tokens.shape[1], k_tokens.shape[2], v_tokens.shape[3]
    check_shape(f"{op}: k_tokens", k_tokens, (b, nb, kv_heads, dk), "[B, NB, HKV, K] (B and K as in q)")
    check_shape(f"{op}: v_tokens", v_tokens, (b, nb, kv_heads, dv), "[B, NB, HKV, V] (as k_tokens)")
    positions = jnp.asarray(positions)
    check_shape(f"{op}: positions", positions, (b, tq), "[B, Tq]")
    check_heads_and_dtype(op, heads, kv_heads, q=q, k_tokens=k_tokens, v_tokens=v_tokens)
    check_block_options(op, block_size, 1)
    segment_ids = check_segment_ids(op, segment_ids, (b, tq), layout="[B, Tq]")
    k_tokens, v_tokens, segment_ids, query_start = _gather_context(
        k_tokens, v_tokens, segment_ids, context_axis, op=op, block_size=block_size, queries=tq)
    nb = k_tokens.shape[1]
    first, count = jnp.zeros((b, tq), jnp.int32), positions // block_size
    if segment_ids is not None:
        grid = _query_grid(segment_ids, batch=b, queries=tq, keys=segment_ids.shape[1], block_size=block_size,
                           query_start=query_start)
        first, count = grid.first_block, jnp.where(grid.real, count, 0)
    q_grouped = q.reshape(b, tq, kv_heads, heads // kv_heads, dk)
    logits = jnp.einsum("btngd,bcnd->btngc", q_grouped, k_tokens, preferred_element_type=_F32)
    token = jnp.arange(nb)
    allowed = (token >= first[:, :, None, None, None]) & (token < (first + count)[:, :, None, None, None])
    weights = masked_softmax(logits * default_scale(scale, dk), allowed)
    o = jnp.einsum("btngc,bcnv->btngv", weights.astype(v_tokens.dtype), v_tokens, preferred_element_type=_F32)
    return o.reshape(b, tq, heads, dv).astype(v_tokens.dtype)
