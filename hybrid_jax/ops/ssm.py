r"""State-space models: Mamba's selective scan (S6) and Mamba-2's state-space duality (SSD).

selective_scan (Mamba, diagonal A `[D, N]`, per channel d and state n):
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]
  u, dt `[B, T, D]` (dt > 0, already softplus-ed by the layer), B, C `[B, T, N]`, state `[B, D, N]`.
  An elementwise first-order recurrence: it runs on `first_order.linear_recurrence` in log space.

ssd (Mamba-2, one scalar decay per head, B/C shared by groups of heads):
    h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t^T      (h `[N, P]` per head)
    y_t = h_t^T C_t + D x_t
  x `[B, T, H, P]`, dt `[B, T, H]`, A `[H]` (< 0), B, C `[B, T, G, N]` with H % G == 0, state
  `[B, H, N, P]`. This is the non-delta gated recurrence with q = C, k = B, v = dt * x, g = A * dt and
  scale 1, so it runs on the chunked machinery of `gated.py` (intra-chunk matmuls with the masked
  relative decay, one pass over chunk states).

impl: "reference" | "scan" | "chunk" (default); ssd also "pallas" | "auto". States in float32; y (and
each step's y_t) in the dtype of the value input: x for ssd, u for selective_scan (docs/conventions.md).
Both take `isolated` `[B, T]` (steps: `isolated_t` `[B]`): tokens that read the state and never write.
Both take `segment_ids` `[B, T]` int (packed documents: the state restarts at each document, padding
tokens are identity steps; docs/conventions.md).
"""
from __future__ import annotations

import jax.numpy as jnp

from hybrid_jax.ops import first_order, gated
from hybrid_jax.ops._common import (
    check_floating,
    check_isolated,
    check_rank,
    check_segment_ids,
    check_shape,
    check_time,
    resolve_impl,
    to_f32,
)


def _check_selective(u, dt, A, B, C, D, op):
    check_rank(f"{op}: u", u, 3, "[B, T, D]")
    check_floating(f"{op}: u", u)
    b, t, d = u.shape
    check_shape(f"{op}: dt", dt, (b, t, d), "[B, T, D]")
    check_rank(f"{op}: A", A, 2, "[D, N]")
    n = A.shape[1]
    check_shape(f"{op}: A", A, (d, n), "[D, N]")
    check_shape(f"{op}: B", B, (b, t, n), "[B, T, N]")
    check_shape(f"{op}: C", C, (b, t, n), "[B, T, N]")
    check_shape(f"{op}: D", D, (d,), "[D]")
    check_time(op, t, u=u, dt=dt)
    return b, t, d, n


def _selective_inputs(u, dt, A, B):
    log_decay = to_f32(dt)[..., None] * to_f32(A)  # [B, T, D, N]
    write = (to_f32(dt) * to_f32(u))[..., None] * to_f32(B)[..., None, :]
    return log_decay, write


def _skip(y, D, value, *, head_dim: bool = False):
    """y + D * value in float32, D over value's channels (selective_scan: its last axis) or, with
    `head_dim`, its heads (ssd: `[.., H, P]`). D None: no skip connection."""
    if D is None:
        return y
    return y + to_f32(D).reshape(D.shape + ((1,) if head_dim else ())) * to_f32(value)


def selective_scan(u, dt, A, B, C, *, D=None, initial_state=None, output_final_state=False,
                   isolated=None, segment_ids=None, impl="chunk", chunk_size=64, context_axis=None):
    """Mamba S6. Returns (y `[B, T, D]`, final state `[B, D, N]` float32 or None). `isolated` `[B, T]`
    bool: those tokens read exp(dt_t A) h_{t-1} + dt_t B_t u_t but pass h_{t-1} on unchanged.
    `segment_ids` `[B, T]` int (packed documents): h restarts at 0 at each document's first token after
    token 0 and padding tokens (id 0) pass h on (`first_order.segment_steps`); y there is C_t h + D u_t.
    `context_axis`: context parallelism (`first_order.linear_recurrence`)."""
    b, t, d, n = _check_selective(u, dt, A, B, C, D, "selective_scan")
    resolve_impl(impl, "selective_scan", first_order.SUPPORTED)
    check_shape("selective_scan: initial_state", initial_state, (b, d, n), "[B, D, N]")
    isolated = check_isolated("selective_scan", isolated, (b, t))
    segment_ids = check_segment_ids("selective_scan", segment_ids, (b, t))
    log_decay, write = _selective_inputs(u, dt, A, B)
    h, final = first_order.linear_recurrence(log_decay, write, initial_state=initial_state, log_a=True,
                                             isolated=isolated, segment_ids=segment_ids, impl=impl,
                                             chunk_size=chunk_size, context_axis=context_axis)
    y = _skip(jnp.einsum("btdn,btn->btd", h, to_f32(C)), D, u)
    return y.astype(u.dtype), (final if output_final_state else None)


