"""Attention and MLA layers against explicit formulas; NoPE; MLA's latent (absorbed) form; configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import RMSNorm, apply_rope, build_mixer, count_params, mixer_config, resolve_mixer_config
from hybrid_jax.nn.attention import Attention, mean_attended_keys
from hybrid_jax.nn.mla import MLA

D_MODEL, T = 32, 10


def _x(seed=0, batch=1):
    return jax.random.normal(jax.random.key(seed), (batch, T, D_MODEL), jnp.float32)


def _softmax_attention_np(q, k, v, window=None):
    """Causal (optionally windowed) attention in float64; k, v already repeated to q's heads."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    i, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    scores = np.where(allowed, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _apply(layer, x):
    """layer(x) compiled as one program (much faster on CPU than op-by-op dispatch)."""
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def _build(kind, **overrides):
    return build_mixer(mixer_config(kind, **overrides), D_MODEL, rngs=nnx.Rngs(0))


def test_gqa_window_partial_rope_qk_norm_matches_formula():
    layer = _build("attention", num_heads=4, num_kv_heads=2, rope_fraction=0.5, window=4, qk_norm=True)
    x = _x()
    kernel = lambda dense: np.asarray(dense.kernel[...])  # noqa: E731
    q = jnp.einsum("btd,dhk->bthk", x, kernel(layer.q_proj))
    k = jnp.einsum("btd,dhk->bthk", x, kernel(layer.k_proj))
    v = np.einsum("btd,dhk->bthk", x, kernel(layer.v_proj))
    q, k = layer.q_norm(q), layer.k_norm(k)
    positions = jnp.arange(T)
    q, k = apply_rope(q, positions, rotary_dim=4), apply_rope(k, positions, rotary_dim=4)  # half of 8 dims
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # head h reads kv head h // 2
    o = _softmax_attention_np(q, k, v, window=4)
    expected = np.einsum("bthk,hkd->btd", o, kernel(layer.o_proj))
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=1e-5, atol=1e-5)


def _last_output_after_shuffling_prefix(layer):
    """(y_T, y_T with tokens 0..T-2 permuted): equal iff the layer ignores absolute positions."""
    x = _x(1)
    shuffled = jnp.concatenate([x[:, :-1][:, ::-1], x[:, -1:]], axis=1)
    y = _apply(layer, jnp.concatenate([x, shuffled]))
    return y[0, -1], y[1, -1]


