r"""Softmax attention with grouped key/value heads, causal and sliding-window masks, and decoding.

For query i (of Tq) and key j (of Tk), head h, and its key/value head n = h // (H / HKV):

    s_ij = scale * q_ih . k_jn,       o_ih = sum_j softmax_j(s_ij | allowed(p_i, j)) v_jn

Queries are the last Tq positions of the key sequence, p_i = Tk - Tq + i, so one function serves
training (Tq = Tk) and prefill on top of a cache (Tq < Tk). The mask:

    allowed(p, j) = [j <= p           if causal]
                  & [p - j < W        if window W]       (causal: keys p-W+1 .. p)
                  & [j - p < W        if window W and not causal]   (keys p-W+1 .. p+W-1)

A row with no allowed key (only possible when Tq > Tk or with a non-causal window far from the keys)
returns o = 0, never NaN. Grouped-query heads: q has H heads and k, v have HKV heads with
H % HKV == 0 (GQA; HKV = 1 is MQA), head h reading key/value head h // (H / HKV) -- the opposite
direction from the linear ops, where v carries the extra heads.

Implementations (`impl`), all equal up to float32 rounding, forward and backward:

* `REFERENCE`  materialises the Tq x Tk logits in float32 and applies a masked softmax.
* `CHUNK`      flash attention in pure JAX: a lax.scan over key blocks of `block_size` keeping, per
               query row, the running max m, denominator l and unnormalised output a:
                   m' = max(m, max_j s_j),  l' = e^{m - m'} l + sum_j e^{s_j - m'},
                   a' = e^{m - m'} a + sum_j e^{s_j - m'} v_j,          o = a / l,
               never holding more than Tq x block_size logits. A custom VJP saves only o and the
               log-sum-exp L = m + log l, and recomputes every block in the backward pass:
                   P = exp(S - L),  D_i = dO_i . O_i,  dV = P^T dO,  dS = P * (dO V^T - D),
                   dQ = scale dS K,  dK = scale dS^T Q,
               so training memory is O(T), not O(T^2).
* `XLA`        `jax.nn.dot_product_attention(implementation="xla")`; needs V == K head dims.

Softmax statistics are float32 whatever the input dtype; matmuls take the input dtype with float32
accumulation. q, k and v must share one dtype, and `o` comes back in it: v's dtype, the output rule of
every op in `hybrid_jax.ops` (docs/conventions.md).

`isolated` `[B, Tk]` (candidate isolation): the key of an isolated position is allowed only for the
query at that position; every impl adds it to the mask.

`segment_ids` `[B, Tk]` (packed documents over the key positions; docs/conventions.md): with d_j the
document number of position j (`segments.document_index`, 0 = padding), allowed(p, j) &= [d_p == d_j
!= 0], so a query attends only its own document, and a padding query (or one at p_i < 0) none: o = 0.
The chunked form carries d_j with the key blocks; a block (or row) with no allowed key leaves the
running statistics untouched, so no NaN appears forward or backward.

Context parallelism (`context_axis`, `hybrid_jax.ops.context`): called inside `jax.shard_map` with
the time axis of q, k, v, `isolated` and `segment_ids` split over n shards of T tokens each, shard i
holding positions iT .. iT + T - 1. Its queries stay local at p_i = iT + i and every mask above is
taken at these global positions (causal j <= p, window p - j < W, same document d_p == d_j), so the
outputs equal the unsplit op's rows iT .. iT + T - 1. Two ways to get the keys, per shard:

* **Halo** (causal and W - 1 <= T): a query reads keys p-W+1 .. p only, so the W - 1 keys before the
  shard suffice (`previous_tokens`, one ppermute). The keys are [halo, local], in which the queries
  are again the last T positions, so every impl runs unchanged; the halo's segment ids come along
  (all ones without segment_ids) and shard 0's zero halo has id 0 (padding), so it is masked out.
  Each shard sends (W - 1) HKV (K + V) elements (+ 4 (W - 1) bytes of ids).
* **Gather** (otherwise: global causal, W - 1 > T, or not causal): K, V (and isolated, segment_ids)
  are all-gathered (`gather_time`) and the queries sit at the dynamic offset iT ("reference" and
  "chunk"; "xla" builds static masks and raises). Each shard sends (n - 1) T HKV (K + V) elements
  in a ring all-gather ((n - 1) / n of the row's K and V), and the backward pass returns the same
  through the reduce-scatter that autodiff makes of the all-gather (the chunk VJP returns dK, dV for
  all nT keys). Compute per shard is T x nT logits (the chunk form skips none of them: a ring with
  causal load balancing is the next step at large n).

Decoding (`kv_cache_update`, `softmax_attention_step`) lives in `attention_decode.py`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax.ops import segments
from hybrid_jax.ops.context import gather_time, previous_tokens, shard_offset
from hybrid_jax.ops._common import (
    Impl,
    check_floating,
    check_grouped_heads,
    check_isolated,
    check_rank,
    check_same_dtype,
    check_segment_ids,
    check_shape,
    check_time,
    default_scale,
    pad_time,
    repeat_heads,
    resolve_impl,
)

SUPPORTED = (Impl.REFERENCE, Impl.CHUNK, Impl.XLA)
F32 = jnp.float32


def allowed_positions(q_pos, k_pos, *, causal: bool, window: int | None):
    """The attention mask (True = attend) from broadcastable query / key positions (jnp or numpy)."""
    ok = (k_pos <= q_pos) | (not causal)  # `|` broadcasts to the full [queries, keys] shape
    if window is not None:
        ok = ok & (q_pos - k_pos < window)
        if not causal:
            ok = ok & (k_pos - q_pos < window)
    return ok


def masked_softmax(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over the last axis restricted to `allowed`; rows with nothing allowed give zeros."""
    # -inf (not a large negative) keeps masked weights exactly zero and their gradients finite.
    logits = jnp.where(allowed, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.exp(logits - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def _query_positions(tq: int, tk: int, query_start=None):
    """The queries' key positions: the last Tq of Tk (numpy, static), or from a traced `query_start`."""
    return np.arange(tk - tq, tk) if query_start is None else query_start + jnp.arange(tq)


def _row_masks(allowed, iso, q_doc, k_doc, q_pos, k_pos):
    """`allowed` with the per-row masks applied: the keys of isolated tokens (iso `[B, Tk]`, or a key
    block of it) visible only to their own query, and keys only to queries of their own document
    (q_doc `[B, Tq]`, k_doc `[B, Tk]` or a block of it; 0 = padding). `[B, Tq, Tk]`, or `allowed`
    itself when neither is given."""
    if iso is not None:
        allowed = allowed & (~iso[:, None, :] | (k_pos == q_pos))
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :]) & (q_doc != 0)[:, :, None]
    return allowed


