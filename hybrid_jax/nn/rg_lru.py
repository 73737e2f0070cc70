r"""Griffin's recurrent block around the RG-LRU (De et al. 2024; RecurrentGemma's RecurrentBlock).

For x `[B, T, d_model]`, the RNN width E = expand * d_model split into H heads of P = E / H channels:

    g = GeLU(x W_gate + b_gate)                                  [B, T, H, P]   the gate branch
    u = Conv_W(x W_in) + b_conv          (no activation)         [B, T, H, P]   the recurrent branch
    i = sigmoid(u_h W^i_h + b^i_h),  r = sigmoid(u_h W^a_h + b^a_h)   per head h, W_h `[P, P]`
    h = rg_lru(u, i, r, Lambda, c)                               hybrid_jax.ops.rg_lru
    y = (h * g) W_out + b_out

The input and recurrence gates are block-diagonal, one `P x P` block per head, as RecurrentGemma
does (so H only shapes the gates; the recurrence itself is per channel). RecurrentGemma's W_in
bias is folded into the conv bias (a constant through a linear conv is a constant). `expand` is
1 in RecurrentGemma, 4/3 in the Griffin paper.

Lambda starts as in RecurrentGemma: the base decay a0 = exp(-softplus(Lambda)) has a0^2 uniform on
[0.9^2, 0.999^2] (uniform over the area of that ring), so with c = 8 and r ~ 1/2 a token's decay
a = a0^(8 r) starts between about 0.66 and 0.996.

Decoding: `RecurrentCache(state [B, H, P] float32, (conv history [B, W - 1, E],))`. A padded step of
a ragged prompt is made an identity step by r = 0: then a = 1 and sqrt(1 - a^2) = 0, no write.

Roles: the projection, gate and conv kernels decay; Lambda and every bias never decay.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from hybrid_jax.nn.common import NO_DECAY, WEIGHT, Dense, logical_param
from hybrid_jax.nn.conv import ConvProjection, conv_projections
from hybrid_jax.nn.initializers import inverse_softplus
from hybrid_jax.nn.layer_config import check_impl, check_ints, check_positive_numbers, expanded_dim
from hybrid_jax.nn.linear_mixer import LinearMixer, at_step, zero_where_invalid
from hybrid_jax.nn.registry import register_mixer
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import segment_option
from hybrid_jax.ops import first_order
from hybrid_jax.ops.rg_lru import C_DEFAULT, rg_lru, rg_lru_step

DECAY_RING = (0.9, 0.999)  # RecurrentGemma's min / max radius of the base decay a0


def lambda_init(key: jax.Array, shape, ring=DECAY_RING) -> jax.Array:
    """Lambda with a0 = exp(-softplus(Lambda)), a0^2 uniform on [ring[0]^2, ring[1]^2]."""
    lo, hi = ring
    a0_squared = jax.random.uniform(key, shape, jnp.float32, lo**2, hi**2)
    return inverse_softplus(-0.5 * jnp.log(a0_squared))


class BlockDiagonal(nnx.Module):
    """u `[..., H, P]` -> u_h W_h + b_h for each head h: a block-diagonal projection, W `[H, P, P]`.

    Initialised like a Dense of fan-in P (std P^-1/2), bias 0.
    """

    def __init__(self, heads: int, width: int, *, rngs: nnx.Rngs):
        kernel = jax.random.normal(rngs.params(), (heads, width, width), jnp.float32) / math.sqrt(width)
        self.kernel = logical_param(kernel, ("heads", "kv", None), role=WEIGHT)
        self.bias = logical_param(jnp.zeros((heads, width), jnp.float32), ("heads", "kv"), role=NO_DECAY)

    def __call__(self, u: jax.Array) -> jax.Array:
        y = jnp.einsum("...hi,hij->...hj", u, self.kernel[...].astype(u.dtype))
        return y + self.bias[...].astype(u.dtype)


@register_mixer("rg_lru")
class GriffinRecurrent(LinearMixer):
    """Griffin's recurrent block: GeLU gate branch times Conv -> RG-LRU branch (module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,  # blocks of the gate projections
                "expand": 1.0,  # RNN width E = expand * d_model
                "conv_size": 4,
                "c": C_DEFAULT,  # log a = -c r softplus(Lambda)
                "impl": "chunk",
                "chunk_size": 64,
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_ints(cfg, "num_heads", "conv_size")
        check_positive_numbers(cfg, "expand", "c")
        expanded_dim(cfg, "expand", d_model, cfg.num_heads)
        check_impl(cfg, first_order.SUPPORTED)

    @classmethod
    def dims(cls, cfg, d_model: int) -> tuple[int, int]:
        """(heads H, channels per head P)."""
        return cfg.num_heads, expanded_dim(cfg, "expand", d_model, cfg.num_heads)

    @classmethod
    def conv_channels(cls, cfg, d_model: int) -> int:
        return math.prod(cls.dims(cfg, d_model))

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        return math.prod(cls.dims(cfg, d_model))

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        # Per channel: the two gate sigmoids (2), log a = r * (-c softplus Lambda) (1), exp (1),
        # sqrt(-expm1(2 log a)) (3), the write sqrt * i * u (2), h = a h + write (2), the output
        # gate GeLU and product (2).
        return 13 * cls.state_elements(cfg, d_model, context)

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, width = self.dims(cfg, d_model)
        self.impl, self.chunk_size, self.c = cfg.impl, cfg.chunk_size, cfg.c
        self.gate_proj = Dense(d_model, (heads, width), ("embed", "heads", "kv"), use_bias=True, rngs=rngs)
        self.in_proj = ConvProjection(d_model, (heads, width), ("heads", "kv"), conv_size=cfg.conv_size,
                                      use_bias=True, activation_name="identity", rngs=rngs)
        self.input_gate = BlockDiagonal(heads, width, rngs=rngs)
        self.a_gate = BlockDiagonal(heads, width, rngs=rngs)
        lam = lambda_init(rngs.params(), (heads, width))
        self.a_param = logical_param(lam, ("heads", "kv"), role=NO_DECAY)
        self.out_proj = Dense((heads, width), d_model, ("heads", "kv", "embed"), use_bias=True, rngs=rngs)

    def project(self, x, conv_states=None, *, lengths=None, segment_ids=None):
        """(u, i, r) of the RG-LRU, `[B, T, H, P]` (gates float32), and the conv history of u."""
        (u,), conv = conv_projections((self.in_proj,), x, conv_states, lengths, segment_ids)
        gate_x = jax.nn.sigmoid(self.input_gate(u).astype(jnp.float32))
        gate_a = jax.nn.sigmoid(self.a_gate(u).astype(jnp.float32))
        return (u, gate_x, gate_a), conv

    def pad_as_identity(self, inputs, valid):
        # r = 0: a = 1 and sqrt(1 - a^2) = 0, so the state passes unchanged; u = 0 too, so no value
        # the padding holds (even a non-finite one) can reach the state through 0 * u.
        u, gate_x, gate_a = inputs
        return zero_where_invalid(u, valid), gate_x, zero_where_invalid(gate_a, valid)

    def mix(self, x, inputs, *, final=False, max_len=None, lengths=None, segment_ids=None):
        return rg_lru(*inputs, self.a_param[...], c=self.c, output_final_state=final, impl=self.impl,
                      chunk_size=self.chunk_size, **segment_option(segment_ids),
                      **context_option())

    def mix_step(self, x, inputs, state):
        y, state = rg_lru_step(*at_step(inputs), self.a_param[...], state, c=self.c)
        return y[:, None], state

    def finish(self, o, x):
        return self.out_proj(o * jax.nn.gelu(self.gate_proj(x)))
