r"""The log-linear machinery (Guo et al. 2025, "Log-Linear Attention"): `LogLinearMixin` and its parts.

Not a mixer layer itself: the log-linear layers are defined next to their base layers
(`LogLinearMamba2` in `mamba.py`, `LogLinearGatedDeltaNet` and `LogLinearKDA` in `delta.py`), each
its base layer (same projections, convolutions, gates and output) with this mixin in front, whose
single recurrent state is replaced by a Fenwick tree of states, one per level l of the distance
between query t and source s (l = 0 for s = t, else bit_length(t XOR s)):

    o_t = sum_{s <= t} lambda_t^{l(t, s)} (q_t . k_s) M_{t,s} v_s        (hybrid_jax.ops.log_linear)

with M the base layer's transition (Mamba-2's scalar decay, or the gated delta rule with a scalar or
per-channel decay). The level scales are data dependent, as in the paper's released layers:

    lambda = softplus(L * (x W_l))    [B, T, HV, num_levels],   W_l: [d, HV, num_levels],  L: [HV, num_levels]

L starts at one (so lambda starts at softplus(x W_l), about 0.8 for a unit-RMS input); all-ones
lambda gives back the base layer exactly. The level weights L are not decayed by the optimiser
(role "no_decay"): decay would pull every level's scale towards softplus(0), whatever the data.

`num_levels` defaults to what `max_seq_len` tokens need, ceil(log2(max_seq_len)) + 1; a longer
sequence fails in the op with the number of levels it needs. The decode cache holds
ceil(log2(context)) + 1 float32 states (plus the conv history); the FLOPs count the base layer's
state work once per non-empty level, 1 + popcount(t) on average over the positions t < context.

Decoding. The cache state is a `FenwickState(levels [B, HV, n, K, V], position [B])` with
n = num_levels(max_len) (lambda's higher levels are never read before max_len, so they are dropped)
and one position per row; `decode` runs `log_linear_attention_step` row by row (vmapped, each row at
its own position). A ragged prefill cannot simply mask padded steps: Fenwick merges depend on the
absolute position, so padding after a row's prompt would still merge its levels. Instead, row b's
L_b tokens are moved to the end of the T steps and the whole row starts at position 2^m - (T - L_b),
2^m >= T: the padding then runs from zero state (identity steps on zeros stay zero) and token j sits
at 2^m + j, where l(2^m + j, 2^m + s) = l(j, s) for j, s < 2^m, so outputs and final levels equal
those of the unpadded prompt (level m + 1 only ever pairs tokens with the empty padding). The same
chunked op runs, vmapped over rows with a traced start position.

Context parallelism: inside `hybrid_jax.nn.context.sharded_mixer` the op gets `context_axis` and
passes the level states between shards itself (`hybrid_jax.ops.log_linear_context`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import fail
from hybrid_jax.nn.common import NO_DECAY, Dense, logical_param
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.layer_config import check_impl, check_ints, check_optional_ints
from hybrid_jax.nn.linear_mixer import at_step
from hybrid_jax.nn.segments import segment_option
from hybrid_jax.ops.log_linear import SUPPORTED as LOG_LINEAR_IMPLS
from hybrid_jax.ops.log_linear import FenwickState, log_linear_attention, log_linear_attention_step, num_levels


def mean_active_levels(context: int) -> float:
    """Mean over positions t = 0 .. context - 1 of the non-empty Fenwick levels, 1 + popcount(t)."""
    ones, bit = 0, 0
    while (1 << bit) < context:
        period, half = 1 << (bit + 1), 1 << bit
        ones += (context // period) * half + max(0, context % period - half)
        bit += 1
    return 1 + ones / max(context, 1)


class LevelScales(nnx.Module):
    """lambda = softplus(L * (x W_l)) `[B, T, HV, num_levels]` in float32 (see the module docstring)."""

    def __init__(self, d_model: int, heads: int, levels: int, *, rngs: nnx.Rngs):
        self.proj = Dense(d_model, (heads, levels), ("embed", "heads", None), rngs=rngs)
        ones = jnp.ones((heads, levels), jnp.float32)
        self.level_weight = logical_param(ones, ("heads", None), role=NO_DECAY)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softplus(self.level_weight[...] * self.proj(x).astype(jnp.float32))


def fit_levels(x: jax.Array, n: int, axis: int = -1) -> jax.Array:
    """x with `axis` cut or zero-padded to n levels."""
    x = jax.lax.slice_in_dim(x, 0, min(n, x.shape[axis]), axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths)


def ragged_fenwick_prefill(run, args: tuple, lam: jax.Array, lengths: jax.Array, n_cache: int):
    """Prefill of right-padded rows (padded steps already identity steps): see the module docstring.

    `run(args, lam, initial_state)` is the op over `[1, T, ...]` inputs. Returns (o `[B, T, ...]`,
    `FenwickState` with `n_cache` levels and position `lengths`).
    """
    t = lam.shape[1]
    span_bits = (t - 1).bit_length()  # 2^m >= T
    n_shifted = span_bits + 2  # positions up to 2^m + T - 1 < 2^(m+1)
    k, v = args[1], args[2]
    empty = jnp.zeros((1, v.shape[2], n_shifted, k.shape[-1], v.shape[-1]), jnp.float32)

    def row(args, lam, padding):  # one row [T, ...]: its prompt moved to the last L_b steps
        rolled = [None if a is None else jnp.roll(a, padding, axis=0)[None] for a in (*args, lam)]
        o, final = run(tuple(rolled[:-1]), rolled[-1], FenwickState(empty, (1 << span_bits) - padding))
        return jnp.roll(o[0], -padding, axis=0), final.levels[0]

    o, final = jax.vmap(row)(args, fit_levels(lam, n_shifted), t - lengths)
    return o, FenwickState(fit_levels(final, n_cache, axis=2), jnp.asarray(lengths, jnp.int32))


class LogLinearMixin:
    """Turns a single-state mixer layer into its log-linear version (config, cache, FLOPs, lambda,
    and `mix` / `mix_step` over Fenwick states).

    The base layer provides `value_heads`, `op_options()` (the op's precision and, for KDA, the safe
    gate: passed to the log-linear op as they are) and its `LinearMixer` hooks; the concrete class defines
    `fenwick_args(inputs) -> ((q, k, v, g, beta), scale)` (the op's view of the base inputs) and
    `fenwick_output(o, inputs)`.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        cfg = super().default_config()
        cfg.impl = "chunk"  # the log-linear op has no Pallas kernel, so no "auto"
        cfg.num_levels = config_dict.placeholder(int)  # None: ceil(log2(max_seq_len)) + 1
        cfg.max_seq_len = 16384
        return cfg

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        super().check_config(cfg, d_model)
        check_impl(cfg, LOG_LINEAR_IMPLS)
        check_ints(cfg, "max_seq_len")
        check_optional_ints(cfg, "num_levels")
        if cfg.chunk_size & (cfg.chunk_size - 1):
            fail("chunk_size", f"{cfg.chunk_size} must be a power of two (chunks align with Fenwick blocks)")

    @classmethod
    def levels(cls, cfg) -> int:
        return cfg.num_levels if cfg.num_levels is not None else num_levels(cfg.max_seq_len)

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        return num_levels(context) * super().state_elements(cfg, d_model, context)

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        return mean_active_levels(context) * super().mixing_flops(cfg, d_model, context)

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        super().__init__(cfg, d_model, rngs=rngs)
        self.lambda_levels = self.levels(cfg)
        self.level_scales = LevelScales(d_model, self.value_heads(cfg, d_model), self.lambda_levels, rngs=rngs)

    def fenwick_output(self, o: jax.Array, inputs: tuple) -> jax.Array:
        return o

    def cache_levels(self, max_len: int) -> int:
        """Levels of the decode state for positions < max_len; ValueError if lambda has fewer."""
        needed = num_levels(max_len)
        if needed > self.lambda_levels:
            raise ValueError(
                f"{self.kind}: max_len={max_len} needs {needed} Fenwick levels but the layer has "
                f"num_levels={self.lambda_levels}; raise max_seq_len (or num_levels) in its config"
            )
        return needed

    def mix(self, x, inputs, *, final=False, max_len=None, lengths=None, segment_ids=None):
        args, scale = self.fenwick_args(inputs)

        def run(args, lam, initial_state):
            q, k, v, g, beta = args
            return log_linear_attention(q, k, v, g=g, beta=beta, level_scales=lam, scale=scale,
                                        initial_state=initial_state, output_final_state=final, impl=self.impl,
                                        chunk_size=self.chunk_size, **self.op_options(),
                                        **segment_option(segment_ids), **context_option())

        lam = self.level_scales(x)
        if not final:
            o, state = run(args, lam, None)
        elif lengths is None or segment_ids is not None:
            # With segment ids the op itself makes padding identity steps and restarts the levels with
            # each document: the state is the last document's, at its own position (per row).
            o, state = run(args, lam[..., : self.cache_levels(max_len)], None)
            position = jnp.broadcast_to(jnp.asarray(state.position, jnp.int32), (x.shape[0],))
            state = FenwickState(state.levels, position)
        else:
            o, state = ragged_fenwick_prefill(run, args, lam, lengths, self.cache_levels(max_len))
        return self.fenwick_output(o, inputs), state

    def decode_limit(self, cache) -> int:
        """L Fenwick levels hold the levels l(p, s) = bit_length(p XOR s) < L of positions p < 2^(L-1)."""
        return 1 << (cache.state.levels.shape[-3] - 1)  # levels [..., B, HV, L, K, V]

    def mix_step(self, x, inputs, state: FenwickState):
        (q, k, v, g, beta), scale = self.fenwick_args(inputs)
        lam = self.level_scales(x)[..., : state.levels.shape[2]]

        def row(q, k, v, g, beta, lam, levels, position):  # the op's state has one position per batch
            one = lambda a: None if a is None else a[None]  # noqa: E731
            o, new = log_linear_attention_step(one(q), one(k), one(v), FenwickState(levels[None], position),
                                               g_t=one(g), beta_t=one(beta), level_scales_t=one(lam), scale=scale)
            return o[0], new.levels[0], new.position

        o, levels, position = jax.vmap(row)(*at_step((q, k, v, g, beta, lam)), state.levels, state.position)
        return self.fenwick_output(o[:, None], inputs), FenwickState(levels, position)
