r"""The gated linear-recurrence family: one machinery behind linear attention, GLA, SSD and the delta rule.

Per head, with q already multiplied by `scale`, state S in R^{K x V}, o_t = S_t^T q_t:

    non-delta (linear attention, GLA, SSD):  S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T
    delta (DeltaNet, Gated DeltaNet, KDA):   S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T

g is a natural-log decay (g <= 0), either per channel `[..., K]` or one scalar per head `[..., 1]`
broadcast over K; `g=None` means no decay; `beta=None` selects the non-delta form.

Layout inside this module: q, k `[B, T, H, K]`, v `[B, T, H, V]` with the grouped heads already
expanded (the public ops do that), g `[B, T, H, K or 1]`, beta `[B, T, H]`, state `[B, H, K, V]`, all
float32. Algorithms (MATH.md gives the derivations):

* `recurrence_reference`: lax.scan of the recurrence, one token at a time.
* `recurrence_scan`: jax.lax.associative_scan. Delta form: pairs (M_t, X_t) with
  M_t = (I - b_t k_t k_t^T) Diag(exp g_t), X_t = b_t k_t v_t^T, combined as (M2 M1, M2 X1 + X2),
  O(T log T K^3). Non-delta form: the elementwise first-order scan of `scan.py` on K x V states.
* `recurrence_chunk`: chunks of C positions. Per chunk, with G the in-chunk cumulative log decay and
  Gam = exp(G):  Aqk[i, m] = sum_c q_i k_m exp(G_i - G_m) (m <= i), the same Akk for k with k,
  Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta), W = Tm (K * Gam), Ubar = Tm V (delta) or
  W = 0, Ubar = V (non-delta). Across chunks, with S_0 the state entering the chunk:
      U = Ubar - W S_0,   O = (Q * Gam) S_0 + Tril(Aqk) U,
      S_C = Diag(Gam_C) S_0 + (K * exp(G_C - G))^T U.
  Only relative decays exp(G_i - G_m), i >= m, are ever formed, so g = -20 per step stays finite.
  Per-channel decays use sub-chunks: an off-diagonal block (query sub-chunk a, earlier keys) is one
  matmul through the reference position r = start of a, exp(G_i - G_m) = exp(G_i - G_r) exp(G_r - G_m),
  both factors <= 1; diagonal blocks are explicit s x s x K products.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hybrid_jax.ops import first_order
from pallas_kernels import chunk_math
from hybrid_jax.ops._common import (
    Impl,
    check_chunk_size,
    check_qkv,
    check_shape,
    default_scale,
    pad_time,
    repeat_heads,
    resolve_impl,
)


def _decay(g_t: jax.Array | None, k_dim: int) -> jax.Array | None:
    return None if g_t is None else jnp.exp(jnp.broadcast_to(g_t, g_t.shape[:-1] + (k_dim,)))


def recurrence_step(q_t, k_t, v_t, g_t, beta_t, state):
    """One token: q_t, k_t `[B, H, K]`, v_t `[B, H, V]`, g_t `[B, H, K or 1]` or None, beta_t `[B, H]`
    or None, state `[B, H, K, V]`. Returns (o_t `[B, H, V]`, new state)."""
    decay = _decay(g_t, k_t.shape[-1])
    if decay is not None:
        state = decay[..., None] * state
    if beta_t is None:
        write = v_t
    else:  # delta rule: write the correction towards v_t of what the decayed state recalls for k_t
        recalled = jnp.einsum("bhk,bhkv->bhv", k_t, state)
        write = beta_t[..., None] * (v_t - recalled)
    state = state + k_t[..., :, None] * write[..., None, :]
    return jnp.einsum("bhk,bhkv->bhv", q_t, state), state


def recurrence_reference(q, k, v, g, beta, state):
    """The exact recurrence, token by token (lax.scan over T). Returns (o `[B,T,H,V]`, final state)."""
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731

    def step(s, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs
        o_t, s = recurrence_step(q_t, k_t, v_t, g_t, beta_t, s)
        return s, o_t

    final, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, g, beta))))
    return jnp.moveaxis(o, 0, 1), final


def recurrence_scan(q, k, v, g, beta, state):
    """jax.lax.associative_scan over the recurrence (materialises every state: a check, not a fast path)."""
    k_dim = k.shape[-1]
    decay = _decay(g, k_dim)
    if beta is None:
        a = jnp.ones(k.shape + (1,), k.dtype) if decay is None else decay[..., None]
        x = k[..., :, None] * v[..., None, :]
        states, final = first_order.linear_recurrence(
            jnp.broadcast_to(a, x.shape), x, initial_state=state, impl=Impl.SCAN
        )
    else:
        eye = jnp.eye(k_dim, dtype=k.dtype)
        householder = eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]
        m = householder if decay is None else householder * decay[..., None, :]
        x = beta[..., None, None] * k[..., :, None] * v[..., None, :]
        x = x.at[:, 0].add(jnp.einsum("bhij,bhjv->bhiv", m[:, 0], state))

        def combine(left, right):
            m1, x1 = left
            m2, x2 = right
            return m2 @ m1, m2 @ x1 + x2

        _, states = jax.lax.associative_scan(combine, (m, x), axis=1)
        final = states[:, -1]
    return jnp.einsum("bthk,bthkv->bthv", q, states), final


# ----------------------------------------------------------------------------- chunked form
# The per-chunk algebra (decayed products through sub-chunk reference positions, the WY transform)
# lives in pallas_kernels.chunk_math, shared with the kernels, which may not import this package.


class ChunkTerms(NamedTuple):
    """What each chunk contributes, computed for all chunks at once. Shapes `[B, H, N, C, ...]`."""

    q_decayed: jax.Array  # Q * Gam                      [.., C, K]
    attn: jax.Array  # Tril(Aqk)                           [.., C, C]
    w: jax.Array | None  # Tm (K * Gam) (delta only)      [.., C, K]
    u_bar: jax.Array  # Tm V (delta) or V                 [.., C, V]
    k_to_end: jax.Array  # K * exp(G_C - G)               [.., C, K]
    chunk_decay: jax.Array  # Gam_C                       [.., K or 1]


def chunk_terms(q, k, v, g, beta, chunk_size) -> ChunkTerms:
    """Splits `[B, T, H, .]` inputs into chunks (padding with identity steps) and forms each chunk's terms."""
    def chunked(x):
        x = pad_time(x, chunk_size)
        b, t, h = x.shape[:3]
        x = x.reshape((b, t // chunk_size, chunk_size, h) + x.shape[3:])
        return jnp.moveaxis(x, 3, 1)  # [B, H, N, C, ...]

    q, k, v = chunked(q), chunked(k), chunked(v)
    g = jnp.zeros(k.shape[:-1] + (1,), k.dtype) if g is None else chunked(g)
    delta = beta is not None
    q_decayed, attn, k_to_end, chunk_decay, k_gam, a_kk = chunk_math.decay_terms(q, k, g, delta=delta)
    if delta:
        w, u_bar = chunk_math.delta_transform(a_kk, v, chunked(beta), k_gam)
    else:
        w, u_bar = None, v
    return ChunkTerms(q_decayed, attn, w, u_bar, k_to_end, chunk_decay)


def propagate(terms: ChunkTerms, state, *, u_bar=None):
    """Carries the state across chunks; returns (state entering each chunk `[B,H,N,K,V]`, final state).

    `u_bar` overrides `terms.u_bar` (log-linear attention propagates older levels with Ubar = 0).
    """
    u_bar = terms.u_bar if u_bar is None else u_bar
    if terms.w is None:
        # Non-delta: the chunk's own writes do not depend on the incoming state, so form them all at once.
        writes = jnp.swapaxes(terms.k_to_end, -1, -2) @ u_bar
        inputs = (terms.chunk_decay[..., None], writes)

        def step(s, x):
            decay, write = x
            return decay * s + write, s
    else:
        inputs = (terms.chunk_decay[..., None], terms.w, terms.k_to_end, u_bar)

        def step(s, x):
            decay, w, k_to_end, u_bar_c = x
            u = u_bar_c - w @ s
            return decay * s + jnp.swapaxes(k_to_end, -1, -2) @ u, s

    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731
    final, entering = jax.lax.scan(step, state, jax.tree.map(chunk_major, inputs))
    return jnp.moveaxis(entering, 0, 2), final


def chunk_outputs(terms: ChunkTerms, entering, *, u_bar=None, attn=None):
    """O = (Q * Gam) S_0 + Tril(Aqk) U per chunk, `[B, H, N, C, V]`; `attn` may be a reweighted Tril(Aqk)."""
    u_bar = terms.u_bar if u_bar is None else u_bar
    attn = terms.attn if attn is None else attn
    u = u_bar if terms.w is None else u_bar - terms.w @ entering
    return terms.q_decayed @ entering + attn @ u


def unchunk(o, t):
    """`[B, H, N, C, V]` -> `[B, T, H, V]` (drops the padding)."""
    b, h, n, c, d = o.shape
    return jnp.moveaxis(o, 1, 3).reshape(b, n * c, h, d)[:, :t]


def recurrence_chunk(q, k, v, g, beta, state, *, chunk_size):
    """The chunked form (see the module docstring). Returns (o `[B,T,H,V]`, final state)."""
    t = q.shape[1]
    chunk_size = min(chunk_size, t)  # a short sequence is one chunk
    terms = chunk_terms(q, k, v, g, beta, chunk_size)
    entering, final = propagate(terms, state)
    return unchunk(chunk_outputs(terms, entering), t), final


# ----------------------------------------------------------------------------- the shared front end

SUPPORTED = (Impl.REFERENCE, Impl.SCAN, Impl.CHUNK, Impl.PALLAS, Impl.AUTO)


def _pallas_or_chunk(op, args, chunk_size):
    """impl="auto": the kernel on a GPU/TPU that supports these shapes, else the chunked form.

    On CPU the kernels would only run in interpret mode (a correctness tool, far slower than XLA),
    so "auto" means "chunk" there without a warning; on an accelerator a refused shape warns once.
    """
    if jax.default_backend() not in ("gpu", "tpu"):
        return Impl.CHUNK
    import pallas_kernels

    ok, reason = pallas_kernels.supports(*args, chunk_size=chunk_size)
    if not ok:
        warnings.warn(f"{op}: impl='auto' falls back to 'chunk': {reason}", stacklevel=3)
        return Impl.CHUNK
    return Impl.PALLAS


def check_gate(op, g, b, t, hv, k_dim, *, per_channel: bool | None):
    """Validates g (`[B,T,HV]` scalar or `[B,T,HV,K]` per channel; `per_channel=None` allows both) and
    returns it as `[B, T, HV, K or 1]`."""
    scalar_shape, channel_shape = (b, t, hv), (b, t, hv, k_dim)
    allowed = {None: (scalar_shape, channel_shape), False: (scalar_shape,), True: (channel_shape,)}
    allowed = allowed[per_channel]
    if tuple(g.shape) not in allowed:
        names = {scalar_shape: "[B, T, HV]", channel_shape: "[B, T, HV, K]"}
        want = " or ".join(f"{names[s]} = {s}" for s in allowed)
        raise ValueError(f"{op}: g must have shape {want}, got {tuple(g.shape)}")
    return g[..., None] if g.ndim == 3 else g


def gated_op(op, q, k, v, *, g, beta, scale, initial_state, output_final_state, impl, chunk_size):
    """Runs one of the family's algorithms on validated public inputs.

    q, k `[B, T, H, K]`; v `[B, T, HV, V]`; g `[B, T, HV, K or 1]` or None; beta `[B, T, HV]` or None.
    Returns (o `[B, T, HV, V]` in q's dtype, final state `[B, HV, K, V]` float32 or None).
    """
    b, t, h, k_dim, hv, v_dim = check_qkv(q, k, v, op)
    choice = resolve_impl(impl, op, SUPPORTED)
    check_chunk_size(chunk_size, op, 1, 1024)
    check_shape(f"{op}: beta", beta, (b, t, hv), "[B, T, HV]")
    check_shape(f"{op}: initial_state", initial_state, (b, hv, k_dim, v_dim), "[B, HV, K, V]")
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    q = repeat_heads(f32(q) * default_scale(scale, k_dim), hv)
    k = repeat_heads(f32(k), hv)
    state = (jnp.zeros((b, hv, k_dim, v_dim), jnp.float32) if initial_state is None
             else f32(initial_state))
    args = (q, k, f32(v), f32(g), f32(beta), state)
    if choice is Impl.AUTO:
        choice = _pallas_or_chunk(op, args, chunk_size)
    if choice is Impl.REFERENCE:
        o, final = recurrence_reference(*args)
    elif choice is Impl.SCAN:
        o, final = recurrence_scan(*args)
    elif choice is Impl.CHUNK:
        o, final = recurrence_chunk(*args, chunk_size=chunk_size)
    else:
        import pallas_kernels  # ops -> kernels, never the other way round

        o, final = pallas_kernels.gated_recurrence(*args, chunk_size=chunk_size)
    return o.astype(v.dtype), (final if output_final_state else None)


def gated_step(op, q_t, k_t, v_t, state, *, g_t=None, beta_t=None, scale=None):
    """Public one-token step: q_t, k_t `[B, H, K]`, v_t `[B, HV, V]`, state `[B, HV, K, V]`,
    g_t `[B, HV, K or 1]` or None, beta_t `[B, HV]` or None. Returns (o_t in v's dtype, new state)."""
    b, _, h, k_dim, hv, v_dim = check_qkv(q_t[:, None], k_t[:, None], v_t[:, None], op)
    check_shape(f"{op}: state", state, (b, hv, k_dim, v_dim), "[B, HV, K, V]")
    check_shape(f"{op}: beta_t", beta_t, (b, hv), "[B, HV]")
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    q_t = repeat_heads(f32(q_t) * default_scale(scale, k_dim), hv, axis=1)
    k_t = repeat_heads(f32(k_t), hv, axis=1)
    o_t, state = recurrence_step(q_t, k_t, f32(v_t), f32(g_t), f32(beta_t), f32(state))
    return o_t.astype(v_t.dtype), state
