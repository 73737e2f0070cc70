r"""The chunked form of the gated recurrences, shared by hybrid_jax.ops and both kernel backends: how
time is cut into chunks, each chunk's terms (`ChunkTerms`, pure JAX, run by XLA), the per-chunk state
step, and the `jax.custom_vjp` that puts the state-pass kernels in the middle.

Layout: time is cut into N chunks of C positions, `[B, T, H, .]` -> `[B, H, N, C, .]` (`to_chunks`,
zero padded; `from_chunks` goes back); the kernels flatten B and H into one axis, `[BH, N, C, .]`.
Padded positions carry k = v = g = beta = 0, an identity step. States S are `[.., K, V]` float32.

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
A sequence shorter than a chunk is one chunk, rounded up to whole sub-chunks under a per-channel
decay (`chunk_length`). The derivations are in the repository's docs/chunked_algorithms.md.

Isolated tokens (read, do not write; `isolate`): identity steps (k = g = beta = 0) of the terms every
other row and the state pass see, reading S_{i-1} through q'_i = (q_i - b_i (q_i . k_i) k_i) exp(g_i)
and their own write through the diagonal of Tril(Aqk); the kernels need no change.

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
from typing import NamedTuple

import jax
import jax.numpy as jnp

SUB_CHUNK = 16  # sub-chunk length for per-channel decays


class ChunkTerms(NamedTuple):
    """What each chunk contributes, computed for all chunks at once: the one vocabulary of the chunked
    form, shared by hybrid_jax.ops and the kernels. Shapes `[..., N, C, .]` (any leading dims: `[B, H]`
    in hybrid_jax.ops, `[BH]` in the kernels); chunk_decay is `[..., N, K or 1]`."""

    q_decayed: jax.Array  # Q * Gam                                        [.., C, K]
    attn: jax.Array  # Tril(Aqk)                                           [.., C, C]
    w: jax.Array | None  # Tm (K * Gam); None for the non-delta form      [.., C, K]
    u_bar: jax.Array  # Tm V (delta) or V                                  [.., C, V]
    k_to_end: jax.Array  # K * exp(G_C - G)                                [.., C, K]
    chunk_decay: jax.Array  # Gam_C, the decay across the whole chunk      [.., K or 1]


class KernelConfig(NamedTuple):
    """Static choices of one call: chunk length, backend ("gpu" | "tpu"), interpret mode, V tile."""

    chunk: int
    backend: str
    interpret: bool
    block_v: int


# ----------------------------------------------------------------------------- cutting time into chunks


def chunk_length(length: int, chunk_size: int, *, per_channel: bool) -> int:
    """The chunk length for a sequence of `length` tokens: `chunk_size`, or one chunk when the sequence
    is shorter. That chunk is T long, except under a per-channel decay, where it is T rounded up to
    whole sub-chunks: a chunk of odd length would get sub-chunks of one token, whose off-diagonal
    factors form a C x C x K tensor (a memory cliff), where padding costs a few identity steps."""
    if length >= chunk_size:
        return chunk_size
    if not per_channel:
        return length
    sub = math.gcd(chunk_size, SUB_CHUNK)
    return min(chunk_size, -(-length // sub) * sub)


def sub_chunk_length(chunk: int) -> int:
    """The sub-chunk length a per-channel decay uses inside a chunk of `chunk` positions."""
    return math.gcd(chunk, SUB_CHUNK)


def pad_time(x: jax.Array, multiple: int, axis: int = 1, value: float = 0.0) -> jax.Array:
    """Pads `axis` up to a multiple of `multiple` (padded steps must be identity steps for the op)."""
    extra = (-x.shape[axis]) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`[B, T, H, ...]` -> `[B, H, N, C, ...]`, time padded with zeros to whole chunks. Zero k, v, g
    and beta make a padded position an identity step of every recurrence here."""
    x = pad_time(x, chunk)
    b, t, h = x.shape[:3]
    x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, length: int) -> jax.Array:
    """`[B, H, N, C, ...]` -> `[B, T, H, ...]`, the first `length` positions (drops the padding)."""
    b, h, n, c = x.shape[:4]
    return jnp.moveaxis(x, 1, 3).reshape((b, n * c, h) + x.shape[4:])[:, :length]


# ----------------------------------------------------------------------------- the per-chunk terms


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
    s = sub_chunk_length(c)
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


