r"""The chunked form of the gated recurrences, shared by hybrid_jax.ops and both kernel backends: how
time is cut into chunks, each chunk's terms (`ChunkTerms`, pure JAX, run by XLA), the per-chunk state
step, and the kernels' operand layout.

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
exp(G_r - G_m) (both factors <= 1, one matmul); diagonal blocks are explicit s x s x K products,
unless the gate is safe (`safe_gate`: every g >= -5), when they are matmuls through a reference in
the middle of the sub-chunk (`intra_chunk.decayed_products`, which also holds the inverse of the WY
transform). A sequence shorter than a chunk is one chunk, rounded up to whole sub-chunks under a
per-channel decay (`chunk_length`). Every matmul runs at one of `precision.PRECISIONS`. The derivations are in the repository's docs/chunked_algorithms.md.

Isolated tokens (read, do not write; `isolate`): identity steps (k = g = beta = 0) of the terms every
other row and the state pass see, reading S_{i-1} through q'_i = (q_i - b_i (q_i . k_i) k_i) exp(g_i)
and their own write through the diagonal of Tril(Aqk); the kernels need no change.

Packed documents (`resets`: the tokens before which the state restarts from zero; `document_runs`):
with r_i the number of resets in the chunk at or before i, Aqk and Akk keep only pairs with
r_i == r_m, Q Gam and K Gam (so W) only rows with r_i == 0, K exp(G_C - G) only rows with
r_m == r_C, and Gam_C is zeroed when the chunk holds a reset. A reset may fall anywhere in a chunk;
the state pass and the kernels need no change.

The sequential pass over chunks and the `jax.custom_vjp` with a recomputing backward, on XLA or on
the state-pass kernels, are in `pallas_kernels.recurrence`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.intra_chunk import (  # noqa: F401  (re-exported: the vocabulary of the chunked form)
    MIN_LOWER_BOUND,
    SUB_CHUNK,
    decayed_products,
    inverse_cotangent,
    invert_unit_lower,
    sub_chunk_length,
)
from pallas_kernels.precision import (  # noqa: F401
    PRECISIONS,
    dot,
    matmul,
    matmul_t,
    resolve_precision,
    transposed_copy,
)


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
    """Static choices of one call: chunk length, backend ("gpu" | "tpu" kernels, or "xla" for the
    pure-JAX passes of `pallas_kernels.recurrence`), interpret mode, V tile, and the terms' options (`safe_gate`, matmul `precision`, see `chunk_terms`)."""

    chunk: int
    backend: str
    interpret: bool
    block_v: int
    safe_gate: bool = False
    precision: str = "highest"
    block_chunks: int = 0  # backend "xla": chunks per block of the blocked passes (0: all at once)
    time_major: bool = False  # backend "xla": inputs `[B, N, C, H, .]` (`to_chunks(heads_first=False)`)


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


