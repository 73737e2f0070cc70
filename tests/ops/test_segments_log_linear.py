"""Packed documents (`segment_ids`) in log-linear attention: the Fenwick levels restart with every
document and follow the position within it. With the KDA transition, impls reference and scan, a
packed row equals every document run on its own from position 0 (outputs, the last document's final
levels, gradients; the initial levels belong to the document at token 0 only). With the gated
(Mamba-2) transition, the document at token 0 continues an initial state at position P > 0, the
final position is per row, and impl="chunk" falls back to the reference with a warning."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

from hybrid_jax import ops
from hybrid_jax.ops.log_linear import FenwickState, num_levels
from tests.ops.mixers import assert_close
from tests.ops.segments import check_packed_equals_alone, document_spans, packed_segment_ids

B, T, H, HV, K, V = 2, 8, 1, 2, 4, 3
L = num_levels(T) + 1  # one level more than T tokens need: a start position P > 0 fits too
CHUNK = 4
LAYOUT = np.array([[1, 1, 1, 2, 2, 2, 2, 0],  # 3 tokens then 4 (a start off the level-2 block edge)
                   [0, 1, 2, 2, 2, 2, 2, 2]], np.int32)  # padding first, a document of 1 token, then 6
FALLBACK = "log_linear_attention: impl='chunk' with segment_ids falls back to impl='reference'"


def _inputs(per_channel, delta, rng):
    normal = rng.standard_normal
    q, k, v = normal((B, T, H, K)), normal((B, T, H, K)), normal((B, T, HV, V))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    g = -np.logaddexp(0.0, normal((B, T, HV) + ((K,) if per_channel else ())))
    lam = np.exp(0.3 * normal((B, T, HV, L)))
    isolated = (rng.random((B, T)) < 0.3).astype(np.float64)
    return (q, k, v, g, lam, isolated) + ((1.0 / (1.0 + np.exp(-normal((B, T, HV)))),) if delta else ())


def _run(per_token, state, segment_ids, impl):
    q, k, v, g, lam, isolated, *beta = per_token
    return ops.log_linear_attention(q, k, v, g=g, level_scales=lam, beta=beta[0] if beta else None,
                                    initial_state=state, output_final_state=True, isolated=isolated > 0.5,
                                    segment_ids=segment_ids, impl=impl, chunk_size=CHUNK)


@functools.lru_cache(maxsize=None)
def levels_fn(impl):
    """The op as the harness wants it: initial levels at position 0 in, (o, final levels) out."""
    def fn(per_token, shared, levels, segment_ids):
        o, final = _run(per_token, FenwickState(levels, jnp.zeros((), jnp.int32)), segment_ids, impl)
        return o, final.levels

    fn.__name__ = f"log_linear/{impl}"
    return fn


# Every document length compiles the per-document run once (a trailing zero token would still merge
# the levels, so documents cannot run inside a zero-filled row): one drawn layout besides LAYOUT.
@settings(max_examples=1, deadline=None)
@given(layout=packed_segment_ids(B, T))
@example(layout=LAYOUT)
def test_log_linear_kda_packed_equals_documents_alone(layout):
    rng = np.random.default_rng(1)
    fns = {f"log_linear/{impl}": levels_fn(impl) for impl in ("reference", "scan")}
    check_packed_equals_alone(fns, levels_fn("reference"), _inputs(True, True, rng), (), layout,
                              initial_state=rng.standard_normal((B, HV, L, K, V)))


def test_log_linear_continued_state_final_position_and_chunk_fallback():
    """The document at token 0 continues an initial state at position P = 5 (its levels follow P + t);
    later documents start at position 0; the final position is per row, after the last real token;
    impl="chunk" warns and returns the reference's result."""
    rng = np.random.default_rng(5)
    per_token = tuple(jnp.asarray(x, jnp.float32) for x in _inputs(False, False, rng))
    state = FenwickState(jnp.asarray(rng.standard_normal((B, HV, L, K, V)), jnp.float32), jnp.int32(5))
    packed = {impl: jax.jit(functools.partial(_run, impl=impl))(per_token, state, jnp.asarray(LAYOUT))
              for impl in ("reference", "scan")}
    with pytest.warns(UserWarning, match=FALLBACK + r" \(exact, one token at a time\): the chunked form aligns"):
        packed["chunk"] = jax.jit(functools.partial(_run, impl="chunk"))(per_token, state, jnp.asarray(LAYOUT))
    alone = jax.jit(functools.partial(_run, segment_ids=None, impl="reference"))
    for b, row in enumerate(LAYOUT):
        expected_o = np.zeros((T, HV, V))
        for start, stop in document_spans(row):
            first = start == 0
            o, final = alone(tuple(x[b:b + 1, start:stop] for x in per_token),
                             FenwickState(state.levels[b:b + 1] * first, jnp.int32(5 if first else 0)))
            expected_o[start:stop] = np.asarray(o[0])
        real = row != 0
        for impl, (o, packed_state) in packed.items():
            assert_close(np.asarray(o)[b, real], expected_o[real], 2e-5, f"{impl} outputs row {b}")
            assert_close(packed_state.levels[b], final.levels[0], 2e-5, f"{impl} final levels row {b}")
            assert int(packed_state.position[b]) == int(final.position), (impl, b, packed_state.position)