def isolate(q, k, g, beta, isolated):
    """The inputs of the carried recurrence when the tokens where `isolated` `[.., C]` is nonzero read
    but do not write, and what each isolated row adds on its own diagonal.

    An isolated token i reads one step applied to S = S_{i-1}, o_i = q_i^T [(I - b_i k_i k_i^T)
    Diag(exp g_i) S + b_i k_i v_i^T] (b_i = 1 and no Householder factor without the delta rule):

        o_i = q'_i^T S + d_i u_i,   q'_i = (q_i - b_i (q_i . k_i) k_i) * exp(g_i),   d_i = q_i . k_i,

    u_i = b_i v_i (delta) or v_i. For the carried state and every other row it is the identity step
    k = g = beta = 0; since that step leaves S_{i-1} in place, the chunk form reads S_{i-1} at row i
    through q'_i. Returns (q', k', g', beta', d `[.., C]`, the mask as bool)."""
    iso = isolated.astype(bool)
    qk = jnp.sum(q * k, axis=-1)
    q_read = q if beta is None else q - (beta * qk)[..., None] * k
    q = jnp.where(iso[..., None], q_read * jnp.exp(g), q)
    k = jnp.where(iso[..., None], 0.0, k)
    g = jnp.where(iso[..., None], 0.0, g)
    beta = None if beta is None else jnp.where(iso, 0.0, beta)
    return q, k, g, beta, jnp.where(iso, qk, 0.0), iso


def chunk_terms(q, k, v, g, beta=None, isolated=None) -> ChunkTerms:
    """Each chunk's terms from chunked q, k `[.., N, C, K]`, v `[.., N, C, V]`, g `[.., N, C, K or 1]`
    (or None: no decay), beta `[.., N, C]` (None: the non-delta form) and `isolated` `[.., N, C]`
    (None, or a mask, bool or 0/1 float, of the tokens that read and do not write: `isolate`).

    Isolated rows are identity steps of the carried recurrence (so they reach no other row and no
    state), read S_{i-1} through q'_i, and add d_i u_i through the diagonal of Tril(Aqk), with
    Ubar_i = b_i v_i in the delta form (Tm's row i is 0 there, so W_i = 0 and U_i = Ubar_i)."""
    if g is None:
        g = jnp.zeros(k.shape[:-1] + (1,), k.dtype)
    if isolated is not None:
        beta_in = beta
        q, k, g, beta, diag, iso = isolate(q, k, g, beta, isolated)
    terms = _chunk_terms(q, k, v, g, beta)
    if isolated is None:
        return terms
    u_bar = terms.u_bar if beta is None else jnp.where(iso[..., None], beta_in[..., None] * v, terms.u_bar)
    eye = jnp.eye(q.shape[-2], dtype=terms.attn.dtype)
    return terms._replace(attn=terms.attn + diag[..., None] * eye, u_bar=u_bar)


def _chunk_terms(q, k, v, g, beta) -> ChunkTerms:
    G = jnp.cumsum(g, axis=-2)
    gam = jnp.exp(G)
    k_to_end = k * jnp.exp(G[..., -1:, :] - G)
    if beta is None:
        (a_qk,) = decayed_products((q,), k, G)
        w, u_bar = None, v
    else:
        a_qk, a_kk = decayed_products((q, k), k, G)
        c = k.shape[-2]
        a_kk = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), a_kk, 0.0)
        w, u_bar = delta_transform(a_kk, v, beta, k * gam)
    return ChunkTerms(q * gam, a_qk, w, u_bar, k_to_end, gam[..., -1, :])


def delta_transform(a_kk, v, beta, k_decayed):
    """The WY / UT transform of the delta rule for one chunk's StrictLower(Akk) `[.., C, C]`,
    v `[.., C, V]`, beta `[.., C]`, K * Gam `[.., C, K]`:
    Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta) by forward substitution (float32),
    returns (W = Tm (K * Gam), Ubar = Tm V)."""
    eye = jnp.eye(a_kk.shape[-1], dtype=a_kk.dtype)
    tm = jax.scipy.linalg.solve_triangular(
        eye + beta[..., :, None] * a_kk, beta[..., :, None] * eye, lower=True, unit_diagonal=True)
    return tm @ k_decayed, tm @ v


def chunk_step(terms: ChunkTerms, s: jax.Array):
    """One chunk in pure JAX: (O `[C, V]`, S_C `[K, V]`) from S_0 `[K, V]` (unbatched; vmap over chunks)."""
    u = terms.u_bar if terms.w is None else terms.u_bar - terms.w @ s
    o = terms.q_decayed @ s + terms.attn @ u
    return o, terms.chunk_decay[:, None] * s + terms.k_to_end.T @ u


# ----------------------------------------------------------------------------- the kernels' custom_vjp


def kernel_operands(terms: ChunkTerms) -> ChunkTerms:
    """The terms in the kernels' layout: `[BH, N*C, .]` slabs, and Gam_C as one `[K, 1]` column per
    chunk, `[BH, N*K, 1]`, so a kernel scales the rows of S without a transpose."""
    flat = lambda x: None if x is None else x.reshape((x.shape[0], -1) + x.shape[3:])  # noqa: E731
    bh, n, _, k_dim = terms.q_decayed.shape
    chunk_decay = jnp.broadcast_to(terms.chunk_decay, (bh, n, k_dim)).reshape(bh, n * k_dim, 1)
    return ChunkTerms(flat(terms.q_decayed), flat(terms.attn), flat(terms.w), flat(terms.u_bar),
                      flat(terms.k_to_end), chunk_decay)


