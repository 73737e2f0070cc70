"""rg_lru (Griffin's RG-LRU): every impl equals the reference in outputs, final states and gradients
(also with isolated tokens, which leak into no other output); log-space stability at weak and strong
decay; bfloat16 inputs; input errors (the step against a float64 loop: test_steps.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import ops
from hybrid_jax.ops import first_order
from hybrid_jax.ops.rg_lru import SQRT_MAX_GRADIENT, recurrence_inputs
from tests.ops.mixers import assert_close

CHUNK = 16


def _inputs(shape, seed=0, dtype=jnp.float32, decay_shift=0.0):
    """(x, gate_x, gate_a, a_param) for x `shape` = [B, T, *C]; a_param + decay_shift moves the decay."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(ks[0], shape).astype(dtype)
    gate_x, gate_a = (jax.nn.sigmoid(jax.random.normal(k, shape)).astype(dtype) for k in ks[1:3])
    return x, gate_x, gate_a, jax.random.normal(ks[3], shape[2:]) + decay_shift


@functools.lru_cache(maxsize=None)
def _compiled(impl):
    """(forward, grad w.r.t. the four inputs and the initial state) of one impl, jitted once."""

    def forward(args, h0, isolated=None):
        return ops.rg_lru(*args, initial_state=h0, output_final_state=True, isolated=isolated, impl=impl,
                          chunk_size=CHUNK)

    def loss(args, h0, cot_y, cot_h, isolated=None):
        y, final = forward(args, h0, isolated)
        return jnp.sum(y * cot_y) + jnp.sum(final * cot_h)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def _isolated(batch, time):
    """Row 0: tokens 5 and 6 (two candidates in a row) and the last; row 1: every third token."""
    return jnp.zeros((batch, time), bool).at[0, 5:7].set(True).at[0, -1].set(True).at[1:, ::3].set(True)


def _check_impl(impl, shape, *, with_state=True, decay_shift=0.0, isolated=None):
    args = _inputs(shape, decay_shift=decay_shift)
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    state_shape = (shape[0],) + shape[2:]
    h0 = jax.random.normal(ks[0], state_shape) if with_state else jnp.zeros(state_shape)
    cot_y, cot_h = jax.random.normal(ks[1], shape), jax.random.normal(ks[2], state_shape)
    results = {}
    for name in (impl, "reference"):
        forward, grad = _compiled(name)
        results[name] = forward(args, h0, isolated), grad(args, h0, cot_y, cot_h, isolated)
    (y, final), grads = results[impl]
    (y_ref, final_ref), grads_ref = results["reference"]
    assert_close(y, y_ref, what=f"{impl} output")
    assert_close(final, final_ref, what=f"{impl} final state")
    names = ("x", "gate_x", "gate_a", "a_param", "h0")
    for name, g, g_ref in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert_close(g, g_ref, what=f"{impl} grad {name}")


@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("shape,with_state", [
    ((2, 37, 3, 4), True),  # odd T over three chunks of 16, per-head channels [H, P], initial state
    ((1, 1, 5), False),  # T = 1, flat channels
])
def test_matches_reference(impl, shape, with_state):
    _check_impl(impl, shape, with_state=with_state)


def test_isolated_matches_reference():
    """The chunked form with isolated tokens (identity steps, then the reads) == the token loop."""
    shape = (2, 37, 3, 4)
    _check_impl("chunk", shape, isolated=_isolated(shape[0], shape[1]))


def test_isolated_candidate_leaks_nowhere():
    """Changing isolated token 5's inputs moves its own output only: not token 6 (also isolated), not
    the later history tokens, not the final state."""
    shape = (2, 37, 3, 4)
    args = _inputs(shape)
    isolated = _isolated(shape[0], shape[1])
    forward, _ = _compiled("chunk")
    h0 = jnp.zeros((2, 3, 4))
    y, final = forward(args, h0, isolated)
    moved = tuple(z.at[0, 5].set(z[0, 6]) for z in args[:3]) + args[3:]
    y_moved, final_moved = forward(moved, h0, isolated)
    changed = np.any(np.asarray(y_moved != y), axis=(2, 3))
    assert changed[0, 5] and np.sum(changed) == 1, np.argwhere(changed)
    np.testing.assert_array_equal(final_moved, final)


def test_chunk_strong_decay():
    """a_param + 6: log a down to about -8 * 9 per step; the chunk carries still match the reference."""
    _check_impl("chunk", (2, 37, 3, 4), decay_shift=6.0)


def test_write_is_exact_at_weak_decay():
    """1 - a^2 taken as -expm1(2 log a): at log a ~ -1e-5, 1 - exp(2 log a) in float32 would lose ~1e-3
    of the write; the op keeps it to float32 rounding."""
    x, gate_x, _, a_param = _inputs((2, 6, 5))
    gate_a = jnp.full(x.shape, 1e-6)
    _, write = recurrence_inputs(x, gate_x, gate_a, a_param)
    log_a = -8.0 * np.float64(1e-6) * np.logaddexp(0.0, np.asarray(a_param, np.float64))
    exact = np.sqrt(-np.expm1(2.0 * log_a)) * np.asarray(gate_x, np.float64) * np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(write), exact, rtol=1e-5)


