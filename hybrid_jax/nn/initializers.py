r"""Initialisers of the SSM-style gate parameters shared by Mamba, Mamba-2, Gated DeltaNet and KDA.

dt_bias (every dt-parameterised layer): dt ~ exp(U(log dt_min, log dt_max)) floored at 1e-4, and

    dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt)),

so softplus(dt_bias) starts log-uniform in [dt_min, dt_max] (Mamba's initialisation).

A_log (per-head decay rates of Mamba-2, Gated DeltaNet and KDA): A ~ U(1, 16), A_log = log A, and
the layers use A = -exp(A_log) < 0 (Mamba's own S4D-real init, A_log[e, n] = log(n + 1), lives in
its layer).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
A_INIT_RANGE = (1.0, 16.0)


def inverse_softplus(y: jax.Array) -> jax.Array:
    # log(expm1(y)) written as y + log(1 - exp(-y)): no overflow for large y.
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(key: jax.Array, shape, dt_min: float = DT_MIN, dt_max: float = DT_MAX) -> jax.Array:
    """softplus^{-1} of dt log-uniform in [dt_min, dt_max] (floored at DT_FLOOR)."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(jnp.maximum(dt, DT_FLOOR))


def a_log_init(key: jax.Array, shape) -> jax.Array:
    """log A with A ~ U(1, 16): per-head decay rates of Mamba-2, Gated DeltaNet and KDA."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE))
