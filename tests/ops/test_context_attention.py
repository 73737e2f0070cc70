"""Context parallelism of the attention ops: softmax attention (halo and gather paths), block-sparse
and block-token attention, split over 2, 4 or 8 fake devices, give the 1-device outputs and
gradients, with documents that cross shard boundaries (one starting exactly on one, padding at the
end), isolated tokens and grouped heads. The layers run split in tests/models/test_context_parallel.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.nn.segments import segment_positions
from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.sparse_attention import block_sparse_attention, block_token_attention
from tests.ops.sharding import check_context_parallel, context_mesh, context_parallel, crossing_documents

B, D = 2, 8


def _qkv(t, heads, kv_heads, key=0):
    ks = jax.random.split(jax.random.key(key), 3)
    return (jax.random.normal(ks[0], (B, t, heads, D)), jax.random.normal(ks[1], (B, t, kv_heads, D)),
            jax.random.normal(ks[2], (B, t, kv_heads, D)))


# (impl, context, data, local length, heads, kv heads, causal, window, segment ids, isolated)
SOFTMAX_CASES = [
    ("chunk", 2, 1, 16, 2, 2, True, None, True, False),  # global causal: gather
    ("reference", 8, 1, 8, 4, 2, True, None, False, True),  # GQA, isolated keys
    ("chunk", 4, 1, 16, 2, 1, True, 5, True, True),  # W - 1 <= T: halo
    ("xla", 4, 1, 8, 2, 2, True, 9, True, False),  # halo of exactly T keys, any impl
    ("chunk", 2, 2, 8, 4, 2, True, 12, True, False),  # W - 1 > T: gather, data = 2
    ("reference", 2, 1, 8, 2, 2, False, 6, True, False),  # non-causal window: gather
]


@pytest.mark.parametrize("impl, context, data, local, heads, kv_heads, causal, window, with_ids, with_iso",
                         SOFTMAX_CASES)
def test_softmax_attention_context_parallel(impl, context, data, local, heads, kv_heads, causal, window,
                                            with_ids, with_iso):
    t = local * context
    q, k, v = _qkv(t, heads, kv_heads)
    extra = {}
    if with_ids:
        extra["segment_ids"] = crossing_documents(t, context)
    if with_iso:
        extra["isolated"] = jnp.asarray(np.arange(t) % 5 == 3)[None].repeat(B, 0)
    names = tuple(extra)

    def fn(per_token, shared, context_axis):
        q, k, v, *rest = per_token
        o = softmax_attention(q, k, v, causal=causal, window=window, impl=impl, block_size=4,
                              context_axis=context_axis, **dict(zip(names, rest)))
        return o, None

    check_context_parallel(fn, (q, k, v, *extra.values()), context=context, data=data)


def test_softmax_attention_context_parallel_xla_needs_the_halo():
    q, k, v = _qkv(16, 2, 2)
    mesh = context_mesh(2)

    def fn(per_token, shared, context_axis):
        return softmax_attention(*per_token, impl="xla", context_axis=context_axis), None

    with pytest.raises(ValueError, match="impl='xla' cannot run context-parallel.*'chunk' or 'reference'"):
        with jax.set_mesh(mesh):
            context_parallel(fn, mesh, (q, k, v), ())


# (impl, context, data, local length, block size, top_k, heads, kv heads, segment ids)
SPARSE_CASES = [
    ("chunk", 4, 1, 8, 4, 2, 4, 2, True),
    ("reference", 2, 1, 16, 4, 2, 2, 2, False),
    ("chunk", 2, 2, 8, 2, 3, 2, 1, True),
]


@pytest.mark.parametrize("impl, context, data, local, block, top_k, heads, kv_heads, with_ids", SPARSE_CASES)
def test_block_sparse_attention_context_parallel(impl, context, data, local, block, top_k, heads, kv_heads,
                                                 with_ids):
    t = local * context
    q, k, v = _qkv(t, heads, kv_heads, key=1)
    ids = (crossing_documents(t, context),) if with_ids else ()

    def fn(per_token, shared, context_axis):
        q, k, v, *ids = per_token
        o = block_sparse_attention(q, k, v, block_size=block, top_k=top_k, impl=impl, context_axis=context_axis,
                                   segment_ids=ids[0] if ids else None)
        return o, None

    check_context_parallel(fn, (q, k, v, *ids), context=context, data=data)


@pytest.mark.parametrize("with_ids", [False, True])
def test_block_token_attention_context_parallel(with_ids):
    """Each shard holds the tokens of its own T / Bs blocks (of the grid of the whole row)."""
    context, local, block = 4, 8, 4
    t = local * context
    q, k, v = _qkv(t, 4, 2, key=2)
    ids = crossing_documents(t, context) if with_ids else None
    positions = segment_positions(ids) if with_ids else jnp.broadcast_to(jnp.arange(t), (B, t))
    tokens = tuple(x[:, : t // block] for x in (k, v))  # any [B, NB, HKV, D]: the table's slots
    per_token = (q, positions) + ((ids,) if with_ids else ())

    def fn(per_token, shared, context_axis):
        q, positions, *ids = per_token
        if context_axis is None:
            k_tokens, v_tokens = shared
        else:  # this shard's slots of the table
            i, slots = jax.lax.axis_index(context_axis), local // block
            k_tokens, v_tokens = (jax.lax.dynamic_slice_in_dim(x, i * slots, slots, axis=1) for x in shared)
        o = block_token_attention(q, k_tokens, v_tokens, positions=positions, block_size=block,
                                  segment_ids=ids[0] if ids else None, context_axis=context_axis)
        return o, None

    check_context_parallel(fn, per_token, tokens, context=context)


def test_sparse_attention_context_parallel_needs_whole_blocks():
    q, k, v = _qkv(24, 2, 2)
    mesh = context_mesh(2)

    def fn(per_token, shared, context_axis):
        return block_sparse_attention(*per_token, block_size=8, top_k=1, context_axis=context_axis), None

    with pytest.raises(ValueError, match="length 12 must be a multiple of block_size=8"):
        with jax.set_mesh(mesh):
            context_parallel(fn, mesh, (q, k, v), ())
