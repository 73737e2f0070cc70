"""Options of the chunked gated family: the safe gate (per-channel decays bounded below, diagonal
blocks as matmuls), the matmul precision, and the recomputing, blocked backward of
`pallas_kernels.recurrence.chunked_recurrence`.

Tolerances, per precision (relative to max|expected| + 1, `mixers.assert_close`; gradients 10x):
* "highest" (and, on CPU, "high" / "default", which XLA:CPU computes in float32 anyway): 2e-5, the
  float32 rounding of the other tests.
* "bfloat16" (operands rounded to 8 mantissa bits, float32 accumulation): 1e-2 on outputs and
  states, a few bf16 roundings (2^-8 each); the measured error on the test's inputs is 2.3e-3, and
  the test also checks that it is not float32-exact.
"""
import functools

import jax
import jax.numpy as jnp
import pytest

from hybrid_jax import ops
from hybrid_jax.ops import log_linear as ll
from pallas_kernels import chunk_math, recurrence
from pallas_kernels.chunk_math import KernelConfig
from tests.ops import mixers
from tests.ops.mixers import Shape, assert_close, check_against_reference

BOUND = mixers.SAFE_GATE_BOUND


@pytest.mark.parametrize("name,shape", [
    ("kda_safe_at_bound", Shape(time=37)),
    ("gla_safe_at_bound", Shape(time=37)),
    ("kda_safe", Shape(batch=1, time=1, heads=1, value_heads=1)),
])
def test_safe_gate_matches_reference(name, shape):
    """T = 37 with chunks of 16 (a partial last chunk), grouped heads, an initial state, gradients."""
    check_against_reference(name, "chunk", shape, chunk_size=16)


def test_safe_gate_long_chunks_at_the_bound():
    """Chunks of 64 (four sub-chunks, so the between-sub-chunk factors are exercised) at the bound."""
    check_against_reference("kda_safe_at_bound", "chunk", Shape(batch=1, time=150, heads=1, value_heads=2),
                            chunk_size=64)


def test_safe_gate_clamps_below_the_bound_and_checks_its_promise():
    (q, k, v), kw = mixers.make_bounded(jax.random.PRNGKey(0), Shape(time=20), jnp.float32, delta=True, at_bound=False)
    below = kw["g"].at[:, 3].set(-9.0)
    clamped = jnp.maximum(below, BOUND)
    o = jax.jit(lambda g: ops.kda(q, k, v, g=g, beta=kw["beta"], safe_gate=True)[0])(below)
    o_ref = jax.jit(lambda g: ops.kda(q, k, v, g=g, beta=kw["beta"], impl="reference")[0])(clamped)
    assert_close(o, o_ref, what="a gate below the bound acts as the bound")
    with pytest.raises(ValueError, match=r"gla: safe_gate=True needs a per-channel gate"):
        ops.gla(q, k, v, g=kw["g"][..., 0], safe_gate=True)
    with pytest.raises(ValueError, match=r"kda: lower_bound must be a float in \[-5.0, 0\)"):
        ops.kda(q, k, v, g=kw["g"], beta=kw["beta"], safe_gate=True, lower_bound=-8.0)


def test_safe_gate_log_linear_kda():
    """The log-linear chunk form over a KDA transition with every gate at the bound."""
    shape = Shape(batch=1, time=37, heads=1, value_heads=2)
    (q, k, v), kw = mixers.make_bounded(jax.random.PRNGKey(3), shape, jnp.float32, delta=True, at_bound=True)
    levels = ll.num_levels(shape.time)
    lam = jax.random.normal(jax.random.PRNGKey(4), (1, shape.time, 2, levels))

    def loss(impl, q, k, v):
        o, final = ll.log_linear_attention(q, k, v, g=kw["g"], beta=kw["beta"], level_scales=lam, impl=impl,
                                           chunk_size=16, safe_gate=True, output_final_state=True)
        return jnp.sum(jnp.sin(o)) + jnp.sum(final.levels ** 2), o

    run = lambda impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), (0, 1, 2), has_aux=True))  # noqa: E731
    (_, o), grads = run("chunk")(q, k, v)
    (_, o_ref), grads_ref = run("reference")(q, k, v)
    assert_close(o, o_ref, what="log-linear KDA safe gate output")
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, 2e-4, what="log-linear KDA safe gate grads")


def test_precision_choices():
    shape = Shape(batch=1, time=40, heads=1, value_heads=2)
    (q, k, v), kw = mixers.make_gated_delta(jax.random.PRNGKey(1), shape, jnp.float32, per_channel=True)
    run = jax.jit(functools.partial(ops.kda, output_final_state=True, chunk_size=16),
                  static_argnames=("impl", "precision"))
    o_ref, s_ref = run(q, k, v, **kw, impl="reference")
    for precision in ("highest", "high", "default"):  # XLA:CPU computes every one in float32
        o, s = run(q, k, v, **kw, precision=precision)
        assert_close(o, o_ref, what=f"precision={precision}")
    o, s = run(q, k, v, **kw, precision="bfloat16")
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert_close(o, o_ref, 1e-2, what="bfloat16 output")
    assert_close(s, s_ref, 1e-2, what="bfloat16 state")
    assert float(jnp.max(jnp.abs(o - o_ref))) > 1e-4, "bfloat16 operands should not be float32-exact"
    with pytest.raises(ValueError, match=r"kda: unknown precision='fp8'; valid choices are \['highest'"):
        ops.kda(q, k, v, **kw, precision="fp8")


