"""Block-sparse attention: the gathered form equals the dense masked reference (outputs, gradients),
the reference equals a numpy brute force, full coverage is dense causal attention, decoding steps
equal the forward, and the gathered form's memory grows linearly in T."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.attention_decode import kv_cache_update
from hybrid_jax.ops.sparse_attention import (
    block_sparse_attention,
    block_token_attention,
    pool_block_keys,
)
from hybrid_jax.ops.sparse_attention_decode import block_keys_update, block_sparse_attention_step

STATIC = ("block_size", "top_k", "impl")
attend = jax.jit(block_sparse_attention, static_argnames=STATIC)


@functools.partial(jax.jit, static_argnames=STATIC)
def attend_grads(q, k, v, cotangent, **options):
    """block_sparse_attention(q, k, v) and the gradients of <it, cotangent> for q, k, v: one program."""
    o, pullback = jax.vjp(lambda *qkv: block_sparse_attention(*qkv, **options), q, k, v)
    return o, pullback(cotangent.astype(o.dtype))


def make_inputs(seed, b, t, h, hkv, dk, dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # numpy draws: jax.random would compile anew for every shape
    shapes = [(b, t, h, dk), (b, t, hkv, dk), (b, t, hkv, dv), (b, t, h, dv)]
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


# name: (B, T, H, HKV, K, V, block_size, top_k); odd T, so the last block is partial.
CASES = {
    "gqa": (2, 11, 4, 2, 8, 6, 2, 2),
    "mqa_odd_block": (1, 13, 3, 1, 8, 8, 3, 1),
    "mha_top_k_over_blocks": (1, 9, 2, 2, 4, 4, 4, 5),
    "single_token": (2, 1, 2, 1, 8, 8, 4, 2),
}


def assert_close(actual, expected, rtol=2e-5, atol=2e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_chunk_equals_reference_forward_and_grads(name):
    b, t, h, hkv, dk, dv, block_size, top_k = CASES[name]
    q, k, v, cotangent = make_inputs(0, b, t, h, hkv, dk, dv)
    options = dict(block_size=block_size, top_k=top_k)
    o_ref, grads_ref = attend_grads(q, k, v, cotangent, impl="reference", **options)
    o, grads = attend_grads(q, k, v, cotangent, impl="chunk", **options)
    assert o.shape == (b, t, h, dv) and o.dtype == jnp.float32
    assert_close(o, o_ref)
    for arg, grad, grad_ref in zip("qkv", grads, grads_ref):
        assert grad.shape == grad_ref.shape, arg
        # (one token attends to itself alone: its weight is 1 whatever q and k are)
        assert np.any(np.asarray(grad_ref) != 0) or (t == 1 and arg != "v"), arg
        assert_close(grad, grad_ref)


def _numpy_block_sparse(q, k, v, block_size, top_k):
    """Brute force in float64: per query and key/value head, score the earlier complete blocks by
    their mean key against the group's summed query, keep the top_k, attend with the own block."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, dk = q.shape
    hkv = k.shape[2]
    o, skipped = np.zeros((b, t, h, v.shape[-1])), 0
    for row in range(b):
        for n in range(hkv):
            heads = range(n * (h // hkv), (n + 1) * (h // hkv))
            for i in range(t):
                own = i // block_size
                means = [k[row, c * block_size:(c + 1) * block_size, n].mean(0) for c in range(own)]
                scores = [q[row, i, list(heads)].sum(0) @ m for m in means]
                chosen = sorted(np.argsort(scores)[::-1][:top_k])
                skipped += own - len(chosen)
                keys = [j for c in chosen for j in range(c * block_size, (c + 1) * block_size)]
                keys += list(range(own * block_size, i + 1))
                for head in heads:
                    logits = k[row, keys, n] @ q[row, i, head] / np.sqrt(dk)
                    w = np.exp(logits - logits.max())
                    o[row, i, head] = (w / w.sum()) @ v[row, keys, n]
    return o, skipped


def test_reference_matches_numpy_brute_force():
    q, k, v, _ = make_inputs(1, 2, 15, 4, 2, 8, 8)
    expected, skipped = _numpy_block_sparse(q, k, v, block_size=3, top_k=2)
    assert skipped > 0, "the case must leave some earlier blocks out"
    for impl in ("reference", "chunk"):
        assert_close(attend(q, k, v, impl=impl, block_size=3, top_k=2), expected)


def test_top_k_covering_every_block_is_dense_causal_attention():
    q, k, v, cotangent = make_inputs(2, 2, 11, 4, 2, 8, 8)
    dense = jax.jit(lambda *x: jax.vjp(lambda *qkv: softmax_attention(*qkv, impl="reference"), *x[:3]))
    o_dense, pullback = dense(q, k, v)
    for impl in ("reference", "chunk"):
        o, grads = attend_grads(q, k, v, cotangent, impl=impl, block_size=2, top_k=5)
        assert_close(o, o_dense)
        for grad, grad_ref in zip(grads, pullback(cotangent)):
            assert_close(grad, grad_ref)
        # With fewer blocks than needed the result is no longer dense: the check above can fail.
        assert np.max(np.abs(attend(q, k, v, impl=impl, block_size=2, top_k=1) - o_dense)) > 1e-3


def test_bfloat16_in_bfloat16_out_close_to_float32():
    q, k, v, cotangent = make_inputs(3, 2, 11, 4, 2, 8, 8, dtype=jnp.bfloat16)
    o, grads = attend_grads(q, k, v, cotangent, impl="chunk", block_size=2, top_k=2)
    assert o.dtype == jnp.bfloat16
    o_ref, grads_ref = attend_grads(*(x.astype(jnp.float32) for x in (q, k, v, cotangent)),
                                    impl="reference", block_size=2, top_k=2)
    assert_close(o, o_ref, rtol=2e-2, atol=2e-2)
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == jnp.bfloat16
        assert_close(grad, grad_ref, rtol=5e-2, atol=5e-2)


@functools.partial(jax.jit, static_argnames=("block_size", "top_k"))
def decode_all(q, k, v, caches, *, block_size, top_k):
    """Feeds T tokens one at a time: kv_cache_update, block_keys_update, block_sparse_attention_step."""

    def step(caches, inputs):
        q_t, k_t, v_t, t = inputs
        length = jnp.full((q.shape[0],), t + 1, jnp.int32)
        k_cache, v_cache = kv_cache_update(*caches[:2], k_t, v_t, length - 1)
        block_keys = block_keys_update(caches[2], k_cache, length, block_size=block_size)
        o_t = block_sparse_attention_step(q_t, k_cache, v_cache, block_keys, length=length,
                                          block_size=block_size, top_k=top_k)
        return (k_cache, v_cache, block_keys), o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v)]
    _, o = jax.lax.scan(step, caches, (*time_major, jnp.arange(q.shape[1])))
    return jnp.moveaxis(o, 0, 1)


