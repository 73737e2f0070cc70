"""The LoLCATs layer: its forward equals a quadratic numpy evaluation of eq. 7 (window softmax +
Hedgehog linear part, jointly normalised), it is exactly softmax attention when the window covers the
sequence, and its decode memory is constant in the context. (Prefill + decode against this forward:
tests/inference/test_mixer_decoding.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.nn import build_mixer, get_mixer, mixer_config, resolve_mixer_config

D_MODEL, T = 32, 19
HEADS = dict(num_heads=4, num_kv_heads=2, rope_theta=500.0)


def _layer(kind="lolcats", **overrides):
    extra = dict(feature_dim=6, chunk_size=4) if kind == "lolcats" else {}
    return build_mixer(mixer_config(kind, **HEADS, **extra, **overrides), D_MODEL, rngs=nnx.Rngs(0))


def _apply(layer, x):
    """layer(x) compiled (eager op-by-op dispatch costs seconds on CPU)."""
    graphdef, state = nnx.split(layer)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))


def _perturb(layer, seed):
    """Moves the feature maps and mixing factors off their initial values (identity, gamma = 1/2)."""
    rng = np.random.default_rng(seed)
    for fmap in (layer.feature_map_q, layer.feature_map_k):
        fmap.weight[...] = fmap.weight[...] + 0.3 * rng.standard_normal(fmap.weight.shape)
        fmap.bias[...] = 0.3 * rng.standard_normal(fmap.bias.shape)
    layer.window_factor[...] = jnp.asarray(rng.standard_normal(layer.window_factor.shape), jnp.float32)


def _hedgehog(x, fmap):
    z = np.einsum("thd,hdf->thf", x, np.asarray(fmap.weight[...], np.float64)) + np.asarray(fmap.bias[...])

    def softmax(a):
        e = np.exp(a - a.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return np.concatenate([softmax(z), softmax(-z)], axis=-1)


def _eq7_numpy(layer, q, k, v, window):
    """Eq. 7 for one sequence with T x T masks (float64); q [T, H, D], k, v [T, HKV, D]."""
    t, heads, dh = q.shape
    k, v = np.repeat(k, heads // k.shape[1], axis=1), np.repeat(v, heads // v.shape[1], axis=1)
    gamma = 1 / (1 + np.exp(-np.asarray(layer.window_factor[...], np.float64)))[:, None, None]
    n, i = np.arange(t)[:, None], np.arange(t)[None, :]
    in_window, in_linear = (i <= n) & (n - i < window), i <= n - window
    scores = np.einsum("nhd,ihd->hni", q, k) / np.sqrt(dh)
    c = np.where(in_window, scores, -np.inf).max(-1, keepdims=True)
    soft = np.where(in_window, np.exp(scores - c), 0.0) * gamma
    lin = np.einsum("nhf,ihf->hni", _hedgehog(q, layer.feature_map_q), _hedgehog(k, layer.feature_map_k))
    lin = np.where(in_linear, lin, 0.0) * (1 - gamma)
    weights = (soft + lin) / (soft + lin).sum(-1, keepdims=True)
    return np.einsum("hni,ihd->nhd", weights, v)


def test_forward_equals_quadratic_eq7():
    window = 4  # T = 19: five window blocks (the last partial), the linear part over 15 positions
    layer = _layer(window=window)
    _perturb(layer, 0)
    x = jax.random.normal(jax.random.key(1), (2, T, D_MODEL), jnp.float32)
    q, k, v = (np.asarray(a, np.float64) for a in layer.project_qkv(x, jnp.arange(T)))
    mixed = np.stack([_eq7_numpy(layer, q[b], k[b], v[b], window) for b in range(2)])
    expected = layer.o_proj(jnp.asarray(mixed, jnp.float32))
    np.testing.assert_allclose(_apply(layer, x), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_window_covering_the_sequence_is_softmax_attention():
    attention, linearised = _layer("attention"), _layer(window=T)
    _perturb(linearised, 1)  # whatever the feature maps and mixing: no token reaches the linear part
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert np.array_equal(getattr(attention, name).kernel[...], getattr(linearised, name).kernel[...])
    x = jax.random.normal(jax.random.key(2), (2, T, D_MODEL), jnp.float32)
    np.testing.assert_allclose(_apply(linearised, x), _apply(attention, x), rtol=1e-5, atol=1e-5)


def test_decode_memory_is_constant_in_context():
    cls = get_mixer("lolcats")
    cfg = resolve_mixer_config(mixer_config("lolcats", num_heads=9, num_kv_heads=3, window=64), 576)
    at_4k, at_32k = cls.cache_bytes(cfg, 576, 4096), cls.cache_bytes(cfg, 576, 32768)
    # state 9 heads x 2F=128 x (64 + 1) float32, plus a ring of 64 keys and values (3 heads x 64, bf16)
    assert at_4k == at_32k == 9 * 128 * 65 * 4 + 2 * 3 * 64 * 64 * 2
    attention_cfg = resolve_mixer_config(mixer_config("attention", num_heads=9, num_kv_heads=3), 576)
    assert get_mixer("attention").cache_bytes(attention_cfg, 576, 32768) > 20 * at_32k
