"""HybridLM: builds from the transformer tiny config, trains (finite grads), scans correctly, is causal."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hybrid_jax.config import REMAT_POLICIES as REMAT_NAMES
from hybrid_jax.config import load_config, mixer, preset_config
from hybrid_jax.inspect import inspect_model
from hybrid_jax.models import CHECKPOINT_POLICIES, build_model
from hybrid_jax.nn import count_params, logical_axes

ROOT = pathlib.Path(__file__).resolve().parents[2]
B, T = 2, 16


def _tokens(seed, vocab):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab, jnp.int32)


def _loss_and_grads(model, tokens):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits

        return jax.value_and_grad(loss, has_aux=True)(state)

    return run(state)


@pytest.fixture
def transformer_tiny():
    return load_config(str(ROOT / "experiments/configs/transformer.py") + ":tiny")


def test_transformer_tiny_logits_and_grads(transformer_tiny):
    model_cfg = transformer_tiny.model
    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    (loss, logits), grads = _loss_and_grads(model, _tokens(0, model_cfg.vocab_size))
    assert logits.shape == (B, T - 1, model_cfg.vocab_size) and logits.dtype == jnp.float32
    assert abs(float(loss) - np.log(model_cfg.vocab_size)) < 1.0  # near-uniform predictions at init
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves) and sum(float(jnp.sum(g**2)) for g in leaves) > 0

    # Same parameters with every period rematerialised: identical loss and gradients.
    model_cfg.remat = "full"
    (loss_remat, _), grads_remat = _loss_and_grads(
        build_model(model_cfg, rngs=nnx.Rngs(0)), _tokens(0, model_cfg.vocab_size)
    )
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    for g, g_remat in zip(leaves, jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-7)


def test_parameter_count_matches_formula_and_inspect(transformer_tiny):
    m = transformer_tiny.model
    model = build_model(m, rngs=nnx.Rngs(0))
    attention = m.mixers.A
    head_dim = m.d_model // attention.num_heads
    per_layer = (
        2 * m.d_model * attention.num_heads * head_dim  # q, o
        + 2 * m.d_model * attention.num_kv_heads * head_dim  # k, v
        + 3 * m.d_model * m.mlp_dim  # SwiGLU
        + 2 * m.d_model  # two block norms
    )
    expected = m.vocab_size * m.d_model + m.num_layers * per_layer + m.d_model  # tied embedding, final norm
    assert count_params(model) == expected
    assert inspect_model(transformer_tiny, context=64).total_params == expected


def _hybrid_config():
    config = preset_config("tiny")
    config.model.num_layers, config.model.pattern = 4, "AM"
    config.model.mixers = {
        "A": mixer("attention", num_heads=4, num_kv_heads=1, window=6),
        "M": mixer(
            "mla", num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16
        ),
    }
    config.model.tie_embeddings = False
    return config


def test_scan_over_periods_equals_layer_by_layer_and_is_causal():
    model = build_model(_hybrid_config().model, rngs=nnx.Rngs(1))
    assert model.layer_letters == ("A", "M", "A", "M") and model.num_periods == 2
    assert model.periods.blocks[0].mixer.q_proj.kernel.shape[0] == 2  # stacked on a leading layers axis
    tokens = _tokens(1, 256)
    perturbed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 256)
    period_graphdef, stacked = nnx.split(model.periods)

    @jax.jit
    def run(model_state, tokens):
        lm = nnx.merge(nnx.graphdef(model), model_state)
        x = lm.embed(tokens)
        for r in range(lm.num_periods):
            period = nnx.merge(period_graphdef, jax.tree.map(lambda leaf: leaf[r], stacked))
            for block in period.blocks:
                x = block(x)
        unrolled = lm.lm_head(lm.final_norm(x))
        return lm(tokens), unrolled

    logits, unrolled = run(nnx.state(model), tokens)
    np.testing.assert_allclose(logits, unrolled, rtol=1e-5, atol=1e-5)
    logits_perturbed, _ = run(nnx.state(model), perturbed)
    np.testing.assert_allclose(logits_perturbed[:, :10], logits[:, :10], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(logits_perturbed[:, 10:] - logits[:, 10:])) > 1e-3


def test_logical_axes_of_every_parameter():
    abstract = nnx.eval_shape(lambda: build_model(_hybrid_config().model, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    specs = nnx.to_pure_dict(logical_axes(abstract))
    flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(specs))
    assert flat_params.keys() == flat_specs.keys()
    for path, leaf in flat_params.items():
        spec = flat_specs[path]
        assert len(spec) == leaf.ndim, (jax.tree_util.keystr(path), spec, leaf.shape)
        stacked = jax.tree_util.keystr(path).startswith("['periods']")
        assert (spec[0] == "layers") == stacked, (jax.tree_util.keystr(path), spec)
    assert specs["embed"]["embedding"] == P("vocab", "embed") and specs["lm_head"]["kernel"] == P(
        "embed", "vocab"
    )


def test_bfloat16_compute_and_bad_tokens(transformer_tiny):
    model_cfg = transformer_tiny.model
    model_cfg.dtype = "bfloat16"
    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, _tokens(2, model_cfg.vocab_size))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert (
        nnx.to_pure_dict(nnx.state(model, nnx.Param))["embed"]["embedding"].dtype == jnp.float32
    )  # master weights
    with pytest.raises(ValueError, match=r"tokens must be an integer array \[B, T\]"):
        model(jnp.zeros((2, 3), jnp.float32))
    assert set(CHECKPOINT_POLICIES) == set(REMAT_NAMES)
