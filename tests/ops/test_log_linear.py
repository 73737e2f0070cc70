"""log_linear_attention: Fenwick levels; every impl (and the decoding step, and the materialised mask)
equals the token recurrence, with gradients, for the gated, per-channel gated, GDN and KDA transitions;
unit level scales give back gla / gated_delta_rule / kda; errors name the problem."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hybrid_jax import ops
from hybrid_jax.ops import log_linear as ll
from hybrid_jax.ops.log_linear import FenwickState
from tests.ops import mixers
from tests.ops.mixers import Shape, assert_close

# transition -> (per-channel gate, delta rule)
TRANSITIONS = {"gla_scalar": (False, False), "gla": (True, False), "gated_delta_rule": (False, True),
               "kda": (True, True)}
SHAPE = Shape(batch=2, time=37, heads=1, value_heads=2)  # grouped heads: HV = 2 H
POSITION = 21  # the initial state's position: not a multiple of the chunk size 16
LEVELS = ll.num_levels(POSITION + SHAPE.time)  # 7: the fewest that positions 21..57 allow


def _inputs(transition, shape=SHAPE, levels=LEVELS, seed=0):
    per_channel, delta = TRANSITIONS[transition]
    k_mixer, k_lam, k_state = jax.random.split(jax.random.PRNGKey(seed), 3)
    make = mixers.make_gated_delta if delta else mixers.make_gla
    (q, k, v), kw = make(k_mixer, shape, jnp.float32, per_channel=per_channel)
    s = shape
    kw["level_scales"] = jax.random.normal(k_lam, (s.batch, s.time, s.value_heads, levels))
    state = jax.random.normal(k_state, (s.batch, s.value_heads, levels, s.key_dim, s.value_dim))
    return dict(q=q, k=k, v=v, **kw), state


@functools.lru_cache(maxsize=None)
def _value_and_grad(impl, chunk_size=16):
    """jit(value_and_grad) of a random projection of (o, final levels); the position stays traced."""

    def loss(inputs, levels, position, cot_o, cot_s):
        inputs = dict(inputs)
        q, k, v = inputs.pop("q"), inputs.pop("k"), inputs.pop("v")
        o, final = ll.log_linear_attention(q, k, v, **inputs, initial_state=FenwickState(levels, position),
                                           output_final_state=True, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o * cot_o) + jnp.sum(final.levels * cot_s), (o, final)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _run(impl, inputs, levels, position, chunk_size=16, seed=1):
    k_o, k_s = jax.random.split(jax.random.PRNGKey(seed))
    cot_o = jax.random.normal(k_o, inputs["v"].shape)
    cot_s = jax.random.normal(k_s, levels.shape)
    (_, (o, final)), grads = _value_and_grad(impl, chunk_size)(inputs, levels, jnp.int32(position),
                                                              cot_o, cot_s)
    return o, final, grads


def _check_equal(impl, inputs, levels, position, chunk_size=16):
    o, final, grads = _run(impl, inputs, levels, position, chunk_size)
    o_ref, final_ref, grads_ref = _run("reference", inputs, levels, position)
    assert_close(o, o_ref, what=f"{impl} output")
    assert_close(final.levels, final_ref.levels, what=f"{impl} final levels")
    assert int(final.position) == int(final_ref.position) == position + inputs["q"].shape[1]
    for name, g in {**grads[0], "initial levels": grads[1]}.items():
        g_ref = grads_ref[1] if name == "initial levels" else grads_ref[0][name]
        assert_close(g, g_ref, 2e-4, what=f"{impl} grad {name}")


@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_matches_reference(transition, impl):
    inputs, levels = _inputs(transition)
    _check_equal(impl, inputs, levels, POSITION)


@pytest.mark.parametrize("impl", ["scan", "chunk"])
@pytest.mark.parametrize("transition", ["gla_scalar", "kda"])
def test_single_token_after_a_state(transition, impl):
    """T = 1 at position 3: the incoming levels 0..1 merge into level 2 before the token (chunk = 1)."""
    shape = Shape(batch=1, time=1, heads=1, value_heads=1)
    inputs, levels = _inputs(transition, shape, levels=3, seed=2)
    _check_equal(impl, inputs, levels, 3)


def test_small_chunks_deep_stack():
    """Chunk 4 over 37 tokens from position 21: ten chunks, four inter-chunk levels, many merges."""
    inputs, levels = _inputs("gated_delta_rule", seed=3)
    _check_equal("chunk", inputs, levels, POSITION, chunk_size=4)


@pytest.mark.parametrize("per_block", [1, 3])
def test_blocked_chunk_form(monkeypatch, per_block):
    """The chunk form's blocks of one chunk (what long sequences get) and of three (the last padded with
    identity chunks) over ten chunks: the stack, the outputs, the final levels and the gradients cross
    block boundaries exactly as the token recurrence's."""
    from hybrid_jax.ops import log_linear_chunk

    monkeypatch.setattr(log_linear_chunk, "chunks_per_block", lambda *args: per_block)
    inputs, levels = _inputs("gated_delta_rule", seed=5)
    k_o, k_s = jax.random.split(jax.random.PRNGKey(1))
    cot = (jax.random.normal(k_o, inputs["v"].shape), jax.random.normal(k_s, levels.shape))
    fresh = _value_and_grad.__wrapped__("chunk", 4)  # a new jit: the cached one may hold another blocking
    (_, (o, final)), grads = fresh(inputs, levels, jnp.int32(POSITION), *cot)
    o_ref, final_ref, grads_ref = _run("reference", inputs, levels, POSITION)
    assert_close(o, o_ref, what="blocked output")
    assert_close(final.levels, final_ref.levels, what="blocked final levels")
    for name, g in {**grads[0], "initial levels": grads[1]}.items():
        g_ref = grads_ref[1] if name == "initial levels" else grads_ref[0][name]
        assert_close(g, g_ref, 2e-4, what=f"blocked grad {name}")


