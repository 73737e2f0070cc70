"""Softmax attention: chunk (flash) and xla equal the float32 reference, decoding equals prefill."""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hybrid_jax.ops.attention import softmax_attention
from hybrid_jax.ops.attention_decode import kv_cache_update, softmax_attention_step

STATIC = ("scale", "causal", "window", "impl", "block_size")
attend = jax.jit(softmax_attention, static_argnames=STATIC)


@functools.partial(jax.jit, static_argnames=STATIC)
def attend_grads(q, k, v, cotangent, **options):
    """Gradients of <softmax_attention(q, k, v), cotangent> with respect to q, k, v."""
    return jax.grad(lambda *qkv: jnp.sum(softmax_attention(*qkv, **options) * cotangent), argnums=(0, 1, 2))(q, k, v)


def make_inputs(seed, b, tq, tk, h, hkv, dk, dv, dtype=jnp.float32):
    # numpy draws: jax.random would compile anew for every shape.
    rng = np.random.default_rng(seed)
    shapes = [(b, tq, h, dk), (b, tk, hkv, dk), (b, tk, hkv, dv), (b, tq, h, dv)]
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes)


# name: (B, Tq, Tk, H, HKV, K, V, causal, window); block_size 4 never divides T.
CASES = {
    "gqa_causal": (2, 7, 7, 4, 2, 8, 8, True, None),
    "mqa_window": (1, 9, 9, 3, 1, 8, 8, True, 3),
    "noncausal": (2, 6, 6, 2, 2, 8, 8, False, None),
    "noncausal_window": (1, 7, 7, 2, 1, 8, 8, False, 2),
    "prefill_tq_lt_tk": (2, 3, 10, 4, 2, 8, 8, True, 4),
    "single_step": (2, 1, 1, 2, 2, 8, 8, True, None),
}
BLOCK = 4


def case_inputs(name):
    b, tq, tk, h, hkv, dk, dv, causal, window = CASES[name]
    return make_inputs(0, b, tq, tk, h, hkv, dk, dv), dict(causal=causal, window=window)


@functools.lru_cache(maxsize=None)
def reference_results(name):
    (q, k, v, cotangent), options = case_inputs(name)
    o = attend(q, k, v, impl="reference", **options)
    return o, attend_grads(q, k, v, cotangent, impl="reference", **options)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", ["chunk", "xla"])
@pytest.mark.parametrize("name", list(CASES))
def test_impl_equals_reference_forward_and_grads(name, impl):
    (q, k, v, cotangent), options = case_inputs(name)
    o_ref, grads_ref = reference_results(name)
    o = attend(q, k, v, impl=impl, block_size=BLOCK, **options)
    assert o.shape == o_ref.shape and o.dtype == jnp.float32
    assert_close(o, o_ref)
    grads = attend_grads(q, k, v, cotangent, impl=impl, block_size=BLOCK, **options)
    for arg, grad, grad_ref in zip("qkv", grads, grads_ref):
        assert grad.shape == grad_ref.shape, arg
        assert_close(grad, grad_ref, atol=1e-4)


def test_reference_matches_dense_numpy():
    """Independent check of the ground truth: explicit per-head loops over a [Tq, Tk] mask."""
    (q, k, v, _), options = case_inputs("prefill_tq_lt_tk")
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, tq, h, dk = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    expected = np.zeros((b, tq, h, v.shape[-1]))
    for head in range(h):
        kv_head = head // (h // hkv)
        logits = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv_head]) / np.sqrt(dk)
        for i in range(tq):
            p = tk - tq + i
            keys = [j for j in range(tk) if j <= p and p - j < options["window"]]
            w = np.exp(logits[:, i, keys] - logits[:, i, keys].max(-1, keepdims=True))
            expected[:, i, head] = np.einsum("bk,bkv->bv", w / w.sum(-1, keepdims=True), v[:, keys, kv_head])
    assert_close(reference_results("prefill_tq_lt_tk")[0], expected)


@pytest.mark.parametrize("impl", ["reference", "chunk", "xla"])
def test_rows_without_keys_are_zero_with_finite_grads(impl):
    # Tq > Tk: the first two queries sit at positions -2 and -1, before every key.
    q, k, v, cotangent = make_inputs(1, 1, 5, 3, 2, 1, 8, 8)
    o = attend(q, k, v, impl=impl, block_size=2)
    np.testing.assert_array_equal(np.asarray(o[:, :2]), 0.0)
    assert_close(o[:, 2:], attend(q[:, 2:], k, v, impl="reference"))
    grads = attend_grads(q, k, v, cotangent, impl=impl, block_size=2)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0][:, :2]), 0.0)


