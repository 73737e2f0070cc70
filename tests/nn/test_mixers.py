"""Every registered mixer: causal, shape-preserving, and trainable (finite gradient for every parameter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import MIXERS, build_mixer, count_params, get_mixer, mixer_config, resolve_mixer_config

D_MODEL, T, CUT = 32, 12, 7

# Small settings per kind so that the test compiles quickly; kinds not listed use their defaults.
# Chunked kinds get chunk_size 4 so that T = 12 spans three chunks and the state passes between them.
SMALL = {
    "attention": dict(num_heads=4, num_kv_heads=2),
    "mla": dict(
        num_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
    ),
    "mamba2": dict(head_dim=16, state_dim=16, chunk_size=4),
    "loglinear_mamba2": dict(head_dim=16, state_dim=16, chunk_size=4),
    "block_sparse": dict(num_heads=4, num_kv_heads=2, block_size=2, top_k=2),  # T = 12: 6 blocks, 2 read
    "nsa": dict(num_heads=4, num_kv_heads=2, block_size=2, top_k=2, window=3),
    "rg_lru": dict(num_heads=4, chunk_size=4),
    # window 4 < T: both the window softmax and the linear part (feature maps) see tokens
    "lolcats": dict(num_heads=4, num_kv_heads=2, window=4, feature_dim=8, chunk_size=4),
}
for _kind in sorted(MIXERS):
    if _kind not in SMALL and "chunk_size" in get_mixer(_kind).default_config():
        SMALL[_kind] = dict(chunk_size=4)


def _layer(kind):
    return build_mixer(mixer_config(kind, **SMALL.get(kind, {})), D_MODEL, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_mixer_causal_forward_backward(kind):
    layer = _layer(kind)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (2, T, D_MODEL), jnp.float32)
    future_noise = jax.random.normal(jax.random.key(2), (2, T - CUT, D_MODEL), jnp.float32)
    x_perturbed = x.at[:, CUT:].add(future_noise)
    probe = jax.random.normal(jax.random.key(3), (2, T, D_MODEL), jnp.float32)

    # Original and perturbed inputs ride in one batch: one forward and one backward pass to compile.
    both = jnp.concatenate([x, x_perturbed])

    @jax.jit
    def run(params):
        def loss(p):
            y = nnx.merge(graphdef, p)(both)
            return jnp.sum(y[:2] * probe), y

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y[:2], y[2:], grads

    y, y_perturbed, grads = run(params)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y_perturbed[:, :CUT], y[:, :CUT], rtol=1e-5, atol=1e-5)
    assert (
        np.max(np.abs(y_perturbed[:, CUT:] - y[:, CUT:])) > 1e-3
    ), "the perturbation must reach later outputs"
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(grad)), f"{kind}: non-finite gradient for {name}"
        assert np.any(np.asarray(grad) != 0), f"{kind}: parameter {name} gets no gradient (unused?)"


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_mixer_interface(kind):
    cls = get_mixer(kind)
    cfg = resolve_mixer_config(mixer_config(kind, **SMALL.get(kind, {})), D_MODEL)
    assert cfg.kind == kind and "kind" not in cls.default_config()
    short, long = cls.cache_bytes(cfg, D_MODEL, 64), cls.cache_bytes(cfg, D_MODEL, 4096)
    # Wider elements never shrink the cache (recurrent states may be float32 whatever dtype_bytes says).
    assert 0 < short <= long <= cls.cache_bytes(cfg, D_MODEL, 4096, dtype_bytes=4)
    flops = cls.flops_per_token(cfg, D_MODEL, 64)
    # Every parameter multiplies at least once per token (projections dominate at this size).
    assert isinstance(flops, int) and flops >= count_params(_layer(kind))


def test_registration_errors():
    from hybrid_jax.nn import Mixer, register_mixer

    class Incomplete(Mixer):
        @classmethod
        def default_config(cls):
            return mixer_config("attention")

    with pytest.raises(TypeError, match=r"Incomplete must define \['cache_bytes', 'flops_per_token'\]"):
        register_mixer("incomplete")(Incomplete)
    with pytest.raises(TypeError, match="must subclass hybrid_jax.nn.registry.Mixer"):
        register_mixer("plain")(nnx.Module)
    with pytest.raises(ValueError, match="mixer kind 'attention' is already registered to Attention"):
        register_mixer("attention")(get_mixer("mla"))
    assert (
        "incomplete" not in MIXERS and "plain" not in MIXERS and MIXERS["attention"].__name__ == "Attention"
    )
    with pytest.raises(ValueError, match="a mixer config must be a dict with a 'kind' key"):
        resolve_mixer_config({"num_heads": 4}, D_MODEL)
