"""Packed documents (`segment_ids`) in the attention ops: for softmax attention (causal, sliding
window, bidirectional window; reference, chunk, xla; with isolated keys), block-sparse attention
(reference, chunk) and block-token attention, a packed row equals every document run on its own, in
outputs, gradients of every input (zero at padding) and, for padding queries, outputs 0 and finite
gradients. Layouts are drawn by hypothesis (documents of length 1, boundaries on and off the key
blocks, padding between documents and at the end); bad segment_ids raise one clear error."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import ops
from hybrid_jax.ops.sparse_attention import block_grid, select_blocks
from tests.ops.mixers import assert_close
from tests.ops.segments import LAYOUT, check_packed_equals_alone, document_spans, packed_layouts

B, T, H, HKV, D = 2, 10, 4, 2, 8
BLOCK = 4  # the flash key block: documents end on it and inside it
SPARSE_BLOCK, TOP_K = 3, 1  # documents of 7 tokens or more choose among their blocks
# LAYOUT (tests/ops/segments.py): documents end on the key block of 4 and inside it; row 1 has
# sparse blocks from token 1 and a 1-token document after the padding gap.
ONE_DOCUMENT = np.ones((B, T), np.int32)


def qkv(seed=0, with_isolated=False):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape, np.float32) for shape in ((B, T, H, D), (B, T, HKV, D), (B, T, HKV, D))]
    if with_isolated:  # a float 0/1 mask, so that the harness can slice it and take (zero) gradients
        arrays.append((rng.random((B, T)) < 0.3).astype(np.float32))
    return tuple(arrays)


@functools.lru_cache(maxsize=None)
def attention(impl, causal, window, isolated=False):
    def fn(per_token, shared, initial_state, segment_ids):
        q, k, v, *iso = per_token
        o = ops.softmax_attention(q, k, v, causal=causal, window=window, impl=impl, block_size=BLOCK,
                                  isolated=iso[0] > 0.5 if isolated else None, segment_ids=segment_ids)
        return o, None

    return fn


@functools.lru_cache(maxsize=None)
def sparse(impl):
    def fn(per_token, shared, initial_state, segment_ids):
        o = ops.block_sparse_attention(*per_token, block_size=SPARSE_BLOCK, top_k=TOP_K, impl=impl,
                                       segment_ids=segment_ids)
        return o, None

    return fn


@packed_layouts(B, T, 2, LAYOUT)
@pytest.mark.parametrize("causal, window, isolated", [(True, 3, True), (False, None, False)])
def test_softmax_attention_packed_equals_documents_alone(layout, causal, window, isolated):
    impls = {f"softmax_attention/{impl}": attention(impl, causal, window, isolated)
             for impl in ("reference", "chunk", "xla")}
    # Causal: each document alone at the start of a row of zeros (it cannot see them), one compilation.
    outputs = check_packed_equals_alone(impls, attention("reference", causal, window, isolated),
                                        qkv(with_isolated=isolated), (), layout, zero_fill=causal)
    for out in outputs.values():
        np.testing.assert_array_equal(out[layout == 0], 0.0)  # padding queries attend nothing


@packed_layouts(B, T, 2, LAYOUT)
def test_block_sparse_attention_packed_equals_documents_alone(layout):
    impls = {f"block_sparse_attention/{impl}": sparse(impl) for impl in ("reference", "chunk")}
    for out in check_packed_equals_alone(impls, sparse("reference"), qkv(1), (), layout, zero_fill=True).values():
        np.testing.assert_array_equal(out[layout == 0], 0.0)


def test_block_sparse_grid_of_the_packed_example():
    """The blocks of LAYOUT row 1 start at its second document's first token (1), so its last query
    (position 6) chooses TOP_K = 1 of two candidates: the packed check above covers a real choice
    on a grid off the absolute one. Row 0's documents have one complete block (the first)."""
    @jax.jit
    def grid_and_selection(segment_ids, q, k):
        grid = block_grid(segment_ids, batch=B, time=T, block_size=SPARSE_BLOCK)
        return grid, select_blocks(q, k, grid, block_size=SPARSE_BLOCK, top_k=TOP_K)

    grid, (starts, valid) = grid_and_selection(jnp.asarray(LAYOUT), *qkv(1)[:2])
    real = LAYOUT != 0
    np.testing.assert_array_equal(np.asarray(grid.block_start)[:, :2], [[0, 5], [1, 4]])
    np.testing.assert_array_equal(np.asarray(grid.first_block)[real], [0] * 4 + [1] + [1] * 3 + [0] * 8 + [2])
    np.testing.assert_array_equal(np.asarray(grid.position)[real], [0, 1, 2, 3, 0, 0, 1, 2, 0, *range(7), 0])
    assert bool(valid[1, 7].all()) and set(np.asarray(starts[1, 7, :, 0]).tolist()) <= {1, 4}
    assert not bool(valid[1, 9].any()) and not bool(valid[0, 4:].any()) and bool(valid[0, 3].all())


@functools.lru_cache(maxsize=None)
def _block_tokens_program():
    def run(q, k_tokens, v_tokens, positions, segment_ids, cotangent):
        def forward(q, k_tokens, v_tokens):
            return ops.block_token_attention(q, k_tokens, v_tokens, positions=positions, block_size=SPARSE_BLOCK,
                                             segment_ids=segment_ids)

        o, pullback = jax.vjp(forward, q, k_tokens, v_tokens)
        return o, pullback(cotangent)

    return jax.jit(run)