def test_chunk_supports_value_dim_different_from_key_dim():
    q, k, v, cotangent = make_inputs(2, 2, 6, 6, 2, 1, 8, 5)
    assert_close(attend(q, k, v, impl="chunk", block_size=4), attend(q, k, v, impl="reference"))
    for grad, grad_ref in zip(attend_grads(q, k, v, cotangent, impl="chunk", block_size=4),
                              attend_grads(q, k, v, cotangent, impl="reference")):
        assert_close(grad, grad_ref, atol=1e-4)


@pytest.mark.parametrize("impl", ["chunk", "xla"])
def test_bfloat16_in_bfloat16_out_close_to_float32(impl):
    q, k, v, cotangent = make_inputs(3, 2, 7, 7, 4, 2, 8, 8, dtype=jnp.bfloat16)
    o = attend(q, k, v, impl=impl, block_size=BLOCK)
    assert o.dtype == jnp.bfloat16
    o_ref = attend(*(x.astype(jnp.float32) for x in (q, k, v)), impl="reference")
    assert_close(o, o_ref, rtol=2e-2, atol=2e-2)
    grads = attend_grads(q, k, v, cotangent, impl=impl, block_size=BLOCK)
    grads_ref = attend_grads(*(x.astype(jnp.float32) for x in (q, k, v, cotangent)), impl="reference")
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad.dtype == jnp.bfloat16
        assert_close(grad, grad_ref, rtol=5e-2, atol=5e-2)


@given(
    b=st.integers(1, 2),
    tq=st.integers(1, 9),
    extra_keys=st.integers(0, 4),
    kv_heads_and_groups=st.sampled_from([(1, 1), (1, 3), (2, 2)]),
    causal=st.booleans(),
    window=st.sampled_from([None, 1, 3]),
    block_size=st.integers(1, 6),
)
def test_chunk_equals_reference_for_any_shape(b, tq, extra_keys, kv_heads_and_groups, causal, window, block_size):
    hkv, groups = kv_heads_and_groups
    q, k, v, _ = make_inputs(4, b, tq, tq + extra_keys, hkv * groups, hkv, 4, 3)
    options = dict(causal=causal, window=window)
    expected = attend(q, k, v, impl="reference", **options)
    assert_close(attend(q, k, v, impl="chunk", block_size=block_size, **options), expected)


