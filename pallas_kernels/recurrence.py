r"""The chunked gated recurrence with a recomputing backward: the pass over chunks and the `jax.custom_vjp`
shared by hybrid_jax.ops (backend "xla", pure JAX) and the Pallas kernels (backends "gpu" / "tpu").

With the per-chunk terms of `chunk_math` (Q Gam, Tril(Aqk), W, Ubar, K exp(G_C - G), Gam_C) and S_0
the state entering a chunk, the forward pass is

    U = Ubar - W S_0,   O = (Q Gam) S_0 + Tril(Aqk) U,   S_C = Diag(Gam_C) S_0 + (K exp(G_C - G))^T U

and its reverse, for the cotangents dO of the outputs and dS_C of the state leaving the chunk,

    dU = Tril(Aqk)^T dO + (K exp(G_C - G)) dS_C,   dS_0 = (Q Gam)^T dO + Diag(Gam_C) dS_C - W^T dU.

`chunked_recurrence` saves only its inputs and the state entering every chunk (`[.., N, K, V]`;
the kernels recompute even those); the backward recomputes the terms under `jax.vjp`, runs the
reverse pass for the state cotangents and transposes `chunk_math.chunk_step` (`step_cotangents`)
for all chunks at once. Autodiff of the plain forward would instead keep every term and every intermediate of the
decayed products (s x s x K per sub-chunk) alive until the backward.

Backend "xla" blocks both passes (`KernelConfig.block_chunks`): a loop over blocks of chunks slices
one block out of the chunked inputs, forms its terms, passes the state through it and writes its
outputs in place, so the intermediates of one block stay cache-sized at any T; the backward walks
the blocks in reverse the same way. The inputs keep their layout: slicing a block out of the chunk
axis copies contiguous runs of whole chunks, where moving the block axis to the front for a
`lax.scan` would transpose every input and output once more. With `KernelConfig.time_major` the
inputs, outputs and input cotangents are `[B, N, C, H, .]`, a reshape of the ops' `[B, T, H, .]`,
and each block moves its heads forward in cache; the whole-sequence transposes of the heads-first
layout took about a fifth of GDN's forward + backward on CPU at T = 4096.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_math import (
    ChunkTerms,
    KernelConfig,
    chunk_outputs,
    chunk_terms,
    chunk_values,
    matmul,
    matmul_t,
)

# The target size of one block's terms (backend "xla"). Tuned on CPU with malloc's huge pages on (so
# that page faults did not decide it): at B=1, H=4, K=V=64 this makes one chunk per block, and GDN's
# forward + backward at T = 4096 took 74 ms against 81 ms with 4 MiB blocks (GLA 60 against 79); wider
# batches reach one chunk per block at any size. Accelerators keep the 4 MiB that the README's H200
# figures were measured with (`block_bytes`).
BLOCK_BYTES = 1 << 20
ACCELERATOR_BLOCK_BYTES = 4 << 20


def block_bytes() -> int:
    """The block target of this process's default backend: BLOCK_BYTES on CPU, else ACCELERATOR_BLOCK_BYTES."""
    return BLOCK_BYTES if jax.default_backend() == "cpu" else ACCELERATOR_BLOCK_BYTES


# Chunks per trip of the state passes' loops: each trip of an XLA while loop costs tens of microseconds
# on CPU (slicing its inputs, dispatching its few small matmuls), ~10% of GDN's time at T = 4096.
UNROLL = 8


