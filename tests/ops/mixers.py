"""Shared test harness for the recurrent mixer primitives: input makers and the equivalence checks.

Each `MixerSpec` knows how to draw valid inputs for one op at a given shape; `check_against_reference`
runs one impl and the reference under jit and compares outputs, final states and the gradients of a
random projection of both with respect to every input (and the initial state).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_jax import ops
from hybrid_jax.ops import ssm


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 2
    time: int = 37
    heads: int = 2  # q/k heads (B/C groups for ssd)
    value_heads: int = 4  # v heads (HV), a multiple of heads
    key_dim: int = 8
    value_dim: int = 5


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _l2(x):
    return x / jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    fn: Callable
    make: Callable  # (key, Shape, dtype) -> (positional tuple, keyword dict)
    state_shape: Callable  # Shape -> tuple


def _qkv(key, s: Shape, dtype, normalise_k=False):
    kq, kk, kv = jax.random.split(key, 3)
    q = _normal(kq, (s.batch, s.time, s.heads, s.key_dim), dtype)
    k = _normal(kk, (s.batch, s.time, s.heads, s.key_dim), dtype)
    v = _normal(kv, (s.batch, s.time, s.value_heads, s.value_dim), dtype)
    return q, (_l2(k) if normalise_k else k), v


def _gate(key, shape, dtype, strength=2.0):
    return (-strength * jax.nn.softplus(_normal(key, shape))).astype(dtype)


def _beta(key, s: Shape, dtype):
    return jax.nn.sigmoid(_normal(key, (s.batch, s.time, s.value_heads))).astype(dtype)


def make_linear_attention(key, s, dtype):
    return _qkv(key, s, dtype), {}


def make_gla(key, s, dtype, per_channel=True):
    k1, k2 = jax.random.split(key)
    shape = (s.batch, s.time, s.value_heads) + ((s.key_dim,) if per_channel else ())
    return _qkv(k1, s, dtype), {"g": _gate(k2, shape, dtype)}


def make_delta(key, s, dtype):
    k1, k2 = jax.random.split(key)
    return _qkv(k1, s, dtype, normalise_k=True), {"beta": _beta(k2, s, dtype)}


def make_gated_delta(key, s, dtype, per_channel=False):
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (s.batch, s.time, s.value_heads) + ((s.key_dim,) if per_channel else ())
    return _qkv(k1, s, dtype, normalise_k=True), {"g": _gate(k2, shape, dtype), "beta": _beta(k3, s, dtype)}


def make_ssd(key, s, dtype):
    """heads -> B/C groups, value_heads -> SSD heads, key_dim -> N, value_dim -> P."""
    ks = jax.random.split(key, 6)
    x = _normal(ks[0], (s.batch, s.time, s.value_heads, s.value_dim), dtype)
    dt = jax.nn.softplus(_normal(ks[1], (s.batch, s.time, s.value_heads))).astype(dtype)
    a = -jnp.exp(_normal(ks[2], (s.value_heads,)))
    b = _normal(ks[3], (s.batch, s.time, s.heads, s.key_dim), dtype)
    c = _normal(ks[4], (s.batch, s.time, s.heads, s.key_dim), dtype)
    d = _normal(ks[5], (s.value_heads,))
    return (x, dt, a, b, c), {"D": d}


def make_selective(key, s, dtype):
    """value_heads * value_dim -> channels D, key_dim -> N."""
    ks = jax.random.split(key, 6)
    channels = s.value_heads * s.value_dim
    u = _normal(ks[0], (s.batch, s.time, channels), dtype)
    dt = jax.nn.softplus(_normal(ks[1], (s.batch, s.time, channels))).astype(dtype)
    a = -jnp.exp(_normal(ks[2], (channels, s.key_dim)))
    b = _normal(ks[3], (s.batch, s.time, s.key_dim), dtype)
    c = _normal(ks[4], (s.batch, s.time, s.key_dim), dtype)
    return (u, dt, a, b, c), {"D": _normal(ks[5], (channels,))}


_kv_state = lambda s: (s.batch, s.value_heads, s.key_dim, s.value_dim)  # noqa: E731

SPECS = {
    "linear_attention": MixerSpec("linear_attention", ops.linear_attention, make_linear_attention, _kv_state),
    "gla": MixerSpec("gla", ops.gla, make_gla, _kv_state),
    "gla_scalar": MixerSpec("gla_scalar", ops.gla, functools.partial(make_gla, per_channel=False), _kv_state),
    "delta_rule": MixerSpec("delta_rule", ops.delta_rule, make_delta, _kv_state),
    "gated_delta_rule": MixerSpec("gated_delta_rule", ops.gated_delta_rule, make_gated_delta, _kv_state),
    "kda": MixerSpec("kda", ops.kda, functools.partial(make_gated_delta, per_channel=True), _kv_state),
    "ssd": MixerSpec("ssd", ssm.ssd, make_ssd, lambda s: (s.batch, s.value_heads, s.key_dim, s.value_dim)),
    "selective_scan": MixerSpec("selective_scan", ssm.selective_scan, make_selective,
                                lambda s: (s.batch, s.value_heads * s.value_dim, s.key_dim)),
}


SAFE_GATE_BOUND = -5.0


def make_bounded(key, s, dtype, *, delta, at_bound):
    """KDA (`delta`) or GLA inputs with per-channel gates in [SAFE_GATE_BOUND, 0): all at the bound (the
    largest factors the safe gate's matmul form meets) or uniform."""
    k1, k2 = jax.random.split(key)
    args, kw = make_gated_delta(k1, s, dtype, per_channel=True) if delta else make_gla(k1, s, dtype)
    shape = (s.batch, s.time, s.value_heads, s.key_dim)
    gate = jnp.full(shape, SAFE_GATE_BOUND) if at_bound else SAFE_GATE_BOUND * jax.random.uniform(k2, shape)
    kw["g"] = gate.astype(dtype)
    return args, kw


# Specs of op options that only some tests check (the safe gate): looked up by name like SPECS, but
# not part of the families that tests iterating over SPECS cover.
OPTION_SPECS = {
    f"{name}_safe" + ("_at_bound" if at_bound else ""): MixerSpec(
        f"{name}_safe" + ("_at_bound" if at_bound else ""),
        functools.partial(op, safe_gate=True, lower_bound=SAFE_GATE_BOUND),
        functools.partial(make_bounded, delta=delta, at_bound=at_bound), _kv_state)
    for name, op, delta in (("kda", ops.kda, True), ("gla", ops.gla, False)) for at_bound in (True, False)
}


def spec(name: str) -> MixerSpec:
    return SPECS[name] if name in SPECS else OPTION_SPECS[name]


@functools.lru_cache(maxsize=None)
def compiled(name: str, impl: str, chunk_size: int, with_state: bool):
    """(forward, grad) of one op/impl under jit, cached so that tests reuse compilations."""
    fn = spec(name).fn

    def forward(args, kwargs, state):
        return fn(*args, **kwargs, initial_state=state if with_state else None,
                  output_final_state=True, impl=impl, chunk_size=chunk_size)

    def loss(args, kwargs, state, cot_o, cot_s):
        o, final = forward(args, kwargs, state)
        return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(final * cot_s)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def assert_close(actual, expected, rtol=2e-5, what=""):
    """Elementwise |a - e| <= rtol * (max|e| + 1): float32 rounding of sums whose terms are O(max|e|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = np.max(np.abs(expected), initial=0.0) + 1.0
    err = np.max(np.abs(actual - expected), initial=0.0)
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def check_against_reference(name, impl, shape: Shape, *, chunk_size=16, with_state=True, seed=0,
                            rtol=2e-5, grads=True):
    spec_ = spec(name)
    k_in, k_state, k_o, k_s = jax.random.split(jax.random.PRNGKey(seed), 4)
    args, kwargs = spec_.make(k_in, shape, jnp.float32)
    state = _normal(k_state, spec_.state_shape(shape))
    fwd, grad = compiled(name, impl, chunk_size, with_state)
    ref_fwd, ref_grad = compiled(name, "reference", chunk_size, with_state)
    o, final = fwd(args, kwargs, state)
    o_ref, final_ref = ref_fwd(args, kwargs, state)
    assert_close(o, o_ref, rtol, f"{name}/{impl} output")
    assert_close(final, final_ref, rtol, f"{name}/{impl} final state")
    if not grads:
        return
    cot_o = _normal(k_o, o.shape)
    cot_s = _normal(k_s, final.shape)
    grads = grad(args, kwargs, state, cot_o, cot_s)
    grads_ref = ref_grad(args, kwargs, state, cot_o, cot_s)
    flat, _ = jax.tree.flatten_with_path(grads)
    flat_ref = jax.tree.leaves(grads_ref)
    for (path, g), g_ref in zip(flat, flat_ref):
        if not with_state and jax.tree_util.keystr(path).startswith("[2]"):
            continue
        assert_close(g, g_ref, 10 * rtol, f"{name}/{impl} grad {jax.tree_util.keystr(path)}")
