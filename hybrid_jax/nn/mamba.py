r"""Mamba (S6), Mamba-2 (SSD) and log-linear Mamba-2 layers.

Mamba (Gu & Dao 2023), inner width E = expand * d, state size N, dt rank R = ceil(d / 16):

    x = SiLU(conv(u W_x)),  z = u W_z                              [B, T, E]
    dt = softplus((x W_dt_low) W_dt + dt_bias)                     [B, T, E]      (R-rank)
    B = x W_B,  C = x W_C                                          [B, T, N]
    A = -exp(A_log)  [E, N],  A_log[e, n] = log(n + 1)             (S4D-real init)
    y = selective_scan(x, dt, A, B, C, D) * SiLU(z),   out = y W_out     (D starts at 1)

Mamba-2 (Dao & Gu 2024), E = expand * d split into H = E / P heads of dim P, G groups of B/C:

    z = u W_z  [B, T, H, P],  x = SiLU(conv(u W_x)),  B, C = SiLU(conv(u W_B)), SiLU(conv(u W_C))  [B, T, G, N]
    dt = softplus(u W_dt + dt_bias)  [B, T, H],   A = -exp(A_log)  [H],  A_log ~ log U(1, 16)
    y = ssd(x, dt, A, B, C, D)                                      (D [H] starts at 1)
    out = RMSNorm_G(y * SiLU(z)) W_out      (norm after the gate, over each group of E / G channels)

The published single in_proj / x_proj matrices are kept as one Dense per output (same function,
each with its own logical axes, so heads and state dims shard independently), and the convolution
over the concatenated (x, B, C) as one depthwise ShortConv per stream (a depthwise conv of a
concatenation is the concatenation of the convs).

dt_bias and Mamba-2's A_log start as in `hybrid_jax.nn.initializers`. Both layers share the inputs
(x, dt, B, C), A = -exp(A_log) and the identity padding (dt = 0) through `SelectiveSSM`. Mamba-2's
`precision` (None: the platform default) is the matmul precision of the chunked SSD.

Log-linear Mamba-2 (`LogLinearMamba2`, Guo et al. 2025; machinery in `hybrid_jax.nn.log_linear`)
replaces the single state by a Fenwick tree of states and maps the SSD onto the log-linear op as
q = C, k = B, v = dt * x, g = A dt, scale 1, plus the D skip.
"""
from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import fail
from hybrid_jax.nn.common import NO_DECAY, Dense, logical_param
from hybrid_jax.nn.conv import ConvProjection, conv_projections
from hybrid_jax.nn.initializers import DT_MAX, DT_MIN, a_log_init, dt_bias_init
from hybrid_jax.nn.layer_config import (
    check_dt_range,
    check_impl,
    check_ints,
    check_optional_ints,
    check_positive_numbers,
    check_precision,
)
from hybrid_jax.nn.linear_mixer import LinearMixer, at_step, zero_where_invalid
from hybrid_jax.nn.log_linear import LogLinearMixin
from hybrid_jax.nn.norms import rms_normalize
from hybrid_jax.nn.registry import register_mixer
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import segment_option
from hybrid_jax.ops import first_order, gated
from hybrid_jax.ops.ssm import selective_scan, selective_scan_step, ssd, ssd_step


class SelectiveSSM(LinearMixer):
    """What Mamba and Mamba-2 share: inputs (x, dt, B, C), A = -exp(A_log), the D skip, the op pair
    `OP` / `STEP` and its supported implementations `IMPLS`."""

    IMPLS: ClassVar = first_order.SUPPORTED
    OP, STEP = staticmethod(selective_scan), staticmethod(selective_scan_step)

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_ints(cfg, "expand", "state_dim", "conv_size")
        check_dt_range(cfg)
        check_impl(cfg, cls.IMPLS)

    def pad_as_identity(self, inputs, valid):
        x, dt, B, C = inputs  # dt = 0: no decay (exp(A dt) = 1) and no write (dt B x = 0)
        return x, zero_where_invalid(dt, valid), B, C

    def decay_rate(self) -> jax.Array:
        """A = -exp(A_log)."""
        return -jnp.exp(self.A_log[...])

    def op_options(self) -> dict:
        """Keyword options of `OP` beyond impl and chunk_size (the first-order scan takes none)."""
        return {}

    def mix(self, u, inputs, *, final=False, max_len=None, lengths=None, segment_ids=None):
        x, dt, B, C = inputs
        return self.OP(x, dt, self.decay_rate(), B, C, D=self.D[...], output_final_state=final, impl=self.impl,
                       chunk_size=self.chunk_size, **self.op_options(), **segment_option(segment_ids),
                       **context_option())

    def mix_step(self, u, inputs, state):
        x, dt, B, C = at_step(inputs)
        y, state = self.STEP(x, dt, self.decay_rate(), B, C, state, D=self.D[...])
        return y[:, None], state


