"""Context parallelism of log-linear attention: split over 2, 4 or 8 fake devices, the op gives the
1-device outputs, final Fenwick state (levels and position) and gradients, for the Mamba-2 (scalar
decay), per-channel, gated-delta and KDA transitions, every impl, an initial state at a position that
is not a multiple of the chunk, grouped heads, isolated tokens and packed documents crossing shard
boundaries. The layers run split in tests/models/test_context_parallel.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.ops.log_linear import FenwickState, log_linear_attention, num_levels
from tests.ops import mixers
from tests.ops.mixers import Shape
from tests.ops.sharding import check_context_parallel, context_mesh, context_parallel, crossing_documents

B = 2
TRANSITIONS = {"mamba2": (False, False), "gla": (True, False), "gated_delta": (False, True), "kda": (True, True)}


def _inputs(transition, t, heads, value_heads, levels, seed=0):
    per_channel, delta = TRANSITIONS[transition]
    shape = Shape(batch=B, time=t, heads=heads, value_heads=value_heads, key_dim=4, value_dim=4)
    k_mixer, k_lam, k_state = jax.random.split(jax.random.key(seed), 3)
    make = mixers.make_gated_delta if delta else mixers.make_gla
    (q, k, v), kw = make(k_mixer, shape, jnp.float32, per_channel=per_channel)
    lam = jax.random.normal(k_lam, (B, t, value_heads, levels))
    state = jax.random.normal(k_state, (B, value_heads, levels, 4, 4))
    return (q, k, v, kw["g"], kw.get("beta"), lam), state


# (transition, impl, context, data, local length, chunk, heads, value heads, initial position, segments, isolated)
CASES = [
    ("gla", "chunk", 8, 1, 4, 4, 1, 2, 5, False, True),  # grouped heads; P % chunk != 0: dynamic offset
    ("gated_delta", "chunk", 2, 1, 12, 4, 1, 2, 3, False, False),  # shards of 12: not a power of two
    ("gated_delta", "scan", 4, 2, 4, 4, 1, 1, 6, True, True),
]


@pytest.mark.parametrize("transition, impl, context, data, local, chunk, heads, value_heads, position, "
                         "packed, with_iso", CASES)
def test_log_linear_context_parallel(transition, impl, context, data, local, chunk, heads, value_heads,
                                     position, packed, with_iso):
    t = local * context
    levels = num_levels((position or 0) + t)
    tensors, state = _inputs(transition, t, heads, value_heads, levels)
    q, k, v, g, beta, lam = tensors
    per_token = {"q": q, "k": k, "v": v, "g": g, "level_scales": lam}
    if beta is not None:
        per_token["beta"] = beta
    if packed:
        per_token["segment_ids"] = crossing_documents(t, context)
    if with_iso:
        per_token["isolated"] = jnp.asarray(np.arange(t) % 5 == 3)[None].repeat(B, 0)
    shared = () if position is None else (state, jnp.int32(position))

    def fn(per_token, shared, context_axis):
        inputs = dict(per_token)
        q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
        initial = FenwickState(*shared) if shared else None
        o, final = log_linear_attention(q, k, v, **inputs, initial_state=initial, output_final_state=True,
                                        impl=impl, chunk_size=chunk, context_axis=context_axis)
        if "segment_ids" in inputs:  # outputs at padding are unspecified (docs/conventions.md)
            o = jnp.where((inputs["segment_ids"] != 0)[..., None, None], o, 0.0)
        rows = jnp.broadcast_to(final.position, (B,)).astype(jnp.float32)  # compared, no gradient
        return o, jnp.concatenate([final.levels.reshape(-1), rows])

    check_context_parallel(fn, per_token, shared, context=context, data=data)


def test_log_linear_context_parallel_needs_aligned_shards():
    tensors, _ = _inputs("mamba2", 24, 1, 1, num_levels(24))
    q, k, v, g, _, lam = tensors

    def fn(per_token, shared, context_axis):
        q, k, v, g, lam = per_token
        return log_linear_attention(q, k, v, g=g, level_scales=lam, chunk_size=8, context_axis=context_axis)[0], None

    mesh = context_mesh(2)
    with pytest.raises(ValueError, match="T_local=12 must be a multiple of chunk_size=8"):
        with jax.set_mesh(mesh):
            context_parallel(fn, mesh, (q, k, v, g, lam), ())