def selective_scan_step(u_t, dt_t, A, B_t, C_t, state, *, D=None, isolated_t=None):
    """One decoding step: u_t, dt_t `[B, D]`, B_t, C_t `[B, N]`, state `[B, D, N]`; isolated_t `[B]`
    bool: those rows read the stepped state and return `state` unchanged."""
    op = "selective_scan_step"
    b, _, d, n = _check_selective(u_t[:, None], dt_t[:, None], A, B_t[:, None], C_t[:, None], D, op)
    check_shape(f"{op}: state", state, (b, d, n), "[B, D, N]")
    isolated_t = check_isolated(op, isolated_t, (b,), name="isolated_t", layout="[B]")
    log_decay, write = _selective_inputs(u_t, dt_t, A, B_t)
    stepped = jnp.exp(log_decay) * to_f32(state) + write
    y = _skip(jnp.einsum("bdn,bn->bd", stepped, to_f32(C_t)), D, u_t)
    if isolated_t is not None:
        stepped = jnp.where(isolated_t[:, None, None], to_f32(state), stepped)
    return y.astype(u_t.dtype), stepped


def _check_ssd(x, dt, A, B, C, D, op):
    check_rank(f"{op}: x", x, 4, "[B, T, H, P]")
    b, t, h, _ = x.shape
    check_shape(f"{op}: dt", dt, (b, t, h), "[B, T, H]")
    check_shape(f"{op}: A", A, (h,), "[H]")
    check_rank(f"{op}: B", B, 4, "[B, T, G, N]")
    check_shape(f"{op}: C", C, B.shape, "[B, T, G, N] (same as B)")
    check_shape(f"{op}: D", D, (h,), "[H]")
    if B.shape[:2] != (b, t) or h % B.shape[2]:
        raise ValueError(f"{op}: B and C must be [B, T, G, N] with B={b}, T={t} and heads H={h} a "
                         f"multiple of groups G, got {tuple(B.shape)}")
    check_time(op, t, x=x, dt=dt)


def ssd(x, dt, A, B, C, *, D=None, initial_state=None, output_final_state=False, isolated=None,
        segment_ids=None, impl="chunk", chunk_size=64, precision=None, context_axis=None):
    """Mamba-2 SSD. Returns (y `[B, T, H, P]`, final state `[B, H, N, P]` float32 or None); `isolated`
    `[B, T]` bool, `segment_ids` `[B, T]` int (packed documents) and `precision` (the chunk form's
    matmuls) as in `gated.gated_op`; `context_axis`: context parallelism (`hybrid_jax.ops.context`)."""
    _check_ssd(x, dt, A, B, C, D, "ssd")
    dt32 = to_f32(dt)
    y, final = gated.gated_op(
        "ssd", C, B, dt32[..., None] * to_f32(x), g=dt32 * to_f32(A), per_channel=False, beta=None,
        scale=1.0, initial_state=initial_state, output_final_state=output_final_state, impl=impl,
        chunk_size=chunk_size, isolated=isolated, segment_ids=segment_ids, precision=precision,
        context_axis=context_axis)
    return _skip(y, D, x, head_dim=True).astype(x.dtype), final


def ssd_step(x_t, dt_t, A, B_t, C_t, state, *, D=None, isolated_t=None):
    """One decoding step: x_t `[B, H, P]`, dt_t `[B, H]`, B_t, C_t `[B, G, N]`, state `[B, H, N, P]`,
    isolated_t `[B]` bool or None."""
    _check_ssd(x_t[:, None], dt_t[:, None], A, B_t[:, None], C_t[:, None], D, "ssd_step")
    dt32 = to_f32(dt_t)
    y, state = gated.gated_step("ssd_step", C_t, B_t, dt32[..., None] * to_f32(x_t), state,
                                g_t=dt32 * to_f32(A), per_channel=False, scale=1.0, isolated_t=isolated_t)
    return _skip(y, D, x_t, head_dim=True).astype(x_t.dtype), state