def _documents(segment_ids, tq: int, query_start=None):
    """(q_doc `[B, Tq]`, k_doc `[B, Tk]`) document numbers (`segments.query_documents`; the Tq from
    a traced `query_start` when given) or (None, None)."""
    if segment_ids is None:
        return None, None
    if query_start is None:
        return segments.query_documents(segment_ids, tq)
    keys = segments.document_index(segment_ids)
    return jax.lax.dynamic_slice_in_dim(keys, query_start, tq, axis=1), keys


# ---------------------------------------------------------------------------------------------
# reference


def softmax_attention_reference(q, k, v, *, scale: float, causal: bool, window: int | None, isolated=None,
                                segment_ids=None, query_start=None):
    """Full float32 logits and a masked softmax: the ground truth. `query_start` (traced) places the
    queries at key positions query_start .. query_start + Tq - 1 instead of the last Tq."""
    heads, tq, tk = q.shape[2], q.shape[1], k.shape[1]
    v_dtype = v.dtype
    k = repeat_heads(k.astype(F32), heads)
    v = repeat_heads(v.astype(F32), heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(F32), k) * scale
    q_pos, k_pos = _query_positions(tq, tk, query_start)[:, None], np.arange(tk)[None, :]
    allowed = _row_masks(allowed_positions(q_pos, k_pos, causal=causal, window=window), isolated,
                         *_documents(segment_ids, tq, query_start), q_pos, k_pos)
    weights = masked_softmax(logits, allowed if allowed.ndim == 2 else allowed[:, None])
    return jnp.einsum("bhqk,bkhv->bqhv", weights, v).astype(v_dtype)


