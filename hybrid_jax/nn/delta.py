r"""The delta-rule layers: DeltaNet, Gated DeltaNet, Kimi Delta Attention (KDA), log-linear GDN and KDA.

All three share the input side (flash-linear-attention's layers; Yang et al. 2024 / 2025, Kimi Linear
report), with H query/key heads of dim K and HV value heads (HV % H == 0, grouped value heads) of
dim V = expand_v * K:

    q = l2norm(SiLU(conv(x W_q))),  k = l2norm(SiLU(conv(x W_k)))   [B, T, H, K]
    v = SiLU(conv(x W_v))                                          [B, T, HV, V]
    beta = sigmoid(x W_b)                                          [B, T, HV]

and differ in the decay and the output:

    DeltaNet:       S_t = (I - b k k^T) S_{t-1} + b k v^T;          y = RMSNorm(o) W_o
    Gated DeltaNet: g = -exp(A_log) softplus(x W_a + dt_bias)  [B, T, HV]   (one decay per head)
                    S_t = (I - b k k^T) exp(g_t) S_{t-1} + b k v^T; y = (RMSNorm(o) * SiLU(x W_g)) W_o
    KDA:            g = lb * sigmoid(exp(A_log) (x W_down W_up + dt_bias))  [B, T, HV, K]  (per channel)
                    S_t = (I - b k k^T) Diag(exp g_t) S_{t-1} + b k v^T
                    y = (RMSNorm(o) * sigmoid(x W_down' W_up' + b')) W_o

KDA's gate is flash-linear-attention's safe gate: with `gate_lower_bound` lb in [-5, 0) (default -5)
every g lies in [lb, 0], and the layer tells the op so (`kda(..., safe_gate=True, lower_bound=lb)`),
which lets the chunked form compute the in-chunk diagonal blocks as matmuls. `gate_lower_bound=None`
gives the unbounded gate of the Kimi Linear report, g = -exp(A_log) softplus(x W_down W_up + dt_bias),
and the op's exact path for any g <= 0. Decoding uses the same gate (the one-token step is exact for
any g).

A_log = log U(1, 16) per head; dt_bias starts at softplus^{-1} of a log-uniform dt in [1e-3, 0.1]
(per head for Gated DeltaNet, per head and channel for KDA), and for KDA's safe gate at the value
that gives the same starting decay, g = -exp(A_log) dt at f = 0 (`hybrid_jax.nn.initializers`); the
low-rank gates have rank `gate_low_rank_dim` (default V, as in Kimi Linear). The RMSNorm weights
span V and are shared by the heads. o_t = S_t^T q_t / sqrt(K) (hybrid_jax.ops.delta). `precision`
(None: the platform default) is the chunked op's matmul precision.

Subclasses change only the hooks `init_gates` (decay / output-gate parameters and the output norm),
`gates` (g, beta), the op (`OP` / `STEP`) and `finish`, so the log-linear variants
(`LogLinearGatedDeltaNet`, `LogLinearKDA`: `LogLinearMixin` of `hybrid_jax.nn.log_linear` in front)
reuse everything but `mix` / `mix_step`, handing the log-linear op the inputs (q, k, v, g, beta) as
they are. Decoding (`LinearMixer`): padded prompt steps get beta = 0 and g = 0, i.e. the identity
transition and no write.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import fail
from hybrid_jax.nn.common import NO_DECAY, Dense, logical_param
from hybrid_jax.nn.conv import ConvProjection, conv_projections
from hybrid_jax.nn.initializers import a_log_init, dt_bias_init, safe_gate_bias_init
from hybrid_jax.nn.layer_config import (
    check_heads,
    check_impl,
    check_ints,
    check_gate_lower_bound,
    check_optional_ints,
    check_positive_numbers,
    check_precision,
    heads_and_dim,
)
from hybrid_jax.nn.linear_mixer import LinearMixer, at_step, zero_where_invalid
from hybrid_jax.nn.log_linear import LogLinearMixin
from hybrid_jax.nn.norms import GatedRMSNorm, RMSNorm, l2_normalize
from hybrid_jax.nn.registry import register_mixer
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import segment_option
from hybrid_jax.ops.delta import (
    delta_rule,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_step,
    kda,
    kda_step,
)


@register_mixer("deltanet")
class DeltaNet(LinearMixer):
    """DeltaNet: the delta rule with short convolutions and L2-normalised q, k (see the module docstring)."""

    DECAY_FLOPS = 0  # per state element and token
    OP, STEP = staticmethod(delta_rule), staticmethod(delta_rule_step)  # called with g only if it has one

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "head_dim": config_dict.placeholder(int),  # None: d_model // num_heads
                "num_v_heads": config_dict.placeholder(int),  # None: num_heads; more: grouped value heads
                "expand_v": 1.0,  # value head dim = expand_v * head_dim
                "conv_size": 4,
                "norm_eps": 1e-5,
                "impl": "auto",  # the Pallas kernels on a GPU, the chunked form elsewhere
                "chunk_size": 64,
                "precision": config_dict.placeholder(str),  # None: the platform default
            }
        )

    @classmethod
    def dims(cls, cfg, d_model: int) -> tuple[int, int, int, int]:
        """(H, K, HV, V): query/key heads and dim, value heads and dim."""
        heads, key_dim = heads_and_dim(cfg, d_model)
        v_heads = cfg.num_v_heads if cfg.num_v_heads is not None else heads
        return heads, key_dim, v_heads, int(cfg.expand_v * key_dim)

    @classmethod
    def value_heads(cls, cfg, d_model: int) -> int:
        return cls.dims(cfg, d_model)[2]

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_heads(cfg, d_model)
        check_ints(cfg, "conv_size")
        check_optional_ints(cfg, "num_v_heads")
        if cfg.num_v_heads is not None and cfg.num_v_heads % cfg.num_heads:
            fail("num_v_heads", f"{cfg.num_v_heads} must be a multiple of num_heads={cfg.num_heads} "
                                f"(each query/key head serves a group of value heads)")
        key_dim = heads_and_dim(cfg, d_model)[1]
        value_dim = cfg.expand_v * key_dim
        if not value_dim >= 1 or value_dim != int(value_dim):
            fail("expand_v", f"{cfg.expand_v} times head_dim={key_dim} must be a positive int, got {value_dim}")
        check_positive_numbers(cfg, "norm_eps")
        check_impl(cfg)
        check_precision(cfg)

    @classmethod
    def conv_channels(cls, cfg, d_model: int) -> int:
        heads, key_dim, v_heads, value_dim = cls.dims(cfg, d_model)
        return 2 * heads * key_dim + v_heads * value_dim

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        _, key_dim, v_heads, value_dim = cls.dims(cfg, d_model)
        return v_heads * key_dim * value_dim

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        # k^T S, the rank-one correction and the read S^T q are multiply-adds; the decay a multiply
        return (2 * 3 + cls.DECAY_FLOPS) * cls.state_elements(cfg, d_model, context)

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, key_dim, v_heads, value_dim = self.dims(cfg, d_model)
        self.impl, self.chunk_size, self.precision = cfg.impl, cfg.chunk_size, cfg.precision
        conv = dict(conv_size=cfg.conv_size, rngs=rngs)
        self.q_proj = ConvProjection(d_model, (heads, key_dim), ("heads", "kv"), **conv)
        self.k_proj = ConvProjection(d_model, (heads, key_dim), ("heads", "kv"), **conv)
        self.v_proj = ConvProjection(d_model, (v_heads, value_dim), ("heads", "kv"), **conv)
        self.b_proj = Dense(d_model, v_heads, ("embed", "heads"), rngs=rngs)
        self.init_gates(cfg, d_model, rngs)
        self.o_proj = Dense((v_heads, value_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def init_gates(self, cfg, d_model: int, rngs: nnx.Rngs) -> None:
        """Decay and output-gate parameters, and the output norm."""
        self.o_norm = RMSNorm(self.dims(cfg, d_model)[3], eps=cfg.norm_eps)

    def gates(self, x: jax.Array) -> tuple[jax.Array | None, jax.Array]:
        """(g, beta) in float32: the log decay (None: no decay) and beta `[B, T, HV]` in (0, 1)."""
        return None, jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))

    def op_options(self) -> dict:
        """Keyword options of the chunked op (and of the log-linear op) beyond impl and chunk_size."""
        return {"precision": self.precision}

    def project(self, x, conv_states=None, *, lengths=None, segment_ids=None):
        """(q, k `[B, T, H, K]` (unit norm), v `[B, T, HV, V]`, g, beta) and the conv histories of q, k, v."""
        (q, k, v), conv = conv_projections((self.q_proj, self.k_proj, self.v_proj), x, conv_states, lengths,
                                           segment_ids)
        return (l2_normalize(q), l2_normalize(k), v, *self.gates(x)), conv

    def pad_as_identity(self, inputs, valid):
        q, k, v, g, beta = inputs
        return q, k, v, zero_where_invalid(g, valid), zero_where_invalid(beta, valid)

    def mix(self, x, inputs, *, final=False, max_len=None, lengths=None, segment_ids=None):
        q, k, v, g, beta = inputs
        gate = {} if g is None else {"g": g}
        return self.OP(q, k, v, beta=beta, **gate, output_final_state=final, impl=self.impl,
                       chunk_size=self.chunk_size, **self.op_options(),
                       **segment_option(segment_ids),
                       **context_option())

    def mix_step(self, x, inputs, state):
        q, k, v, g, beta = at_step(inputs)
        gate = {} if g is None else {"g_t": g}
        o, state = self.STEP(q, k, v, state, beta_t=beta, **gate)
        return o[:, None], state

    def finish(self, o: jax.Array, x: jax.Array) -> jax.Array:
        return self.o_proj(self.o_norm(o))


@register_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: a Mamba-2-style scalar decay per head and a SiLU output gate."""

    DECAY_FLOPS = 1
    OP, STEP = staticmethod(gated_delta_rule), staticmethod(gated_delta_rule_step)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        cfg = super().default_config()
        cfg.expand_v = 2.0  # the Gated DeltaNet paper's value expansion
        return cfg

    def init_gates(self, cfg, d_model: int, rngs: nnx.Rngs) -> None:
        _, _, v_heads, value_dim = self.dims(cfg, d_model)
        self.a_proj = Dense(d_model, v_heads, ("embed", "heads"), rngs=rngs)
        self.A_log = logical_param(a_log_init(rngs.params(), (v_heads,)), ("heads",), role=NO_DECAY)
        self.dt_bias = logical_param(dt_bias_init(rngs.params(), (v_heads,)), ("heads",), role=NO_DECAY)
        self.g_proj = Dense(d_model, (v_heads, value_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.o_norm = GatedRMSNorm(value_dim, activation_name="silu", eps=cfg.norm_eps)

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """g = -exp(A_log) softplus(x W_a + dt_bias) `[B, T, HV]` (<= 0) and beta."""
        _, beta = super().gates(x)
        rate = jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
        return -jnp.exp(self.A_log[...]) * rate, beta

    def finish(self, o: jax.Array, x: jax.Array) -> jax.Array:
        return self.o_proj(self.o_norm(o, self.g_proj(x)))


@register_mixer("kda")
class KDA(DeltaNet):
    """Kimi Delta Attention: a low-rank per-channel decay and a low-rank sigmoid output gate."""

    DECAY_FLOPS = 1
    OP, STEP = staticmethod(kda), staticmethod(kda_step)
    LEGACY_DEFAULTS = {"gate_lower_bound": None}  # runs saved before the safe gate used the softplus gate

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        cfg = super().default_config()
        cfg.gate_low_rank_dim = config_dict.placeholder(int)  # None: the value head dim (Kimi Linear)
        cfg.gate_lower_bound = -5.0  # the safe gate (module docstring); None: the unbounded softplus gate
        return cfg

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        super().check_config(cfg, d_model)
        check_optional_ints(cfg, "gate_low_rank_dim")
        check_gate_lower_bound(cfg)

    @classmethod
    def gate_rank(cls, cfg, d_model: int) -> int:
        return cfg.gate_low_rank_dim if cfg.gate_low_rank_dim is not None else cls.dims(cfg, d_model)[3]

    def init_gates(self, cfg, d_model: int, rngs: nnx.Rngs) -> None:
        _, key_dim, v_heads, value_dim = self.dims(cfg, d_model)
        rank = self.gate_rank(cfg, d_model)
        self.gate_lower_bound = None if cfg.gate_lower_bound is None else float(cfg.gate_lower_bound)
        self.f_down = Dense(d_model, rank, ("embed", "latent"), rngs=rngs)
        self.f_up = Dense(rank, (v_heads, key_dim), ("latent", "heads", "kv"), rngs=rngs)
        a_log = a_log_init(rngs.params(), (v_heads,))
        self.A_log = logical_param(a_log, ("heads",), role=NO_DECAY)
        if self.gate_lower_bound is None:
            dt_bias = dt_bias_init(rngs.params(), (v_heads, key_dim))
        else:  # the same starting decays as the softplus gate (hybrid_jax.nn.initializers)
            dt_bias = safe_gate_bias_init(rngs.params(), (v_heads, key_dim), a_log, self.gate_lower_bound)
        self.dt_bias = logical_param(dt_bias, ("heads", "kv"), role=NO_DECAY)
        self.g_down = Dense(d_model, rank, ("embed", "latent"), rngs=rngs)
        self.g_up = Dense(rank, (v_heads, value_dim), ("latent", "heads", "kv"), use_bias=True, rngs=rngs)
        self.o_norm = GatedRMSNorm(value_dim, activation_name="sigmoid", eps=cfg.norm_eps)

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """g `[B, T, HV, K]` (`kda_log_decay` of x W_down W_up + dt_bias) and beta."""
        _, beta = super().gates(x)
        logits = self.f_up(self.f_down(x)).astype(jnp.float32) + self.dt_bias[...]
        return kda_log_decay(logits, self.A_log[...], self.gate_lower_bound), beta

    def op_options(self) -> dict:
        if self.gate_lower_bound is None:
            return super().op_options()
        return {**super().op_options(), "safe_gate": True, "lower_bound": self.gate_lower_bound}

    def finish(self, o: jax.Array, x: jax.Array) -> jax.Array:
        return self.o_proj(self.o_norm(o, self.g_up(self.g_down(x))))


def kda_log_decay(logits: jax.Array, a_log: jax.Array, lower_bound: float | None) -> jax.Array:
    """KDA's log decay from logits = f(x) + dt_bias `[..., HV, K]` and A_log `[HV]`, float32:
    lower_bound * sigmoid(exp(A_log) * logits) in [lower_bound, 0] (the safe gate), or
    -exp(A_log) * softplus(logits) <= 0 for lower_bound None."""
    rate = jnp.exp(a_log)[:, None]
    if lower_bound is None:
        return -rate * jax.nn.softplus(logits)
    return lower_bound * jax.nn.sigmoid(rate * logits)


class LogLinearDeltaMixin(LogLinearMixin):
    """The log-linear op takes the gated delta-rule layers' inputs (q, k, v, g, beta) as they are
    (g scalar per head or per channel), with the default scale K^-1/2."""

    def fenwick_args(self, inputs: tuple) -> tuple[tuple, None]:
        return inputs, None


@register_mixer("loglinear_gated_deltanet")
class LogLinearGatedDeltaNet(LogLinearDeltaMixin, GatedDeltaNet):
    """Gated DeltaNet with Fenwick-tree states."""


@register_mixer("loglinear_kda")
class LogLinearKDA(LogLinearDeltaMixin, KDA):
    """KDA with Fenwick-tree states."""
