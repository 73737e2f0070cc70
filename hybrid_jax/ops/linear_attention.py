r"""Linear attention and gated linear attention (GLA).

Per head, state S in R^{K x V}, o_t = S_t^T (scale * q_t):

    linear_attention:  S_t = S_{t-1} + k_t v_t^T
    gla:               S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,   g_t <= 0 per channel `[B,T,H,K]`
                       or one scalar per head `[B,T,H]` (the decay of RetNet / Mamba-2 style heads)

Feature maps, normalisation and the gate parameterisation belong to the layers (hybrid_jax.nn).
Layout: q, k `[B, T, H, K]`, v `[B, T, HV, V]` with HV % H == 0 (q/k shared by each group of value
heads); g follows v's heads. impl: "reference" (token recurrence), "scan" (associative scan over
K x V states), "chunk" (intra-chunk matmuls + one pass over chunk states; the default), "pallas",
"auto". All compute in float32 and return o in v's dtype and the final state `[B, HV, K, V]` in
float32; the steps return (o_t in v_t's dtype, new state). `isolated` `[B, T]` / `isolated_t` `[B]`:
tokens that read the state but never write to it. `segment_ids` `[B, T]` int: packed documents (the
state restarts at each document, padding tokens are identity steps). `precision`: the matmul precision of the chunk and
Pallas forms ("highest" | "high" | "default" | "bfloat16", None for the platform default);
`safe_gate=True` (gla with a per-channel gate): a promise that every g >= `lower_bound` (in [-5, 0);
g is clamped there), which turns the in-chunk diagonal blocks into matmuls. `context_axis`: context
parallelism, the time axis split over this manual mesh axis (`hybrid_jax.ops.context`; impl "chunk").
Conventions: docs/conventions.md.
"""
from __future__ import annotations

from hybrid_jax.ops import gated


def linear_attention(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                     isolated=None, segment_ids=None, impl="chunk", chunk_size=64, precision=None,
                     context_axis=None):
    """Causal linear attention. Returns (o `[B, T, HV, V]`, final state `[B, HV, K, V]` or None)."""
    return gated.gated_op("linear_attention", q, k, v, g=None, beta=None, scale=scale,
                          initial_state=initial_state, output_final_state=output_final_state,
                          impl=impl, chunk_size=chunk_size, isolated=isolated, segment_ids=segment_ids,
                          precision=precision, context_axis=context_axis)


def linear_attention_step(q_t, k_t, v_t, state, *, scale=None, isolated_t=None):
    """One decoding step: q_t, k_t `[B, H, K]`, v_t `[B, HV, V]`, state `[B, HV, K, V]`."""
    return gated.gated_step("linear_attention_step", q_t, k_t, v_t, state, scale=scale,
                            isolated_t=isolated_t)


def gla(q, k, v, *, g, scale=None, initial_state=None, output_final_state=False, isolated=None,
        segment_ids=None, impl="chunk", chunk_size=64, safe_gate=False, lower_bound=-5.0, precision=None,
        context_axis=None):
    """Gated linear attention with log decay g `[B, T, HV, K]` or `[B, T, HV]`."""
    return gated.gated_op("gla", q, k, v, g=g, beta=None, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, impl=impl, chunk_size=chunk_size,
                          isolated=isolated, segment_ids=segment_ids, safe_gate=safe_gate, lower_bound=lower_bound,
                          precision=precision, context_axis=context_axis)


def gla_step(q_t, k_t, v_t, state, *, g_t, scale=None, isolated_t=None):
    """One decoding step of GLA; g_t `[B, HV, K]` or `[B, HV]`."""
    return gated.gated_step("gla_step", q_t, k_t, v_t, state, g_t=g_t, scale=scale,
                            isolated_t=isolated_t)
