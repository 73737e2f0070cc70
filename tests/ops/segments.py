"""Packed-document test harness: segment-id layouts drawn by hypothesis, and the expected result of a
packed row built by running every document on its own.

An op under test is wrapped as `fn(per_token, shared, initial_state, segment_ids) -> (out, final)`:
`per_token` a tuple of `[B, T, ...]` arrays (sliced per document), `shared` a tuple of arrays every
document uses whole (A, D, a_param, ...), `initial_state` `[B, ...]` or None, `final` None for ops
without a state. `run_documents_alone` calls `fn` once per document (`[1, L, ...]` slices,
segment_ids=None, the initial state for a document at token 0 only, zeros otherwise) and assembles
outputs, the last document's final state and the gradients of
`sum(out * cot_out) + sum(final * cot_final)` (cot_out zero at padding) with respect to every input;
`check_packed_equals_alone` runs `fn` on the packed row and compares all of it.

Per-document calls are jitted per length, so a fixed T bounds the compilations however many layouts
are drawn. With `zero_fill=True` every document runs instead at the start of a row of all T tokens
whose other tokens are zeros, one compilation in all: exact for causal ops (a token never sees later
ones) whose all-zero token is an identity step (zero k, v, gate and beta; log a = 0, b = 0; dt = 0;
RG-LRU gate_a = 0), so that the final state is still the document's. Not for bidirectional
attention, nor for ops whose state depends on the position (the log-linear levels).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import example, given, settings, strategies as st

from tests.ops.mixers import assert_close

# Fixed [2, 10] layouts every packed-op test file starts from. Row 0: documents of 4 tokens (one chunk /
# key block of 4), 1 (starting on a block boundary) and 3, then padding; row 1: 1 and 7 tokens
# (crossing two block boundaries), a padding gap, then the id before the gap again (a new document).
LAYOUT = np.array([[1, 1, 1, 1, 2, 3, 3, 3, 0, 0],
                   [1, 2, 2, 2, 2, 2, 2, 2, 0, 2]], np.int32)
# Row 0 starts with padding: the initial state reaches no document; row 1 is one document.
LEADING_PADDING = np.array([[0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [1] * 10], np.int32)


def packed_layouts(batch: int, time: int, max_examples: int, *examples):
    """The decorators of a packed-layout test: `layout` drawn by `packed_segment_ids` (`max_examples`
    of them, no deadline: each draw may compile) plus the fixed `examples`."""
    def decorate(test):
        for layout in reversed(examples):
            test = example(layout=layout)(test)
        return settings(max_examples=max_examples, deadline=None)(given(layout=packed_segment_ids(batch, time))(test))
    return decorate


def as_mask(flag):
    """A 0/1 float input sliced by the harness (so it can take gradients) as the bool mask the ops take."""
    return None if flag is None else flag > 0.5


def document_spans(row) -> list[tuple[int, int]]:
    """(start, stop) of each document of one row of segment ids: maximal runs of one non-zero id."""
    row = np.asarray(row)
    spans, start = [], None
    for t, value in enumerate(row):
        if start is not None and value != row[start]:
            spans.append((start, t))
            start = None
        if start is None and value != 0:
            start = t
    if start is not None:
        spans.append((start, len(row)))
    return spans


@st.composite
def packed_segment_ids(draw, batch: int, time: int, *, gaps: bool = True):
    """`[batch, time]` int32 ids: documents 1, 2, ... of drawn lengths (1 included), padding (0) at the
    end of a row and, with `gaps`, before the first document and between documents, where a document
    may even reuse the id of the one before the gap (runs, not id values, make documents)."""
    rows = []
    for _ in range(batch):
        end = time - draw(st.integers(0, time // 3))
        ids, next_id = [0] * (draw(st.integers(0, 1)) if gaps else 0), 1
        while len(ids) < end:
            length = draw(st.integers(1, end - len(ids)))
            reuse = gaps and next_id > 1 and ids[-1] == 0 and draw(st.booleans())
            ids += [next_id - 1 if reuse else next_id] * length
            next_id += 0 if reuse else 1
            if gaps and len(ids) < end:
                ids += [0] * draw(st.integers(0, min(2, end - len(ids))))
        rows.append(ids + [0] * (time - len(ids)))
    return np.asarray(rows, np.int32)


@dataclasses.dataclass
class Expected:
    out: np.ndarray  # [B, T, ...], zeros at padding
    final: np.ndarray | None  # [B, ...]: the last document's final state (the initial one without documents)
    grads: tuple  # (per_token grads [B, T, ...] zero at padding, shared grads, initial-state grad or None)


@functools.lru_cache(maxsize=None)
def _program(fn):
    """fn's outputs and the gradients of <outputs, cotangents> w.r.t. its inputs, jitted (per shape)."""

    def run(per_token, shared, initial_state, segment_ids, cot_out, cot_final):
        def forward(per_token, shared, initial_state):
            return fn(per_token, shared, initial_state, segment_ids)

        (out, final), pullback = jax.vjp(forward, per_token, shared, initial_state)
        return out, final, pullback((cot_out, cot_final))

    return jax.jit(run)


