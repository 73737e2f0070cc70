"""The qla layer (quasi-linear attention with candidate isolation): decoding token by token equals the
forward pass with the same candidates; a candidate's input reaches only its own output; config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import build_mixer, mixer_config
from tests.ops.mixers import assert_close

D_MODEL, B, T, PROMPT = 32, 2, 12, 5
CANDIDATES = np.zeros((B, T), bool)
CANDIDATES[0, [3, 6, 7, 10]] = True  # candidates in the prompt and in the decoded part, two adjacent
CANDIDATES[1, [8, 9, 10, 11]] = True  # a history, then only candidates


def _layer(**overrides):
    return build_mixer(mixer_config("qla", num_heads=2, chunk_size=4, **overrides), D_MODEL, rngs=nnx.Rngs(0))


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, T, D_MODEL), jnp.float32)


def test_decode_equals_forward_with_candidates():
    layer, x, mask = _layer(), _x(), jnp.asarray(CANDIDATES)
    y = layer(x, isolated=mask)
    y_prompt, cache = layer.prefill(x[:, :PROMPT], max_len=T, isolated=mask[:, :PROMPT])
    outs = [y_prompt]
    for t in range(PROMPT, T):
        y_t, cache = layer.decode(x[:, t:t + 1], cache, jnp.full((B,), t), isolated=mask[:, t:t + 1])
        outs.append(y_t)
    assert_close(jnp.concatenate(outs, axis=1), y, what="prefill + decode vs forward")
    # The candidates never enter the cache: the state equals that of the history alone.
    _, history_cache = layer.prefill(jnp.where(mask[..., None], 0.0, x), max_len=T, isolated=mask)
    assert_close(cache.state, history_cache.state, what="cache after candidates")
    assert not np.allclose(layer(x), y, atol=1e-3), "isolation must change the candidates' outputs"


@pytest.mark.parametrize("row,candidate", [(0, 6), (1, 9)])
def test_a_candidate_reaches_only_its_own_output(row, candidate):
    layer, x, mask = _layer(), _x(), jnp.asarray(CANDIDATES)
    x_new = x.at[row, candidate].add(jax.random.normal(jax.random.key(5), (D_MODEL,)))
    y, y_new = layer(x, isolated=mask), layer(x_new, isolated=mask)
    changed = np.max(np.abs(np.asarray(y_new - y)), axis=-1)
    assert changed[row, candidate] > 1e-3
    changed[row, candidate] = 0.0
    assert np.max(changed) <= 1e-6 * (float(np.max(np.abs(np.asarray(y)))) + 1.0)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer(mixer_config("qla", num_heads=5), D_MODEL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl"):
        build_mixer(mixer_config("qla", impl="fast"), D_MODEL, rngs=nnx.Rngs(0))
