r"""Kernel family of the non-delta gated recurrence: linear attention, GLA and SSD (Mamba-2).

Per head, q already scaled, state S in R^{K x V}, g_t <= 0 per channel (GLA) or one scalar broadcast
over K (SSD with q = C, k = B, v = dt * x, g = A * dt; RetNet-style heads):

    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,      o_t = S_t^T q_t

Chunked, per chunk of C positions with G the in-chunk cumulative log decay and Gam = exp(G):

    Aqk[i, m] = sum_c q_i[c] k_m[c] exp(G_i[c] - G_m[c])   (m <= i)
    O   = (Q * Gam) S_0 + Tril(Aqk) V,    S_C = Diag(Gam_C) S_0 + (K * exp(G_C - G))^T V

`pallas_kernels.chunk_math.chunk_terms` forms the chunk terms for all chunks at once (XLA); the
state-pass kernels (`pallas_kernels.gpu.state_pass`, `pallas_kernels.tpu.state_pass`, with W = 0)
carry S across chunks on chip and emit O; `recurrence.chunked_recurrence` is the `jax.custom_vjp`
around both. `gla_reference` is the token recurrence the kernels are tested against.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gla_reference(q, k, v, g, state):
    """Token-by-token recurrence. q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H, K or 1]` or None,
    state `[B, H, K, V]`. Returns (o `[B, T, H, V]`, final state)."""
    if g is None:
        g = jnp.zeros(k.shape[:-1] + (1,), k.dtype)

    def step(s, x):
        q_t, k_t, v_t, g_t = x
        s = jnp.exp(g_t)[..., None] * s + k_t[..., :, None] * v_t[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    final, o = jax.lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)))
    return jnp.moveaxis(o, 0, 1), final