# ---------------------------------------------------------------------------------------------
# chunk (flash attention); grouped layout: q [B, N, G, Tq, K], k [B, N, Tk, K], v [B, N, Tk, V]


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, N, Tk, D] -> [Tk / block, B, N, block, D] (zero padded; padded keys are masked)."""
    x = pad_time(x, block, axis=2)
    b, n, t, d = x.shape
    return jnp.moveaxis(x.reshape(b, n, t // block, block, d), 2, 0)


def _row_blocks(x, block: int):
    """A per-key row mask [B, Tk] -> [Tk / block, B, block], padded with False / 0 (None stays None)."""
    return None if x is None else jnp.moveaxis(pad_time(x, block).reshape(x.shape[0], -1, block), 1, 0)


def _blocks(k, v, masks, block):
    """What the flash scans visit: key blocks, value blocks, the per-row key masks (isolated keys, key
    documents; `_row_blocks`) and each block's first key position."""
    tk, (iso, _, k_doc, _) = k.shape[2], masks
    starts = jnp.arange(0, tk + (-tk) % block, block)
    return _key_blocks(k, block), _key_blocks(v, block), (_row_blocks(iso, block), _row_blocks(k_doc, block)), starts


def _block_logits(q, k_blk, start, tk, scale, causal, window, masks, row_blks):
    """Masked float32 logits [B, N, G, Tq, block] of all queries against one key block."""
    tq, block = q.shape[3], k_blk.shape[2]
    logits = jnp.einsum("bngqd,bnkd->bngqk", q, k_blk, preferred_element_type=F32) * scale
    q_pos, k_pos = _query_positions(tq, tk, masks[3])[:, None], (start + jnp.arange(block))[None, :]
    allowed = allowed_positions(q_pos, k_pos, causal=causal, window=window) & (k_pos < tk)
    allowed = _row_masks(allowed, row_blks[0], masks[1], row_blks[1], q_pos, k_pos)
    return jnp.where(allowed if allowed.ndim == 2 else allowed[:, None, None], logits, -jnp.inf)


