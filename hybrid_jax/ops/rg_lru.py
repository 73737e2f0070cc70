r"""RG-LRU: the real-gated linear recurrent unit of Griffin (De et al. 2024; RecurrentGemma).

Per channel, with the input gate `i_t` and the recurrence gate `r_t` (both in (0, 1): the layer
applies the sigmoid, as for `beta`), the decay parameter `a_param` (Lambda) and `c = 8`:

    log a_t = -c * r_t * softplus(Lambda)                 a_t = sigmoid(-Lambda) ** (c r_t), in (0, 1]
    h_t     = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
    y_t     = h_t

The sign of Lambda follows RecurrentGemma's `a_param` (the Griffin paper writes sigmoid(Lambda)^(c r),
i.e. its Lambda is `-a_param`). `sqrt(1 - a^2)` keeps `h` at the scale of its input whatever the
decay. `x`, `gate_x`, `gate_a` are `[B, T, *C]` (any channel shape: `[B, T, D]`, or `[B, T, H, P]`
for per-head channels), `a_param` is `C`, the state `[B, *C]`.

Computed stably in log space:

* `a` is never formed as a power: `log a` is the product above, and the scan runs on log decays
  (`first_order.linear_recurrence(log_a=True)`), so cumulative decays are sums.
* `1 - a^2 = -expm1(2 log a)`: no cancellation as `a -> 1` (weak decay, `r -> 0`).
* the derivative of the square root is unbounded at 0 (`a -> 1`); as in RecurrentGemma it is
  bounded by `SQRT_MAX_GRADIENT` (the value stays exact), which keeps bfloat16 training free of NaN.

Candidate isolation: with `isolated` `[B, T]` (bool), an isolated token reads
`a_t h_{t-1} + sqrt(1 - a_t^2) i_t x_t` but passes `h_{t-1}` on unchanged, so it never reaches another
token's output (docs/conventions.md); the step takes `isolated_t` `[B]`.

Packed documents (`segment_ids` `[B, T]`, docs/conventions.md): `h_{t-1}` is replaced by 0 at the first
token of every document after token 0, and padding tokens (id 0) are identity steps (their output is
the carried `h_{t-1}`), so `initial_state` reaches the row's first document only and the final state is
the last document's. The normalisation `sqrt(1 - a_t^2)` applies at every step, a document's first
token included: then a document gives the same outputs alone, packed, or continued from a prompt's
final state, whichever token it starts at. (RecurrentGemma instead skips the factor where its
`segment_pos == 0` resets `h`, making a document's first token a position-dependent special case.)

impl: "reference" (a lax.scan of the recurrence above, one token at a time), "scan" and "chunk"
(the gates turned into `(log a_t, sqrt(1 - a_t^2) i_t x_t)` pairs for `first_order.linear_recurrence`:
associative scan, two-level chunked scan; docs/chunked_algorithms.md). State in float32; `y` in the
dtype of `x` (the value input).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybrid_jax.ops import first_order, segments
from hybrid_jax.ops._common import (Impl, check_chunk_size, check_floating, check_isolated, check_rank,
                                    check_segment_ids, check_shape, check_time, resolve_impl, to_f32)

SUPPORTED = first_order.SUPPORTED
C_DEFAULT = 8.0  # Griffin's c: with r = 1, a = sigmoid(-Lambda) ** 8
SQRT_MAX_GRADIENT = 1000.0  # RecurrentGemma's bound on d sqrt(u) / du
_SQRT_FLOOR = 1.0 / (4.0 * SQRT_MAX_GRADIENT**2)  # 0.5 / sqrt(u) == SQRT_MAX_GRADIENT here


@jax.custom_jvp
def bounded_sqrt(u: jax.Array) -> jax.Array:
    """sqrt(u), with its derivative 0.5 / sqrt(u) capped at SQRT_MAX_GRADIENT (u -> 0)."""
    return jnp.sqrt(u)


@bounded_sqrt.defjvp
def _bounded_sqrt_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    return jnp.sqrt(u), du * 0.5 / jnp.sqrt(jnp.maximum(u, _SQRT_FLOOR))


def _check(op, x, gate_x, gate_a, a_param, c):
    """Shapes `[B, T, *C]` for x and both gates, `C` for a_param; returns the state shape `[B, *C]`."""
    if x.ndim < 3:
        raise ValueError(f"{op}: x must have shape [B, T, *C] (rank >= 3), got shape {tuple(x.shape)}")
    check_floating(f"{op}: x", x)
    check_shape(f"{op}: gate_x", gate_x, x.shape, "[B, T, *C] (same as x)")
    check_shape(f"{op}: gate_a", gate_a, x.shape, "[B, T, *C] (same as x)")
    check_shape(f"{op}: a_param", a_param, x.shape[2:], "C (the channel dims of x)")
    if not c > 0:
        raise ValueError(f"{op}: c must be > 0, got {c!r}")
    check_time(op, x.shape[1], x=x)
    return (x.shape[0],) + x.shape[2:]


def recurrence_inputs(x, gate_x, gate_a, a_param, *, c=C_DEFAULT):
    """(log a_t, sqrt(1 - a_t^2) i_t x_t) in float32: the decay and the write of every step."""
    log_a = -c * to_f32(gate_a) * jax.nn.softplus(to_f32(a_param))
    write = bounded_sqrt(-jnp.expm1(2.0 * log_a)) * to_f32(gate_x) * to_f32(x)
    return log_a, write


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _gates(x, gate_x, gate_a, a_param, c):
    """`recurrence_inputs` recomputed in the backward from the op's inputs instead of keeping its
    intermediates (softplus, the decays, the square root): each would be one more whole-sequence
    array written in the forward and read in the backward, which at T >= 4K run at memory speed."""
    return recurrence_inputs(x, gate_x, gate_a, a_param, c=c)


def _initial(initial_state, state_shape, op):
    check_shape(f"{op}: initial_state", initial_state, state_shape, "[B, *C]")
    return jnp.zeros(state_shape, jnp.float32) if initial_state is None else to_f32(initial_state)


def _advance(x_t, gate_x_t, gate_a_t, a_param, h, isolated_t, c, reset_t=None, padding_t=None):
    """(the token's output h_t, the state passed on): h_{t-1} is replaced by 0 where reset_t, the step
    is the identity where padding_t, and h_{t-1} is passed on where isolated_t (all `[B]` or None)."""
    per_row = lambda mask: mask.reshape(mask.shape + (1,) * (h.ndim - 1))  # noqa: E731
    if reset_t is not None:
        h = jnp.where(per_row(reset_t), 0.0, h)
    log_a, write = recurrence_inputs(x_t, gate_x_t, gate_a_t, a_param, c=c)
    stepped = jnp.exp(log_a) * h + write
    if padding_t is not None:
        stepped = jnp.where(per_row(padding_t), h, stepped)
    if isolated_t is None:
        return stepped, stepped
    return stepped, jnp.where(per_row(isolated_t), h, stepped)


def rg_lru_reference(x, gate_x, gate_a, a_param, h0, *, c=C_DEFAULT, isolated=None, segment_ids=None):
    """The recurrence one token at a time (lax.scan over axis 1), float32; returns (h, h_{T-1})."""

    def step(h, inputs):
        *token, isolated_t, reset_t, padding_t = inputs
        out, h = _advance(*token, a_param, h, isolated_t, c, reset_t, padding_t)
        return h, out

    resets = None if segment_ids is None else segments.reset_mask(segment_ids)
    padding = None if segment_ids is None else segment_ids == 0
    per_token = (x, gate_x, gate_a, isolated, resets, padding)
    final, hs = jax.lax.scan(step, h0, tuple(None if z is None else jnp.moveaxis(z, 1, 0) for z in per_token))
    return jnp.moveaxis(hs, 0, 1), final


def rg_lru(x, gate_x, gate_a, a_param, *, c=C_DEFAULT, initial_state=None, output_final_state=False,
           isolated=None, segment_ids=None, impl="chunk", chunk_size=64, context_axis=None):
    """RG-LRU over x `[B, T, *C]`. Returns (y `[B, T, *C]` in x's dtype, final state `[B, *C]` float32
    or None); `isolated` `[B, T]` bool or None, `segment_ids` `[B, T]` int or None (module docstring);
    `context_axis`: context parallelism (`first_order.linear_recurrence`; impl "scan" or "chunk")."""
    op = "rg_lru"
    choice = resolve_impl(impl, op, SUPPORTED)
    if context_axis is not None and choice is Impl.REFERENCE:
        raise ValueError(f"{op}: context_axis needs impl='chunk' or 'scan' (they run on "
                         "first_order.linear_recurrence, which splits the time axis); got impl='reference'")
    check_chunk_size(chunk_size, op)
    h0 = _initial(initial_state, _check(op, x, gate_x, gate_a, a_param, c), op)
    isolated = check_isolated(op, isolated, x.shape[:2])
    segment_ids = check_segment_ids(op, segment_ids, x.shape[:2])
    if choice is Impl.REFERENCE:
        h, final = rg_lru_reference(x, gate_x, gate_a, a_param, h0, c=c, isolated=isolated, segment_ids=segment_ids)
    else:
        log_a, write = _gates(x, gate_x, gate_a, a_param, c)
        h, final = first_order.linear_recurrence(log_a, write, initial_state=h0, log_a=True, isolated=isolated,
                                                 segment_ids=segment_ids, impl=impl, chunk_size=chunk_size,
                                                 context_axis=context_axis)
    return h.astype(x.dtype), (final if output_final_state else None)


def rg_lru_step(x_t, gate_x_t, gate_a_t, a_param, state, *, c=C_DEFAULT, isolated_t=None):
    """One decoding step: x_t, gate_x_t, gate_a_t `[B, *C]`, state `[B, *C]` -> (y_t in x_t's dtype,
    new state float32); rows where isolated_t `[B]` is True return `state` unchanged."""
    op = "rg_lru_step"
    state_shape = _check(op, x_t[:, None], gate_x_t[:, None], gate_a_t[:, None], a_param, c)
    check_rank(f"{op}: state", state, len(state_shape), "[B, *C]")
    check_shape(f"{op}: state", state, state_shape, "[B, *C]")
    isolated_t = check_isolated(op, isolated_t, x_t.shape[:1], name="isolated_t", layout="[B]")
    y_t, state = _advance(x_t, gate_x_t, gate_a_t, a_param, to_f32(state), isolated_t, c)
    return y_t.astype(x_t.dtype), state
