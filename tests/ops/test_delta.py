"""delta_rule, gated_delta_rule and kda: every impl equals the reference recurrence, also under strong
decay, beta in {0, 1}, long sequences, bf16 and grouped heads; cross-family identities. The steps are
checked against a numpy recurrence in test_steps.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hybrid_jax import ops
from tests.ops import mixers
from tests.ops.mixers import Shape, assert_close, check_against_reference

NAMES = ["delta_rule", "gated_delta_rule", "kda"]


@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,with_state", [
    (Shape(), True),
    (Shape(batch=1, time=1, heads=1, value_heads=1), False),
])
def test_matches_reference(name, impl, shape, with_state):
    check_against_reference(name, impl, shape, with_state=with_state)


@pytest.mark.parametrize("name", ["kda", "gla"])
def test_pallas_kernel_through_the_op(name):
    """impl="pallas" dispatches to pallas_kernels (interpret mode on CPU) and equals the reference."""
    check_against_reference(name, "pallas", Shape(batch=1, time=40, heads=1, value_heads=2, key_dim=16,
                                                  value_dim=16), chunk_size=16)


def test_auto_is_chunk_on_cpu_and_pallas_limits_are_named():
    q, k, v, g, beta, state = _kda_inputs(Shape(time=20))
    auto = ops.kda(q, k, v, g=g, beta=beta, impl="auto")[0]
    assert_close(auto, ops.kda(q, k, v, g=g, beta=beta, impl="chunk")[0], rtol=0, what="auto on CPU")
    with pytest.raises(ValueError, match=r"K=8 must be a multiple of 16"):
        ops.kda(q, k, v, g=g, beta=beta, impl="pallas", chunk_size=16)


@pytest.mark.parametrize("chunk", [16, 32, 64, 128])
def test_kda_every_chunk_size(chunk):
    check_against_reference("kda", "chunk", Shape(batch=1, time=150, heads=1, value_heads=2),
                            chunk_size=chunk, grads=chunk == 64)


@given(time=st.integers(1, 70), group=st.sampled_from([1, 2]), name=st.sampled_from(NAMES))
def test_chunk_any_length(time, group, name):
    check_against_reference(name, "chunk", Shape(batch=1, time=time, heads=1, value_heads=group),
                            chunk_size=16, grads=False)


def _kda_inputs(shape, seed=0):
    (q, k, v), kw = mixers.make_gated_delta(jax.random.PRNGKey(seed), shape, jnp.float32, per_channel=True)
    state = jax.random.normal(jax.random.PRNGKey(seed + 1), mixers.SPECS["kda"].state_shape(shape))
    return q, k, v, kw["g"], kw["beta"], state


_kda = jax.jit(lambda q, k, v, g, beta, s: ops.kda(q, k, v, g=g, beta=beta, initial_state=s,
                                                   output_final_state=True))
_kda_ref = jax.jit(lambda q, k, v, g, beta, s: ops.kda(q, k, v, g=g, beta=beta, initial_state=s,
                                                       output_final_state=True, impl="reference"))


@pytest.mark.parametrize("case", ["g=-20", "chunk decay below float32", "beta=0", "beta=1", "g=0"])
def test_numerics_edge_cases(case):
    shape = Shape(time=150, value_heads=2, heads=1)
    q, k, v, g, beta, state = _kda_inputs(shape)
    if case == "g=-20":
        g = jnp.full_like(g, -20.0)
    elif case == "chunk decay below float32":  # sum over a 64-chunk ~ -250: exp underflows float32
        g = g * 0 - 4.0 + 0.1 * jnp.sin(jnp.arange(shape.time))[None, :, None, None]
    elif case == "beta=0":
        beta = jnp.zeros_like(beta)
    elif case == "beta=1":
        beta = jnp.ones_like(beta)
    else:
        g = jnp.zeros_like(g)
    o, s = _kda(q, k, v, g, beta, state)
    o_ref, s_ref = _kda_ref(q, k, v, g, beta, state)
    assert_close(o, o_ref, what=f"{case} output")
    assert_close(s, s_ref, what=f"{case} state")
    if case == "beta=0":  # nothing is written: the state only decays
        decayed = jnp.exp(jnp.sum(g, axis=1))[..., None] * state
        assert_close(s, decayed, what="beta=0 state is the decayed initial state")


def test_long_sequence_near_zero_gate():
    """T = 65536 with g near 0: finite and equal to the reference (errors must not accumulate)."""
    shape = Shape(batch=1, time=65536, heads=1, value_heads=1, key_dim=4, value_dim=4)
    q, k, v, g, beta, state = _kda_inputs(shape, seed=7)
    g = g * 1e-4
    o, s = _kda(q, k, v, g, beta, state)
    o_ref, s_ref = _kda_ref(q, k, v, g, beta, state)
    assert np.isfinite(np.asarray(o)).all()
    assert_close(o, o_ref, rtol=1e-4, what="T=65536 output")
    assert_close(s, s_ref, rtol=1e-4, what="T=65536 state")


def test_identities():
    shape = Shape(time=40)
    (q, k, v), kw = mixers.make_gated_delta(jax.random.PRNGKey(3), shape, jnp.float32)
    g, beta = kw["g"], kw["beta"]
    gdn = ops.gated_delta_rule(q, k, v, g=g, beta=beta)[0]
    kda = ops.kda(q, k, v, g=jnp.broadcast_to(g[..., None], g.shape + (shape.key_dim,)), beta=beta)[0]
    assert_close(gdn, kda, what="GDN == KDA with the gate broadcast over K")
    assert_close(ops.gated_delta_rule(q, k, v, g=jnp.zeros_like(g), beta=beta)[0],
                 ops.delta_rule(q, k, v, beta=beta)[0], what="GDN with g = 0 == DeltaNet")
    state = jax.random.normal(jax.random.PRNGKey(4), mixers.SPECS["kda"].state_shape(shape))
    o, s = ops.delta_rule(q, k, v, beta=jnp.zeros_like(beta), initial_state=state, output_final_state=True)
    assert_close(s, state, what="beta = 0 leaves the state unchanged")
    qq = jnp.repeat(q, 2, axis=2) * shape.key_dim**-0.5
    assert_close(o, jnp.einsum("bthk,bhkv->bthv", qq, state), what="beta = 0 reads the initial state")
    # beta = 1 with orthonormal keys: the state stores exactly v for each key (a key-value memory).
    eye_k = jnp.broadcast_to(jnp.eye(shape.key_dim)[None, :, None, :], (1, shape.key_dim, 1, shape.key_dim))
    vv = jax.random.normal(jax.random.PRNGKey(5), (1, shape.key_dim, 1, shape.value_dim))
    _, s = ops.delta_rule(eye_k, eye_k, vv, beta=jnp.ones((1, shape.key_dim, 1)), output_final_state=True)
    assert_close(s[0, 0], vv[0, :, 0], what="beta = 1 memorises v at orthonormal keys")


def test_bf16_inputs_keep_float32_state():
    shape = Shape(time=19)
    q, k, v, g, beta, state = _kda_inputs(shape)
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    o, s = ops.kda(bf(q), bf(k), bf(v), g=bf(g), beta=bf(beta), output_final_state=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    f32 = lambda x: bf(x).astype(jnp.float32)  # noqa: E731
    o_ref, s_ref = ops.kda(f32(q), f32(k), f32(v), g=f32(g), beta=f32(beta), output_final_state=True,
                           impl="reference")
    assert_close(o, o_ref, rtol=1e-2, what="bf16 output")
    assert_close(s, s_ref, rtol=1e-5, what="float32 state")


def test_backward_memory_does_not_hold_a_state_per_token():
    """Growing V by 192 columns adds T * K * 192 floats to a backward that keeps every token's state
    (the associative scan does); the chunked backward keeps only chunk states and O(T * V) terms."""
    b, t, h, k_dim = 1, 1024, 1, 32

    def temp_bytes(impl, v_dim):
        shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
                  [(b, t, h, k_dim), (b, t, h, k_dim), (b, t, h, v_dim), (b, t, h, k_dim), (b, t, h)]]
        loss = lambda q, k, v, g, beta: ops.kda(q, k, v, g=g, beta=beta, impl=impl)[0].sum()  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    per_token_state_growth = t * h * k_dim * 192 * 4
    assert temp_bytes("scan", 256) - temp_bytes("scan", 64) > per_token_state_growth
    assert temp_bytes("chunk", 256) - temp_bytes("chunk", 64) < per_token_state_growth / 4


@functools.lru_cache(maxsize=None)
def _kda_forward_temp_bytes(t, k_dim=128, chunk_size=64):
    """Compiled temporary memory of a KDA forward (B = H = 1, V = K), from XLA's memory analysis."""
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in
              [(1, t, 1, k_dim), (1, t, 1, k_dim), (1, t, 1, k_dim), (1, t, 1, k_dim), (1, t, 1)]]
    forward = lambda q, k, v, g, beta: ops.kda(q, k, v, g=g, beta=beta, chunk_size=chunk_size)[0]  # noqa: E731
    return jax.jit(forward).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("t", [37, 63])
def test_short_per_channel_sequence_has_no_memory_cliff(t):
    """T < chunk_size and odd: the one chunk pads to whole sub-chunks of 16 instead of shrinking them to
    one token, which formed a C x C x K decay tensor (at T = 63: 2.5x the memory of T = 64)."""
    assert _kda_forward_temp_bytes(t) <= 2 * _kda_forward_temp_bytes(64)


def test_errors_name_the_problem():
    q, k, v, g, beta, _ = _kda_inputs(Shape(time=4))
    with pytest.raises(ValueError, match=r"kda: g must have shape \[B, T, HV, K\]"):
        ops.kda(q, k, v, g=g[..., 0], beta=beta)
    with pytest.raises(ValueError, match=r"gated_delta_rule: g must have shape \[B, T, HV\]"):
        ops.gated_delta_rule(q, k, v, g=g, beta=beta)
    with pytest.raises(ValueError, match=r"beta must have shape \[B, T, HV\]"):
        ops.delta_rule(q, k, v, beta=beta[..., :1])
    with pytest.raises(ValueError, match=r"chunk_size must be an int"):
        ops.delta_rule(q, k, v, beta=beta, chunk_size=0)