def block_chunks(n_chunks: int, chunk: int, k_dim: int, v_dim: int, lead: int, per_channel: bool) -> int:
    """Chunks per block so that one block's float32 terms and products take about `block_bytes()`:
    per chunk and head Tril(Aqk) and the products (2 C^2, C^2 / 16 K more per channel), and seven
    `[C, K or V]` slabs; `lead` is the product of the leading (batch x head) axes. A divisor of
    n_chunks up to 1.25x that size is preferred: a last, partly padded block computes its padding
    (64 chunks in blocks of 7 would compute 70)."""
    floats = 2 * chunk * chunk + 7 * chunk * max(k_dim, v_dim)
    if per_channel:
        floats += chunk * chunk * k_dim // 16
    per_chunk = 4 * floats * max(lead, 1)
    size = max(1, min(n_chunks, block_bytes() // per_chunk))
    divisors = [d for d in range(size // 2 + 1, min(n_chunks, size * 5 // 4) + 1) if n_chunks % d == 0]
    return divisors[-1] if divisors else size


def state_pass(terms: ChunkTerms, s0, *, u_bar=None, precision: str = "highest", with_u: bool = False):
    """The sequential pass over the chunk axis (the one before C; any leading axes, shared with s0
    `[.., K, V]`). Returns (state entering each chunk `[.., N, K, V]`, final state `[.., K, V]`), and
    with `with_u` also U = Ubar - W S_0 `[.., N, C, V]` (the pass forms it anyway; Ubar without the
    delta rule). `u_bar` overrides `terms.u_bar` (log-linear attention propagates older levels with
    Ubar = 0)."""
    u_bar = terms.u_bar if u_bar is None else u_bar
    axis = s0.ndim - 2
    if terms.w is None:
        # Non-delta: the chunk's own writes do not depend on the incoming state, so form them all at once.
        inputs = (terms.chunk_decay[..., None], matmul_t(terms.k_to_end, u_bar, precision))

        def step(s, x):
            decay, write = x
            return decay * s + write, (s, None)
    else:
        inputs = (terms.chunk_decay[..., None], terms.w, terms.k_to_end, u_bar)

        def step(s, x):
            decay, w, k_to_end, u_bar_c = x
            u = u_bar_c - matmul(w, s, precision)
            return decay * s + matmul_t(k_to_end, u, precision), (s, u if with_u else None)

    final, (entering, u) = jax.lax.scan(step, s0, jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), inputs),
                                        unroll=UNROLL)
    entering = jnp.moveaxis(entering, 0, axis)
    if not with_u:
        return entering, final
    return entering, final, u_bar if u is None else jnp.moveaxis(u, 0, axis)


def reverse_state_pass(terms: ChunkTerms, d_o, d_final, precision: str = "highest"):
    """The reverse pass (module docstring): (cotangent of the state leaving each chunk `[.., N, K, V]`,
    cotangent of the initial state `[.., K, V]`, dU `[.., N, C, V]` or None without the delta rule,
    where the pass does not need it) from dO `[.., N, C, V]` and dS of the final state."""
    axis = d_final.ndim - 2
    read = matmul_t(terms.q_decayed, d_o, precision)  # (Q Gam)^T dO, all chunks at once
    inputs = (terms.chunk_decay[..., None], read)
    if terms.w is not None:
        inputs += (terms.w, terms.k_to_end, matmul_t(terms.attn, d_o, precision))

    def step(d_s, x):
        decay, read_c = x[:2]
        d_entering, d_u = read_c + decay * d_s, None
        if terms.w is not None:
            w, k_to_end, attn_d_o = x[2:]
            d_u = attn_d_o + matmul(k_to_end, d_s, precision)
            d_entering = d_entering - matmul_t(w, d_u, precision)
        return d_entering, (d_s, d_u)

    d_s0, (leaving, d_u) = jax.lax.scan(step, d_final, jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), inputs),
                                        reverse=True, unroll=UNROLL)
    return jnp.moveaxis(leaving, 0, axis), d_s0, None if d_u is None else jnp.moveaxis(d_u, 0, axis)


def step_cotangents(terms: ChunkTerms, entering, leaving_grad, d_o, precision: str = "highest",
                    d_u=None, u=None) -> ChunkTerms:
    """The cotangents of every chunk's terms, all chunks at once, from the states entering the chunks,
    the cotangents of the states leaving them and of the outputs (the transpose of `chunk_step`):

        dU = Tril(Aqk)^T dO + (K exp(G_C - G)) dS_C,   d(Q Gam) = dO S_0^T,   d Tril(Aqk) = dO U^T,
        dW = -dU S_0^T,   dUbar = dU,   d(K exp(G_C - G)) = U dS_C^T,   dGam_C = sum_V dS_C * S_0

    (`d_u`: dU when the reverse pass has formed it; `u`: U when the forward kept it)."""
    u = chunk_values(terms, entering, precision) if u is None else u
    if d_u is None:
        d_u = matmul_t(terms.attn, d_o, precision) + matmul(terms.k_to_end, leaving_grad, precision)
    t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    d_decay = jnp.sum(leaving_grad * entering, axis=-1)  # [.., N, K]
    if terms.chunk_decay.shape[-1] == 1:
        d_decay = jnp.sum(d_decay, axis=-1, keepdims=True)
    return ChunkTerms(
        q_decayed=matmul(d_o, t(entering), precision),
        attn=matmul(d_o, t(u), precision),
        w=None if terms.w is None else -matmul(d_u, t(entering), precision),
        u_bar=d_u,
        k_to_end=matmul(u, t(leaving_grad), precision),
        chunk_decay=d_decay,
    )


