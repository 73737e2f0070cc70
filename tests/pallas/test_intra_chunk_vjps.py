"""The hand-written VJPs of the in-chunk computations (`intra_chunk.decayed_products` for a scalar, an
exact per-channel and a safe per-channel decay, `invert_unit_lower`, `chunk_math.delta_transform`)
equal autodiff of plain formulas: the masked C x C (x K) decay tensor written out, and jnp.linalg.inv.
Gradients to every input, G included, against a random cotangent; odd leading shapes, C = 32 (two
sub-chunks of 16)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunk_math import MIN_LOWER_BOUND, cumulative_decay, decayed_products, delta_transform
from pallas_kernels.intra_chunk import invert_unit_lower

LEAD, C, K = (3, 2), 32, 8
RTOL = 2e-5  # float32 at "highest": the plain formulas sum in another order


def _g(key, per_channel, safe):
    shape = LEAD + (C, K if per_channel else 1)
    z = jax.random.normal(key, shape)
    return MIN_LOWER_BOUND * jax.nn.sigmoid(z) if safe else -jax.nn.softplus(z)


def _plain_products(xs, y, G):
    causal = jnp.tril(jnp.ones((C, C), bool))[..., None]
    decay = jnp.exp(jnp.where(causal, G[..., :, None, :] - G[..., None, :, :], -jnp.inf))  # [.., C, C, K or 1]
    return tuple(jnp.sum(x[..., :, None, :] * y[..., None, :, :] * decay, axis=-1) for x in xs)


def _assert_vjps_equal(f, plain, args):
    out, pull = jax.vjp(f, *args)
    want_out, want_pull = jax.vjp(plain, *args)
    cotangent = jax.tree.map(lambda o: jax.random.normal(jax.random.key(7), o.shape), out)
    for got, want in zip(jax.tree.leaves((out, pull(cotangent))), jax.tree.leaves((want_out, want_pull(cotangent)))):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("per_channel,safe", [(False, False), (True, False), (True, True)],
                         ids=["scalar", "per-channel-exact", "per-channel-safe"])
def test_decayed_products_vjp_equals_autodiff(per_channel, safe):
    kq, kk, kg = jax.random.split(jax.random.key(0), 3)
    q, k = jax.random.normal(kq, LEAD + (C, K)), jax.random.normal(kk, LEAD + (C, K))
    g = _g(kg, per_channel, safe)

    def ours(q, k, g):
        return decayed_products((q, k), k, cumulative_decay(g), safe_gate=safe)

    def plain(q, k, g):
        return _plain_products((q, k), k, jnp.cumsum(g, axis=-2))

    _assert_vjps_equal(ours, plain, (q, k, g))


def test_invert_unit_lower_and_delta_transform_vjps_equal_autodiff():
    ka, kv, kb, kk = jax.random.split(jax.random.key(1), 4)
    a_kk = jnp.tril(0.3 * jax.random.normal(ka, LEAD + (C, C)), -1)
    v, k_decayed = jax.random.normal(kv, LEAD + (C, K)), jax.random.normal(kk, LEAD + (C, K))
    beta = jax.nn.sigmoid(jax.random.normal(kb, LEAD + (C,)))
    eye = jnp.eye(C)

    # Both take a strictly lower matrix: their cotangents live on that support (hence the tril).
    _assert_vjps_equal(invert_unit_lower, lambda lower: jnp.linalg.inv(eye + jnp.tril(lower, -1)), (a_kk,))

    def plain(a_kk, v, beta, k_decayed):
        tm = jnp.linalg.inv(eye + beta[..., :, None] * jnp.tril(a_kk, -1)) * beta[..., None, :]
        return tm @ k_decayed, tm @ v

    _assert_vjps_equal(lambda *a: delta_transform(*a), plain, (a_kk, v, beta, k_decayed))
