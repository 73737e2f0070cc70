"""Candidate isolation (`isolated` `[B, T]`): every linear op, in every impl (pallas: for gla), equals
the masked token recurrence (an isolated token outputs one step from S_{t-1} and passes S_{t-1} on) of
tests/ops/numpy_reference.py, and, for the non-delta ops, a materialised attention matrix whose
isolated columns are zero off the diagonal; outputs, final states and gradients. Changing one
candidate's inputs changes no other token's output (nor the final state) but its own; the same holds
for softmax attention. The steps take `isolated_t`."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import ops
from tests.ops import mixers, numpy_reference as npref
from tests.ops.mixers import Shape, assert_close

SHAPE = Shape()  # B = 2, T = 37 (three chunks of 16, the last partial), grouped heads (HV = 2 H)
ONE = Shape(batch=1, time=1, heads=1, value_heads=1)  # T = 1, its one token isolated
CHUNK = 16
POSITION = 21  # the log-linear initial state's position: not a multiple of the chunk
CANDIDATE = 20  # row 0: an isolated token with another right after it and history tokens later


def isolated_mask(shape: Shape, seed=11):
    if shape.time == 1:
        return jnp.ones((shape.batch, 1), bool)
    mask = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.35, (shape.batch, shape.time))
    return mask.at[0, CANDIDATE:CANDIDATE + 2].set(True).at[0, CANDIDATE + 2:CANDIDATE + 5].set(False)


# ----------------------------------------------------------------------------- materialised references


def _f64(x):
    return None if x is None else np.asarray(x, np.float64)


def isolated_decays(g, isolated):
    """float64 (D `[B, T, S, ...]`, E `[B, T, ...]`) for log decays g `[B, T, ...]`: D[t, s] is the decay
    from source s to query t under isolation (isolated tokens skipped, the query's own decay kept),
    0 where s > t or s is another isolated token, 1 at s = t; E[t] is the decay of the initial state."""
    g, iso = _f64(g), np.asarray(isolated)
    t = g.shape[1]
    trailing = lambda m, n: m.reshape(m.shape + (1,) * (n - m.ndim))  # noqa: E731
    carried = np.where(trailing(iso, g.ndim), 0.0, g)
    cum = np.cumsum(carried, axis=1)
    read = cum - carried + g  # the decay up to t - 1 of the carried state, then t's own
    keep = trailing((np.arange(t)[None, :, None] > np.arange(t)[None, None, :]) & ~iso[:, None, :], g.ndim + 1)
    rel = np.where(keep, read[:, :, None] - cum[:, None, :], 0.0)
    diag = trailing(np.eye(t, dtype=bool)[None], g.ndim + 1)
    return np.where(keep, np.exp(rel), 0.0) + diag, np.exp(read)


def gated_matrix(q, k, v, state, *, g=None, scale=None):
    """Non-delta ops as one materialised matrix: o_t = sum_s (q_t . (D[t, s] * k_s)) v_s + q_t^T (E_t * S0)."""
    hv, k_dim = v.shape[2], q.shape[-1]
    q = np.repeat(_f64(q), hv // q.shape[2], axis=2) * (k_dim**-0.5 if scale is None else scale)
    k = np.repeat(_f64(k), hv // k.shape[2], axis=2)
    g = np.zeros(k.shape) if g is None else _f64(g)
    g = g if g.ndim == 4 else np.broadcast_to(g[..., None], k.shape)

    def run(isolated):
        decay, initial = isolated_decays(g, isolated)
        scores = np.einsum("bthc,bshc,btshc->btsh", q, k, decay)
        return np.einsum("btsh,bshv->bthv", scores, _f64(v)) + np.einsum("bthc,bthc,bhcv->bthv", q, initial,
                                                                         _f64(state))

    return run


def ssd_matrix(x, dt, A, B, C, state, *, D=None):
    """ssd as `gated_matrix` with q = C, k = B, v = dt * x, g = A * dt, scale 1, plus D * x."""
    dt = _f64(dt)
    run = gated_matrix(C, B, dt[..., None] * _f64(x), state, g=dt * _f64(A), scale=1.0)
    return lambda isolated: run(isolated) + (0.0 if D is None else _f64(D)[:, None] * _f64(x))


def selective_matrix(u, dt, A, B, C, state, *, D=None):
    """selective_scan per channel and state: h_t = sum_s D[t, s] dt_s B_s u_s + E_t h0, y_t = C_t . h_t + D u_t."""
    u, dt, B, C, h0 = map(_f64, (u, dt, B, C, state))
    log_decay = dt[..., None] * _f64(A)
    write = (dt * u)[..., None] * B[:, :, None, :]

    def run(isolated):
        decay, initial = isolated_decays(log_decay, isolated)
        h = np.einsum("btsdn,bsdn->btdn", decay, write) + initial * h0[:, None]
        return np.einsum("btdn,btn->btd", h, C) + (0.0 if D is None else _f64(D) * u)

    return run


def softmax_matrix(q, k, v, isolated):
    """Causal softmax attention where the key of an isolated token is visible only to itself."""
    q, k, v = map(_f64, (q, k, v))
    k, v = (np.repeat(x, q.shape[2] // x.shape[2], axis=2) for x in (k, v))
    t = q.shape[1]
    logits = np.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    allowed = np.tril(np.ones((t, t), bool))[None] & (~np.asarray(isolated)[:, None, :] | np.eye(t, dtype=bool))
    logits = np.where(allowed[:, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bshv->bthv", weights / weights.sum(-1, keepdims=True), v)


# ----------------------------------------------------------------------------- the ops under test


@dataclasses.dataclass(frozen=True)
class Case:
    run: Callable  # (impl, args, kw, state, isolated) -> (o, final state array)
    make: Callable  # (key, Shape) -> (args, kw, state)
    loop: Callable  # float64 numpy: (args, kw, state, isolated) -> (o, final state)
    matrix: Callable | None = None  # (args, kw, state) -> (isolated -> o): the non-delta ops


MATRICES = {"linear_attention": gated_matrix, "gla": gated_matrix, "gla_scalar": gated_matrix,
            "ssd": ssd_matrix, "selective_scan": selective_matrix}


def _gated_case(name):
    spec = mixers.SPECS[name]
    loop = {"ssd": npref.ssd_loop, "selective_scan": npref.selective_loop}.get(name, npref.gated_loop)

    def run(impl, args, kw, state, isolated):
        return spec.fn(*args, **kw, initial_state=state, output_final_state=True, isolated=isolated, impl=impl,
                       chunk_size=CHUNK)

    def make(key, shape):
        args, kw = spec.make(key, shape, jnp.float32)
        return args, kw, jax.random.normal(jax.random.fold_in(key, 1), spec.state_shape(shape))

    matrix = MATRICES.get(name)
    return Case(run, make, lambda args, kw, state, iso: loop(*args, state, **kw, isolated=iso),
                None if matrix is None else lambda args, kw, state: matrix(*args, state, **kw))


def _log_linear_case(per_channel, delta):
    def run(impl, args, kw, levels, isolated):
        o, final = ops.log_linear_attention(*args, **kw, initial_state=ops.FenwickState(levels, jnp.int32(POSITION)),
                                            output_final_state=True, isolated=isolated, impl=impl, chunk_size=CHUNK)
        return o, final.levels

    def make(key, s):
        k_mixer, k_lam, k_state = jax.random.split(key, 3)
        (q, k, v), kw = (mixers.make_gated_delta if delta else mixers.make_gla)(k_mixer, s, jnp.float32,
                                                                                per_channel=per_channel)
        n = ops.num_levels(POSITION + s.time)
        kw["level_scales"] = jax.random.uniform(k_lam, (s.batch, s.time, s.value_heads, n), minval=0.5, maxval=1.5)
        return (q, k, v), kw, jax.random.normal(k_state, (s.batch, s.value_heads, n, s.key_dim, s.value_dim))

    def loop(args, kw, levels, isolated):
        return npref.log_linear_loop(*args, levels, POSITION, **kw, isolated=isolated)

    return Case(run, make, loop)


# gla_scalar's scalar gate is covered by ssd (the same gated path with a scalar decay)
CASES = {name: _gated_case(name) for name in mixers.SPECS if name != "gla_scalar"}
# the KDA transition (per-channel gate, delta rule): the log-linear form's isolation-specific paths are
# those of the delta rule (Tm carried as values); the non-delta ones are the gated terms of gla / ssd
CASES["log_linear_kda"] = _log_linear_case(per_channel=True, delta=True)


@functools.lru_cache(maxsize=None)
def compiled(name, impl):
    """jit((o, final state), gradient of a random projection of both): one compilation per op, impl and
    shape, reused across tests (the isolation property passes zero projections)."""
    run = functools.partial(CASES[name].run, impl)

    def loss(args, kw, state, isolated, cot_o, cot_s):
        o, final = run(args, kw, state, isolated)
        return jnp.sum(o * cot_o) + jnp.sum(final * cot_s), (o, final)

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    def outputs_and_grads(*a):
        (_, outputs), grads = value_and_grad(*a)
        return outputs, grads

    return jax.jit(outputs_and_grads)


@functools.lru_cache(maxsize=None)
def _forward_only(name, impl):
    return jax.jit(functools.partial(CASES[name].run, impl))


def run_and_grad(name, impl, args, kw, state, iso, seed=5):
    """((o, final), grads) with a fixed random projection of (o, final); at T = 1 the forward only,
    ((o, final), None), to save compilations: gradients are checked at T = 37, whose isolated tokens
    exercise the same terms."""
    if iso.shape[1] == 1:
        return _forward_only(name, impl)(args, kw, state, iso), None
    shapes = jax.eval_shape(functools.partial(CASES[name].run, impl), args, kw, state, iso)
    k_o, k_s = jax.random.split(jax.random.PRNGKey(seed))
    cot = (jax.random.normal(k_o, shapes[0].shape), jax.random.normal(k_s, shapes[1].shape))
    return compiled(name, impl)(args, kw, state, iso, *cot)


@functools.lru_cache(maxsize=None)
def inputs(name, shape):
    args, kw, state = CASES[name].make(jax.random.PRNGKey(0), shape)
    return args, kw, state, isolated_mask(shape)


@pytest.mark.parametrize("shape", [SHAPE, ONE], ids=["T37", "T1"])
@pytest.mark.parametrize("name", list(CASES))
def test_reference_is_the_isolated_recurrence(name, shape):
    args, kw, state, iso = inputs(name, shape)
    (o, final), _ = run_and_grad(name, "reference", args, kw, state, iso)
    o_loop, final_loop = CASES[name].loop(args, kw, state, iso)
    assert_close(o, o_loop, what=f"{name} reference vs the numpy loop")
    assert_close(final, final_loop, what=f"{name} final state vs the numpy loop")
    if CASES[name].matrix is not None:
        assert_close(o, CASES[name].matrix(args, kw, state)(iso), what=f"{name} vs the materialised matrix")
    if shape.time == 1 and not name.startswith("log_linear"):  # (the Fenwick levels still merge)
        # one isolated token: it reads a step from the initial state, which it passes on unchanged
        assert_close(final, state, rtol=0, what=f"{name}: an isolated token leaves the state")


@pytest.mark.parametrize("shape", [SHAPE, ONE], ids=["T37", "T1"])
@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("name", list(CASES))
def test_impls_match_reference(name, impl, shape):
    args, kw, state, iso = inputs(name, shape)
    (o, final), grads = run_and_grad(name, impl, args, kw, state, iso)
    (o_ref, final_ref), grads_ref = run_and_grad(name, "reference", args, kw, state, iso)
    assert_close(o, o_ref, what=f"{name}/{impl} output")
    assert_close(final, final_ref, what=f"{name}/{impl} final state")
    for (path, g), g_ref in zip(jax.tree.flatten_with_path(grads or {})[0], jax.tree.leaves(grads_ref)):
        assert_close(g, g_ref, 1e-4, what=f"{name}/{impl} grad {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------- candidates never see each other


def _perturb_token(tree, row, t, key):
    """Every `[B, T, ...]` array of `tree` with token (row, t) scaled elementwise by factors in
    (0.3, 0.9): signs kept, so gates stay <= 0 and dt, beta, level scales positive; directions change."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for i, x in enumerate(leaves):
        if x.ndim >= 2 and x.shape[:2] == (SHAPE.batch, SHAPE.time):
            factor = jax.random.uniform(jax.random.fold_in(key, i), x.shape[2:], minval=0.3, maxval=0.9)
            x = x.at[row, t].multiply(factor)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def check_isolation_property(forward, args, kw, iso, *extra):
    """Perturbing candidate CANDIDATE of row 0 changes its own output only (and not the final state);
    without isolation the same perturbation reaches later tokens (so the check can fail)."""
    changed = _perturb_token((args, kw), 0, CANDIDATE, jax.random.PRNGKey(7))
    (o, final), (o_new, final_new) = forward(args, kw, *extra, iso), forward(*changed, *extra, iso)
    others = np.ones(o.shape[:2], bool)
    others[0, CANDIDATE] = False
    scale = float(np.max(np.abs(np.asarray(o)))) + 1.0
    assert np.max(np.abs(np.asarray(o_new - o)[others])) <= 1e-6 * scale, "another token saw the candidate"
    assert np.max(np.abs(np.asarray(o_new - o)[0, CANDIDATE])) > 1e-3 * scale, "the candidate's output ignored it"
    if final is not None:
        assert_close(final_new, final, rtol=1e-6, what="final state after changing a candidate")
    plain = iso.at[0, CANDIDATE].set(False)
    o_leak = forward(*changed, *extra, plain)[0] - forward(args, kw, *extra, plain)[0]
    assert np.max(np.abs(np.asarray(o_leak)[0, CANDIDATE + 1:])) > 1e-3 * scale, "not isolated: must leak"


@pytest.mark.parametrize("impl", ["reference", "chunk"])  # (scan == reference on these inputs, above)
@pytest.mark.parametrize("name", list(CASES))
def test_candidates_do_not_see_each_other(name, impl):
    args, kw, state, iso = inputs(name, SHAPE)

    def forward(args, kw, state, iso):
        return run_and_grad(name, impl, args, kw, state, iso)[0]

    check_isolation_property(forward, args, kw, iso, state)


def _attention_inputs():
    ks = jax.random.split(jax.random.PRNGKey(3), 3)
    b, t = SHAPE.batch, SHAPE.time
    return (jax.random.normal(ks[0], (b, t, 4, 8)), jax.random.normal(ks[1], (b, t, 2, 8)),
            jax.random.normal(ks[2], (b, t, 2, 8))), isolated_mask(SHAPE)


@functools.lru_cache(maxsize=None)
def _attention(impl):
    def run(args, kw, iso):
        return ops.softmax_attention(*args, isolated=iso, impl=impl, block_size=CHUNK), None

    return jax.jit(run)


@pytest.mark.parametrize("impl", ["reference", "chunk", "xla"])
def test_softmax_attention_isolation(impl):
    args, iso = _attention_inputs()
    o = _attention(impl)(args, {}, iso)[0]
    assert_close(o, softmax_matrix(*args, iso), what=f"softmax {impl} vs the materialised mask")
    check_isolation_property(_attention(impl), args, {}, iso)
    if impl == "chunk":  # the flash custom VJP with the isolated keys
        loss = lambda impl: jax.grad(  # noqa: E731
            lambda a: jnp.sum(jnp.sin(_attention(impl)(a, {}, iso)[0])))(args)
        for g, g_ref in zip(loss("chunk"), loss("reference")):
            assert_close(g, g_ref, 1e-4, what="softmax chunk grad")


# ----------------------------------------------------------------------------- steps, kernels, errors

STEP_SHAPE = Shape(batch=2, time=5, heads=1, value_heads=2, key_dim=4, value_dim=3)
STEPS = {"linear_attention": ops.linear_attention_step, "gla": ops.gla_step, "delta_rule": ops.delta_rule_step,
         "gated_delta_rule": ops.gated_delta_rule_step, "kda": ops.kda_step, "ssd": ops.ssd_step,
         "selective_scan": ops.selective_scan_step, "log_linear_kda": ops.log_linear_attention_step}


@pytest.mark.parametrize("name", list(STEPS))
def test_steps_take_isolated_t(name):
    s = STEP_SHAPE
    args, kw, state = CASES[name].make(jax.random.PRNGKey(1), s)
    iso = jnp.array([[False, True, True, False, True], [True, False, False, True, False]])
    o_loop, final_loop = CASES[name].loop(args, kw, state, iso)
    at = lambda x, t: x[:, t] if x.ndim >= 2 and x.shape[:2] == (s.batch, s.time) else x  # noqa: E731
    suffix = "" if name in ("ssd", "selective_scan") else "_t"
    log_linear = name.startswith("log_linear")
    carry, outs = (ops.FenwickState(state, jnp.int32(POSITION)) if log_linear else state), []
    for t in range(s.time):
        o_t, carry = STEPS[name](*(at(x, t) for x in args), carry, **{key + suffix: at(x, t) for key, x in kw.items()},
                                 isolated_t=iso[:, t])
        outs.append(o_t)
    assert_close(jnp.stack(outs, 1), o_loop, what=f"{name} steps")
    assert_close(carry.levels if log_linear else carry, final_loop, what=f"{name} steps' final state")


def test_pallas_kernels_honour_isolation():
    """impl="pallas" (interpret mode on CPU): the kernels are unchanged, the chunk terms isolate."""
    s = Shape(batch=1, time=40, heads=1, value_heads=2, key_dim=16, value_dim=16)
    args, kw, state = CASES["gla"].make(jax.random.PRNGKey(2), s)
    iso = isolated_mask(Shape(batch=1, time=40))
    (o, final), grads = run_and_grad("gla", "pallas", args, kw, state, iso)
    (o_ref, final_ref), grads_ref = run_and_grad("gla", "reference", args, kw, state, iso)
    assert_close(o, o_ref, what="pallas output")
    assert_close(final, final_ref, what="pallas final state")
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert_close(g, g_ref, 1e-4, what="pallas grad")


def test_errors_name_the_problem():
    (q, k, v), kw = mixers.make_gla(jax.random.PRNGKey(0), Shape(time=4), jnp.float32)
    with pytest.raises(ValueError, match=r"gla: isolated must be a bool array of shape \[B, T\] = \(2, 4\), "
                                         r"got dtype float32"):
        ops.gla(q, k, v, **kw, isolated=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"linear_attention: isolated must have shape \[B, T\] \(bool\) = "
                                         r"\(2, 4\), got \(2, 3\)"):
        ops.linear_attention(q, k, v, isolated=jnp.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"softmax_attention: isolated must have shape \[B, Tk\] \(bool\)"):
        ops.softmax_attention(q, k, k, isolated=jnp.zeros((2, 5), bool))
    with pytest.raises(ValueError, match=r"gla_step: isolated_t must have shape \[B\] \(bool\) = \(2,\)"):
        ops.gla_step(q[:, 0], k[:, 0], v[:, 0], jnp.zeros((2, 4, 8, 5)), g_t=kw["g"][:, 0],
                     isolated_t=jnp.zeros((2, 1), bool))
    (u, dt, a, b, c), _ = mixers.make_selective(jax.random.PRNGKey(0), Shape(time=4), jnp.float32)
    with pytest.raises(ValueError, match=r"selective_scan: isolated must be a bool array"):
        ops.selective_scan(u, dt, a, b, c, isolated=jnp.zeros((2, 4), jnp.int32))
