r"""Initialisers of the SSM-style gate parameters shared by Mamba, Mamba-2, Gated DeltaNet and KDA.

dt_bias (every dt-parameterised layer): dt ~ exp(U(log dt_min, log dt_max)) floored at 1e-4, and

    dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt)),

so softplus(dt_bias) starts log-uniform in [dt_min, dt_max] (Mamba's initialisation).

KDA's safe gate g = lb * sigmoid(A (f + dt_bias)) (lb < 0 its lower bound) gets the dt_bias that
starts it, at f = 0, at the decay the softplus gate starts at, g = -A dt:

    dt_bias = logit(min(A dt / |lb|, 1/2)) / A,

capped at the sigmoid's midpoint where A dt would not fit under the bound. softplus^{-1}(dt) there
instead would put A dt_bias at -2 .. -110, deep in the sigmoid's lower tail: g ~ 0 and a vanishing
gradient for most channels, which trains measurably worse.

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


def log_uniform_dt(key: jax.Array, shape, dt_min: float = DT_MIN, dt_max: float = DT_MAX) -> jax.Array:
    """dt log-uniform in [dt_min, dt_max], floored at DT_FLOOR."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return jnp.maximum(dt, DT_FLOOR)


def dt_bias_init(key: jax.Array, shape, dt_min: float = DT_MIN, dt_max: float = DT_MAX) -> jax.Array:
    """softplus^{-1} of dt log-uniform in [dt_min, dt_max] (floored at DT_FLOOR)."""
    return inverse_softplus(log_uniform_dt(key, shape, dt_min, dt_max))


SAFE_GATE_MAX_START = 0.5  # the largest starting sigmoid(A dt_bias) of the safe gate: its midpoint


def safe_gate_bias_init(key: jax.Array, shape, a_log: jax.Array, lower_bound: float, dt_min: float = DT_MIN,
                        dt_max: float = DT_MAX) -> jax.Array:
    """dt_bias `shape` = `[HV, K]` of the safe gate (module docstring) for A = exp(a_log) `[HV]`: the
    gate starts at the softplus gate's decay -A dt (dt log-uniform in [dt_min, dt_max])."""
    rate = jnp.exp(a_log)[:, None]
    dt = log_uniform_dt(key, shape, dt_min, dt_max)
    start = jnp.minimum(rate * dt / -lower_bound, SAFE_GATE_MAX_START)
    return jax.scipy.special.logit(start) / rate


def a_log_init(key: jax.Array, shape) -> jax.Array:
    """log A with A ~ U(1, 16): per-head decay rates of Mamba-2, Gated DeltaNet and KDA."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE))
