r"""Quasi-linear attention (QLA) with candidate isolation, after VISTA (Meta, 2025: "Massive
Memorization with Hundreds of Trillions of Parameters for Sequential Transducer Generative
Recommenders", arXiv:2510.22049).

VISTA summarises a long user history with linear attention in which the "candidate" items read the
history (and themselves) but never each other: a candidate's label must not leak into another
candidate's prediction. Here, H heads of dim Dh, and a mask `isolated` `[B, T]` of the candidates:

    q = phi(x W_q),  k = phi(x W_k),  v = x W_v,  u = x W_u          [B, T, H, Dh],   phi = SiLU
    S_t = S_{t-1} + k_t v_t^T                    (history tokens: t not isolated)
    o_t = (S_{t-1} + k_t v_t^T)^T q_t / sqrt(Dh),  S_t = S_{t-1}      (candidates: read, never write)
    y   = (RMSNorm(o) * SiLU(u)) W_o

that is `hybrid_jax.ops.linear_attention(..., isolated=...)`: o_t = sum_{s < t, s not isolated}
(q_t . k_s) v_s + (q_t . k_t) v_t, the causal attention matrix with the candidates' columns zeroed
off the diagonal. There is **no row normalisation** (no softmax and no q . sum k denominator), as in
VISTA's QLA and the pointwise attention of HSTU (Zhai et al. 2024, "Actions Speak Louder than
Words"), which VISTA builds on.

The feature map and the output gate are not given in the sources available to us (the paper's QLA
section could not be read). We use the HSTU parameterisation that VISTA inherits, a
published-consistent choice: SiLU on the q and k projections (HSTU's pointwise SiLU attention,
linearised as phi(q) . phi(k)), and HSTU's output Norm(A V) * U with U = SiLU(x W_u), with RMSNorm
as the norm. The layer is a `LinearMixer`: cache, FLOPs, prefill and decode come from the base class,
with `isolated` passed through `__call__(x, isolated=)`, `prefill(..., isolated=)` and
`decode(..., isolated=)` (`[B, 1]` for one token). Without a mask it is causal linear attention.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.nn.common import Dense
from hybrid_jax.nn.layer_config import check_heads, check_impl, check_positive_numbers, check_precision, heads_and_dim
from hybrid_jax.nn.linear_mixer import LinearMixer, RecurrentCache, at_step, zero_where_invalid
from hybrid_jax.nn.norms import GatedRMSNorm
from hybrid_jax.nn.registry import register_mixer
from hybrid_jax.nn.context import context_option
from hybrid_jax.nn.segments import segment_option
from hybrid_jax.ops.linear_attention import linear_attention, linear_attention_step


@register_mixer("qla")
class QLA(LinearMixer):
    """Quasi-linear attention: SiLU features, no row normalisation, candidate isolation (module doc)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        # head_dim None: d_model // num_heads; precision None: the platform default
        return ml_collections.ConfigDict(dict(num_heads=4, head_dim=config_dict.placeholder(int), norm_eps=1e-5,
                                              impl="chunk", chunk_size=64, precision=config_dict.placeholder(str)))

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_heads(cfg, d_model)
        check_positive_numbers(cfg, "norm_eps")
        check_impl(cfg)
        check_precision(cfg)

    @classmethod
    def state_elements(cls, cfg, d_model: int, context: int) -> int:
        heads, head_dim = heads_and_dim(cfg, d_model)
        return heads * head_dim**2  # one Dh x Dh state per head

    @classmethod
    def mixing_flops(cls, cfg, d_model: int, context: int) -> float:
        return 4 * cls.state_elements(cfg, d_model, context)  # write k v^T and read S^T q, 2 each

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, head_dim = heads_and_dim(cfg, d_model)
        self.impl, self.chunk_size, self.precision = cfg.impl, cfg.chunk_size, cfg.precision
        axes = ("embed", "heads", "kv")
        self.q_proj, self.k_proj, self.v_proj, self.u_proj = (
            Dense(d_model, (heads, head_dim), axes, rngs=rngs) for _ in range(4))
        self.norm = GatedRMSNorm(head_dim, activation_name="silu", eps=cfg.norm_eps)
        self.o_proj = Dense((heads, head_dim), d_model, ("heads", "kv", "embed"), rngs=rngs)

    def project(self, x, conv_states=None, *, lengths=None, segment_ids=None):
        return (jax.nn.silu(self.q_proj(x)), jax.nn.silu(self.k_proj(x)), self.v_proj(x)), ()

    def pad_as_identity(self, inputs, valid):
        q, k, v = inputs
        return q, zero_where_invalid(k, valid), v

    def mix(self, x, inputs, *, final=False, max_len=None, lengths=None, isolated=None, segment_ids=None):
        return linear_attention(*inputs, output_final_state=final, isolated=isolated, impl=self.impl,
                                chunk_size=self.chunk_size, precision=self.precision, **segment_option(segment_ids),
                                **context_option())

    def mix_step(self, x, inputs, state, isolated=None):
        o, state = linear_attention_step(*at_step(inputs), state,
                                         isolated_t=None if isolated is None else isolated[:, 0])
        return o[:, None], state

    def finish(self, o, x):
        return self.o_proj(self.norm(o, self.u_proj(x)))

    def __call__(self, x: jax.Array, isolated: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """x `[B, T, d_model]`; isolated `[B, T]` bool or None (the candidates); packed documents
        `segment_ids` `[B, T]` (`positions` are not read: the state carries position)."""
        inputs, _ = self.project(x)
        return self.finish(self.mix(x, inputs, isolated=isolated, **segment_option(segment_ids))[0], x)

    def prefill(self, x, *, max_len: int, lengths=None, isolated=None, segment_ids=None, positions=None):
        """As `LinearMixer.prefill`, with the candidates `isolated` `[B, T]` (they never enter the cache)."""
        inputs, conv = self.project(x)
        if lengths is not None:
            inputs = self.pad_as_identity(inputs, jnp.arange(x.shape[1])[None, :] < lengths[:, None])
        o, state = self.mix(x, inputs, final=True, isolated=isolated, **segment_option(segment_ids))
        return self.finish(o, x), RecurrentCache(state, conv)

    def decode(self, x, cache: RecurrentCache, position, isolated=None):
        """One token per row, x `[B, 1, d_model]`; isolated `[B, 1]` bool: a candidate reads the cache
        and its own key-value pair and leaves the cache as it was."""
        del position
        o, state = self.mix_step(x, self.project(x)[0], cache.state, isolated)
        return self.finish(o, x), RecurrentCache(state, cache.conv)