def _flash_forward(q, k, v, masks, scale, causal, window, block):
    stats_shape = q.shape[:4]
    tk = k.shape[2]

    def visit_block(carry, inputs):
        row_max, denom, acc = carry
        k_blk, v_blk, row_blks, start = inputs
        logits = _block_logits(q, k_blk, start, tk, scale, causal, window, masks, row_blks)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1))
        # Rows that have seen no allowed key yet keep max = -inf; shift them by 0 instead.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        rescale = jnp.exp(row_max - shift)
        weights = jnp.exp(logits - shift[..., None])
        denom = rescale * denom + jnp.sum(weights, axis=-1)
        pv = jnp.einsum("bngqk,bnkv->bngqv", weights.astype(v.dtype), v_blk, preferred_element_type=F32)
        return (new_max, denom, rescale[..., None] * acc + pv), None

    # `_like(q)` keeps q's varying manual axes (context parallelism), which the scan's carry must match.
    init = (
        jnp.full_like(q, -jnp.inf, F32, shape=stats_shape),
        jnp.zeros_like(q, F32, shape=stats_shape),
        jnp.zeros_like(q, F32, shape=stats_shape + (v.shape[-1],)),
    )
    (row_max, denom, acc), _ = jax.lax.scan(visit_block, init, _blocks(k, v, masks, block))
    seen = denom > 0
    o = acc / jnp.where(seen, denom, 1.0)[..., None]
    # Fully masked rows get L = 0: their logits are all -inf, so recomputed weights are exactly 0.
    logsumexp = jnp.where(seen, row_max + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
    return o.astype(q.dtype), logsumexp


# `masks` = (isolated keys `[B, Tk]` bool, query documents `[B, Tq]`, key documents `[B, Tk]` int32,
# the traced first query position; each None when not given) is an input without a cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash_attention(q, k, v, masks, scale, causal, window, block):
    return _flash_forward(q, k, v, masks, scale, causal, window, block)[0]


def _flash_attention_fwd(q, k, v, masks, scale, causal, window, block):
    o, logsumexp = _flash_forward(q, k, v, masks, scale, causal, window, block)
    return o, (q, k, v, masks, o, logsumexp)


def _flash_attention_bwd(scale, causal, window, block, residuals, do):
    q, k, v, masks, o, logsumexp = residuals
    tk = k.shape[2]
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1)  # D_i = dO_i . O_i = sum_j P_ij dP_ij
    do = do.astype(v.dtype)

    def visit_block(dq, inputs):
        k_blk, v_blk, row_blks, start = inputs
        logits = _block_logits(q, k_blk, start, tk, scale, causal, window, masks, row_blks)
        weights = jnp.exp(logits - logsumexp[..., None])
        dv_blk = jnp.einsum("bngqk,bngqv->bnkv", weights.astype(do.dtype), do, preferred_element_type=F32)
        dweights = jnp.einsum("bngqv,bnkv->bngqk", do, v_blk, preferred_element_type=F32)
        dlogits = (weights * (dweights - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bngqk,bnkd->bngqd", dlogits, k_blk, preferred_element_type=F32)
        dk_blk = jnp.einsum("bngqk,bngqd->bnkd", dlogits, q, preferred_element_type=F32)
        return dq, (dk_blk, dv_blk)

    dq, (dk, dv) = jax.lax.scan(visit_block, jnp.zeros_like(q, F32), _blocks(k, v, masks, block))

    def unblock(x, like):  # [Tk / block, B, N, block, D] -> [B, N, Tk, D]
        x = jnp.moveaxis(x, 0, 2)
        b, n, nb, blk, d = x.shape
        return x.reshape(b, n, nb * blk, d)[:, :, :tk].astype(like.dtype)

    return dq.astype(q.dtype), unblock(dk, k), unblock(dv, v), None


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def softmax_attention_chunk(q, k, v, *, scale: float, causal: bool, window: int | None, block_size: int = 128,
                            isolated=None, segment_ids=None, query_start=None):
    """Blocked online softmax over key blocks with an O(T)-memory custom VJP (see the module doc);
    `query_start` as in `softmax_attention_reference`."""
    b, tq, heads, dk = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    q_grouped = q.reshape(b, tq, kv_heads, groups, dk).transpose(0, 2, 3, 1, 4)
    k_grouped, v_grouped = (jnp.swapaxes(x, 1, 2) for x in (k, v))
    block = min(block_size, k.shape[1])
    masks = (isolated, *_documents(segment_ids, tq, query_start), query_start)
    o = _flash_attention(q_grouped, k_grouped, v_grouped, masks, scale, causal, window, block)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, tq, heads, v.shape[-1])


# ---------------------------------------------------------------------------------------------
# xla


def softmax_attention_xla(q, k, v, *, scale: float, causal: bool, window: int | None, isolated=None,
                          segment_ids=None):
    """`jax.nn.dot_product_attention`, with our bottom-right aligned mask where Tq != Tk."""
    if k.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"softmax_attention: impl='xla' (jax.nn.dot_product_attention) needs equal key and value "
            f"head dims, got K={k.shape[-1]} and V={v.shape[-1]}; use impl='chunk'"
        )
    tq, tk = q.shape[1], k.shape[1]
    q_pos, k_pos = _query_positions(tq, tk)[:, None], np.arange(tk)[None, :]
    allowed = allowed_positions(q_pos, k_pos, causal=causal, window=window)
    row_has_key = np.any(allowed, axis=1)[None, :, None, None]  # [1 or B, Tq, 1, 1]
    options = {}
    if isolated is not None or segment_ids is not None:  # a per-row mask [B, 1, Tq, Tk]
        rows = _row_masks(jnp.asarray(allowed), isolated, *_documents(segment_ids, tq), q_pos, k_pos)
        options["mask"] = rows[:, None]
        row_has_key = jnp.any(rows, axis=2)[:, :, None, None]
    elif tq == tk:
        # Square case: let JAX build the (top-left aligned = ours) masks itself.
        options["is_causal"] = causal
        if window is not None:
            options["local_window_size"] = (window - 1, 0 if causal else window - 1)
    elif not np.all(allowed):
        options["mask"] = jnp.asarray(allowed)[None, None]
    o = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla", **options)
    if isinstance(row_has_key, jax.Array) or not np.all(row_has_key):
        # dot_product_attention masks with a finite negative, which averages all keys on empty rows.
        o = jnp.where(row_has_key, o, jnp.zeros((), o.dtype))
    return o


# ---------------------------------------------------------------------------------------------
# dispatch and validation


def check_window(window, op: str) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{op}: window must be None or an int >= 1, got {window!r}")