def test_masked_form_equals_reference():
    inputs, _ = _inputs("gla_scalar", seed=4)
    zeros = jnp.zeros((SHAPE.batch, SHAPE.value_heads, LEVELS, SHAPE.key_dim, SHAPE.value_dim))
    o_ref, _, _ = _run("reference", inputs, zeros, 0)
    inputs = dict(inputs)
    o = jax.jit(ll.log_linear_attention_masked)(inputs.pop("q"), inputs.pop("k"), inputs.pop("v"), **inputs)
    assert_close(o, o_ref, what="masked form")


PLAIN = {"gla_scalar": ops.gla, "gla": ops.gla, "gated_delta_rule": ops.gated_delta_rule, "kda": ops.kda}


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_unit_scales_give_the_plain_recurrence(transition):
    """lambda = 1: the levels only partition the one state of the plain recurrence."""
    inputs, levels = _inputs(transition, seed=5)
    inputs["level_scales"] = jnp.ones_like(inputs["level_scales"])
    o, final, _ = _run("chunk", inputs, levels, POSITION)
    plain = dict(inputs)
    del plain["level_scales"]
    o_plain, s_plain = jax.jit(functools.partial(PLAIN[transition], output_final_state=True))(
        plain.pop("q"), plain.pop("k"), plain.pop("v"), **plain, initial_state=levels.sum(axis=2))
    assert_close(o, o_plain, what="output")
    assert_close(final.levels.sum(axis=2), s_plain, what="sum of the final levels")


def _nonempty_levels(levels):
    return {int(i) for i in np.flatnonzero(np.abs(np.asarray(levels)).max(axis=(0, 1, 3, 4)) > 0)}


@pytest.mark.parametrize("transition", list(TRANSITIONS))
def test_prefill_continue_then_steps(transition):
    """chunk over tokens 0..20, chunk again over 21..28 from that state (a static position, not aligned),
    then decoding steps == the full recurrence. After token t the state holds exactly the levels {0} and
    {l : bit l - 1 of t is set}."""
    inputs, _ = _inputs(transition, seed=6)
    zeros = jnp.zeros((SHAPE.batch, SHAPE.value_heads, LEVELS, SHAPE.key_dim, SHAPE.value_dim))
    o_ref, final_ref, _ = _run("reference", inputs, zeros, 0)
    prefill, resume = 21, 29

    def chunked(part, levels):
        part = dict(part)
        state = None if levels is None else FenwickState(levels, prefill)  # a Python int: static
        return ll.log_linear_attention(part.pop("q"), part.pop("k"), part.pop("v"), **part,
                                       initial_state=state, output_final_state=True, chunk_size=16)

    o_head, state = jax.jit(chunked)({n: x[:, :prefill] for n, x in inputs.items()}, None)
    o_mid, state = jax.jit(chunked)({n: x[:, prefill:resume] for n, x in inputs.items()}, state.levels)
    assert int(state.position) == resume
    step = jax.jit(ll.log_linear_attention_step)
    outs = [o_head, o_mid]
    for t in range(resume, SHAPE.time):
        assert _nonempty_levels(state.levels) == {0} | {l for l in range(1, LEVELS) if (t - 1) >> (l - 1) & 1}
        token = {f"{name}_t": x[:, t] for name, x in inputs.items() if name not in ("q", "k", "v")}
        o_t, state = step(inputs["q"][:, t], inputs["k"][:, t], inputs["v"][:, t], state, **token)
        outs.append(o_t[:, None])
    assert_close(jnp.concatenate(outs, axis=1), o_ref, what="prefill + continuation + steps")
    assert_close(state.levels, final_ref.levels, what="final levels")
    assert int(state.position) == SHAPE.time


