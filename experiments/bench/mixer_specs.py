r"""What the mixer benchmark runs: realistic inputs and the call of every op and impl, with the cost
models of `experiments.bench.cost_models` (analytic FLOPs, memory guesses; their conventions are in
that module's docstring).

`kda_safe` is KDA with the safe gate, as the KDA layer runs it by default: g drawn in
[SAFE_LOWER_BOUND, 0] and `kda(..., safe_gate=True, lower_bound=SAFE_LOWER_BOUND)`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from experiments.bench.cost_models import (
    SOFTMAX_BLOCK, SPARSE_BLOCK, SPARSE_TOP_K, SSM_STATE, Dims, block_sparse_bytes,
    block_sparse_flops, gated_bytes, gated_flops, log_linear_bytes, log_linear_flops, rg_lru_bytes, rg_lru_flops,
    selective_bytes, selective_flops, softmax_bytes, softmax_flops, ssd_flops,
)
from hybrid_jax import ops
from hybrid_jax.ops import attention, first_order, gated, ssm
from hybrid_jax.ops.rg_lru import SUPPORTED as RG_LRU_IMPLS  # the package's `rg_lru` is the op
from hybrid_jax.ops.sparse_attention import SUPPORTED as SPARSE_IMPLS
from pallas_kernels.chunk_math import MIN_LOWER_BOUND

SAFE_LOWER_BOUND = MIN_LOWER_BOUND  # kda_safe's bound: the KDA layer's default gate_lower_bound


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    name: str
    impls: tuple[str, ...]
    make_inputs: Callable[[jax.Array, Dims, jnp.dtype], tuple[jax.Array, ...]]
    apply: Callable[..., jax.Array]  # (impl, chunk_size, *inputs) -> output
    flops: Callable[[Dims, str], float | None]  # forward FLOPs
    estimate_bytes: Callable[[Dims, str, bool], float]  # (dims, impl, backward) -> bytes
    quadratic: bool = False
    delta_family: bool = False  # its op defaults to `gated.default_chunk_size` (32 on CPU)

    def chunk_size(self, requested: int | None) -> int:
        """The chunk length a run uses: `requested`, or for None the op's own default on this backend."""
        return gated.default_chunk_size(requested, delta=self.delta_family)


# ----------------------------------------------------------------------------- inputs


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _l2_normalised(key, shape, dtype):
    x = jax.random.normal(key, shape, jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)


def _log_decay(key, shape, dtype):
    # -softplus(z - 4): mostly small decays (mean ~ -0.03, retention ~ 0.97 a step), as trained gates are.
    return (-jax.nn.softplus(jax.random.normal(key, shape, jnp.float32) - 4.0)).astype(dtype)


def _safe_log_decay(key, shape, dtype):
    # The safe gate's map, lower_bound * sigmoid(z - 5.5): within [lower_bound, 0], mean ~ -0.033 a step,
    # close to `_log_decay`'s ~ -0.029 so that kda and kda_safe see similar decays.
    return (SAFE_LOWER_BOUND * jax.nn.sigmoid(jax.random.normal(key, shape, jnp.float32) - 5.5)).astype(dtype)


def _qkv(key, d: Dims, dtype, *, normalise=False):
    kq, kk, kv = jax.random.split(key, 3)
    shape = (d.batch, d.time, d.heads, d.head_dim)
    make = _l2_normalised if normalise else _normal
    return make(kq, shape, dtype), make(kk, shape, dtype), _normal(kv, shape, dtype)


def _beta(key, d: Dims, dtype):
    return jax.nn.sigmoid(jax.random.normal(key, (d.batch, d.time, d.heads))).astype(dtype)


def _inputs_qkv(key, d, dtype):
    return _qkv(key, d, dtype, normalise=True)


def _inputs_gla(key, d, dtype):
    k1, k2 = jax.random.split(key)
    return _qkv(k1, d, dtype, normalise=True) + (
        _log_decay(k2, (d.batch, d.time, d.heads, d.head_dim), dtype),
    )


def _inputs_delta(key, d, dtype):
    k1, k2 = jax.random.split(key)
    return _qkv(k1, d, dtype, normalise=True) + (_beta(k2, d, dtype),)


def _inputs_gated_delta(key, d, dtype, *, per_channel, safe_gate=False):
    k1, k2, k3 = jax.random.split(key, 3)
    gate_shape = (d.batch, d.time, d.heads) + ((d.head_dim,) if per_channel else ())
    decay = _safe_log_decay if safe_gate else _log_decay
    return _qkv(k1, d, dtype, normalise=True) + (decay(k2, gate_shape, dtype), _beta(k3, d, dtype))


