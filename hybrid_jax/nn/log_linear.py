r"""Log-linear Mamba-2, Gated DeltaNet and KDA layers (Guo et al. 2025, "Log-Linear Attention").

Each layer is its base layer (`Mamba2`, `GatedDeltaNet`, `KDA`: same projections, convolutions, gates
and output) whose single recurrent state is replaced by a Fenwick tree of states, one per level l of
the distance between query t and source s (l = 0 for s = t, else bit_length(t XOR s)):

    o_t = sum_{s <= t} lambda_t^{l(t, s)} (q_t . k_s) M_{t,s} v_s        (hybrid_jax.ops.log_linear)

with M the base layer's transition (Mamba-2's scalar decay, or the gated delta rule with a scalar or
per-channel decay). The level scales are data dependent, as in the paper's released layers:

    lambda = softplus(L * (x W_l))    [B, T, HV, num_levels],   W_l: [d, HV, num_levels],  L: [HV, num_levels]

L starts at one (so lambda starts at softplus(x W_l), about 0.8 for a unit-RMS input); all-ones
lambda gives back the base layer exactly. Log-linear Mamba-2 maps onto the op as q = C, k = B,
v = dt * x, g = A dt, scale 1, plus the D skip.

`num_levels` defaults to what `max_seq_len` tokens need, ceil(log2(max_seq_len)) + 1; a longer
sequence fails in the op with the number of levels it needs. The decode cache holds
ceil(log2(context)) + 1 float32 states (plus the conv history); the FLOPs count the base layer's
state work once per non-empty level, 1 + popcount(t) on average over the positions t < context.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.nn.attention import check_positive
from hybrid_jax.nn.common import Dense, logical_param
from hybrid_jax.nn.delta import KDA, GatedDeltaNet
from hybrid_jax.nn.linear_attention import check_impl
from hybrid_jax.nn.mamba import Mamba2
from hybrid_jax.nn.registry import register_mixer
from hybrid_jax.ops.log_linear import SUPPORTED as LOG_LINEAR_IMPLS
from hybrid_jax.ops.log_linear import log_linear_attention, num_levels


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
        self.level_weight = logical_param(jnp.ones((heads, levels), jnp.float32), ("heads", None))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.softplus(self.level_weight[...] * self.proj(x).astype(jnp.float32))


class LogLinearMixin:
    """Turns a single-state mixer layer into its log-linear version (config, cache, FLOPs, lambda).

    The base layer provides `value_heads` and a `mix` hook; the concrete class overrides `mix` to
    call `log_linear_attention` with `self.level_scales(x)`.
    """

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        cfg = super().default_config()
        cfg.num_levels = config_dict.placeholder(int)  # None: ceil(log2(max_seq_len)) + 1
        cfg.max_seq_len = 16384
        return cfg

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        super().check_config(cfg, d_model)
        check_impl(cfg, LOG_LINEAR_IMPLS)
        check_positive(cfg, "max_seq_len")
        if cfg.num_levels is not None:
            check_positive(cfg, "num_levels")
        if cfg.chunk_size & (cfg.chunk_size - 1):
            raise ValueError(f"chunk_size={cfg.chunk_size} must be a power of two (chunks align with Fenwick blocks)")

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
        self.level_scales = LevelScales(d_model, self.value_heads(cfg, d_model), self.levels(cfg), rngs=rngs)


@register_mixer("loglinear_mamba2")
class LogLinearMamba2(LogLinearMixin, Mamba2):
    """Mamba-2 with Fenwick-tree states."""

    def mix(self, u, x, dt, A, B, C) -> jax.Array:
        v = dt[..., None] * x.astype(jnp.float32)
        y, _ = log_linear_attention(C, B, v, g=A * dt, level_scales=self.level_scales(u), scale=1.0,
                                    impl=self.impl, chunk_size=self.chunk_size)
        return (y + self.D[...][:, None] * x.astype(jnp.float32)).astype(x.dtype)


class LogLinearDeltaMixin(LogLinearMixin):
    """The log-linear `mix` of the gated delta-rule layers (scalar or per-channel g)."""

    def mix(self, x, q, k, v, g, beta) -> jax.Array:
        o, _ = log_linear_attention(q, k, v, g=g, beta=beta, level_scales=self.level_scales(x),
                                    impl=self.impl, chunk_size=self.chunk_size)
        return o


@register_mixer("loglinear_gated_deltanet")
class LogLinearGatedDeltaNet(LogLinearDeltaMixin, GatedDeltaNet):
    """Gated DeltaNet with Fenwick-tree states."""


@register_mixer("loglinear_kda")
class LogLinearKDA(LogLinearDeltaMixin, KDA):
    """KDA with Fenwick-tree states."""