@pytest.mark.parametrize("name", ["gqa", "mqa_odd_block"])
def test_decode_steps_equal_forward(name):
    b, t, h, hkv, dk, dv, block_size, top_k = CASES[name]
    q, k, v, _ = make_inputs(4, b, t, h, hkv, dk, dv)
    slots = -(-t // block_size) * block_size + block_size  # one block more than needed
    # Stale cache contents (keys, values and pooled keys) must never be read: start from noise.
    noise = make_inputs(5, b, slots, hkv, hkv, dk, dv)
    caches = (10 * noise[1], 10 * noise[2], 10 * pool_block_keys(noise[1], block_size=block_size))
    expected = attend(q, k, v, impl="reference", block_size=block_size, top_k=top_k)
    assert_close(decode_all(q, k, v, caches, block_size=block_size, top_k=top_k), expected)


def numpy_block_tokens(q, k_tokens, v_tokens, positions, block_size):
    """Float64 loops: the query at p attends over the tokens of blocks c < p // block_size (or is 0)."""
    q, k_tokens, v_tokens = (np.asarray(x, np.float64) for x in (q, k_tokens, v_tokens))
    b, tq, h, dk = q.shape
    group = h // k_tokens.shape[2]
    o = np.zeros((b, tq, h, v_tokens.shape[-1]))
    for row, i, head in np.ndindex(b, tq, h):
        blocks = int(positions[row, i]) // block_size
        if blocks:
            logits = k_tokens[row, :blocks, head // group] @ q[row, i, head] / np.sqrt(dk)
            w = np.exp(logits - logits.max())
            o[row, i, head] = (w / w.sum()) @ v_tokens[row, :blocks, head // group]
    return o


def test_block_token_attention_matches_numpy_with_finite_grads():
    q, k_tokens, v_tokens, cotangent = make_inputs(8, 2, 9, 4, 2, 8, 6)
    k_tokens, v_tokens = k_tokens[:, :4], v_tokens[:, :4]  # 4 blocks of 3 keys
    positions = np.stack([np.arange(9), np.arange(3, 12)])  # row 0 starts at 0: no tokens until 3
    run = jax.jit(lambda *x: jax.vjp(lambda *a: block_token_attention(*a, positions=positions, block_size=3), *x))
    o, pullback = run(q, k_tokens, v_tokens)
    assert_close(o, numpy_block_tokens(q, k_tokens, v_tokens, positions, 3))
    np.testing.assert_array_equal(np.asarray(o[0, :3]), 0.0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in pullback(cotangent))


def _compiled_bytes(impl, t):
    q, k, v, cotangent = make_inputs(6, 1, t, 2, 1, 8, 8)
    fn = functools.partial(attend_grads, impl=impl, block_size=8, top_k=2)
    stats = jax.jit(fn).lower(q, k, v, cotangent).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


@pytest.mark.parametrize("impl, quadratic", [("chunk", False), ("reference", True)])
def test_gathered_form_memory_grows_linearly(impl, quadratic):
    """Forward + backward at T and 4T: linear memory grows ~4x, T x T logits ~16x."""
    growth = _compiled_bytes(impl, 512) / _compiled_bytes(impl, 128)
    assert (growth > 10) == quadratic, growth


def _qkv(t=4, h=2, hkv=1, dk=4):
    return make_inputs(7, 1, t, h, hkv, dk, dk)[:3]


@pytest.mark.parametrize(
    "make_call, message",
    [
        (lambda: block_sparse_attention(*_qkv(), impl="xla"),
         r"block_sparse_attention: unknown impl='xla'; valid choices are \['reference', 'chunk'\]"),
        (lambda: block_sparse_attention(*_qkv(h=3, hkv=2)), r"q heads H=3 must be a multiple of k/v heads HKV=2"),
        (lambda: block_sparse_attention(*_qkv(), top_k=0), r"block_sparse_attention: top_k must be an int >= 1"),
        (lambda: block_sparse_attention(*_qkv(), block_size=2.0), r"block_size must be an int >= 1, got 2.0"),
        (lambda: block_sparse_attention(_qkv()[0], _qkv(t=5)[1], _qkv()[2]),
         r"block_sparse_attention: k must have shape \[B, T, HKV, K\] \(B, T and K as in q\) = \(1, 4, 1, 4\)"),
        (lambda: block_sparse_attention_step(_qkv()[0][:, 0], *_qkv(t=6)[1:], jnp.zeros((1, 3, 1, 4)),
                                             length=jnp.array([1]), block_size=4, top_k=1),
         r"the cache's 6 slots must be a multiple of block_size=4"),
        (lambda: block_sparse_attention_step(_qkv()[0][:, 0], *_qkv()[1:], jnp.zeros((1, 1, 1, 4)),
                                             length=jnp.array([1]), block_size=2, top_k=1),
         r"block_keys must have shape \[B, S / block_size, HKV, K\] \(from k_cache\) = \(1, 2, 1, 4\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call()
