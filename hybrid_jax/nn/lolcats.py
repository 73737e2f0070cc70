r"""LoLCATs linearised attention (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language
Models"): learnable Hedgehog feature maps plus exact sliding-window softmax, mixed per head (eq. 7).

The layer keeps an attention layer's projections (q/k/v/o, RoPE, GQA; same parameter names, so a
trained softmax layer's weights drop in) and replaces its softmax over the whole past. For query n,
head h, window W, scale 1/sqrt(Dh) and s_ni = q_n . k_i / sqrt(Dh):

    c_n   = max_{n-W < i <= n} s_ni                                   (stabiliser, as in eq. 7)
    a_ni  = gamma_h e^{s_ni - c_n}                for n-W < i <= n     (the window: exact softmax terms)
    a_nj  = (1 - gamma_h) phi_q(q_n) . phi_k(k_j)   for j <= n-W       (everything older: linear terms)
    y_n   = sum_i a_ni v_i / sum_i a_ni,    out_n = y_n W_o
    gamma_h = sigmoid(window_factor_h)   (learnable, one per query head; mix_init 0 gives 1/2)

The last W tokens are exact softmax terms; every older token enters through the linear part, which
shares the denominator, so the two are normalised jointly. Hedgehog feature maps, per query head h
(k heads are repeated to the query heads first, as LoLCATs does for GQA models):

    phi(x) = [softmax(x A_h + b_h), softmax(-(x A_h + b_h))]  in R^{2F},   A_h: [Dh, F] starting at the
                                                              identity, b_h = 0   (hybrid_jax.nn.feature_maps)

The linear sums run through `hybrid_jax.ops.linear_attention` (scale 1) on phi_q(q) and the keys and
values delayed by W positions (`[phi_k(k_{t-W}), (v_{t-W}, 1)]`, zero for t < W): appending a one to
each value makes the op's last output channel the normaliser sum, and the delay keeps the window's
tokens out of the linear part. The window terms are computed in blocks of W queries against 2W keys
(O(T W) memory).

Decoding keeps the op's state S = sum_{j <= p-W} phi_k(k_j) (v_j, 1)^T `[B, H, 2F, Dh + 1]` (float32;
its last column is the normaliser state) and a ring buffer of the last W keys and values (`KVCache`,
slot p mod W). Step p first folds the token leaving the window (position p - W, read from the slot
about to be overwritten) into S with `linear_attention_step`, which also reads the linear terms for
q_p, then writes k_p, v_p into that slot and attends to the W slots. Memory per sequence is constant
in the context: 4 H 2F (Dh + 1) + 2 HKV Dh min(context, W) * dtype bytes.

Packed documents (`segment_ids`, `hybrid_jax.nn.segments`): the window terms count only keys of the
query's document, a pair delayed into another document is dropped, and the linear op's state restarts
with each document; a packed prefill keeps the last document's state and window.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from ml_collections import config_dict

from hybrid_jax.checks import check_int, check_number, check_optional_int, fail
from hybrid_jax.nn.common import NO_DECAY, logical_param
from hybrid_jax.nn.feature_maps import HedgehogFeatureMap
from hybrid_jax.nn.kv_cache import KVCache, mean_attended_keys, prompt_ring_buffer, written_in_place
from hybrid_jax.nn.layer_config import check_heads, check_impl, check_precision, heads_and_dim
from hybrid_jax.nn.linear_mixer import STATE_BYTES
from hybrid_jax.nn.lora import attention_projections, check_projection_config, projection_defaults
from hybrid_jax.nn.registry import Mixer, register_mixer
from hybrid_jax.nn.rope import apply_rope, rotary_dim_for
from hybrid_jax.nn.context import context_axis, context_option
from hybrid_jax.nn.segments import prompt_tail, resolve_positions, segment_option
from hybrid_jax.ops.attention_decode import kv_cache_update
from hybrid_jax.ops.context import previous_tokens
from hybrid_jax.ops.linear_attention import linear_attention, linear_attention_step
from hybrid_jax.ops.segments import document_index

_F32 = jnp.float32
# Parameters stage 1 (attention transfer) trains; everything else stays frozen.
FEATURE_MAP_PARAMS = ("feature_map_q", "feature_map_k", "window_factor")


class LolcatsCache(NamedTuple):
    """Decode cache: the linear part's state (with the normaliser column) and the window's ring buffer."""

    state: jax.Array  # [B, H, 2F, Dh + 1] float32
    window: KVCache  # k, v [B, W, HKV, Dh]


def window_softmax_terms(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int, scale: float,
                         segment_ids: jax.Array | None = None):
    """(sum_i e^{s_ni - c_n} v_i `[B, T, H, Dv]`, sum_i e^{s_ni - c_n} `[B, T, H]`) over each query's
    last `window` keys (module docstring), float32; k, v have HKV heads dividing q's H. With
    `segment_ids` `[B, T]` only the keys of the query's own document count."""
    b, t, heads, dk = q.shape
    kv_heads, dv = k.shape[2], v.shape[3]
    groups, blocks = heads // kv_heads, -(-t // window)
    pad = blocks * window - t

    def key_blocks(x):  # [B, T, HKV, D] -> [B, n, 2W, HKV, D]: block i's keys at positions (i-1) W .. (i+1) W - 1
        x = jnp.pad(x.astype(_F32), ((0, 0), (window, pad), (0, 0), (0, 0)))
        previous = x[:, : blocks * window].reshape(b, blocks, window, kv_heads, -1)
        current = x[:, window:].reshape(b, blocks, window, kv_heads, -1)
        return jnp.concatenate([previous, current], axis=2)

    qb = jnp.pad(q.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, window, kv_heads, groups, dk)
    logits = jnp.einsum("bnqkgd,bnskd->bnkgqs", qb, key_blocks(k)) * scale
    offset = np.arange(window)[:, None] + window - np.arange(2 * window)[None, :]  # query pos - key pos
    key_pos = np.arange(blocks)[:, None] * window - window + np.arange(2 * window)[None, :]
    allowed = (offset >= 0) & (offset < window)
    allowed = allowed[None, :, :] & (key_pos >= 0)[:, None, :]  # [n, W, 2W]
    allowed = allowed[None, :, None, None]
    if segment_ids is not None:  # [B, n, 1, 1, W, 2W]: key and query in one document
        docs = jnp.broadcast_to(document_index(segment_ids)[:, :, None, None], (b, t, kv_heads, 1)).astype(_F32)
        query_docs = jnp.pad(docs[:, :, 0, 0], ((0, 0), (0, pad))).reshape(b, blocks, window)
        same = query_docs[..., :, None] == key_blocks(docs)[..., 0, 0][:, :, None, :]
        allowed = allowed & same[:, :, None, None]
    logits = jnp.where(allowed, logits, -jnp.inf)
    weights = jnp.where(allowed, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    numerator = jnp.einsum("bnkgqs,bnskv->bnqkgv", weights, key_blocks(v))
    denominator = jnp.einsum("bnkgqs->bnqkg", weights)
    numerator = numerator.reshape(b, blocks * window, heads, dv)[:, :t]
    return numerator, denominator.reshape(b, blocks * window, heads)[:, :t]


def window_softmax_terms_step(q_t: jax.Array, k_cache: jax.Array, v_cache: jax.Array, *, length: jax.Array,
                              scale: float):
    """The window terms of one query `[B, H, Dk]` against the first `length` `[B]` slots of the caches."""
    b, heads, dk = q_t.shape
    kv_heads = k_cache.shape[2]
    q = q_t.astype(_F32).reshape(b, kv_heads, heads // kv_heads, dk)
    logits = jnp.einsum("bkgd,bskd->bkgs", q, k_cache.astype(_F32)) * scale
    allowed = (jnp.arange(k_cache.shape[1])[None, :] < length[:, None])[:, None, None, :]
    logits = jnp.where(allowed, logits, -jnp.inf)
    weights = jnp.where(allowed, jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), 0.0)
    numerator = jnp.einsum("bkgs,bskv->bkgv", weights, v_cache.astype(_F32)).reshape(b, heads, -1)
    return numerator, weights.sum(-1).reshape(b, heads)


def _kv_heads(cfg) -> int:
    return cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_heads


@register_mixer("lolcats")
class LolcatsAttention(Mixer):
    """Hedgehog linear attention + sliding-window softmax, mixed per head (see the module docstring)."""

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({
            "num_heads": 8,
            "num_kv_heads": config_dict.placeholder(int),  # None: num_heads
            "head_dim": config_dict.placeholder(int),  # None: d_model // num_heads
            "rope": True,
            "rope_theta": 10000.0,
            "rope_fraction": 1.0,
            "window": 64,  # exact softmax over the last `window` tokens
            "feature_dim": config_dict.placeholder(int),  # F of the Hedgehog maps; None: head_dim
            "mix_init": 0.0,  # initial mixing logit: gamma = sigmoid(mix_init) on the window part
            "impl": "chunk",  # linear_attention implementation
            "chunk_size": 64,
            "precision": config_dict.placeholder(str),  # its matmul precision; None: the platform default
            **projection_defaults(),
        })

    @classmethod
    def check_config(cls, cfg: ml_collections.ConfigDict, d_model: int) -> None:
        check_heads(cfg, d_model)
        check_optional_int(cfg, "num_kv_heads")
        check_optional_int(cfg, "feature_dim")
        if cfg.num_heads % _kv_heads(cfg):
            fail("num_kv_heads", f"{cfg.num_kv_heads} must divide num_heads={cfg.num_heads} (grouped-query heads)")
        check_int(cfg, "window")
        check_number(cfg, "rope_fraction", low=0, high=1)
        check_number(cfg, "mix_init")
        check_impl(cfg)
        check_precision(cfg)
        check_projection_config(cfg)
        head_dim = heads_and_dim(cfg, d_model)[1]
        if cfg.rope and rotary_dim_for(head_dim, cfg.rope_fraction) == 0:
            fail("rope_fraction", f"{cfg.rope_fraction} rotates no dims of head_dim={head_dim}; use rope=False")

    @classmethod
    def _dims(cls, cfg, d_model: int) -> tuple[int, int, int, int]:
        heads, head_dim = heads_and_dim(cfg, d_model)
        return heads, _kv_heads(cfg), head_dim, cfg.feature_dim or head_dim

    @classmethod
    def cache_bytes(cls, cfg, d_model: int, context: int, dtype_bytes: int = 2) -> int:
        heads, kv_heads, head_dim, feature_dim = cls._dims(cfg, d_model)
        state = heads * 2 * feature_dim * (head_dim + 1) * STATE_BYTES
        return state + 2 * kv_heads * head_dim * min(context, cfg.window) * dtype_bytes

    @classmethod
    def flops_per_token(cls, cfg, d_model: int, context: int) -> int:
        heads, kv_heads, head_dim, feature_dim = cls._dims(cfg, d_model)
        params = 2 * d_model * head_dim * (heads + kv_heads) + 2 * heads * (head_dim + 1) * feature_dim + heads
        window = 2 * heads * head_dim * mean_attended_keys(context, cfg.window)
        linear = 2 * heads * 2 * feature_dim * (head_dim + 1)  # state update + readout
        return int(round(2 * (params + window + linear)))

    def __init__(self, cfg: ml_collections.ConfigDict, d_model: int, *, rngs: nnx.Rngs):
        heads, kv_heads, head_dim, feature_dim = self._dims(cfg, d_model)
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rotary_dim = rotary_dim_for(head_dim, cfg.rope_fraction) if cfg.rope else 0
        self.rope_theta, self.window, self.impl, self.chunk_size = cfg.rope_theta, cfg.window, cfg.impl, cfg.chunk_size
        self.precision = cfg.precision
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(
            cfg, d_model, heads, kv_heads, head_dim, rngs=rngs)
        self.feature_map_q = HedgehogFeatureMap(heads, head_dim, feature_dim)
        self.feature_map_k = HedgehogFeatureMap(heads, head_dim, feature_dim)
        # LoLCATs' name for the mixing logit; it never decays (a pull towards gamma = 1/2 means nothing)
        self.window_factor = logical_param(jnp.full((heads,), float(cfg.mix_init), _F32), ("heads",), role=NO_DECAY)

    def project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[B, T, H, Dh]`, k, v `[B, T, HKV, Dh]` after RoPE, as the attention layer computes them."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.rotary_dim:
            q = apply_rope(q, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)
            k = apply_rope(k, positions, theta=self.rope_theta, rotary_dim=self.rotary_dim)
        return q, k, v

    def _to_query_heads(self, x: jax.Array) -> jax.Array:
        return jnp.repeat(x, self.num_heads // self.num_kv_heads, axis=-2)

    def _linear_inputs(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(phi_k(k), (v, 1)) at the query heads, float32."""
        keys = self.feature_map_k(self._to_query_heads(k).astype(_F32))
        values = self._to_query_heads(v).astype(_F32)
        return keys, jnp.concatenate([values, jnp.ones(values.shape[:-1] + (1,), _F32)], axis=-1)

    def _mix(self, window_num, window_den, linear_out) -> jax.Array:
        """Eq. 7: jointly normalised window and linear terms; linear_out's last channel is its normaliser."""
        gamma = jax.nn.sigmoid(self.window_factor[...])[:, None]
        numerator = gamma * window_num + (1 - gamma) * linear_out[..., :-1]
        denominator = gamma[..., 0] * window_den + (1 - gamma[..., 0]) * linear_out[..., -1]
        return numerator / denominator[..., None]

    def _forward(self, x: jax.Array, *, final: bool = False, lengths: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
        """(layer output, k, v, the linear state after each row's `lengths` tokens if `final`)."""
        t = x.shape[1]
        q, k, v = self.project_qkv(x, resolve_positions(t, segment_ids, positions))
        keys, values = self._linear_inputs(k, v)
        if context_axis() is not None:
            window_num, window_den, keys, values = self._halo_terms(q, k, v, keys, values, segment_ids)
        else:
            window_num, window_den = window_softmax_terms(q, k, v, window=self.window,
                                                          scale=self.head_dim ** -0.5, segment_ids=segment_ids)
            delay = ((0, 0), (self.window, 0), (0, 0), (0, 0))  # position t reads the pair of t - W
            keys, values = jnp.pad(keys, delay)[:, :t], jnp.pad(values, delay)[:, :t]
            if segment_ids is not None:  # a pair delayed into another document is no pair of this one
                docs = document_index(segment_ids)
                own = (docs == jnp.pad(docs, ((0, 0), (self.window, 0)))[:, :t])[..., None, None]
                keys, values = jnp.where(own, keys, 0.0), jnp.where(own, values, 0.0)
        if lengths is not None:  # padded steps of ragged prompts add nothing to the state
            valid = (jnp.arange(t)[None, :] < lengths[:, None])[..., None, None]
            keys, values = jnp.where(valid, keys, 0.0), jnp.where(valid, values, 0.0)
        linear_out, state = linear_attention(self.feature_map_q(q.astype(_F32)), keys, values, scale=1.0,
                                             output_final_state=final, impl=self.impl, chunk_size=self.chunk_size,
                                             precision=self.precision, **segment_option(segment_ids),
                                             **context_option())
        y = self._mix(window_num, window_den, linear_out).astype(x.dtype)
        return self.o_proj(y), k, v, state

    def _halo_terms(self, q, k, v, keys, values, segment_ids):
        """Context parallelism: the window terms and the W-delayed linear pairs of this shard, from the
        previous shard's last W tokens (`previous_tokens`; zeros with segment id 0 on shard 0, so they
        are masked as padding). Returns (window_num, window_den, keys, values), the pairs kept inside
        their documents."""
        axis, w, t = context_axis(), self.window, q.shape[1]
        ids = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
        with_halo = lambda x: jnp.concatenate([previous_tokens(x, w, axis), x], axis=1)  # noqa: E731
        ids_ext = with_halo(ids)
        num, den = window_softmax_terms(jnp.concatenate([jnp.zeros_like(q[:, :w]), q], axis=1), with_halo(k),
                                        with_halo(v), window=w, scale=self.head_dim ** -0.5, segment_ids=ids_ext)
        docs = document_index(ids_ext)
        own = (docs[:, w:] == docs[:, :t])[..., None, None]
        keys, values = jnp.where(own, with_halo(keys)[:, :t], 0.0), jnp.where(own, with_halo(values)[:, :t], 0.0)
        return num[:, w:], den[:, w:], keys, values

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        return self._forward(x, segment_ids=segment_ids, positions=positions)[0]

    def prefill(self, x: jax.Array, *, max_len: int, lengths: jax.Array | None = None,
                segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
        """Output over the prompt and the cache after each row's prompt, its last document given
        `segment_ids` (`max_len` does not size it)."""
        del max_len
        y, k, v, state = self._forward(x, final=True, lengths=lengths, segment_ids=segment_ids, positions=positions)
        tail = None if segment_ids is None else prompt_tail(segment_ids, positions)
        ring = KVCache(prompt_ring_buffer(k, self.window, lengths, tail),
                       prompt_ring_buffer(v, self.window, lengths, tail))
        return y, LolcatsCache(state, ring)

    def decode(self, x: jax.Array, cache: LolcatsCache, position: jax.Array):
        """One token per row, x `[B, 1, d_model]` at positions `position` `[B]`."""
        q, k, v = self.project_qkv(x, position[:, None])
        slot, rows = position % self.window, jnp.arange(x.shape[0])
        leaving = (position >= self.window)[:, None, None]  # the slot holds position p - W
        old_keys, old_values = self._linear_inputs(cache.window.k[rows, slot], cache.window.v[rows, slot])
        linear_out, state = linear_attention_step(
            self.feature_map_q(q[:, 0].astype(_F32)), jnp.where(leaving, old_keys, 0.0),
            jnp.where(leaving, old_values, 0.0), cache.state, scale=1.0)
        k_cache, v_cache = kv_cache_update(cache.window.k, cache.window.v, k[:, 0], v[:, 0], slot)
        k_cache, v_cache = written_in_place((k_cache, v_cache))
        window_num, window_den = window_softmax_terms_step(
            q[:, 0], k_cache, v_cache, length=jnp.minimum(position + 1, self.window), scale=self.head_dim ** -0.5)
        y = self._mix(window_num, window_den, linear_out).astype(x.dtype)
        return self.o_proj(y[:, None]), LolcatsCache(state, KVCache(k_cache, v_cache))