def _largest_intermediate(jaxpr) -> int:
    """Largest array any equation (including those inside scans and custom rules) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    largest = max(largest, _largest_intermediate(sub))
    return largest


@pytest.mark.parametrize("impl, materialises", [("chunk", False), ("reference", True)])
def test_chunk_never_materialises_the_score_matrix(impl, materialises):
    b, t, h = 1, 32, 2
    q, k, v, cotangent = make_inputs(5, b, t, t, h, h, 2, 2)

    def loss(q, k, v):
        return jnp.sum(softmax_attention(q, k, v, impl=impl, block_size=4) * cotangent)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    assert (_largest_intermediate(jaxpr) >= b * h * t * t) == materialises


def test_jit_matches_eager():
    (q, k, v, _), options = case_inputs("gqa_causal")
    eager = softmax_attention(q, k, v, impl="chunk", block_size=BLOCK, **options)
    assert_close(attend(q, k, v, impl="chunk", block_size=BLOCK, **options), eager, rtol=1e-6, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("window",))
def decode_all(q, k, v, k_cache, v_cache, *, window):
    """Feeds T tokens one at a time through kv_cache_update + softmax_attention_step."""

    def step(caches, inputs):
        q_t, k_t, v_t, t = inputs
        position = jnp.full((q.shape[0],), t, jnp.int32)
        k_cache, v_cache = kv_cache_update(*caches, k_t, v_t, position)
        o_t = softmax_attention_step(q_t, k_cache, v_cache, length=position + 1, window=window)
        return (k_cache, v_cache), o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v)]
    _, o = jax.lax.scan(step, (k_cache, v_cache), (*time_major, jnp.arange(q.shape[1])))
    return jnp.moveaxis(o, 0, 1)


@pytest.mark.parametrize("window", [None, 3])
def test_decode_steps_equal_causal_forward(window):
    q, k, v, _ = make_inputs(6, 2, 6, 6, 4, 2, 8, 8)
    # Stale cache contents past `length` must be ignored, so start from noise, not zeros.
    k_cache, v_cache = (10 * x for x in make_inputs(7, 2, 8, 8, 2, 2, 8, 8)[1:3])
    expected = attend(q, k, v, impl="reference", causal=True, window=window)
    assert_close(decode_all(q, k, v, k_cache, v_cache, window=window), expected)


def test_step_with_ragged_lengths_matches_prefill_rows():
    q, k, v, _ = make_inputs(8, 2, 1, 7, 4, 2, 8, 8)
    lengths = np.array([3, 7], np.int32)
    o = softmax_attention_step(q[:, 0], k, v, length=jnp.asarray(lengths), window=4)
    for row, length in enumerate(lengths):
        expected = attend(q[row : row + 1], k[row : row + 1, :length], v[row : row + 1, :length],
                          impl="reference", window=4)
        assert_close(o[row], expected[0, 0])
    empty = softmax_attention_step(q[:, 0], k, v, length=jnp.zeros(2, jnp.int32))
    np.testing.assert_array_equal(np.asarray(empty), 0.0)


def test_kv_cache_update_writes_one_slot_per_row():
    k_cache, v_cache = jnp.zeros((3, 5, 2, 4)), jnp.zeros((3, 5, 2, 6))
    k_t, v_t = jnp.ones((3, 2, 4)), 2 * jnp.ones((3, 2, 6))
    index = jnp.array([0, 4, 9], jnp.int32)  # the last row is out of range: dropped
    new_k, new_v = kv_cache_update(k_cache, v_cache, k_t, v_t, index)
    written = np.zeros((3, 5), bool)
    written[0, 0] = written[1, 4] = True
    np.testing.assert_array_equal(np.asarray(new_k[..., 0, 0]), written.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(new_v[..., 1, 5]), 2 * written.astype(np.float32))


def _qkv(b=1, tq=4, tk=4, h=2, hkv=1, dk=4, dv=4):
    return make_inputs(9, b, tq, tk, h, hkv, dk, dv)[:3]


@pytest.mark.parametrize(
    "make_call, message",
    [
        (lambda: softmax_attention(*_qkv(), impl="flash"),
         r"softmax_attention: unknown impl='flash'; valid choices are \['reference', 'chunk', 'xla'\]"),
        (lambda: softmax_attention(*_qkv(h=3, hkv=2)),
         r"q heads H=3 must be a multiple of k/v heads HKV=2"),
        (lambda: softmax_attention(_qkv()[0][0], *_qkv()[1:]),
         r"softmax_attention: q must have shape \[B, T, H, D\] \(rank 4\), got shape \(4, 2, 4\)"),
        (lambda: softmax_attention(_qkv()[0], _qkv(dk=3)[1], _qkv()[2]),
         r"softmax_attention: k must have shape \[B, Tk, HKV, K\] \(B and K as in q\) = \(1, 4, 1, 4\)"),
        (lambda: softmax_attention(*_qkv()[:2], _qkv(tk=5)[2]),
         r"softmax_attention: v must have shape \[B, Tk, HKV, V\]"),
        (lambda: softmax_attention(*_qkv()[:2], _qkv()[2].astype(jnp.bfloat16)),
         r"q, k, v must share one dtype, got q: float32, k: float32, v: bfloat16"),
        (lambda: softmax_attention(*_qkv(), window=0), r"window must be None or an int >= 1, got 0"),
        (lambda: softmax_attention(*_qkv(), block_size=0), r"block_size must be an int >= 1, got 0"),
        (lambda: softmax_attention(*_qkv(dv=3), impl="xla"),
         r"impl='xla' .* needs equal key and value head dims, got K=4 and V=3"),
        (lambda: softmax_attention_step(_qkv()[0][:, 0], *_qkv()[1:], length=jnp.array([1, 2])),
         r"softmax_attention_step: length must have shape \[B\] = \(1,\), got \(2,\)"),
        (lambda: softmax_attention_step(_qkv()[0], *_qkv()[1:], length=jnp.array([1])),
         r"softmax_attention_step: q_t must have shape \[B, H, K\] \(rank 3\)"),
        (lambda: kv_cache_update(*_qkv()[1:], jnp.ones((1, 2, 4)), jnp.ones((1, 1, 4)), jnp.array([0])),
         r"kv_cache_update: k_t must have shape \[B, HKV, K\] = \(1, 1, 4\), got \(1, 2, 4\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_call, message):
    with pytest.raises(ValueError, match=message):
        make_call()
