"""HybridLM decoding for every experiment config, the cache-size accounting, and input errors."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.config import load_config
from hybrid_jax.inference import Decoder, cache_bytes, decode_step
from hybrid_jax.inspect import inspect_model
from hybrid_jax.models import build_model
from tests.inference.helpers import B, RAGGED, RTOL, TOTAL, check_decoding, compile_fast, init_fast

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
    periods = config.model.num_layers // len(config.model.pattern) - model.num_lead
    for leaf in jax.tree.leaves(cache.layers):  # stacked over the scanned periods like the parameters
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


def _limit_after_prefill(graphdef, state, prompt_len: int, max_len: int | None):
    """`decode_limit` of the cache a prefill leaves (traced only: shapes, no FLOPs)."""
    seen = []

    def prefill(s, tokens):
        model = nnx.merge(graphdef, s)
        _, cache = model.prefill(tokens, max_len=max_len)
        seen.append(model.decode_limit(cache))
        return cache

    jax.eval_shape(prefill, state, jnp.zeros((2, prompt_len), jnp.int32))
    return seen[0]


@pytest.mark.parametrize("family", CONFIGS)
def test_decode_limit_and_the_prefill_default(family):
    """A global attention or MLA cache (or a window wider than it) of S = max_len slots decodes
    positions < S, and log-linear levels for max_len = 2^k positions < 2^k; other recurrent layers
    and windows that fit have no limit. Without max_len, prefill refuses a model whose cache is
    sized by it, and accepts the others."""
    config = _config(family)
    graphdef, state = _abstract(config)

    def bounded(max_len):
        return any(cfg.kind in ("mla", "loglinear_gated_deltanet", "block_sparse")
                   or (cfg.kind == "attention" and (cfg.window is None or cfg.window > max_len))
                   for cfg in config.model.mixers.values())

    for max_len in (16, 64):  # samba's tiny window is 32
        expected = max_len if bounded(max_len) else None
        assert _limit_after_prefill(graphdef, state, 4, max_len) == expected
    if bounded(40):
        with pytest.raises(ValueError, match=r"HybridLM.prefill: max_len is required for pattern .* the default "
                                             r"\(the prompt length T=40\) leaves no room to decode"):
            _limit_after_prefill(graphdef, state, 40, None)
    else:
        assert _limit_after_prefill(graphdef, state, 40, None) is None


@pytest.mark.parametrize("family", ["transformer", "mamba2"])
def test_newcomer_prefill_then_decode_step(family):
    """`model.prefill(tokens)` then `model.decode_step(next, cache)`, the defaults as a newcomer uses
    them: a recurrent model decodes the forward's logits; a transformer asks for max_len, and with
    it decodes the forward's logits too."""
    config = _config(family)
    model = init_fast(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, config.model.vocab_size)
    graphdef, state = nnx.split(model)
    forward = compile_fast(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)(state, tokens)

    def prefill_then_decode(s, prompt, next_tokens):
        model = nnx.merge(graphdef, s)
        _, cache = model.prefill(prompt)
        return model.decode_step(next_tokens, cache)[0]

    def with_room(s, prompt, next_tokens):
        model = nnx.merge(graphdef, s)
        _, cache = model.prefill(prompt, max_len=6)
        return model.decode_step(next_tokens, cache)[0]

    args = (state, tokens[:, :5], tokens[:, 5])
    run = prefill_then_decode
    if family == "transformer":
        with pytest.raises(ValueError, match=r"max_len is required .* pass max_len = T \+ the number of tokens"):
            jax.eval_shape(prefill_then_decode, *args)
        run = with_room
    logits = compile_fast(run, *args)(*args)
    scale = float(np.max(np.abs(forward)))
    np.testing.assert_allclose(logits, forward[:, 5], rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("family", ["transformer", "kimi_linear", "loglinear"])
def test_decoding_past_the_cache_is_nan_in_jit_and_an_error_outside(family):
    """Rows of a ragged batch: row 0 fills the max_len=4 cache (4 slots; 3 Fenwick levels: positions
    0..3) with its prompt, row 1 has room. The jitted step gives NaN logits for row 0 only (row 1
    equals the forward); `Decoder` raises first."""
    config = _config(family)
    model = init_fast(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(4), (2, 4), 0, config.model.vocab_size)
    lengths = jnp.array([4, 2], jnp.int32)
    decoder = Decoder(model)
    _, cache = decoder.prefill(tokens, max_len=4, lengths=lengths)
    next_tokens = tokens[:, 2]  # row 1's next token is its own position-2 token
    logits, _ = decode_step(decoder.graphdef, decoder.state, next_tokens, jax.tree.map(jnp.copy, cache))
    assert np.all(np.isnan(logits[0])) and np.all(np.isfinite(logits[1]))
    forward = compile_fast(lambda s, t: nnx.merge(decoder.graphdef, s)(t), decoder.state, tokens)(decoder.state, tokens)
    scale = float(np.max(np.abs(forward)))
    np.testing.assert_allclose(logits[1], forward[1, 2], rtol=RTOL, atol=RTOL * scale)
    with pytest.raises(ValueError, match=r"Decoder.decode_step: a row is at position 4, past the 4 positions "
                                         r"the cache holds \(set by the prefill's max_len\)"):
        decoder.decode_step(next_tokens, cache)