def test_sqrt_gradient_is_bounded():
    """At r = 0 (a = 1, no write) d sqrt(1 - a^2) is infinite; the op caps it at SQRT_MAX_GRADIENT, so
    d write / d r = -SQRT_MAX_GRADIENT * 2 * (-c softplus(Lambda)) * i x, finite."""
    x, gate_x, _, a_param = _inputs((1, 3, 4))
    gate_a = jnp.zeros(x.shape)
    grad = jax.grad(lambda r: jnp.sum(recurrence_inputs(x, gate_x, r, a_param)[1]))(gate_a)
    expected = SQRT_MAX_GRADIENT * 2.0 * 8.0 * jax.nn.softplus(a_param) * gate_x * x
    assert_close(grad, expected, what="capped d write / d r")


def test_bf16():
    args = _inputs((2, 19, 6), dtype=jnp.bfloat16)
    h0 = jax.random.normal(jax.random.PRNGKey(3), (2, 6))
    y, s = ops.rg_lru(*args, initial_state=h0, output_final_state=True, chunk_size=CHUNK)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    f32 = [a.astype(jnp.float32) for a in args]
    y_ref, s_ref = ops.rg_lru(*f32, initial_state=h0, output_final_state=True, impl="reference")
    assert_close(y, y_ref, rtol=1e-2, what="bf16 y")
    assert_close(s, s_ref, rtol=1e-5, what="float32 state")


def test_errors():
    x, gate_x, gate_a, a_param = _inputs((2, 4, 3))
    with pytest.raises(ValueError, match=r"rg_lru: a_param must have shape C \(the channel dims of x\)"):
        ops.rg_lru(x, gate_x, gate_a, a_param[:2])
    with pytest.raises(ValueError, match=r"rg_lru: gate_a must have shape \[B, T, \*C\]"):
        ops.rg_lru(x, gate_x, gate_a[:, :3], a_param)
    with pytest.raises(ValueError, match=r"rg_lru: x must have shape \[B, T, \*C\] \(rank >= 3\)"):
        ops.rg_lru(x[..., 0], gate_x[..., 0], gate_a[..., 0], a_param[:0])
    with pytest.raises(ValueError, match=r"rg_lru: c must be > 0"):
        ops.rg_lru(x, gate_x, gate_a, a_param, c=0.0)
    with pytest.raises(ValueError, match=r"rg_lru: initial_state must have shape \[B, \*C\] = \(2, 3\)"):
        ops.rg_lru(x, gate_x, gate_a, a_param, initial_state=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"valid choices are \['reference', 'scan', 'chunk'\]"):
        ops.rg_lru(x, gate_x, gate_a, a_param, impl="pallas")
    with pytest.raises(ValueError, match=r"rg_lru_step: state must have shape \[B, \*C\] = \(2, 3\)"):
        ops.rg_lru_step(x[:, 0], gate_x[:, 0], gate_a[:, 0], a_param, jnp.zeros((2, 2)))


def test_blocked_chunk_matches_reference(monkeypatch):
    """BLOCK_FLOATS shrunk to blocks of 32 tokens over T = 83 (three blocks, the last padded): a
    document starting exactly on a block boundary (t = 32, isolated there too), one crossing a
    boundary, padding at the end, isolated tokens and an initial state. The blocked chunked form of
    linear_recurrence, alone and under rg_lru == the token loop (outputs, final states, gradients)."""
    monkeypatch.setattr(first_order, "BLOCK_FLOATS", 2 * 12 * CHUNK * 2)  # B * C * chunk * 2 blocks' worth
    shape = (2, 83, 3, 4)
    args = _inputs(shape)
    ids = jnp.array([[1] * 32 + [2] * 40 + [3] * 8 + [0] * 3, [5] * 50 + [6] * 33], jnp.int32)
    isolated = _isolated(*shape[:2]).at[0, 32].set(True)
    h0 = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 4))
    cot = jax.random.normal(jax.random.PRNGKey(3), shape)

    def rg_lru(impl, args, h0):
        return ops.rg_lru(*args, initial_state=h0, output_final_state=True, isolated=isolated, segment_ids=ids,
                          impl=impl, chunk_size=CHUNK)

    def recurrence(impl, args, h0):
        a, b = -jax.nn.softplus(args[0]), args[1]
        return first_order.linear_recurrence(a, b, initial_state=h0, log_a=True, isolated=isolated,
                                             segment_ids=ids, impl=impl, chunk_size=CHUNK)

    for name, fn in (("rg_lru", rg_lru), ("linear_recurrence", recurrence)):
        def loss(impl, args, h0):
            y, final = fn(impl, args, h0)
            return jnp.sum(y * cot) + jnp.sum(final * final), (y, final)

        results = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), (0, 1), has_aux=True))(args, h0)
                   for impl in ("chunk", "reference")}
        (_, (y, final)), grads = results["chunk"]
        (_, (y_ref, final_ref)), grads_ref = results["reference"]
        assert_close(y, y_ref, what=f"{name} blocked output")
        assert_close(final, final_ref, what=f"{name} blocked final state")
        for path, g in jax.tree.leaves_with_path(grads):
            want = functools.reduce(lambda x, key: x[key.idx], path, grads_ref)
            assert_close(g, want, what=f"{name} blocked grad {jax.tree_util.keystr(path)}")
