"""selective_scan (Mamba S6) and ssd (Mamba-2): every impl equals the reference; SSD == GLA (the steps:
test_steps.py)."""
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, strategies as st

from hybrid_jax import ops
from hybrid_jax.ops import ssm
from tests.ops import mixers
from tests.ops.mixers import Shape, assert_close, check_against_reference


@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("name", ["ssd", "selective_scan"])
@pytest.mark.parametrize("shape,with_state", [
    (Shape(), True),  # T = 37, 4 heads sharing 2 B/C groups, B = 2, initial state
    (Shape(batch=1, time=1, heads=1, value_heads=1), False),
])
def test_matches_reference(name, impl, shape, with_state):
    check_against_reference(name, impl, shape, with_state=with_state)


@given(time=st.integers(1, 70), name=st.sampled_from(["ssd", "selective_scan"]))
def test_chunk_any_length(time, name):
    check_against_reference(name, "chunk", Shape(batch=1, time=time, heads=1, value_heads=2),
                            grads=False)


def test_ssd_is_gla_with_scalar_decay():
    shape = Shape(time=30)
    (x, dt, a, b, c), _ = mixers.make_ssd(jax.random.PRNGKey(5), shape, jnp.float32)
    y, _ = ssm.ssd(x, dt, a, b, c)
    y_gla, _ = ops.gla(c, b, dt[..., None] * x, g=dt * a, scale=1.0)
    assert_close(y, y_gla, what="SSD == GLA(q=C, k=B, v=dt x, g=A dt)")


def test_selective_scan_materialised():
    """y_t[d] = sum_{s<=t} C_t . (exp(sum_{s<r<=t} dt_r A[d]) * B_s) dt_s u_s[d], computed densely."""
    shape = Shape(batch=1, time=12, value_heads=1, value_dim=3, key_dim=4)
    (u, dt, a, b, c), _ = mixers.make_selective(jax.random.PRNGKey(6), shape, jnp.float32)
    cum = jnp.cumsum(dt[0][:, :, None] * a[None], axis=0)  # [T, D, N]
    decay = jnp.exp(cum[:, None] - cum[None, :]) * jnp.tril(jnp.ones((12, 12)))[:, :, None, None]
    y = jnp.einsum("tn,tsdn,sn,sd->td", c[0], decay, b[0], dt[0] * u[0])
    assert_close(ssm.selective_scan(u, dt, a, b, c)[0][0], y, what="dense S6")


def test_bf16():
    shape = Shape(time=19)
    (x, dt, a, b, c), kw = mixers.make_ssd(jax.random.PRNGKey(7), shape, jnp.bfloat16)
    y, s = ssm.ssd(x, dt, a, b, c, **kw, output_final_state=True)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
    y_ref, s_ref = ssm.ssd(f32(x), f32(dt), a, f32(b), f32(c), **kw, output_final_state=True,
                           impl="reference")
    assert_close(y, y_ref, rtol=1e-2, what="bf16 y")
    assert_close(s, s_ref, rtol=1e-5, what="float32 state")


def test_errors():
    (x, dt, a, b, c), kw = mixers.make_ssd(jax.random.PRNGKey(0), Shape(time=4), jnp.float32)
    with pytest.raises(ValueError, match=r"ssd: dt must have shape \[B, T, H\]"):
        ssm.ssd(x, dt[..., :1], a, b, c)
    with pytest.raises(ValueError, match=r"multiple of groups G"):
        ssm.ssd(x, dt, a, b[:, :, :1].repeat(3, 2), c[:, :, :1].repeat(3, 2))
    (u, dt, a, b, c), kw = mixers.make_selective(jax.random.PRNGKey(0), Shape(time=4), jnp.float32)
    with pytest.raises(ValueError, match=r"selective_scan: A must have shape \[D, N\]"):
        ssm.selective_scan(u, dt, a[:3], b, c)
    with pytest.raises(ValueError, match=r"valid choices are \['reference', 'scan', 'chunk'\]"):
        ssm.selective_scan(u, dt, a, b, c, impl="xla")
