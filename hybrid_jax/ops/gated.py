r"""The gated linear-recurrence family: one machinery behind linear attention, GLA, SSD and the delta rule.

Per head, with q already multiplied by `scale`, state S in R^{K x V}, o_t = S_t^T q_t:

    non-delta (linear attention, GLA, SSD):  S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T
    delta (DeltaNet, Gated DeltaNet, KDA):   S_t = (I - b_t k_t k_t^T) Diag(exp g_t) S_{t-1} + b_t k_t v_t^T

g is a natural-log decay (g <= 0), either per channel `[..., K]` or one scalar per head `[..., 1]`
broadcast over K; `g=None` means no decay; `beta=None` selects the non-delta form.

Layout inside this module: q, k `[B, T, H, K]`, v `[B, T, H, V]` with the grouped heads already
expanded (the public ops do that), g `[B, T, H, K or 1]`, beta `[B, T, H]`, state `[B, H, K, V]`, all
float32. Algorithms (docs/chunked_algorithms.md gives the derivations):

* `recurrence_reference`: lax.scan of the recurrence, one token at a time.
* `recurrence_scan`: jax.lax.associative_scan. Delta form: pairs (M_t, X_t) with
  M_t = (I - b_t k_t k_t^T) Diag(exp g_t), X_t = b_t k_t v_t^T, combined as (M2 M1, M2 X1 + X2),
  O(T log T K^3). Non-delta form: the elementwise first-order scan of `first_order.py` on K x V states.
* `recurrence_chunk`: chunks of C positions. Per chunk, with G the in-chunk cumulative log decay and
  Gam = exp(G):  Aqk[i, m] = sum_c q_i k_m exp(G_i - G_m) (m <= i), the same Akk for k with k,
  Tm = (I + Diag(beta) StrictLower(Akk))^{-1} Diag(beta), W = Tm (K * Gam), Ubar = Tm V (delta) or
  W = 0, Ubar = V (non-delta). Across chunks, with S_0 the state entering the chunk:
      U = Ubar - W S_0,   O = (Q * Gam) S_0 + Tril(Aqk) U,
      S_C = Diag(Gam_C) S_0 + (K * exp(G_C - G))^T U.
  Only relative decays exp(G_i - G_m), i >= m, are ever formed, so g = -20 per step stays finite.
  Per-channel decays use sub-chunks: an off-diagonal block (query sub-chunk a, earlier keys) is one
  matmul through the reference position r = start of a, exp(G_i - G_m) = exp(G_i - G_r) exp(G_r - G_m),
  both factors <= 1; diagonal blocks are explicit s x s x K products. A sequence shorter than the
  chunk is one chunk, padded to whole sub-chunks under a per-channel decay
  (`pallas_kernels.chunk_math.chunk_length`).

Isolated tokens (`isolated` `[B, T]`, candidate isolation, docs/conventions.md) read one step from
S_{t-1} and pass S_{t-1} on: the reference keeps the old state at them, the associative scans put the
identity element there and form the isolated reads from the carried states afterwards, and the
chunked form makes them identity steps of every other row's terms with their own read on the
diagonal (`pallas_kernels.chunk_math.isolate`).

Packed documents (`segment_ids` `[B, T]`, docs/conventions.md "Packed documents"): `gated_op` makes
padding tokens identity steps (k = v = g = beta = 0; a start token's g acts on the zero state, so it is
zeroed too) and the algorithms restart the state at `segments.reset_mask`: the reference zeroes the
state before such a token, the associative scans put a zero transition there, and the chunked form
masks the chunk terms by the runs between resets (`pallas_kernels.chunk_math.document_runs`), so the
state pass, its custom VJP and the kernels run unchanged and a boundary may fall anywhere in a chunk.

The chunk algebra itself (`ChunkTerms`, cutting time into chunks, the decayed products, the WY
transform) lives in `pallas_kernels.chunk_math`, shared with the kernels, which may not import this
package. Outputs come back in v's dtype (the rule of `hybrid_jax.ops`).
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from hybrid_jax.ops import context, first_order, segments
from hybrid_jax.ops._common import (
    Impl,
    check_chunk_size,
    check_gate,
    check_isolated,
    check_segment_ids,
    check_shape,
    prepare_qkv,
    resolve_impl,
    to_f32,
)
from pallas_kernels import chunk_math, recurrence
from pallas_kernels.chunk_math import ChunkTerms, KernelConfig, from_chunks, to_chunks

__all__ = ["SUPPORTED", "ChunkTerms", "chunk_inputs", "chunk_terms", "gated_op", "gated_step",
           "head_resets", "per_head", "recurrence_chunk", "recurrence_reference", "recurrence_scan",
           "recurrence_step", "segment_inputs"]


def _decay(g_t: jax.Array | None, k_dim: int) -> jax.Array | None:
    return None if g_t is None else jnp.exp(jnp.broadcast_to(g_t, g_t.shape[:-1] + (k_dim,)))


def recurrence_step(q_t, k_t, v_t, g_t, beta_t, state, iso_t=None):
    """One token: q_t, k_t `[B, H, K]`, v_t `[B, H, V]`, g_t `[B, H, K or 1]` or None, beta_t `[B, H]`
    or None, state `[B, H, K, V]`, iso_t `[B, H]` bool or None. Returns (o_t `[B, H, V]`, new state);
    an isolated token reads the stepped state and passes `state` on unchanged."""
    carried = state
    decay = _decay(g_t, k_t.shape[-1])
    if decay is not None:
        state = decay[..., None] * state
    if beta_t is None:
        write = v_t
    else:  # delta rule: write the correction towards v_t of what the decayed state recalls for k_t
        recalled = jnp.einsum("bhk,bhkv->bhv", k_t, state)
        write = beta_t[..., None] * (v_t - recalled)
    state = state + k_t[..., :, None] * write[..., None, :]
    o_t = jnp.einsum("bhk,bhkv->bhv", q_t, state)
    return o_t, (state if iso_t is None else jnp.where(iso_t[..., None, None], carried, state))


def recurrence_reference(q, k, v, g, beta, state, iso=None, segment_ids=None):
    """The exact recurrence, token by token (lax.scan over T); the state restarts from zero before each
    `segments.reset_mask` token of `segment_ids` `[B, T]` (padding: identity steps already, see
    `segment_inputs`). Returns (o `[B,T,H,V]`, final state)."""
    time_major = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731
    resets = None if segment_ids is None else segments.reset_mask(segment_ids)

    def step(s, inputs):
        q_t, k_t, v_t, g_t, beta_t, iso_t, reset_t = inputs
        if reset_t is not None:
            s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        o_t, s = recurrence_step(q_t, k_t, v_t, g_t, beta_t, s, iso_t)
        return s, o_t

    final, o = jax.lax.scan(step, state, tuple(map(time_major, (q, k, v, g, beta, iso, resets))))
    return jnp.moveaxis(o, 0, 1), final


def recurrence_scan(q, k, v, g, beta, state, iso=None, segment_ids=None):
    """jax.lax.associative_scan over the recurrence (materialises every state: a check, not a fast path).

    Isolated tokens enter the scan as identity elements (I, 0); each then reads M_t S_{t-1} + X_t.
    A document start (`segments.reset_mask` of `segment_ids`) has M_t = 0, isolated or not."""
    k_dim = k.shape[-1]
    decay = _decay(g, k_dim)
    if beta is None:
        a = jnp.ones(k.shape + (1,), k.dtype) if decay is None else decay[..., None]
        x = k[..., :, None] * v[..., None, :]
        states, final = first_order.linear_recurrence(
            jnp.broadcast_to(a, x.shape), x, initial_state=state, impl=Impl.SCAN, isolated=iso,
            segment_ids=segment_ids,
        )
        return jnp.einsum("bthk,bthkv->bthv", q, states), final
    eye = jnp.eye(k_dim, dtype=k.dtype)
    householder = eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]
    m_read = householder if decay is None else householder * decay[..., None, :]
    x_read = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    reset = None if segment_ids is None else segments.reset_mask(segment_ids)[:, :, None, None, None]
    if reset is not None:
        m_read = jnp.where(reset, 0.0, m_read)
    m, x = m_read, x_read
    if iso is not None:
        m, x = jnp.where(iso[..., None, None], eye, m), jnp.where(iso[..., None, None], 0.0, x)
        if reset is not None:  # an isolated start passes the zero state on
            m = jnp.where(reset, 0.0, m)
    x = x.at[:, 0].add(jnp.einsum("bhij,bhjv->bhiv", m[:, 0], state))

    def combine(left, right):
        m1, x1 = left
        m2, x2 = right
        return m2 @ m1, m2 @ x1 + x2

    _, states = jax.lax.associative_scan(combine, (m, x), axis=1)
    final = states[:, -1]
    if iso is not None:  # isolated: one step from the carried state before them
        before = jnp.concatenate([state[:, None], states[:, :-1]], axis=1)
        read = jnp.einsum("bthij,bthjv->bthiv", m_read, before) + x_read
        states = jnp.where(iso[..., None, None], read, states)
    return jnp.einsum("bthk,bthkv->bthv", q, states), final


# ----------------------------------------------------------------------------- chunked form


def chunk_terms(q, k, v, g, beta, chunk_size, iso=None, resets=None, **options) -> ChunkTerms:
    """Cuts `[B, T, H, .]` inputs into chunks (padding with identity steps) and forms each chunk's
    terms, `[B, H, N, C, .]`; `iso` `[B, T, H]` bool marks the isolated tokens (`chunk_math.isolate`),
    `resets` `[B, T, H]` bool those before which the state restarts (`chunk_math.document_runs`);
    `options`: safe_gate and precision of `chunk_math.chunk_terms`."""
    return chunk_math.chunk_terms(*chunk_inputs(q, k, v, g, beta, iso, resets, chunk_size), **options)


def chunk_inputs(q, k, v, g, beta, iso, resets, chunk, heads_first=True):
    """The inputs tuple of `recurrence.chunked_recurrence` (`chunk_math.chunk_terms`' positional
    arguments, trailing Nones dropped), cut into chunks of `chunk` (`to_chunks`: `[B, H, N, C, .]`,
    or `[B, N, C, H, .]` when not `heads_first`); masks become 0/1 floats."""
    chunked = lambda x: None if x is None else to_chunks(x, chunk, heads_first)  # noqa: E731
    masks = tuple(None if x is None else x.astype(q.dtype) for x in (iso, resets))
    inputs = tuple(map(chunked, (q, k, v, g, beta) + masks))
    while inputs[-1] is None:
        inputs = inputs[:-1]
    return inputs


def recurrence_chunk(q, k, v, g, beta, state, iso=None, segment_ids=None, *, chunk_size, safe_gate=False,
                     precision="highest", context_axis=None):
    """The chunked form (see the module docstring) behind `recurrence.chunked_recurrence`: a recomputing
    backward, and both passes blocked over cache-sized groups of chunks. Returns (o `[B,T,H,V]`, final
    state).

    With `context_axis` (inside `jax.shard_map`, T this shard's slice): the shard's terms give its
    final state from zero and its transition (`recurrence.shard_summary`), `context.entering_states`
    folds those of the shards before it into the state entering it, and the chunked form runs from
    that state; the final state returned is the whole row's."""
    t, k_dim, v_dim = q.shape[1], k.shape[-1], v.shape[-1]
    per_channel = g is not None and g.shape[-1] != 1
    chunk = chunk_math.chunk_length(t, chunk_size, per_channel=per_channel)
    if g is None:
        g = jnp.zeros(k.shape[:-1] + (1,), k.dtype)
        if context_axis is not None:  # typed per shard like the other inputs, as the custom VJP requires
            g = context.varying(g, context_axis)
    resets = head_resets(segment_ids, v.shape[2], context_axis)
    # Unsplit, the inputs keep the token layout (time-major chunks, no transposes); the
    # context-parallel path keeps heads first, the layout its shard summary and state folding use.
    time_major = context_axis is None
    inputs = chunk_inputs(q, k, v, g, beta, iso, resets, chunk, heads_first=not time_major)
    n_chunks, lead = inputs[0].shape[1 if time_major else 2], q.shape[0] * q.shape[2]
    block = recurrence.block_chunks(n_chunks, chunk, k_dim, v_dim, lead, per_channel)
    config = KernelConfig(chunk, "xla", False, 0, safe_gate, precision, block, time_major)
    if time_major:
        o, final = recurrence.chunked_recurrence(config, inputs, state)
        return from_chunks(o, t, heads_first=False), final
    zero, identity = context.varying((jnp.zeros_like(state), recurrence.identity_transition(inputs, state)),
                                     context_axis)
    local_final, transition = recurrence.shard_summary(config, inputs, zero, identity)
    entering, final = context.entering_states(transition, local_final, state, context_axis)
    o, _ = recurrence.chunked_recurrence(config, inputs, entering)
    return from_chunks(o, t), final


# ----------------------------------------------------------------------------- the public entry: front end, then dispatch

SUPPORTED = (Impl.REFERENCE, Impl.SCAN, Impl.CHUNK, Impl.PALLAS, Impl.AUTO)
CHUNK_SIZE = 64  # the chunk length the GPU kernels were measured at (README), and the default elsewhere
# The delta rule family's default on CPU: forward + backward at T = 4096 (B=1, H=4, K=V=64, one core)
# Gated DeltaNet 57 against 68 ms at 64, DeltaNet 55 against 68, KDA 106 against 119, safe-gate KDA 71
# against 84 (smaller in-chunk products and WY inverses, still 32-row matmuls); GLA was 3% slower at 32.
CPU_DELTA_CHUNK_SIZE = 32


def default_chunk_size(chunk_size: int | None, delta: bool) -> int:
    """`chunk_size`, or for None this platform's default: CPU_DELTA_CHUNK_SIZE for the delta rule family
    on CPU, else CHUNK_SIZE."""
    if chunk_size is not None:
        return chunk_size
    return CPU_DELTA_CHUNK_SIZE if delta and jax.default_backend() == "cpu" else CHUNK_SIZE


def _pallas_or_chunk(op, args, chunk_size):
    """impl="auto": the kernel on a GPU that supports these shapes, else the chunked form.

    On CPU the kernels would only run in interpret mode (a correctness tool, far slower than XLA),
    so "auto" means "chunk" there without a warning; on a GPU a refused shape warns once. On a TPU
    "auto" also means "chunk": the TPU kernel has passed its interpret-mode tests but has not been
    compiled on a TPU yet (impl="pallas" runs it). The GPU kernels were checked against the token
    recurrence on an H200 and run the delta rule 4-6x faster than the chunked form there
    (experiments/bench/gpu_check.py).
    """
    if jax.default_backend() != "gpu":
        return Impl.CHUNK
    from pallas_kernels import api  # the kernels load only where they may run

    ok, reason = api.supports(*args, chunk_size=chunk_size)
    if not ok:
        warnings.warn(f"{op}: impl='auto' falls back to 'chunk': {reason}", stacklevel=3)
        return Impl.CHUNK
    return Impl.PALLAS


def _context_parallel_impl(op, choice):
    """The impl under context parallelism: the chunked form (its state pass is what shards exchange)."""
    if choice not in (Impl.CHUNK, Impl.AUTO):
        raise ValueError(f"{op}: context_axis needs impl='chunk' (or 'auto', which runs it); got "
                         f"impl={choice.value!r}: the reference, scan and Pallas forms do not split the time axis")
    return Impl.CHUNK


def per_head(isolated, value_heads):
    """`[B, T]` (or `[B]`) mask -> `[B, T, HV]` (`[B, HV]`), the layout of beta."""
    return None if isolated is None else jnp.broadcast_to(isolated[..., None], isolated.shape + (value_heads,))


def document_resets(segment_ids, context_axis=None):
    """`[B, T]` bool: where the state restarts (`segments.reset_mask`; across the shards of
    `context_axis` under context parallelism, `context.shard_resets`), or None without segment ids."""
    if segment_ids is None:
        return None
    return segments.reset_mask(segment_ids) if context_axis is None else context.shard_resets(segment_ids, context_axis)


def head_resets(segment_ids, value_heads, context_axis=None):
    """`[B, T, HV]` bool: `document_resets` per value head, or None without segment ids."""
    return per_head(document_resets(segment_ids, context_axis), value_heads)


def segment_inputs(k, v, g, beta, segment_ids, context_axis=None):
    """Padding tokens (id 0) as identity steps, k = v = g = beta = 0, and g = 0 at the document starts
    (`segments.reset_mask`), whose decay acts on the zero state: the same result, and a gradient of
    exactly zero there in every algorithm. k, v, g, beta `[B, T, ...]`; None passes through;
    `context_axis`: the starts across shards (`document_resets`)."""
    if segment_ids is None:
        return k, v, g, beta
    padding, start = segment_ids == 0, document_resets(segment_ids, context_axis)
    zero_at = lambda mask, x: None if x is None else jnp.where(  # noqa: E731
        mask.reshape(mask.shape + (1,) * (x.ndim - 2)), 0.0, x)
    return zero_at(padding, k), zero_at(padding, v), zero_at(padding | start, g), zero_at(padding, beta)


def check_safe_gate(op, safe_gate, lower_bound, g, per_channel):
    """The safe-gate promise checked (a per-channel gate, a bound in [-5, 0)); returns g clamped at the
    bound, so a gate below it cannot overflow the matmul form, or g unchanged without the promise."""
    if not safe_gate:
        return g
    if g is None or per_channel is False or g.shape[-1] == 1:
        raise ValueError(f"{op}: safe_gate=True needs a per-channel gate g [B, T, HV, K] (it makes the "
                         "in-chunk diagonal blocks of per-channel decays matmuls); got a scalar or no gate")
    if not isinstance(lower_bound, (int, float)) or not chunk_math.MIN_LOWER_BOUND <= lower_bound < 0:
        raise ValueError(f"{op}: lower_bound must be a float in [{chunk_math.MIN_LOWER_BOUND}, 0), "
                         f"got {lower_bound!r}")
    return jnp.where(g < lower_bound, lower_bound, g)  # at the bound itself the gradient passes whole


def gated_op(op, q, k, v, *, g, beta, scale, initial_state, output_final_state, impl, chunk_size,
             per_channel=None, isolated=None, segment_ids=None, safe_gate=False,
             lower_bound=chunk_math.MIN_LOWER_BOUND, precision=None, context_axis=None):
    """Runs one of the family's algorithms on the public inputs, after the front end.

    q, k `[B, T, H, K]`; v `[B, T, HV, V]`; g `[B, T, HV]` or `[B, T, HV, K]` (`per_channel`: False,
    True, or None for either) or None; beta `[B, T, HV]` or None; isolated `[B, T]` bool or None
    (tokens that read and do not write, docs/conventions.md); segment_ids `[B, T]` int or None (packed
    documents: the state restarts at each document, padding tokens are identity steps, the final state
    is the last document's; docs/conventions.md); safe_gate / lower_bound: the promise
    g >= lower_bound (clamped there, `check_safe_gate`); precision: the matmul precision of the chunk
    and Pallas forms (`chunk_math.PRECISIONS`, None for the platform default); chunk_size: an int,
    or None for the platform default (`default_chunk_size`); context_axis: the
    time axis is split over this manual mesh axis (`hybrid_jax.ops.context`; the chunked form only).
    Returns (o `[B, T, HV, V]` in v's dtype, final state `[B, HV, K, V]` float32 or None).
    """
    q32, k32, v32, dims = prepare_qkv(op, q, k, v, scale=scale)
    g = None if g is None else check_gate(op, g, dims, per_channel=per_channel)
    g = check_safe_gate(op, safe_gate, lower_bound, g, per_channel)
    choice = resolve_impl(impl, op, SUPPORTED)
    chunk_size = default_chunk_size(chunk_size, beta is not None)
    check_chunk_size(chunk_size, op, 1, 1024)
    precision = chunk_math.resolve_precision(precision, op)
    b, _, _, k_dim, hv, v_dim = dims
    check_shape(f"{op}: beta", beta, (b, dims.time, hv), "[B, T, HV]")
    check_shape(f"{op}: initial_state", initial_state, (b, hv, k_dim, v_dim), "[B, HV, K, V]")
    iso = per_head(check_isolated(op, isolated, (b, dims.time)), hv)
    segment_ids = check_segment_ids(op, segment_ids, (b, dims.time))
    state = jnp.zeros((b, hv, k_dim, v_dim), jnp.float32) if initial_state is None else to_f32(initial_state)
    k32, v32, g, beta = segment_inputs(k32, v32, to_f32(g), to_f32(beta), segment_ids, context_axis)
    args = (q32, k32, v32, g, beta, state)
    options = {"safe_gate": safe_gate, "precision": precision}
    if context_axis is not None:
        choice = _context_parallel_impl(op, choice)
        options["context_axis"] = context_axis
    if choice is Impl.AUTO:
        choice = _pallas_or_chunk(op, args, chunk_size)
    if choice is Impl.REFERENCE:
        o, final = recurrence_reference(*args, iso, segment_ids)
    elif choice is Impl.SCAN:
        o, final = recurrence_scan(*args, iso, segment_ids)
    elif choice is Impl.CHUNK:
        o, final = recurrence_chunk(*args, iso, segment_ids, chunk_size=chunk_size, **options)
    else:
        from pallas_kernels import api  # loads the Triton / Mosaic kernels: only when they run

        o, final = api.gated_recurrence(*args, chunk_size=chunk_size, isolated=iso,
                                        resets=head_resets(segment_ids, hv), **options)
    return o.astype(v.dtype), (final if output_final_state else None)


def gated_step(op, q_t, k_t, v_t, state, *, g_t=None, beta_t=None, scale=None, per_channel=None,
               isolated_t=None):
    """Public one-token step: q_t, k_t `[B, H, K]`, v_t `[B, HV, V]`, state `[B, HV, K, V]`,
    g_t `[B, HV]` or `[B, HV, K]` (`per_channel` as in `gated_op`) or None, beta_t `[B, HV]` or None,
    isolated_t `[B]` bool or None (an isolated token returns `state` unchanged).
    Returns (o_t in v_t's dtype, new state float32)."""
    q32, k32, v32, dims = prepare_qkv(op, q_t, k_t, v_t, scale=scale, step=True)
    if g_t is not None:
        g_t = check_gate(op, g_t[:, None], dims, per_channel=per_channel)[:, 0]
    b, _, _, k_dim, hv, v_dim = dims
    check_shape(f"{op}: state", state, (b, hv, k_dim, v_dim), "[B, HV, K, V]")
    check_shape(f"{op}: beta_t", beta_t, (b, hv), "[B, HV]")
    iso_t = check_isolated(op, isolated_t, (b,), name="isolated_t", layout="[B]")
    o_t, state = recurrence_step(q32, k32, v32, to_f32(g_t), to_f32(beta_t), to_f32(state),
                                 per_head(iso_t, hv))
    return o_t.astype(v_t.dtype), state
