r"""The chunked form shared by both kernel families: the per-chunk terms (pure JAX, run by XLA), the
per-chunk state step, and the `jax.custom_vjp` that puts the state-pass kernels in the middle.

Layout: heads flattened into the batch, time padded to N chunks of C positions:
q, k `[BH, N*C, K]`, v `[BH, N*C, V]`, g `[BH, N*C, K or 1]` (log decay, <= 0), beta `[BH, N*C]`,
state S `[BH, K, V]` float32. Padded positions carry k = v = g = beta = 0, an identity step.

Per chunk (positions i, m = 1..C, S_0 the state entering it), with G_i = sum_{j<=i} g_j, Gam = exp(G):

    Aqk[i, m] = sum_c q_i[c] k_m[c] exp(G_i[c] - G_m[c])   (m <= i, else 0)
    delta:      Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta),  W = Tm (K * Gam),  Ubar = Tm V
    non-delta:  W = 0,  Ubar = V
    U = Ubar - W S_0,   O = (Q * Gam) S_0 + Tril(Aqk) U,   S_C = Diag(Gam_C) S_0 + (K * exp(G_C - G))^T U

Everything but the last line depends only on the chunk's own inputs and runs for all chunks at once
(`ChunkTerms`); the last line is the sequential pass the kernels run with S held on chip. Only
relative decays exp(G_i - G_m), i >= m (numbers in (0, 1]), are ever formed, so g = -20 per step
stays finite. A per-channel decay splits the chunk into sub-chunks of s positions: a block of queries
after the keys goes through the sub-chunk's first position r, exp(G_i - G_m) = exp(G_i - G_r)
exp(G_r - G_m) (both factors <= 1, one matmul); diagonal blocks are explicit s x s x K products.

Gradients (`chunked_recurrence`): the forward runs the terms in XLA and the forward kernel. The
backward recomputes the terms under `jax.vjp`, re-runs the forward kernel to recover the state
entering each chunk, runs the reverse kernel for the state cotangents
    dU_c = Tril(Aqk)^T dO_c + (K * exp(G_C - G)) dS_{c+1}
    dS_c = (Q * Gam)^T dO_c + Diag(Gam_C) dS_{c+1} - W^T dU_c
and differentiates the per-chunk step (`chunk_step`) in pure JAX, all chunks at once.
"""
from __future__ import annotations

import functools
import importlib
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

SUB_CHUNK = 16  # sub-chunk length for per-channel decays


class ChunkTerms(NamedTuple):
    """Each chunk's contribution, `[BH, N, C, .]` (gam: `[BH, N, K or 1]`)."""

    qg: jax.Array  # Q * Gam                                  [.., C, K]
    attn: jax.Array  # Tril(Aqk)                              [.., C, C]
    w: jax.Array | None  # Tm (K * Gam); None for non-delta   [.., C, K]
    ubar: jax.Array  # Tm V (delta) or V                      [.., C, V]
    kt: jax.Array  # K * exp(G_C - G)                         [.., C, K]
    gam: jax.Array  # Gam_C, the decay across the whole chunk  [.., K or 1]


