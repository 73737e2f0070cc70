"""LoRA projections: a zero B leaves the projection unchanged, merging folds the adapter into the
kernel exactly (stacked parameters too), and bad LoRA keys are named."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import mixer_config, resolve_mixer_config
from hybrid_jax.nn.common import Dense
from hybrid_jax.nn.lora import LoRADense, merge_lora_params


def test_lora_dense_merges_into_its_kernel():
    lora = LoRADense(8, (2, 3), ("embed", "heads", "kv"), rank=2, alpha=4.0, rngs=nnx.Rngs(0), use_bias=True)
    x = jax.random.normal(jax.random.key(1), (5, 8))
    plain = Dense(8, (2, 3), ("embed", "heads", "kv"), rngs=nnx.Rngs(0), use_bias=True)
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(plain(x)))  # B = 0: same kernel, no update
    lora.lora_b[...] = jax.random.normal(jax.random.key(2), lora.lora_b.shape)
    params = nnx.to_pure_dict(nnx.state(lora, nnx.Param))
    merged = merge_lora_params(jax.tree.map(np.asarray, params), alpha=4.0)
    assert set(merged) == {"kernel", "bias"}
    plain.kernel[...] = jnp.asarray(merged["kernel"])
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(lora(x)), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(plain(x)), np.asarray(Dense(8, (2, 3), ("embed", "heads", "kv"),
                                                                  rngs=nnx.Rngs(0), use_bias=True)(x)))
    # stacked over a leading (scanned periods) axis: each slice merges on its own
    stacked = jax.tree.map(lambda a: np.stack([a, 2 * a]), jax.tree.map(np.asarray, params))
    merged_stack = merge_lora_params(stacked, alpha=4.0)
    np.testing.assert_allclose(merged_stack["kernel"][0], merged["kernel"], rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(lora_rank=-1), r"lora_rank: must be an int >= 0"),
    (dict(lora_rank=2, lora_targets="qz"), r"lora_targets: must be a non-empty subset of 'qkvo'"),
    (dict(qkv_bias=1), r"qkv_bias=1 has the wrong type"),
])
def test_bad_projection_keys_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve_mixer_config(mixer_config("attention", num_heads=4, **overrides), 32)
