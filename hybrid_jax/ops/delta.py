r"""The delta-rule family: DeltaNet, Gated DeltaNet and Kimi Delta Attention (KDA).

Per head, state S in R^{K x V}, o_t = S_t^T (scale * q_t), beta_t in (0, 1):

    delta_rule:        S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    gated_delta_rule:  S_t = (I - b_t k_t k_t^T) exp(g_t) S_{t-1} + b_t k_t v_t^T,        g `[B,T,HV]`
    kda:               S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T,  g `[B,T,HV,K]`

Each step writes b_t (v_t - S'^T k_t) at key k_t, where S' is the decayed state: an online
least-squares update of the key -> value map. DeltaNet is g = 0 and Gated DeltaNet is KDA with the
gate broadcast over K, so all three run on one chunked machinery (`gated.py`): the WY / UT form of
Yang et al. 2024 ("Parallelizing Linear Transformers with the Delta Rule over Sequence Length") and
the Kimi Linear report (eqs. 6-9), with Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta) solved
per chunk by forward substitution, and only relative decays exp(G_i - G_m), i >= m, ever formed.

Layout: q, k `[B, T, H, K]` (keys are expected L2-normalised by the layer), v `[B, T, HV, V]`,
beta `[B, T, HV]`, HV % H == 0 (docs/conventions.md). impl: "reference" | "scan" (associative scan over
(transition, write) pairs, O(T log T K^3)) | "chunk" (default) | "pallas" | "auto". Returns (o in v's
dtype, final state `[B, HV, K, V]` float32 or None); each `*_step` returns (o_t in v_t's dtype, state).
`isolated` `[B, T]` (`isolated_t` `[B]` for a step): tokens that read, never write (docs/conventions.md).
`segment_ids` `[B, T]` int: packed documents (1, 2, ... per document, 0 = padding); the state restarts
at each document's first token and padding tokens are identity steps (docs/conventions.md).
`precision`: the matmul precision of the chunk and Pallas forms ("highest" | "high" | "default" |
"bfloat16", None for the platform default). `chunk_size`: None for the platform default
(`gated.default_chunk_size`: 32 on CPU, 64 elsewhere). `kda(safe_gate=True)`: a promise that every g >=
`lower_bound` (in [-5, 0); g is clamped there), which turns the in-chunk diagonal blocks into matmuls
(flash-linear-attention's safe-gate KDA; the layer's bounded gate keeps the promise).
`context_axis`: context parallelism, the time axis split over this manual mesh axis inside
`jax.shard_map` (`hybrid_jax.ops.context`; impl "chunk").
"""
from __future__ import annotations

from hybrid_jax.ops import gated


def delta_rule(q, k, v, *, beta, scale=None, initial_state=None, output_final_state=False,
               isolated=None, segment_ids=None, impl="chunk", chunk_size=None, precision=None, context_axis=None):
    """DeltaNet: the delta rule without decay."""
    return gated.gated_op("delta_rule", q, k, v, g=None, beta=beta, scale=scale,
                          initial_state=initial_state, output_final_state=output_final_state,
                          impl=impl, chunk_size=chunk_size, isolated=isolated, segment_ids=segment_ids,
                          precision=precision, context_axis=context_axis)


def gated_delta_rule(q, k, v, *, g, beta, scale=None, initial_state=None, output_final_state=False,
                     isolated=None, segment_ids=None, impl="chunk", chunk_size=None, precision=None, context_axis=None):
    """Gated DeltaNet: one scalar log decay per head and token, g `[B, T, HV]`."""
    return gated.gated_op("gated_delta_rule", q, k, v, g=g, per_channel=False, beta=beta, scale=scale,
                          initial_state=initial_state, output_final_state=output_final_state,
                          impl=impl, chunk_size=chunk_size, isolated=isolated, segment_ids=segment_ids,
                          precision=precision, context_axis=context_axis)


def kda(q, k, v, *, g, beta, scale=None, initial_state=None, output_final_state=False, isolated=None,
        segment_ids=None, impl="chunk", chunk_size=None, safe_gate=False, lower_bound=-5.0, precision=None,
        context_axis=None):
    """Kimi Delta Attention: channel-wise log decay g `[B, T, HV, K]`."""
    return gated.gated_op("kda", q, k, v, g=g, per_channel=True, beta=beta, scale=scale,
                          initial_state=initial_state, output_final_state=output_final_state,
                          impl=impl, chunk_size=chunk_size, isolated=isolated, segment_ids=segment_ids,
                          safe_gate=safe_gate, lower_bound=lower_bound, precision=precision, context_axis=context_axis)


def delta_rule_step(q_t, k_t, v_t, state, *, beta_t, scale=None, isolated_t=None):
    """One decoding step: q_t, k_t `[B, H, K]`, v_t `[B, HV, V]`, beta_t `[B, HV]`, state `[B, HV, K, V]`."""
    return gated.gated_step("delta_rule_step", q_t, k_t, v_t, state, beta_t=beta_t, scale=scale,
                            isolated_t=isolated_t)


def gated_delta_rule_step(q_t, k_t, v_t, state, *, g_t, beta_t, scale=None, isolated_t=None):
    """One decoding step of Gated DeltaNet; g_t `[B, HV]`."""
    return gated.gated_step("gated_delta_rule_step", q_t, k_t, v_t, state, g_t=g_t, per_channel=False,
                            beta_t=beta_t, scale=scale, isolated_t=isolated_t)


def kda_step(q_t, k_t, v_t, state, *, g_t, beta_t, scale=None, isolated_t=None):
    """One decoding step of KDA; g_t `[B, HV, K]`."""
    return gated.gated_step("kda_step", q_t, k_t, v_t, state, g_t=g_t, per_channel=True, beta_t=beta_t,
                            scale=scale, isolated_t=isolated_t)