class KernelConfig(NamedTuple):
    """Static choices of one call: chunk length, backend ("gpu" | "tpu"), interpret mode, V tile."""

    chunk: int
    backend: str
    interpret: bool
    block_v: int


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`[BH, N*C, ...]` -> `[BH, N, C, ...]`."""
    return x.reshape((x.shape[0], x.shape[1] // chunk, chunk) + x.shape[2:])


def decayed_products(xs: tuple[jax.Array, ...], y: jax.Array, G: jax.Array) -> tuple[jax.Array, ...]:
    """For each x in `xs`: P[..., i, m] = sum_c x_i[c] y_m[c] exp(G_i[c] - G_m[c]) for m <= i, else 0.

    x, y `[..., C, K]`; G `[..., C, K]` (per channel) or `[..., C, 1]` (scalar), non-increasing along C.
    The decay factors depend only on G, so Aqk and Akk share them (the exps dominate the cost).
    """
    c = y.shape[-2]
    if G.shape[-1] == 1:  # scalar decay: one matmul times the masked relative decay
        causal = jnp.tril(jnp.ones((c, c), bool))
        decay = jnp.exp(jnp.where(causal, G[..., :, None, 0] - G[..., None, :, 0], -jnp.inf))
        return tuple((x @ jnp.swapaxes(y, -1, -2)) * decay for x in xs)
    s = math.gcd(c, SUB_CHUNK)
    n_sub = c // s
    lead = y.shape[:-2]
    split = lambda a: a.reshape(lead + (n_sub, s, a.shape[-1]))  # noqa: E731
    ys, Gs = split(y), split(G)
    G_ref = Gs[..., :, :1, :]  # [.., n_sub, 1, K]: first position r of each query sub-chunk
    # Off-diagonal: keys m < r, through the reference position (mask before the exp).
    key_before_ref = jnp.arange(c)[None, :] < (jnp.arange(n_sub) * s)[:, None]  # [n_sub, C]
    y_to_ref = y[..., None, :, :] * jnp.exp(
        jnp.where(key_before_ref[..., None], G_ref - G[..., None, :, :], -jnp.inf))
    from_ref = jnp.exp(Gs - G_ref)
    # Diagonal blocks: explicit s x s x K products.
    in_block = jnp.tril(jnp.ones((s, s), bool))[..., None]
    y_rel = ys[..., None, :, :] * jnp.exp(
        jnp.where(in_block, Gs[..., :, None, :] - Gs[..., None, :, :], -jnp.inf))
    block_eye = jnp.eye(n_sub, dtype=y.dtype)[:, None, :, None]
    products = []
    for x in xs:
        x_sub = split(x)
        off = jnp.einsum("...aik,...amk->...aim", x_sub * from_ref, y_to_ref)
        diag = jnp.einsum("...aik,...aimk->...aim", x_sub, y_rel)
        full = off.reshape(lead + (n_sub, s, n_sub, s)) + diag[..., :, :, None, :] * block_eye
        products.append(full.reshape(lead + (c, c)))
    return tuple(products)


def decay_terms(q, k, g, *, delta: bool):
    """Terms both families share, from chunked q, k `[BH, N, C, K]` and g `[BH, N, C, K or 1]`:
    (Q * Gam, Tril(Aqk), K * exp(G_C - G), Gam_C, K * Gam, StrictLower(Akk) if `delta` else None)."""
    G = jnp.cumsum(g, axis=-2)
    gam = jnp.exp(G)
    kt = k * jnp.exp(G[..., -1:, :] - G)
    if delta:
        a_qk, a_kk = decayed_products((q, k), k, G)
        c = k.shape[-2]
        a_kk = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), a_kk, 0.0)
    else:
        (a_qk,), a_kk = decayed_products((q,), k, G), None
    return q * gam, a_qk, kt, gam[..., -1, :], k * gam, a_kk


def delta_transform(a_kk, v, beta, k_gam):
    """The WY / UT transform of the delta rule for one chunk's StrictLower(Akk) `[.., C, C]`,
    v `[.., C, V]`, beta `[.., C]`, K * Gam `[.., C, K]`:
    Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta) by forward substitution (float32),
    returns (W = Tm (K * Gam), Ubar = Tm V)."""
    eye = jnp.eye(a_kk.shape[-1], dtype=a_kk.dtype)
    tm = jax.scipy.linalg.solve_triangular(
        eye + beta[..., :, None] * a_kk, beta[..., :, None] * eye, lower=True, unit_diagonal=True)
    return tm @ k_gam, tm @ v


def kernel_operands(terms: ChunkTerms):
    """The terms in the kernels' layout: `[BH, N*C, .]` slabs (qg, attn, kt, ubar, w) and Gam_C as one
    `[K, 1]` column per chunk, `[BH, N*K, 1]`, so a kernel scales the rows of S without a transpose."""
    flat = lambda x: None if x is None else x.reshape((x.shape[0], -1) + x.shape[3:])  # noqa: E731
    bh, n, _, k_dim = terms.qg.shape
    gam = jnp.broadcast_to(terms.gam, (bh, n, k_dim)).reshape(bh, n * k_dim, 1)
    return flat(terms.qg), flat(terms.attn), flat(terms.kt), gam, flat(terms.ubar), flat(terms.w)


def chunk_step(terms: ChunkTerms, s: jax.Array):
    """One chunk in pure JAX: (O `[C, V]`, S_C `[K, V]`) from S_0 `[K, V]` (unbatched; vmap over chunks)."""
    u = terms.ubar if terms.w is None else terms.ubar - terms.w @ s
    o = terms.qg @ s + terms.attn @ u
    return o, terms.gam[:, None] * s + terms.kt.T @ u


def _kernels(backend: str):
    """The state-pass kernels of a backend: `pallas_kernels.gpu.state_pass` or `.tpu.state_pass`."""
    return importlib.import_module(f"pallas_kernels.{backend}.state_pass")


def chunked_recurrence(terms_fn: Callable[..., ChunkTerms]):
    """Builds the differentiable recurrence `run(config, inputs, s0) -> (o, final)` of one family.

    `terms_fn(*inputs, chunk=C)` maps the padded inputs (q, k, v, g[, beta]) to `ChunkTerms`;
    o is `[BH, N*C, V]`, final `[BH, K, V]`.
    """

    def forward(config: KernelConfig, inputs, s0):
        terms = terms_fn(*inputs, chunk=config.chunk)
        return _kernels(config.backend).forward_pass(terms, s0, emit_states=False, block_v=config.block_v,
                                                     interpret=config.interpret)

    # `config` is static (hashable): a nondiff argument, not traced.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def run(config, inputs, s0):
        return forward(config, inputs, s0)

    def run_fwd(config, inputs, s0):
        return forward(config, inputs, s0), (inputs, s0)

    def run_bwd(config, residuals, cotangents):
        inputs, s0 = residuals
        d_o, d_final = cotangents
        kernels = _kernels(config.backend)
        terms, terms_vjp = jax.vjp(lambda *xs: terms_fn(*xs, chunk=config.chunk), *inputs)
        # The same kernel, emitting the state entering each chunk instead of the outputs.
        entering, _ = kernels.forward_pass(terms, s0, emit_states=True, block_v=config.block_v,
                                           interpret=config.interpret)
        entering = entering.reshape(terms.qg.shape[:2] + terms.qg.shape[-1:] + entering.shape[-1:])
        leaving_grad, d_s0 = kernels.backward(terms, d_o, d_final, block_v=config.block_v,
                                              interpret=config.interpret)
        per_chunk = jax.vmap(jax.vmap(chunk_step))  # over BH, then N
        _, step_vjp = jax.vjp(per_chunk, terms, entering)
        d_terms, _ = step_vjp((to_chunks(d_o, config.chunk), leaving_grad))
        return terms_vjp(d_terms), d_s0

    run.defvjp(run_fwd, run_bwd)
    return run
