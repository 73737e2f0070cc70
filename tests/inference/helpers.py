"""The decode-equivalence protocol shared by the layer and model tests.

A sequence of TOTAL steps is run through the training forward (the reference) and through
prefill + decoding: a prefill of its first T steps followed by TOTAL - T decode steps, for T = 1 and
odd T = T_ODD (two chunks of 4), and a ragged prefill of T_ODD-step right-padded prompts of lengths
RAGGED (a full row and a one-token row), each row then decoding its own continuation from its own
position. Every output must equal the reference at the same position.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

B, TOTAL, T_ODD = 3, 11, 5
RAGGED = np.array([5, 2, 1])  # prompt lengths: one full row, and one of a single token
# Errors are compared with the scale of the reference outputs: 1e-5 relative to it.
RTOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # CPU compile time dominates; results equal


def compile_fast(fn, *args):
    """`jax.jit(fn)` compiled for `args` without LLVM optimisation (half the compile time on CPU)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def init_fast(make):
    """The module `make()` builds, initialised inside one jitted program: built eagerly, every
    parameter shape would compile its own random-number kernel (seconds per model on CPU)."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, compile_fast(lambda: nnx.split(make())[1])())


def assert_close(actual, expected, scale, what):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=RTOL * scale,
                               err_msg=what)


def check_decoding(module, inputs, *, max_len=TOTAL, uniform_prompts=True):
    """Runs the protocol on `module` (a mixer layer or a HybridLM) over `inputs` `[B, TOTAL, ...]`
    (activations or tokens); returns the cache after the ragged run. `uniform_prompts=False` keeps
    only the ragged run (whose rows hold a full odd prompt and a one-token prompt)."""
    graphdef, state = nnx.split(module)
    is_model = hasattr(module, "decode_step")

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    def prefill(state, x, lengths):
        return nnx.merge(graphdef, state).prefill(x, max_len=max_len, lengths=lengths)

    def decode(state, x_t, cache, position):
        m = nnx.merge(graphdef, state)
        if is_model:
            return m.decode_step(x_t, cache)
        return m.decode(x_t[:, None], cache, position)

    reference = compile_fast(forward, state, inputs)(state, inputs)
    scale = float(np.max(np.abs(reference)))
    rows = np.arange(B)
    decode_fn = None

    def run(prompt, lengths, label):
        nonlocal decode_fn
        prefill_fn = compile_fast(prefill, state, prompt, lengths)
        out, cache = prefill_fn(state, prompt, lengths)
        n = np.full(B, prompt.shape[1]) if lengths is None else np.asarray(lengths)
        valid = np.arange(prompt.shape[1])[None, :] < n[:, None]
        got = np.where(valid.reshape(valid.shape + (1,) * (out.ndim - 2)), out, reference[:, : prompt.shape[1]])
        assert_close(got, reference[:, : prompt.shape[1]], scale, f"{label}: prefill outputs")
        for step in range(TOTAL - int(n.max())):
            position = jnp.asarray(n + step, jnp.int32)
            x_t = inputs[rows, position]
            if decode_fn is None:
                decode_fn = compile_fast(decode, state, x_t, cache, position)
            out_t, cache = decode_fn(state, x_t, cache, position)
            out_t = out_t if is_model else out_t[:, 0]
            assert_close(out_t, reference[rows, position], scale, f"{label}: decode step {step}")
        return cache

    if uniform_prompts:
        run(inputs[:, :1], None, "T=1")
        run(inputs[:, :T_ODD], None, f"T={T_ODD}")
    # Ragged rows: each prompt right-padded with unrelated inputs (what padding holds must not matter).
    noise = jnp.flip(inputs[:, :T_ODD], axis=0)
    prompt = jnp.where(jnp.asarray(np.arange(T_ODD)[None, :] < RAGGED[:, None]).reshape(
        (B, T_ODD) + (1,) * (inputs.ndim - 2)), inputs[:, :T_ODD], noise)
    return run(prompt, jnp.asarray(RAGGED, jnp.int32), f"ragged T={T_ODD} lengths {RAGGED.tolist()}")