def _context_parallel(q, k, v, options, *, choice, block_size, axis):
    """This shard's rows of softmax attention over the row split along `axis` (module docstring,
    "Context parallelism"): the halo path when causal with W - 1 <= T, else the gather path."""
    op, t, window = "softmax_attention", q.shape[1], options["window"]
    if k.shape[1] != t:
        raise ValueError(f"{op}: with context_axis the queries are the shard's own positions, so q and k "
                         f"need the same local length, got Tq={t} and Tk={k.shape[1]}")
    if options["causal"] and window is not None and window - 1 <= t:
        if window > 1:  # window 1: every query reads its own key only, no halo
            ids = options["segment_ids"]
            ids = jnp.ones((q.shape[0], t), jnp.int32) if ids is None else ids
            def with_halo(x):
                return None if x is None else jnp.concatenate([previous_tokens(x, window - 1, axis), x], axis=1)
            k, v = with_halo(k), with_halo(v)
            options = dict(options, segment_ids=with_halo(ids), isolated=with_halo(options["isolated"]))
        return _run(q, k, v, options, choice, block_size)
    if choice is Impl.XLA:
        raise ValueError(f"{op}: impl='xla' cannot run context-parallel with causal={options['causal']}, "
                         f"window={window} (it needs the keys of the whole row at a traced query offset); "
                         f"use impl='chunk' or 'reference' (a causal window W <= T + 1 runs any impl)")
    gathered = {name: None if x is None else gather_time(x, axis)
                for name, x in (("isolated", options["isolated"]), ("segment_ids", options["segment_ids"]))}
    options = dict(options, **gathered, query_start=shard_offset(t, axis))
    return _run(q, gather_time(k, axis), gather_time(v, axis), options, choice, block_size)


def _run(q, k, v, options, choice, block_size):
    """The chosen impl on checked inputs."""
    if choice is Impl.REFERENCE:
        return softmax_attention_reference(q, k, v, **options)
    if choice is Impl.XLA:
        return softmax_attention_xla(q, k, v, **options)
    return softmax_attention_chunk(q, k, v, **options, block_size=block_size)


def softmax_attention(q, k, v, *, scale=None, causal=True, window=None, isolated=None, segment_ids=None,
                      impl="chunk", block_size=128, context_axis=None):
    """Softmax attention: q `[B, Tq, H, K]`, k `[B, Tk, HKV, K]`, v `[B, Tk, HKV, V]` -> o `[B, Tq, H, V]`.

    Queries sit at the last Tq of the Tk key positions; `window=W` limits each query at position p
    to keys p-W+1 .. p (and up to p+W-1 when not causal). `scale` defaults to K ** -0.5.
    `impl` is "reference", "chunk" (default) or "xla"; `block_size` is the chunk key-block length.
    `isolated` `[B, Tk]` bool: the key of an isolated position is visible only to the query at that
    same position (candidate isolation; every query still sees its own key).
    `segment_ids` `[B, Tk]` int (packed documents of the key positions, 1, 2, ... per document, 0 =
    padding; query i has the id of position Tk - Tq + i): a query attends only keys of its own
    document; padding queries attend nothing and return 0.
    `context_axis`: the mesh axis the time axis is split over inside `jax.shard_map` (Tq = Tk = this
    shard's length; module docstring, "Context parallelism"), or None.
    q, k, v share one dtype; o comes back in it.
    """
    op = "softmax_attention"
    choice = resolve_impl(impl, op, SUPPORTED)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_rank(f"{op}: {name}", x, 4, "[B, T, H, D]")
        check_floating(f"{op}: {name}", x)
    b, tq, heads, dk = q.shape
    tk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[3]
    check_shape(f"{op}: k", k, (b, tk, kv_heads, dk), "[B, Tk, HKV, K] (B and K as in q)")
    check_shape(f"{op}: v", v, (b, tk, kv_heads, dv), "[B, Tk, HKV, V] (B, Tk, HKV as in k)")
    check_time(op, tq, q=q)
    check_time(op, tk, k=k, v=v)
    check_grouped_heads(heads, kv_heads, op)
    check_same_dtype(op, q=q, k=k, v=v)
    check_window(window, op)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be an int >= 1, got {block_size!r}")
    options = dict(scale=default_scale(scale, dk), causal=bool(causal), window=window,
                   isolated=check_isolated(op, isolated, (b, tk), layout="[B, Tk]"),
                   segment_ids=check_segment_ids(op, segment_ids, (b, tk), layout="[B, Tk]"))
    if context_axis is not None:
        return _context_parallel(q, k, v, options, choice=choice, block_size=block_size, axis=context_axis)
    return _run(q, k, v, options, choice, block_size)
