"""What the layers pass to their ops beyond the inputs: KDA's safe gate (`gate_lower_bound`) and the
chunked ops' matmul precision (`precision`), and the config errors for bad values of either.

(The KDA and log-linear KDA layers with the default safe gate equal their impl="reference" versions
in tests/nn/test_linear_mixers.py, and decoding equals the forward in
tests/inference/test_mixer_decoding.py: both run the gate this file checks.)
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import build_mixer, delta, log_linear, mixer_config
from hybrid_jax.nn.delta import KDA, kda_log_decay

D_MODEL, B, T = 32, 1, 8
KDA_SMALL = dict(num_heads=2, num_v_heads=4, gate_low_rank_dim=4, chunk_size=8)
# Every kind whose op is chunked (gated family, SSD, log-linear), with small settings.
CHUNKED = {
    "linear_attention": dict(num_heads=2),
    "gla": dict(num_heads=2, gate_low_rank_dim=4),
    "deltanet": dict(num_heads=2),
    "gated_deltanet": dict(num_heads=2, expand_v=1.0),
    "kda": KDA_SMALL,
    "mamba2": dict(expand=1, head_dim=8, state_dim=8),
    "loglinear_mamba2": dict(expand=1, head_dim=8, state_dim=8, max_seq_len=16),
    "loglinear_gated_deltanet": dict(num_heads=2, expand_v=1.0, max_seq_len=16),
    "loglinear_kda": dict(KDA_SMALL, max_seq_len=16),
    "qla": dict(num_heads=2),
    "lolcats": dict(num_heads=4, num_kv_heads=2, window=4, feature_dim=8),
}


def _layer(kind, **overrides):
    return build_mixer(mixer_config(kind, **{"chunk_size": 8, **CHUNKED[kind], **overrides}), D_MODEL,
                       rngs=nnx.Rngs(0))


def _x(seed=1, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), (B, T, D_MODEL), jnp.float32)


@pytest.mark.parametrize("bound", [-5.0, -0.5])
def test_safe_gate_stays_in_bounds_and_equals_the_formula(bound):
    graphdef, state = nnx.split(_layer("kda", gate_lower_bound=bound))

    @jax.jit  # one compiled call: eager op-by-op dispatch costs seconds on CPU
    def gate_and_formula(state, x):
        layer = nnx.merge(graphdef, state)
        logits = layer.f_up(layer.f_down(x)) + layer.dt_bias[...]
        return layer.gates(x)[0], bound * jax.nn.sigmoid(jnp.exp(layer.A_log[...])[:, None] * logits)

    g, expected = gate_and_formula(state, _x(scale=30.0))  # large inputs drive the sigmoid into both tails
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=0)
    # In exact arithmetic g lies in (bound, 0); float32's sigmoid saturates, so [bound, 0] is the promise.
    assert np.all(g >= bound) and np.all(g <= 0)
    assert np.min(g) < 0.99 * bound and np.max(g) > 0.01 * bound, "both ends of [bound, 0) must be reached"


@pytest.mark.parametrize("bound", [-5.0, -0.05])
def test_safe_gate_starts_at_the_softplus_gates_decays(bound):
    """At x = 0, g = -A dt with dt in [1e-3, 0.1] as the softplus gate starts, except where A dt does
    not fit under the bound: there the sigmoid starts at its midpoint, g = bound / 2."""
    layer = _layer("kda", gate_lower_bound=bound)
    g0 = np.asarray(jax.jit(lambda x: layer.gates(x)[0])(jnp.zeros((1, 1, D_MODEL)))[0, 0])
    dt = -g0 / np.exp(np.asarray(layer.A_log[...]))[:, None]
    at_midpoint = np.isclose(g0, bound / 2, rtol=1e-5)
    assert np.all(g0 >= bound / 2 * (1 + 1e-5))
    assert np.all(((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))) | at_midpoint)
    assert at_midpoint.any() == (bound == -0.05)  # A dt <= 1.6 always fits under -5


def test_unbounded_gate_keeps_the_softplus_form():
    logits = np.random.default_rng(3).normal(size=(B, T, 4, 16)).astype(np.float32) * 5.0
    rates = np.arange(1.0, 5.0, dtype=np.float32)
    g = jax.jit(kda_log_decay, static_argnums=2)(logits, np.log(rates), None)
    np.testing.assert_allclose(g, -rates[:, None] * np.logaddexp(0.0, logits), rtol=1e-6)
    assert np.min(g) < -5.0, "the softplus gate is unbounded below"
    assert _layer("kda", gate_lower_bound=None).op_options() == {"precision": None}


@pytest.mark.parametrize("kind, module_op", [("kda", None), ("loglinear_kda", "log_linear_attention")])
def test_kda_layers_tell_the_op_about_the_safe_gate(kind, module_op, monkeypatch):
    calls = []

    def spy(real):
        def op(*args, **kwargs):
            calls.append({key: kwargs.get(key) for key in ("safe_gate", "lower_bound", "precision")})
            return real(*args, **kwargs)
        return op

    if module_op is None:
        monkeypatch.setattr(KDA, "OP", staticmethod(spy(KDA.OP)))
    else:
        monkeypatch.setattr(log_linear, module_op, spy(getattr(log_linear, module_op)))
    x = jax.ShapeDtypeStruct((B, T, D_MODEL), jnp.float32)
    jax.eval_shape(_layer(kind, gate_lower_bound=-3.0, precision="high"), x)
    jax.eval_shape(_layer(kind, gate_lower_bound=None), x)
    assert calls == [{"safe_gate": True, "lower_bound": -3.0, "precision": "high"},
                     {"safe_gate": None, "lower_bound": None, "precision": None}]


@pytest.mark.parametrize("kind", sorted(CHUNKED))
def test_precision_reaches_the_chunked_op(kind):
    """precision="bfloat16" rounds the chunk matmuls' operands to bfloat16; nothing else in a float32
    layer does, so the traced program holds bfloat16 values exactly when the option got through."""
    x = _x()

    def has_bfloat16(layer):
        graphdef, state = nnx.split(layer)
        return "bf16" in str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state))

    assert has_bfloat16(_layer(kind, precision="bfloat16"))
    assert not has_bfloat16(_layer(kind, precision="highest"))


@pytest.mark.parametrize(
    "kind, overrides, message",
    [
        ("kda", dict(gate_lower_bound=-6.0), r"gate_lower_bound: must be None \(the unbounded softplus gate\) "
                                             r"or a number in \[-5.0, 0\) \(the safe gate's bound\), got -6.0"),
        ("kda", dict(gate_lower_bound=0.0), r"gate_lower_bound: .* got 0.0"),
        ("loglinear_kda", dict(gate_lower_bound=0.5), r"gate_lower_bound: .* got 0.5"),
        ("gla", dict(precision="fp8"), r"precision: 'fp8' is not valid; valid values are "
                                       r"\[None, 'highest', 'high', 'default', 'bfloat16'\]"),
        ("mamba2", dict(precision="float32"), r"precision: 'float32' is not valid"),
        ("deltanet", dict(gate_lower_bound=-1.0), r"unknown key\(s\) \['gate_lower_bound'\] for mixer kind 'deltanet'"),
    ],
)
def test_config_errors(kind, overrides, message):
    with pytest.raises(ValueError, match=message):
        _layer(kind, **overrides)


def test_kda_layer_defaults_to_the_safe_gate():
    assert mixer_config("kda").gate_lower_bound == -5.0 and mixer_config("kda").precision is None
    assert delta.KDA.default_config().gate_lower_bound == -5.0