@given(t=st.integers(0, 5000), s=st.integers(0, 5000), r=st.integers(0, 5000))
def test_fenwick_level_properties(t, s, r):
    level = ll.fenwick_level
    assert level(t, s) == level(s, t) >= 0
    assert (level(t, s) == 0) == (t == s)
    assert level(t, r) <= max(level(t, s), level(s, r))  # an ultrametric: buckets nest
    assert int(level(jnp.asarray([t]), s)[0]) == level(t, s)  # the vectorised form agrees
    t_max = max(t, s)
    levels_seen = {level(t_max, x) for x in range(t_max + 1)}
    assert len(levels_seen) <= int(np.ceil(np.log2(t_max + 1))) + 1
    assert max(levels_seen) < ll.num_levels(t_max + 1)
    lvl = level(t_max, s) if s < t_max else 0
    if lvl:  # the sources at level l of t form the aligned block of 2^(l-1) left of t's own block
        block = [x for x in range(t_max + 1) if level(t_max, x) == lvl]
        assert len(block) == 2 ** (lvl - 1) and block[0] % 2 ** (lvl - 1) == 0
        assert block == list(range(block[0], block[-1] + 1)) and block[-1] < t_max


def test_errors_name_the_problem():
    rng = np.random.default_rng(0)
    draw = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    q, k, v, lam = draw(1, 5, 1, 8), draw(1, 5, 1, 8), draw(1, 5, 1, 5), draw(1, 5, 1, 4)
    g, beta = draw(1, 5, 1), draw(1, 5, 1)
    levels = np.zeros((1, 1, 4, 8, 5), np.float32)
    call = functools.partial(ll.log_linear_attention, q, k, v, g=g, beta=beta)
    with pytest.raises(ValueError, match=r"level_scales has L=2 levels but positions 0\.\.4 need L >= 4"):
        call(level_scales=lam[..., :2])
    with pytest.raises(ValueError, match=r"positions 9\.\.13 need L >= 5"):
        call(level_scales=lam, initial_state=FenwickState(levels, jnp.int32(9)))
    with pytest.raises(ValueError, match=r"level_scales must have shape \[B, T, HV, L\]"):
        call(level_scales=lam[:, :3])
    with pytest.raises(ValueError, match=r"chunk_size must be a power of two"):
        call(level_scales=lam, chunk_size=24)
    with pytest.raises(ValueError, match=r"unknown impl='pallas'"):
        call(level_scales=lam, impl="pallas")
    with pytest.raises(ValueError, match=r"initial_state must be a FenwickState"):
        call(level_scales=lam, initial_state=levels[:, :, 0])
    with pytest.raises(ValueError, match=r"initial_state.levels must have shape \[B, HV, L, K, V\]"):
        call(level_scales=lam, initial_state=FenwickState(levels[:, :, :3], 0))
    with pytest.raises(ValueError, match=r"beta must have shape \[B, T, HV\]"):
        call(level_scales=lam, beta=beta[:, :2])
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, HV\] = \(1, 5, 1\)"):
        ll.log_linear_attention_masked(q, k, v, g=np.repeat(g[..., None], 8, -1), level_scales=lam)
    with pytest.raises(ValueError, match=r"level_scales_t has L=4 levels but positions 8\.\.8 need L >= 5"):
        ll.log_linear_attention_step(q[:, 0], k[:, 0], v[:, 0], FenwickState(levels, jnp.int32(8)),
                                     g_t=g[:, 0], level_scales_t=lam[:, 0], beta_t=beta[:, 0])