def _inputs_ssd(key, d, dtype):
    kx, kdt, ka, kb, kc = jax.random.split(key, 5)
    x = _normal(kx, (d.batch, d.time, d.heads, d.head_dim), dtype)
    dt = jax.nn.softplus(jax.random.normal(kdt, (d.batch, d.time, d.heads)) - 3.0).astype(dtype)  # > 0
    a = -jnp.exp(jax.random.uniform(ka, (d.heads,), minval=0.0, maxval=1.5))  # A < 0, float32 parameter
    b = _normal(kb, (d.batch, d.time, 1, d.head_dim), dtype)  # one B/C group, as Mamba-2 defaults
    c = _normal(kc, (d.batch, d.time, 1, d.head_dim), dtype)
    return x, dt, a, b, c


def _inputs_selective(key, d, dtype):
    ku, kdt, ka, kb, kc = jax.random.split(key, 5)
    channels = d.heads * d.head_dim
    u = _normal(ku, (d.batch, d.time, channels), dtype)
    dt = jax.nn.softplus(jax.random.normal(kdt, (d.batch, d.time, channels)) - 3.0).astype(dtype)
    # Mamba's S4D-real init: A[:, n] = -(n + 1).
    a = -jnp.broadcast_to(jnp.arange(1, SSM_STATE + 1, dtype=jnp.float32), (channels, SSM_STATE))
    b = _normal(kb, (d.batch, d.time, SSM_STATE), dtype)
    c = _normal(kc, (d.batch, d.time, SSM_STATE), dtype)
    return u, dt, a, b, c


def _inputs_rg_lru(key, d, dtype):
    kx, ki, kr, ka = jax.random.split(key, 4)
    shape = (d.batch, d.time, d.heads, d.head_dim)
    x = _normal(kx, shape, dtype)
    gate_x, gate_a = (jax.nn.sigmoid(jax.random.normal(k, shape)).astype(dtype) for k in (ki, kr))
    # Lambda with base decay a0 = exp(-softplus(Lambda)) in [0.9, 0.999], as the layer initialises it.
    a0 = jax.random.uniform(ka, shape[2:], minval=0.9, maxval=0.999)
    return x, gate_x, gate_a, jnp.log(jnp.expm1(-jnp.log(a0)))


# ----------------------------------------------------------------------------- the registry


def _impl_names(supported) -> tuple[str, ...]:
    return tuple(impl.value for impl in supported)


# The impls each op accepts today (a kernel impl added to an op shows up here without edits).
_GATED_IMPLS = _impl_names(gated.SUPPORTED)
_KERNEL_IMPLS = {"pallas": "chunk", "auto": "chunk"}  # kernels run the chunked algorithm


def algorithm(impl: str) -> str:
    """The algorithm an impl runs, for the FLOP count and the memory guess."""
    return _KERNEL_IMPLS.get(impl, impl)


def _gated_spec(name, make_inputs, apply, *, delta, decayed, per_channel, safe_gate=False):
    return MixerSpec(
        name=name,
        impls=_GATED_IMPLS,
        make_inputs=make_inputs,
        apply=apply,
        flops=lambda d, impl: gated_flops(d, impl, delta=delta, decayed=decayed, per_channel=per_channel,
                                          safe_gate=safe_gate),
        estimate_bytes=lambda d, impl, backward: gated_bytes(d, impl, backward, delta=delta,
                                                              per_channel=per_channel),
        delta_family=delta,
    )


