"""pallas_kernels.gated_recurrence in interpret mode (GPU and TPU variants) equals the token
recurrence (`delta_reference` / `gla_reference`): outputs, final state and the gradients with respect
to q, k, v, g, beta and the initial state, for every transition (delta: no gate / scalar / per
channel; non-delta: scalar / per channel), with a padded last chunk; and the outputs equal the lead's
chunked form (hybrid_jax.ops.gated.recurrence_chunk)."""
import functools

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from hybrid_jax.ops import gated
from tests.ops.mixers import assert_close

B, T, H, K, V, CHUNK = 1, 40, 2, 16, 16, 16  # T = 2.5 chunks: exercises the padded last chunk

# (name, delta, gate): gate None | "scalar" ([.., 1]) | "channel" ([.., K])
CASES = {
    "deltanet": (True, None),
    "gated_deltanet": (True, "scalar"),
    "kda": (True, "channel"),
    "ssd": (False, "scalar"),
    "gla": (False, "channel"),
}
# TPU interpret mode simulates memory spaces and is several times slower: one case per family.
TPU_CASES = ["kda", "ssd"]


def make_inputs(case, *, seed=0, t=T, k_dim=K, v_dim=V, gate_value=None):
    delta, gate = CASES[case]
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (B, t, H, k_dim)) * k_dim**-0.5
    k = jax.random.normal(keys[1], (B, t, H, k_dim))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (B, t, H, v_dim))
    g = None
    if gate is not None:
        g = jax.nn.log_sigmoid(2.0 + jax.random.normal(keys[3], (B, t, H, k_dim if gate == "channel" else 1)))
        if gate_value is not None:
            g = jnp.full_like(g, gate_value)
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, t, H))) if delta else None
    state = jax.random.normal(keys[5], (B, H, k_dim, v_dim))
    return q, k, v, g, beta, state


def _projections(o_shape, s_shape):
    ko, ks = jax.random.split(jax.random.PRNGKey(99))
    return jax.random.normal(ko, o_shape), jax.random.normal(ks, s_shape)


def _with_grads(fn):
    """jit of (o, final, grads of <o, Po> + <final, Ps> w.r.t. every array input)."""

    def loss(args):
        o, final = fn(*args)
        po, ps = _projections(o.shape, final.shape)
        return jnp.sum(o * po) + jnp.sum(final * ps), (o, final)

    @jax.jit
    def run(*args):
        (_, (o, final)), grads = jax.value_and_grad(loss, has_aux=True)(args)
        return o, final, grads

    return run


@functools.lru_cache(maxsize=None)
def kernel_fn(backend, block_v=None):
    return _with_grads(lambda q, k, v, g, beta, s: pallas_kernels.gated_recurrence(
        q, k, v, g, beta, s, chunk_size=CHUNK, backend=backend, block_v=block_v))


@functools.lru_cache(maxsize=None)
def _reference_fn(delta):
    if delta:
        return _with_grads(pallas_kernels.delta_reference)
    return _with_grads(lambda q, k, v, g, beta, s: pallas_kernels.gla_reference(q, k, v, g, s))


def reference(q, k, v, g, beta, state):
    """The token recurrence with g always per channel (one compile per family); the gradient of a
    scalar gate is the sum of its broadcast copies' gradients."""
    k_dim = k.shape[-1]
    g_full = jnp.zeros(k.shape) if g is None else jnp.broadcast_to(g, k.shape[:-1] + (k_dim,))
    o, final, grads = _reference_fn(beta is not None)(q, k, v, g_full, beta, state)
    if g is None:
        d_g = None
    else:
        d_g = grads[3] if g.shape[-1] == k_dim else grads[3].sum(-1, keepdims=True)
    return o, final, grads[:3] + (d_g,) + grads[4:]


def check(actual, expected, what):
    (o, final, grads), (o_ref, final_ref, grads_ref) = actual, expected
    assert_close(o, o_ref, what=f"{what}: o")
    assert_close(final, final_ref, what=f"{what}: final state")
    names = ["q", "k", "v", "g", "beta", "state"]
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            assert_close(grad, grad_ref, what=f"{what}: d{name}")


@pytest.mark.parametrize("backend,case", [("gpu", c) for c in CASES] + [("tpu", c) for c in TPU_CASES])
def test_matches_reference(backend, case):
    inputs = make_inputs(case)
    expected = reference(*inputs)
    check(kernel_fn(backend)(*inputs), expected, f"{backend}/{case}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hybrid_jax_chunk(case):
    """Against the lead's chunked form in hybrid_jax.ops.gated (independent code, same math)."""
    inputs = make_inputs(case, seed=1)
    o, final, _ = kernel_fn("gpu")(*inputs)
    o_chunk, final_chunk = jax.jit(gated.recurrence_chunk, static_argnames="chunk_size")(
        *inputs, chunk_size=CHUNK)
    assert_close(o, o_chunk, what="o vs hybrid_jax chunk")
    assert_close(final, final_chunk, what="final vs hybrid_jax chunk")


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_strong_decay_and_zero_state(backend):
    """g = -20 per step (1/Gam would reach exp(320) inside a chunk) and a zero initial state."""
    q, k, v, g, beta, state = make_inputs("kda", seed=2, gate_value=-20.0)
    state = jnp.zeros_like(state)
    check(kernel_fn(backend)(q, k, v, g, beta, state), reference(q, k, v, g, beta, state),
          f"{backend}/strong decay")


def test_beta_extremes_and_zero_gate():
    """beta in {0, 1} (skip / full overwrite) with g = 0: the transition is exactly (I - k k^T)."""
    q, k, v, g, beta, state = make_inputs("gated_deltanet", seed=3, gate_value=0.0)
    beta = (jnp.arange(T)[None, :, None] % 2 * jnp.ones((B, T, H))).astype(jnp.float32)
    check(kernel_fn("gpu")(q, k, v, g, beta, state), reference(q, k, v, g, beta, state),
          "beta in {0, 1}")


def test_gpu_pads_head_dims_and_tiles_v():
    """K = V = 48 (multiples of 16, padded to 64 inside) in four V tiles of 16; short T < chunk."""
    inputs = make_inputs("kda", seed=4, t=11, k_dim=48, v_dim=48)
    check(kernel_fn("gpu", 16)(*inputs), reference(*inputs), "K=V=48, block_v=16")


def test_tpu_tiles_v():
    """V = 256 in two lane tiles of 128, K = 8, chunk 8 (the TPU's smallest tiling)."""
    inputs = make_inputs("gated_deltanet", seed=6, t=13, k_dim=8, v_dim=256)
    run = _with_grads(lambda q, k, v, g, beta, s: pallas_kernels.gated_recurrence(
        q, k, v, g, beta, s, chunk_size=8, backend="tpu"))
    check(run(*inputs), reference(*inputs), "tpu V=256, block_v=128")
