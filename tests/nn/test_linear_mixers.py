"""Linear mixer layers: shape, causality, gradients, impl equivalence, parameterisation, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import build_mixer, mixer_config
from hybrid_jax.nn.log_linear import LevelScales, mean_active_levels

D_MODEL, B, T, CUT = 32, 2, 13, 7
# Tiny settings; chunk_size 8 gives two chunks, the second ragged. Grouped heads where a layer has them.
CONFIGS = {
    "linear_attention": dict(num_heads=2, feature_map="hedgehog", output_norm="denominator"),
    "gla": dict(num_heads=2, gate_low_rank_dim=4),
    "mamba": dict(expand=1, state_dim=4),
    "mamba2": dict(expand=1, head_dim=8, state_dim=8, num_groups=2),
    "deltanet": dict(num_heads=2),
    "gated_deltanet": dict(num_heads=2, num_v_heads=4, expand_v=1.0),
    "kda": dict(num_heads=2, num_v_heads=4, gate_low_rank_dim=4),
    "loglinear_mamba2": dict(expand=1, head_dim=8, state_dim=8, num_groups=2, max_seq_len=16),
    "loglinear_gated_deltanet": dict(num_heads=2, expand_v=1.0, max_seq_len=16),
    "loglinear_kda": dict(num_heads=2, num_v_heads=4, gate_low_rank_dim=4, max_seq_len=16),
}
BASE_OF = {"loglinear_mamba2": "mamba2", "loglinear_gated_deltanet": "gated_deltanet", "loglinear_kda": "kda"}


def _cfg(kind, **overrides):
    return mixer_config(kind, **{"chunk_size": 8, **CONFIGS[kind], **overrides})


def _layer(kind, **overrides):
    return build_mixer(_cfg(kind, **overrides), D_MODEL, rngs=nnx.Rngs(0))


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layer_shape_causality_gradients_and_impls(kind):
    layer = _layer(kind)
    graphdef, params = nnx.split(layer)
    reference_graphdef = nnx.graphdef(_layer(kind, impl="reference"))
    x = _normal(1, (B, T, D_MODEL))
    x_perturbed = x.at[:, CUT:].add(_normal(2, (B, T - CUT, D_MODEL)))
    probe = _normal(3, (B, T, D_MODEL))

    @jax.jit
    def run(params):
        def loss(p):  # x and x_perturbed in one batch: one forward graph serves both
            y_both = nnx.merge(graphdef, p)(jnp.concatenate([x, x_perturbed]))
            return jnp.sum(y_both[:B] * probe), y_both

        (_, y_both), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y_both[:B], y_both[B:], nnx.merge(reference_graphdef, params)(x), grads

    y, y_perturbed, y_reference, grads = run(params)
    assert y.shape == x.shape and y.dtype == jnp.float32 and np.all(np.isfinite(y))
    assert jax.eval_shape(layer, jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)).dtype == jnp.bfloat16
    np.testing.assert_allclose(y_reference, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_perturbed[:, :CUT], y[:, :CUT], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(y_perturbed[:, CUT:] - y[:, CUT:])) > 1e-3
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(grad)), f"{kind}: non-finite gradient for {name}"
        assert np.any(np.asarray(grad) != 0), f"{kind}: {name} gets no gradient"


@pytest.mark.parametrize("kind", sorted(BASE_OF))
def test_log_linear_with_unit_lambda_equals_base_layer(kind, monkeypatch):
    log_linear = _layer(kind)
    base_overrides = {key: value for key, value in CONFIGS[kind].items() if key != "max_seq_len"}
    base = build_mixer(mixer_config(BASE_OF[kind], chunk_size=8, **base_overrides), D_MODEL, rngs=nnx.Rngs(7))
    shared = nnx.to_pure_dict(nnx.state(log_linear))
    del shared["level_scales"]
    nnx.update(base, shared)  # every base parameter now equals the log-linear layer's
    x = _normal(4, (B, T, D_MODEL))
    def forward(layer):  # a fresh jit per call: the monkeypatch below must be traced
        return jax.jit(lambda state: nnx.merge(nnx.graphdef(layer), state)(x))(nnx.state(layer))

    y_learned = forward(log_linear)
    monkeypatch.setattr(LevelScales, "__call__", lambda self, u: jnp.ones(u.shape[:2] + self.level_weight.shape))
    y_unit, y_base = forward(log_linear), forward(base)
    np.testing.assert_allclose(y_unit, y_base, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(y_learned - y_base)) > 1e-3, "the learned level scales must change the output"


def test_log_linear_too_many_tokens_for_its_levels():
    layer = _layer("loglinear_gated_deltanet", num_levels=4)  # positions 0..7 only
    with pytest.raises(ValueError, match=r"has L=4 levels but positions 0\.\.12 need L >= 5"):
        jax.eval_shape(layer, jax.ShapeDtypeStruct((B, T, D_MODEL), jnp.float32))


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "gated_deltanet", "kda"])
def test_dt_and_decay_initialisation(kind):
    # KDA with the softplus gate; the safe gate's start: tests/nn/test_op_options.py
    layer = _layer(kind, **({"gate_lower_bound": None} if kind == "kda" else {}))
    dt = jax.nn.softplus(layer.dt_bias[...])
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))), "softplus(dt_bias) must start in [dt_min, dt_max]"
    rates = np.exp(np.asarray(layer.A_log[...]))
    if kind == "mamba":  # S4D-real: A[e, n] = -(n + 1)
        np.testing.assert_allclose(rates, np.broadcast_to(np.arange(1.0, 5.0), rates.shape), rtol=1e-6)
    else:
        assert np.all((rates >= 1.0) & (rates <= 16.0))


def test_kda_gates():
    layer = _layer("kda", gate_lower_bound=None)  # the softplus gate (the safe gate: test_op_options.py)
    x = _normal(5, (B, T, D_MODEL))
    g, beta = layer.gates(x)
    assert g.shape == (B, T, 4, D_MODEL // 2) and beta.shape == (B, T, 4)
    assert np.all(g <= 0) and np.any(g < -1e-3)
    assert np.all((beta > 0) & (beta < 1))
    # At x = 0 the decay rate is the initial one: -g / A = softplus(dt_bias) per head and channel.
    g0, _ = layer.gates(jnp.zeros((1, 1, D_MODEL)))
    np.testing.assert_allclose(-g0[0, 0] / jnp.exp(layer.A_log[...])[:, None], jax.nn.softplus(layer.dt_bias[...]), rtol=1e-6)
    # Gated DeltaNet: one decay per value head.
    g_gdn, _ = _layer("gated_deltanet").gates(x)
    assert g_gdn.shape == (B, T, 4) and np.all(g_gdn <= 0)


def test_linear_attention_denominator_and_hedgehog_features():
    layer = _layer("linear_attention")
    x = _normal(6, (1, T, D_MODEL))
    phi_q, phi_k = layer.features(x)
    assert phi_q.shape == (1, T, 2, 2 * 16) and np.all(phi_q > 0)
    # Two softmaxes, over x A + b and over its negation: each half sums to one.
    np.testing.assert_allclose(phi_k[..., :16].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(phi_k[..., 16:].sum(-1), 1.0, rtol=1e-6)
    # Katharopoulos normalisation, written out quadratically.
    scores = np.tril(np.einsum("thf,shf->hts", phi_q[0], phi_k[0]))
    o = np.einsum("hts,shv->thv", scores, layer.v_proj(x)[0]) / (scores.sum(-1).T[..., None] + layer.eps)
    np.testing.assert_allclose(jax.jit(lambda u: layer(u))(x)[0], layer.o_proj(jnp.asarray(o)), rtol=1e-5, atol=1e-5)


def test_mean_active_levels():
    for context in (1, 2, 7, 64, 100):
        expected = np.mean([1 + bin(t).count("1") for t in range(context)])
        assert mean_active_levels(context) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("linear_attention", dict(num_heads=5), r"num_heads: 5 does not divide d_model=32"),
        ("linear_attention", dict(feature_map="softmax"), r"feature_map: 'softmax' is not valid; valid values are \['identity', 'elu', 'relu', 'hedgehog'\]"),
        ("linear_attention", dict(feature_map="identity"), r"output_norm: 'denominator' needs a non-negative feature map"),
        ("gla", dict(expand_k=0.3), r"expand_k: 0.3 gives a width of 9.6 for d_model=32, which must be a positive multiple of num_heads=2"),
        ("mamba", dict(impl="pallas"), r"impl: 'pallas' is not valid; valid values are \['reference', 'scan', 'chunk'\]"),
        ("mamba", dict(dt_min=0.5), r"dt_min: 0.5 must be <= dt_max=0.1"),
        ("mamba2", dict(head_dim=24), r"head_dim: 24 must divide the inner width expand \* d_model = 32"),
        ("mamba2", dict(num_groups=3), r"num_groups: 3 must divide the number of heads 4"),
        ("deltanet", dict(num_v_heads=3), r"num_v_heads: 3 must be a multiple of num_heads=2"),
        ("gated_deltanet", dict(conv_size=0), r"conv_size: must be an int >= 1, got 0"),
        ("kda", dict(gate_low_rank_dim=0), r"gate_low_rank_dim: must be an int >= 1, got 0"),
        ("kda", dict(num_levels=4), r"unknown key\(s\) \['num_levels'\] for mixer kind 'kda'"),
        ("loglinear_kda", dict(chunk_size=48), r"chunk_size: 48 must be a power of two"),
        ("loglinear_mamba2", dict(num_levels=0), r"num_levels: must be an int >= 1, got 0"),
    ],
)
def test_config_errors(kind, overrides, message):
    with pytest.raises(ValueError, match=message):
        _layer(kind, **overrides)