def _build_registry() -> dict[str, MixerSpec]:
    specs = [
        _gated_spec(
            "linear_attention",
            _inputs_qkv,
            lambda impl, c, q, k, v: ops.linear_attention(q, k, v, impl=impl, chunk_size=c)[0],
            delta=False,
            decayed=False,
            per_channel=False,
        ),
        _gated_spec(
            "gla",
            _inputs_gla,
            lambda impl, c, q, k, v, g: ops.gla(q, k, v, g=g, impl=impl, chunk_size=c)[0],
            delta=False,
            decayed=True,
            per_channel=True,
        ),
        _gated_spec(
            "delta_rule",
            _inputs_delta,
            lambda impl, c, q, k, v, b: ops.delta_rule(q, k, v, beta=b, impl=impl, chunk_size=c)[0],
            delta=True,
            decayed=False,
            per_channel=False,
        ),
        _gated_spec(
            "gated_delta_rule",
            lambda key, d, dt: _inputs_gated_delta(key, d, dt, per_channel=False),
            lambda impl, c, q, k, v, g, b: ops.gated_delta_rule(
                q, k, v, g=g, beta=b, impl=impl, chunk_size=c
            )[0],
            delta=True,
            decayed=True,
            per_channel=False,
        ),
        _gated_spec(
            "kda",
            lambda key, d, dt: _inputs_gated_delta(key, d, dt, per_channel=True),
            lambda impl, c, q, k, v, g, b: ops.kda(q, k, v, g=g, beta=b, impl=impl, chunk_size=c)[0],
            delta=True,
            decayed=True,
            per_channel=True,
        ),
        _gated_spec(
            "kda_safe",
            lambda key, d, dt: _inputs_gated_delta(key, d, dt, per_channel=True, safe_gate=True),
            lambda impl, c, q, k, v, g, b: ops.kda(
                q, k, v, g=g, beta=b, impl=impl, chunk_size=c, safe_gate=True, lower_bound=SAFE_LOWER_BOUND
            )[0],
            delta=True,
            decayed=True,
            per_channel=True,
            safe_gate=True,
        ),
        MixerSpec(
            name="ssd",
            impls=_GATED_IMPLS,
            make_inputs=_inputs_ssd,
            apply=lambda impl, c, x, dt, a, b, cc: ssm.ssd(x, dt, a, b, cc, impl=impl, chunk_size=c)[0],
            flops=ssd_flops,
            estimate_bytes=lambda d, impl, backward: gated_bytes(d, impl, backward, delta=False),
        ),
        MixerSpec(
            name="selective_scan",
            impls=_impl_names(first_order.SUPPORTED),
            make_inputs=_inputs_selective,
            apply=lambda impl, c, u, dt, a, b, cc: ssm.selective_scan(
                u, dt, a, b, cc, impl=impl, chunk_size=c
            )[0],
            flops=selective_flops,
            estimate_bytes=selective_bytes,
        ),
        MixerSpec(
            name="rg_lru",
            impls=_impl_names(RG_LRU_IMPLS),
            make_inputs=_inputs_rg_lru,
            apply=lambda impl, c, x, gx, ga, lam: ops.rg_lru(x, gx, ga, lam, impl=impl, chunk_size=c)[0],
            flops=rg_lru_flops,
            estimate_bytes=rg_lru_bytes,
        ),
        MixerSpec(
            name="block_sparse",
            impls=_impl_names(SPARSE_IMPLS),
            make_inputs=_inputs_qkv,
            apply=lambda impl, c, q, k, v: ops.block_sparse_attention(
                q, k, v, block_size=SPARSE_BLOCK, top_k=SPARSE_TOP_K, impl=impl
            ),
            flops=block_sparse_flops,
            estimate_bytes=block_sparse_bytes,
        ),
        MixerSpec(
            name="softmax",
            impls=_impl_names(attention.SUPPORTED),
            make_inputs=_inputs_qkv,
            apply=lambda impl, c, q, k, v: attention.softmax_attention(
                q, k, v, causal=True, impl=impl, block_size=SOFTMAX_BLOCK
            ),
            flops=softmax_flops,
            estimate_bytes=softmax_bytes,
            quadratic=True,
        ),
    ]
    return {spec.name: spec for spec in specs}


REGISTRY = _build_registry()
OPTIONAL = {"log_linear": "hybrid_jax.ops.log_linear"}


def log_linear_spec() -> tuple[MixerSpec | None, str]:
    """Log-linear attention over the Mamba-2 transition (scalar decay g, no beta; level scales
    lambda = softplus(z) > 0) if `hybrid_jax.ops.log_linear` is importable, else (None, why not)."""
    try:
        module = importlib.import_module(OPTIONAL["log_linear"])
        op, num_levels, supported = module.log_linear_attention, module.num_levels, module.SUPPORTED
    except (ImportError, AttributeError) as err:
        return None, f"log_linear skipped: {OPTIONAL['log_linear']} not importable ({err})"

    def make_inputs(key, d: Dims, dtype):
        k1, k2, k3 = jax.random.split(key, 3)
        q, k, v = _qkv(k1, d, dtype, normalise=True)
        g = _log_decay(k2, (d.batch, d.time, d.heads), dtype)
        lam_shape = (d.batch, d.time, d.heads, num_levels(d.time))
        lam = jax.nn.softplus(jax.random.normal(k3, lam_shape)).astype(dtype)
        return q, k, v, g, lam

    def apply(impl, c, q, k, v, g, lam):
        return op(q, k, v, g=g, level_scales=lam, impl=impl, chunk_size=c)[0]

    spec = MixerSpec(
        "log_linear", _impl_names(supported), make_inputs, apply,
        flops=lambda d, impl: log_linear_flops(d, impl, num_levels(d.time)),
        estimate_bytes=lambda d, impl, backward: log_linear_bytes(d, impl, backward, num_levels(d.time)))
    return spec, ""