def _terms(config: KernelConfig, inputs) -> ChunkTerms:
    return chunk_terms(*inputs, safe_gate=config.safe_gate, precision=config.precision)


# ----------------------------------------------------------------------------- backend "xla": blocked passes


def to_blocks(x, axis: int, per_block: int):
    """`[.., N, ...]` -> `[N_B, .., per_block, ...]` along `axis` (chunks, or tokens), N padded with zeros
    (identity chunks or steps)."""
    if x is None:
        return None
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, (-n) % per_block)
    x = jnp.pad(x, pad)
    x = x.reshape(x.shape[:axis] + (-1, per_block) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _with_axes(fn, axes, tree, *rest):
    """`fn(axis, leaf, *leaves)` over a pytree whose chunk axes `axes` are an int (every leaf) or a
    prefix of it (an int per subtree)."""
    return jax.tree.map(lambda axis, *subtrees: jax.tree.map(lambda *leaves: fn(axis, *leaves), *subtrees),
                        axes, tree, *rest)


def _over_blocks(step, carry, xs, ys_like, *, axis, per_block: int, reverse: bool = False, ys_axis=None):
    """`lax.scan` of `step(carry, x_block) -> (carry, y_block)` over blocks of `per_block` chunks of the
    chunk axis `axis` of every array in the pytree `xs` (None leaves stay None), without moving that
    axis: each block is sliced out in place and its ys are written into buffers shaped like `ys_like`
    (a pytree of `[.., N, ...]` arrays or ShapeDtypeStructs) along `ys_axis` (default `axis`). An axis
    is an int or a prefix pytree of ints (`_with_axes`). N is padded to whole blocks with zero
    (identity) chunks. Returns (carry, ys)."""
    ys_axis = axis if ys_axis is None else ys_axis
    n = jax.tree.leaves(_with_axes(lambda ax, x: x.shape[ax], axis, xs))[0]
    n_blocks = -(-n // per_block)
    if n_blocks == 1:
        return step(carry, xs)

    def pad(ax, x):
        widths = [(0, 0)] * x.ndim
        widths[ax] = (0, n_blocks * per_block - n)
        return jnp.pad(x, widths)

    def zeros(ax, y):
        return jnp.zeros(y.shape[:ax] + (n_blocks * per_block,) + y.shape[ax + 1:], y.dtype)

    xs = _with_axes(pad, axis, xs)

    def body(i, state):
        carry, ys = state
        start = per_block * ((n_blocks - 1 - i) if reverse else i)
        cut = lambda ax, x: jax.lax.dynamic_slice_in_dim(x, start, per_block, ax)  # noqa: E731
        carry, y_block = step(carry, _with_axes(cut, axis, xs))
        put = lambda ax, y, b: jax.lax.dynamic_update_slice_in_dim(y, b.astype(y.dtype), start, ax)  # noqa: E731
        return carry, _with_axes(put, ys_axis, ys, y_block)

    carry, ys = jax.lax.fori_loop(0, n_blocks, body, (carry, _with_axes(zeros, ys_axis, ys_like)))
    return carry, _with_axes(lambda ax, y: jax.lax.slice_in_dim(y, 0, n, axis=ax), ys_axis, ys)


def _has_beta(inputs) -> bool:
    """Whether `chunked_recurrence`'s inputs carry beta, i.e. run the delta rule."""
    return len(inputs) > 4 and inputs[4] is not None


def _layout(config: KernelConfig, s0):
    """(the chunk axis of the inputs, a block's inputs -> the heads-first layout of the terms, its
    chunked outputs / cotangents back). What the forward saves for the backward (the entering states,
    U) stays in the terms' heads-first layout, chunk axis `s0.ndim - 2`: moving it to the inputs'
    layout and back cost a transposing copy of every block's states in each pass."""
    if not config.time_major:
        same = lambda x: x  # noqa: E731
        return s0.ndim - 2, same, same
    heads_first = lambda x: None if x is None else jnp.moveaxis(x, 3, 1)  # noqa: E731
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 3)  # noqa: E731
    return 1, heads_first, time_major


def _xla_forward(config: KernelConfig, inputs, s0):
    """Returns ((O `[.., N, C, V]`, final state), (state entering each chunk `[.., N, K, V]`, U like
    O with the delta rule, else None)); with `time_major`, O `[B, N, C, H, V]`, while the states and U
    stay heads-first (`_layout`). U = Ubar - W S_0 is kept for the backward: recomputing it there would
    cost a matmul per chunk, keeping it one more array the size of v."""
    axis, heads_first, time_major = _layout(config, s0)
    saved_axis = s0.ndim - 2
    n = inputs[0].shape[axis]
    delta = _has_beta(inputs)

    def block(s, block_inputs):
        terms = _terms(config, tuple(map(heads_first, block_inputs)))
        entering, s, u = state_pass(terms, s, precision=config.precision, with_u=True)
        o = chunk_outputs(terms, entering, u, config.precision)
        return s, (time_major(o), (entering, u if delta else None))

    v = inputs[2]
    o_like = jax.ShapeDtypeStruct(v.shape, s0.dtype)
    saved_like = (jax.ShapeDtypeStruct(s0.shape[:saved_axis] + (n,) + s0.shape[saved_axis:], s0.dtype),
                  jax.ShapeDtypeStruct(s0.shape[:saved_axis] + (n, v.shape[-3 if config.time_major else -2],
                                                               v.shape[-1]), s0.dtype) if delta else None)
    final, (o, saved) = _over_blocks(block, s0, inputs, (o_like, saved_like), axis=axis,
                                     per_block=config.block_chunks or n, ys_axis=(axis, saved_axis))
    return (o, final), saved


def _xla_backward(config: KernelConfig, inputs, saved, d_o, d_final):
    axis, heads_first, time_major = _layout(config, d_final)
    n = inputs[0].shape[axis]

    def block(d_s, xs):
        block_inputs, (entering_b, u_b), d_o_b = xs
        d_o_b = heads_first(d_o_b)
        terms, terms_vjp = jax.vjp(functools.partial(_terms, config), tuple(map(heads_first, block_inputs)))
        leaving_grad, d_s, d_u = reverse_state_pass(terms, d_o_b, d_s, config.precision)
        d_terms = step_cotangents(terms, entering_b, leaving_grad, d_o_b, config.precision, d_u, u_b)
        return d_s, tuple(map(time_major, terms_vjp(d_terms)[0]))

    return _over_blocks(block, d_final, (inputs, saved, d_o), inputs, axis=(axis, d_final.ndim - 2, axis),
                        per_block=config.block_chunks or n, reverse=True, ys_axis=axis)[::-1]


# ----------------------------------------------------------------------------- the state-pass kernels


def _kernels(backend: str):
    """The state-pass kernels of a backend, `pallas_kernels.gpu.state_pass` or `.tpu.state_pass`,
    imported on first use: the Triton / Mosaic modules load only when a kernel runs."""
    return importlib.import_module(f"pallas_kernels.{backend}.state_pass")


def _kernel_forward(config: KernelConfig, inputs, s0):
    terms = _terms(config, inputs)
    o, final = _kernels(config.backend).forward_pass(terms, s0, emit_states=False, block_v=config.block_v,
                                                     interpret=config.interpret)
    return o.reshape(terms.u_bar.shape[:3] + o.shape[-1:]), final


def _kernel_backward(config: KernelConfig, inputs, s0, d_o, d_final):
    kernels = _kernels(config.backend)
    terms, terms_vjp = jax.vjp(functools.partial(_terms, config), inputs)
    # The same kernel, emitting the state entering each chunk instead of the outputs.
    entering, _ = kernels.forward_pass(terms, s0, emit_states=True, block_v=config.block_v,
                                       interpret=config.interpret)
    entering = entering.reshape(terms.q_decayed.shape[:2] + terms.q_decayed.shape[-1:] + entering.shape[-1:])
    d_o_slab = d_o.reshape((d_o.shape[0], -1, d_o.shape[-1]))
    leaving_grad, d_s0 = kernels.backward(terms, d_o_slab, d_final, block_v=config.block_v,
                                          interpret=config.interpret)
    leaving_grad = leaving_grad.reshape(entering.shape)
    return terms_vjp(step_cotangents(terms, entering, leaving_grad, d_o, config.precision))[0], d_s0


def shard_summary(config: KernelConfig, inputs, s0, identity):
    """(the state leaving the last chunk from `s0`, the chunks' transition) of `chunked_recurrence`'s
    inputs: what context parallelism passes between shards (`hybrid_jax.ops.context`). The
    transition is the product of the chunks' own, Diag(Gam_C) `[.., K or 1]` without the delta rule
    and Diag(Gam_C) - (K exp(G_C - G))^T W `[.., K, K]` with it (the state pass of the identity with
    Ubar = 0); zero from a chunk with a document start on. Blocked like the forward, each block
    recomputed in the backward (`jax.checkpoint`), so autodiff keeps only the carries. `identity`:
    the transition to start from, ones `[.., K or 1]` or the identity `[.., K, K]` with the delta rule
    (`identity_transition`; the caller builds it, with s0, as its shard_map axes require)."""
    axis = s0.ndim - 2
    n = inputs[0].shape[axis]
    per_block = config.block_chunks or n
    delta = identity.ndim == s0.ndim
    k_dim = inputs[1].shape[-1]
    transition = identity

    @jax.checkpoint
    def block(carry, block_inputs):
        s, transition = carry
        terms = _terms(config, block_inputs)
        _, s = state_pass(terms, s, precision=config.precision)
        if delta:
            _, transition = state_pass(terms, transition, u_bar=jnp.zeros(terms.u_bar.shape[:-1] + (k_dim,),
                                                                          s.dtype), precision=config.precision)
        else:
            transition = transition * jnp.prod(terms.chunk_decay, axis=axis)
        return (s, transition), None

    blocks = tuple(to_blocks(x, axis, per_block) for x in inputs)
    (final, transition), _ = jax.lax.scan(block, (s0, transition), blocks)
    return final, transition


def identity_transition(inputs, s0):
    """The identity transition of `shard_summary` for chunked inputs and a state like s0."""
    if _has_beta(inputs):
        k_dim = inputs[1].shape[-1]
        return jnp.broadcast_to(jnp.eye(k_dim, dtype=s0.dtype), s0.shape[:-1] + (k_dim,))
    return jnp.ones(s0.shape[:-2] + (inputs[3].shape[-1],), s0.dtype)


# ----------------------------------------------------------------------------- the custom_vjp


# `config` is static (hashable): a nondiff argument, not traced.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_recurrence(config: KernelConfig, inputs, s0):
    """The differentiable chunked recurrence with a recomputing backward.

    inputs: the positional arguments of `chunk_math.chunk_terms`, (q, k, v, g[, beta[, isolated[,
    resets]]]) (beta, isolated may be None), chunked `[.., N, C, .]` (the kernels: `[BH, N, C, .]`;
    beta and the 0/1 float masks `[.., N, C]`; g with a last dim of K or 1), s0 `[.., K, V]`. Returns (o `[.., N, C, V]`, final state `[.., K, V]`).
    """
    if config.backend == "xla":
        return _xla_forward(config, inputs, s0)[0]
    return _kernel_forward(config, inputs, s0)


def _chunked_recurrence_fwd(config, inputs, s0):
    if config.backend == "xla":
        out, saved = _xla_forward(config, inputs, s0)
        return out, (inputs, s0, saved)
    return _kernel_forward(config, inputs, s0), (inputs, s0, None)


def _chunked_recurrence_bwd(config, residuals, cotangents):
    inputs, s0, saved = residuals
    d_o, d_final = cotangents
    if config.backend == "xla":
        return _xla_backward(config, inputs, saved, d_o, d_final)
    return _kernel_backward(config, inputs, s0, d_o, d_final)


chunked_recurrence.defvjp(_chunked_recurrence_fwd, _chunked_recurrence_bwd)
