"""The first-order linear recurrence: associative-scan and chunked forms equal the sequential one."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from hybrid_jax.ops.first_order import linear_recurrence
from tests.ops.mixers import assert_close


def _inputs(time, seed=0, log_a=True):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    a = -jax.nn.softplus(jax.random.normal(k1, (2, time, 3, 4)))
    b = jax.random.normal(k2, (2, time, 3, 4))
    h0 = jax.random.normal(k3, (2, 3, 4))
    return (a if log_a else jnp.exp(a)), b, h0


@pytest.mark.parametrize("log_a", [True, False])
@pytest.mark.parametrize("impl", ["scan", "chunk"])
def test_forward_and_grad_match_reference(impl, log_a):
    a, b, h0 = _inputs(37, log_a=log_a)

    def loss(impl, a, b, h0):
        hs, final = linear_recurrence(a, b, initial_state=h0, log_a=log_a, impl=impl, chunk_size=8)
        return jnp.sum(jnp.sin(hs)) + jnp.sum(final**2), (hs, final)

    (_, (hs, final)), grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(impl, a, b, h0)
    (_, (hs_r, final_r)), grads_r = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
        "reference", a, b, h0)
    assert_close(hs, hs_r, what="states")
    assert_close(final, final_r, what="final")
    for g, g_r, name in zip(grads, grads_r, "a b h0".split()):
        assert_close(g, g_r, rtol=1e-4, what=f"grad {name}")


@given(time=st.integers(1, 50), chunk=st.sampled_from([1, 4, 16]))
def test_chunk_any_length(time, chunk):
    a, b, h0 = _inputs(time, seed=time)
    hs, final = linear_recurrence(a, b, initial_state=h0, log_a=True, impl="chunk", chunk_size=chunk)
    hs_r, final_r = linear_recurrence(a, b, initial_state=h0, log_a=True, impl="reference")
    assert_close(hs, hs_r, what="states")
    assert_close(final, final_r, what="final")


def test_errors():
    a, b, h0 = _inputs(5)
    with pytest.raises(ValueError, match="valid choices are"):
        linear_recurrence(a, b, impl="pallas")
    with pytest.raises(ValueError, match="same shape"):
        linear_recurrence(a, b[:, :4])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, ...\] = \(2, 3, 4\)"):
        linear_recurrence(a, b, initial_state=h0[:, :2])
