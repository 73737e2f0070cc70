"""linear_attention and gla: every impl equals the reference recurrence; identities; errors (the steps:
test_steps.py)."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from hybrid_jax import ops
from tests.ops import mixers
from tests.ops.mixers import Shape, assert_close, check_against_reference

NAMES = ["linear_attention", "gla", "gla_scalar"]


@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape,with_state", [
    (Shape(), True),  # T = 37: not a multiple of the chunk, grouped heads (HV = 2 H), B = 2
    (Shape(batch=1, time=1, heads=1, value_heads=1), False),  # T = 1, no initial state
])
def test_matches_reference(name, impl, shape, with_state):
    check_against_reference(name, impl, shape, with_state=with_state)


@given(time=st.integers(1, 70), group=st.sampled_from([1, 2]), chunk=st.sampled_from([16, 32]))
def test_gla_chunk_any_length(time, group, chunk):
    # Forward only: gradients are covered at the fixed odd shapes above (compile time dominates).
    check_against_reference("gla", "chunk", Shape(batch=1, time=time, heads=1, value_heads=group),
                            chunk_size=chunk, grads=False)


def test_identities():
    shape = Shape(time=21)
    (q, k, v), kw = mixers.make_gla(jax.random.PRNGKey(3), shape, jnp.float32, per_channel=False)
    g = kw["g"]
    scalar = ops.gla(q, k, v, g=g)[0]
    broadcast = ops.gla(q, k, v, g=jnp.broadcast_to(g[..., None], g.shape + (shape.key_dim,)))[0]
    assert_close(scalar, broadcast, what="scalar gate == gate broadcast over K")
    assert_close(ops.gla(q, k, v, g=jnp.zeros_like(g))[0], ops.linear_attention(q, k, v)[0],
                 what="gla with g = 0 == linear attention")
    # Causal softmax-free attention: o_t = sum_{s<=t} (scale q_t . k_s) v_s, heads grouped.
    kk = jnp.repeat(k, 2, axis=2)
    qq = jnp.repeat(q, 2, axis=2) * shape.key_dim**-0.5
    scores = jnp.einsum("bthk,bshk->bhts", qq, kk) * jnp.tril(jnp.ones((shape.time,) * 2))
    assert_close(ops.linear_attention(q, k, v)[0], jnp.einsum("bhts,bshv->bthv", scores, v),
                 what="materialised causal linear attention")


def test_strong_decay_is_finite_and_exact():
    shape = Shape(time=70)
    (q, k, v), _ = mixers.make_gla(jax.random.PRNGKey(4), shape, jnp.float32)
    g = jnp.full((shape.batch, shape.time, shape.value_heads, shape.key_dim), -20.0)
    o, s = ops.gla(q, k, v, g=g, output_final_state=True)
    o_ref, s_ref = ops.gla(q, k, v, g=g, output_final_state=True, impl="reference")
    assert_close(o, o_ref, what="g = -20")
    assert_close(s, s_ref, what="g = -20 state")


def test_bf16_inputs_keep_float32_state():
    shape = Shape(time=19)
    (q, k, v), kw = mixers.make_gla(jax.random.PRNGKey(5), shape, jnp.bfloat16)
    o, s = ops.gla(q, k, v, **kw, output_final_state=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    o_ref, s_ref = ops.gla(f32(q), f32(k), f32(v), g=f32(kw["g"]), output_final_state=True,
                           impl="reference")
    assert_close(o, o_ref, rtol=1e-2, what="bf16 output (bf16 rounding of o)")
    assert_close(s, s_ref, rtol=1e-5, what="float32 state from bf16 inputs")


def test_errors_name_the_problem():
    (q, k, v), kw = mixers.make_gla(jax.random.PRNGKey(0), Shape(time=4), jnp.float32)
    with pytest.raises(ValueError, match=r"unknown impl='fast'; valid choices are \['reference', 'scan', 'chunk', 'pallas', 'auto'\]"):
        ops.gla(q, k, v, **kw, impl="fast")
    with pytest.raises(ValueError, match=r"gla: g must have shape \[B, T, HV\]"):
        ops.gla(q, k, v, g=kw["g"][..., :3])
    with pytest.raises(ValueError, match=r"v heads HV=3 must be a multiple of q/k heads H=2"):
        ops.linear_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, HV, K, V\]"):
        ops.linear_attention(q, k, v, initial_state=jnp.zeros((2, 4, 5, 8)))
    with pytest.raises(ValueError, match=r"k must have shape \[B, T, H, K\]"):
        ops.linear_attention(q, k[:, :3], v)