def pad_time(x: jax.Array, multiple: int, axis: int = 1, value: float = 0.0) -> jax.Array:
    """Pads `axis` up to a multiple of `multiple` (padded steps must be identity steps for the op)."""
    extra = (-x.shape[axis]) % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def to_chunks(x: jax.Array, chunk: int, heads_first: bool = True) -> jax.Array:
    """`[B, T, H, ...]` -> `[B, H, N, C, ...]` (or, not `heads_first`, `[B, N, C, H, ...]`: a reshape,
    no copy), time padded with zeros to whole chunks. Zero k, v, g and beta make a padded position an
    identity step of every recurrence here."""
    x = pad_time(x, chunk)
    b, t, h = x.shape[:3]
    x = x.reshape((b, t // chunk, chunk, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1) if heads_first else x


def from_chunks(x: jax.Array, length: int, heads_first: bool = True) -> jax.Array:
    """`[B, H, N, C, ...]` (or `[B, N, C, H, ...]`) -> `[B, T, H, ...]`, the first `length` positions
    (drops the padding)."""
    if heads_first:
        x = jnp.moveaxis(x, 1, 3)
    b, n, c, h = x.shape[:4]
    return x.reshape((b, n * c, h) + x.shape[4:])[:, :length]


# ----------------------------------------------------------------------------- the per-chunk terms


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


def chunk_terms(q, k, v, g, beta=None, isolated=None, resets=None, *, safe_gate: bool = False,
                precision: str = "highest") -> ChunkTerms:
    """Each chunk's terms from chunked q, k `[.., N, C, K]`, v `[.., N, C, V]`, g `[.., N, C, K or 1]`
    (or None: no decay), beta `[.., N, C]` (None: the non-delta form), `isolated` `[.., N, C]`
    (None, or a mask, bool or 0/1 float, of the tokens that read and do not write: `isolate`) and
    `resets` `[.., N, C]` (None, or a mask of the tokens before which the state restarts from zero:
    the first tokens of packed documents, `document_runs`). `safe_gate`: a promise that every
    g >= MIN_LOWER_BOUND (`decayed_products`); `precision`: the matmul precision (`PRECISIONS`).

    Isolated rows are identity steps of the carried recurrence (so they reach no other row and no
    state), read S_{i-1} through q'_i, and add d_i u_i through the diagonal of Tril(Aqk), with
    Ubar_i = b_i v_i in the delta form (Tm's row i is 0 there, so W_i = 0 and U_i = Ubar_i)."""
    if g is None:
        g = jnp.zeros(k.shape[:-1] + (1,), k.dtype)
    if isolated is not None:
        beta_in = beta
        q, k, g, beta, diag, iso = isolate(q, k, g, beta, isolated)
    runs = None if resets is None else document_runs(resets)
    terms = _chunk_terms(q, k, v, g, beta, safe_gate, precision, runs)
    if isolated is None:
        return terms
    u_bar = terms.u_bar if beta is None else jnp.where(iso[..., None], beta_in[..., None] * v, terms.u_bar)
    eye = jnp.eye(q.shape[-2], dtype=terms.attn.dtype)
    return terms._replace(attn=terms.attn + diag[..., None] * eye, u_bar=u_bar)


class DocumentRuns(NamedTuple):
    """Where packed documents cut one chunk (`document_runs`), as 0/1 float masks."""

    same: jax.Array  # [.., C, C]: positions i, m in the same run (no document start in (m, i])
    first: jax.Array  # [.., C, 1]: positions in the chunk's first run (they continue the entering state)
    last: jax.Array  # [.., C, 1]: positions in the chunk's last run (they reach the state leaving it)


def document_runs(resets: jax.Array) -> DocumentRuns:
    """The runs of a chunk cut by `resets` `[.., C]` (nonzero where the state restarts from zero before
    the token: a document's first token). With r_i the number of resets at or before position i
    (a reset at the chunk's first position counts), a source m reaches a query i only when r_m == r_i,
    the entering state S_0 reaches only positions with r_i == 0 and only positions with r_m == r_C
    reach the state leaving the chunk (`_chunk_terms` masks the terms with them)."""
    runs = jnp.cumsum((resets != 0).astype(jnp.int32), axis=-1)
    as_float = lambda mask: mask.astype(jnp.float32)  # noqa: E731
    return DocumentRuns(as_float(runs[..., :, None] == runs[..., None, :]), as_float(runs == 0)[..., None],
                        as_float(runs == runs[..., -1:])[..., None])


def cumulative_decay(g: jax.Array) -> jax.Array:
    """G = cumsum(g) along the chunk axis (-2), as a float32-exact matmul by Tril(1): XLA fuses a
    cumsum into each consumer and recomputes it there per element, which kept the C x C decay
    exponentials of the scalar gate from vectorising (~10x slower on CPU); a matmul's output is
    materialised once. Tril(1) is broadcast over g's leading axes so that they are batch axes of the
    matmul: with an unbatched Tril(1), XLA:CPU folded them into the columns and transposed g and G
    (`[.., K, C]`) around the matmul and through the fused gradient of G, ~6% of safe-gate KDA's
    forward + backward at T = 4096, chunk 32."""
    c = g.shape[-2]
    tril = jnp.broadcast_to(jnp.tril(jnp.ones((c, c), g.dtype)), g.shape[:-2] + (c, c))
    return matmul(tril, g, "highest")


def _chunk_terms(q, k, v, g, beta, safe_gate, precision, runs: DocumentRuns | None = None) -> ChunkTerms:
    """The terms of one chunk (module docstring); with `runs`, those of its documents: Aqk and Akk only
    within a run, Q Gam and K Gam (so W) only in the first run, K exp(G_C - G) only in the last, and
    Gam_C zero unless the chunk has a single run. G stays the cumulative decay over the whole chunk
    (finite: only masked, never -inf), so the products and the state pass are unchanged."""
    G = cumulative_decay(g)
    gam = jnp.exp(G)
    k_to_end = k * jnp.exp(G[..., -1:, :] - G)
    chunk_decay = gam[..., -1, :]
    q_decayed, k_decayed = q * gam, k * gam
    if runs is not None:
        q_decayed, k_decayed = q_decayed * runs.first, k_decayed * runs.first
        k_to_end = k_to_end * runs.last
        chunk_decay = chunk_decay * runs.first[..., -1, :]
    options = {"safe_gate": safe_gate, "precision": precision}
    if beta is None:
        (a_qk,) = decayed_products((q,), k, G, **options)
        w, u_bar = None, v
    else:
        a_qk, a_kk = decayed_products((q, k), k, G, **options)
        c = k.shape[-2]
        a_kk = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), a_kk, 0.0)
        if runs is not None:
            a_kk = a_kk * runs.same
        w, u_bar = delta_transform(a_kk, v, beta, k_decayed, precision)
    if runs is not None:
        a_qk = a_qk * runs.same
    return ChunkTerms(q_decayed, a_qk, w, u_bar, k_to_end, chunk_decay)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def delta_transform(a_kk, v, beta, k_decayed, precision: str = "highest"):
    """The WY / UT transform of the delta rule for one chunk's StrictLower(Akk) `[.., C, C]`,
    v `[.., C, V]`, beta `[.., C]`, K * Gam `[.., C, K]`:
    Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta) (`invert_unit_lower`, float32),
    returns (W = Tm (K * Gam), Ubar = Tm V)."""
    return _delta_transform_fwd(a_kk, v, beta, k_decayed, precision)[0]