def _f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def run_documents_alone(fn, per_token, shared, segment_ids, *, initial_state=None, cot_out, cot_final=None,
                        zero_fill=False):
    """The expected packed result (module docstring), every document run on its own by `fn`."""
    per_token, shared, initial_state = _f64((per_token, shared, initial_state))
    cot_out = np.where(_real(segment_ids, cot_out), cot_out, 0.0)
    out = np.zeros(cot_out.shape)
    grads_token = [np.zeros(x.shape) for x in per_token]
    grads_shared = [np.zeros(x.shape) for x in shared]
    final = None if initial_state is None else initial_state.copy()
    grad_initial = None if initial_state is None else np.asarray(cot_final, np.float64).copy()
    for b, row in enumerate(np.asarray(segment_ids)):
        spans = document_spans(row)
        if spans and initial_state is not None and spans[0][0] > 0:
            grad_initial[b] = 0.0  # the row's first document starts after padding: the state is reset
        for start, stop in spans:
            first, last = start == 0, (start, stop) == spans[-1]
            state = None if initial_state is None else initial_state[b:b + 1] * (1.0 if first else 0.0)
            cot_state = None if cot_final is None else np.asarray(cot_final[b:b + 1]) * (1.0 if last else 0.0)
            piece = tuple(_document(x, b, start, stop, zero_fill) for x in per_token + (cot_out,))
            o, f, (g_token, g_shared, g_state) = _program(fn)(
                _f32(piece[:-1]), _f32(shared), _f32(state), None, _f32(piece[-1]), _f32(cot_state))
            out[b, start:stop] = np.asarray(o[0, :stop - start])
            for total, g in zip(grads_token, g_token):
                total[b, start:stop] += np.asarray(g[0, :stop - start])
            for total, g in zip(grads_shared, g_shared):
                total += np.asarray(g)
            if last and f is not None:
                final[b] = np.asarray(f[0])
            if first and g_state is not None:
                grad_initial[b] = np.asarray(g_state[0])
    return Expected(out, final, (tuple(grads_token), tuple(grads_shared), grad_initial))


def _document(x, row, start, stop, zero_fill):
    """`[1, L, ...]`: one document of x `[B, T, ...]`, or with zero_fill `[1, T, ...]` with it first."""
    piece = x[row:row + 1, start:stop]
    if not zero_fill:
        return piece
    return np.concatenate([piece, np.zeros((1, x.shape[1] - (stop - start)) + x.shape[2:])], axis=1)


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _real(segment_ids, like):
    """The non-padding mask `[B, T]` shaped to broadcast against `like` `[B, T, ...]`."""
    real = np.asarray(segment_ids) != 0
    return real.reshape(real.shape + (1,) * (np.ndim(like) - 2))


def check_packed_equals_alone(packed_fns, alone_fn, per_token, shared, segment_ids, *, initial_state=None,
                              zero_fill=False, rtol=2e-5, grad_rtol=1e-4, seed=0):
    """Each of `packed_fns` (name -> fn) on the packed row equals alone_fn on each document (outputs at
    real tokens, the last documents' final states, the gradients of every input, padding tokens'
    gradients zero); outputs at padding are finite. Returns the packed outputs per name."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    any_fn = next(iter(packed_fns.values()))
    shapes = jax.eval_shape(lambda *a: any_fn(*a, segment_ids), per_token, shared, initial_state)
    rng = np.random.default_rng(seed)
    cot_out = rng.standard_normal(shapes[0].shape)
    cot_final = None if shapes[1] is None else rng.standard_normal(shapes[1].shape)
    expected = run_documents_alone(alone_fn, per_token, shared, segment_ids, initial_state=initial_state,
                                   cot_out=cot_out, cot_final=cot_final, zero_fill=zero_fill)
    masked_cot = np.where(_real(segment_ids, cot_out), cot_out, 0.0)
    outputs = {}
    for what, fn in packed_fns.items():
        out, final, grads = _program(fn)(_f32(per_token), _f32(shared), _f32(initial_state), segment_ids,
                                         _f32(masked_cot), _f32(cot_final))
        out = outputs[what] = np.asarray(out, np.float64)
        assert np.all(np.isfinite(out)), f"{what}: non-finite outputs (padding included)"
        assert_close(np.where(_real(segment_ids, out), out, 0.0), expected.out, rtol, f"{what} outputs")
        if expected.final is not None:
            assert_close(final, expected.final, rtol, f"{what} final state")
        names = ("per-token input", "shared input", "initial state")
        for name, got, want in zip(names, grads, expected.grads):
            for i, (g, e) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
                assert_close(g, e, grad_rtol, f"{what} grad of {name} {i}")
    return outputs