@pytest.mark.parametrize(
    "kind, nope, rope",
    [
        ("attention", dict(rope=False), dict(rope=True)),
        (
            "mla",
            dict(num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=0, v_head_dim=8),
            dict(num_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
        ),
    ],
)
def test_nope_ignores_positions_and_rope_does_not(kind, nope, rope):
    y, y_shuffled = _last_output_after_shuffling_prefix(_build(kind, **nope))
    np.testing.assert_allclose(y_shuffled, y, rtol=1e-5, atol=1e-5)
    y, y_shuffled = _last_output_after_shuffling_prefix(_build(kind, **rope))
    assert np.max(np.abs(y_shuffled - y)) > 1e-4


@pytest.mark.parametrize("q_lora_rank", [0, 8])
def test_mla_latent_absorbed_form_equals_layer(q_lora_rank):
    """Attending over the cached [c_KV ; k^R] with W_UK absorbed into q and W_UV into W_O gives the
    layer's output: the latent cache (kv_lora_rank + qk_rope_head_dim per token) is sufficient."""
    layer = _build(
        "mla",
        num_heads=2,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=6,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=5,
    )
    x = _x(2)
    positions = jnp.arange(T)
    c_kv, k_pe = layer.latent(x, positions)  # what decoding caches
    assert c_kv.shape == (1, T, 6) and k_pe.shape == (1, T, 1, 4)
    q = layer.query(x)
    q_nope, q_pe = q[..., :8], apply_rope(q[..., 8:], positions)
    w_uk, w_uv, w_o = (np.asarray(d.kernel[...], np.float64) for d in (layer.k_up, layer.v_up, layer.o_proj))
    q_latent = np.einsum("bthn,rhn->bthr", q_nope, w_uk)  # absorb W_UK into the query
    scores = np.einsum("bqhr,bkr->bhqk", q_latent, c_kv) + np.einsum("bqhd,bkd->bhqk", q_pe, k_pe[:, :, 0])
    scores = np.where(np.tril(np.ones((T, T), bool)), scores / np.sqrt(12), -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o_latent = np.einsum("bhqk,bkr->bqhr", weights, np.asarray(c_kv, np.float64))
    expected = np.einsum("bqhr,rhv,hvd->bqd", o_latent, w_uv, w_o)  # absorb W_UV into W_O
    np.testing.assert_allclose(_apply(layer, x), expected, rtol=1e-5, atol=1e-5)


def test_mla_parameter_shapes_and_nope():
    layer = _build(
        "mla",
        num_heads=2,
        q_lora_rank=8,
        kv_lora_rank=6,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=5,
    )
    shapes = {
        name: layer_dense.kernel.shape
        for name, layer_dense in (
            ("q_down", layer.q_down),
            ("q_up", layer.q_up),
            ("kv_down", layer.kv_down),
            ("k_up", layer.k_up),
            ("v_up", layer.v_up),
            ("k_rope", layer.k_rope),
            ("o_proj", layer.o_proj),
        )
    }
    assert shapes == {
        "q_down": (32, 8),
        "q_up": (8, 2, 12),
        "kv_down": (32, 6),
        "k_up": (6, 2, 8),
        "v_up": (6, 2, 5),
        "k_rope": (32, 4),
        "o_proj": (2, 5, 32),
    }
    assert isinstance(layer.q_norm, RMSNorm) and isinstance(layer.kv_norm, RMSNorm)
    nope = _build("mla", num_heads=2, kv_lora_rank=6, qk_nope_head_dim=8, qk_rope_head_dim=0, v_head_dim=5)
    assert nope.k_rope is None and not hasattr(nope, "q_down") and nope.q_proj.kernel.shape == (32, 2, 8)
    assert _apply(nope, _x()).shape == (1, T, D_MODEL)


def test_cache_bytes_and_flops_match_parameters():
    attention = resolve_mixer_config(
        mixer_config("attention", num_heads=4, num_kv_heads=2, window=100), D_MODEL
    )
    assert (
        Attention.cache_bytes(attention, D_MODEL, 64) == 2 * 2 * 8 * 64 * 2
    )  # k and v, 2 heads x 8 dims, bf16
    assert Attention.cache_bytes(attention, D_MODEL, 4096) == 2 * 2 * 8 * 100 * 2  # bounded by the window
    mla = resolve_mixer_config(
        mixer_config(
            "mla",
            num_heads=2,
            q_lora_rank=8,
            kv_lora_rank=6,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=5,
        ),
        D_MODEL,
    )
    assert MLA.cache_bytes(mla, D_MODEL, 1000, dtype_bytes=1) == (6 + 4) * 1000
    assert mean_attended_keys(4, None) == 2.5 and mean_attended_keys(4, 2) == 1.75
    # Projection FLOPs are 2 per matmul weight (norm scales are not matmul weights).
    attn_layer, mla_layer = build_mixer(attention, D_MODEL, rngs=nnx.Rngs(0)), build_mixer(
        mla, D_MODEL, rngs=nnx.Rngs(0)
    )
    assert Attention.flops_per_token(attention, D_MODEL, 4) - 2 * 2 * 4 * 8 * 2.5 == 2 * count_params(
        attn_layer
    )
    mla_matmul_params = count_params(mla_layer) - 8 - 6
    assert MLA.flops_per_token(mla, D_MODEL, 4) - 2 * 2 * (12 + 5) * 2.5 == 2 * mla_matmul_params


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("attention", dict(num_heads=5), "num_heads: 5 does not divide d_model=32"),
        ("attention", dict(num_heads=4, num_kv_heads=3), "num_kv_heads: 3 must divide num_heads=4"),
        (
            "attention",
            dict(impl="flash"),
            r"impl: 'flash' is not valid; valid values are \['reference'",
        ),
        ("attention", dict(window=0), "window: must be an int >= 1, got 0"),
        ("attention", dict(rope_fraction=0.01), "rope_fraction: 0.01 rotates no dims"),
        (
            "mla",
            dict(impl="xla"),
            r"impl: 'xla' needs qk_nope_head_dim \+ qk_rope_head_dim \(96\) == v_head_dim \(64\)",
        ),
        ("mla", dict(qk_rope_head_dim=3), "qk_rope_head_dim: must be even"),
        ("mla", dict(kv_lora_rank=0), "kv_lora_rank: must be an int >= 1, got 0"),
    ],
)
def test_config_errors(kind, overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_mixer_config(mixer_config(kind, **overrides), D_MODEL)
