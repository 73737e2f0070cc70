"""The one op front end: hybrid_jax.ops exports every primitive; an empty sequence fails with a message
naming the op and the shapes (instead of a division by a zero chunk length); outputs follow the value
input's dtype for every op and step."""
import jax.numpy as jnp
import pytest

import pallas_kernels
from hybrid_jax import ops

PRIMITIVES = {
    "linear_attention", "linear_attention_step", "gla", "gla_step", "delta_rule", "delta_rule_step",
    "gated_delta_rule", "gated_delta_rule_step", "kda", "kda_step", "selective_scan", "selective_scan_step",
    "ssd", "ssd_step", "softmax_attention", "softmax_attention_step", "kv_cache_update",
    "log_linear_attention", "log_linear_attention_step", "log_linear_attention_masked", "linear_recurrence",
    "FenwickState", "empty_fenwick_state", "fenwick_level", "num_levels", "Impl", "rg_lru", "rg_lru_step",
    "block_sparse_attention", "block_sparse_attention_step", "block_keys_update", "pool_block_keys",
    "block_token_attention",
}


def test_every_primitive_is_exported():
    assert set(ops.__all__) == PRIMITIVES
    for name in ops.__all__:
        assert getattr(ops, name) is not None, name


def _zeros(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _empty_calls():
    b, h, k, v = 1, 2, 4, 3
    q, val = _zeros(b, 0, h, k), _zeros(b, 0, h, v)
    gate, beta = _zeros(b, 0, h), _zeros(b, 0, h)
    return {
        "linear_attention": lambda: ops.linear_attention(q, q, val),
        "gla": lambda: ops.gla(q, q, val, g=gate),
        "delta_rule": lambda: ops.delta_rule(q, q, val, beta=beta),
        "gated_delta_rule": lambda: ops.gated_delta_rule(q, q, val, g=gate, beta=beta),
        "kda": lambda: ops.kda(q, q, val, g=_zeros(b, 0, h, k), beta=beta),
        "ssd": lambda: ops.ssd(val, gate, _zeros(h), q, q),
        "selective_scan": lambda: ops.selective_scan(_zeros(b, 0, 6), _zeros(b, 0, 6), _zeros(6, k),
                                                     _zeros(b, 0, k), _zeros(b, 0, k)),
        "log_linear_attention": lambda: ops.log_linear_attention(q, q, val, g=gate,
                                                                 level_scales=_zeros(b, 0, h, 3)),
        "softmax_attention": lambda: ops.softmax_attention(q, q, q),
        "block_sparse_attention": lambda: ops.block_sparse_attention(q, q, q),
        "linear_recurrence": lambda: ops.linear_recurrence(_zeros(b, 0, 3), _zeros(b, 0, 3)),
        "rg_lru": lambda: ops.rg_lru(_zeros(b, 0, 3), _zeros(b, 0, 3), _zeros(b, 0, 3), _zeros(3)),
        "gated_recurrence": lambda: pallas_kernels.gated_recurrence(q, q, val, None, None, _zeros(b, h, k, v),
                                                                    chunk_size=16),
    }


@pytest.mark.parametrize("op", list(_empty_calls()))
def test_empty_sequence_is_named(op):
    with pytest.raises(ValueError, match=rf"^{op}: needs at least one time step \(T >= 1\), got T=0 "
                                         r"from \w+ \(1, 0, "):
        _empty_calls()[op]()


def _dtype_calls(value_dtype):
    """Every op and step with its value input (v, x or u) in `value_dtype`, everything else float32."""
    b, t, h, k, d = 1, 3, 2, 4, 3
    q, v = _zeros(b, t, h, k), _zeros(b, t, h, d, dtype=value_dtype)
    gate, channel_gate, beta, state = _zeros(b, t, h), _zeros(b, t, h, k), _zeros(b, t, h), _zeros(b, h, k, d)
    fenwick = ops.FenwickState(_zeros(b, h, 3, k, d), jnp.int32(0))
    return {
        "linear_attention": lambda: ops.linear_attention(q, q, v)[0],
        "linear_attention_step": lambda: ops.linear_attention_step(q[:, 0], q[:, 0], v[:, 0], state)[0],
        "gla": lambda: ops.gla(q, q, v, g=channel_gate)[0],
        "gla_step": lambda: ops.gla_step(q[:, 0], q[:, 0], v[:, 0], state, g_t=gate[:, 0])[0],
        "delta_rule": lambda: ops.delta_rule(q, q, v, beta=beta)[0],
        "delta_rule_step": lambda: ops.delta_rule_step(q[:, 0], q[:, 0], v[:, 0], state, beta_t=beta[:, 0])[0],
        "gated_delta_rule": lambda: ops.gated_delta_rule(q, q, v, g=gate, beta=beta)[0],
        "gated_delta_rule_step": lambda: ops.gated_delta_rule_step(q[:, 0], q[:, 0], v[:, 0], state,
                                                                   g_t=gate[:, 0], beta_t=beta[:, 0])[0],
        "kda": lambda: ops.kda(q, q, v, g=channel_gate, beta=beta)[0],
        "kda_step": lambda: ops.kda_step(q[:, 0], q[:, 0], v[:, 0], state, g_t=channel_gate[:, 0],
                                         beta_t=beta[:, 0])[0],
        "ssd": lambda: ops.ssd(v, gate, _zeros(h), q, q)[0],
        "ssd_step": lambda: ops.ssd_step(v[:, 0], gate[:, 0], _zeros(h), q[:, 0], q[:, 0],
                                         _zeros(b, h, k, d))[0],
        "selective_scan": lambda: ops.selective_scan(v[..., 0], gate, _zeros(h, k), q[:, :, 0], q[:, :, 0])[0],
        "selective_scan_step": lambda: ops.selective_scan_step(v[:, 0, :, 0], gate[:, 0], _zeros(h, k),
                                                               q[:, 0, 0], q[:, 0, 0], _zeros(b, h, k))[0],
        "log_linear_attention": lambda: ops.log_linear_attention(q, q, v, g=gate,
                                                                 level_scales=_zeros(b, t, h, 3))[0],
        "log_linear_attention_step": lambda: ops.log_linear_attention_step(
            q[:, 0], q[:, 0], v[:, 0], fenwick, g_t=gate[:, 0], level_scales_t=_zeros(b, h, 3))[0],
        "rg_lru": lambda: ops.rg_lru(v, _zeros(*v.shape), _zeros(*v.shape), _zeros(h, d))[0],
        "rg_lru_step": lambda: ops.rg_lru_step(v[:, 0], _zeros(b, h, d), _zeros(b, h, d), _zeros(h, d),
                                               _zeros(b, h, d))[0],
        # softmax attention: q, k and v must share one dtype, so all three take the value dtype
        "softmax_attention": lambda: ops.softmax_attention(v, v, v)[0],
        "softmax_attention_step": lambda: ops.softmax_attention_step(v[:, 0], v, v, length=jnp.array([t]))[0],
        "block_sparse_attention": lambda: ops.block_sparse_attention(v, v, v, block_size=2)[0],
        "block_sparse_attention_step": lambda: ops.block_sparse_attention_step(
            v[:, 0], v, v, _zeros(b, 1, h, d), length=jnp.array([t]), block_size=t, top_k=1)[0],
    }


@pytest.mark.parametrize("op", list(_dtype_calls(jnp.bfloat16)))
def test_output_in_the_value_dtype(op):
    assert _dtype_calls(jnp.bfloat16)[op]().dtype == jnp.bfloat16
