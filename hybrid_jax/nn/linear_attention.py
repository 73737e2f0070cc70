r"""Linear attention layers: feature-map linear attention and GLA.

LinearAttention (Katharopoulos et al. 2020; feature maps as in flash-linear-attention), H heads of
dim Dh, feature map phi applied per head to q and k:

    q = phi_q(x W_q),  k = phi_k(x W_k)  [B, T, H, F],   v = x W_v  [B, T, H, Dh]
    S_t = S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(F)           (hybrid_jax.ops.linear_attention)
    output_norm = "rmsnorm":      y = RMSNorm(o) W_o                  (per head; flash-linear-attention)
    output_norm = "denominator":  y = (S_t^T q_t / (q_t . sum_{s<=t} k_s + eps)) W_o     (Katharopoulos)

  phi: "identity" (F = Dh), "elu" (elu(x) + 1), "relu", or "hedgehog" (Zhang et al. 2024,
  "The Hedgehog & the Porcupine"): a learnable per-head affine map followed by the two-sided softmax
  phi(x) = [softmax(x A_h + b_h), softmax(-(x A_h + b_h))] (F = 2 Dh; A_h starts at the identity,
  q and k have their own maps). The denominator is carried by the same scan as an extra all-ones
  value column, so it costs one more value channel, not a second pass; it needs phi >= 0.

GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"):

    q = x W_q, k = x W_k  [B, T, H, Dk]  (Dk = expand_k d / H),  v = x W_v  [B, T, H, Dv]  (Dv = expand_v d / H)
    g = logsigmoid(x W_down W_up + b) / gate_logit_normalizer       [B, T, H, Dk], g <= 0
    S_t = Diag(exp g_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(Dk)      (hybrid_jax.ops.gla)
    y = (RMSNorm(o) * SiLU(x W_gate)) W_o

Both are `LinearMixer`s (hybrid_jax.nn.linear_mixer): cache, FLOPs, prefill and decode come from
the base class through the hooks project / pad_as_identity / mix / mix_step / finish. `precision`
(None: the platform default) is the chunked op's matmul precision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import check_choice, fail
from hybrid_jax.nn.common import Dense
from hybrid_jax.nn.feature_maps import HedgehogFeatureMap
from hybrid_jax.nn.layer_config import (
    check_heads,
    check_impl,
    check_ints,
    check_positive_numbers,
    check_precision,
    expanded_dim,
    heads_and_dim,
)
from hybrid_jax.nn.linear_mixer import LinearMixer, at_step, zero_where_invalid
from hybrid_jax.nn.norms import GatedRMSNorm, RMSNorm
from hybrid_jax.nn.registry import register_mixer
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import segment_option
from hybrid_jax.ops.linear_attention import gla, gla_step, linear_attention, linear_attention_step

FEATURE_MAPS = ("identity", "elu", "relu", "hedgehog")
OUTPUT_NORMS = ("rmsnorm", "denominator")


ELEMENTWISE_FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
}


@register_mixer("linear_attention")
class LinearAttention(LinearMixer):
    """Causal linear attention with a feature map (see the module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "head_dim": config_dict.placeholder(int),  # None: d_model // num_heads
                "feature_map": "elu",
                "output_norm": "rmsnorm",
                "norm_eps": 1e-5,
                "impl": "auto",  # the Pallas kernels on a GPU, the chunked form elsewhere
                "chunk_size": 64,
                "precision": config_dict.placeholder(str),  # None: the platform default
            }
        )

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_heads(cfg, d_model)
        check_choice(cfg, "feature_map", FEATURE_MAPS)
        check_choice(cfg, "output_norm", OUTPUT_NORMS)
        if cfg.output_norm == "denominator" and cfg.feature_map == "identity":
            fail("output_norm", "'denominator' needs a non-negative feature map (q . sum k must stay positive); "
                                "feature_map='identity' is not, use 'elu', 'relu' or 'hedgehog'")
        check_positive_numbers(cfg, "norm_eps")
        check_impl(cfg)
        check_precision(cfg)

    @classmethod
    def feature_dim(cls, cfg, d_model: int) -> int:
        return heads_and_dim(cfg, d_model)[1] * (2 if cfg.feature_map == "hedgehog" else 1)

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        heads, head_dim = heads_and_dim(cfg, d_model)
        value_dim = head_dim + (cfg.output_norm == "denominator")  # the all-ones denominator column
        return heads * cls.feature_dim(cfg, d_model) * value_dim

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        return 2 * 2 * cls.state_elements(cfg, d_model, context)  # write k v^T and read S^T q

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, head_dim = heads_and_dim(cfg, d_model)
        self.feature_map, self.output_norm = cfg.feature_map, cfg.output_norm
        self.eps, self.impl, self.chunk_size, self.precision = cfg.norm_eps, cfg.impl, cfg.chunk_size, cfg.precision
        self.q_proj = Dense(d_model, (heads, head_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.k_proj = Dense(d_model, (heads, head_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.v_proj = Dense(d_model, (heads, head_dim), ("embed", "heads", "kv"), rngs=rngs)
        hedgehog = cfg.feature_map == "hedgehog"
        self.q_map = HedgehogFeatureMap(heads, head_dim) if hedgehog else None
        self.k_map = HedgehogFeatureMap(heads, head_dim) if hedgehog else None
        self.norm = RMSNorm(head_dim, eps=cfg.norm_eps) if cfg.output_norm == "rmsnorm" else None
        self.o_proj = Dense((heads, head_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def features(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """phi(q), phi(k) `[B, T, H, F]`."""
        q, k = self.q_proj(x), self.k_proj(x)
        if self.q_map is not None:
            return self.q_map(q), self.k_map(k)
        phi = ELEMENTWISE_FEATURE_MAPS[self.feature_map]
        return phi(q), phi(k)

    @property
    def scale(self) -> float | None:
        # Denominator form: scale 1, it would cancel in the ratio anyway, and eps then compares with
        # q . sum k itself.
        return None if self.norm is not None else 1.0

    def project(self, x, conv_states=None, *, lengths=None, segment_ids=None):
        q, k = self.features(x)
        v = self.v_proj(x)
        if self.norm is None:  # the all-ones value column accumulates the denominator q . sum k
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        return (q, k, v), ()

    def pad_as_identity(self, inputs, valid):
        q, k, v = inputs
        return q, zero_where_invalid(k, valid), v

    def mix(self, x, inputs, *, final=False, max_len=None, lengths=None, segment_ids=None):
        return linear_attention(*inputs, scale=self.scale, output_final_state=final, impl=self.impl,
                                chunk_size=self.chunk_size, precision=self.precision, **segment_option(segment_ids),
                                **context_option())

    def mix_step(self, x, inputs, state):
        o, state = linear_attention_step(*at_step(inputs), state, scale=self.scale)
        return o[:, None], state

    def finish(self, o, x):
        if self.norm is not None:
            return self.o_proj(self.norm(o))
        o32 = o.astype(jnp.float32)
        normalised = o32[..., :-1] / (o32[..., -1:] + self.eps)
        return self.o_proj(normalised.astype(x.dtype))


@register_mixer("gla")
class GLA(LinearMixer):
    """Gated linear attention with a low-rank per-channel forget gate (see the module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {
                "num_heads": 4,
                "expand_k": 0.5,
                "expand_v": 1.0,
                "gate_low_rank_dim": 16,
                "gate_logit_normalizer": 16.0,
                "norm_eps": 1e-5,
                "impl": "auto",  # the Pallas kernels on a GPU, the chunked form elsewhere
                "chunk_size": 64,
                "precision": config_dict.placeholder(str),  # None: the platform default
            }
        )

    @classmethod
    def dims(cls, cfg, d_model: int) -> tuple[int, int, int]:
        heads = cfg.num_heads
        return heads, expanded_dim(cfg, "expand_k", d_model, heads), expanded_dim(cfg, "expand_v", d_model, heads)

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_ints(cfg, "num_heads", "gate_low_rank_dim")
        cls.dims(cfg, d_model)
        check_positive_numbers(cfg, "gate_logit_normalizer", "norm_eps")
        check_impl(cfg)
        check_precision(cfg)

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        heads, key_dim, value_dim = cls.dims(cfg, d_model)
        return heads * key_dim * value_dim

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        return (2 * 2 + 1) * cls.state_elements(cfg, d_model, context)  # write, read, decay

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, key_dim, value_dim = self.dims(cfg, d_model)
        self.normalizer, self.impl, self.chunk_size = cfg.gate_logit_normalizer, cfg.impl, cfg.chunk_size
        self.precision = cfg.precision
        self.q_proj = Dense(d_model, (heads, key_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.k_proj = Dense(d_model, (heads, key_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.v_proj = Dense(d_model, (heads, value_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.gate_down = Dense(d_model, cfg.gate_low_rank_dim, ("embed", "latent"), rngs=rngs)
        self.gate_up = Dense(cfg.gate_low_rank_dim, (heads, key_dim), ("latent", "heads", "kv"), use_bias=True,
                             rngs=rngs)
        self.out_gate = Dense(d_model, (heads, value_dim), ("embed", "heads", "kv"), rngs=rngs)
        self.norm = GatedRMSNorm(value_dim, activation_name="silu", eps=cfg.norm_eps)
        self.o_proj = Dense((heads, value_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def forget_gate(self, x: jax.Array) -> jax.Array:
        """g = logsigmoid(x W_down W_up + b) / normaliser `[B, T, H, Dk]` in float32, g <= 0."""
        logits = self.gate_up(self.gate_down(x)).astype(jnp.float32)
        return jax.nn.log_sigmoid(logits) / self.normalizer

    def project(self, x, conv_states=None, *, lengths=None, segment_ids=None):
        return (self.q_proj(x), self.k_proj(x), self.v_proj(x), self.forget_gate(x)), ()

    def pad_as_identity(self, inputs, valid):
        q, k, v, g = inputs
        return q, zero_where_invalid(k, valid), v, zero_where_invalid(g, valid)

    def mix(self, x, inputs, *, final=False, max_len=None, lengths=None, segment_ids=None):
        q, k, v, g = inputs
        return gla(q, k, v, g=g, output_final_state=final, impl=self.impl, chunk_size=self.chunk_size,
                   precision=self.precision, **segment_option(segment_ids),
                   **context_option())

    def mix_step(self, x, inputs, state):
        q, k, v, g = at_step(inputs)
        o, state = gla_step(q, k, v, state, g_t=g)
        return o[:, None], state

    def finish(self, o, x):
        return self.o_proj(self.norm(o, self.out_gate(x)))
