"""The Griffin recurrent layer (`rg_lru`): its forward is the published block written out by hand
over the float64 RG-LRU loop; gates are block-diagonal per head; Lambda starts on RecurrentGemma's
ring; roles, cache size and config errors (causality, gradients and decoding: test_mixers.py and
tests/inference/test_mixer_decoding.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybrid_jax.nn import build_mixer, get_mixer, mixer_config, param_roles, resolve_mixer_config
from tests.inference.helpers import compile_fast, init_fast
from tests.ops import numpy_reference as npref

D_MODEL, HEADS, EXPAND = 16, 2, 1.5  # RNN width 24: two heads of 12 channels


@functools.cache
def _layer(heads=HEADS, expand=EXPAND, d_model=D_MODEL, seed=0):
    cfg = mixer_config("rg_lru", num_heads=heads, expand=expand, chunk_size=4)
    return init_fast(lambda: build_mixer(cfg, d_model, rngs=nnx.Rngs(seed)))


def _gelu(z):  # jax.nn.gelu's default, the tanh approximation, in float64
    return 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3)))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_forward_is_the_published_block():
    """y = (RG-LRU(u, sigmoid(BD_i u), sigmoid(BD_a u)) * GeLU(x W_g + b_g)) W_out + b_out with
    u = conv(x W_in) + b_conv, in float64 over the parameters of the layer."""
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (2, 9, D_MODEL))
    p = {"/".join(map(str, path)): np.asarray(param.get_value(), np.float64)
         for path, param in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    xs = np.asarray(x, np.float64)
    w_in = p["in_proj/proj/kernel"].reshape(D_MODEL, -1)
    h_in = np.concatenate([np.zeros((2, 3, w_in.shape[1])), xs @ w_in], axis=1)
    conv = sum(h_in[:, i:i + 9] * p["in_proj/conv/weight"][i] for i in range(4)) + p["in_proj/conv/bias"]
    u = conv.reshape(2, 9, HEADS, -1)
    gate_x = _sigmoid(np.einsum("bthi,hij->bthj", u, p["input_gate/kernel"]) + p["input_gate/bias"])
    gate_a = _sigmoid(np.einsum("bthi,hij->bthj", u, p["a_gate/kernel"]) + p["a_gate/bias"])
    h, _ = npref.rg_lru_loop(u, gate_x, gate_a, p["a_param"], np.zeros((2,) + u.shape[2:]))
    gate = _gelu(np.einsum("btd,dhp->bthp", xs, p["gate_proj/kernel"]) + p["gate_proj/bias"])
    expected = np.einsum("bthp,hpd->btd", h * gate, p["out_proj/kernel"]) + p["out_proj/bias"]
    graphdef, state = nnx.split(layer)
    y = compile_fast(lambda s, x: nnx.merge(graphdef, s)(x), state, x)(state, x)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)


def test_gates_are_block_diagonal():
    """Head 0's gates read only head 0's channels of u."""
    layer = _layer()
    u = jax.random.normal(jax.random.key(2), (1, 3, HEADS, 12))
    both = jnp.concatenate([u, u.at[:, :, 1].add(1.0)])  # as given, and with head 1 moved
    for gate in (layer.input_gate, layer.a_gate):
        out = np.asarray(gate(both))
        np.testing.assert_array_equal(out[1, :, 0], out[0, :, 0])
        assert np.max(np.abs(out[1, :, 1] - out[0, :, 1])) > 1e-3


def test_lambda_starts_on_the_ring():
    """Base decay a0 = exp(-softplus(Lambda)) in [0.9, 0.999], spread over the ring."""
    layer = _layer(heads=4, expand=1.0, d_model=256, seed=3)
    a0 = np.exp(-np.logaddexp(0.0, np.asarray(layer.a_param[...], np.float64)))
    assert a0.shape == (4, 64)
    assert a0.min() >= 0.9 - 1e-6 and a0.max() <= 0.999 + 1e-6
    assert a0.min() < 0.92 and a0.max() > 0.99


def test_roles():
    roles = param_roles(_layer())
    assert roles["a_param"] == "no_decay" and roles["in_proj"]["conv"]["bias"] == "no_decay"
    for name in ("input_gate", "a_gate"):
        assert roles[name] == {"kernel": "weight", "bias": "no_decay"}
    for name in ("gate_proj", "out_proj"):
        assert roles[name] == {"kernel": "weight", "bias": "no_decay"}
    assert roles["in_proj"]["proj"]["kernel"] == "weight" and roles["in_proj"]["conv"]["weight"] == "weight"


def test_cache_bytes():
    """A 3-token conv history of the RNN width in the compute dtype plus a float32 state per channel."""
    cfg = resolve_mixer_config(mixer_config("rg_lru", num_heads=HEADS, expand=EXPAND), D_MODEL)
    assert get_mixer("rg_lru").cache_bytes(cfg, D_MODEL, 10_000, dtype_bytes=2) == 3 * 24 * 2 + 24 * 4


def test_config_errors():
    with pytest.raises(ValueError, match=r"expand: 1.25 gives a width of 20.0 for d_model=16, which must "
                                         r"be a positive multiple of num_heads=3"):
        resolve_mixer_config(mixer_config("rg_lru", num_heads=3, expand=1.25), D_MODEL)
    with pytest.raises(ValueError, match=r"c: must be a number > 0"):
        resolve_mixer_config(mixer_config("rg_lru", c=0.0), D_MODEL)
    with pytest.raises(ValueError, match=r"impl: .*valid"):
        resolve_mixer_config(mixer_config("rg_lru", impl="pallas"), D_MODEL)
