"""Building blocks: norms, short conv (with decode state), RoPE, SwiGLU, Dense, logical axes, roles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from hybrid_jax.nn import (
    Dense,
    GatedRMSNorm,
    RMSNorm,
    ShortConv,
    SwiGLU,
    apply_rope,
    l2_normalize,
    logical_axes,
    logical_param,
    param_roles,
)
from hybrid_jax.nn.rope import rotary_dim_for

RTOL, ATOL = 1e-5, 1e-5


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_rms_norm_formula_and_dtype():
    norm = RMSNorm(8, eps=1e-6)
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = _normal(0, (2, 3, 8))
    expected = (
        np.asarray(x) / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6) * np.arange(1, 9)
    )
    np.testing.assert_allclose(norm(x), expected, rtol=RTOL, atol=ATOL)
    assert norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="last dim of x must be 8"):
        norm(jnp.ones((2, 4)))


@pytest.mark.parametrize("name, act", [("silu", jax.nn.silu), ("sigmoid", jax.nn.sigmoid)])
def test_gated_rms_norm(name, act):
    norm = GatedRMSNorm(4, activation_name=name)
    o, gate = _normal(1, (2, 5, 3, 4)), _normal(2, (2, 5, 3, 4))
    expected = RMSNorm(4)(o) * act(gate)
    np.testing.assert_allclose(norm(o, gate), expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="unknown activation 'swish'; valid choices are"):
        GatedRMSNorm(4, activation_name="swish")


def test_l2_normalize_unit_norm():
    x = _normal(3, (2, 4, 3, 8))
    np.testing.assert_allclose(jnp.linalg.norm(l2_normalize(x, eps=0.0), axis=-1), 1.0, rtol=RTOL)


def _naive_causal_conv(x, weight):
    b, t, c = x.shape
    width = weight.shape[0]
    padded = np.concatenate([np.zeros((b, width - 1, c), np.float32), np.asarray(x)], axis=1)
    return np.stack([np.sum(padded[:, s : s + width] * np.asarray(weight), axis=1) for s in range(t)], axis=1)


def test_short_conv_matches_naive_and_streams():
    conv = ShortConv(6, kernel_size=4, activation_name="identity", rngs=nnx.Rngs(0))
    x = _normal(4, (2, 9, 6))
    y, state = conv(x)
    np.testing.assert_allclose(y, _naive_causal_conv(x, conv.weight[...]), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(state, x[:, -3:], rtol=0, atol=0)
    # Prefill in two pieces, then token by token: same outputs and state as one call.
    y1, s1 = conv(x[:, :2])
    y2, s2 = conv(x[:, 2:5], s1)
    outs, s = [y1, y2], s2
    for t in range(5, 9):
        y_t, s = conv.step(x[:, t], s)
        outs.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(s, state, rtol=0, atol=0)


def test_short_conv_silu_and_bad_state():
    conv = ShortConv(3, kernel_size=2, rngs=nnx.Rngs(1))
    x = _normal(5, (1, 4, 3))
    y, _ = conv(x)
    np.testing.assert_allclose(y, jax.nn.silu(_naive_causal_conv(x, conv.weight[...])), rtol=RTOL, atol=ATOL)
    y_bf16, state_bf16 = conv(x.astype(jnp.bfloat16))
    assert y_bf16.dtype == state_bf16.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"conv_state must have shape \[B, W-1, C\] = \(1, 1, 3\)"):
        conv(x, jnp.zeros((1, 3, 3)))


def test_rope_relative_position_property():
    q, k = _normal(6, (1, 1, 2, 16)), _normal(7, (1, 1, 2, 16))

    def score(m, n):
        qm = apply_rope(q, jnp.array([m]), rotary_dim=12)
        kn = apply_rope(k, jnp.array([n]), rotary_dim=12)
        return jnp.sum(qm * kn, axis=-1)

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score(3, 3), jnp.sum(q * k, axis=-1), rtol=RTOL, atol=ATOL)
    assert not np.allclose(score(7, 3), score(7, 4), atol=1e-3)  # the score does depend on m - n


def test_rope_partial_dims_norm_and_positions():
    x = _normal(8, (2, 5, 3, 10))
    positions = jnp.arange(5)
    rotated = apply_rope(x, positions, rotary_dim=rotary_dim_for(10, 0.5))  # 4 of 10 dims
    np.testing.assert_allclose(rotated[..., 4:], x[..., 4:], rtol=0, atol=0)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=RTOL)
    per_row = apply_rope(x, jnp.stack([positions, positions + 3]), rotary_dim=4)
    np.testing.assert_allclose(
        per_row[1], apply_rope(x[1:], positions + 3, rotary_dim=4)[0], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(apply_rope(x, positions, rotary_dim=0), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        apply_rope(x, positions, rotary_dim=3)


def test_swiglu_formula():
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(2))
    x = _normal(9, (2, 3, 8))
    gate, up, down = (np.asarray(m.kernel[...]) for m in (mlp.gate, mlp.up, mlp.down))
    expected = (np.asarray(jax.nn.silu(x @ gate)) * (np.asarray(x) @ up)) @ down
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-4, atol=1e-5)
    assert SwiGLU.param_count(8, 12) == sum(x.size for x in jax.tree.leaves(nnx.state(mlp, nnx.Param)))


def test_dense_multi_dim_and_bf16():
    dense = Dense((3, 4), 5, ("heads", "kv", "embed"), rngs=nnx.Rngs(3), use_bias=True)
    x = _normal(10, (2, 6, 3, 4))
    expected = jnp.einsum("bthd,hde->bte", x, dense.kernel[...]) + dense.bias[...]
    np.testing.assert_allclose(dense(x), expected, rtol=RTOL, atol=ATOL)
    assert dense(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"trailing dims must be \(3, 4\)"):
        dense(jnp.ones((2, 4, 3)))


def test_logical_axes_read_back():
    mlp = SwiGLU(8, 12, rngs=nnx.Rngs(0))
    specs = nnx.to_pure_dict(logical_axes(mlp))
    assert specs["gate"]["kernel"] == PartitionSpec("embed", "mlp")
    assert specs["down"]["kernel"] == PartitionSpec("mlp", "embed")
    conv = ShortConv(4, rngs=nnx.Rngs(0))
    assert nnx.to_pure_dict(logical_axes(conv)) == {"weight": PartitionSpec("conv", "mlp")}


def test_roles_read_back_and_are_required():
    dense = Dense(4, 3, ("embed", "mlp"), use_bias=True, rngs=nnx.Rngs(0))
    assert param_roles(dense) == {"kernel": "weight", "bias": "no_decay"}
    conv = ShortConv(4, use_bias=True, rngs=nnx.Rngs(0))
    assert param_roles(conv) == {"weight": "weight", "bias": "no_decay"}
    assert param_roles(GatedRMSNorm(4)) == {"scale": "no_decay"}
    with pytest.raises(TypeError, match="role"):
        logical_param(jnp.ones(3), ("mlp",))  # noqa: the missing role is the point
    with pytest.raises(ValueError, match=r"role 'bias' is not valid; valid values are \['weight', 'embedding'"):
        logical_param(jnp.ones(3), ("mlp",), role="bias")