# Operands of the state-pass kernels by the kernels' ref names, each with its block kind: "chunk" (this
# chunk's rows, whole last dim), "chunk_v" (this chunk's rows, one V tile) or "head_v" (a `[K, BV]`
# block of the head, the same for every chunk). Both backends block the same operands this way.


def forward_pass_operands(terms: ChunkTerms, s0, *, emit_states: bool):
    """(operands, outputs, number of chunks) of the forward pass; outputs O `[BH, N*C, V]` or, with
    `emit_states`, the state entering every chunk `[BH, N*K, V]` (O's terms are then not needed)."""
    slabs = kernel_operands(terms)
    bh, rows, k_dim = slabs.k_to_end.shape
    n, v_dim = rows // slabs.attn.shape[-1], slabs.u_bar.shape[-1]
    operands = {"k_to_end": (slabs.k_to_end, "chunk"), "chunk_decay": (slabs.chunk_decay, "chunk"),
                "u_bar": (slabs.u_bar, "chunk_v"), "s0": (s0, "head_v")}
    if slabs.w is not None:
        operands["w"] = (slabs.w, "chunk")
    if not emit_states:
        operands.update(q_decayed=(slabs.q_decayed, "chunk"), attn=(slabs.attn, "chunk"))
    out_rows = n * k_dim if emit_states else rows
    outputs = {"out": ((bh, out_rows, v_dim), "chunk_v"), "final": ((bh, k_dim, v_dim), "head_v")}
    return operands, outputs, n


def backward_operands(terms: ChunkTerms, d_o, d_final):
    """(operands, outputs, number of chunks) of the reverse pass; outputs the cotangent of the state
    leaving each chunk `[BH, N*K, V]` and of the initial state `[BH, K, V]`."""
    slabs = kernel_operands(terms)
    bh, rows, k_dim = slabs.q_decayed.shape
    n, v_dim = rows // slabs.attn.shape[-1], d_o.shape[-1]
    operands = {"q_decayed": (slabs.q_decayed, "chunk"), "chunk_decay": (slabs.chunk_decay, "chunk"),
                "do": (d_o, "chunk_v"), "d_final": (d_final, "head_v")}
    if slabs.w is not None:
        operands.update(attn=(slabs.attn, "chunk"), k_to_end=(slabs.k_to_end, "chunk"), w=(slabs.w, "chunk"))
    outputs = {"leaving_grad": ((bh, n * k_dim, v_dim), "chunk_v"), "d_initial": ((bh, k_dim, v_dim), "head_v")}
    return operands, outputs, n


def _kernels(backend: str):
    """The state-pass kernels of a backend, `pallas_kernels.gpu.state_pass` or `.tpu.state_pass`,
    imported on first use: the Triton / Mosaic modules load only when a kernel runs."""
    return importlib.import_module(f"pallas_kernels.{backend}.state_pass")


def _forward(config: KernelConfig, inputs, s0):
    terms = chunk_terms(*inputs)
    o, final = _kernels(config.backend).forward_pass(terms, s0, emit_states=False, block_v=config.block_v,
                                                     interpret=config.interpret)
    return o.reshape(terms.u_bar.shape[:3] + o.shape[-1:]), final


# `config` is static (hashable): a nondiff argument, not traced.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_recurrence(config: KernelConfig, inputs, s0):
    """The differentiable chunked recurrence on the state-pass kernels.

    inputs (q, k, v, g), (q, k, v, g, beta) or (q, k, v, g, beta or None, isolated), chunked
    `[BH, N, C, .]` (beta and the 0/1 float mask isolated `[BH, N, C]`; g with a last dim of K or 1),
    s0 `[BH, K, V]`. Returns (o `[BH, N, C, V]`, final state `[BH, K, V]`).
    """
    return _forward(config, inputs, s0)


def _chunked_recurrence_fwd(config, inputs, s0):
    return _forward(config, inputs, s0), (inputs, s0)


def _chunked_recurrence_bwd(config, residuals, cotangents):
    inputs, s0 = residuals
    d_o, d_final = cotangents
    kernels = _kernels(config.backend)
    terms, terms_vjp = jax.vjp(chunk_terms, *inputs)
    # The same kernel, emitting the state entering each chunk instead of the outputs.
    entering, _ = kernels.forward_pass(terms, s0, emit_states=True, block_v=config.block_v,
                                       interpret=config.interpret)
    entering = entering.reshape(terms.q_decayed.shape[:2] + terms.q_decayed.shape[-1:] + entering.shape[-1:])
    d_o_slab = d_o.reshape((d_o.shape[0], -1, d_o.shape[-1]))
    leaving_grad, d_s0 = kernels.backward(terms, d_o_slab, d_final, block_v=config.block_v,
                                          interpret=config.interpret)
    per_chunk = jax.vmap(jax.vmap(chunk_step))  # over BH, then N
    _, step_vjp = jax.vjp(per_chunk, terms, entering)
    d_terms, _ = step_vjp((d_o, leaving_grad))
    return terms_vjp(d_terms), d_s0


chunked_recurrence.defvjp(_chunked_recurrence_fwd, _chunked_recurrence_bwd)
