"""The block-sparse attention layer: equals its formula (projections, RoPE, block selection), is the
attention layer when top_k covers every block, and its config, FLOPs and cache size; NSA is the gated
sum of its compressed, selected and sliding-window branches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import apply_rope, build_mixer, get_mixer, mixer_config, resolve_mixer_config
from hybrid_jax.nn.kv_cache import mean_attended_keys
from hybrid_jax.nn.sparse_attention import mean_sparse_keys
from tests.nn.test_attention import _softmax_attention_np
from tests.ops.test_sparse_attention import _numpy_block_sparse, numpy_block_tokens

D_MODEL, T = 32, 13


def _build(kind, **overrides):
    return build_mixer(mixer_config(kind, **overrides), D_MODEL, rngs=nnx.Rngs(0))


def _apply(layer, x):
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def _x(batch=2):
    return jax.random.normal(jax.random.key(0), (batch, T, D_MODEL), jnp.float32)


def test_layer_matches_formula():
    layer = _build("block_sparse", num_heads=4, num_kv_heads=2, block_size=3, top_k=2)
    x = _x()
    projections = (layer.q_proj, layer.k_proj, layer.v_proj)
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, dense.kernel[...]) for dense in projections)
    q, k = apply_rope(q, jnp.arange(T)), apply_rope(k, jnp.arange(T))
    o, skipped = _numpy_block_sparse(q, k, v, block_size=3, top_k=2)
    assert skipped > 0  # some earlier blocks are left out: the layer is not dense attention here
    expected = np.einsum("bthk,hkd->btd", o, np.asarray(layer.o_proj.kernel[...]))
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=2e-5, atol=2e-5)


def test_top_k_covering_every_block_is_the_attention_layer():
    sparse = _build("block_sparse", num_heads=4, num_kv_heads=2, block_size=4, top_k=3, impl="reference")
    dense = _build("attention", num_heads=4, num_kv_heads=2)
    nnx.update(dense, nnx.state(sparse, nnx.Param))  # the same projections
    x = _x(1)
    np.testing.assert_allclose(_apply(sparse, x), _apply(dense, x), rtol=2e-5, atol=2e-5)


def test_flops_and_cache_size():
    cls = get_mixer("block_sparse")
    cfg, dense = (resolve_mixer_config(mixer_config("block_sparse", num_heads=4, num_kv_heads=2, block_size=4,
                                                    top_k=top_k), D_MODEL) for top_k in (2, 1024))
    # Dense when the blocks before a token never exceed top_k; sparse beyond that.
    assert mean_sparse_keys(12, 4, 2)[1] == mean_attended_keys(12, None)
    scored, attended = mean_sparse_keys(4096, 4, 2)
    assert scored == pytest.approx(4095 / 2 / 4, abs=0.5) and attended < 4 * 3 + 1
    # 101 tokens fill 26 blocks of 4: 2 (k, v) x 2 heads x 8 dims x 104 slots x 2 bytes, and 26 float32
    # pooled keys of 2 x 8.
    assert cls.cache_bytes(cfg, D_MODEL, 101) == 2 * 16 * 104 * 2 + 26 * 16 * 4
    assert cls.flops_per_token(cfg, D_MODEL, 4096) < cls.flops_per_token(dense, D_MODEL, 4096) / 10


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=4, num_kv_heads=3), r"num_kv_heads: 3 must divide num_heads=4"),
        (dict(block_size=0), r"block_size: must be an int >= 1, got 0"),
        (dict(top_k=0), r"top_k: must be an int >= 1, got 0"),
        (dict(impl="xla"), r"impl: 'xla' is not valid; valid values are \['reference', 'chunk'\]"),
        (dict(num_heads=2, head_dim=5), r"head_dim: 5 must be even for RoPE"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_mixer_config(mixer_config("block_sparse", **overrides), D_MODEL)


def test_nsa_is_the_gated_sum_of_its_three_branches():
    layer = _build("nsa", num_heads=4, num_kv_heads=2, block_size=3, top_k=1, window=4)
    rng = np.random.default_rng(0)
    for compress in (layer.compress_k, layer.compress_v):  # position weights other than the mean
        compress.weight[...] = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    x, positions = _x(), jnp.arange(T)
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, d.kernel[...]) for d in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, k = apply_rope(q, positions), apply_rope(k, positions)
    k_win, v_win, k_src, v_src = np.moveaxis(np.einsum("btd,dinh->btinh", x, layer.branch_kv.kernel[...]), 2, 0)
    k_win = apply_rope(jnp.asarray(k_win), positions)
    tokens = [np.einsum("bcjnh,j->bcnh", src[:, :12].reshape(2, 4, 3, 2, 8), np.asarray(c.weight[...]))
              for src, c in ((k_src, layer.compress_k), (v_src, layer.compress_v))]
    branches = [
        numpy_block_tokens(q, *tokens, np.broadcast_to(np.arange(T), (2, T)), 3),
        _numpy_block_sparse(q, k, v, block_size=3, top_k=1)[0],
        _softmax_attention_np(q, np.repeat(k_win, 2, axis=2), np.repeat(v_win, 2, axis=2), window=4),
    ]
    gates = 1 / (1 + np.exp(-np.einsum("btd,dhg->bthg", x, layer.gate.kernel[...])))
    o = sum(gates[..., i, None] * branch for i, branch in enumerate(branches))
    expected = np.einsum("bthk,hkd->btd", o, np.asarray(layer.o_proj.kernel[...]))
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=2e-5, atol=2e-5)
