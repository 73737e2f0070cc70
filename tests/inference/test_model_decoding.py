"""HybridLM decoding for every experiment config, the cache-size accounting, and input errors."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.inference import cache_bytes
from hybrid_jax.inspect import inspect_model
from hybrid_jax.models import build_model
from tests.inference.helpers import B, RAGGED, TOTAL, check_decoding, init_fast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")) if "__" not in p)


def _config(family: str):
    """The tiny preset cut to one pattern period (two when the period is a single layer)."""
    config = load_config(os.path.join(ROOT, "experiments", "configs", f"{family}.py") + ":tiny")
    config.model.num_layers = len(config.model.pattern) if len(config.model.pattern) > 1 else 2
    return config


@pytest.mark.parametrize("family", CONFIGS)
def test_prefill_then_decode_equals_forward(family):
    """Uniform prompts are covered layer by layer (test_mixer_decoding); here the ragged run, whose
    rows hold a full odd prompt and a one-token prompt, checks the model's plumbing of the caches."""
    config = _config(family)
    model = init_fast(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(2), (B, TOTAL), 0, config.model.vocab_size)
    cache = check_decoding(model, tokens, uniform_prompts=False)
    periods = config.model.num_layers // len(config.model.pattern)
    for leaf in jax.tree.leaves(cache.layers):  # stacked over periods like the parameters
        assert leaf.shape[:2] == (periods, B)
    np.testing.assert_array_equal(cache.position, RAGGED + TOTAL - RAGGED.max())


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("context", [1, 1000])
def test_cache_bytes_equal_inspect(family, context):
    """The real cache pytree (bfloat16 compute) holds exactly what `inspect` reports per sequence."""
    config = load_config(os.path.join(ROOT, "experiments", "configs", f"{family}.py") + ":tiny")
    config.model.dtype = "bfloat16"
    for mixer in config.model.mixers.values():
        if "max_seq_len" in mixer:
            mixer.max_seq_len = 1024
    graphdef, state = _abstract(config)
    prompt = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    _, cache = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s).prefill(t, max_len=context), state, prompt)
    assert cache_bytes(cache) == inspect_model(config, context).total_cache_bytes


def _abstract(config):
    """(graphdef, abstract state) of the model: shapes only, nothing initialised."""
    return nnx.split(nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0))))


def test_decode_input_errors():
    graphdef, state = _abstract(_config("transformer"))
    model = nnx.merge(graphdef, state)
    tokens = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"max_len must be an int >= the prompt length T=4, got 3"):
        model.prefill(tokens, max_len=3)
    with pytest.raises(ValueError, match=r"lengths must be an integer array \[B\] = \[2\]"):
        model.prefill(tokens, lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"tokens must be an integer array \[B, T\]"):
        model.prefill(tokens.astype(jnp.float32))
    _, cache = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s).prefill(t, max_len=8), state, tokens)
    with pytest.raises(ValueError, match=r"next_tokens must be \[B\] or \[B, 1\] with B=2"):
        jax.eval_shape(lambda s, t, c: nnx.merge(graphdef, s).decode_step(t, c), state,
                       jnp.zeros((3,), jnp.int32), cache)


def test_log_linear_max_len_beyond_its_levels():
    config = _config("loglinear")
    for mixer in config.model.mixers.values():
        mixer.max_seq_len = 16  # 5 levels: positions 0..15
    graphdef, state = _abstract(config)
    with pytest.raises(ValueError, match=r"max_len=17 needs 6 Fenwick levels but the layer has num_levels=5"):
        jax.eval_shape(lambda s, t: nnx.merge(graphdef, s).prefill(t, max_len=17), state,
                       jnp.zeros((1, 4), jnp.int32))
