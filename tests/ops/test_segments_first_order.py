"""Packed documents (`segment_ids`) in the first-order recurrences: for linear_recurrence, rg_lru and
selective_scan, every impl (reference, scan, chunk), a packed row equals every document run on its
own, in outputs, the last document's final state and the gradients of every input (initial state
included: it belongs to the document at token 0 only; zero at padding), with isolated tokens
(selective_scan, rg_lru) as well. Layouts are drawn by hypothesis (documents of length 1, starts on
and off the chunk boundaries, padding before, between and after documents); bad segment_ids raise
one clear error."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import ops
from tests.ops.segments import LAYOUT, LEADING_PADDING, as_mask, check_packed_equals_alone, packed_layouts

B, T, C, N = 2, 10, 3, 2  # C channels (selective_scan: D = C), N = selective_scan's state size
CHUNK = 4
IMPLS = ("reference", "scan", "chunk")


def _isolated(rng):
    return (rng.random((B, T)) < 0.3).astype(np.float32)  # 0/1 floats: the harness slices inputs



@functools.lru_cache(maxsize=None)
def linear(impl):
    def fn(per_token, shared, h0, segment_ids):
        a, b = per_token
        return ops.linear_recurrence(a, b, initial_state=h0, log_a=True, segment_ids=segment_ids, impl=impl,
                                     chunk_size=CHUNK)

    return fn


@functools.lru_cache(maxsize=None)
def rg_lru(impl):
    def fn(per_token, shared, h0, segment_ids):
        *inputs, isolated = per_token
        return ops.rg_lru(*inputs, *shared, initial_state=h0, output_final_state=True, isolated=as_mask(isolated),
                          segment_ids=segment_ids, impl=impl, chunk_size=CHUNK)

    return fn


@functools.lru_cache(maxsize=None)
def selective(impl):
    def fn(per_token, shared, h0, segment_ids):
        u, dt, b, c, isolated = per_token
        a, d = shared
        return ops.selective_scan(u, dt, a, b, c, D=d, initial_state=h0, output_final_state=True,
                                  isolated=as_mask(isolated), segment_ids=segment_ids, impl=impl, chunk_size=CHUNK)

    return fn


def _check(make_fn, per_token, shared, initial_state, layout):
    # Zero tokens are identity steps of all three (log a = 0, b = 0; gate_a = 0; dt = 0): each document
    # runs alone at the start of a row of zeros, one compilation (tests/ops/segments.py).
    impls = {f"{make_fn.__name__}/{impl}": make_fn(impl) for impl in IMPLS}
    check_packed_equals_alone(impls, make_fn("reference"), per_token, shared, layout,
                              initial_state=initial_state, zero_fill=True)


@packed_layouts(B, T, 3, LAYOUT, LEADING_PADDING)
def test_linear_recurrence_packed_equals_documents_alone(layout):
    rng = np.random.default_rng(0)
    log_a = -np.logaddexp(0.0, rng.standard_normal((B, T, C)))  # -softplus: decays in (0, 1)
    _check(linear, (log_a, rng.standard_normal((B, T, C))), (), rng.standard_normal((B, C)), layout)


@packed_layouts(B, T, 3, LAYOUT, LEADING_PADDING)
def test_rg_lru_packed_equals_documents_alone_with_isolated_tokens(layout):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, C))
    gate_x, gate_a = (1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, C)))) for _ in range(2))
    shared = (rng.standard_normal(C),)
    _check(rg_lru, (x, gate_x, gate_a, _isolated(rng)), shared, rng.standard_normal((B, C)), layout)


@packed_layouts(B, T, 3, LAYOUT, LEADING_PADDING)
def test_selective_scan_packed_equals_documents_alone_with_isolated_tokens(layout):
    rng = np.random.default_rng(2)
    u, b, c = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, N)), rng.standard_normal((B, T, N))
    dt = np.logaddexp(0.0, rng.standard_normal((B, T, C)))
    shared = (-np.exp(rng.standard_normal((C, N))), rng.standard_normal(C))
    _check(selective, (u, dt, b, c, _isolated(rng)), shared, rng.standard_normal((B, C, N)), layout)


def test_isolated_document_start_still_resets_the_state():
    """An isolated first token of a document reads from the zero state and passes the zero state on,
    never the previous document's (linear_recurrence, every impl)."""
    a, b = jnp.full((1, 4, 1), -0.1), jnp.arange(1.0, 5.0).reshape(1, 4, 1)
    segment_ids, isolated = jnp.array([[1, 1, 2, 2]]), jnp.array([[False, False, True, False]])
    run_all = jax.jit(lambda *x: [ops.linear_recurrence(*x[:2], log_a=True, isolated=x[2], segment_ids=x[3],
                                                        impl=impl, chunk_size=CHUNK) for impl in IMPLS])
    for h, final in run_all(a, b, isolated, segment_ids):
        np.testing.assert_allclose(np.asarray(h)[0, :, 0], [1.0, np.exp(-0.1) + 2.0, 3.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(final)[0, 0], 4.0, rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda ids: ops.linear_recurrence(jnp.zeros((B, T, C)), jnp.zeros((B, T, C)), segment_ids=ids[:, :4]),
     r"linear_recurrence: segment_ids must have shape \[B, T\] \(int32, 1, 2, \.\.\. per document, 0 = padding\) "
     r"= \(2, 10\), got \(2, 4\)"),
    (lambda ids: ops.rg_lru(*(jnp.zeros((B, T, C)),) * 3, jnp.zeros(C), segment_ids=ids.astype(jnp.float32)),
     r"rg_lru: segment_ids must be an integer array of shape \[B, T\] = \(2, 10\) .* got dtype float32"),
    (lambda ids: ops.selective_scan(jnp.zeros((B, T, C)), jnp.zeros((B, T, C)), jnp.zeros((C, N)),
                                    jnp.zeros((B, T, N)), jnp.zeros((B, T, N)), segment_ids=ids[None]),
     r"selective_scan: segment_ids must have shape \[B, T\] .* = \(2, 10\), got \(1, 2, 10\)"),
])
def test_bad_segment_ids_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(jnp.asarray(LAYOUT))