@packed_layouts(B, T, 3, LAYOUT)
def test_block_token_attention_packed_equals_documents_alone(layout):
    """Token c of a packed row is block c of `block_grid` (each document's complete blocks in row
    order); alone, a document's tokens come first in a table of the same size, noise after them."""
    rng = np.random.default_rng(2)
    nb = -(-T // SPARSE_BLOCK)
    q, cotangent = (rng.standard_normal((B, T, H, D), np.float32) for _ in range(2))
    k_tokens, v_tokens = (rng.standard_normal((B, nb, HKV, D), np.float32) for _ in range(2))
    positions = np.asarray(block_grid(jnp.asarray(layout), batch=B, time=T, block_size=SPARSE_BLOCK).position)
    cotangent[layout == 0] = 0.0
    o, grads = _block_tokens_program()(q, k_tokens, v_tokens, positions, jnp.asarray(layout), cotangent)
    np.testing.assert_array_equal(np.asarray(o)[layout == 0], 0.0)
    expected_grads = [np.zeros(x.shape) for x in (q, k_tokens, v_tokens)]
    for b, row in enumerate(layout):
        first = 0
        for start, stop in document_spans(row):
            count = (stop - start) // SPARSE_BLOCK
            noise = rng.standard_normal((2, 1, nb - count, HKV, D), np.float32)
            tokens = [np.concatenate([x[b:b + 1, first:first + count], n], axis=1) for x, n in
                      zip((k_tokens, v_tokens), noise)]
            # The document first in a row of T queries (zeros after it: causal, they change nothing).
            q_doc, cot_doc = (np.zeros((1,) + x.shape[1:], np.float32) for x in (q, cotangent))
            q_doc[0, :stop - start], cot_doc[0, :stop - start] = q[b, start:stop], cotangent[b, start:stop]
            o_doc, g_doc = _block_tokens_program()(q_doc, *tokens, np.arange(T)[None], None, cot_doc)
            o_doc, g_doc = o_doc[:, :stop - start], (g_doc[0][:, :stop - start], *g_doc[1:])
            assert_close(o[b, start:stop], o_doc[0], what="block_token_attention outputs")
            expected_grads[0][b, start:stop] = g_doc[0][0]
            for total, g in zip(expected_grads[1:], g_doc[1:]):
                total[b, first:first + count] += np.asarray(g[0, :count])
            first += count
    for name, g, e in zip(("q", "k_tokens", "v_tokens"), grads, expected_grads):
        assert_close(g, e, 1e-4, f"block_token_attention grad {name}")


@functools.lru_cache(maxsize=None)
def _padding_program(impl):
    """(o, gradients of sum(o) for q, k, v, o of the last 5 queries against all keys), jitted."""

    def run(q, k, v, segment_ids):
        attend = functools.partial(ops.softmax_attention, segment_ids=segment_ids, impl=impl, block_size=BLOCK)
        o, pullback = jax.vjp(attend, q, k, v)
        return o, pullback(jnp.ones_like(o)), attend(q[:, -5:], k, v)

    return jax.jit(run)


@pytest.mark.parametrize("impl", ["reference", "chunk", "xla"])
def test_padding_rows_are_zero_with_finite_grads_and_prefill_uses_key_ids(impl):
    """A row of padding only, and queries against a longer key sequence (Tq < Tk: ids over the keys)."""
    q, k, v = (jnp.asarray(x) for x in qkv(3))
    o, grads, tail = _padding_program(impl)(q, k, v, jnp.asarray(LAYOUT).at[1].set(0))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_array_equal(np.asarray(o[1]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0][1]), 0.0)
    # Row 0's last 5 queries (its third document, then padding) against all 10 keys.
    alone = ops.softmax_attention(q[:1, 5:8], k[:1, 5:8], v[:1, 5:8], impl="reference")
    assert_close(tail[:1, :3], alone, what="prefill rows")
    np.testing.assert_array_equal(np.asarray(tail[:, 3:]), 0.0)


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v, ids: ops.softmax_attention(q, k, v, segment_ids=ids[:, :5]),
     r"softmax_attention: segment_ids must have shape \[B, Tk\] \(int32, 1, 2, \.\.\. per document, "
     r"0 = padding\) = \(2, 10\), got \(2, 5\)"),
    (lambda q, k, v, ids: ops.softmax_attention(q, k, v, segment_ids=ids.astype(jnp.float32)),
     r"softmax_attention: segment_ids must be an integer array of shape \[B, Tk\] = \(2, 10\) .* got dtype float32"),
    (lambda q, k, v, ids: ops.block_sparse_attention(q, k, v, block_size=3, top_k=1, segment_ids=ids[0]),
     r"block_sparse_attention: segment_ids must have shape \[B, T\] .* = \(2, 10\), got \(10,\)"),
    (lambda q, k, v, ids: ops.block_token_attention(q, k, v, positions=ids, block_size=3, segment_ids=ids > 0),
     r"block_token_attention: segment_ids must be an integer array of shape \[B, Tq\] = \(2, 10\) .* got dtype bool"),
])
def test_bad_segment_ids_raise_clear_errors(call, message):
    q, k, v = (jnp.asarray(x) for x in qkv())
    with pytest.raises(ValueError, match=message):
        call(q, k, v, jnp.asarray(LAYOUT))
