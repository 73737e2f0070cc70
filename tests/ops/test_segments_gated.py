"""Packed documents (`segment_ids`) in the gated family: for linear_attention, gla, delta_rule,
gated_delta_rule, kda and ssd in the chunk form, reference and scan for gla, kda and ssd (one op of
each form: their segment handling is shared by all), and pallas in interpret mode for one delta and
one non-delta op, a packed row equals every document run on its own, in outputs, the last
document's final state and the gradients of every input (the initial state included: it belongs to
the document at token 0 only). Layouts are drawn by hypothesis (documents of length 1, starts on and
off the chunk boundaries, padding before, between and after documents), with isolated tokens in the
ops that take them and grouped value heads (HV = 2 H)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import ops
from tests.ops.segments import LAYOUT, LEADING_PADDING, as_mask, check_packed_equals_alone, packed_layouts

B, T, H, HV, K, V = 2, 10, 1, 2, 4, 3
CHUNK = 4
IMPLS = ("reference", "scan", "chunk")



def _qkv_options(name, per_token):
    """(q, k, v) and the keyword inputs of op `name` from its per-token tuple (q, k, v, extras...)."""
    q, k, v, *extra = per_token
    keys = {"linear_attention": (), "gla": ("g", "isolated"), "delta_rule": ("beta", "isolated"),
            "gated_delta_rule": ("g", "beta"), "kda": ("g", "beta", "isolated")}[name]
    options = dict(zip(keys, extra))
    if "isolated" in options:
        options["isolated"] = as_mask(options["isolated"])
    return (q, k, v), options


@functools.lru_cache(maxsize=None)
def gated_fn(name, impl, chunk_size=CHUNK):
    def fn(per_token, shared, state, segment_ids):
        (q, k, v), options = _qkv_options(name, per_token)
        return getattr(ops, name)(q, k, v, **options, initial_state=state, output_final_state=True,
                                  segment_ids=segment_ids, impl=impl, chunk_size=chunk_size)

    fn.__name__ = f"{name}/{impl}"
    return fn


@functools.lru_cache(maxsize=None)
def ssd_fn(impl):
    def fn(per_token, shared, state, segment_ids):
        x, dt, b, c, isolated = per_token
        a, d = shared
        return ops.ssd(x, dt, a, b, c, D=d, initial_state=state, output_final_state=True, isolated=as_mask(isolated),
                       segment_ids=segment_ids, impl=impl, chunk_size=CHUNK)

    fn.__name__ = f"ssd/{impl}"
    return fn


def _inputs(name, rng, k_dim=K, v_dim=V, time=T):
    """Per-token inputs of op `name` (numpy, float64): q, k (unit norm), v, then its extras."""
    normal = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    q, k, v = normal(B, time, H, k_dim), normal(B, time, H, k_dim), normal(B, time, HV, v_dim)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    gate = lambda *shape: -2.0 * np.logaddexp(0.0, normal(*shape))  # noqa: E731
    extras = {"g": gate(B, time, HV, k_dim) if name in ("gla", "kda") else gate(B, time, HV),
              "beta": 1.0 / (1.0 + np.exp(-normal(B, time, HV))),
              "isolated": (rng.random((B, time)) < 0.3).astype(np.float64)}
    _, options = _qkv_options(name, (q, k, v) + tuple(extras.values()))
    return (q, k, v) + tuple(extras[key] for key in ("g", "beta", "isolated") if key in options)


def _check(fns, alone, per_token, shared, state, layout):
    # All-zero tokens are identity steps (k = v = g = beta = 0; dt = 0): each document runs alone at the
    # start of a row of zeros, one compilation (tests/ops/segments.py).
    check_packed_equals_alone({fn.__name__: fn for fn in fns}, alone, per_token, shared, layout,
                              initial_state=state, zero_fill=True)


# reference and scan handle segments in code every op shares (the state reset before a start; the zero
# transition of the first-order scan or the delta pairs), so they run for one op of each form (gla,
# kda here, ssd below: per-channel and scalar non-delta, per-channel delta); the chunk form for all.
@pytest.mark.parametrize("name, impls", [("linear_attention", ("chunk",)), ("gla", IMPLS),
                                         ("delta_rule", ("chunk",)), ("gated_delta_rule", ("chunk",)),
                                         ("kda", IMPLS)])
@packed_layouts(B, T, 2, LAYOUT, LEADING_PADDING)
def test_gated_family_packed_equals_documents_alone(name, impls, layout):
    rng = np.random.default_rng(len(name))
    fns = [gated_fn(name, impl) for impl in impls]
    _check(fns, gated_fn(name, "reference"), _inputs(name, rng), (), rng.standard_normal((B, HV, K, V)), layout)


@packed_layouts(B, T, 2, LAYOUT, LEADING_PADDING)
def test_ssd_packed_equals_documents_alone_with_isolated_tokens(layout):
    rng = np.random.default_rng(7)
    n, p = K, V
    x, b, c = rng.standard_normal((B, T, HV, p)), rng.standard_normal((B, T, H, n)), rng.standard_normal((B, T, H, n))
    dt = np.logaddexp(0.0, rng.standard_normal((B, T, HV)))
    isolated = (rng.random((B, T)) < 0.3).astype(np.float64)
    shared = (-np.exp(rng.standard_normal(HV)), rng.standard_normal(HV))
    _check([ssd_fn(impl) for impl in IMPLS], ssd_fn("reference"), (x, dt, b, c, isolated), shared,
           rng.standard_normal((B, HV, n, p)), layout)


# Pallas (interpret): GPU-kernel shapes (K, V multiples of 16, chunks of 16). Documents of 1, 16 (from a
# chunk boundary to the next), 9 and 7 tokens, padding; row 1: a start mid-chunk, padding at the end.
PALLAS_T = 40
PALLAS_LAYOUT = np.array([[1] + [2] * 16 + [3] * 9 + [4] * 7 + [0] * 7,
                          [1] * 21 + [2] * 12 + [0] * 7], np.int32)


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule"])
def test_pallas_interpret_packed_equals_documents_alone(name):
    rng = np.random.default_rng(3)
    per_token = _inputs(name, rng, k_dim=16, v_dim=16, time=PALLAS_T)
    fn = gated_fn(name, "pallas", 16)
    _check([fn], gated_fn(name, "reference", 16), per_token, (), rng.standard_normal((B, HV, 16, 16)),
           PALLAS_LAYOUT)


@pytest.mark.parametrize("call, message", [
    (lambda ids: ops.gla(*(jnp.zeros((B, T, H, K)),) * 2, jnp.zeros((B, T, HV, V)), g=jnp.zeros((B, T, HV)),
                         segment_ids=ids[:, :4]),
     r"gla: segment_ids must have shape \[B, T\] \(int32, 1, 2, \.\.\. per document, 0 = padding\) "
     r"= \(2, 10\), got \(2, 4\)"),
    (lambda ids: ops.ssd(jnp.zeros((B, T, HV, V)), jnp.zeros((B, T, HV)), jnp.zeros(HV),
                         *(jnp.zeros((B, T, H, K)),) * 2, segment_ids=ids.astype(jnp.float32)),
     r"ssd: segment_ids must be an integer array of shape \[B, T\] = \(2, 10\) .* got dtype float32"),
])
def test_bad_segment_ids_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(jnp.asarray(LAYOUT))