def _delta_transform_fwd(a_kk, v, beta, k_decayed, precision):
    inverse = invert_unit_lower(beta[..., :, None] * a_kk)
    beta_k, beta_v = beta[..., :, None] * k_decayed, beta[..., :, None] * v
    outputs = (matmul(inverse, beta_k, precision), matmul(inverse, beta_v, precision))
    return outputs, (a_kk, v, beta, k_decayed, inverse)


def _delta_transform_bwd(precision, residuals, cotangents):
    # X = (I + L)^{-1}, L = Diag(beta) StrictLower(Akk). Every product with X^T goes through one
    # explicit copy of X^T (`transposed_copy`), where autodiff's transposes had four matmuls per chunk
    # on XLA:CPU's slow path for a left operand contracted on its rows.
    a_kk, v, beta, k_decayed, inverse = residuals
    d_w, d_u_bar = cotangents
    inverse_t = transposed_copy(inverse)
    t = lambda x: jnp.swapaxes(x, -1, -2)  # noqa: E731
    beta_c = beta[..., :, None]
    d_beta_k, d_beta_v = matmul(inverse_t, d_w, precision), matmul(inverse_t, d_u_bar, precision)
    d_inverse = matmul(d_w, t(beta_c * k_decayed), precision) + matmul(d_u_bar, t(beta_c * v), precision)
    d_lower = inverse_cotangent(inverse_t, d_inverse)
    d_beta = jnp.sum(d_lower * a_kk, -1) + jnp.sum(d_beta_k * k_decayed, -1) + jnp.sum(d_beta_v * v, -1)
    return beta_c * d_lower, beta_c * d_beta_v, d_beta, beta_c * d_beta_k


delta_transform.defvjp(_delta_transform_fwd, _delta_transform_bwd)


def chunk_values(terms: ChunkTerms, s: jax.Array, precision: str = "highest", *, u_bar=None) -> jax.Array:
    """U = Ubar - W S_0 `[.., C, V]` (Ubar without the delta rule); `u_bar` overrides `terms.u_bar`."""
    u_bar = terms.u_bar if u_bar is None else u_bar
    return u_bar if terms.w is None else u_bar - matmul(terms.w, s, precision)


def chunk_outputs(terms: ChunkTerms, s: jax.Array, u: jax.Array, precision: str = "highest") -> jax.Array:
    """O = (Q Gam) S_0 + Tril(Aqk) U `[.., C, V]`."""
    return matmul(terms.q_decayed, s, precision) + matmul(terms.attn, u, precision)


def chunk_step(terms: ChunkTerms, s: jax.Array, precision: str = "highest"):
    """Chunks in pure JAX: (O `[.., C, V]`, S_C `[.., K, V]`) from S_0 `[.., K, V]`, any leading axes
    shared by the terms and S_0 (`[B, H, N]` for all chunks at once)."""
    u = chunk_values(terms, s, precision)
    state = terms.chunk_decay[..., :, None] * s + matmul_t(terms.k_to_end, u, precision)
    return chunk_outputs(terms, s, u, precision), state


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
