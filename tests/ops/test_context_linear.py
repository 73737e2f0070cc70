"""Context parallelism of the linear recurrences (hybrid_jax.ops.context): the time axis split over
2, 4 or 8 fake devices gives the 1-device outputs, final state and gradients, with documents that
cross shard boundaries (one starting exactly on one, padding at the end), an initial state and
grouped heads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hybrid_jax import ops
from tests.ops.sharding import check_context_parallel, context_mesh, context_parallel, crossing_documents

B, H, HV, K, V = 2, 2, 4, 8, 8


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32)


def _inputs(t, key=0):
    ks = jax.random.split(jax.random.key(key), 6)
    q, k = _normal(ks[0], (B, t, H, K)), _normal(ks[1], (B, t, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = _normal(ks[2], (B, t, HV, V))
    g_channel = -jax.nn.softplus(_normal(ks[3], (B, t, HV, K)))
    beta = jax.nn.sigmoid(_normal(ks[4], (B, t, HV)))
    state = _normal(ks[5], (B, HV, K, V), 0.5)
    return q, k, v, g_channel, beta, state


# (op name, context shards, data shards, chunk size, with segment ids)
CASES = [
    ("kda", 2, 1, 8, True),
    ("kda", 8, 1, 4, False),
    ("gated_delta_rule", 4, 1, 8, True),
    ("delta_rule", 2, 2, 8, True),
    ("gla", 4, 1, 8, True),
    ("linear_attention", 2, 1, 16, False),
    ("ssd", 4, 2, 8, True),
]


def _op(name, chunk):
    def run(per_token, shared, context_axis):
        q, k, v, g, beta, *ids = per_token
        (state,) = shared
        options = dict(initial_state=state, output_final_state=True, chunk_size=chunk,
                       context_axis=context_axis, segment_ids=ids[0] if ids else None)
        if name == "kda":
            return ops.kda(q, k, v, g=g, beta=beta, **options)
        if name == "gated_delta_rule":
            return ops.gated_delta_rule(q, k, v, g=g[..., 0], beta=beta, **options)
        if name == "delta_rule":
            return ops.delta_rule(q, k, v, beta=beta, **options)
        if name == "gla":
            return ops.gla(q, k, v, g=g, **options)
        if name == "linear_attention":
            return ops.linear_attention(q, k, v, **options)
        # ssd: heads HV with B, C shared by groups of H; value heads as the state's V
        return ops.ssd(v, beta, -jnp.ones((HV,)), k, q, D=jnp.ones((HV,)), **options)
    return run


@pytest.mark.parametrize("name,context,data,chunk,documents", CASES)
def test_context_parallel_equals_one_device(name, context, data, chunk, documents):
    t = 8 * context
    q, k, v, g, beta, state = _inputs(t)
    per_token = (q, k, v, g, beta) + ((crossing_documents(t, context),) if documents else ())
    check_context_parallel(_op(name, chunk), per_token, (state,), context=context, data=data)


def test_context_axis_needs_the_chunked_form():
    q, k, v, g, beta, _ = _inputs(8)
    def reference(per_token, shared, context_axis):
        q, k, v, g, beta = per_token
        return ops.kda(q, k, v, g=g, beta=beta, impl="reference", context_axis=context_axis)

    with pytest.raises(ValueError, match="impl='chunk'"):
        jax.jit(lambda per_token: context_parallel(reference, context_mesh(2), per_token, ()))((q, k, v, g, beta))


# (op name, impl, context shards, data shards)
FIRST_ORDER = [("rg_lru", "chunk", 4, 1), ("selective_scan", "scan", 2, 2), ("selective_scan", "reference", 8, 1)]


def _first_order(name, impl):
    def run(per_token, shared, context_axis):
        x, gate_x, gate_a, ids, iso = per_token
        state, a_param = shared
        options = dict(initial_state=state, output_final_state=True, impl=impl, chunk_size=4,
                       segment_ids=ids, isolated=iso, context_axis=context_axis)
        if name == "rg_lru":
            return ops.rg_lru(x, gate_x, gate_a, a_param, **options)
        # selective scan: u = x, dt = gate_x, B and C from gate_a's channels
        return ops.selective_scan(x, gate_x, -jnp.exp(a_param)[:, None] * jnp.ones((1, 4)),
                                  gate_a[..., :4], gate_a[..., 4:], D=a_param, **options)
    return run


@pytest.mark.parametrize("name,impl,context,data", FIRST_ORDER)
def test_first_order_context_parallel(name, impl, context, data):
    t, d = 8 * context, 8
    ks = jax.random.split(jax.random.key(1), 5)
    x = _normal(ks[0], (B, t, d))
    gate_x, gate_a = (jax.nn.sigmoid(_normal(k, (B, t, d))) for k in ks[1:3])
    iso = jax.random.bernoulli(ks[3], 0.2, (B, t))
    state_shape = (B, d) if name == "rg_lru" else (B, d, 4)
    shared = (_normal(ks[4], state_shape, 0.5), jnp.linspace(-1.0, 1.0, d))
    per_token = (x, gate_x, gate_a, crossing_documents(t, context), iso)
    check_context_parallel(_first_order(name, impl), per_token, shared, context=context, data=data)
