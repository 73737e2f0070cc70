r"""Kernel family of the gated delta rule: DeltaNet, Gated DeltaNet and KDA.

Per head, q already scaled, state S in R^{K x V}, beta_t in (0, 1), g_t <= 0 per channel (KDA),
one scalar broadcast over K (Gated DeltaNet) or absent (DeltaNet, g = 0):

    S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T,      o_t = S_t^T q_t

Chunked (WY / UT form, Yang et al. 2024; Kimi Linear eqs. 6-9), per chunk of C positions with G the
in-chunk cumulative log decay and Gam = exp(G):

    Akk[i, m] = sum_c k_i[c] k_m[c] exp(G_i[c] - G_m[c])   (m < i)
    Tm   = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta)      (forward substitution, float32)
    W    = Tm (K * Gam),   Ubar = Tm V
    U    = Ubar - W S_0,   O = (Q * Gam) S_0 + Tril(Aqk) U,   S_C = Diag(Gam_C) S_0 + (K exp(G_C - G))^T U

`pallas_kernels.chunk_math.chunk_terms` forms everything but the last line for all chunks at once
(XLA); the state-pass kernels (`pallas_kernels.gpu.state_pass`, `pallas_kernels.tpu.state_pass`) run
the last line with S on chip; `recurrence.chunked_recurrence` is the `jax.custom_vjp` around both.
`delta_reference` is the token recurrence the kernels are tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def delta_reference(q, k, v, g, beta, state):
    """Token-by-token recurrence. q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H, K or 1]` or None,
    beta `[B, T, H]`, state `[B, H, K, V]`. Returns (o `[B, T, H, V]`, final state)."""
    if g is None:
        g = jnp.zeros(k.shape[:-1] + (1,), k.dtype)

    def step(s, x):
        q_t, k_t, v_t, g_t, b_t = x
        s = jnp.exp(g_t)[..., None] * s
        recalled = jnp.einsum("bhk,bhkv->bhv", k_t, s)
        s = s + k_t[..., :, None] * (b_t[..., None] * (v_t - recalled))[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    final, o = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta)))
    return jnp.moveaxis(o, 0, 1), final