def _plain_chunked(inputs, s0):
    """Autodiff's chunked recurrence: the same terms and passes with no custom VJP and no blocks."""
    terms = chunk_math.chunk_terms(*inputs)
    entering, final = recurrence.state_pass(terms, s0)
    return chunk_math.chunk_step(terms, entering)[0], final


@pytest.mark.parametrize("delta,isolated", [(True, False), (False, True)])
def test_recomputing_blocked_backward_equals_autodiff(delta, isolated):
    """Five chunks in blocks of 2 (the last block half identity padding) and in one block, in the
    heads-first layout and in the time-major one the ops use (`[B, N, C, H, .]`, blocks sliced in
    place, heads moved forward per block; with the delta rule the forward's U kept for the
    backward): outputs, final state and every gradient equal autodiff of the plain chunked form
    (with document resets in the delta case, isolated tokens in the other)."""
    b, h, n, c, kd, vd = 2, 3, 5, 8, 4, 6
    keys = jax.random.split(jax.random.PRNGKey(7), 8)
    q, k = (jax.random.normal(x, (b, h, n, c, kd)) for x in keys[:2])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (b, h, n, c, vd))
    g = -jax.nn.softplus(jax.random.normal(keys[3], (b, h, n, c, kd)))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, h, n, c))) if delta else None
    inputs = (q, k, v, g, beta)
    mask = (jax.random.uniform(keys[5], (b, h, n, c)) < 0.3).astype(jnp.float32)
    inputs += (mask,) if isolated else (None, mask)  # isolated tokens, or document resets
    s0 = jax.random.normal(keys[6], (b, h, kd, vd))
    cot_o, cot_s = jax.random.normal(keys[7], (b, h, n, c, vd)), jnp.ones((b, h, kd, vd))

    def loss(run, inputs, s0):
        o, final = run(inputs, s0)
        return jnp.sum(o * cot_o) + jnp.sum(final * cot_s * final)

    expected = jax.jit(jax.grad(functools.partial(loss, _plain_chunked), (0, 1)))(inputs, s0)
    plain_o = jax.jit(_plain_chunked)(inputs, s0)[0]
    for blocks, time_major in ((2, False), (0, False), (2, True)):
        config = KernelConfig(c, "xla", False, 0, block_chunks=blocks, time_major=time_major)
        what = f"blocks={blocks}{' time-major' if time_major else ''}"

        def run(inputs, s0, config=config):
            if not config.time_major:
                return recurrence.chunked_recurrence(config, inputs, s0)
            to_time = lambda x: None if x is None else jnp.moveaxis(x, 1, 3)  # noqa: E731
            o, final = recurrence.chunked_recurrence(config, tuple(map(to_time, inputs)), s0)
            return jnp.moveaxis(o, 3, 1), final

        assert_close(jax.jit(run)(inputs, s0)[0], plain_o, what=f"{what} output")
        grads = jax.jit(jax.grad(functools.partial(loss, run), (0, 1)))(inputs, s0)
        for path, got in jax.tree.leaves_with_path(grads):
            want = functools.reduce(lambda x, key: x[key.idx], path, expected)
            assert_close(got, want, what=f"{what} grad {jax.tree_util.keystr(path)}")


def test_block_sizes_per_backend(monkeypatch):
    """The CPU-tuned block targets apply on CPU only: accelerators keep 4 MiB blocks of the gated passes
    and the whole sequence as one block of the log-linear chunk form."""
    from hybrid_jax.ops import log_linear_chunk

    args = (256, 64, 64, 64)  # chunks, chunk, K, V
    assert recurrence.block_chunks(*args, lead=4, per_channel=False) == 1
    assert log_linear_chunk.chunks_per_block(*args, n_inter=8, lead=4) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert recurrence.block_bytes() == recurrence.ACCELERATOR_BLOCK_BYTES
    assert recurrence.block_chunks(*args, lead=4, per_channel=False) == 8
    assert log_linear_chunk.chunks_per_block(*args, n_inter=8, lead=4) == 256


def test_default_chunk_size_per_backend(monkeypatch):
    """The delta family's chunk_size=None is 32 on CPU (the same result as passing 32) and 64 on
    accelerators; an explicit size and the non-delta forms are left alone."""
    from hybrid_jax.ops import gated

    assert gated.default_chunk_size(None, delta=True) == 32
    assert gated.default_chunk_size(None, delta=False) == 64
    assert gated.default_chunk_size(48, delta=True) == 48
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (jax.random.normal(key, (1, 70, 2, 8)) for key in keys[:3])
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jax.nn.softplus(jax.random.normal(keys[3], (1, 70, 2)))
    beta = jax.nn.sigmoid(jax.random.normal(keys[4], (1, 70, 2)))
    run = lambda **kw: ops.gated_delta_rule(q, k, v, g=g, beta=beta, output_final_state=True, **kw)  # noqa: E731
    for got, want in zip(jax.tree.leaves(run()), jax.tree.leaves(run(chunk_size=32))):
        assert jnp.array_equal(got, want)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert gated.default_chunk_size(None, delta=True) == 64