@register_mixer("mamba")
class Mamba(SelectiveSSM):
    """Mamba's selective SSM block (see the module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "expand": 2,
                "state_dim": 16,
                "dt_rank": config_dict.placeholder(int),  # None: ceil(d_model / 16)
                "conv_size": 4,
                "dt_min": DT_MIN,
                "dt_max": DT_MAX,
                "impl": "chunk",
                "chunk_size": 64,
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        super().check_config(cfg, d_model)
        check_optional_ints(cfg, "dt_rank")

    @classmethod
    def dims(cls, cfg, d_model: int) -> tuple[int, int, int]:
        """(inner width E, state size N, dt rank R)."""
        return cfg.expand * d_model, cfg.state_dim, cfg.dt_rank if cfg.dt_rank is not None else math.ceil(d_model / 16)

    @classmethod
    def conv_channels(cls, cfg, d_model: int) -> int:
        return cls.dims(cfg, d_model)[0]

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        inner, state, _ = cls.dims(cfg, d_model)
        return inner * state

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        # write dt B u (2 multiplies), decay exp(dt A) h (2), read C . h (1 multiply-add)
        return (2 + 2 + 2) * cls.state_elements(cfg, d_model, context)

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        inner, state, rank = self.dims(cfg, d_model)
        self.impl, self.chunk_size = cfg.impl, cfg.chunk_size
        self.x_proj = ConvProjection(d_model, (inner,), ("mlp",), conv_size=cfg.conv_size, use_bias=True, rngs=rngs)
        self.z_proj = Dense(d_model, inner, ("embed", "mlp"), rngs=rngs)
        self.dt_down = Dense(inner, rank, ("mlp", "latent"), rngs=rngs)
        # Mamba draws W_dt ~ U(+-R^-1/2); a normal with the same std (R^-1/2 / sqrt 3).
        self.dt_up = Dense(rank, inner, ("latent", "mlp"), init_scale=3**-0.5, rngs=rngs)
        dt_bias = dt_bias_init(rngs.params(), (inner,), cfg.dt_min, cfg.dt_max)
        self.dt_bias = logical_param(dt_bias, ("mlp",), role=NO_DECAY)
        self.b_proj = Dense(inner, state, ("mlp", "kv"), rngs=rngs)
        self.c_proj = Dense(inner, state, ("mlp", "kv"), rngs=rngs)
        s4d_real = jnp.broadcast_to(jnp.log(jnp.arange(1, state + 1, dtype=jnp.float32)), (inner, state))
        self.A_log = logical_param(s4d_real, ("mlp", "kv"), role=NO_DECAY)
        self.D = logical_param(jnp.ones((inner,), jnp.float32), ("mlp",), role=NO_DECAY)
        self.out_proj = Dense(inner, d_model, ("mlp", "embed"), rngs=rngs)

    def project(self, u, conv_states=None, *, lengths=None, segment_ids=None):
        """(x, dt, B, C) of the selective scan and the conv history of x."""
        (x,), conv = conv_projections((self.x_proj,), u, conv_states, lengths, segment_ids)
        dt = jax.nn.softplus(self.dt_up(self.dt_down(x)).astype(jnp.float32) + self.dt_bias[...])
        return (x, dt, self.b_proj(x), self.c_proj(x)), conv

    def finish(self, y, u):
        return self.out_proj(y * jax.nn.silu(self.z_proj(u)))


class GroupGatedRMSNorm(nnx.Module):
    """Mamba-2's output norm, gate first: RMSNorm(y * SiLU(z)) over each of G groups of heads.

    y, z `[B, T, H, P]`; the statistics span the (H / G) * P channels of a group; weight `[H, P]`.
    """

    def __init__(self, heads: int, head_dim: int, groups: int, *, eps: float):
        self.groups, self.eps = groups, eps
        self.scale = logical_param(jnp.ones((heads, head_dim), jnp.float32), ("heads", "kv"), role=NO_DECAY)

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        b, t, h, p = gated.shape
        normed = rms_normalize(gated.reshape(b, t, self.groups, (h // self.groups) * p), self.eps)
        return (normed.reshape(b, t, h, p) * self.scale[...]).astype(y.dtype)


@register_mixer("mamba2")
class Mamba2(SelectiveSSM):
    """Mamba-2's SSD block (see the module docstring)."""

    IMPLS: ClassVar = gated.SUPPORTED  # ssd runs on the gated family's machinery
    OP, STEP = staticmethod(ssd), staticmethod(ssd_step)

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "expand": 2,
                "head_dim": 64,
                "state_dim": 128,
                "num_groups": 1,
                "conv_size": 4,
                "dt_min": DT_MIN,
                "dt_max": DT_MAX,
                "norm_eps": 1e-5,
                "impl": "auto",  # the Pallas kernels on a GPU, the chunked form elsewhere
                "chunk_size": 64,
                "precision": config_dict.placeholder(str),  # None: the platform default
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        super().check_config(cfg, d_model)
        check_ints(cfg, "head_dim", "num_groups")
        check_positive_numbers(cfg, "norm_eps")
        check_precision(cfg)
        inner = cfg.expand * d_model
        if inner % cfg.head_dim:
            fail("head_dim", f"{cfg.head_dim} must divide the inner width expand * d_model = {inner}")
        if (inner // cfg.head_dim) % cfg.num_groups:
            fail("num_groups", f"{cfg.num_groups} must divide the number of heads {inner // cfg.head_dim} "
                               f"(expand * d_model / head_dim)")

    @classmethod
    def dims(cls, cfg, d_model: int) -> tuple[int, int, int, int]:
        """(heads H, head dim P, groups G, state size N)."""
        return cfg.expand * d_model // cfg.head_dim, cfg.head_dim, cfg.num_groups, cfg.state_dim

    @classmethod
    def value_heads(cls, cfg, d_model: int) -> int:
        return cls.dims(cfg, d_model)[0]

    @classmethod
    def conv_channels(cls, cfg, d_model: int) -> int:
        heads, head_dim, groups, state = cls.dims(cfg, d_model)
        return heads * head_dim + 2 * groups * state

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        heads, head_dim, _, state = cls.dims(cfg, d_model)
        return heads * state * head_dim

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        return (2 + 1 + 2) * cls.state_elements(cfg, d_model, context)  # write, decay, read

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, head_dim, groups, state = self.dims(cfg, d_model)
        self.impl, self.chunk_size, self.precision = cfg.impl, cfg.chunk_size, cfg.precision
        conv = dict(conv_size=cfg.conv_size, use_bias=True, rngs=rngs)
        self.z_proj = Dense(d_model, (heads, head_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.x_proj = ConvProjection(d_model, (heads, head_dim), ("heads", "kv"), **conv)
        # B and C are shared by the heads of a group (like grouped keys); groups stay replicated.
        self.b_proj = ConvProjection(d_model, (groups, state), (None, "kv"), **conv)
        self.c_proj = ConvProjection(d_model, (groups, state), (None, "kv"), **conv)
        self.dt_proj = Dense(d_model, heads, ("embed", "heads"), rngs=rngs)
        dt_bias = dt_bias_init(rngs.params(), (heads,), cfg.dt_min, cfg.dt_max)
        self.dt_bias = logical_param(dt_bias, ("heads",), role=NO_DECAY)
        self.A_log = logical_param(a_log_init(rngs.params(), (heads,)), ("heads",), role=NO_DECAY)
        self.D = logical_param(jnp.ones((heads,), jnp.float32), ("heads",), role=NO_DECAY)
        self.norm = GroupGatedRMSNorm(heads, head_dim, groups, eps=cfg.norm_eps)
        self.out_proj = Dense((heads, head_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def op_options(self) -> dict:
        return {"precision": self.precision}

    def project(self, u, conv_states=None, *, lengths=None, segment_ids=None):
        """(x `[B,T,H,P]`, dt `[B,T,H]`, B, C `[B,T,G,N]`) and the conv histories of x, B, C."""
        (x, B, C), conv = conv_projections((self.x_proj, self.b_proj, self.c_proj), u, conv_states, lengths,
                                           segment_ids)
        dt = jax.nn.softplus(self.dt_proj(u).astype(jnp.float32) + self.dt_bias[...])
        return (x, dt, B, C), conv

    def finish(self, y, u):
        return self.out_proj(self.norm(y, self.z_proj(u)))


@register_mixer("loglinear_mamba2")
class LogLinearMamba2(LogLinearMixin, Mamba2):
    """Mamba-2 with Fenwick-tree states (see the module docstring and `hybrid_jax.nn.log_linear`)."""

    def fenwick_args(self, inputs: tuple) -> tuple[tuple, float]:
        """q = C, k = B, v = dt x, g = A dt, scale 1."""
        x, dt, B, C = inputs
        return (C, B, dt[..., None] * x.astype(jnp.float32), self.decay_rate() * dt, None), 1.0

    def fenwick_output(self, o: jax.Array, inputs: tuple) -> jax.Array:
        x = inputs[0]
        return (o + self.D[...][:, None] * x.astype(jnp.float32)).astype(x.dtype)
