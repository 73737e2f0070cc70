"""Every `*_step` op, applied token by token from a random state, equals an independent float64 numpy
recurrence written from the math (tests/ops/numpy_reference.py); so does each op's impl="reference"
over the same tokens, which ties the whole-sequence forms to the same ground truth."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import ops
from tests.ops import mixers, numpy_reference as npref
from tests.ops.mixers import Shape, assert_close

SHAPE = Shape(batch=2, time=5, heads=1, value_heads=2, key_dim=4, value_dim=3)  # grouped heads

# name (a tests/ops/mixers.py spec) -> (sequence op, step op)
GATED = {
    "linear_attention": (ops.linear_attention, ops.linear_attention_step),
    "gla": (ops.gla, ops.gla_step),
    "gla_scalar": (ops.gla, ops.gla_step),
    "delta_rule": (ops.delta_rule, ops.delta_rule_step),
    "gated_delta_rule": (ops.gated_delta_rule, ops.gated_delta_rule_step),
    "kda": (ops.kda, ops.kda_step),
}


def _state(shape):
    return jax.random.normal(jax.random.PRNGKey(2), shape)


def _token(kwargs, t, suffix="_t"):
    return {f"{name}{suffix}": x[:, t] for name, x in kwargs.items()}


def _check(what, outs, final, expected):
    o_ref, final_ref = expected
    assert_close(jnp.stack(outs, 1), o_ref, what=f"{what} outputs")
    assert_close(final, final_ref, what=f"{what} final state")


@pytest.mark.parametrize("name", list(GATED))
def test_gated_steps(name):
    sequence_op, step = GATED[name]
    (q, k, v), kw = mixers.SPECS[name].make(jax.random.PRNGKey(1), SHAPE, jnp.float32)
    state0 = _state(mixers.SPECS[name].state_shape(SHAPE))
    expected = npref.gated_loop(q, k, v, state0, **kw)
    state, outs = state0, []
    for t in range(SHAPE.time):
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, **_token(kw, t))
        outs.append(o_t)
    _check(f"{name} steps", outs, state, expected)
    o, final = sequence_op(q, k, v, **kw, initial_state=state0, output_final_state=True, impl="reference")
    assert_close(o, expected[0], what=f"{name} reference")
    assert_close(final, expected[1], what=f"{name} reference final state")


@pytest.mark.parametrize("name", ["ssd", "selective_scan"])
def test_ssm_steps(name):
    spec = mixers.SPECS[name]
    (x, dt, a, b, c), kw = spec.make(jax.random.PRNGKey(3), SHAPE, jnp.float32)
    state0 = _state(spec.state_shape(SHAPE))
    loop, step = (npref.ssd_loop, ops.ssd_step) if name == "ssd" else (npref.selective_loop,
                                                                        ops.selective_scan_step)
    expected = loop(x, dt, a, b, c, state0, **kw)
    state, outs = state0, []
    for t in range(SHAPE.time):
        y_t, state = step(x[:, t], dt[:, t], a, b[:, t], c[:, t], state, **kw)
        outs.append(y_t)
    _check(f"{name} steps", outs, state, expected)
    y, final = spec.fn(x, dt, a, b, c, **kw, initial_state=state0, output_final_state=True,
                       impl="reference")
    assert_close(y, expected[0], what=f"{name} reference")
    assert_close(final, expected[1], what=f"{name} reference final state")


@pytest.mark.parametrize("window", [None, 2])
def test_softmax_attention_steps(window):
    """kv_cache_update + softmax_attention_step over a growing cache == causal softmax, token by token."""
    keys = jax.random.split(jax.random.PRNGKey(4), 3)
    b, t, heads, kv_heads, dk, dv = 2, 5, 4, 2, 4, 3
    q = jax.random.normal(keys[0], (b, t, heads, dk))
    k = jax.random.normal(keys[1], (b, t, kv_heads, dk))
    v = jax.random.normal(keys[2], (b, t, kv_heads, dv))
    k_cache, v_cache = jnp.zeros((b, t + 2, kv_heads, dk)), jnp.zeros((b, t + 2, kv_heads, dv))
    outs = []
    for i in range(t):
        index = jnp.full((b,), i, jnp.int32)
        k_cache, v_cache = ops.kv_cache_update(k_cache, v_cache, k[:, i], v[:, i], index)
        outs.append(ops.softmax_attention_step(q[:, i], k_cache, v_cache, length=index + 1, window=window))
    assert_close(jnp.stack(outs, 1), npref.softmax_decode_loop(q, k, v, window=window), what="decode steps")


@pytest.mark.parametrize("transition", ["gla_scalar", "kda"])
def test_log_linear_steps(transition):
    """From a random FenwickState at position 5 (levels 0..4), six tokens; position 8 merges levels
    0..3 into level 4."""
    position, n_levels = 5, ops.num_levels(5 + 6)
    shape = Shape(batch=2, time=6, heads=1, value_heads=2, key_dim=4, value_dim=3)
    (q, k, v), kw = mixers.SPECS[transition].make(jax.random.PRNGKey(5), shape, jnp.float32)
    kw["level_scales"] = jax.random.normal(jax.random.PRNGKey(6), (2, shape.time, 2, n_levels))
    levels = _state((2, 2, n_levels, shape.key_dim, shape.value_dim))
    expected = npref.log_linear_loop(q, k, v, levels, position, **kw)
    state, outs = ops.FenwickState(levels, jnp.int32(position)), []
    for t in range(shape.time):
        o_t, state = ops.log_linear_attention_step(q[:, t], k[:, t], v[:, t], state, **_token(kw, t))
        outs.append(o_t)
    _check(f"log-linear {transition} steps", outs, state.levels, expected)
    assert int(state.position) == position + shape.time
    o, final = ops.log_linear_attention(q, k, v, **kw, initial_state=ops.FenwickState(levels, position),
                                        output_final_state=True, impl="reference")
    assert_close(o, expected[0], what="log-linear reference")
    assert_close(final.levels, expected[1], what="log-linear reference final levels")


def test_numpy_loops_can_disagree():
    """The comparison is not vacuous: a wrong decay (g doubled) moves the numpy outputs."""
    (q, k, v), kw = mixers.SPECS["kda"].make(jax.random.PRNGKey(1), SHAPE, jnp.float32)
    state0 = _state(mixers.SPECS["kda"].state_shape(SHAPE))
    right = npref.gated_loop(q, k, v, state0, **kw)[0]
    wrong = npref.gated_loop(q, k, v, state0, g=2 * kw["g"], beta=kw["beta"])[0]
    assert np.max(np.abs(right - wrong)) > 1e-2


@pytest.mark.parametrize("with_isolated", [False, True])
def test_rg_lru_steps(with_isolated):
    """rg_lru_step token by token, and rg_lru(impl="reference"), == the float64 loop (per-head channels;
    with isolated tokens: row 0's tokens 1 and 2, row 1's token 3)."""
    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    shape = (2, SHAPE.time, 2, 3)  # [B, T, H, P]
    x = jax.random.normal(keys[0], shape)
    gate_x, gate_a = (jax.nn.sigmoid(jax.random.normal(k, shape)) for k in keys[1:3])
    a_param = jax.random.normal(keys[3], shape[2:])
    state0 = _state((2,) + shape[2:])
    isolated = jnp.zeros((2, SHAPE.time), bool).at[0, 1:3].set(True).at[1, 3].set(True)
    isolated = isolated if with_isolated else None
    expected = npref.rg_lru_loop(x, gate_x, gate_a, a_param, state0, isolated=isolated)
    state, outs = state0, []
    for t in range(SHAPE.time):
        flags = None if isolated is None else isolated[:, t]
        y_t, state = ops.rg_lru_step(x[:, t], gate_x[:, t], gate_a[:, t], a_param, state, isolated_t=flags)
        outs.append(y_t)
    _check("rg_lru steps", outs, state, expected)
    y, final = ops.rg_lru(x, gate_x, gate_a, a_param, initial_state=state0, output_final_state=True,
                          isolated=isolated, impl="reference")
    assert_close(y, expected[0], what="rg_lru reference")
    assert_close(final, expected[1], what="rg_lru reference final state")
